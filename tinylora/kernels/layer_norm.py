"""Fast layer_norm for ``functional.layer_norm``: its passes run block by block of rows, in
cache, into arrays allocated once (see ``blocking``). For backward it keeps only each row's
μ and 1/√(σ² + ε) beside the input (alive anyway: the residual stream); the backward
recomputes x̂ block by block with the forward's operations, bit for bit, instead of keeping
an x̂ as large as the input."""
from __future__ import annotations

from .. import dispatch
from ..backend import xp
from ..functional.layers import check_layer_norm
from ..tensor import Tensor, make_result
from .blocking import block_rows, blocks, parallel


# x̂ = (x - μ) / √(σ² + ε),  y = x̂ ⊙ w + b
#   ->  dx = (dx̂ - mean(dx̂) - x̂ ⊙ mean(dx̂ ⊙ x̂)) / √(σ² + ε),  dx̂ = dy ⊙ w
#       dw = Σ_rows dy ⊙ x̂,  db = Σ_rows dy
def layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    shape, N = check_layer_norm(x, normalized_shape, weight, bias)
    X = x.data.reshape(-1, N)                        # (rows, N): one row per normalised group
    rows, dt = X.shape[0], X.dtype.type
    w = None if weight is None else weight.data.reshape(N)
    b = None if bias is None else bias.data.reshape(N)
    y = xp.empty_like(X)
    stats = xp.empty((2, rows, 1), dtype=X.dtype)    # per row: μ and 1/√(σ² + ε)
    mean, rstd = stats

    def normalize(r, xh):                            # x̂ of rows r into xh, from μ and rstd
        xp.subtract(X[r], mean[r], out=xh)
        xh *= rstd[r]
        return xh
    step = block_rows(rows, N)

    def forward(part):                               # the passes run block by block, in cache
        xhat = xp.empty((step, N), dtype=X.dtype)    # scratch, one block (one per thread)
        for r in part:
            xh, yr = xhat[:r.stop - r.start], y[r]
            X[r].mean(axis=1, keepdims=True, out=mean[r])
            xp.subtract(X[r], mean[r], out=xh)
            xp.multiply(xh, xh, out=yr)              # y as scratch for (x - μ)²
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
    parallel(forward, blocks(rows, N))

    def backward(g):                                 # x̂ recomputed from x, μ and rstd: not kept
        G = xp.ascontiguousarray(g).reshape(-1, N)
        need_dx = x.requires_grad
        dx = xp.empty_like(X) if need_dx else None
        need_dw = w is not None and weight.requires_grad
        db = G.sum(axis=0) if b is not None and bias.requires_grad else None
        rs = list(blocks(rows, N))
        dw_parts = xp.empty((len(rs), N), dtype=X.dtype) if need_dw else None

        def run(part):
            xhat = xp.empty((step, N), dtype=X.dtype)
            for r in part:
                gr, xh = G[r], normalize(r, xhat[:r.stop - r.start])
                if need_dw:                          # this block's share of dw
                    (gr * xh).sum(axis=0, out=dw_parts[r.start // step])
                if not need_dx:
                    continue
                d = dx[r]
                if w is None:
                    d[...] = gr
                else:
                    xp.multiply(gr, w, out=d)        # dx̂
                m1 = d.mean(axis=1, keepdims=True)
                m2 = (d * xh).mean(axis=1, keepdims=True)
                d -= m1
                d -= xh * m2
                d *= rstd[r]
        parallel(run, rs)
        dw = None
        if need_dw:                                  # the shares added in block order
            dw = xp.zeros(N, dtype=X.dtype)
            for share in dw_parts:
                dw += share
        grads = [None if dx is None else dx.reshape(x.shape)]
        if w is not None:
            grads.append(None if dw is None else dw.reshape(shape))
        if b is not None:
            grads.append(None if db is None else db.reshape(shape))
        return tuple(grads)
    parents = tuple(t for t in (x, weight, bias) if t is not None)
    saved = (x,) if weight is None else (x, weight)  # the backward reads x again
    return make_result(y.reshape(x.shape), parents, backward, "layer_norm", saved)


dispatch.register("layer_norm", layer_norm)
