"""What LoRA needs from a base layer, as four small functions.

A base layer is an ``nn.Linear`` / ``nn.Embedding`` (dense weight in ``.weight``), or a
quantized layer (``quant.Linear4bit``) that has ``in_features``, ``out_features``,
``dequantize() -> dense (out, in) array`` and ``requantize_(W)`` to store a new dense weight.
Merging, DoRA and the base fingerprint go through these functions only, so a new kind of
base layer needs nothing else from this package.
"""
from __future__ import annotations

import hashlib
import math

from .. import nn
from ..backend import np, to_numpy, xp
from ..tensor import no_grad

__all__ = ["is_linear_like", "is_embedding_like", "is_quantized", "dense_weight", "lora_weight",
           "write_dense_weight", "weight_dtype", "weight_digest", "weight_stamp"]

# Elements of each weight that the fingerprint hashes (evenly strided over the flat weight).
DIGEST_SAMPLES = 1 << 16


def is_quantized(layer) -> bool:
    return callable(getattr(layer, "dequantize", None)) and callable(getattr(layer, "requantize_", None))


def is_linear_like(layer) -> bool:
    return isinstance(layer, nn.Linear) or (
        is_quantized(layer) and hasattr(layer, "in_features") and hasattr(layer, "out_features"))


def is_embedding_like(layer) -> bool:
    return isinstance(layer, nn.Embedding)


def dense_weight(layer):
    """The base layer's weight as a dense xp array: (out, in) for a linear layer,
    (num_embeddings, dim) for an embedding. A live view for dense layers: do not modify."""
    if isinstance(layer, (nn.Linear, nn.Embedding)):
        return layer.weight.data
    if is_quantized(layer):
        return layer.dequantize()
    raise TypeError(f"{type(layer).__name__} is not a LoRA base layer: expected nn.Linear, "
                    "nn.Embedding, or a layer with dequantize() and requantize_(W)")


def lora_weight(layer):
    """The base's W as ``F.lora_linear`` takes it: a dense layer's weight Tensor, or a weight
    provider that dequantizes on request (the layer's own ``weight_provider()``, which
    ``quant.Linear4bit`` has, else one over its ``dequantize()``)."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    provider = getattr(layer, "weight_provider", None)
    return provider() if callable(provider) else _Dequantized(layer)


class _Dequantized:
    """A weight provider (``functional.lora.WeightProvider``) over any quantized layer."""

    def __init__(self, layer):
        self.layer, self.shape = layer, (layer.out_features, layer.in_features)
        self.compute_dtype = getattr(layer, "compute_dtype", None)
        self.saved = tuple(t for name, t in layer.state_dict().items() if name != "bias")

    def dense(self, dtype):
        return self.layer.dequantize().astype(dtype, copy=False)


def write_dense_weight(layer, W) -> None:
    """Store a new dense weight into the base layer (in place; re-quantizes a 4-bit layer)."""
    if isinstance(layer, (nn.Linear, nn.Embedding)):
        with no_grad():
            layer.weight.copy_(W)
    elif is_quantized(layer):
        layer.requantize_(W)
    else:
        dense_weight(layer)  # raises the TypeError naming the type


def weight_dtype(layer):
    """The float dtype adapter parameters should take for this base layer."""
    w = getattr(layer, "weight", None)
    if w is not None and hasattr(w, "dtype") and w.dtype.kind == "f" and not is_quantized(layer):
        return w.dtype
    dt = getattr(layer, "compute_dtype", None) or getattr(layer, "dtype", None)
    if dt is not None and np.dtype(dt).kind == "f":
        return np.dtype(dt)
    from ..backend import get_default_dtype
    return get_default_dtype()


def weight_stamp(layer) -> tuple:
    """Changes whenever a weight tensor of the layer (anything but the bias, which may
    train) is replaced or modified in place: the cache key of the weight's digest."""
    return tuple((name, id(t.data), t._version) for name, t in layer.state_dict().items()
                 if name != "bias")


def weight_digest(layer) -> str:
    """SHA-256 over the shape and a strided float32 sample of the dense weight.

    The sample (at most DIGEST_SAMPLES elements, evenly spaced) keeps the cost flat for
    large layers while any different base model, which differs almost everywhere, still
    changes it. Casting to float32 makes a float64 copy of a float32 model hash the same.
    """
    W = dense_weight(layer)
    flat = W.reshape(-1)
    step = max(1, math.ceil(flat.size / DIGEST_SAMPLES))
    sample = to_numpy(xp.ascontiguousarray(flat[::step]).astype(np.float32))
    h = hashlib.sha256()
    h.update(repr(tuple(int(n) for n in W.shape)).encode())
    h.update(sample.astype("<f4", copy=False).tobytes())
    return h.hexdigest()
