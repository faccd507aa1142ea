"""The 8-bit dynamic map and blockwise 8-bit quantization: QLoRA's double quantization.

NF4 stores one float32 absmax per block of 64 weights: 32/64 = 0.5 extra bits per
parameter. Double quantization quantizes those scales themselves: subtract their mean (one
float32 ``offset`` per tensor, which centres them so the signed map's resolution is spent on
the spread rather than on the common level), then quantize the centred values to 8 bits in
blocks of 256 with one float32 absmax per block. The overhead falls to
8/64 + 32/(64*256) ~= 0.127 bits per parameter.

The 8-bit code is bitsandbytes' signed "dynamic" map (Dettmers, "8-Bit Approximations for
Parallelism in Deep Learning", 2015): a sign, then a run of zero bits acting as a decimal
exponent, then the remaining bits as a linear fraction. With 7 exponent levels i = 0..6,
level i covers magnitudes in [0.1, 1] * 10^(i-6) with 2^i evenly spaced values (the
midpoints of linspace(0.1, 1, 2^i + 1)). Small exponents get few fraction bits and large
ones many, so relative precision is coarse near zero and fine near 1. Both signs, plus an
exact 0 and 1.0, give 2*(1+2+...+64) + 2 = 256 sorted levels from -0.99297 to 1.0.
"""
from __future__ import annotations

from ..backend import np, xp

__all__ = [
    "create_dynamic_map", "DYNAMIC_MAP",
    "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
    "double_quantize", "double_dequantize",
]


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """float32 linspace, each point rounded once from the nearer end (as bitsandbytes' torch does).

    Point i is start + step*i in the first half and stop - step*(num-1-i) in the second,
    with step = (stop - start)/(num - 1) in float32. The products are exact in float64,
    so one rounding to float32 per point reproduces the reference map bit for bit (NumPy's
    own linspace differs in the last bit for ~20 of the 256 levels).
    """
    a, b = np.float32(start), np.float32(stop)
    step = np.float64((b - a) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float64)
    lo = step * i + np.float64(a)
    hi = np.float64(b) - step * (num - 1 - i)
    return np.where(i < num // 2, lo, hi).astype(np.float32)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> np.ndarray:
    """The dynamic quantization map as a sorted host float32 array of 256 levels.

    For exponent level i (0 <= i < max_exponent_bits) the fraction gets
    ``2**(i + total_bits - 1 - max_exponent_bits)`` values (twice that when unsigned, which
    has no sign bit to pay for), the midpoints of linspace(0.1, 1, count + 1), scaled by
    10**(i - max_exponent_bits + 1). Bits left over when max_exponent_bits < total_bits - 1
    add a linear region at the top exponent. Then 0 and 1.0; a map of fewer than 8 bits is
    padded with zeros to 256 entries.
    """
    non_sign_bits = total_bits - 1
    if not 0 < max_exponent_bits <= non_sign_bits:
        raise ValueError(f"max_exponent_bits must be in 1..{non_sign_bits}, got {max_exponent_bits}")
    values: list[np.ndarray] = []

    def add(count: int, exponent: int) -> None:
        edges = _linspace_f32(0.1, 1.0, count + 1)
        means = (edges[:-1] + edges[1:]) / np.float32(2.0)
        scaled = means * np.float32(10.0 ** exponent)   # float32 product, one rounding
        values.append(scaled)
        if signed:
            values.append(-scaled)

    for i in range(max_exponent_bits):
        shift = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        add(2 ** shift, i - (max_exponent_bits - 1))
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:
        add(extra, 0)
    values.append(np.array([0.0, 1.0], dtype=np.float32))
    levels = np.concatenate(values)
    if levels.size != 2 ** total_bits:
        raise ValueError(f"map has {levels.size} levels, expected {2 ** total_bits}")
    levels = np.concatenate([levels, np.zeros(256 - levels.size, np.float32)])
    return np.sort(levels).astype(np.float32)


DYNAMIC_MAP = create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
DYNAMIC_MAP.setflags(write=False)


def quantize_blockwise_8bit(values, code=None, blocksize: int = 256):
    """8-bit blockwise quantization of a 1-D float32 array: nearest level of ``code`` per value.

    values (n,) float32 -> (codes (n,) uint8, absmax (ceil(n/blocksize),) float32).

    The same rule as the 4-bit path: each block is multiplied by the float32 reciprocal of
    its absmax (clamped at 1e-38, so an all-zero block scales to zeros and gets the code of
    0.0), and a value gets the number of float32 midpoints strictly below it, i.e. the
    nearest level with a tie going to the lower code. This is the rule of bitsandbytes' CUDA
    kernel and of its pure-PyTorch backend; its optional CPU C++ kernel searches
    approximately and occasionally picks the second-nearest level.
    """
    code = xp.asarray(DYNAMIC_MAP if code is None else code, dtype=xp.float32)
    if code.shape != (256,):
        raise ValueError(f"an 8-bit code has 256 levels, got shape {tuple(code.shape)}")
    v = xp.asarray(values, dtype=xp.float32).reshape(-1)
    n = v.size
    n_blocks = -(-n // blocksize)
    padded = xp.zeros(n_blocks * blocksize, dtype=xp.float32)
    padded[:n] = v                      # zero padding leaves every block's absmax unchanged
    blocks = padded.reshape(n_blocks, blocksize)
    absmax = xp.max(xp.abs(blocks), axis=1)
    inv = xp.float32(1.0) / xp.maximum(absmax, xp.float32(1e-38))
    scaled = (blocks * inv[:, None]).reshape(-1)[:n]
    midpoints = (code[:-1] + code[1:]) / xp.float32(2.0)
    codes = xp.searchsorted(midpoints, scaled, side="left")
    return codes.astype(xp.uint8), absmax


def dequantize_blockwise_8bit(codes, code, absmax, blocksize: int = 256):
    """codes (n,) uint8 -> code[codes] * absmax[block], float32 (n,)."""
    codes = xp.asarray(codes).reshape(-1)
    code = xp.asarray(code, dtype=xp.float32)
    absmax = xp.asarray(absmax, dtype=xp.float32)
    n = codes.size
    block_of = xp.arange(n) // blocksize
    return code[codes] * absmax[block_of]


def double_quantize(absmax, blocksize: int = 256, code=None):
    """Quantize per-block 4-bit scales: (n_blocks,) float32 -> (codes uint8, nested_absmax, offset).

    offset is the mean of all absmax values, accumulated in float64 and rounded once to
    float32 (returned as a Python float holding that float32 value exactly).
    """
    absmax = xp.asarray(absmax, dtype=xp.float32)
    offset = float(np.float32(float(xp.mean(absmax, dtype=xp.float64))))
    centred = absmax - np.float32(offset)
    codes, nested_absmax = quantize_blockwise_8bit(centred, code, blocksize)
    return codes, nested_absmax, offset


def double_dequantize(codes, code, nested_absmax, offset: float, blocksize: int = 256):
    """The float32 scales back: code[codes] * nested_absmax[block] + offset, (n_blocks,)."""
    scales = dequantize_blockwise_8bit(codes, code, nested_absmax, blocksize)
    scales += np.float32(offset)
    return scales
