"""The one rule for how much data a blocked pass covers.

A kernel that makes several passes over an array (GELU's, layer norm's, AdamW's ~10 passes,
attention's softmax) runs them block by block, so each block stays in cache through all of
its passes: on the CPU about twice as fast as whole-array passes through memory. On a device
each pass is a kernel launch and blocking only multiplies launches, so there a kernel takes
everything at once, unless it must bound its temporary memory (``device_budget``).
"""
from __future__ import annotations

from .. import backend

CACHE_VALUES = 1 << 16   # values per block: 256 KiB of float32, which stays in L2


def block_rows(rows: int, per_row: int = 1, budget: int = CACHE_VALUES,
               device_budget: int | None = None) -> int:
    """How many rows of ``per_row`` values one block covers (at least 1)."""
    if backend.on_device():
        if device_budget is None:
            return max(rows, 1)
        budget = device_budget
    return max(1, min(rows, budget // max(per_row, 1)))


def blocks(rows: int, per_row: int = 1, budget: int = CACHE_VALUES,
           device_budget: int | None = None):
    """Slices lo:hi over ``rows`` rows, each block sized by ``block_rows``."""
    step = block_rows(rows, per_row, budget, device_budget)
    for lo in range(0, rows, step):
        yield slice(lo, min(rows, lo + step))
