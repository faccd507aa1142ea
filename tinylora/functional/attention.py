"""Scaled dot-product attention as fused ops with a hand-derived backward.

Two entry points share one kernel:
- ``scaled_dot_product_attention(q, k, v)``: PyTorch's function, q (..., T, d) etc.
- ``self_attention(qkv, n_head)``: GPT's layout, the packed c_attn output (B, T, 3C) in and
  the heads merged (B, T, C) out. The head split and merge are folded into the op: q, k, v are
  strided views of qkv (BLAS takes them as they are) and the backward writes dq, dk, dv straight
  into one dqkv, so no split, transpose or zero-filled gradient arrays appear in the graph.

The kernel walks the batch in chunks whose (heads, T, S) score block fits in cache, so the
softmax's passes over the scores run from cache rather than memory.
"""
from __future__ import annotations

import math

from .. import backend
from ..backend import xp
from ..ops import unbroadcast
from ..tensor import Tensor, make_result

_bias_cache: dict = {}
_CHUNK_ELEMS = 1 << 18  # score entries per chunk (1 MiB of float32): stays in L2


def _mT(a):
    return xp.swapaxes(a, -1, -2)


def _masked_value(dtype):
    # finite, so a fully masked row softmaxes to uniform instead of NaN, and far enough below
    # any real score that exp() of it is exactly 0
    return -float(xp.finfo(dtype).max) / 4


def causal_bias(T: int, S: int, dtype):
    """(T, S) additive mask: 0 where query i may see key j (j <= i + S - T), else very negative.

    Aligned bottom-right, so T new queries after S - T cached keys see the whole cache.
    """
    key = (T, S, backend.np.dtype(dtype).str, backend.get_device())
    bias = _bias_cache.get(key)
    if bias is None:
        allowed = xp.tri(T, S, S - T, dtype=bool)
        bias = xp.where(allowed, xp.asarray(0, dtype=dtype), xp.asarray(_masked_value(dtype), dtype=dtype))
        if len(_bias_cache) > 64:
            _bias_cache.clear()
        _bias_cache[key] = bias
    return bias


def _keep(mask, lo, hi, B, T, S, is_causal):
    """The boolean may-attend mask of chunk lo:hi (None when only the causal bias applies)."""
    m = _rows(mask, lo, hi, B)
    if m is None or m.dtype != bool:
        return None
    return m & xp.tri(T, S, S - T, dtype=bool) if is_causal else m


def _mask_array(attn_mask):
    if attn_mask is None:
        return None
    return attn_mask.data if isinstance(attn_mask, Tensor) else xp.asarray(attn_mask)


def _rows(a, lo, hi, batch):
    """Rows lo:hi of the leading axis of a mask/array that may broadcast over it (size 1)."""
    if a is None or a.ndim < 4 or a.shape[0] != batch:
        return a
    return a[lo:hi]


def _chunks(batch: int, per_row: int):
    step = max(1, backend.cache_block(_CHUNK_ELEMS) // max(per_row, 1))
    for lo in range(0, batch, step):
        yield lo, min(batch, lo + step)


# Per batch chunk, with c = 1/√d and M the additive mask:
#   S = (c·Q) Kᵀ + M,   P = softmax(S),   Pd = P ⊙ dropmask,   O = Pd V
# Backward (dO given):
#   dV = Pdᵀ dO,   dPd = dO Vᵀ,   dP = dPd ⊙ dropmask,
#   dS = P ⊙ (dP − D) with D_i = Σ_j dP_ij P_ij = dO_i · O_i   (one dot per row, as FlashAttention)
#   dQ = c·dS K,   dK = dSᵀ (c·Q)
def _forward(Q, K, V, O, mask, dropout_p, is_causal, c):
    """Fill O (batch, heads, T, dv) in place; return what the backward needs."""
    B, T, S = Q.shape[0], Q.shape[-2], K.shape[-2]
    boolean = mask is not None and mask.dtype == bool
    bias = causal_bias(T, S, Q.dtype) if is_causal and not boolean else None
    Qs = Q * c                                        # (B, nh, T, d), scaled once: cheaper than S
    P = xp.empty(Q.shape[:-1] + (S,), dtype=Q.dtype)  # (B, nh, T, S)
    drop = xp.empty(P.shape, dtype=Q.dtype) if dropout_p > 0 else None
    for lo, hi in _chunks(B, P[0].size):
        Kc, Vc = K[lo:hi], V[lo:hi]
        p = xp.matmul(Qs[lo:hi], _mT(Kc), out=P[lo:hi])
        if bias is not None:
            p += bias
        if boolean:  # masked scores become one constant, so a fully masked row is uniform
            keep = _keep(mask, lo, hi, B, T, S, is_causal)
            xp.copyto(p, p.dtype.type(_masked_value(p.dtype)), where=~keep)
        elif mask is not None:
            p += _rows(mask, lo, hi, B).astype(p.dtype, copy=False)
        p -= p.max(axis=-1, keepdims=True)
        xp.exp(p, out=p)
        p *= 1 / p.sum(axis=-1, keepdims=True)
        if drop is not None:
            dm = backend.dropout_mask(p.shape, dropout_p, p.dtype)
            drop[lo:hi] = dm
            xp.matmul(p * dm, Vc, out=O[lo:hi])
        else:
            xp.matmul(p, Vc, out=O[lo:hi])
    return Qs, P, drop


def _backward(G, Qs, K, V, O, P, drop, c, dQ, dK, dV, mask=None, is_causal=False):
    """Write dQ, dK, dV (any of them may be None) for output gradient G (B, nh, T, dv)."""
    B, T, S = Qs.shape[0], Qs.shape[-2], K.shape[-2]
    for lo, hi in _chunks(B, P[0].size):
        g, p = G[lo:hi], P[lo:hi]
        pd = p if drop is None else p * drop[lo:hi]
        Kc, Vc = K[lo:hi], V[lo:hi]
        if dV is not None:
            xp.matmul(_mT(pd), g, out=dV[lo:hi])
        if dQ is None and dK is None:
            continue
        ds = g @ _mT(Vc)                               # dPd
        if drop is not None:
            ds *= drop[lo:hi]
        ds -= (g * O[lo:hi]).sum(axis=-1, keepdims=True)  # - D
        ds *= p                                        # dS / c is folded into dQ and Qs
        keep = _keep(mask, lo, hi, B, T, S, is_causal) if mask is not None else None
        if keep is not None:  # a masked score is a constant: no gradient (matters in full-masked rows)
            xp.copyto(ds, ds.dtype.type(0), where=~keep)
        if dQ is not None:
            xp.matmul(ds, Kc, out=dQ[lo:hi])
            dQ[lo:hi] *= c
        if dK is not None:
            xp.matmul(_mT(ds), Qs[lo:hi], out=dK[lo:hi])


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None) -> Tensor:
    """softmax(q kᵀ / √d + mask) v over the last two axes, like PyTorch's function.

    q (..., T, d), k (..., S, d), v (..., S, dv) -> (..., T, dv). attn_mask: boolean
    (True = may attend) or additive float, broadcastable to (..., T, S). is_causal masks
    keys after each query, aligned bottom-right (see ``causal_bias``). dropout_p applies to
    the attention weights (pass 0.0 in eval mode).
    """
    Qa, Ka, Va = q.data, k.data, v.data
    if Qa.shape[-1] != Ka.shape[-1] or Ka.shape[-2] != Va.shape[-2] or Qa.ndim < 2:
        raise ValueError(f"attention: q {Qa.shape}, k {Ka.shape}, v {Va.shape} do not fit "
                         "(q and k need the same last axis, k and v the same key axis)")
    c = Qa.dtype.type(scale if scale is not None else 1.0 / math.sqrt(Qa.shape[-1]))
    lead = xp.broadcast_shapes(Qa.shape[:-2], Ka.shape[:-2], Va.shape[:-2])
    T, S = Qa.shape[-2], Ka.shape[-2]
    mask = _mask_array(attn_mask)
    # one batch axis and a unit head axis: (N, 1, T, d); an input broadcast over batch axes is
    # materialised (rare), and its gradient summed back by unbroadcast below
    Q4, K4, V4 = (xp.broadcast_to(a, lead + a.shape[-2:]).reshape((-1, 1) + a.shape[-2:])
                  for a in (Qa, Ka, Va))
    M4 = None
    if mask is not None:
        M4 = xp.broadcast_to(mask, lead + (T, S)).reshape((-1, 1, T, S))
    N = Q4.shape[0]
    O4 = xp.empty((N, 1, T, Va.shape[-1]), dtype=Qa.dtype)
    Qs, P, drop = _forward(Q4, K4, V4, O4, M4, dropout_p, is_causal, c)
    out_shape = lead + (T, Va.shape[-1])

    def backward(g):
        G4 = xp.ascontiguousarray(g).reshape(O4.shape)
        dQ = xp.empty(Q4.shape, Qa.dtype) if q.requires_grad else None
        dK = xp.empty(K4.shape, Qa.dtype) if k.requires_grad else None
        dV = xp.empty(V4.shape, Qa.dtype) if v.requires_grad else None
        _backward(G4, Qs, K4, V4, O4, P, drop, c, dQ, dK, dV, M4, is_causal)
        return (None if dQ is None else unbroadcast(dQ.reshape(lead + Qa.shape[-2:]), Qa.shape),
                None if dK is None else unbroadcast(dK.reshape(lead + Ka.shape[-2:]), Ka.shape),
                None if dV is None else unbroadcast(dV.reshape(lead + Va.shape[-2:]), Va.shape))
    return make_result(O4.reshape(out_shape), (q, k, v), backward, "attention", (q, k, v))


def self_attention(qkv: Tensor, n_head: int, attn_mask=None, dropout_p: float = 0.0,
                   is_causal: bool = True) -> Tensor:
    """Multi-head self-attention from GPT's packed projection.

    qkv (B, T, 3C): queries, keys and values side by side (c_attn's output), each C = n_head·hs
    wide. Returns (B, T, C) with the heads side by side again, ready for c_proj. attn_mask: a
    boolean or additive mask broadcastable to (B, n_head, T, T).
    """
    X = qkv.data
    if X.ndim != 3 or X.shape[-1] % (3 * n_head):
        raise ValueError(f"self_attention: qkv must have shape (B, T, 3·C) with C divisible by "
                         f"n_head={n_head}, got {tuple(X.shape)}")
    B, T, C3 = X.shape
    C, hs = C3 // 3, C3 // 3 // n_head
    X5 = X.reshape(B, T, 3, n_head, hs)
    Q, K, V = (X5[:, :, i].transpose(0, 2, 1, 3) for i in range(3))   # (B, nh, T, hs) views
    c = X.dtype.type(1.0 / math.sqrt(hs))
    Y = xp.empty((B, T, n_head, hs), dtype=X.dtype)
    O = Y.transpose(0, 2, 1, 3)                       # write heads straight into (B, T, C) order
    mask = _mask_array(attn_mask)
    Qs, P, drop = _forward(Q, K, V, O, mask, dropout_p, is_causal, c)

    def backward(g):
        G = g.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
        dX = xp.empty((B, T, 3, n_head, hs), dtype=X.dtype)
        dQ, dK, dV = (dX[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        _backward(G, Qs, K, V, O, P, drop, c, dQ, dK, dV, mask, is_causal)
        return (dX.reshape(B, T, C3),)
    return make_result(Y.reshape(B, T, C), (qkv,), backward, "self_attention")
