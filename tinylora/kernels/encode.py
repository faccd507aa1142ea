"""Inference kernels for an encoder layer: the fused ops of ``functional/fused.py`` under no_grad.

With no graph to record (no_grad, on the CPU), nothing is kept for a backward, and each op
runs its sequence in fewer passes over memory:
- the GEMMs write straight into the op's output (``blas.gemm``): linear_cat's products land
  side by side in one buffer (no concatenation), a bias is pre-filled and accumulated into;
- where a block-by-block pass follows (GELU, layer norm), the bias and the residual are
  added inside it, while the block is in cache, instead of in passes of their own;
- layer norm's row means are matrix-vector products (BLAS) rather than NumPy reductions;
- GELU (erf, float32) is kernels/gelu.py's inference formula, computed in place:
    gelu(x) = relu(x) - ½|x| erfc(|x|/√2),  erfc(z) ≈ t (a1 + .. + a5 t⁴) e^(-z²),
    t = 1/(1 + p z)   (Abramowitz & Stegun 7.1.26, |error| ≤ 1.5e-7)
With grad enabled (training, where the backward needs the intermediates), on a device, or
for inputs the fast route does not cover, each op runs its reference composition, whose
ops dispatch to their own kernels as before.
"""
from __future__ import annotations

import math

from .. import backend, dispatch
from ..backend import np, xp
from ..blas import gemm
from ..functional import fused  # noqa: F401  (declares the ops registered below)
from ..tensor import Tensor, is_grad_enabled
from .blocking import block_rows, blocks


def _fast(x: Tensor, *params) -> bool:
    """True when the no-grad CPU route applies: one float dtype, no graph, host arrays."""
    if is_grad_enabled() or backend.on_device() or x.dtype.kind != "f" or x.ndim < 1:
        return False
    return all(p is None or p.dtype == x.dtype for p in params)


def _rows(x: Tensor):
    return x.data.reshape(-1, x.shape[-1])          # (rows, features)


def _linear_into(X, weight: Tensor, bias: Tensor | None, out) -> None:
    """out = X Wᵀ + b in one GEMM (the bias pre-filled and accumulated into)."""
    if bias is None:
        gemm(X, weight.data.T, out, beta=0.0)
    else:
        out[...] = bias.data
        gemm(X, weight.data.T, out, beta=1.0)


def _fits(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (weight.ndim == 2 and weight.shape[1] == x.shape[-1]
            and (bias is None or bias.shape == (weight.shape[0],)))


def linear_cat(x: Tensor, weights, biases) -> Tensor:
    weights, biases = list(weights), list(biases)
    if (len(weights) != len(biases) or not weights or not _fast(x, *weights, *biases)
            or not all(_fits(x, w, b) for w, b in zip(weights, biases))):
        return dispatch.reference_of("linear_cat")(x, weights, biases)
    X = _rows(x)
    width = sum(w.shape[0] for w in weights)
    Y = xp.empty((X.shape[0], width), dtype=X.dtype)
    lo = 0
    for w, b in zip(weights, biases):                # each product into its columns of Y
        _linear_into(X, w, b, Y[:, lo:lo + w.shape[0]])
        lo += w.shape[0]
    return Tensor._wrap(Y.reshape(x.shape[:-1] + (width,)))


_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _gelu_erf_(x, a, t, acc) -> None:
    """x <- gelu(x) in place (float32), with scratch a, t, acc of x's shape."""
    f32 = np.float32
    p, half = f32(_AS_P / math.sqrt(2.0)), [f32(0.5 * c) for c in _AS_A]  # z = |x|/√2 folded in
    xp.abs(x, out=a)                                 # |x|
    xp.multiply(a, p, out=t)
    t += 1
    xp.reciprocal(t, out=t)                          # t = 1/(1 + p|x|/√2)
    xp.multiply(t, half[4], out=acc)                 # Horner: ½ Σ a_i t^i
    for c in half[3::-1]:
        acc += c
        acc *= t
    xp.multiply(a, a, out=t)
    t *= f32(-0.5)
    xp.exp(t, out=t)                                 # e^(-x²/2)
    acc *= t
    acc *= a                                         # ½|x| erfc(|x|/√2)
    xp.maximum(x, 0, out=x)
    x -= acc                                         # relu(x) - ½|x| erfc(|x|/√2)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                approximate: str = "none") -> Tensor:
    if approximate != "none" or x.dtype != np.float32 or not _fast(x, weight, bias) \
            or not _fits(x, weight, bias):
        return dispatch.reference_of("linear_gelu")(x, weight, bias, approximate)
    X = _rows(x)
    n = weight.shape[0]
    Y = xp.empty((X.shape[0], n), dtype=X.dtype)
    gemm(X, weight.data.T, Y, beta=0.0)
    b = None if bias is None else bias.data
    step = block_rows(X.shape[0], n)
    scratch = [xp.empty((step, n), dtype=X.dtype) for _ in range(3)]
    for r in blocks(X.shape[0], n):                  # bias and GELU while the block is in cache
        y = Y[r]
        if b is not None:
            y += b
        _gelu_erf_(y, *(s[:y.shape[0]] for s in scratch))
    return Tensor._wrap(Y.reshape(x.shape[:-1] + (n,)))


def linear_add_layer_norm(h: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor,
                          ln_weight: Tensor | None = None, ln_bias: Tensor | None = None,
                          eps: float = 1e-5) -> Tensor:
    n = weight.shape[0] if weight.ndim == 2 else -1
    out_shape = h.shape[:-1] + (n,)
    if (not isinstance(residual, Tensor) or not _fast(h, weight, bias, residual, ln_weight, ln_bias)
            or not _fits(h, weight, bias)
            or tuple(residual.shape) != out_shape
            or any(p is not None and p.shape != (n,) for p in (ln_weight, ln_bias))
            or (ln_weight is None and ln_bias is not None)):
        return dispatch.reference_of("linear_add_layer_norm")(h, weight, bias, residual,
                                                              ln_weight, ln_bias, eps)
    Y = xp.empty((_rows(h).shape[0], n), dtype=h.dtype)
    gemm(_rows(h), weight.data.T, Y, beta=0.0)
    R = residual.data.reshape(Y.shape)
    b, w, beta = (None if p is None else p.data for p in (bias, ln_weight, ln_bias))
    dt = Y.dtype.type
    mean_of = xp.full(n, 1.0 / n, dtype=Y.dtype)     # row means as a matrix-vector product
    sq = xp.empty((block_rows(Y.shape[0], n), n), dtype=Y.dtype)
    for r in blocks(Y.shape[0], n):
        y = Y[r]
        y += R[r]                                    # + residual (and bias) in cache
        if b is not None:
            y += b
        y -= (y @ mean_of)[:, None]                  # x - μ
        s = sq[:y.shape[0]]
        xp.multiply(y, y, out=s)
        rstd = s @ mean_of                           # σ²
        rstd += dt(eps)
        xp.sqrt(rstd, out=rstd)
        xp.divide(1, rstd, out=rstd)
        y *= rstd[:, None]                           # x̂
        if w is not None:
            y *= w
            if beta is not None:
                y += beta
    return Tensor._wrap(Y.reshape(out_shape))


dispatch.register("linear_cat", linear_cat)
dispatch.register("linear_gelu", linear_gelu)
dispatch.register("linear_add_layer_norm", linear_add_layer_norm)
