"""Fast AdamW update for ``optim.adamw_update``: its ~10 passes run block by block, in cache,
through one scratch buffer, with the bias corrections folded into two scalars.

Registered when ``tinylora.optim`` (which defines the op, above this package) imports it.
"""
from __future__ import annotations

import math

from .. import dispatch
from ..backend import xp
from .blocking import block_rows, blocks, parallel


# p ← p·(1 − lr·wd);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
# p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)   (the bias corrections folded into scalars)
def adamw_update(P, g, m, v, *, step: int, lr: float, betas, eps: float, weight_decay: float):
    dt = P.dtype.type
    b1, b2 = betas
    bc1, bc2 = 1.0 - b1 ** step, 1.0 - b2 ** step
    decay = dt(1.0 - lr * weight_decay) if weight_decay else None
    c1, c2, rs2 = dt(1.0 - b1), dt(1.0 - b2), dt(1.0 / math.sqrt(bc2))
    eps, step_size = dt(eps), dt(lr / bc1)
    if not P.flags.c_contiguous:  # blocks need flat views; parameters are contiguous
        raise ValueError("AdamW: parameters must be contiguous arrays")
    Pf, gf = P.reshape(-1), xp.ascontiguousarray(g).reshape(-1)
    mf, vf = m.reshape(-1), v.reshape(-1)
    step_rows = block_rows(Pf.size)

    def run(part):
        u_buf = xp.empty(step_rows, dtype=P.dtype)   # scratch, one per thread
        for b in part:
            p, gr, mb, vb = Pf[b], gf[b], mf[b], vf[b]
            u = u_buf[:p.size]
            if decay is not None:
                p *= decay                           # p ← p·(1 − lr·wd)
            mb *= dt(b1)                             # m ← β₁m + (1−β₁)g
            xp.multiply(gr, c1, out=u)
            mb += u
            vb *= dt(b2)                             # v ← β₂v + (1−β₂)g²
            xp.multiply(gr, gr, out=u)
            u *= c2
            vb += u
            xp.sqrt(vb, out=u)                       # √v̂ + ε = √v / √(1−β₂ᵗ) + ε
            u *= rs2
            u += eps
            xp.divide(mb, u, out=u)                  # p ← p − lr/(1−β₁ᵗ) · m / (√v̂ + ε)
            u *= step_size
            p -= u
    parallel(run, blocks(Pf.size))

dispatch.register("adamw", adamw_update)
