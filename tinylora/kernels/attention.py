"""Fast attention for ``functional.scaled_dot_product_attention`` and ``self_attention``.

Same math as the reference (see functional/attention.py), made fast two ways:
- the batch is walked in chunks whose (heads, T, S) score block fits in cache, so the
  softmax's passes over the scores run from cache rather than memory (``blocking``);
- ``self_attention`` folds the head split and merge into the op: q, k, v are strided views of
  qkv (BLAS takes them as they are), the output is written straight in (B, T, C) order, and
  the backward writes dq, dk, dv straight into one dqkv, so no split, transpose or
  zero-filled gradient arrays appear in the graph.
Dropout masks are drawn chunk by chunk, in order, from the same stream.
"""
from __future__ import annotations

import math

from .. import backend, dispatch
from ..backend import xp
from ..functional.attention import (causal_bias, check_attention, check_self_attention,
                                    mask_array, masked_value)
from ..ops import unbroadcast
from ..tensor import Tensor, make_result
from .blocking import CACHE_VALUES, blocks

SCORE_BUDGET = 4 * CACHE_VALUES  # score entries per chunk (1 MiB of float32): stays in L2


def _mT(a):
    return xp.swapaxes(a, -1, -2)


def _rows(a, r, batch):
    """Rows r of the leading axis of a mask/array that may broadcast over it (size 1)."""
    if a is None or a.ndim < 4 or a.shape[0] != batch:
        return a
    return a[r]


def _keep(mask, r, B, T, S, is_causal):
    """The boolean may-attend mask of chunk r (None when only the causal bias applies)."""
    m = _rows(mask, r, B)
    if m is None or m.dtype != bool:
        return None
    return m & xp.tri(T, S, S - T, dtype=bool) if is_causal else m


def _chunks(batch: int, per_row: int):
    return blocks(batch, per_row, SCORE_BUDGET)


# Per batch chunk: S = (c·Q) Kᵀ + M,  P = softmax(S),  O = (P ⊙ m) V;  backward as the reference's.
def _forward(Q, K, V, O, mask, dropout_p, is_causal, c):
    """Fill O (batch, heads, T, dv) in place; return what the backward needs."""
    B, T, S = Q.shape[0], Q.shape[-2], K.shape[-2]
    boolean = mask is not None and mask.dtype == bool
    bias = causal_bias(T, S, Q.dtype) if is_causal and not boolean else None
    Qs = Q * c                                        # (B, nh, T, d), scaled once: cheaper than S
    P = xp.empty(Q.shape[:-1] + (S,), dtype=Q.dtype)  # (B, nh, T, S)
    # dropout keeps a bool mask (a quarter of a float one) and multiplies by 1/(1-p) apart:
    # (p·scale)·keep is exactly p·(keep·scale), the reference's value
    drop = xp.empty(P.shape, dtype=bool) if dropout_p > 0 else None
    scale = Q.dtype.type(1.0 / (1.0 - dropout_p)) if dropout_p > 0 else None
    for r in _chunks(B, P[0].size):
        p = xp.matmul(Qs[r], _mT(K[r]), out=P[r])
        if bias is not None:
            p += bias
        if boolean:  # masked scores become one constant, so a fully masked row is uniform
            keep = _keep(mask, r, B, T, S, is_causal)
            xp.copyto(p, p.dtype.type(masked_value(p.dtype)), where=~keep)
        elif mask is not None:
            p += _rows(mask, r, B).astype(p.dtype, copy=False)
        p -= p.max(axis=-1, keepdims=True)
        xp.exp(p, out=p)
        p *= 1 / p.sum(axis=-1, keepdims=True)
        if drop is not None:
            keep = drop[r] = backend.dropout_keep(p.shape, dropout_p)
            xp.matmul(p * scale * keep, V[r], out=O[r])
        else:
            xp.matmul(p, V[r], out=O[r])
    return Qs, P, (drop, scale)


def _backward(G, Qs, K, V, O, P, drop, c, dQ, dK, dV, mask=None, is_causal=False):
    """Write dQ, dK, dV (any of them may be None) for output gradient G (B, nh, T, dv)."""
    B, T, S = Qs.shape[0], Qs.shape[-2], K.shape[-2]
    drop, scale = drop
    for r in _chunks(B, P[0].size):
        g, p = G[r], P[r]
        pd = p if drop is None else p * scale * drop[r]
        if dV is not None:
            xp.matmul(_mT(pd), g, out=dV[r])
        if dQ is None and dK is None:
            continue
        ds = g @ _mT(V[r])                             # dPd
        if drop is not None:
            ds *= scale
            ds *= drop[r]
        ds -= (g * O[r]).sum(axis=-1, keepdims=True)   # - D
        ds *= p                                        # dS / c is folded into dQ and Qs
        keep = _keep(mask, r, B, T, S, is_causal) if mask is not None else None
        if keep is not None:  # a masked score is a constant: no gradient (fully masked rows)
            xp.copyto(ds, ds.dtype.type(0), where=~keep)
        if dQ is not None:
            xp.matmul(ds, K[r], out=dQ[r])
            dQ[r] *= c
        if dK is not None:
            xp.matmul(_mT(ds), Qs[r], out=dK[r])


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None) -> Tensor:
    Qa, Ka, Va = q.data, k.data, v.data
    check_attention(Qa, Ka, Va)
    c = Qa.dtype.type(scale if scale is not None else 1.0 / math.sqrt(Qa.shape[-1]))
    lead = xp.broadcast_shapes(Qa.shape[:-2], Ka.shape[:-2], Va.shape[:-2])
    T, S = Qa.shape[-2], Ka.shape[-2]
    mask = mask_array(attn_mask)
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
    X = qkv.data
    check_self_attention(X, n_head)
    B, T, C3 = X.shape
    C, hs = C3 // 3, C3 // 3 // n_head
    X5 = X.reshape(B, T, 3, n_head, hs)
    Q, K, V = (X5[:, :, i].transpose(0, 2, 1, 3) for i in range(3))   # (B, nh, T, hs) views
    c = X.dtype.type(1.0 / math.sqrt(hs))
    Y = xp.empty((B, T, n_head, hs), dtype=X.dtype)
    O = Y.transpose(0, 2, 1, 3)                       # write heads straight into (B, T, C) order
    mask = mask_array(attn_mask)
    Qs, P, drop = _forward(Q, K, V, O, mask, dropout_p, is_causal, c)

    def backward(g):
        G = g.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
        dX = xp.empty((B, T, 3, n_head, hs), dtype=X.dtype)
        dQ, dK, dV = (dX[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        _backward(G, Qs, K, V, O, P, drop, c, dQ, dK, dV, mask, is_causal)
        return (dX.reshape(B, T, C3),)
    return make_result(Y.reshape(B, T, C), (qkv,), backward, "self_attention")


dispatch.register("scaled_dot_product_attention", scaled_dot_product_attention)
dispatch.register("self_attention", self_attention)
