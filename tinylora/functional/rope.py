"""Rotary position embedding (RoPE, Su et al. 2021) as Llama and Qwen2 apply it.

Each head vector x (head_dim = 2h) is split in halves (x₁, x₂); pair i = (x₁ᵢ, x₂ᵢ) is
rotated by the angle pos·θᵢ with θᵢ = base^(−2i/head_dim). Written with Hugging Face's
``rotate_half(x) = (−x₂, x₁)`` and cos/sin tables whose two halves repeat:

    y = x ⊙ cos + rotate_half(x) ⊙ sin

A rotation is orthogonal, so its backward is the inverse rotation (by −pos·θᵢ).
"""
from __future__ import annotations

import math

from .. import backend, dispatch
from ..backend import np, xp
from ..tensor import Tensor, make_result

__all__ = ["apply_rotary", "rotate_half", "rope_inv_freq", "rope_tables", "ROPE_TYPES"]

ROPE_TYPES = ("default", "linear", "llama3")


def rotate_half(a):
    """(x₁, x₂) -> (−x₂, x₁) over the last axis: a 90° turn of every pair (an array op)."""
    h = a.shape[-1] // 2
    return xp.concatenate([-a[..., h:], a[..., :h]], axis=-1)


# y = x ⊙ cos + rotate_half(x) ⊙ sin  ->  dx = dy ⊙ cos − rotate_half(dy ⊙ sin)
#   (rotate_half is R with Rᵀ = −R, so dx = cos ⊙ dy + Rᵀ(sin ⊙ dy): the rotation by −θ)
@dispatch.op("apply_rotary")
def apply_rotary(x: Tensor, cos, sin) -> Tensor:
    """x (..., T, head_dim) rotated by the tables cos, sin (T, head_dim) (constants)."""
    if x.shape[-1] % 2:
        raise ValueError(f"apply_rotary: head_dim must be even, got input shape {x.shape}")
    C = cos.data if isinstance(cos, Tensor) else cos
    S = sin.data if isinstance(sin, Tensor) else sin
    if C.shape[-1] != x.shape[-1] or C.shape[-2] != x.shape[-2]:
        raise ValueError(f"apply_rotary: tables of shape {C.shape} do not fit input {x.shape} "
                         "(need (T, head_dim) with the input's last two axes)")
    C, S = C.astype(x.dtype, copy=False), S.astype(x.dtype, copy=False)   # tables follow x
    y = x.data * C + rotate_half(x.data) * S
    return make_result(y, (x,), lambda g: (g * C - rotate_half(g * S),), "apply_rotary")


def rope_inv_freq(head_dim: int, base: float = 10000.0, rope_scaling: dict | None = None):
    """θᵢ = base^(−2i/head_dim) for i < head_dim/2 (float64, host), adjusted by rope_scaling:
    "linear" divides every θᵢ by factor; "llama3" divides only the low frequencies (long
    wavelengths) and blends smoothly in between, as Llama 3.1 was trained."""
    inv = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = (rope_scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv
    factor = float(rope_scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low, high = float(rope_scaling["low_freq_factor"]), float(rope_scaling["high_freq_factor"])
        old = float(rope_scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)     # long waves: slowed down
        smooth = (old / wavelen - low) / (high - low)                  # 0..1 between the bands
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return np.where(medium, blended, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; use one of {ROPE_TYPES}")


def rope_tables(positions, head_dim: int, base: float = 10000.0, rope_scaling=None, dtype=None):
    """cos, sin (T, head_dim) for integer positions (T,): angle pos·θᵢ, halves repeated."""
    pos = np.asarray(backend.to_numpy(positions) if backend.is_array(positions) else positions,
                     dtype=np.float64)
    ang = pos[:, None] * rope_inv_freq(head_dim, base, rope_scaling)[None, :]   # (T, head_dim/2)
    ang = np.concatenate([ang, ang], axis=-1)                                  # (T, head_dim)
    dt = backend.get_default_dtype() if dtype is None else dtype
    return xp.asarray(np.cos(ang), dtype=dt), xp.asarray(np.sin(ang), dtype=dt)
