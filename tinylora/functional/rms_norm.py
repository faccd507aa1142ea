"""rms_norm: root-mean-square normalisation (Llama, Qwen2), one op with a hand-derived backward."""
from __future__ import annotations

from .. import dispatch
from ..backend import xp
from ..tensor import Tensor, make_result

__all__ = ["rms_norm"]


# r = 1/√(mean(x²) + ε),  x̂ = x·r,  y = x̂ ⊙ w   (over the last axis, N values)
#   ->  dx̂ = dy ⊙ w,   dx = r·(dx̂ − x̂ ⊙ mean(dx̂ ⊙ x̂)),   dw = Σ_rows dy ⊙ x̂
@dispatch.op("rms_norm")
def rms_norm(x: Tensor, normalized_shape, weight: Tensor | None = None,
             eps: float = 1e-6) -> Tensor:
    """PyTorch's F.rms_norm over the last axis: x (..., N), weight (N,) -> (..., N).

    Unlike layer_norm there is no mean subtraction and no bias: only the scale is normalised.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1 or x.ndim == 0 or x.shape[-1] != shape[0]:
        raise ValueError(f"rms_norm: input shape {x.shape} must end with the normalized shape "
                         f"{shape} (one axis: the hidden size)")
    if weight is not None and tuple(weight.shape) != shape:
        raise ValueError(f"rms_norm: weight shape {weight.shape} must equal {shape}")
    X = x.data
    r = 1 / xp.sqrt((X * X).mean(axis=-1, keepdims=True) + X.dtype.type(eps))   # (..., 1)
    xhat = X * r
    y = xhat if weight is None else xhat * weight.data

    def backward(g):
        dxhat = g if weight is None else g * weight.data
        dx = None
        if x.requires_grad:
            dx = r * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        if weight is None:
            return (dx,)
        dw = (g * xhat).reshape(-1, shape[0]).sum(axis=0) if weight.requires_grad else None
        return dx, dw
    parents = (x,) if weight is None else (x, weight)
    saved = () if weight is None else (weight,)
    return make_result(y, parents, backward, "rms_norm", saved)
