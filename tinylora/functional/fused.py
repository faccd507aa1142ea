"""Compositions an encoder layer runs back to back, each declared as one op.

Their definitions are just the composition of existing ops (so values and gradients are
those ops'); declaring each as one op lets a kernel (kernels/encode.py) run the whole
sequence under no_grad in fewer passes over memory: the Linears' bias added inside the
block-by-block pass that follows, the residual added there too, three products written
side by side into one buffer instead of concatenated.

    linear_cat(x, [W_i], [b_i])                 = cat([x W_iᵀ + b_i], -1)      (q, k, v)
    linear_self_attention(x, [W_q, W_k, W_v], [b_q, b_k, b_v], n_head, mask)
                                                = self_attention(linear_cat(..), n_head, mask)
    linear_gelu(x, W, b)                        = gelu(x Wᵀ + b)                (BERT's MLP in)
    linear_add_layer_norm(h, W, b, r, w, β, ε)  = layer_norm(h Wᵀ + b + r)      (post-norm)
"""
from __future__ import annotations

from .. import dispatch
from ..ops import cat, gelu, linear
from ..tensor import Tensor
from .attention import self_attention
from .layers import layer_norm

__all__ = ["linear_cat", "linear_self_attention", "linear_gelu", "linear_add_layer_norm"]


@dispatch.op("linear_cat")
def linear_cat(x: Tensor, weights, biases) -> Tensor:
    """Several Linears of one input, their outputs side by side: (..., Σ out_i)."""
    if len(weights) != len(biases) or not weights:
        raise ValueError(f"linear_cat: needs one bias (or None) per weight, got "
                         f"{len(weights)} weights and {len(biases)} biases")
    return cat([linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)


@dispatch.op("linear_self_attention")
def linear_self_attention(x: Tensor, weights, biases, n_head: int, attn_mask=None,
                          dropout_p: float = 0.0, is_causal: bool = False) -> Tensor:
    """Self-attention of x through its query, key and value Linears: (B, T, C)."""
    return self_attention(linear_cat(x, weights, biases), n_head, attn_mask, dropout_p, is_causal)


@dispatch.op("linear_gelu")
def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                approximate: str = "none") -> Tensor:
    """gelu(linear(x, weight, bias), approximate)."""
    return gelu(linear(x, weight, bias), approximate)


@dispatch.op("linear_add_layer_norm")
def linear_add_layer_norm(h: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor,
                          ln_weight: Tensor | None = None, ln_bias: Tensor | None = None,
                          eps: float = 1e-5) -> Tensor:
    """layer_norm(linear(h, weight, bias) + residual) over the last axis: post-norm residual."""
    y = linear(h, weight, bias) + residual
    return layer_norm(y, y.shape[-1], ln_weight, ln_bias, eps)
