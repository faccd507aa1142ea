"""Many adapters on one base: choose, disable, delete and combine them.

Mixed batches need nothing here: a model's forward wraps itself in
``nn.adapter_routing(adapter_names)`` and each LoRA layer groups its rows by adapter
(layers.py). These functions act on the whole model at once.
"""
from __future__ import annotations

import contextlib
import math

from ..backend import xp
from .layers import LoRAEmbedding
from .registry import (active_adapters, adapter_modules, all_adapter_names, check_adapter_name,
                       lora_layers, registry, save_wrappers, set_active)

__all__ = ["set_adapter", "active_adapters", "list_adapters", "disable_adapter", "delete_adapter",
           "add_weighted_adapter"]


def list_adapters(model) -> list:
    """Every adapter name in the model, in the order they were added."""
    return all_adapter_names(model)


def _check_known(model, names) -> None:
    known = all_adapter_names(model)
    for n in names:
        if n not in known:
            raise ValueError(f"no adapter named {n!r} in this model (adapters: {known})")


def _check_unmerged(model, action: str) -> None:
    merged = [p for p, m in lora_layers(model) if m.merged_adapters]
    if merged:
        raise RuntimeError(f"cannot {action} while adapters are merged into the base weights "
                           f"({merged[0]}{' and others' if len(merged) > 1 else ''}); "
                           "lora.unmerge(model) first")


def set_adapter(model, adapter_name) -> None:
    """Activate one adapter or a list of them (their outputs add up). Active adapters'
    parameters become trainable and all others frozen, as in PEFT."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    _check_known(model, names)
    _check_unmerged(model, "change the active adapters")
    for path, w in save_wrappers(model):
        owners = [n for n in names if n in w.modules_to_save]
        if len(owners) > 1:
            raise ValueError(f"adapters {owners} each train their own copy of {path} "
                             "(modules_to_save); only one of them can be active at a time")
    set_active(model, names)


@contextlib.contextmanager
def disable_adapter(model):
    """``with lora.disable_adapter(model):`` runs the base model alone (all adapters off)."""
    _check_unmerged(model, "disable adapters")
    mods = [m for _, m in adapter_modules(model)]
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, flag in zip(mods, before):
            m.disabled = flag


def delete_adapter(model, adapter_name: str) -> None:
    """Remove an adapter everywhere. A wrapper left without adapters gives its place back to
    the original layer. If the deleted adapter was active, the remaining active ones stay
    active; if none remain, the first remaining adapter becomes active (PEFT's rule)."""
    _check_known(model, [adapter_name])
    for path, layer in lora_layers(model):
        if adapter_name in layer.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into {path}; "
                               "lora.unmerge(model) first")
    was_active = active_adapters(model)
    for path, m in adapter_modules(model):
        if adapter_name in m.adapters:
            m.delete_adapter(adapter_name)
            if not m.adapters:
                base = m.base_layer if hasattr(m, "base_layer") else m.original_module
                model.set_submodule(path, base)
    registry(model).pop(adapter_name, None)
    remaining = all_adapter_names(model)
    if not remaining:
        model.__dict__.pop("peft_config", None)
        return
    active = [n for n in was_active if n != adapter_name] or remaining[:1]
    set_active(model, active)


def add_weighted_adapter(model, adapters, weights, adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> None:
    """A new adapter combining existing ones, with PEFT's three basic recipes.

    With ΔWᵢ = sᵢ·Bᵢ·Aᵢ, the target is Σ wᵢ·ΔWᵢ. The new adapter has lora_alpha = r (scale 1):
      "svd":    the best rank-k approximation of Σ wᵢ·ΔWᵢ (k = svd_rank, default the
                largest rank): B = U_k·diag(S_k), A = V_kᵀ. Exact when k >= Σ rᵢ.
      "cat":    A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁ B₂ ...]; rank Σ rᵢ. Exact.
      "linear": A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ (the sign goes on A only,
                so a single adapter with weight w gives exactly w·ΔW); needs equal ranks.
                Not the weighted sum of the updates (the product has cross terms Bᵢ·Aⱼ),
                but PEFT's definition; for adapters of different ranks use "cat" or "svd".
    The new adapter covers every layer that any of the inputs covers, and is added inactive.
    DoRA adapters and adapters with modules_to_save cannot be combined.
    """
    from .inject import inject  # here: inject imports this package's registry, not multi

    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    weights = [float(w) for w in ([weights] if isinstance(weights, (int, float)) else weights)]
    if not adapters or len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter needs one weight per adapter, got {len(adapters)} "
                         f"adapters and {len(weights)} weights")
    check_adapter_name(adapter_name)
    _check_known(model, adapters)
    if adapter_name in all_adapter_names(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; choose a new name")
    reg = registry(model)
    cfgs = [reg[a] for a in adapters if a in reg]
    if len(cfgs) != len(adapters):
        raise ValueError("add_weighted_adapter combines adapters made by lora.inject or "
                         "lora.load_adapter")
    if any(c.use_dora for c in cfgs):
        raise ValueError("DoRA adapters cannot be combined: their magnitude vectors do not add")
    if any(c.modules_to_save for c in cfgs):
        raise ValueError("adapters with modules_to_save cannot be combined (whole trained "
                         "modules do not add)")
    ranks = [c.r for c in cfgs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' needs adapters of equal rank, got ranks "
                             f"{ranks}; use 'cat' (exact, rank {sum(ranks)}) or 'svd'")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type == "svd":
        new_rank = int(svd_rank) if svd_rank is not None else max(ranks)
        if new_rank <= 0:
            raise ValueError(f"svd_rank must be positive, got {svd_rank}")
    else:
        raise ValueError(f"combination_type must be 'svd', 'cat' or 'linear', got {combination_type!r}")

    paths = [p for p, m in lora_layers(model) if any(a in m.r for a in adapters)]
    cfg = cfgs[0].replace(r=new_rank, lora_alpha=new_rank, use_rslora=False, target_modules=paths,
                          modules_to_save=None)
    inject(model, cfg, adapter_name, _init="zeros")
    for _, layer in lora_layers(model):
        if adapter_name not in layer.r:
            continue
        A, B = _combine(layer, adapters, weights, ranks, combination_type, new_rank)
        a_new, b_new = _ab(layer, adapter_name)
        a_new.data[...] = A.astype(a_new.dtype, copy=False)
        b_new.data[...] = B.astype(b_new.dtype, copy=False)


def _ab(layer, name):
    if isinstance(layer, LoRAEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _combine(layer, adapters, weights, ranks, kind, new_rank):
    """(A (new_rank, in), B (out, new_rank)) arrays for one layer."""
    n_in = layer.in_features if hasattr(layer, "in_features") else layer.num_embeddings
    n_out = layer.out_features if hasattr(layer, "out_features") else layer.embedding_dim
    dt = _ab(layer, next(a for a in adapters if a in layer.r))[0].dtype
    if kind == "cat":
        As, Bs = [], []
        for a, w, r in zip(adapters, weights, ranks):
            if a in layer.r:
                A, B = _ab(layer, a)
                As.append(w * layer.scaling[a] * A.data)
                Bs.append(B.data)
            else:  # this layer lacks adapter a: a zero block keeps the rank the same everywhere
                As.append(xp.zeros((r, n_in), dtype=dt))
                Bs.append(xp.zeros((n_out, r), dtype=dt))
        return xp.concatenate(As, axis=0), xp.concatenate(Bs, axis=1)
    if kind == "linear":
        A = xp.zeros((new_rank, n_in), dtype=dt)
        B = xp.zeros((n_out, new_rank), dtype=dt)
        for a, w in zip(adapters, weights):
            if a in layer.r:
                ws = w * layer.scaling[a]          # √|w·s| on both; the sign on A (PEFT's rule)
                c = math.sqrt(abs(ws))
                A = A + math.copysign(c, ws) * _ab(layer, a)[0].data
                B = B + c * _ab(layer, a)[1].data
        return A, B
    delta = xp.zeros((n_out, n_in), dtype=dt)      # Σ wᵢ sᵢ Bᵢ Aᵢ, (out, in) like B·A
    for a, w in zip(adapters, weights):
        if a in layer.r:
            A, B = _ab(layer, a)
            delta = delta + (w * layer.scaling[a]) * (B.data @ A.data)
    U, S, Vh = xp.linalg.svd(delta, full_matrices=False)
    k = min(new_rank, S.shape[0])
    A = xp.zeros((new_rank, n_in), dtype=dt)
    B = xp.zeros((n_out, new_rank), dtype=dt)
    A[:k] = Vh[:k]
    B[:, :k] = U[:, :k] * S[:k]
    return A, B
