"""NF4 (4-bit NormalFloat) blockwise quantization, byte-compatible with bitsandbytes.

The levels
----------
Pretrained weights are close to normal with zero mean. Once a block is divided by its
absmax, its values lie in [-1, 1] and follow (roughly) a normal distribution rescaled to
that range. A level table is information-theoretically best for such data when every
level is hit equally often, i.e. when the levels are quantiles of the normal distribution
(QLoRA, Dettmers et al. 2023, section 3). NF4 builds them so:

* A 4-bit code has 16 values, and zero must be exactly representable (zero padding and
  exact-zero weights must survive). With 16 slots and one zero, one side gets more levels:
  NF4 gives 8 to the positive half and 7 to the negative half.
* Positive side: 9 probabilities evenly spaced from ``offset`` down to 0.5, drop the last
  (0.5 is the zero), take the normal quantile Q(p) of the other 8. Negative side: 8 points
  from ``offset`` to 0.5, drop 0.5, and negate the 7 quantiles. Add 0 and divide
  everything by the largest, Q(offset), so the table spans exactly [-1, 1].
* Q(1) is infinite, so the outermost probability cannot be 1. It is pulled in to
  ``offset = 1 - (1/32 + 1/30)/2 = 0.9677083``. Cut [0, 1] into 16 equal-probability bins
  and the outermost bin's probability midpoint is 1 - 1/32; with 15 bins it is 1 - 1/30.
  The halves hold 8 and 7 levels, so neither count fits both; their average is used.

The results are hard-coded as float32 below (exactly bitsandbytes' table): recomputing the
quantiles in float64 lands within ~1e-7, but the file format needs the exact bits.

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

Where bitsandbytes' own backends differ slightly: tinylora multiplies by the reciprocal in
every block, as its CUDA kernel (which wrote nearly every published QLoRA checkpoint) does,
while its pure-PyTorch CPU backend divides in the last partial block (the scaled value can
move by an ulp, so a value within an ulp of a midpoint may get the other code). For an
all-zero block tinylora gives code 7 like that CPU backend; the CUDA kernel computes
0 * inf = NaN there, which its comparison tree sends to code 0. Both dequantize to zeros.
"""
from __future__ import annotations

import functools

from ..backend import is_cuda, np, xp
from .dynamic_map import DYNAMIC_MAP, double_quantize
from .fp4 import FP4_LEVELS
from .state import QuantState

__all__ = [
    "NF4_LEVELS", "QUANT_TYPES", "code_table",
    "nf4_quantize", "nf4_dequantize", "quantize_4bit", "dequantize_4bit",
    "pack_4bit", "unpack_4bit",
]

# code -> level, float32; sorted, so the code of a level is its rank.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
NF4_LEVELS.setflags(write=False)

QUANT_TYPES = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS}

# Elements per pass on the CPU: large enough to amortise Python overhead, small enough that
# the float32 scratch stays in cache across the ~20 passes of the compare-and-count below
# (measured on 4096x4096: ~1.7x faster than whole-array passes). On the GPU, cache size does
# not matter; its chunk only bounds the scratch memory (16M elements: 64 MiB of float32).
_QUANT_CHUNK = 1 << 17
_DEQUANT_CHUNK = 1 << 16
_GPU_CHUNK = 1 << 24
_TINY = np.float32(1e-38)


def code_table(quant_type: str) -> np.ndarray:
    """The 16 float32 levels of ``quant_type`` ("nf4" or "fp4") in code order."""
    try:
        return QUANT_TYPES[quant_type]
    except KeyError:
        raise ValueError(f"quant_type must be one of {sorted(QUANT_TYPES)}, got {quant_type!r}") from None


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

def _quantize_rows(rows, quant_type: str, absmax_out, packed_out, scratch) -> None:
    """Quantize (m, k) float32 rows, one block per row, k even; write absmax and packed bytes.

    scratch: (float32, uint8, bool) buffers of at least m*k elements, reused across calls.
    """
    midpoints, rank_to_code = _codebook(quant_type)
    m, k = rows.shape
    f_buf, c_buf, b_buf = scratch
    s = f_buf[: m * k].reshape(m, k)
    xp.abs(rows, out=s)
    xp.max(s, axis=1, out=absmax_out)
    if not bool(xp.all(xp.isfinite(absmax_out))):   # NaN propagates through max
        raise ValueError("cannot quantize an array with inf or NaN values")
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

    chunk_blocks = max(1, (_GPU_CHUNK if is_cuda() else _QUANT_CHUNK) // blocksize)
    width = min(n_full, chunk_blocks) * blocksize + blocksize
    scratch = (xp.empty(width, xp.float32), xp.empty(width, xp.uint8), xp.empty(width, xp.bool_))
    half = blocksize // 2
    for b0 in range(0, n_full, chunk_blocks):
        b1 = min(n_full, b0 + chunk_blocks)
        rows = xp.asarray(flat[b0 * blocksize: b1 * blocksize], dtype=xp.float32)
        _quantize_rows(rows.reshape(b1 - b0, blocksize), quant_type,
                       absmax[b0:b1], packed[b0 * half: b1 * half], scratch)
    tail = n - n_full * blocksize
    if tail:
        # Zero padding to an even length: it does not change the absmax, and the padded
        # value quantizes to the code of 0.0, which becomes the odd count's pad nibble.
        row = xp.zeros((1, tail + tail % 2), dtype=xp.float32)
        row[0, :tail] = flat[n_full * blocksize:]
        _quantize_rows(row, quant_type, absmax[n_full:], packed[n_full * half:], scratch)

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

def dequantize_4bit(packed, state: QuantState, dtype=None):
    """packed (ceil(n/2),) uint8 (any shape) + state -> array of ``state.shape``.

    Computed as level[code] * absmax in float32 and cast once to ``dtype`` (default: the
    original dtype, ``state.dtype``).
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
    out = xp.empty(n, dtype=out_dtype)
    n_full = n // bs
    half = bs // 2
    chunk_blocks = max(1, (_GPU_CHUNK if is_cuda() else _DEQUANT_CHUNK) // bs)
    direct = out_dtype == np.float32
    tmp = None if direct else xp.empty(min(n_full, chunk_blocks) * bs + bs, dtype=xp.float32)
    for b0 in range(0, n_full, chunk_blocks):
        b1 = min(n_full, b0 + chunk_blocks)
        m = b1 - b0
        dst = out[b0 * bs: b1 * bs] if direct else tmp[: m * bs]
        # One gather writes both nibbles' levels (8 bytes per packed byte), then one
        # in-place multiply by the block scales.
        xp.take(pairs, p[b0 * half: b1 * half], out=dst.view(xp.uint64))
        vals = dst.reshape(m, bs)
        xp.multiply(vals, scales[b0:b1, None], out=vals)
        if not direct:
            out[b0 * bs: b1 * bs] = dst
    tail = n - n_full * bs
    if tail:
        levels = state.quant_map_array()
        codes = unpack_4bit(p[n_full * half:], tail)
        out[n_full * bs:] = levels[codes] * scales[n_full]
    return out.reshape(state.shape)


nf4_quantize = quantize_4bit
nf4_dequantize = dequantize_4bit
