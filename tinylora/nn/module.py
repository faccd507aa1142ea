"""Module and Parameter: PyTorch's containers, small enough to read.

Parameters and submodules register themselves by assignment (``self.fc = Linear(...)``);
``named_parameters`` / ``named_modules`` walk them with dotted names; ``state_dict`` /
``load_state_dict`` move values in and out, checking every key and shape first so a
failed load changes nothing.
"""
from __future__ import annotations

from collections import OrderedDict, namedtuple

from ..backend import xp
from ..tensor import Tensor, no_grad

__all__ = ["Module", "Parameter", "ShapeError", "StateDictError", "IncompatibleKeys", "zero_grad_"]


def zero_grad_(params, set_to_none: bool = True) -> None:
    """Clear each parameter's gradient (Module.zero_grad, Optimizer.zero_grad): drop it, or
    with set_to_none=False fill the existing array with zeros (no new allocation)."""
    for p in params:
        if set_to_none or p.grad is None:
            p.grad = None
        else:
            p.grad.data[...] = 0

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class StateDictError(RuntimeError):
    """load_state_dict found missing, unexpected or mis-shaped keys (and changed nothing)."""


class ShapeError(ValueError):
    """Wrong input shape into a layer. The message names the layer's path in the model,
    once a parent module has seen the error, and the expected and actual shapes."""

    def __init__(self, module, detail: str):
        self.module = module
        self.detail = detail
        self.path = None
        super().__init__(self._text())

    def _text(self):
        where = f"{self.path} " if self.path else ""
        return f"{where}({self.module.short_repr()}): {self.detail}"

    def locate(self, path: str) -> None:
        self.path = path
        self.args = (self._text(),)


class Parameter(Tensor):
    """A Tensor that a Module registers as a learnable weight (requires_grad by default)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data.data if isinstance(data, Tensor) else data,
                         requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


class Module:
    """Base class of every layer and model."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------------ registration
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                                 "before assigning attributes")
        params, modules, buffers = self._parameters, self._modules, self._buffers
        for d in (params, modules, buffers):
            if name in d and not isinstance(value, (Parameter, Module, Tensor)):
                if value is None:
                    d[name] = None
                    return
                del d[name]
        if isinstance(value, Parameter):
            modules.pop(name, None)
            buffers.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            buffers.pop(name, None)
            modules[name] = value
        elif name in buffers and (value is None or isinstance(value, Tensor)):
            buffers[name] = value
        elif name in params and value is None:
            params[name] = None
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        d = self.__dict__
        for key in ("_parameters", "_modules", "_buffers"):
            store = d.get(key)
            if store is not None and name in store:
                return store[name]
        raise AttributeError(f"'{type(self).__name__}' has no attribute '{name}'")

    def __delattr__(self, name):
        for d in (self._parameters, self._modules, self._buffers):
            if name in d:
                del d[name]
                return
        object.__delattr__(self, name)

    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        """A non-learnable tensor saved with the model (unless persistent=False)."""
        if tensor is not None and not isinstance(tensor, Tensor):
            tensor = Tensor(tensor)
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent.discard(name)
        else:
            self._non_persistent.add(name)

    def register_parameter(self, name: str, param) -> None:
        self._parameters[name] = param

    def add_module(self, name: str, module) -> None:
        self._modules[name] = module

    # ------------------------------------------------------------------ traversal
    def named_modules(self, prefix: str = "", memo=None):
        """(dotted name, module) for this module and every submodule, each once."""
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            if child is not None:
                yield from child.named_modules(f"{prefix}.{name}" if prefix else name, memo)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_children(self):
        for name, child in self._modules.items():
            if child is not None:
                yield name, child

    def children(self):
        for _, c in self.named_children():
            yield c

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """(dotted name, Parameter); a shared (tied) parameter is listed once, first name wins."""
        seen = set()
        mods = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mprefix, m in mods:
            for name, p in m._parameters.items():
                if p is None or (remove_duplicate and id(p) in seen):
                    continue
                seen.add(id(p))
                yield (f"{mprefix}.{name}" if mprefix else name), p

    def parameters(self, recurse: bool = True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = ""):
        for mprefix, m in self.named_modules(prefix):
            for name, b in m._buffers.items():
                if b is not None:
                    yield (f"{mprefix}.{name}" if mprefix else name), b

    def get_submodule(self, target: str) -> "Module":
        if not target:
            return self
        mod = self
        for part in target.split("."):
            child = mod._modules.get(part)
            if child is None:
                raise AttributeError(f"{type(self).__name__} has no submodule '{target}' "
                                     f"('{part}' is missing)")
            mod = child
        return mod

    def set_submodule(self, target: str, module: "Module") -> None:
        """Replace the submodule at a dotted path (used by LoRA injection and quantization)."""
        parent_path, _, name = target.rpartition(".")
        parent = self.get_submodule(parent_path)
        if name not in parent._modules:
            raise AttributeError(f"{type(parent).__name__} has no submodule '{name}' to replace")
        parent._modules[name] = module

    # ------------------------------------------------------------------ modes and grads
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> "Module":
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grad_(self.parameters(), set_to_none)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.data.size for p in self.parameters() if p.requires_grad or not trainable_only)

    def apply(self, fn) -> "Module":
        for m in list(self.modules()):
            fn(m)
        return self

    # ------------------------------------------------------------------ state
    def state_dict(self, prefix: str = "") -> "OrderedDict[str, Tensor]":
        """Every parameter and persistent buffer by dotted name (tied weights under each name)."""
        out = OrderedDict()
        for mprefix, m in self.named_modules(prefix):
            head = f"{mprefix}." if mprefix else ""
            for name, p in m._parameters.items():
                if p is not None:
                    out[head + name] = p
            for name, b in m._buffers.items():
                if b is not None and name not in m._non_persistent:
                    out[head + name] = b
        return out

    def load_state_dict(self, state_dict, strict: bool = True) -> IncompatibleKeys:
        """Copy values in by name. Every key and shape is checked before anything changes.

        strict: missing or unexpected keys are an error (listing them); otherwise they are
        returned. A shape mismatch is always an error naming the key and both shapes.
        """
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        problems = []
        for k, target in own.items():
            if k in state_dict:
                src = state_dict[k]
                shape = tuple(src.shape)
                if shape != tuple(target.shape):
                    problems.append(f"'{k}': expected shape {tuple(target.shape)}, got {shape}")
        if strict and (missing or unexpected):
            if missing:
                problems.append("missing keys: " + ", ".join(missing))
            if unexpected:
                problems.append("unexpected keys: " + ", ".join(unexpected))
        if problems:
            raise StateDictError(f"load_state_dict into {type(self).__name__} failed, nothing was "
                           "changed: " + "; ".join(problems))
        with no_grad():
            for k, target in own.items():
                if k in state_dict:
                    src = state_dict[k]
                    src = src.data if isinstance(src, Tensor) else xp.asarray(src)
                    target.data[...] = src.astype(target.dtype, copy=False)
                    target._version += 1
        return IncompatibleKeys(missing, unexpected)

    def to_dtype(self, dtype) -> "Module":
        """Cast every float parameter and buffer to ``dtype`` in place (e.g. float64 for gradcheck)."""
        for t in list(self.parameters()) + [b for _, b in self.named_buffers()]:
            if t.data.dtype.kind == "f":
                t.data = t.data.astype(dtype)
        return self

    def double(self) -> "Module":
        return self.to_dtype("float64")

    def float(self) -> "Module":
        return self.to_dtype("float32")

    # ------------------------------------------------------------------ calling
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args, **kwargs):
        try:
            return self.forward(*args, **kwargs)
        except ShapeError as e:
            # each ancestor names the failing layer's path from itself; the outermost wins
            for name, m in self.named_modules():
                if m is e.module and name:
                    e.locate(name)
                    break
            raise

    def extra_repr(self) -> str:
        return ""

    def short_repr(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        children = list(self.named_children())
        if not children:
            return lines[0] + ")"
        for name, child in children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"
