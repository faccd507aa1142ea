"""Putting adapters into a model and deciding what trains.

``inject`` finds the targeted layers and puts a LoRA wrapper in each one's place (or adds
the adapter to the wrapper already there), and copies modules_to_save. A LoRA wrapper
freezes its own base; the first adapter also freezes the rest of the model, as PEFT does.
All checks run before the first change, so an error leaves the model as it was.
"""
from __future__ import annotations

from ..nn.module import Parameter
from .config import LoraConfig
from .layers import LoraLayer, LoRAEmbedding, LoRALinear
from .modules_to_save import ModulesToSaveWrapper
from .protocol import is_embedding_like, is_linear_like, is_quantized
from .registry import (active_adapters, adapter_modules, all_adapter_names, check_adapter_name,
                       lora_layers, registry)
from .targets import find_modules_to_save, find_targets, resolve_target_modules

__all__ = ["inject", "trainable_parameters", "mark_only_lora_as_trainable", "trainable_summary"]


def inject(model, config: LoraConfig, adapter_name: str = "default", *, _init=None):
    """Add adapter ``adapter_name`` to the layers ``config`` targets, in place; returns model.

    The first adapter of a model freezes every base parameter and becomes the active,
    trainable adapter. A later one is added to the existing wrappers (and wraps any new
    targets) but stays inactive and frozen until ``lora.set_adapter`` selects it, as in
    PEFT. ``config.bias`` then makes biases trainable ("all": every bias; "lora_only": those
    of the adapted layers) when the new adapter is the active one.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"inject needs a lora.LoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    existing = all_adapter_names(model)
    if adapter_name in existing:
        raise ValueError(f"adapter {adapter_name!r} already exists in this model; "
                         f"lora.delete_adapter(model, {adapter_name!r}) first, or choose another name")
    targets = find_targets(model, config)
    if config.use_dora:
        emb = [p for p, m in targets if isinstance(m, LoRAEmbedding) or is_embedding_like(m)]
        if emb:
            raise ValueError(f"use_dora=True, but target_modules include the embedding {emb[0]!r}; "
                             "DoRA is implemented for Linear layers only")
    to_save = find_modules_to_save(model, config, targets)

    # ---- no error is possible from here on: change the model
    first = not existing
    active = [adapter_name] if first else active_adapters(model)
    reg = registry(model, create=True)
    if first:
        model.requires_grad_(False)
    init = config.init_lora_weights if _init is None else _init
    for path, m in targets:
        layer = m
        if not isinstance(m, LoraLayer):        # the wrapper freezes its base
            layer = LoRALinear(m) if is_linear_like(m) else LoRAEmbedding(m)
            _adopt(model, path, layer, m, active, reg)
        layer.update_layer(adapter_name, config.r, config.lora_alpha, config.lora_dropout,
                           init, config.use_rslora, config.use_dora)
    for path, m in to_save:
        wrapper = m
        if not isinstance(m, ModulesToSaveWrapper):
            wrapper = ModulesToSaveWrapper(m)
            _adopt(model, path, wrapper, m, active, reg)
        wrapper.update(adapter_name)
    reg[adapter_name] = config.replace(target_modules=resolve_target_modules(model, config, targets))
    trainable = adapter_name in active
    for _, m in adapter_modules(model):
        for p in m.adapter_parameters(adapter_name):
            p.requires_grad = trainable
    if trainable:
        _apply_bias(model, config.bias, adapter_name)
    return model


def _adopt(model, path, wrapper, original, active, reg) -> None:
    for p in original.parameters():     # (a LoRA layer froze its base already)
        p.requires_grad = False
    wrapper.active_adapters = list(active)
    wrapper.known_adapters = reg
    wrapper.train(original.training)
    model.set_submodule(path, wrapper)


def _apply_bias(model, bias: str, adapter_name: str) -> None:
    if bias == "all":
        inside_copies = {id(p) for _, w in adapter_modules(model) if isinstance(w, ModulesToSaveWrapper)
                         for p in w.parameters()}
        for _, m in model.named_modules():
            b = m._parameters.get("bias")
            if isinstance(b, Parameter) and id(b) not in inside_copies:
                b.requires_grad = True
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            b = getattr(layer.base_layer, "bias", None)
            if adapter_name in layer.r and isinstance(b, Parameter):
                b.requires_grad = True


def trainable_parameters(model) -> list:
    """The parameters an optimizer should get: those with requires_grad (tied ones once)."""
    return [p for p in model.parameters() if p.requires_grad]


def mark_only_lora_as_trainable(model, bias: str = "none"):
    """loralib's helper: freeze everything, then make every adapter's parameters (of all
    adapters, active or not) trainable, plus biases by ``bias`` ("none"/"all"/"lora_only")."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    model.requires_grad_(False)
    for _, m in adapter_modules(model):
        for name in m.adapters:
            for p in m.adapter_parameters(name):
                p.requires_grad = True
    if bias != "none":
        for _, layer in lora_layers(model):
            for name in layer.adapters:
                _apply_bias(model, bias, name)
    return model


def trainable_summary(model, print_fn=print) -> str:
    """PEFT's line ``trainable params: N || all params: M || trainable%: P``, printed and
    returned. Tied parameters count once; a 4-bit layer counts in_features·out_features."""
    params = list(model.parameters())
    trainable = sum(p.data.size for p in params if p.requires_grad)
    total = sum(p.data.size for p in params)
    for m in model.modules():
        if is_quantized(m) and not isinstance(getattr(m, "weight", None), Parameter):
            total += m.in_features * m.out_features
    pct = 100.0 * trainable / total if total else 0.0
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
    if print_fn is not None:
        print_fn(line)
    return line
