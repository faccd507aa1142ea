"""Scaled dot-product attention as fused ops with a hand-derived backward.

Three entry points:
- ``scaled_dot_product_attention(q, k, v)``: PyTorch's function, q (..., T, d) etc.
- ``self_attention(qkv, n_head)``: GPT's layout, the packed c_attn output (B, T, 3C) in and
  the heads merged (B, T, C) out.
- ``cached_self_attention(qkv, k_cache, v_cache, past, n_head)``: the same, continuing a KV
  cache (inference: generation feeds one new token per step).

Both are written plainly here, as the definition. Their fast versions (kernels/attention.py)
walk the batch in chunks whose score block stays in cache, and fold the head split and merge
into the op (strided views in, dq, dk, dv written straight into one dqkv).
"""
from __future__ import annotations

import math

from .. import backend, dispatch
from ..backend import xp
from ..ops import unbroadcast
from ..tensor import Tensor, make_result

_bias_cache: dict = {}


def _mT(a):
    return xp.swapaxes(a, -1, -2)


def masked_value(dtype):
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
        bias = xp.where(allowed, xp.asarray(0, dtype=dtype), xp.asarray(masked_value(dtype), dtype=dtype))
        if len(_bias_cache) > 64:
            _bias_cache.clear()
        _bias_cache[key] = bias
    return bias


def mask_array(attn_mask):
    if attn_mask is None:
        return None
    return attn_mask.data if isinstance(attn_mask, Tensor) else xp.asarray(attn_mask)


def check_attention(Q, K, V):
    if Q.shape[-1] != K.shape[-1] or K.shape[-2] != V.shape[-2] or Q.ndim < 2:
        raise ValueError(f"attention: q {Q.shape}, k {K.shape}, v {V.shape} do not fit "
                         "(q and k need the same last axis, k and v the same key axis)")


def check_self_attention(X, n_head: int):
    if X.ndim != 3 or X.shape[-1] % (3 * n_head):
        raise ValueError(f"self_attention: qkv must have shape (B, T, 3·C) with C divisible by "
                         f"n_head={n_head}, got {tuple(X.shape)}")


# With c = 1/√d, M the additive mask and m the dropout multiplier:
#   S = (c·Q) Kᵀ + M,   P = softmax(S),   Pd = P ⊙ m,   O = Pd V
# Backward (dO given):
#   dV = Pdᵀ dO,   dP = (dO Vᵀ) ⊙ m,
#   dS = P ⊙ (dP − D) with D_i = Σ_j dP_ij P_ij = dO_i · O_i   (one dot per row, as FlashAttention)
#   dQ = c·dS K,   dK = dSᵀ (c·Q)
def _attend(Q, K, V, mask, dropout_p, is_causal, c):
    """O = attention(Q, K, V) over the last two axes (leading axes broadcast), and its
    backward: dO -> (dQ, dK, dV) in the broadcast shape."""
    T, S = Q.shape[-2], K.shape[-2]
    Qs = Q * c
    scores = Qs @ _mT(K)                              # (..., T, S)
    keep = None                                       # a boolean mask: True = may attend
    if mask is not None and mask.dtype == bool:
        keep = mask & xp.tri(T, S, S - T, dtype=bool) if is_causal else mask
        # masked scores become one constant, so a fully masked row is uniform
        scores = xp.where(keep, scores, scores.dtype.type(masked_value(scores.dtype)))
    else:
        if is_causal:
            scores = scores + causal_bias(T, S, Q.dtype)
        if mask is not None:
            scores = scores + mask.astype(Q.dtype, copy=False)
    P = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    P = P / P.sum(axis=-1, keepdims=True)
    drop = backend.dropout_mask(P.shape, dropout_p, P.dtype) if dropout_p > 0 else None
    Pd = P if drop is None else P * drop
    O = Pd @ V

    def backward(G):
        dV = _mT(Pd) @ G
        dP = G @ _mT(V)
        if drop is not None:
            dP = dP * drop
        dS = P * (dP - (G * O).sum(axis=-1, keepdims=True))
        if keep is not None:  # a masked score is a constant: no gradient (fully masked rows)
            dS = xp.where(keep, dS, dS.dtype.type(0))
        return (dS @ K) * c, _mT(dS) @ Qs, dV
    return O, backward


@dispatch.op("scaled_dot_product_attention")
def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None) -> Tensor:
    """softmax(q kᵀ / √d + mask) v over the last two axes, like PyTorch's function.

    q (..., T, d), k (..., S, d), v (..., S, dv) -> (..., T, dv). attn_mask: boolean
    (True = may attend) or additive float, broadcastable to (..., T, S). is_causal masks
    keys after each query, aligned bottom-right (see ``causal_bias``). dropout_p applies to
    the attention weights (pass 0.0 in eval mode).
    """
    Q, K, V = q.data, k.data, v.data
    check_attention(Q, K, V)
    c = Q.dtype.type(scale if scale is not None else 1.0 / math.sqrt(Q.shape[-1]))
    O, attend_backward = _attend(Q, K, V, mask_array(attn_mask), dropout_p, is_causal, c)

    def backward(g):
        dQ, dK, dV = attend_backward(g)
        return (unbroadcast(dQ, Q.shape) if q.requires_grad else None,
                unbroadcast(dK, K.shape) if k.requires_grad else None,
                unbroadcast(dV, V.shape) if v.requires_grad else None)
    return make_result(O, (q, k, v), backward, "attention", (q, k, v))


@dispatch.op("self_attention")
def self_attention(qkv: Tensor, n_head: int, attn_mask=None, dropout_p: float = 0.0,
                   is_causal: bool = True) -> Tensor:
    """Multi-head self-attention from GPT's packed projection.

    qkv (B, T, 3C): queries, keys and values side by side (c_attn's output), each C = n_head·hs
    wide. Returns (B, T, C) with the heads side by side again, ready for c_proj. attn_mask: a
    boolean or additive mask broadcastable to (B, n_head, T, T).
    """
    X = qkv.data
    check_self_attention(X, n_head)
    B, T, C3 = X.shape
    C, hs = C3 // 3, C3 // 3 // n_head
    X5 = X.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)   # (3, B, nh, T, hs)
    c = X.dtype.type(1.0 / math.sqrt(hs))
    O, attend_backward = _attend(X5[0], X5[1], X5[2], mask_array(attn_mask), dropout_p,
                                 is_causal, c)                     # (B, nh, T, hs)

    def backward(g):
        dQKV = xp.stack(attend_backward(g.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)))
        return (dQKV.transpose(1, 3, 0, 2, 4).reshape(B, T, C3),)  # back to (B, T, 3, nh, hs)
    return make_result(O.transpose(0, 2, 1, 3).reshape(B, T, C), (qkv,), backward,
                       "self_attention")


@dispatch.op("cached_self_attention")
def cached_self_attention(qkv: Tensor, k_cache, v_cache, past: int, n_head: int,
                          attn_mask=None) -> Tensor:
    """``self_attention`` continuing a KV cache, for inference (no gradient).

    qkv (B, T, 3C): the T new positions, after ``past`` cached ones. Their keys and values
    are written into the arrays k_cache and v_cache (B, n_head, capacity, hs) at
    [past, past + T); each new query attends to every cached key and to the new keys up to
    itself (causal, aligned bottom-right). attn_mask: a boolean (True = may attend) or
    additive mask broadcastable to (B, n_head, T, past + T). Returns (B, T, C).
    """
    X = qkv.data
    check_self_attention(X, n_head)
    B, T, C3 = X.shape
    C, hs = C3 // 3, C3 // 3 // n_head
    q, k, v = X.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)   # 3 × (B, nh, T, hs)
    S = past + T
    k_cache[:, :, past:S] = k
    v_cache[:, :, past:S] = v
    y = scaled_dot_product_attention(Tensor._wrap(q), Tensor._wrap(k_cache[:, :, :S]),
                                     Tensor._wrap(v_cache[:, :, :S]), attn_mask=attn_mask,
                                     is_causal=True)                   # (B, nh, T, hs)
    return Tensor._wrap(y.data.transpose(0, 2, 1, 3).reshape(B, T, C))  # heads side by side
