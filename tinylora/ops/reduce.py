"""Reductions over ``dim`` with ``keepdim``: sum, mean, max, var (and argmax, no gradient)."""
from __future__ import annotations

from ..backend import xp
from ..tensor import Tensor, make_result
from ._util import keep_shape, norm_dims


def _spread(g, x_shape, dims, keepdim):
    """The output gradient reshaped to keepdim form, ready to broadcast over the input."""
    if not keepdim:
        g = g.reshape(keep_shape(x_shape, dims))
    return g


# y = Σ_dims x  ->  dx = dy broadcast back over the reduced axes
def sum(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:  # noqa: A001
    dims = norm_dims(dim, x.ndim)
    y = x.data.sum(axis=dims, keepdims=keepdim)

    def backward(g):
        return (xp.broadcast_to(_spread(g, x.shape, dims, keepdim), x.shape),)
    return make_result(y, (x,), backward, "sum")


# y = Σ_dims x / n  ->  dx = dy / n broadcast back
def mean(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    dims = norm_dims(dim, x.ndim)
    y = x.data.mean(axis=dims, keepdims=keepdim)
    n = x.data.size // y.size if y.size else 1

    def backward(g):
        return (xp.broadcast_to(_spread(g, x.shape, dims, keepdim) / n, x.shape),)
    return make_result(y, (x,), backward, "mean")


# y = max_dims x  ->  dx = dy at the maximal entries (shared equally between ties)
def max(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:  # noqa: A001
    """The largest value over ``dim`` (like ``torch.amax``: returns the values only)."""
    if x.data.size == 0:
        raise ValueError(f"max() of an empty tensor (shape {x.shape})")
    dims = norm_dims(dim, x.ndim)
    yk = x.data.max(axis=dims, keepdims=True)

    def backward(g):
        share = (x.data == yk).astype(x.data.dtype)
        share /= share.sum(axis=dims, keepdims=True)
        return (_spread(g, x.shape, dims, keepdim) * share,)
    y = yk if keepdim else yk.reshape(tuple(n for i, n in enumerate(x.shape)
                                            if dims is not None and i not in dims))
    return make_result(y, (x,), backward, "max", (x,))


def min(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:  # noqa: A001
    """The smallest value over ``dim``: -max(-x)."""
    return -max(-x, dim, keepdim)


# y = Σ (x - x̄)² / (n - c)  ->  dx = dy * 2 (x - x̄) / (n - c)
def var(x: Tensor, dim=None, keepdim: bool = False, correction: int = 1) -> Tensor:
    """Variance over ``dim`` with Bessel's ``correction`` (1 = unbiased, PyTorch's default)."""
    dims = norm_dims(dim, x.ndim)
    mu = x.data.mean(axis=dims, keepdims=True)
    d = x.data - mu
    n = x.data.size // mu.size
    denom = n - correction
    if denom <= 0:
        raise ValueError(f"var() over {n} value(s) with correction={correction} divides by "
                         f"{denom}; use correction=0 or reduce over more values")
    y = (d * d).sum(axis=dims, keepdims=keepdim) / denom

    def backward(g):
        return (_spread(g, x.shape, dims, keepdim) * d * (2.0 / denom),)
    return make_result(y, (x,), backward, "var")


def argmax(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """Index of the largest value (no gradient)."""
    if dim is None:
        return Tensor._wrap(xp.argmax(x.data))
    out = xp.argmax(x.data, axis=dim)
    return Tensor._wrap(xp.expand_dims(out, dim) if keepdim else out)
