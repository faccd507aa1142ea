"""Scaled dot-product attention as one fused op with a hand-derived backward."""
from __future__ import annotations

import math

from .. import backend
from ..backend import xp
from ..ops import unbroadcast
from ..tensor import Tensor, make_result

_bias_cache: dict = {}


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


# S = q kᵀ·c + M,  P = softmax(S),  Pd = P ⊙ dropmask,  O = Pd v
#   ->  dv = Pdᵀ dO,  dPd = dO vᵀ,  dP = dPd ⊙ dropmask,  dS = P ⊙ (dP - Σ_j dP ⊙ P),
#       dq = dS k·c,  dk = dSᵀ q·c
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
    if Q.shape[-1] != K.shape[-1] or K.shape[-2] != V.shape[-2]:
        raise ValueError(f"attention: q {Q.shape}, k {K.shape}, v {V.shape} do not fit "
                         "(q and k need the same last axis, k and v the same key axis)")
    c = Q.dtype.type(scale if scale is not None else 1.0 / math.sqrt(Q.shape[-1]))
    T, S = Q.shape[-2], K.shape[-2]
    P = Q @ _mT(K)
    P *= c
    if is_causal:
        P += causal_bias(T, S, P.dtype)
    if attn_mask is not None:
        m = attn_mask.data if isinstance(attn_mask, Tensor) else xp.asarray(attn_mask)
        if m.dtype == bool:
            P = xp.where(m, P, P.dtype.type(_masked_value(P.dtype)))
        else:
            P = P + m.astype(P.dtype, copy=False)
    P -= P.max(axis=-1, keepdims=True)               # softmax in place over the keys
    xp.exp(P, out=P)
    P /= P.sum(axis=-1, keepdims=True)
    drop = None
    Pd = P
    if dropout_p > 0.0:
        drop = backend.dropout_mask(P.shape, dropout_p, P.dtype)
        Pd = P * drop
    O = Pd @ V

    def backward(g):
        dv = _reduce_to(_mT(Pd) @ g, V.shape) if v.requires_grad else None
        dq = dk = None
        if q.requires_grad or k.requires_grad:
            dP = g @ _mT(V)
            if drop is not None:
                dP *= drop
            dS = dP
            dS -= (dP * P).sum(axis=-1, keepdims=True)
            dS *= P
            dS *= c
            dq = _reduce_to(dS @ K, Q.shape) if q.requires_grad else None
            dk = _reduce_to(_mT(dS) @ Q, K.shape) if k.requires_grad else None
        return dq, dk, dv
    return make_result(O, (q, k, v), backward, "attention", (q, k, v))


def _reduce_to(g, shape):
    """Sum over batch axes that k or v shared by broadcasting (e.g. one k for all heads)."""
    return g if g.shape == shape else unbroadcast(g, shape)
