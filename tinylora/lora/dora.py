"""DoRA (Liu et al., 2024): LoRA on the direction of each output row, with its own magnitude.

With V = W + s·B·A (out, in) and a learned magnitude m (out,):

    W' = m ⊙ V / ‖V‖_row          ‖V‖_row[o] = √(Σ_i V[o, i]²)

so y = W'x + b. Section 4.3 of the paper treats ‖V‖_row as a constant in backward (it is
recomputed every forward, but gets no gradient), which is what PEFT does too. Forming V
needs the (out, in) matrix B·A, so DoRA does that once per forward, outside the graph.

The layer adds to the base output (x Wᵀ + b) the contribution

    (m/‖V‖ - 1) ⊙ (x Wᵀ) + (m/‖V‖) ⊙ s·(x Aᵀ Bᵀ)

which equals W'x + b - (x Wᵀ + b). The magnitude starts at ‖W + s·B·A‖_row, so injecting
DoRA changes no output.
"""
from __future__ import annotations

from .. import ops
from ..backend import xp
from ..tensor import Tensor

__all__ = ["row_norm", "weight_norm", "dora_delta"]


def row_norm(V):
    """‖V‖ over the input axis for each output row: (out, in) array -> (out,) array."""
    return xp.sqrt((V * V).sum(axis=1))


def weight_norm(W, A, B, scaling: float):
    """‖W + s·B·A‖_row as a plain array (no graph): W (out, in), A (r, in), B (out, r)."""
    return row_norm(W + scaling * (B @ A))


def dora_delta(x: Tensor, base_nobias: Tensor, A: Tensor, B: Tensor, m: Tensor,
               scaling: float, norm) -> Tensor:
    """DoRA's addition to the base output, with ``norm`` (out,) held constant.

    x (..., in), base_nobias = x Wᵀ (..., out), A (r, in), B (out, r), m (out,).
    Gradients flow to x, A, B and m; none to ``norm``.
    """
    g = m / Tensor._wrap(norm)                                 # (out,)
    lora = ops.linear(ops.linear(x, A) * scaling, B)           # (..., out), never forms B·A
    return (g - 1.0) * base_nobias + g * lora
