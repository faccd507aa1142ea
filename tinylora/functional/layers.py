"""layer_norm, embedding and dropout: fused ops with hand-derived backwards."""
from __future__ import annotations

from .. import backend
from ..backend import xp
from ..tensor import Tensor, make_result


_ROW_BLOCK = 1 << 16  # values per block: the passes over one block of rows stay in cache


def _row_blocks(rows: int, n: int):
    step = max(1, backend.cache_block(_ROW_BLOCK) // max(n, 1))
    for lo in range(0, rows, step):
        yield slice(lo, min(rows, lo + step))


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
    if weight is None and bias is not None:
        raise ValueError("layer_norm: a bias without a weight is not supported")
    N = 1
    for n in shape:
        N *= n
    X = x.data.reshape(-1, N)                        # (rows, N): one row per normalised group
    rows, dt = X.shape[0], X.dtype.type
    w = None if weight is None else weight.data.reshape(N)
    b = None if bias is None else bias.data.reshape(N)
    xhat = xp.empty_like(X)
    y = xp.empty_like(X)
    rstd = xp.empty((rows, 1), dtype=X.dtype)
    for r in _row_blocks(rows, N):                   # the passes run block by block, in cache
        xh, yr = xhat[r], y[r]
        xp.subtract(X[r], X[r].mean(axis=1, keepdims=True), out=xh)
        xp.multiply(xh, xh, out=yr)                  # y as scratch for (x - μ)²
        rs = rstd[r]
        xp.sqrt(yr.mean(axis=1, keepdims=True) + dt(eps), out=rs)
        xp.divide(1, rs, out=rs)
        xh *= rs
        if w is None:
            yr[...] = xh
        else:
            xp.multiply(xh, w, out=yr)
            if b is not None:
                yr += b

    def backward(g):
        G = xp.ascontiguousarray(g).reshape(-1, N)
        need_dx = x.requires_grad
        dx = xp.empty_like(X) if need_dx else None
        dw = xp.zeros(N, dtype=X.dtype) if w is not None and weight.requires_grad else None
        db = G.sum(axis=0) if b is not None and bias.requires_grad else None
        for r in _row_blocks(rows, N):
            gr, xh = G[r], xhat[r]
            if dw is not None:
                dw += (gr * xh).sum(axis=0)
            if not need_dx:
                continue
            d = dx[r]
            if w is None:
                d[...] = gr
            else:
                xp.multiply(gr, w, out=d)            # dx̂
            m1 = d.mean(axis=1, keepdims=True)
            m2 = (d * xh).mean(axis=1, keepdims=True)
            d -= m1
            d -= xh * m2
            d *= rstd[r]
        grads = [None if dx is None else dx.reshape(x.shape)]
        if w is not None:
            grads.append(None if dw is None else dw.reshape(shape))
        if b is not None:
            grads.append(None if db is None else db.reshape(shape))
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
