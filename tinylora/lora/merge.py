"""Merging adapters into the base weights (W ← W + s·B·A) and taking LoRA out again.

Merging is explicit, never a side effect of train()/eval(). A merged adapter lives in the
base weight, so the layer's forward no longer adds it; unmerging subtracts it again (up to
float rounding). For a 4-bit base the merged weight is re-quantized, which is lossy.
"""
from __future__ import annotations

from .. import nn
from ..backend import xp
from ..nn.module import Module, Parameter
from .layers import LoraLayer, LoRALinear
from .modules_to_save import ModulesToSaveWrapper
from .protocol import dense_weight, is_quantized
from .registry import active_adapters, adapter_modules, all_adapter_names, lora_layers

__all__ = ["merge", "unmerge", "merge_and_unload", "unload"]


def _names(model, adapter_names) -> list:
    if adapter_names is None:
        return active_adapters(model)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = all_adapter_names(model)
    for n in names:
        if n not in known:
            raise ValueError(f"no adapter named {n!r} in this model (adapters: {known})")
    return names


def _check_untied(model, layers) -> None:
    """Refuse to merge into a weight another module shares (a tied embedding / LM head):
    the merge would change that module too."""
    owners = {}
    for path, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(path)
    for path, layer in layers:
        w = getattr(layer.base_layer, "weight", None)
        users = owners.get(id(w), []) if w is not None else []
        if len(users) > 1:
            others = [u for u in users if u != f"{path}.base_layer"]
            raise ValueError(f"{path}'s weight is shared with {others} (tied); merging would change "
                             "those modules too — keep this adapter unmerged, or untie the weights")


def merge(model, safe_merge: bool = False, adapter_names=None):
    """Add adapters (default: the active ones) into the base weights; returns model.

    safe_merge: compute every merged weight first and refuse (ValueError, model unchanged)
    if any is non-finite. Adapters already merged are skipped, so merging twice is harmless.
    """
    names = _names(model, adapter_names)
    layers = [(p, m) for p, m in lora_layers(model) if any(n in m.r for n in names)]
    _check_untied(model, layers)
    if not safe_merge:
        for _, layer in layers:
            layer.merge(names)
        return model
    plans = []
    for path, layer in layers:
        plan = layer.plan_merge(names)
        if plan is not None:
            if not bool(xp.isfinite(plan[0]).all()):
                raise ValueError(f"safe_merge: merging {plan[1]} into {path} gives non-finite "
                                 "weights (NaN or inf in the adapter?); nothing was merged")
            plans.append((layer, plan))
    for layer, plan in plans:
        layer.commit_merge(plan)
    return model


def unmerge(model):
    """Subtract every merged adapter from the base weights; returns model."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def _dense_copy(layer: LoRALinear) -> nn.Linear:
    """An nn.Linear holding the dequantized weight of the layer's 4-bit base (same bias)."""
    base = layer.base_layer
    # built by hand rather than by nn.Linear(...), whose random init would draw (out, in)
    # numbers from the seeded stream only to be overwritten
    dense = nn.Linear.__new__(nn.Linear)
    Module.__init__(dense)
    dense.in_features, dense.out_features = layer.in_features, layer.out_features
    dense.weight = Parameter(xp.ascontiguousarray(dense_weight(base)), requires_grad=False)
    dense.bias = getattr(base, "bias", None)
    dense.train(base.training)
    return dense


def merge_and_unload(model, safe_merge: bool = False, adapter_names=None, dequantize: bool = False):
    """Merge adapters (default: the active ones) and replace every LoRA wrapper by its plain
    base layer, and every modules_to_save wrapper by the active adapter's copy. Returns the
    model with no LoRA modules left.

    dequantize: a 4-bit base becomes an ``nn.Linear`` holding the merged weight in float,
    instead of being re-quantized (which would round the merged weight to 4 bits).
    """
    names = _names(model, adapter_names)
    swapped = []
    if dequantize:  # dequantize first, so the adapters are added at full precision
        quantized = [(p, m) for p, m in lora_layers(model)
                     if isinstance(m, LoRALinear) and is_quantized(m.base_layer)]
        merged = [p for p, m in quantized if m.merged_adapters]
        if merged:
            raise RuntimeError(f"{merged[0]} has adapters merged into its 4-bit weight; "
                               "lora.unmerge(model) before merge_and_unload(dequantize=True)")
        for _, layer in quantized:
            swapped.append((layer, layer.base_layer, layer._digest))
            layer.base_layer = _dense_copy(layer)
    try:
        merge(model, safe_merge=safe_merge, adapter_names=names)
    except Exception:
        for layer, base, digest in swapped:   # a refused merge leaves the model as it was
            layer.base_layer, layer._digest = base, digest
        raise
    return unload(model)


def unload(model):
    """Take every adapter out without merging: the original layers come back (modules_to_save
    wrappers give back their active copy, or the original when none is active)."""
    for path, m in adapter_modules(model):
        if isinstance(m, LoraLayer):
            model.set_submodule(path, m.base_layer)
        elif isinstance(m, ModulesToSaveWrapper):
            model.set_submodule(path, m.active_module())
    model.__dict__.pop("peft_config", None)
    return model
