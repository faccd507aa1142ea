"""Inference kernels for an encoder layer: the fused ops of ``functional/fused.py`` under no_grad.

With no graph to record (no_grad, on the CPU), nothing is kept for a backward, and each op
runs its sequence in fewer passes over memory:
- the GEMMs write straight into the op's output (``blas.gemm``): linear_cat's products land
  side by side in one buffer (no concatenation), a bias is pre-filled and accumulated into;
- where a block-by-block pass follows (GELU, layer norm), the bias and the residual are
  added inside it, while the block is in cache, instead of in passes of their own;
- layer norm's row means and the softmax's row sums are matrix-vector products (BLAS), and
  the softmax's row maxima a loop over the (few) key columns: NumPy's reductions along a
  short last axis cost several times more (a max over 15 keys: 12x);
- GELU (erf, float32) is kernels/gelu.py's inference formula, computed in place (its
  Gaussian factor by exp2, NumPy's float32 exp2 being about twice as fast as its exp):
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
from ..functional.attention import check_self_attention, mask_array, masked_value
from ..tensor import Tensor, is_grad_enabled
from .blocking import CACHE_VALUES, block_rows, blocks


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


def linear_self_attention(x: Tensor, weights, biases, n_head: int, attn_mask=None,
                          dropout_p: float = 0.0, is_causal: bool = False) -> Tensor:
    mask = mask_array(attn_mask)
    if (dropout_p or is_causal or not _fast(x) or len(weights) != 3 or x.ndim != 3
            or (mask is not None and (mask.dtype != bool or mask.ndim != 4))):
        return dispatch.reference_of("linear_self_attention")(x, weights, biases, n_head,
                                                              attn_mask, dropout_p, is_causal)
    qkv = linear_cat(x, weights, biases).data        # (B, T, 3C)
    check_self_attention(qkv, n_head)
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    X5 = qkv.reshape(B, T, 3, n_head, hs)
    Q, K, V = (X5[:, :, i].transpose(0, 2, 1, 3) for i in range(3))   # (B, nh, T, hs) views
    Y = xp.empty((B, T, n_head, hs), dtype=qkv.dtype)
    O = Y.transpose(0, 2, 1, 3)                      # heads written straight in (B, T, C) order
    _attend(Q, K, V, O, mask, qkv.dtype.type(1.0 / math.sqrt(hs)))
    return Tensor._wrap(Y.reshape(B, T, C3 // 3))


# P = softmax(c·Q Kᵀ with masked scores set to one constant),  O = P V   (per batch chunk)
def _attend(Q, K, V, O, mask, c) -> None:
    B, T, S = Q.shape[0], Q.shape[-2], K.shape[-2]
    drop = None if mask is None else ~mask           # (B or 1, 1 or nh, 1 or T, S)
    low = Q.dtype.type(masked_value(Q.dtype))
    ones = xp.ones(S, dtype=Q.dtype)
    Qs = Q * c                                       # (B, nh, T, hs), scaled once
    for r in blocks(B, Q.shape[1] * T * S, 4 * CACHE_VALUES):  # scores stay in cache
        p = xp.matmul(Qs[r], xp.swapaxes(K[r], -1, -2))       # (b, nh, T, S)
        if drop is not None:
            xp.copyto(p, low, where=drop[r] if drop.shape[0] == B else drop)
        if S <= 64:                                  # row max: a loop over few columns ...
            m = p[..., 0].copy()
            for j in range(1, S):
                xp.maximum(m, p[..., j], out=m)
            p -= m[..., None]
        else:                                        # ... or NumPy's reduction over many
            p -= p.max(axis=-1, keepdims=True)
        xp.exp(p, out=p)
        p *= (1 / (p @ ones))[..., None]             # row sums as one matrix-vector product
        xp.matmul(p, V[r], out=O[r])


_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _gelu_erf_(x, a, t, acc) -> None:
    """x <- gelu(x) in place (float32), with scratch a, t, acc of x's shape."""
    f32 = np.float32
    p, half = f32(_AS_P / math.sqrt(2.0)), [f32(0.5 * c) for c in _AS_A]  # z = |x|/√2 folded in
    xp.abs(x, out=a)                                 # |x|
    xp.multiply(a, p, out=t)
    t += 1
    xp.divide(1, t, out=t)                           # t = 1/(1 + p|x|/√2)
    xp.multiply(t, half[4], out=acc)                 # Horner: ½ Σ a_i t^i
    for c in half[3::-1]:
        acc += c
        acc *= t
    xp.multiply(a, a, out=t)
    t *= f32(-0.5 / math.log(2.0))
    xp.exp2(t, out=t)                                # e^(-x²/2) = 2^(-x²/(2 ln 2)): exp2 is faster
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
dispatch.register("linear_self_attention", linear_self_attention)
dispatch.register("linear_gelu", linear_gelu)
dispatch.register("linear_add_layer_norm", linear_add_layer_norm)
