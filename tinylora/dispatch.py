"""Which version of an op runs: its reference definition, or a registered fast kernel.

Every op is first written as a short reference (in ``ops/`` and ``functional/``): the math a
reader studies, forward and backward side by side. Some ops also have a fast version in
``kernels/`` (cache blocking, in-place passes, GEMM with accumulation) that computes the same
values and gradients. A reference op is declared with ``@dispatch.op("name")``; a kernel
registers itself with ``dispatch.register("name", fn)``. At each call the op runs the
kernel when kernels are on (the default) and one is registered, else the reference.

    tl.set_kernels("reference")       # or TINYLORA_KERNELS=reference: only the definitions run
    with tl.kernels_mode("reference"): ...
"""
from __future__ import annotations

import contextlib
import functools
import os

__all__ = ["op", "register", "set_kernels", "get_kernels", "kernels_mode", "registered",
           "reference_of", "kernel_of"]

MODES = ("fast", "reference")

_fast: dict = {}        # op name -> fast kernel
_reference: dict = {}   # op name -> reference definition


def _mode_from_env() -> str:
    mode = os.environ.get("TINYLORA_KERNELS", "fast").strip().lower() or "fast"
    if mode not in MODES:
        raise ValueError(f"TINYLORA_KERNELS={mode!r} is not a kernel mode; use one of {MODES}")
    return mode


_mode = _mode_from_env()


def set_kernels(mode: str) -> None:
    """"fast": registered kernels run where they exist; "reference": only the definitions."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"set_kernels: mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def get_kernels() -> str:
    return _mode


@contextlib.contextmanager
def kernels_mode(mode: str):
    """Run a block with kernels "fast" or "reference", restoring the previous mode after."""
    old = _mode
    set_kernels(mode)
    try:
        yield
    finally:
        set_kernels(old)


def op(name: str):
    """Declare a reference definition; calls go to the fast kernel of ``name`` when one is
    registered and kernels are on."""
    def decorate(reference):
        if name in _reference:
            raise ValueError(f"op {name!r} is defined twice")
        _reference[name] = reference

        @functools.wraps(reference)
        def dispatched(*args, **kwargs):
            fast = _fast.get(name) if _mode == "fast" else None
            return (fast or reference)(*args, **kwargs)
        dispatched.reference = reference
        dispatched.op_name = name
        return dispatched
    return decorate


def register(name: str, kernel) -> None:
    """Make ``kernel`` the fast version of reference op ``name`` (same signature)."""
    if name not in _reference:
        raise KeyError(f"no reference op named {name!r}: define it with @dispatch.op first")
    _fast[name] = kernel


def registered() -> dict:
    """{op name: (reference, kernel or None)} for every declared op."""
    return {n: (ref, _fast.get(n)) for n, ref in _reference.items()}


def reference_of(name: str):
    return _reference[name]


def kernel_of(name: str):
    return _fast.get(name)
