"""The one rule for how much data a blocked pass covers.

A kernel that makes several passes over an array (GELU's, layer norm's, AdamW's ~10 passes,
attention's softmax) runs them block by block, so each block stays in cache through all of
its passes: on the CPU about twice as fast as whole-array passes through memory. On a device
each pass is a kernel launch and blocking only multiplies launches, so there a kernel takes
everything at once, unless it must bound its temporary memory (``device_budget``).
"""
from __future__ import annotations

import contextlib

from .. import backend, blas

CACHE_VALUES = 1 << 16   # values per block: 256 KiB of float32, which stays in L2
KEEP_VALUES = 1 << 19    # an intermediate up to this size (2 MiB of float32) is kept for the
                         # backward: too little memory to pay for recomputing it


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


# ----------------------------------------------------------------- blocks on several cores
#
# NumPy lets go of the interpreter lock inside each ufunc pass, so Python threads that each
# take their own run of blocks share the cores for real. Blocks are independent (each
# writes only its own slice of the outputs), so the values are the same with any count.

_pool, _pool_workers = None, 0   # grown when more threads are asked for, never shrunk


def threads() -> int:
    """How many threads a blocked pass uses: as many as BLAS has now, so one knob
    (``blas.set_num_threads``, ``--threads``, the busy-machine rule) sets both. 1 on a device,
    and 1 when OpenBLAS's idle threads spin (NumPy loaded before tinylora, without
    OPENBLAS_THREAD_TIMEOUT: see backend), since they would take the cores."""
    if backend.on_device() or not backend.BLAS_SLEEPS_SOON:
        return 1
    return blas.num_threads_now()


def parallel(run, slices, gemms: bool = False) -> None:
    """``run(part)`` for contiguous runs of ``slices``, one run per thread, all finished on return.

    ``run`` makes its own scratch buffers (one set per thread) and loops over its part. With
    ``gemms`` the parts multiply matrices too: OpenBLAS then runs each product on its caller's
    thread meanwhile, so the threads are the cores' only users.
    """
    global _pool, _pool_workers
    slices = list(slices)
    k = min(threads(), len(slices) // 4)     # at least four blocks a thread, else not worth it
    if k <= 1:
        run(slices)
        return
    if _pool_workers < k - 1:
        from concurrent.futures import ThreadPoolExecutor
        if _pool is not None:
            _pool.shutdown(wait=False)       # its idle threads end; nothing of ours is queued
        _pool = ThreadPoolExecutor(max_workers=k - 1, thread_name_prefix="tinylora-blocks")
        _pool_workers = k - 1
    cuts = [len(slices) * i // k for i in range(k + 1)]
    parts = [slices[cuts[i]:cuts[i + 1]] for i in range(k)]
    with blas.one_thread() if gemms else contextlib.nullcontext():
        futures = [_pool.submit(run, p) for p in parts[1:]]
        try:
            run(parts[0])                    # this thread takes the first part
        finally:
            for f in futures:                # all done (and any error raised) before return
                f.result()
