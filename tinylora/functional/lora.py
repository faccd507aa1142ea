"""The LoRA linear layer as one op: a frozen base plus one adapter, one hand-derived backward.

    y = x Wᵀ + b + s·(x' Aᵀ) Bᵀ        x (..., in), W (out, in), A (r, in), B (out, r)

with x' = dropout(x) (or x itself). The frozen W comes either as a Tensor (a dense
nn.Linear weight) or through a ``WeightProvider`` (e.g. 4-bit codes that dequantize on
request), so a float base and a QLoRA base share this one forward and backward. This is the
reference definition; ``kernels/lora.py`` holds the fast version (GEMM with accumulation).
"""
from __future__ import annotations

from typing import Protocol

from .. import dispatch
from ..backend import np
from ..tensor import Tensor, make_result

__all__ = ["lora_linear", "lora_linear_with", "WeightProvider", "frozen_weight"]


class WeightProvider(Protocol):
    """A frozen (out, in) weight kept in another form (``quant.Linear4bit``'s 4-bit codes).

    The op asks for the dense array in the forward, and again in the backward for dx, so
    no float copy of W lives between the two passes (the memory QLoRA exists to save).
    """
    shape: tuple          # (out, in)
    compute_dtype: object  # dtype the product runs in; None: the input's
    saved: tuple          # tensors the dense W is made from (version-checked in backward)

    def dense(self, dtype):
        """W (out, in) in ``dtype``; may be a shared workspace that the next call overwrites."""


def frozen_weight(weight, x_dtype):
    """(W array, compute dtype, output dtype, saved tensors) for a Tensor or a provider.

    A dense W multiplies as ``x @ Wᵀ`` does (their promoted dtype). A provider's product
    runs in its compute dtype (default: x's) and comes back in x's dtype, as its layer does.
    """
    if isinstance(weight, Tensor):
        cd = np.result_type(x_dtype, weight.dtype)
        return weight.data, cd, cd, (weight,)
    cd = np.dtype(x_dtype if weight.compute_dtype is None else weight.compute_dtype)
    return weight.dense(cd), cd, np.dtype(x_dtype), tuple(weight.saved)


def plus_product(a, b, out):
    """out + a @ b (the kernel passes a version that accumulates inside the GEMM)."""
    return out + a @ b


@dispatch.op("lora_linear")
def lora_linear(x: Tensor, weight, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, x_dropped: Tensor | None = None) -> Tensor:
    """base + adapter in one node: the values of ``linear(x, W, b) + s · linear(linear(x', A), B)``
    without the graph keeping the base's and the adapter's (rows, out) outputs.

    x (..., in); weight: a Tensor (out, in), or a ``WeightProvider`` (frozen: no dW);
    lora_A (r, in), lora_B (out, r); x_dropped: the adapter's input when dropout made one.
    The (out, in) product B·A is never formed.
    """
    return lora_linear_with(plus_product, x, weight, bias, lora_A, lora_B, scaling, x_dropped)


# y = x Wᵀ + b + s·(x' Aᵀ) Bᵀ,  with h = s·x' Aᵀ (rows, r)
#   ->  dh = s·dy B,   dx = dy W  (+ dh A when x' is x),   dx' = dh A,
#       dA = dhᵀ x',   dB = dyᵀ h,   dW = dyᵀ x (only when W is a Tensor that trains),   db = Σ_rows dy
def lora_linear_with(plus, x, weight, bias, lora_A, lora_B, scaling, x_dropped=None) -> Tensor:
    """``lora_linear``'s forward and backward; ``plus(a, b, out)`` returns out + a @ b."""
    xd = x if x_dropped is None else x_dropped
    trains_W = isinstance(weight, Tensor) and weight.requires_grad
    W, cd, out_dtype, saved_W = frozen_weight(weight, x.dtype)
    n_out, n_in = W.shape
    A, B = lora_A.data, lora_B.data
    x2 = x.data.reshape(-1, n_in)                    # (rows, in)
    xd2 = x2 if xd is x else xd.data.reshape(-1, n_in)
    y = (x2.astype(cd, copy=False) @ W.T).astype(out_dtype, copy=False)   # (rows, out)
    if bias is not None:
        y += bias.data
    h = xd2 @ A.T                                    # (rows, r): the thin tensor carries s
    h *= h.dtype.type(scaling)
    y = plus(h, B.T, y)                              # y + h Bᵀ
    del W                                            # a provider's W is not kept for backward

    def backward(g):
        g2 = g.reshape(-1, n_out)
        dh = g2 @ B                                  # (rows, r)
        dh *= dh.dtype.type(scaling)
        dx = dxd = dW = db = None
        if x.requires_grad:
            W, *_ = frozen_weight(weight, x.dtype)   # a provider dequantizes again
            dx = (g2.astype(cd, copy=False) @ W).astype(x.dtype, copy=False)
            if xd is x:
                dx = plus(dh, A, dx)                 # dx + dh A
            dx = dx.reshape(x.shape)
        if xd is not x and xd.requires_grad:
            dxd = (dh @ A).astype(xd.dtype, copy=False).reshape(xd.shape)
        if trains_W:
            dW = (g2.T @ x2).astype(weight.dtype, copy=False)
        if bias is not None and bias.requires_grad:
            db = g2.sum(axis=0).astype(bias.dtype, copy=False)
        dA = (dh.T @ xd2).astype(A.dtype, copy=False) if lora_A.requires_grad else None
        dB = (g2.T @ h).astype(B.dtype, copy=False) if lora_B.requires_grad else None
        return _in_parent_order(weight, bias, xd is not x, dx, dW, dA, dB, db, dxd)

    parents = _parents(x, weight, bias, lora_A, lora_B, xd)
    saved = saved_W + (xd, lora_A, lora_B) + ((x,) if trains_W and xd is not x else ())
    return make_result(y.reshape(x.shape[:-1] + (n_out,)), parents, backward, "lora_linear", saved)


def _parents(x, weight, bias, lora_A, lora_B, xd) -> tuple:
    """(x, [W], A, B, [bias], [x']): a provider's W is no graph input."""
    return ((x,) + ((weight,) if isinstance(weight, Tensor) else ()) + (lora_A, lora_B)
            + (() if bias is None else (bias,)) + (() if xd is x else (xd,)))


def _in_parent_order(weight, bias, dropped: bool, dx, dW, dA, dB, db, dxd) -> list:
    """The gradients in ``_parents``' order."""
    return ([dx] + ([dW] if isinstance(weight, Tensor) else []) + [dA, dB]
            + ([] if bias is None else [db]) + ([dxd] if dropped else []))
