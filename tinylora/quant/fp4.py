"""The FP4 (E2M1) code table, bitsandbytes' second 4-bit data type.

A 4-bit code ``s e1 e0 m`` is a tiny float: bit 3 is the sign, bits 2-1 an exponent field,
bit 0 one mantissa bit. bitsandbytes orders the exponent field unusually, so the codes map
to magnitudes as follows (before normalisation):

    low 3 bits   000  001     010  011  100  101  110  111
    magnitude    0    0.0625  8    12   4    6    2    3

i.e. 000 is zero, 001 the one subnormal (1/16), and the normal values are (1 + m/2) * 2^k
with k = 3, 2, 1 for exponent fields 01, 10, 11. Dividing by the largest magnitude (12)
puts the levels in [-1, 1] like NF4: {0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1} and their
negatives. Code 8 (sign bit, magnitude 0) is -0.0, so FP4 has 15 distinct values.

FP4 spends its levels geometrically (dense near zero, sparse near ±1), which fits normal
weights worse than NF4's equal-probability levels: on N(0, 1) weights with blocks of 64 its
mean absolute error is about 0.0966 against NF4's 0.0728.
"""
from __future__ import annotations

from ..backend import np

__all__ = ["FP4_LEVELS"]

# Code order (index = 4-bit code), float32, normalised by 12. Code 8 is -0.0: bitsandbytes'
# kernels dequantize it to -0.0 (sign times zero), so tinylora's output matches theirs bit
# for bit. (Its serialized quant_map happens to hold +0.0 there; the two compare equal.)
FP4_LEVELS = (np.array(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
     -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=np.float32) / np.float32(12.0))
FP4_LEVELS.setflags(write=False)
