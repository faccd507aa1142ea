"""The LoRA linear layer as one fused op (the common case: one adapter on a float base)."""
from __future__ import annotations

from ..blas import gemm
from ..tensor import Tensor, make_result


# y = x Wᵀ + b + s·(x' Aᵀ) Bᵀ,  with x' = dropout(x) (or x itself) and h = s·x' Aᵀ (..., r)
#   ->  dh = s·dy B,   dx = dy W  (+ dh A when x' is x),   dx' = dh A,
#       dA = dhᵀ x',   dB = dyᵀ h,   dW = dyᵀ x (only when W trains),   db = Σ_rows dy
def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, x_dropped: Tensor | None = None) -> Tensor:
    """base + adapter in one node: the same values as ``linear(x, W, b) +
    s · linear(linear(x', A), B)``, without the intermediate graph nodes and passes.

    x (..., in), weight (out, in), lora_A (r, in), lora_B (out, r). The (out, in) product
    B·A is never formed.
    """
    xd_t = x if x_dropped is None else x_dropped
    W, A, B = weight.data, lora_A.data, lora_B.data
    n_in, n_out = W.shape[1], W.shape[0]
    x2 = x.data.reshape(-1, n_in)
    xd2 = x2 if xd_t is x else xd_t.data.reshape(-1, n_in)
    s = x2.dtype.type(scaling)
    y = x2 @ W.T
    if bias is not None:
        y += bias.data
    h = xd2 @ A.T                                    # (rows, r): the thin tensor carries s
    h *= s
    gemm(h, B.T, y)                                  # y += h Bᵀ, accumulated inside the GEMM
    shape = x.shape[:-1] + (n_out,)

    def backward(g):
        g2 = g.reshape(-1, n_out)
        dh = g2 @ B                                  # (rows, r)
        dh *= s
        dx = dxd = None
        if x.requires_grad:
            dx = g2 @ W
            if xd_t is x:
                gemm(dh, A, dx)                      # dx += dh A
        if xd_t is not x and xd_t.requires_grad:
            dxd = (dh @ A).reshape(xd_t.shape)
        dW = g2.T @ x2 if weight.requires_grad else None
        db = g2.sum(axis=0) if bias is not None and bias.requires_grad else None
        dA = dh.T @ xd2 if lora_A.requires_grad else None
        dB = g2.T @ h if lora_B.requires_grad else None
        grads = [None if dx is None else dx.reshape(x.shape), dW, dA, dB]
        if bias is not None:
            grads.append(db)
        if xd_t is not x:
            grads.append(dxd)
        return grads
    extra = ([] if bias is None else [bias]) + ([] if xd_t is x else [xd_t])
    parents = (x, weight, lora_A, lora_B, *extra)  # in the order backward returns gradients
    return make_result(y.reshape(shape), parents, backward, "lora_linear",
                       (x, weight, lora_A, lora_B) + (() if xd_t is x else (xd_t,)))
