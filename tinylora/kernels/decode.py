"""Fast decoding: ``linear`` for a few rows, ``cached_self_attention`` for one new token.

A generation step feeds one new position per row through the model, so each linear
multiplies a handful of rows by a whole weight, and attention compares one query per head
with the KV cache. What makes the general code slow there (measured, float32, OpenBLAS):
- ``x @ Wᵀ`` with a short, wide x (2 to 64 rows) takes OpenBLAS's slow path: the same
  product written ``(W @ xᵀ)ᵀ`` runs about twice as fast, and the step is mostly these
  GEMMs. With 2 to 8 rows on one BLAS thread, slicing W's rows into OpenBLAS's small-matrix
  sizes is faster still (no packing copy of W). Only without a graph (``tl.no_grad()``) on
  the CPU: training and the backward keep the reference's GEMM.
- attention's general kernel reshapes q, k, v to one batch axis, which copies the strided
  views of the cache every step; one query needs no causal mask and no blocking, so the
  decode kernel reads the cache in place and writes the heads straight into (B, 1, C) order.
- layer norm's and GELU's blocked kernels pay for their blocks and preallocated outputs on
  every call, several times the arithmetic of a few rows: here the same passes run on whole
  (small) arrays, the same values bit for bit.
Longer inputs (a prompt's prefill), or any call that records a graph, take the reference or
the general kernels.
"""
from __future__ import annotations

import math

from .. import backend, dispatch
from ..backend import xp
from ..blas import num_threads_now
from ..functional.attention import check_self_attention, mask_array, masked_value
from ..functional.layers import check_layer_norm
from ..ops.arith import _SQRT_2_OVER_PI
from ..tensor import Tensor, is_grad_enabled
from . import gelu as _gelu, layer_norm as _layer_norm   # noqa: F401  (registered first)

# the general kernels these wrap: small inputs without a graph stay here, the rest go on
blocked_layer_norm = dispatch.kernel_of("layer_norm")
blocked_gelu = dispatch.kernel_of("gelu")

DECODE_ROWS = 64         # linear: at most this many rows take the transposed product
SPLIT_ROWS = 8           # and at most this many, on one BLAS thread, the sliced one
SMALL_GEMM = 10 ** 6     # OpenBLAS's small-matrix kernels take M·N·K up to this
SMALL_VALUES = 1 << 14   # layer_norm, gelu: inputs up to this size skip the blocked kernels

_linear = dispatch.reference_of("linear")
_cached_self_attention = dispatch.reference_of("cached_self_attention")


def _split_gemm(W, X, out):
    """out (out_features, rows) = W @ Xᵀ for 2 to 8 rows, in slices of W's rows small enough
    for OpenBLAS's small-matrix kernels (M·N·K <= 10⁶ on AVX-512), which skip the packing copy
    of W that its general GEMM makes: W streams through once. They run on one thread."""
    rows, K = X.shape
    step = max(1, min(1024 // rows, SMALL_GEMM // (rows * K)))   # measured best near 1024
    for lo in range(0, W.shape[0], step):
        xp.matmul(W[lo:lo + step], X.T, out=out[lo:lo + step])


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    W = weight.data
    fits = x.ndim and W.shape[1] and x.shape[-1] == W.shape[1]
    rows = x.data.size // W.shape[1] if fits else 0
    if not 0 < rows <= DECODE_ROWS or is_grad_enabled() or backend.on_device():
        return _linear(x, weight, bias)
    X = x.data.reshape(rows, W.shape[1])
    if 2 <= rows <= SPLIT_ROWS and X.dtype == W.dtype and num_threads_now() == 1:
        y = xp.empty((rows, W.shape[0]), dtype=W.dtype)
        _split_gemm(W, X, y.T)                             # slices written straight into y
        if bias is not None:
            y += bias.data
    else:
        yT = W @ X.T                                       # (out, rows): W read once, fast
        y = xp.empty((rows, W.shape[0]), dtype=yT.dtype)
        if bias is None:
            y[...] = yT.T
        else:
            xp.add(yT.T, bias.data, out=y)                 # y = x Wᵀ + b, rows in order again
    return Tensor._wrap(y.reshape(x.shape[:-1] + (W.shape[0],)))


# one query per row and head, after S - 1 cached keys: it sees them all (no causal mask)
#   s = (c·q) Kᵀ + M,  p = softmax(s),  y = p V
def cached_self_attention(qkv: Tensor, k_cache, v_cache, past: int, n_head: int,
                          attn_mask=None) -> Tensor:
    X = qkv.data
    check_self_attention(X, n_head)
    B, T, C3 = X.shape
    if T != 1 or backend.on_device():
        return _cached_self_attention(qkv, k_cache, v_cache, past, n_head, attn_mask)
    C, hs = C3 // 3, C3 // 3 // n_head
    X4 = X.reshape(B, 3, n_head, hs)
    S = past + 1
    k_cache[:, :, past] = X4[:, 1]
    v_cache[:, :, past] = X4[:, 2]
    K, V = k_cache[:, :, :S], v_cache[:, :, :S]             # (B, nh, S, hs): views, no copy
    q = X4[:, 0, :, None, :] * X.dtype.type(1.0 / math.sqrt(hs))   # (B, nh, 1, hs)
    s = q @ xp.swapaxes(K, -1, -2)                          # (B, nh, 1, S)
    mask = mask_array(attn_mask)
    if mask is not None and mask.dtype == bool:             # masked scores: one constant
        s = xp.where(mask, s, s.dtype.type(masked_value(s.dtype)))
    elif mask is not None:
        s += mask.astype(s.dtype, copy=False)
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    y = xp.empty((B, 1, n_head, hs), dtype=s.dtype)
    xp.matmul(s, V, out=y.transpose(0, 2, 1, 3))           # heads side by side: (B, 1, C)
    return Tensor._wrap(y.reshape(B, 1, C))


# x̂ = (x - μ) / √(σ² + ε),  y = x̂ ⊙ w + b: the blocked kernel's passes, on the whole array
def layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    if x.data.size > SMALL_VALUES or is_grad_enabled() or backend.on_device():
        return blocked_layer_norm(x, normalized_shape, weight, bias, eps)
    _, N = check_layer_norm(x, normalized_shape, weight, bias)
    X = x.data.reshape(-1, N)
    # sum / N is mean's value exactly (its float64 division rounds to the same float32)
    xh = X - xp.add.reduce(X, axis=1, keepdims=True) / N
    var = xp.add.reduce(xh * xh, axis=1, keepdims=True) / N
    var += X.dtype.type(eps)
    xp.sqrt(var, out=var)
    xh *= xp.divide(1, var, out=var)                        # · 1 / √(σ² + ε), as the kernel
    if weight is not None:
        xh *= weight.data.reshape(N)
        if bias is not None:
            xh += bias.data.reshape(N)
    return Tensor._wrap(xh.reshape(x.shape))


# y = x (1 + tanh(u)) / 2, u = √(2/π)(x + 0.044715 x³): the blocked kernel's passes, whole
def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    if approximate != "tanh" or x.data.size > SMALL_VALUES or is_grad_enabled() \
            or backend.on_device():
        return blocked_gelu(x, approximate)
    X = x.data
    t = X * X                                               # u = c·x·(1 + k x²), t = tanh(u)
    t *= X.dtype.type(0.044715)
    t += 1
    t *= X
    t *= X.dtype.type(_SQRT_2_OVER_PI)
    xp.tanh(t, out=t)
    t += 1                                                  # y = x (1 + t) / 2
    t *= X
    t *= 0.5
    return Tensor._wrap(t)


dispatch.register("linear", linear)
dispatch.register("gelu", gelu)
dispatch.register("layer_norm", layer_norm)
dispatch.register("cached_self_attention", cached_self_attention)
