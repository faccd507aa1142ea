"""The 16 levels of the 4-bit codes: NF4 (below) and FP4 (``fp4.py``), code -> value.

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
"""
from __future__ import annotations

from ..backend import np
from .fp4 import FP4_LEVELS

__all__ = ["NF4_LEVELS", "QUANT_TYPES", "code_table"]

# code -> level, float32; sorted, so the code of a level is its rank.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
NF4_LEVELS.setflags(write=False)

QUANT_TYPES = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS}


def code_table(quant_type: str) -> np.ndarray:
    """The 16 float32 levels of ``quant_type`` ("nf4" or "fp4") in code order."""
    try:
        return QUANT_TYPES[quant_type]
    except KeyError:
        raise ValueError(f"quant_type must be one of {sorted(QUANT_TYPES)}, got {quant_type!r}") from None
