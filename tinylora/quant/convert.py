"""Quantizing a model's linear layers in place, and saving / loading the 4-bit model.

    report = quant.quantize_model(model)          # every Linear but the head -> Linear4bit
    lora.inject(model, cfg)                       # QLoRA: adapters over the 4-bit base
    quant.save_quantized(model, "out/q4")         # model.safetensors + quantization_config.json
    model = quant.load_quantized(lambda: GPT(config), "out/q4")

Targets follow LoRA's rules: a list of names (a path equal to one or ending in "." + it),
a string regular expression matching the whole path, or "all-linear". "all-linear" leaves
out the ``skip`` names and every layer whose weight another module shares (GPT's lm_head
is the token embedding: quantizing it would untie the two).

A saved quantized model holds the codes and quant state only (no float copy of a
quantized weight); ``quantization_config.json`` lists the converted layers and their
settings, so loading converts the same layers of a freshly built float model first.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .. import nn
from ..backend import np
from ..io import FormatError, load_json, load_safetensors, make_folder, save_json
from ..nn.weights import save_model_weights
from .linear4bit import _META, Linear4bit, _decode_metadata

__all__ = ["quantize_model", "QuantReport", "quantization_config", "apply_quantization_config",
           "save_quantized", "load_quantized", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "quantization_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "tinylora-4bit"
ALL_LINEAR = "all-linear"


@dataclass
class QuantReport:
    """What ``quantize_model`` did. Bytes count the weights only (biases stay float)."""

    layers: list                      # paths converted
    params: int                       # weights quantized (sum of out·in)
    bytes_before: int                 # their float storage
    bytes_after: int                  # codes + scales + tables + metadata
    quant_type: str
    blocksize: int
    double_quant: bool
    skipped: list = field(default_factory=list)   # (path, reason) of linear layers left float

    @property
    def bytes_per_param(self) -> float:
        return self.bytes_after / self.params if self.params else 0.0

    def __str__(self) -> str:
        dq = ", double quant" if self.double_quant else ""
        text = (f"quantized {len(self.layers)} Linear layers to {self.quant_type} (blocksize "
                f"{self.blocksize}{dq}): {self.params:,d} weights, {self.bytes_before / 2**20:.2f} MiB "
                f"-> {self.bytes_after / 2**20:.2f} MiB, {self.bytes_per_param:.4f} bytes/param "
                f"({8 * self.bytes_per_param:.3f} bits)")
        if self.skipped:
            text += "; kept in float: " + ", ".join(f"{p} ({why})" for p, why in self.skipped)
        return text


def _matches(path: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _inside(path: str, names) -> bool:
    """path is one of names or lies inside one: "lm_head" covers "lm_head" and
    "lm_head.original_module" (a LoRA wrapper's copy) and "model.lm_head"."""
    dotted = "." + path + "."
    return any("." + n + "." in dotted for n in names)


def _shared_weights(model) -> set:
    """ids of parameters that more than one module holds (tied weights)."""
    count = {}
    for _, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                count[id(p)] = count.get(id(p), 0) + 1
    return {k for k, n in count.items() if n > 1}


def _linear_layers(model) -> list:
    return [(p, m) for p, m in model.named_modules() if p and isinstance(m, nn.Linear)]


def _select(model, target_modules, skip) -> tuple:
    """(targets, skipped) as lists of (path, module) and (path, reason); checks first."""
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"quantize_model: target_modules {target_modules!r} is not a valid "
                             f"regular expression ({e}); use a list of names for plain matching"
                             ) from None
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    linears = _linear_layers(model)
    if not linears:
        raise ValueError(f"quantize_model: {type(model).__name__} has no nn.Linear layers to quantize")
    skip = [skip] if isinstance(skip, str) else list(skip or ())
    tied = _shared_weights(model)
    chosen, skipped = [], []
    for path, m in linears:
        if target_modules != ALL_LINEAR and not _matches(path, target_modules):
            continue
        if _inside(path, skip):
            skipped.append((path, "skip"))
        elif id(m.weight) in tied:
            if target_modules != ALL_LINEAR:
                raise ValueError(f"quantize_model: {path!r} shares its weight with another module "
                                 "(tied); quantizing it would untie them — leave it out of "
                                 "target_modules")
            skipped.append((path, "tied weight"))
        else:
            chosen.append((path, m))
    if not chosen:
        names = ", ".join(p for p, _ in linears[:12]) + (", ..." if len(linears) > 12 else "")
        raise ValueError(f"quantize_model: target_modules {target_modules!r} selects no Linear "
                         f"layer of this {type(model).__name__} (skip={skip}); its Linear layers "
                         f"are: {names}")
    return chosen, skipped


def quantize_model(model, target_modules=ALL_LINEAR, blocksize: int = 64, double_quant: bool = True,
                   quant_type: str = "nf4", skip=("lm_head",), compute_dtype=None,
                   print_fn=print) -> QuantReport:
    """Replace the targeted ``nn.Linear`` layers by frozen ``Linear4bit`` layers, in place.

    Returns (and prints with ``print_fn``, unless None) a ``QuantReport``: layers converted
    and the bytes of their weights before and after. Quantize before building the optimizer:
    the float weights leave the model.
    """
    chosen, skipped = _select(model, target_modules, skip)
    report = QuantReport([], 0, 0, 0, quant_type, int(blocksize), bool(double_quant), skipped)
    # build every layer before replacing any, so an error leaves the model as it was
    built = [(path, m, Linear4bit.from_linear(m, blocksize, double_quant, quant_type, compute_dtype))
             for path, m in chosen]
    for path, m, q in built:
        model.set_submodule(path, q)
        report.layers.append(path)
        report.params += int(m.weight.data.size)
        report.bytes_before += int(m.weight.data.nbytes)
        report.bytes_after += q.weight_nbytes
    if print_fn is not None:
        print_fn(str(report))
    return report


# --------------------------------------------------------------------------- files

def quantization_config(model) -> dict | None:
    """JSON-able description of the model's 4-bit layers (None when it has none): enough to
    convert the same layers of a freshly built float model (``apply_quantization_config``)."""
    layers = [{"path": p, "quant_type": m.quant_type, "blocksize": m.blocksize,
               "double_quant": m.double_quant,
               "compute_dtype": None if m.compute_dtype is None else m.compute_dtype.name}
              for p, m in model.named_modules() if isinstance(m, Linear4bit)]
    if not layers:
        return None
    first = layers[0]
    # the bnb_* fields tell Hugging Face readers what this is; "modules" is what we use
    return {"format": FORMAT, "version": 1, "quant_method": "bitsandbytes", "load_in_4bit": True,
            "bnb_4bit_quant_type": first["quant_type"],
            "bnb_4bit_use_double_quant": first["double_quant"], "modules": layers}


def apply_quantization_config(model, config: dict):
    """Convert the layers ``config`` lists (nn.Linear, as built) to Linear4bit; returns model.

    The quantized weights are placeholders until a state dict is loaded."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise FormatError(f"not a tinylora quantization config (format != {FORMAT!r})")
    built = []
    for entry in config.get("modules", []):
        path = entry["path"]
        try:
            m = model.get_submodule(path)
        except AttributeError:
            raise FormatError(f"the quantization config lists {path!r}, which this "
                              f"{type(model).__name__} lacks: build the same architecture") from None
        if isinstance(m, Linear4bit):
            continue
        if not isinstance(m, nn.Linear):
            raise FormatError(f"the quantization config lists {path!r}, a {type(m).__name__} "
                              "here, not an nn.Linear")
        built.append((path, Linear4bit.from_linear(m, entry["blocksize"], entry["double_quant"],
                                                   entry["quant_type"], entry.get("compute_dtype"))))
    for path, q in built:
        model.set_submodule(path, q)
    return model


def save_quantized(model, folder) -> None:
    """Write ``model.safetensors`` (codes and quant state; a tied tensor once) and
    ``quantization_config.json`` into ``folder``."""
    cfg = quantization_config(model)
    if cfg is None:
        raise ValueError(f"save_quantized: this {type(model).__name__} has no Linear4bit layers; "
                         "call quant.quantize_model(model) first (or save it as a float model)")
    make_folder(folder)
    save_model_weights(model, folder)
    save_json(os.path.join(folder, CONFIG_FILE), cfg)


def _fit_metadata(tensors: dict, own: dict) -> None:
    """Re-pad each quant-state JSON entry to the width of the layer's buffer (files written
    by bitsandbytes or by another padding carry the same JSON at another length)."""
    for k, v in tensors.items():
        if _META in k and k in own and tuple(v.shape) != tuple(own[k].shape):
            try:
                _decode_metadata(v)
            except ValueError:
                raise FormatError(f"{k}: the quant state metadata is not UTF-8 JSON") from None
            raw = np.asarray(v).astype(np.uint8).tobytes().rstrip(b" ")
            width = int(own[k].shape[0])
            if len(raw) <= width:
                tensors[k] = np.frombuffer(raw.ljust(width, b" "), dtype=np.uint8)


def load_quantized(model_or_builder, folder):
    """A quantized model from ``save_quantized``'s folder: ``model_or_builder`` is a float
    model of the same architecture or a function returning one; its listed layers are
    converted and every weight is loaded (strict). Returns the model."""
    model = model_or_builder if isinstance(model_or_builder, nn.Module) else model_or_builder()
    cfg_path = os.path.join(os.fspath(folder), CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} is missing: {folder} was not written by "
                                "quant.save_quantized")
    config = load_json(cfg_path)
    path = os.path.join(os.fspath(folder), WEIGHTS_FILE)
    tensors, _ = load_safetensors(path)     # a damaged file fails before the model changes
    # on any later error, put back the layers and the requires_grad flags conversion changed
    modules = [(p, m) for p, m in model.named_modules() if p]
    flags = [(t, t.requires_grad) for t in model.parameters()]
    try:
        try:
            apply_quantization_config(model, config)
        except (FormatError, KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{cfg_path}: not a valid quantization config ({e})") from None
        own = model.state_dict()
        for k, t in own.items():   # tied names were written once: fill in the aliases
            if k not in tensors:
                twin = next((j for j, u in own.items() if u is t and j in tensors), None)
                if twin is not None:
                    tensors[k] = tensors[twin]
        _fit_metadata(tensors, own)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as e:
            raise type(e)(f"{path}: {e}") from None
    except BaseException:
        for p, m in modules:
            if model.get_submodule(p) is not m:
                model.set_submodule(p, m)
        for t, flag in flags:
            t.requires_grad = flag
        raise
    return model
