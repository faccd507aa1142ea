"""Folders saved pre-quantized by transformers with bitsandbytes 4-bit: QLoRA's starting point.

``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``
and ``save_pretrained`` write ``quantization_config`` into config.json and, for each quantized
linear layer ``<path>``, bitsandbytes' ``Linear4bit`` state dict: ``<path>.weight`` (packed
codes), ``.weight.absmax``, ``.weight.quant_map``, ``.weight.nested_absmax``,
``.weight.nested_quant_map`` and ``.weight.quant_state.bitsandbytes__nf4`` (its JSON metadata,
unpadded). These are tinylora's ``Linear4bit`` entries, so a model loader (GPT-2's, Llama's):

1. checks the config (``bnb_4bit_settings``: any other quantization is refused by name),
2. turns the layers the file stores in 4 bits into ``Linear4bit`` layers of the same settings
   (``quantize_like_the_file``), and
3. re-encodes each quant-state JSON at its layer's width (``fit_quant_states``) and loads the
   tensors as they are: no weight is rounded again, so the logits are bitsandbytes'.
"""
from __future__ import annotations

import json

from ..io import FormatError
from .convert import quantize_model
from .linear4bit import Linear4bit

__all__ = ["bnb_4bit_settings", "quantize_like_the_file", "fit_quant_states", "load_hf_state"]


def bnb_4bit_settings(qc, where: str):
    """(quant_type, double_quant) of a bitsandbytes 4-bit ``quantization_config``; any other
    quantization is refused by name."""
    method = qc.get("quant_method") if isinstance(qc, dict) else qc
    if method != "bitsandbytes" or not qc.get("load_in_4bit"):
        what = method if method != "bitsandbytes" else "bitsandbytes 8-bit"
        raise FormatError(f"{where}: quantization_config={what!r} is not supported (tinylora reads "
                          "bitsandbytes 4-bit folders (load_in_4bit); load the float checkpoint "
                          "and quantize it with tinylora.quant.quantize_model)")
    qt = qc.get("bnb_4bit_quant_type", "fp4")
    if qt not in ("nf4", "fp4"):
        raise FormatError(f"{where}: quantization_config.bnb_4bit_quant_type={qt!r} is not "
                          "supported (nf4 or fp4)")
    return qt, bool(qc.get("bnb_4bit_use_double_quant", False))


def quantize_like_the_file(model, qc, names, read, where: str) -> list:
    """Make the linear layers that the file stores in 4 bits ``Linear4bit`` layers.

    qc: config.json's ``quantization_config``; names: the file's tensor names, spelled as
    ``model``'s state dict spells them; read(name) -> that tensor as an array (to read one
    quant-state JSON for the block size). Returns the 4-bit layers' paths. The new layers
    hold the float weights quantized, until the file's codes are loaded over them.
    """
    qt, double_quant = bnb_4bit_settings(qc, where)
    suffix = ".weight.quant_state.bitsandbytes__" + qt
    paths = sorted(k[:-len(suffix)] for k in names if k.endswith(suffix))
    if not paths:
        raise FormatError(f"{where}: quantization_config says 4-bit {qt}, but no tensor carries "
                          f"a bitsandbytes quant state ('...{suffix}')")
    meta = json.loads(bytes(read(paths[0] + suffix)).decode("utf-8"))
    quantize_model(model, target_modules=paths, blocksize=int(meta["blocksize"]),
                   double_quant=double_quant, quant_type=qt, skip=(), print_fn=None)
    return paths


def fit_quant_states(model, state: dict) -> dict:
    """``state`` (a model-level state dict) with every ``Linear4bit``'s quant-state JSON
    re-encoded at that layer's width (``Linear4bit.fit_state_dict``), e.g. bitsandbytes'
    unpadded JSON, so ``model.load_state_dict`` takes it."""
    for path, m in model.named_modules():
        if isinstance(m, Linear4bit):
            state = m.fit_state_dict(state, prefix=path + "." if path else "")
    return state


def load_hf_state(model, state: dict, source: str, quantized: bool):
    """``model.load_weights(state)`` for a Hugging Face folder; a pre-quantized one's
    bitsandbytes quant-state JSON (unpadded) is first re-encoded at our layers' width."""
    if quantized:
        try:
            state = fit_quant_states(model, state)
        except ValueError as e:
            raise FormatError(f"{source}: {e}") from None
    model.load_weights(state, source=source)
    return model
