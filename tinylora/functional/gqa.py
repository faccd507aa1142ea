"""Grouped-query attention: n_kv_heads key/value heads, each serving n_rep query heads.

``repeat_kv`` copies every K/V head n_rep times (head h of the result is K/V head h // n_rep,
Hugging Face's layout), so that the ordinary ``scaled_dot_product_attention`` applies. The
copy is used n_rep times, so its backward sums the n_rep gradients back into one head.
"""
from __future__ import annotations

from .. import dispatch
from ..backend import xp
from ..tensor import Tensor, make_result
from .attention import scaled_dot_product_attention

__all__ = ["repeat_kv", "grouped_query_attention"]


# y[:, h] = x[:, h // n_rep]  ->  dx[:, j] = Σ_{r < n_rep} dy[:, j·n_rep + r]
@dispatch.op("repeat_kv")
def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """x (B, n_kv, T, d) -> (B, n_kv·n_rep, T, d)."""
    if x.ndim != 4:
        raise ValueError(f"repeat_kv: expected (B, n_kv_heads, T, head_dim), got {x.shape}")
    if n_rep == 1:
        return x
    B, nkv, T, d = x.shape
    y = xp.repeat(x.data, n_rep, axis=1)

    def backward(g):
        return (g.reshape(B, nkv, n_rep, T, d).sum(axis=2),)
    return make_result(y, (x,), backward, "repeat_kv")


def grouped_query_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None,
                            dropout_p: float = 0.0, is_causal: bool = True) -> Tensor:
    """q (B, nh, T, d), k and v (B, n_kv, S, d) with nh a multiple of n_kv -> (B, nh, T, d)."""
    nh, nkv = q.shape[1], k.shape[1]
    if nh % nkv or v.shape[1] != nkv:
        raise ValueError(f"grouped_query_attention: {nh} query heads cannot be shared by "
                         f"{nkv} key / {v.shape[1]} value heads (need nh divisible by n_kv)")
    n_rep = nh // nkv
    return scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep),
                                        attn_mask=attn_mask, dropout_p=dropout_p,
                                        is_causal=is_causal)
