"""tinylora.kernels: the fast versions of reference ops, chosen at run time.

Each module here implements an op that ``ops/`` or ``functional/`` defines plainly, with the
same signature, values and gradients, and registers it with ``dispatch.register``. What
makes a kernel fast (cache-sized blocks, in-place passes, GEMM with accumulation, one pass
per device launch) stays here, out of the definitions a reader studies. ``tests/test_kernels.py``
runs every registered kernel against its reference. ``tl.set_kernels("reference")`` (or
TINYLORA_KERNELS=reference) turns them all off.
"""
from __future__ import annotations

# each kernel module registers itself on import; kernels.adamw registers when tinylora.optim
# (which defines that op, above this package) imports it
from . import attention, cross_entropy, decode, encode, gelu, layer_norm, lora  # noqa: E402,F401
