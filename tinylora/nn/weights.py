"""A module's weights as one ``model.safetensors`` file (checkpoints and quantized models).

Below checkpoint.py and quant/ alike, so both write and read weights the same way.
"""
from __future__ import annotations

import os

from ..io import load_safetensors, save_safetensors

__all__ = ["MODEL_FILE", "save_model_weights", "load_model_weights"]

MODEL_FILE = "model.safetensors"


def save_model_weights(model, folder) -> None:
    """Write ``model.safetensors``: every parameter and buffer, a shared (tied) tensor once."""
    if hasattr(model, "weights_to_save"):
        tensors = model.weights_to_save()
    else:
        tensors, seen = {}, set()
        for k, t in model.state_dict().items():
            if id(t) not in seen:
                seen.add(id(t))
                tensors[k] = t.data
    save_safetensors(os.path.join(folder, MODEL_FILE), tensors, {"format": "tinylora"})


def load_model_weights(model, folder) -> None:
    """Load ``model.safetensors`` from ``folder`` into ``model`` (strict)."""
    path = os.path.join(folder, MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {folder} is not a complete checkpoint")
    tensors, _ = load_safetensors(path)
    if hasattr(model, "load_weights"):
        model.load_weights(tensors, source=path)
        return
    sd = model.state_dict()
    for k, t in sd.items():   # tied names written once: fill in the aliases
        if k not in tensors:
            twin = next((j for j, u in sd.items() if u is t and j in tensors), None)
            if twin is not None:
                tensors[k] = tensors[twin]
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise type(e)(f"{path}: {e}") from None
