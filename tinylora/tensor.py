"""Tensor and the graph: reverse-mode autodiff over xp arrays.

A Tensor holds an array (``.data``) and, when it was computed from tensors that require
grad, a ``Node``: the op's name, its input tensors and a ``backward(g)`` closure that maps
the output's gradient ``g`` to one gradient per input (None where no gradient is needed).
``Tensor.backward`` walks the nodes in reverse topological order (iteratively, so a
10,000-op chain is fine), sums the gradients of values used more than once, and frees each
node after use unless ``retain_graph=True``.

Ops live in ``ops.py`` / ``functional.py``; they build outputs with ``make_result``. The
operator methods (``x + y``, ``x.sum()``, ...) are attached to Tensor by ``ops``.
"""
from __future__ import annotations

import contextlib

from . import backend
from .backend import xp

__all__ = ["Tensor", "tensor", "no_grad", "enable_grad", "is_grad_enabled", "make_result",
           "record_graph"]

_grad_enabled = True
_record_all = False  # record nodes even where no gradient flows (only for drawing the graph)


def is_grad_enabled() -> bool:
    return _grad_enabled


@contextlib.contextmanager
def no_grad():
    """Inside this block no graph is recorded: outputs never require grad."""
    global _grad_enabled
    prev, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = prev


@contextlib.contextmanager
def enable_grad():
    global _grad_enabled
    prev, _grad_enabled = _grad_enabled, True
    try:
        yield
    finally:
        _grad_enabled = prev


@contextlib.contextmanager
def record_graph():
    """Record every op, also those whose inputs need no gradient (frozen paths), so that
    ``tinylora.viz`` can draw them. Gradients are unaffected."""
    global _record_all
    prev, _record_all = _record_all, True
    try:
        yield
    finally:
        _record_all = prev


class Node:
    """How an output was made: ``backward(g) -> tuple of input grads`` (None = not needed).

    ``saved`` pairs each tensor whose array the backward reads with that tensor's version at
    forward time; an in-place change in between is caught before the stale value is used.
    """

    __slots__ = ("op", "parents", "backward", "saved")

    def __init__(self, op, parents, backward, saved):
        self.op = op
        self.parents = parents
        self.backward = backward
        self.saved = saved


class Tensor:
    """An n-dimensional array with an optional gradient.

    ``data``: the xp array. ``grad``: a Tensor of the same shape and dtype after backward
    (leaves and tensors that called ``retain_grad``). ``requires_grad``: whether backward
    should reach it. ``_version`` counts in-place modifications.
    """

    __slots__ = ("data", "grad", "requires_grad", "_node", "_version", "_hooks",
                 "_retains_grad", "name", "__weakref__")
    __array_priority__ = 1000  # ndarray (op) Tensor defers to Tensor's reflected operator

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        if dtype is None and not backend.is_array(data):
            # Python floats and float lists take the default dtype (float32), like torch
            probe = backend.np.asarray(data)
            if probe.dtype.kind == "f":
                dtype = backend.get_default_dtype()
        arr = xp.asarray(data, dtype=dtype)
        if requires_grad and arr.dtype.kind not in "fc":
            raise TypeError(f"only float tensors can require grad, got dtype {arr.dtype}")
        self.data = arr
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None
        self._version = 0
        self._hooks = None
        self._retains_grad = False
        self.name = None

    @classmethod
    def _wrap(cls, arr, requires_grad=False):
        """Wrap an existing xp array without copying or checking (the ops' fast path)."""
        t = cls.__new__(cls)
        t.data = arr
        t.grad = None
        t.requires_grad = requires_grad
        t._node = None
        t._version = 0
        t._hooks = None
        t._retains_grad = False
        t.name = None
        return t

    # ------------------------------------------------------------------ basic properties
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    @property
    def grad_fn(self):
        """The op name that produced this tensor (None for leaves)."""
        return None if self._node is None else self._node.op

    def size(self, dim=None):
        return self.data.shape if dim is None else self.data.shape[dim]

    def numel(self) -> int:
        return int(self.data.size)

    def __len__(self):
        return self.data.shape[0]

    def __repr__(self):
        grad = f", grad_fn=<{self.grad_fn}>" if self._node is not None else (
            ", requires_grad=True" if self.requires_grad else "")
        body = repr(backend.to_numpy(self.data)).replace("array(", "tensor(", 1)
        return body[:-1] + grad + ")" if body.endswith(")") else body

    def item(self):
        """The single value as a Python number (a host sync on the GPU)."""
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.reshape(()).item()

    def numpy(self):
        """A host NumPy array (copied from the GPU when needed; shares memory on the CPU)."""
        return backend.to_numpy(self.data)

    def tolist(self):
        return backend.to_numpy(self.data).tolist()

    def detach(self) -> "Tensor":
        """The same array, cut from the graph (shares memory, like torch)."""
        return Tensor._wrap(self.data)

    def requires_grad_(self, requires_grad: bool = True) -> "Tensor":
        if self._node is not None and not requires_grad:
            raise RuntimeError("requires_grad_(False) is only allowed on leaf tensors; use .detach()")
        if requires_grad and self.data.dtype.kind not in "fc":
            raise TypeError(f"only float tensors can require grad, got dtype {self.dtype}")
        self.requires_grad = bool(requires_grad)
        return self

    def retain_grad(self) -> None:
        """Keep ``.grad`` on a non-leaf tensor after backward."""
        self._retains_grad = True

    def register_hook(self, fn):
        """Call ``fn(grad) -> Tensor | None`` when this tensor's gradient is computed;
        a returned tensor replaces the gradient. Returns a handle with ``remove()``."""
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that does not require grad")
        if self._hooks is None:
            self._hooks = []
        self._hooks.append(fn)
        hooks = self._hooks

        class _Handle:
            def remove(self_inner):
                if fn in hooks:
                    hooks.remove(fn)
        return _Handle()

    def zero_grad(self) -> None:
        self.grad = None

    # ------------------------------------------------------------------ in place
    def _bump(self) -> None:
        if _grad_enabled and self.requires_grad:
            raise RuntimeError(
                f"in-place change of a tensor that requires grad (shape {self.shape}); "
                "do it under tl.no_grad(), or on a .detach()ed copy")
        self._version += 1

    def copy_(self, src) -> "Tensor":
        """Overwrite the values in place (no graph; bumps the version counter)."""
        src = src.data if isinstance(src, Tensor) else xp.asarray(src)
        if src.shape != self.shape and xp.broadcast_shapes(src.shape, self.shape) != self.shape:
            raise ValueError(f"copy_: cannot copy shape {src.shape} into {self.shape}")
        self._bump()
        self.data[...] = src
        return self

    def fill_(self, value) -> "Tensor":
        self._bump()
        self.data[...] = value
        return self

    def __setitem__(self, idx, value):
        self._bump()
        value = value.data if isinstance(value, Tensor) else value
        self.data[_index_arrays(idx)] = value

    # ------------------------------------------------------------------ backward
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        ``grad`` is d(loss)/d(self); it may be omitted only when self has one element.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(no input had requires_grad=True, or it was made under no_grad)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() on a non-scalar tensor of shape {self.shape} "
                                   "needs grad= (a tensor of the same shape), or reduce it first")
            g = xp.ones_like(self.data)
        else:
            g = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if g.shape != self.shape:
                raise ValueError(f"backward(grad=...): grad has shape {g.shape}, "
                                 f"but the tensor has shape {self.shape}")
        _run_backward(self, g, retain_graph)


def _topo_order(root: Tensor) -> list:
    """Tensors reachable from root (that require grad), parents before children."""
    # Depth-first post-order. A tensor is marked when it is expanded, not when pushed: one
    # reached by two paths (a residual x + f(x)) must come after every tensor it feeds.
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            order.append(t)
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        stack.append((t, True))
        node = t._node
        if node is not None:
            for p in node.parents:
                if p.requires_grad and id(p) not in seen:
                    stack.append((p, False))
    return order


def _owned(pg, g) -> bool:
    # A backward may hand back g itself or a view of it (add, reshape); the engine may then
    # only add in place into a copy. A fresh array (base None) is the engine's to modify.
    return pg is not g and getattr(pg, "base", None) is None


def _run_backward(root: Tensor, g, retain_graph: bool) -> None:
    order = _topo_order(root)
    grads = {id(root): [g, False]}  # id -> [array, owned]
    for t in reversed(order):
        entry = grads.pop(id(t), None)
        if entry is None:
            continue
        g = entry[0]
        if t._hooks:
            for hook in tuple(t._hooks):
                new = hook(Tensor._wrap(g))
                if new is not None:
                    g = new.data if isinstance(new, Tensor) else new
        node = t._node
        if node is None or t._retains_grad:  # a leaf (or asked to keep it): store .grad
            if t.grad is None:
                t.grad = Tensor._wrap(g if entry[1] and g is entry[0] else g.copy())
            else:
                t.grad.data += g
            if node is None:
                continue
        if node.backward is None:
            raise RuntimeError(
                f"backward through the graph a second time (op '{node.op}'): its saved values "
                "were freed; call the first backward with retain_graph=True")
        for st, version in node.saved:
            if st._version != version:
                raise RuntimeError(
                    f"a tensor of shape {st.shape} needed by the backward of '{node.op}' was "
                    f"modified in place (version {version} -> {st._version}); clone it first")
        pgrads = node.backward(g)
        for p, pg in zip(node.parents, pgrads):
            if pg is None or not p.requires_grad:
                continue
            e = grads.get(id(p))
            if e is None:
                grads[id(p)] = [pg, _owned(pg, g)]
            elif e[1]:
                e[0] += pg
            else:
                e[0] = e[0] + pg
                e[1] = True
        if not retain_graph:
            node.backward = None
            node.saved = ()
            node.parents = ()


def make_result(data, parents: tuple, backward, op: str, saved: tuple = ()) -> Tensor:
    """Wrap an op's output array; record the graph only when a gradient can flow to it.

    ``saved``: the input tensors whose arrays the backward reads (version-checked). An op's
    own output cannot change under it: in-place edits of tensors that require grad are
    refused while grad mode is on.
    """
    if _grad_enabled:
        for p in parents:
            if p.requires_grad:
                out = Tensor._wrap(data, True)
                out._node = Node(op, parents, backward, tuple((s, s._version) for s in saved))
                return out
        if _record_all:
            out = Tensor._wrap(data)
            out._node = Node(op, parents, backward, ())
            return out
    return Tensor._wrap(data)


def _index_arrays(idx):
    """Indices may hold Tensors; the array module wants arrays."""
    if isinstance(idx, Tensor):
        return idx.data
    if isinstance(idx, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in idx)
    return idx


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """Make a leaf tensor from a list, scalar, NumPy or device array (copied onto the device).

    Python floats become the default float dtype (float32 unless changed); arrays keep theirs.
    """
    if isinstance(data, Tensor):
        data = data.data
    if backend.is_array(data):
        data = data.copy() if dtype is None else data.astype(dtype)
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)
