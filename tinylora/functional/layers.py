"""layer_norm, embedding and dropout: fused ops with hand-derived backwards."""
from __future__ import annotations

from .. import backend
from ..backend import xp
from ..tensor import Tensor, make_result


# x̂ = (x - μ) / √(σ² + ε),  y = x̂ ⊙ w + b   (over the last len(normalized_shape) axes, N values)
#   ->  dx̂ = dy ⊙ w,   dx = (dx̂ - mean(dx̂) - x̂ ⊙ mean(dx̂ ⊙ x̂)) / √(σ² + ε)
#       dw = Σ_rows dy ⊙ x̂,   db = Σ_rows dy
def layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if tuple(x.shape[x.ndim - k:]) != shape:
        raise ValueError(f"layer_norm: input shape {x.shape} does not end with the normalized "
                         f"shape {shape}")
    axes = tuple(range(x.ndim - k, x.ndim))
    X = x.data
    mu = X.mean(axis=axes, keepdims=True)
    xc = X - mu
    var = (xc * xc).mean(axis=axes, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + X.dtype.type(eps))
    xhat = xc
    xhat *= rstd                                     # xc is reused in place as x̂
    y = xhat * weight.data if weight is not None else xhat.copy()
    if bias is not None:
        y += bias.data
    lead = tuple(range(x.ndim - k))

    def backward(g):
        dxhat = g * weight.data if weight is not None else g
        dx = None
        if x.requires_grad:
            dx = dxhat - dxhat.mean(axis=axes, keepdims=True)
            dx -= xhat * (dxhat * xhat).mean(axis=axes, keepdims=True)
            dx *= rstd
        dw = (g * xhat).sum(axis=lead) if weight is not None and weight.requires_grad else None
        db = g.sum(axis=lead) if bias is not None and bias.requires_grad else None
        return (dx, dw, db) if bias is not None else (dx, dw)
    parents = tuple(t for t in (x, weight, bias) if t is not None)
    if weight is None and bias is not None:
        raise ValueError("layer_norm: a bias without a weight is not supported")
    if weight is None:
        return make_result(y, (x,), lambda g: (backward(g)[0],), "layer_norm")
    return make_result(y, parents, backward, "layer_norm", (weight,))


# y = W[idx]  ->  dW = 0, then dW[idx] += dy   (scatter-add: a repeated id gets the sum)
def embedding(idx, weight: Tensor) -> Tensor:
    """Rows of ``weight`` (num_embeddings, dim) picked by integer ids of any shape."""
    ids = idx.data if isinstance(idx, Tensor) else xp.asarray(idx)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    V = weight.shape[0]
    if ids.size and not backend.is_cuda():  # host-side check; on the GPU it would sync
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise IndexError(f"token id {bad} is out of range for an embedding with {V} rows "
                             f"(ids must lie in [0, {V}))")
    y = weight.data[ids]

    def backward(g):
        dW = xp.zeros_like(weight.data)
        backend.scatter_add(dW, ids.reshape(-1), g.reshape(-1, weight.shape[1]))
        return (dW,)
    return make_result(y, (weight,), backward, "embedding")


# y = x ⊙ m / (1 - p), m ~ Bernoulli(1 - p)  ->  dx = dy ⊙ m / (1 - p)
def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    mask = backend.dropout_mask(x.shape, p, x.dtype)
    return make_result(x.data * mask, (x,), lambda g: (g * mask,), "dropout")
