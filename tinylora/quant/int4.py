"""A plain symmetric int4 absmax quantizer, kept only as a baseline for error comparisons.

Levels k/7 for k = -7..7 (uniform, 15 values; the 16th code is unused so zero stays exact
and the grid symmetric), per block: q = round(x / absmax * 7). Uniform levels waste
resolution in the tails of normally distributed weights, which is what NF4 fixes.
"""
from __future__ import annotations

from ..backend import xp
from .nf4 import dequantize_4bit, quantize_4bit

__all__ = ["int4_quantize", "int4_dequantize", "quantization_error"]


def _blocks(w, blocksize: int):
    flat = xp.asarray(w, dtype=xp.float32).reshape(-1)
    n = flat.size
    n_blocks = -(-n // blocksize)
    padded = xp.zeros(n_blocks * blocksize, dtype=xp.float32)
    padded[:n] = flat
    return padded.reshape(n_blocks, blocksize), n


def int4_quantize(w, blocksize: int = 64):
    """w (any shape) -> (codes (n_blocks, blocksize) int8 in -7..7, absmax (n_blocks,) float32)."""
    blocks, _ = _blocks(w, blocksize)
    absmax = xp.max(xp.abs(blocks), axis=1)
    scale = xp.float32(7.0) / xp.maximum(absmax, xp.float32(1e-38))
    codes = xp.clip(xp.rint(blocks * scale[:, None]), -7, 7).astype(xp.int8)
    return codes, absmax


def int4_dequantize(codes, absmax, shape, dtype=xp.float32):
    """Inverse of ``int4_quantize``: codes * absmax / 7, reshaped to ``shape``."""
    vals = codes.astype(xp.float32) * (absmax / xp.float32(7.0))[:, None]
    n = 1
    for d in shape:
        n *= int(d)
    return vals.reshape(-1)[:n].reshape(shape).astype(dtype)


def quantization_error(w, quant_type: str = "nf4", blocksize: int = 64,
                       double_quant: bool = False) -> float:
    """Mean absolute round-trip error of ``w`` under "nf4", "fp4" or "int4" blockwise quantization."""
    w = xp.asarray(w)
    if quant_type == "int4":
        codes, absmax = int4_quantize(w, blocksize)
        back = int4_dequantize(codes, absmax, w.shape)
    else:
        packed, state = quantize_4bit(w, blocksize=blocksize, double_quant=double_quant,
                                      quant_type=quant_type)
        back = dequantize_4bit(packed, state, dtype=xp.float32)
    return float(xp.mean(xp.abs(back - xp.asarray(w, dtype=xp.float32)), dtype=xp.float64))
