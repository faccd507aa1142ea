"""What a recorded graph keeps alive for its backward, array by array, by class.

Between a forward and its backward the graph holds two kinds of arrays:
- activations: the ``.data`` of the graph's non-leaf tensors. A node lists its inputs as
  ``parents``, so an op's output lives until the backward of every op that read it has run,
  whether or not that backward reads it. Class ``"<op> output"`` (the op that made it).
  An activation whose array no backward closure holds (only tensors, for their shape or
  requires_grad: an add's inputs) is kept for nothing: ``"<op> output, unread"``.
- saved extras: arrays an op's backward closure holds that are no tensor's data (a layer
  norm's x̂, attention's probabilities, a dropout mask). Class ``"<op> saved"``.

Arrays are counted once per underlying buffer (views are followed to their ``.base``), so a
closure holding a view of an activation adds nothing. Leaf tensors (parameters, inputs) are
not counted: they live without the graph.

    kept = saved_arrays(loss)            # before loss.backward()
    by_class(kept)                       # {"gelu_tanh saved": 25165824, ...}
"""
from __future__ import annotations

import types
from dataclasses import dataclass

from . import backend
from .tensor import Tensor

__all__ = ["KeptArray", "saved_arrays", "by_class"]


@dataclass
class KeptArray:
    cls: str          # "<op> output", "<op> output, unread" or "<op> saved"
    nbytes: int       # of the whole underlying buffer
    shape: tuple      # of that buffer
    dtype: str


def _buffer(a):
    """The array that owns a view's memory (the last array along the ``.base`` chain)."""
    while backend.is_array(getattr(a, "base", None)):
        a = a.base
    return a


def _graph(root: Tensor) -> list:
    """Every tensor reachable from root through node parents, inputs before outputs."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            order.append(t)
        elif id(t) not in seen:
            seen.add(id(t))
            stack.append((t, True))
            if t._node is not None:
                stack.extend((p, False) for p in t._node.parents if id(p) not in seen)
    return order


def _closure_arrays(fn, out: list, seen_fns: set) -> None:
    """(array, held as a Tensor?) for the arrays in fn's closure cells, nested closures and
    tuples included."""
    if id(fn) in seen_fns:
        return
    seen_fns.add(id(fn))
    stack = [c.cell_contents for c in (fn.__closure__ or ()) if _filled(c)]
    while stack:
        v = stack.pop()
        if isinstance(v, Tensor):
            out.append((v.data, True))
        elif backend.is_array(v):
            out.append((v, False))
        elif isinstance(v, (tuple, list)):
            stack.extend(v)
        elif isinstance(v, types.FunctionType) and v.__closure__ and id(v) not in seen_fns:
            seen_fns.add(id(v))
            stack.extend(c.cell_contents for c in v.__closure__ if _filled(c))


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:      # a cell not yet bound
        return False
    return True


def saved_arrays(root: Tensor) -> list:
    """The arrays root's graph keeps for backward, one ``KeptArray`` per buffer (root's own
    array is not counted). Call it after the forward, before ``backward`` (which frees the
    nodes as it goes)."""
    if not isinstance(root, Tensor):
        raise TypeError(f"saved_arrays: root must be a Tensor (the loss), got {type(root).__name__}")
    tensors = _graph(root)
    owner: dict = {}                  # id(buffer) -> (class, buffer) or None for a leaf's
    for t in tensors:                 # leaves first: a view of a weight is not an activation
        if t._node is None:
            owner.setdefault(id(_buffer(t.data)), None)
    for t in tensors:
        if t._node is not None and t is not root:   # root's array is the caller's
            buf = _buffer(t.data)
            owner.setdefault(id(buf), (f"{t._node.op} output", buf))
    seen_fns, read = set(), set()
    for t in tensors:
        node = t._node
        if node is None or node.backward is None:
            continue
        found: list = []
        _closure_arrays(node.backward, found, seen_fns)
        for a, as_tensor in found:
            buf = _buffer(a)
            owner.setdefault(id(buf), (f"{node.op} saved", buf))
            if not as_tensor:
                read.add(id(buf))
    return [KeptArray(cls + (", unread" if cls.endswith(" output") and key not in read else ""),
                      int(buf.nbytes), tuple(buf.shape), str(buf.dtype))
            for key, entry in owner.items() if entry is not None for cls, buf in (entry,)]


def by_class(kept) -> dict:
    """{class: bytes}, largest first."""
    sums: dict = {}
    for k in kept:
        sums[k.cls] = sums.get(k.cls, 0) + k.nbytes
    return dict(sorted(sums.items(), key=lambda kv: -kv[1]))
