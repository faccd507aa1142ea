"""Elementwise arithmetic, matrix products and pointwise functions.

Each op: its forward, the arrays it keeps, and its backward, with the chain rule in one
comment line. Binary ops broadcast; their backward sums back to each input's shape.
A backward computes a gradient only for inputs that require one (a frozen weight gets none).
"""
from __future__ import annotations

import math

from .. import backend, dispatch
from ..backend import xp
from ..tensor import Tensor, make_result
from ._util import lift, pair, unbroadcast


# ------------------------------------------------------------------------ binary ops

# z = a + b  ->  da = dz, db = dz
def add(a, b) -> Tensor:
    a, b = pair(a, b)

    def backward(g):
        return (unbroadcast(g, a.shape) if a.requires_grad else None,
                unbroadcast(g, b.shape) if b.requires_grad else None)
    return make_result(a.data + b.data, (a, b), backward, "add")


# z = a - b  ->  da = dz, db = -dz
def sub(a, b) -> Tensor:
    a, b = pair(a, b)

    def backward(g):
        return (unbroadcast(g, a.shape) if a.requires_grad else None,
                unbroadcast(-g, b.shape) if b.requires_grad else None)
    return make_result(a.data - b.data, (a, b), backward, "sub")


# z = a * b  ->  da = dz * b, db = dz * a
def mul(a, b) -> Tensor:
    a, b = pair(a, b)

    def backward(g):
        return (unbroadcast(g * b.data, a.shape) if a.requires_grad else None,
                unbroadcast(g * a.data, b.shape) if b.requires_grad else None)
    return make_result(a.data * b.data, (a, b), backward, "mul", (a, b))


# z = a / b  ->  da = dz / b, db = -dz * a / b²
def div(a, b) -> Tensor:
    a, b = pair(a, b)

    def backward(g):
        gb = g / b.data
        return (unbroadcast(gb, a.shape) if a.requires_grad else None,
                unbroadcast(-gb * a.data / b.data, b.shape) if b.requires_grad else None)
    return make_result(a.data / b.data, (a, b), backward, "div", (a, b))


# z = -a  ->  da = -dz
def neg(a: Tensor) -> Tensor:
    return make_result(-a.data, (a,), lambda g: (-g,), "neg")


# z = a ** p  ->  da = dz * p * a^(p-1),  dp = dz * z * log(a)
def pow(a, p) -> Tensor:  # noqa: A001  (torch.pow)
    if not isinstance(a, Tensor):
        a = lift(a, p)
    if isinstance(p, Tensor):
        z = a.data ** p.data

        def backward_t(g):
            da = unbroadcast(g * p.data * a.data ** (p.data - 1), a.shape) if a.requires_grad else None
            dp = unbroadcast(g * z * xp.log(a.data), p.shape) if p.requires_grad else None
            return da, dp
        return make_result(z, (a, p), backward_t, "pow", (a, p))
    e = a.data.dtype.type(p) if a.data.dtype.kind == "f" else p

    def backward(g):
        return (g * e * a.data ** (e - 1),)
    return make_result(a.data ** e, (a,), backward, "pow", (a,))


# ------------------------------------------------------------------------ products

def _mT(x):
    return xp.swapaxes(x, -1, -2)


def _check_matmul(a: Tensor, b: Tensor):
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul needs tensors with at least one dimension, got shapes "
                         f"{a.shape} and {b.shape}")
    k_b = b.shape[-2] if b.ndim > 1 else b.shape[0]
    if a.shape[-1] != k_b:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not fit: the last axis "
                         f"of the first ({a.shape[-1]}) must equal the "
                         f"{'second-to-last' if b.ndim > 1 else 'only'} axis of the second ({k_b})")


# C = A @ B  ->  dA = dC @ Bᵀ, dB = Aᵀ @ dC   (batch axes broadcast like NumPy's matmul)
def matmul(a, b) -> Tensor:
    a, b = pair(a, b)
    _check_matmul(a, b)
    A, B = a.data, b.data
    if A.ndim > 2 and B.ndim == 2:  # (..., k) @ (k, n): one large GEMM, not one per batch
        out = (A.reshape(-1, A.shape[-1]) @ B).reshape(A.shape[:-1] + (B.shape[1],))
    else:
        out = A @ B

    def backward(g):
        if A.ndim == 1 and B.ndim == 1:  # dot product
            return (g * B if a.requires_grad else None, g * A if b.requires_grad else None)
        A2 = A[None, :] if A.ndim == 1 else A   # a vector acts as a (1, k) or (k, 1) matrix
        B2 = B[:, None] if B.ndim == 1 else B
        G = g[..., None, :] if A.ndim == 1 else g
        G = G[..., None] if B.ndim == 1 else G
        da = db = None
        if a.requires_grad:
            da = unbroadcast(G @ _mT(B2), A2.shape).reshape(A.shape)
        if b.requires_grad:
            if A2.ndim > 2 and B2.ndim == 2:
                db = A2.reshape(-1, A2.shape[-1]).T @ G.reshape(-1, G.shape[-1])
            else:
                db = unbroadcast(_mT(A2) @ G, B2.shape)
            db = db.reshape(B.shape)
        return da, db
    return make_result(out, (a, b), backward, "matmul", (a, b))


# y = x @ Wᵀ + b  ->  dx = dy @ W,  dW = dyᵀ @ x (over all rows),  db = Σ_rows dy
@dispatch.op("linear")
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """PyTorch's F.linear as one op: x (..., in), weight (out, in), bias (out,) -> (..., out).

    A frozen weight gets no dW: the backward then costs one GEMM instead of two.
    """
    if x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: the input's last axis has {x.shape[-1] if x.ndim else 0} "
                         f"features (input shape {x.shape}) but the weight {weight.shape} "
                         f"expects {weight.shape[1]}")
    W = weight.data
    x2 = x.data.reshape(-1, W.shape[1])
    y = x2 @ W.T
    if bias is not None:
        y += bias.data
    out_shape = x.shape[:-1] + (W.shape[0],)

    def backward(g):
        g2 = g.reshape(-1, W.shape[0])
        dx = (g2 @ W).reshape(x.shape) if x.requires_grad else None
        dw = g2.T @ x2 if weight.requires_grad else None
        db = g2.sum(axis=0) if bias is not None and bias.requires_grad else None
        return dx, dw, db
    parents = (x, weight) if bias is None else (x, weight, bias)
    return make_result(y.reshape(out_shape), parents, backward, "linear", (x, weight))


# ------------------------------------------------------------------------ pointwise

# y = exp(x)  ->  dx = dy * y
def exp(x: Tensor) -> Tensor:
    y = xp.exp(x.data)
    return make_result(y, (x,), lambda g: (g * y,), "exp")


# y = log(x)  ->  dx = dy / x
def log(x: Tensor) -> Tensor:
    return make_result(xp.log(x.data), (x,), lambda g: (g / x.data,), "log", (x,))


# y = √x  ->  dx = dy / (2y)
def sqrt(x: Tensor) -> Tensor:
    y = xp.sqrt(x.data)
    return make_result(y, (x,), lambda g: (g / (2 * y),), "sqrt")


# y = tanh(x)  ->  dx = dy * (1 - y²)
def tanh(x: Tensor) -> Tensor:
    y = xp.tanh(x.data)
    return make_result(y, (x,), lambda g: (g * (1 - y * y),), "tanh")


# y = 1 / (1 + e^-x)  ->  dx = dy * y * (1 - y)
def sigmoid(x: Tensor) -> Tensor:
    # via tanh, which cannot overflow: σ(x) = (1 + tanh(x/2)) / 2
    y = (xp.tanh(x.data * 0.5) + 1) * 0.5
    return make_result(y, (x,), lambda g: (g * y * (1 - y),), "sigmoid")


# y = x σ(x)  ->  dx = dy * σ(x) (1 + x (1 - σ(x)))
@dispatch.op("silu")
def silu(x: Tensor) -> Tensor:
    """SiLU (swish), the gate of Llama's SwiGLU MLP."""
    s = (xp.tanh(x.data * 0.5) + 1) * 0.5          # σ(x), overflow-free as in sigmoid
    y = x.data * s
    return make_result(y, (x,), lambda g: (g * s * (1 + x.data * (1 - s)),), "silu", (x,))


# y = max(x, 0)  ->  dx = dy * [x > 0]
def relu(x: Tensor) -> Tensor:
    mask = x.data > 0
    return make_result(x.data * mask, (x,), lambda g: (g * mask,), "relu")


# y = |x|  ->  dx = dy * sign(x)
def abs(x: Tensor) -> Tensor:  # noqa: A001  (torch.abs)
    return make_result(xp.abs(x.data), (x,), lambda g: (g * xp.sign(x.data),), "abs", (x,))


# y = clamp(x, lo, hi)  ->  dx = dy * [lo <= x <= hi]
def clamp(x: Tensor, min=None, max=None) -> Tensor:  # noqa: A002  (torch's argument names)
    y = xp.clip(x.data, min, max)
    return make_result(y, (x,), lambda g: (g * (y == x.data),), "clamp", (x,))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dispatch.op("gelu")
def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU(x) = x·Φ(x). approximate="none": exact erf (BERT); "tanh": GPT-2's form.

    The fast version (kernels/gelu.py) makes the same passes block by block, in cache."""
    if approximate == "tanh":
        return _gelu_tanh(x)
    if approximate != "none":
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _gelu_erf(x)


# y = x Φ(x), Φ(x) = (1 + erf(x/√2)) / 2  ->  dx = dy * (Φ(x) + x φ(x)), φ(x) = e^(-x²/2)/√(2π)
def _gelu_erf(x: Tensor) -> Tensor:
    X, dt = x.data, x.data.dtype.type
    cdf = (backend.erf(X * dt(_INV_SQRT_2)) + 1) * 0.5

    def backward(g):
        pdf = xp.exp(X * X * -0.5) * dt(_INV_SQRT_2PI)
        return (g * (cdf + X * pdf),)
    return make_result(X * cdf, (x,), backward, "gelu", (x,))


# y = x (1 + t) / 2,  t = tanh(u),  u = √(2/π)(x + 0.044715 x³)
#   ->  dx = dy * [(1 + t)/2 + x (1 - t²) √(2/π)(1 + 3·0.044715 x²) / 2]
def _gelu_tanh(x: Tensor) -> Tensor:
    X, dt = x.data, x.data.dtype.type
    c, k = dt(_SQRT_2_OVER_PI), dt(0.044715)
    t = xp.tanh(c * (X + k * X * X * X))

    def backward(g):
        du = c * (1 + 3 * k * X * X)
        return (g * ((1 + t) + X * (1 - t * t) * du) * 0.5,)
    return make_result(X * (1 + t) * 0.5, (x,), backward, "gelu_tanh", (x,))


# y = x.astype(dtype)  ->  dx = dy.astype(x.dtype)
def to_dtype(x: Tensor, dtype) -> Tensor:
    dt = backend.np.dtype(dtype)
    if x.data.dtype == dt:
        return x
    src = x.data.dtype
    if dt.kind != "f":  # integer or bool results carry no gradient
        return Tensor._wrap(x.data.astype(dt))
    return make_result(x.data.astype(dt), (x,), lambda g: (g.astype(src),), "cast")
