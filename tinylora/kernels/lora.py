"""The fast ``lora_linear``: the thin adapter products accumulate inside the GEMM.

The op's forward and backward are ``functional.lora.lora_linear_with``, written once; the
reference passes ``out + a @ b``, this kernel ``blas.gemm``. NumPy's ``@`` cannot
accumulate, so ``y = y + h Bᵀ`` writes a (rows, out) temporary and reads it back, where
``gemm(h, B.T, y)`` adds into y in one BLAS call (likewise ``dx += dh A``). These products
have rank r: they are memory-bound, and the temporary doubled their traffic.
"""
from __future__ import annotations

from .. import dispatch
from ..blas import gemm
from ..functional.lora import lora_linear_with


def gemm_plus(a, b, out):
    """out += a @ b inside one GEMM call (out is overwritten); promoted when dtypes differ."""
    if a.dtype == b.dtype == out.dtype:
        return gemm(a, b, out)
    return out + a @ b


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, x_dropped=None):
    return lora_linear_with(gemm_plus, x, weight, bias, lora_A, lora_B, scaling, x_dropped)


dispatch.register("lora_linear", lora_linear)
