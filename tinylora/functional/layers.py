"""layer_norm, embedding and dropout: fused ops with hand-derived backwards."""
from __future__ import annotations

from .. import backend, dispatch
from ..backend import xp
from ..tensor import Tensor, make_result


def check_layer_norm(x: Tensor, normalized_shape, weight, bias):
    """normalized_shape as a tuple, and N, the values per normalised group (checked)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if tuple(x.shape[x.ndim - k:]) != shape:
        raise ValueError(f"layer_norm: input shape {x.shape} does not end with the normalized "
                         f"shape {shape}")
    if weight is None and bias is not None:
        raise ValueError("layer_norm: a bias without a weight is not supported")
    N = 1
    for n in shape:
        N *= n
    return shape, N


# x̂ = (x - μ) / √(σ² + ε),  y = x̂ ⊙ w + b   (over the last len(normalized_shape) axes, N values)
#   ->  dx̂ = dy ⊙ w,   dx = (dx̂ - mean(dx̂) - x̂ ⊙ mean(dx̂ ⊙ x̂)) / √(σ² + ε)
#       dw = Σ_rows dy ⊙ x̂,   db = Σ_rows dy
@dispatch.op("layer_norm")
def layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """The fast version (kernels/layer_norm.py) runs these passes block by block, in cache."""
    shape, N = check_layer_norm(x, normalized_shape, weight, bias)
    X = x.data.reshape(-1, N)                        # (rows, N): one row per normalised group
    xc = X - X.mean(axis=1, keepdims=True)
    rstd = 1 / xp.sqrt((xc * xc).mean(axis=1, keepdims=True) + X.dtype.type(eps))
    xhat = xc * rstd
    y = xhat
    if weight is not None:
        y = y * weight.data.reshape(N)
    if bias is not None:
        y = y + bias.data.reshape(N)

    def backward(g):
        G = g.reshape(-1, N)
        dxhat = G if weight is None else G * weight.data.reshape(N)
        dx = (dxhat - dxhat.mean(axis=1, keepdims=True)
              - xhat * (dxhat * xhat).mean(axis=1, keepdims=True)) * rstd
        grads = [dx.reshape(x.shape) if x.requires_grad else None]
        if weight is not None:
            grads.append((G * xhat).sum(axis=0).reshape(shape) if weight.requires_grad else None)
        if bias is not None:
            grads.append(G.sum(axis=0).reshape(shape) if bias.requires_grad else None)
        return tuple(grads)
    parents = tuple(t for t in (x, weight, bias) if t is not None)
    saved = () if weight is None else (weight,)
    return make_result(y.reshape(x.shape), parents, backward, "layer_norm", saved)


# y = W[idx]  ->  dW = 0, then dW[idx] += dy   (scatter-add: a repeated id gets the sum)
def embedding(idx, weight: Tensor) -> Tensor:
    """Rows of ``weight`` (num_embeddings, dim) picked by integer ids of any shape."""
    ids = idx.data if isinstance(idx, Tensor) else xp.asarray(idx)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    V = weight.shape[0]
    if ids.size and not backend.on_device():  # host-side check; on the GPU it would sync
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
