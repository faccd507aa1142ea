"""tinylora.functional: PyTorch-named functions over Tensors.

Fused ops with one hand-derived backward each (softmax, log_softmax, cross_entropy,
layer_norm, attention, embedding, dropout), plus the pointwise ops re-exported from ``ops``.
These are the reference definitions; fast versions of some live in ``tinylora.kernels``.
"""
from __future__ import annotations

from ..ops import gelu, linear, relu, sigmoid, silu, tanh
from ..tensor import Tensor
from .attention import (cached_self_attention, causal_bias, scaled_dot_product_attention,
                        self_attention)
from .fused import linear_add_layer_norm, linear_cat, linear_gelu, linear_self_attention
from .gqa import grouped_query_attention, repeat_kv
from .layers import dropout, embedding, layer_norm
from .lora import lora_linear
from .rms_norm import rms_norm
from .rope import apply_rotary, rope_tables
from .softmax import cross_entropy, log_softmax, softmax

__all__ = [
    "gelu", "linear", "relu", "sigmoid", "tanh", "scaled_dot_product_attention", "self_attention",
    "causal_bias", "dropout", "embedding", "layer_norm", "cross_entropy", "log_softmax",
    "softmax", "mse_loss", "lora_linear", "silu", "rms_norm", "apply_rotary", "rope_tables",
    "repeat_kv", "grouped_query_attention", "cached_self_attention", "linear_cat", "linear_gelu",
    "linear_add_layer_norm", "linear_self_attention",
]


def mse_loss(input: Tensor, target, reduction: str = "mean") -> Tensor:  # noqa: A002
    """Mean (or sum) of squared differences, composed from primitive ops."""
    d = input - target
    sq = d * d
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum()
    if reduction == "none":
        return sq
    raise ValueError(f"mse_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _tensor_methods() -> None:
    Tensor.softmax = lambda x, dim=-1: softmax(x, dim)
    Tensor.log_softmax = lambda x, dim=-1: log_softmax(x, dim)


_tensor_methods()
