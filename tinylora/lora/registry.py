"""Where a model keeps its adapters' configs, and walking a model's LoRA modules.

``model.peft_config`` (PEFT's attribute name) maps adapter name -> LoraConfig, in the
order the adapters were added. Every LoRA layer and modules-to-save wrapper holds the same
dict as ``known_adapters``, so a mixed batch that names an unknown adapter is an error.
"""
from __future__ import annotations

from ..nn.routing import BASE
from .layers import LoraLayer
from .modules_to_save import ModulesToSaveWrapper

__all__ = ["registry", "lora_layers", "save_wrappers", "adapter_modules", "all_adapter_names",
           "check_adapter_name"]


def registry(model, create: bool = False) -> dict:
    reg = model.__dict__.get("peft_config")
    if reg is None and create:
        reg = {}
        object.__setattr__(model, "peft_config", reg)
    return {} if reg is None else reg


def lora_layers(model):
    """(path, layer) of every LoRA layer in the model."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoraLayer)]


def save_wrappers(model):
    return [(p, m) for p, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def adapter_modules(model):
    """Every module that holds adapters: LoRA layers and modules-to-save wrappers."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]


def all_adapter_names(model) -> list:
    names = list(registry(model))
    for _, m in adapter_modules(model):
        names += [n for n in m.adapters if n not in names]
    return names


def check_adapter_name(name) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise ValueError(f"adapter name {name!r} is not allowed: use a non-empty string without "
                         f"'.' (it becomes part of parameter names), other than '{BASE}'")


def active_adapters(model) -> list:
    """The model's active adapter names (from its first adapter module; all agree)."""
    for _, m in adapter_modules(model):
        return list(m.active_adapters)
    return []


def set_active(model, names) -> None:
    """Make ``names`` the active adapters everywhere: their parameters (LoRA weights and
    modules-to-save copies) trainable, every other adapter's frozen. Base weights and
    biases are left as they are."""
    names = list(names)
    for _, m in adapter_modules(model):
        m.active_adapters = list(names)
        for name in m.adapters:
            for p in m.adapter_parameters(name):
                p.requires_grad = name in names
