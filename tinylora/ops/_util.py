"""Helpers shared by the ops: lifting constants, broadcasting's reverse, axis handling."""
from __future__ import annotations

from ..backend import xp
from ..tensor import Tensor


def lift(x, like: Tensor) -> Tensor:
    """A constant (number, list, array) as a tensor of ``like``'s dtype that needs no grad."""
    if isinstance(x, Tensor):
        return x
    return Tensor._wrap(xp.asarray(x, dtype=like.data.dtype))


def pair(a, b):
    """Both operands of a binary op as tensors; at least one already is."""
    if isinstance(a, Tensor):
        return a, lift(b, a)
    return lift(a, b), b


def unbroadcast(g, shape):
    """Sum g over the axes broadcasting prepended or stretched, so it has ``shape`` again.

    The reverse of broadcasting: an input used at many positions receives the sum.
    """
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    if lead:
        g = g.sum(axis=tuple(range(lead)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if stretched:
        g = g.sum(axis=stretched, keepdims=True)
    assert g.shape == tuple(shape), (g.shape, shape)
    return g


def norm_dims(dim, ndim: int):
    """dim (None, int or tuple, negatives allowed) as a sorted tuple of axes, or None for all."""
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = []
    for d in dims:
        if not -ndim <= d < max(ndim, 1):
            raise IndexError(f"dim {d} is out of range for a tensor with {ndim} dimensions")
        out.append(d % max(ndim, 1))
    return tuple(sorted(set(out)))


def keep_shape(shape, dims):
    """The shape a reduction over ``dims`` leaves when keepdim=True."""
    if dims is None:
        return (1,) * len(shape)
    return tuple(1 if i in dims else n for i, n in enumerate(shape))
