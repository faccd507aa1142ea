"""Every primitive op, and the Tensor methods and operators that call them.

``arith``: + - * / ** @, linear, exp/log/sqrt/tanh/sigmoid/relu/gelu/abs/clamp, casts.
``reduce``: sum, mean, max, min, var, argmax over ``dim`` with ``keepdim``.
``shape``: reshape, transpose, permute, expand, indexing, cat/stack/split, where, masked_fill.
Fused ops with a hand-derived backward (softmax, cross_entropy, layer_norm, attention,
embedding, dropout) are in ``tinylora.functional``.
"""
from __future__ import annotations

from ..tensor import Tensor
from .arith import (abs, add, clamp, div, exp, gelu, linear, log, matmul, mul, neg, pow,
                    relu, sigmoid, silu, sqrt, sub, tanh, to_dtype)
from .reduce import argmax, max, mean, min, sum, var
from .shape import (cat, chunk, concat, expand, flatten, getitem, masked_fill, narrow,
                    permute, reshape, split, squeeze, stack, transpose, unsqueeze, where)
from ._util import unbroadcast

__all__ = [
    "abs", "add", "clamp", "div", "exp", "gelu", "linear", "log", "matmul", "mul", "neg",
    "pow", "relu", "sigmoid", "silu", "sqrt", "sub", "tanh", "to_dtype", "argmax", "max", "mean",
    "min", "sum", "var", "cat", "chunk", "concat", "expand", "flatten", "getitem",
    "masked_fill", "narrow", "permute", "reshape", "split", "squeeze", "stack", "transpose",
    "unsqueeze", "where", "unbroadcast",
]


def _compare(fn):
    def method(a, b):
        b = b.data if isinstance(b, Tensor) else b
        return Tensor._wrap(fn(a.data, b))
    return method


def _view(x, *shape):
    return reshape(x, *shape)


def _to(x, dtype):
    return to_dtype(x, dtype)


def _install(T) -> None:
    """Attach the PyTorch-named methods and operators to Tensor."""
    T.__add__ = add
    T.__radd__ = lambda a, b: add(b, a)
    T.__sub__ = sub
    T.__rsub__ = lambda a, b: sub(b, a)
    T.__mul__ = mul
    T.__rmul__ = lambda a, b: mul(b, a)
    T.__truediv__ = div
    T.__rtruediv__ = lambda a, b: div(b, a)
    T.__neg__ = neg
    T.__pow__ = pow
    T.__rpow__ = lambda a, b: pow(b, a)
    T.__matmul__ = matmul
    T.__rmatmul__ = lambda a, b: matmul(b, a)
    T.__getitem__ = getitem
    T.__lt__ = _compare(lambda a, b: a < b)
    T.__le__ = _compare(lambda a, b: a <= b)
    T.__gt__ = _compare(lambda a, b: a > b)
    T.__ge__ = _compare(lambda a, b: a >= b)
    T.__eq__ = _compare(lambda a, b: a == b)
    T.__ne__ = _compare(lambda a, b: a != b)
    T.__hash__ = object.__hash__  # tensors are keyed by identity, like torch's
    for name in ("add", "sub", "mul", "div", "neg", "pow", "matmul", "exp", "log", "sqrt",
                 "tanh", "sigmoid", "silu", "relu", "abs", "clamp", "sum", "mean", "max", "min",
                 "var", "argmax", "reshape", "flatten", "unsqueeze", "squeeze", "transpose",
                 "permute", "expand", "split", "chunk", "masked_fill"):
        setattr(T, name, globals()[name])
    T.gelu = gelu
    T.view = _view
    T.to = _to
    T.float = lambda x: to_dtype(x, "float32")
    T.double = lambda x: to_dtype(x, "float64")
    T.T = property(lambda x: transpose(x, -2, -1) if x.ndim >= 2 else x)


_install(Tensor)
