"""Ops that move values without changing them: reshape, transpose, permute, expand,
indexing, concat/stack/split, and the selections where / masked_fill."""
from __future__ import annotations

from .. import backend
from ..backend import xp
from ..tensor import Tensor, _index_arrays, make_result
from ._util import lift, unbroadcast


def _shape_arg(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(shape)


# y = reshape(x)  ->  dx = reshape(dy, x.shape)
def reshape(x: Tensor, *shape) -> Tensor:
    shape = _shape_arg(shape)
    try:
        y = x.data.reshape(shape)
    except ValueError:
        raise ValueError(f"reshape: cannot view shape {x.shape} ({x.data.size} values) "
                         f"as {shape}") from None
    return make_result(y, (x,), lambda g: (g.reshape(x.shape),), "reshape")


def flatten(x: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    s, e = start_dim % max(x.ndim, 1), end_dim % max(x.ndim, 1)
    return reshape(x, x.shape[:s] + (-1,) + x.shape[e + 1:])


def unsqueeze(x: Tensor, dim: int) -> Tensor:
    d = dim % (x.ndim + 1)
    return reshape(x, x.shape[:d] + (1,) + x.shape[d:])


def squeeze(x: Tensor, dim=None) -> Tensor:
    if dim is None:
        return reshape(x, tuple(n for n in x.shape if n != 1))
    d = dim % max(x.ndim, 1)
    if x.shape[d] != 1:
        return x
    return reshape(x, x.shape[:d] + x.shape[d + 1:])


# y = swap axes d0, d1 of x  ->  dx = swap the same axes of dy
def transpose(x: Tensor, dim0: int, dim1: int) -> Tensor:
    y = xp.swapaxes(x.data, dim0, dim1)
    return make_result(y, (x,), lambda g: (xp.swapaxes(g, dim0, dim1),), "transpose")


# y = x with axes reordered by p  ->  dx = dy with axes reordered by p⁻¹
def permute(x: Tensor, *dims) -> Tensor:
    dims = _shape_arg(dims)
    if sorted(d % x.ndim for d in dims) != list(range(x.ndim)):
        raise ValueError(f"permute: {dims} is not a permutation of the {x.ndim} axes of {x.shape}")
    inv = tuple(int(i) for i in backend.np.argsort([d % x.ndim for d in dims]))
    y = xp.transpose(x.data, dims)
    return make_result(y, (x,), lambda g: (xp.transpose(g, inv),), "permute")


# y = x broadcast to shape  ->  dx = dy summed over the broadcast axes
def expand(x: Tensor, *shape) -> Tensor:
    shape = _shape_arg(shape)
    lead = len(shape) - x.ndim
    full = tuple(x.shape[i - lead] if n == -1 else n for i, n in enumerate(shape))
    try:
        y = xp.broadcast_to(x.data, full)
    except ValueError:
        raise ValueError(f"expand: cannot expand shape {x.shape} to {shape}") from None
    return make_result(y, (x,), lambda g: (unbroadcast(g, x.shape),), "expand")


def _is_basic(idx) -> bool:
    """Basic indexing (ints, slices, None, ...) selects each element at most once."""
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


def _advanced(idx):
    """Boolean masks become integer index arrays, which scatter-add understands."""
    items = idx if isinstance(idx, tuple) else (idx,)
    out = []
    for i in items:
        if isinstance(i, list) or isinstance(i, backend.np.ndarray):
            i = xp.asarray(i)   # host index arrays go to the device (a no-op on the CPU)
        if backend.is_array(i) and i.dtype == bool:
            out.extend(xp.nonzero(i))
        else:
            out.append(i)
    return tuple(out)


# y = x[idx]  ->  dx = 0 everywhere, then dx[idx] += dy (repeated indices add up)
def getitem(x: Tensor, idx) -> Tensor:
    idx = _index_arrays(idx)
    basic = _is_basic(idx)
    if not basic:
        idx = _advanced(idx)
    y = x.data[idx]

    def backward(g):
        dx = xp.zeros_like(x.data)
        if basic:
            dx[idx] = g
        else:
            backend.scatter_add(dx, idx, g)
        return (dx,)
    return make_result(y, (x,), backward, "getitem")


# y = concat(x₁..xₙ, dim)  ->  dxᵢ = the slice of dy that xᵢ filled
def cat(tensors, dim: int = 0) -> Tensor:
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat() needs at least one tensor")
    first = tensors[0]
    d = dim % first.ndim
    for t in tensors[1:]:
        if t.ndim != first.ndim or any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != d):
            raise ValueError(f"cat along dim {dim}: shapes {first.shape} and {t.shape} differ "
                             "outside that dim")
    y = xp.concatenate([t.data for t in tensors], axis=d)
    bounds = backend.np.cumsum([0] + [t.shape[d] for t in tensors]).tolist()

    def backward(g):
        sl = [slice(None)] * g.ndim
        out = []
        for t, lo, hi in zip(tensors, bounds[:-1], bounds[1:]):
            sl[d] = slice(lo, hi)
            out.append(g[tuple(sl)] if t.requires_grad else None)
        return tuple(out)
    return make_result(y, tuple(tensors), backward, "cat")


concat = cat


# y = stack(x₁..xₙ, dim)  ->  dxᵢ = dy taken at position i of dim
def stack(tensors, dim: int = 0) -> Tensor:
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack() needs at least one tensor")
    for t in tensors[1:]:
        if t.shape != tensors[0].shape:
            raise ValueError(f"stack: all shapes must match, got {tensors[0].shape} and {t.shape}")
    d = dim % (tensors[0].ndim + 1)
    y = xp.stack([t.data for t in tensors], axis=d)

    def backward(g):
        return tuple(xp.take(g, i, axis=d) if t.requires_grad else None
                     for i, t in enumerate(tensors))
    return make_result(y, tuple(tensors), backward, "stack")


# y = x[..., lo:hi, ...] along dim  ->  dx = dy placed back at lo:hi, zeros elsewhere
def narrow(x: Tensor, dim: int, start: int, length: int) -> Tensor:
    d = dim % x.ndim
    sl = [slice(None)] * x.ndim
    sl[d] = slice(start, start + length)
    sl = tuple(sl)

    def backward(g):
        dx = xp.zeros_like(x.data)
        dx[sl] = g
        return (dx,)
    return make_result(x.data[sl], (x,), backward, "narrow")


def split(x: Tensor, split_size_or_sections, dim: int = 0):
    """Pieces of x along dim: equal pieces of ``split_size`` (the last may be shorter) or the
    given list of sizes, like ``torch.split``."""
    n = x.shape[dim]
    if isinstance(split_size_or_sections, int):
        sizes = [split_size_or_sections] * (n // split_size_or_sections)
        if n % split_size_or_sections:
            sizes.append(n % split_size_or_sections)
    else:
        sizes = list(split_size_or_sections)
        if sum(sizes) != n:
            raise ValueError(f"split: sizes {sizes} add up to {sum(sizes)}, but dim {dim} has {n}")
    out, start = [], 0
    for s in sizes:
        out.append(narrow(x, dim, start, s))
        start += s
    return tuple(out)


def chunk(x: Tensor, chunks: int, dim: int = 0):
    n = x.shape[dim]
    return split(x, -(-n // chunks), dim)


# y = where(c, a, b)  ->  da = dy where c else 0,  db = dy where not c else 0
def where(condition, a, b) -> Tensor:
    cond = condition.data if isinstance(condition, Tensor) else xp.asarray(condition)
    if isinstance(a, Tensor):
        b = lift(b, a)
    else:
        a = lift(a, b)
    y = xp.where(cond, a.data, b.data)

    def backward(g):
        zero = g.dtype.type(0)
        return (unbroadcast(xp.where(cond, g, zero), a.shape) if a.requires_grad else None,
                unbroadcast(xp.where(cond, zero, g), b.shape) if b.requires_grad else None)
    return make_result(y, (a, b), backward, "where")


# y = value where mask else x  ->  dx = dy where not mask else 0
def masked_fill(x: Tensor, mask, value) -> Tensor:
    m = mask.data if isinstance(mask, Tensor) else xp.asarray(mask)
    y = xp.where(m, x.data.dtype.type(value), x.data)

    def backward(g):
        return (unbroadcast(xp.where(m, g.dtype.type(0), g), x.shape),)
    return make_result(y, (x,), backward, "masked_fill")
