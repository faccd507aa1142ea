"""NF4 (4-bit NormalFloat) blockwise quantization, byte-compatible with bitsandbytes.

The levels (``levels.py``): NF4's 16 values are quantiles of the normal distribution,
scaled to [-1, 1]; FP4's (``fp4.py``) a tiny float format.

The format
----------
* The tensor is flattened row-major and cut into blocks of ``blocksize`` consecutive
  values (64 by default; any even size such as 64, 128, 256). absmax = max |x| per block
  in float32; the last block may be partial.
* A block is normalised by multiplying with the float32 reciprocal of its absmax (clamped
  at 1e-38, so an all-zero block scales to zeros rather than NaN; its codes are all 7,
  which dequantize to exact zeros).
* A value's code is the nearest level, decided by the 15 float32 midpoints between
  neighbouring levels: code = number of midpoints strictly below the value, so a value
  exactly on a midpoint goes to the lower code.
* Packing: two codes per byte, element 2j in the high nibble and element 2j+1 in the low
  nibble. An odd element count is padded with the code of 0.0 (7 for NF4, 0 for FP4).
  ``packed`` is a flat (ceil(n/2),) uint8 array; bitsandbytes stores the same bytes as a
  (ceil(n/2), 1) tensor, so ``packed.reshape(-1, 1)`` is its layout.
* Dequantization: ``level[code] * absmax`` in float32, cast once to the output dtype.
* Double quantization (``double_quant=True``) quantizes the absmax values themselves to
  8 bits (see ``dynamic_map``); the 4-bit codes are the same either way, only the scales
  used to dequantize change.

Where bitsandbytes' own backends differ slightly, tinylora follows its CPU backend (0.50),
which made the reference fixtures: every full block is multiplied by the float32 reciprocal
of its absmax (as its CUDA kernel does too), while the last, partial block is divided by its
absmax clamped at 1e-38 (the scaled value can move by an ulp, so a value within an ulp of a
midpoint may get the other code than under CUDA; an all-zero partial block stores absmax
1e-38). For an all-zero full block tinylora gives code 7 like that CPU backend; the CUDA
kernel computes 0 * inf = NaN there, which its comparison tree sends to code 0. Both
dequantize to zeros. The double quantization's rules are in ``dynamic_map``.
"""
from __future__ import annotations

import functools

from ..backend import np, xp
from ..kernels.blocking import blocks
from .dynamic_map import DYNAMIC_MAP, double_quantize
from .levels import NF4_LEVELS, QUANT_TYPES, code_table
from .state import QuantState

__all__ = [
    "NF4_LEVELS", "QUANT_TYPES", "code_table",
    "nf4_quantize", "nf4_dequantize", "quantize_4bit", "dequantize_4bit",
    "pack_4bit", "unpack_4bit",
]

# Elements per blocked pass (kernels.blocking's rule). On the CPU: large enough to amortise
# Python overhead, small enough that the float32 scratch stays in cache across the ~20
# passes of the compare-and-count below (measured on 4096x4096: ~1.7x faster than
# whole-array passes). On a device, cache size does not matter; the chunk only bounds the
# scratch memory (16M elements: 64 MiB of float32).
_QUANT_CHUNK = 1 << 17
_DEQUANT_CHUNK = 1 << 16
_DEVICE_CHUNK = 1 << 24
_TINY = np.float32(1e-38)


@functools.lru_cache(maxsize=None)
def _codebook(quant_type: str):
    """(midpoints as float32 scalars, rank -> code map or None when ranks are codes)."""
    levels = code_table(quant_type)
    # A stable sort puts the first of two equal levels (FP4's two zeros) first, as
    # bitsandbytes does, so the same value always gets the same code.
    order = np.argsort(levels, kind="stable")
    ranked = levels[order]
    midpoints = tuple(np.float32(m) for m in (ranked[:-1] + ranked[1:]) / np.float32(2.0))
    rank_to_code = None if np.array_equal(order, np.arange(16)) else order.astype(np.uint8)
    return midpoints, rank_to_code


def _check_blocksize(blocksize) -> int:
    b = int(blocksize)
    if b != blocksize or b < 2 or b % 2:
        raise ValueError(f"blocksize must be an even integer >= 2 (64, 128, 256, ...), got {blocksize!r}")
    return b


# ----------------------------------------------------------------------------- packing

def pack_4bit(codes):
    """codes (n,) integers in 0..15 -> (ceil(n/2),) uint8; element 2j in the high nibble.

    An odd count is padded with code 0 here; the quantizer pads with the code of 0.0 instead.
    """
    c = xp.asarray(codes).reshape(-1).astype(xp.uint8)
    if c.size % 2:
        c = xp.concatenate([c, xp.zeros(1, dtype=xp.uint8)])
    return (c[0::2] << xp.uint8(4)) | c[1::2]   # uint8 shift count keeps the result uint8


def unpack_4bit(packed, n: int | None = None):
    """(m,) uint8 -> (n,) uint8 codes, n <= 2m (default 2m): high nibble first."""
    p = xp.asarray(packed).reshape(-1)
    codes = xp.empty(2 * p.size, dtype=xp.uint8)
    codes[0::2] = p >> 4
    codes[1::2] = p & 0x0F
    return codes if n is None else codes[:n]


# ----------------------------------------------------------------------------- quantize

def _quantize_rows(rows, quant_type: str, absmax_out, packed_out, scratch,
                   divide: bool = False) -> None:
    """Quantize (m, k) float32 rows, one block per row, k even; write absmax and packed bytes.

    scratch: (float32, uint8, bool) buffers of at least m*k elements, reused across calls.
    divide: scale by x / absmax with absmax clamped at 1e-38 (and stored clamped), as
    bitsandbytes does in the last, partial block; otherwise x · (1/absmax).
    """
    midpoints, rank_to_code = _codebook(quant_type)
    m, k = rows.shape
    f_buf, c_buf, b_buf = scratch
    s = f_buf[: m * k].reshape(m, k)
    xp.abs(rows, out=s)
    xp.max(s, axis=1, out=absmax_out)
    if not bool(xp.all(xp.isfinite(absmax_out))):   # NaN propagates through max
        raise ValueError("cannot quantize an array with inf or NaN values")
    if divide:
        xp.maximum(absmax_out, _TINY, out=absmax_out)
        xp.divide(rows, absmax_out[:, None], out=s)
    else:
        inv = xp.float32(1.0) / xp.maximum(absmax_out, _TINY)
        xp.multiply(rows, inv[:, None], out=s)
    flat = s.reshape(-1)
    # rank = #midpoints < value (ties to the lower code). Fifteen compare-and-add passes over
    # a cache-sized chunk beat xp.searchsorted's per-element binary search ~4x on the CPU.
    ranks = c_buf[: m * k]
    hit = b_buf[: m * k]
    xp.greater(flat, midpoints[0], out=ranks.view(xp.bool_))
    for mid in midpoints[1:]:
        xp.greater(flat, mid, out=hit)
        xp.add(ranks, hit, out=ranks)
    codes = ranks if rank_to_code is None else xp.asarray(rank_to_code)[ranks]
    xp.bitwise_or(codes[0::2] << xp.uint8(4), codes[1::2], out=packed_out)


def quantize_4bit(w, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4"):
    """Blockwise 4-bit quantization of a float array of any shape.

    w: float16/32/64 array (NumPy, CuPy or array-like); float64 is rounded to float32 first.
    Returns (packed, state): packed is a (ceil(n/2),) uint8 array on the active device,
    state a ``QuantState`` holding the scales (8-bit codes plus nested absmax and offset
    when ``double_quant``), the original shape and dtype.
    """
    code_table(quant_type)
    blocksize = _check_blocksize(blocksize)
    x = xp.asarray(w)
    if x.dtype.kind != "f":
        raise TypeError(f"can only quantize floating-point arrays, got {x.dtype}")
    n = int(x.size)
    if n == 0:
        raise ValueError("cannot quantize an empty array")
    flat = x.reshape(-1)
    n_full = n // blocksize
    n_blocks = -(-n // blocksize)
    packed = xp.empty((n + 1) // 2, dtype=xp.uint8)
    absmax = xp.empty(n_blocks, dtype=xp.float32)

    chunks = list(blocks(n_full, blocksize, _QUANT_CHUNK, _DEVICE_CHUNK))  # slices of blocks
    width = (chunks[0].stop - chunks[0].start if chunks else 0) * blocksize + blocksize
    scratch = (xp.empty(width, xp.float32), xp.empty(width, xp.uint8), xp.empty(width, xp.bool_))
    half = blocksize // 2
    for c in chunks:
        b0, b1 = c.start, c.stop
        rows = xp.asarray(flat[b0 * blocksize: b1 * blocksize], dtype=xp.float32)
        _quantize_rows(rows.reshape(b1 - b0, blocksize), quant_type,
                       absmax[b0:b1], packed[b0 * half: b1 * half], scratch)
    tail = n - n_full * blocksize
    if tail:
        # Zero padding to an even length: it does not change the absmax, and the padded
        # value quantizes to the code of 0.0, which becomes the odd count's pad nibble.
        row = xp.zeros((1, tail + tail % 2), dtype=xp.float32)
        row[0, :tail] = flat[n_full * blocksize:]
        _quantize_rows(row, quant_type, absmax[n_full:], packed[n_full * half:], scratch,
                       divide=True)

    nested = {}
    if double_quant:
        codes, nested_absmax, offset = double_quantize(absmax)
        nested = dict(nested_absmax=nested_absmax, nested_quant_map=xp.asarray(DYNAMIC_MAP),
                      offset=offset)
        absmax = codes                    # the state keeps only the 8-bit codes
    state = QuantState(absmax=absmax, shape=x.shape, dtype=x.dtype, blocksize=blocksize,
                       quant_type=quant_type, quant_map=xp.asarray(code_table(quant_type)),
                       **nested)
    return packed, state


# ----------------------------------------------------------------------------- dequantize

def dequantize_4bit(packed, state: QuantState, dtype=None, out=None):
    """packed (ceil(n/2),) uint8 (any shape) + state -> array of ``state.shape``.

    Computed as level[code] * absmax in float32 and cast once to ``dtype`` (default: the
    original dtype, ``state.dtype``). ``out``: a flat array of at least n values of that
    dtype to write into (a workspace; Linear4bit's forward uses one), else a new array.
    """
    out_dtype = np.dtype(state.dtype if dtype is None else dtype)
    p = xp.asarray(packed).reshape(-1)
    if p.dtype != xp.uint8:
        raise TypeError(f"packed 4-bit data must be uint8, got {p.dtype}")
    n, bs = state.numel, state.blocksize
    if p.size != (n + 1) // 2:
        raise ValueError(f"packed has {p.size} bytes, a {state.shape} tensor needs {(n + 1) // 2}")
    scales = state.absmax_float()
    pairs = state.code_pairs()            # (256,) uint64: the two float32 levels of each byte
    out = xp.empty(n, dtype=out_dtype) if out is None else out.reshape(-1)[:n]
    n_full, half = n // bs, bs // 2
    direct = out_dtype == np.float32
    tmp = None
    for c in blocks(n_full, bs, _DEQUANT_CHUNK, _DEVICE_CHUNK):   # c: a slice of whole blocks
        lo, hi = c.start * bs, c.stop * bs
        if not direct and tmp is None:
            tmp = xp.empty(hi - lo, dtype=xp.float32)
        dst = out[lo:hi] if direct else tmp[: hi - lo]
        # One gather writes both nibbles' levels (8 bytes per packed byte), then one
        # in-place multiply by the block scales.
        xp.take(pairs, p[c.start * half: c.stop * half], out=dst.view(xp.uint64))
        vals = dst.reshape(c.stop - c.start, bs)
        xp.multiply(vals, scales[c, None], out=vals)
        if not direct:
            out[lo:hi] = dst
    tail = n - n_full * bs
    if tail:
        codes = unpack_4bit(p[n_full * half:], tail)
        out[n_full * bs:] = state.quant_map_array()[codes] * scales[n_full]
    return out.reshape(state.shape)


nf4_quantize = quantize_4bit
nf4_dequantize = dequantize_4bit
