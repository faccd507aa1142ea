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

The bytes equal those of bitsandbytes 0.50 on the CPU (tests/fixtures/nf4 were made so): its
8-bit codes come from a 65536-entry lookup table (``quantize_blockwise_8bit``) and its offset
is PyTorch's float32 mean (``torch_float32_sum``). Its CUDA kernel searches the levels
themselves and PyTorch on a GPU sums in another order, so a checkpoint quantized on a GPU may
differ from tinylora's in a few scale codes and in the offset's last bit; a loaded
checkpoint keeps its own bytes.
"""
from __future__ import annotations

from ..backend import np, to_numpy, xp

__all__ = [
    "create_dynamic_map", "DYNAMIC_MAP",
    "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
    "double_quantize", "double_dequantize", "torch_float32_sum",
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


# The 8-bit search snaps a scaled value onto a grid of 65536 points over [-1, 1] before
# picking a level: bitsandbytes' CPU kernel looks codes up in a 65536-entry table so.
_GRID = 65535                       # grid steps: point i is -1 + 2i/65535


def quantize_blockwise_8bit(values, code=None, blocksize: int = 256):
    """8-bit blockwise quantization of a 1-D float32 array, bitsandbytes' CPU rule.

    values (n,) float32 -> (codes (n,) uint8, absmax (ceil(n/blocksize),) float32).

    Per block: absmax = max |v|; s = clamp(v · (1/absmax), -1, 1) in float32. Then s is
    snapped to the nearest of 65536 grid points, i = trunc((s + 1)/2 · 65535 + 1/2), and the
    code is the nearest level to that point g = -1 + 2i/65535: the number of float32 level
    midpoints strictly below g (a tie goes to the lower code). This is the lookup table of
    bitsandbytes' CPU kernel (0.50), so the codes equal its codes byte for byte. Its CUDA
    kernel searches the levels themselves: the two rules differ only for values within half
    a grid step (1.5e-5) of a midpoint, where either level is as near to a 1e-5. A block
    whose values are all zero gets code 0 (absmax 0 makes every value 0 again), as there.
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
    one, half = xp.float32(1.0), xp.float32(0.5)
    inv = one / xp.maximum(absmax, xp.float32(1e-38))
    s = xp.clip(blocks * inv[:, None], -one, one)
    i = xp.trunc((s + one) * half * xp.float32(_GRID) + half)           # grid index, float32
    g = -one + (xp.float32(2.0) * i) / xp.float32(_GRID)               # the grid point
    midpoints = half * (code[:-1] + code[1:])
    codes = xp.searchsorted(midpoints, g.reshape(-1), side="left").reshape(n_blocks, blocksize)
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n].astype(xp.uint8), absmax


def dequantize_blockwise_8bit(codes, code, absmax, blocksize: int = 256):
    """codes (n,) uint8 -> code[codes] * absmax[block], float32 (n,)."""
    codes = xp.asarray(codes).reshape(-1)
    code = xp.asarray(code, dtype=xp.float32)
    absmax = xp.asarray(absmax, dtype=xp.float32)
    n = codes.size
    block_of = xp.arange(n) // blocksize
    return code[codes] * absmax[block_of]


def torch_float32_sum(x) -> np.float32:
    """sum(x) of a 1-D float32 array in float32, in the order of PyTorch's CPU kernel.

    bitsandbytes' offset is ``absmax.mean()`` in PyTorch: a float32 sum, then / n. Float
    addition is not associative, so the last bit depends on the order, which is PyTorch's
    (one thread): lanes of 8 values side by side (1 lane below 8 values) in 4 interleaved
    accumulators, i.e. rows of 4 x 8; the rows are summed one at a time within runs of
    ``step``, the runs within groups of ``step``, the groups within supergroups of ``step``,
    and the supergroups in turn (step = 2^max(4, ⌈log2 rows⌉ // 4): PyTorch's 4-level
    cascade, whose merge order this tree reproduces exactly, since zero padding and a + b =
    b + a are exact). Then the leftover vectors, the 4 accumulators, the leftover values
    and the lanes are added one at a time. Above 32768 values PyTorch splits the sum across
    its threads, so bitsandbytes' offset then depends in its last bit on the thread count;
    this is the 1-thread order.
    """
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    lanes = 8 if x.size >= 8 else 1
    n_vec = x.size // lanes
    rows = n_vec // 4
    step = 1 << max(4, (rows - 1).bit_length() // 4)             # (rows-1).bit_length() = ⌈log2 rows⌉
    tree = np.zeros((max(1, -(-rows // step ** 3)) * step ** 3, 4, lanes), np.float32)
    tree[:rows] = x[: rows * 4 * lanes].reshape(rows, 4, lanes)
    for _ in range(3):                                # runs, groups, supergroups
        tree = np.cumsum(tree.reshape(-1, step, 4, lanes), axis=1)[:, -1]   # cumsum: in order
    acc = np.cumsum(tree, axis=0)[-1]                 # (4, lanes)
    leftover = x[rows * 4 * lanes: n_vec * lanes].reshape(-1, lanes)
    acc[0] = np.cumsum(np.concatenate([acc[:1], leftover]), axis=0)[-1]
    lane_sums = ((acc[0] + acc[1]) + acc[2]) + acc[3]
    return np.cumsum(np.concatenate([x[n_vec * lanes:], lane_sums]))[-1]


def double_quantize(absmax, blocksize: int = 256, code=None):
    """Quantize per-block 4-bit scales: (n_blocks,) float32 -> (codes uint8, nested_absmax, offset).

    offset = mean(absmax) as bitsandbytes computes it (a float32 sum in PyTorch's order, then
    / n in float32; see ``torch_float32_sum``), returned as a Python float holding that
    float32 value exactly. The centred scales absmax - offset get 8-bit codes in blocks of 256.
    """
    absmax = xp.asarray(absmax, dtype=xp.float32)
    n = int(absmax.size)
    offset = float(np.float32(torch_float32_sum(to_numpy(absmax)) / np.float32(n)))
    centred = absmax - np.float32(offset)
    codes, nested_absmax = quantize_blockwise_8bit(centred, code, blocksize)
    return codes, nested_absmax, offset


def double_dequantize(codes, code, nested_absmax, offset: float, blocksize: int = 256):
    """The float32 scales back: code[codes] * nested_absmax[block] + offset, (n_blocks,)."""
    scales = dequantize_blockwise_8bit(codes, code, nested_absmax, blocksize)
    scales += np.float32(offset)
    return scales
