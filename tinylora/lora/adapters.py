"""Adapter files in PEFT's layout: ``adapter_model.safetensors`` + ``adapter_config.json``.

Tensor keys are ``base_model.model.<module path>.<name>``, without the adapter name (PEFT
strips it; the loader chooses the name):

    <path>.lora_A.weight (r, in)   <path>.lora_B.weight (out, r)   <path>.lora_magnitude_vector (out,)
    <path>.lora_embedding_A (r, V) <path>.lora_embedding_B (dim, r)
    <path>.<key> for each tensor of a modules_to_save module (its own state-dict keys)
    <path>.bias / <path>.base_layer.bias with bias="all" / "lora_only" (an adapted layer's
    bias is <path>.base_layer.bias, as PEFT writes it; both modes save and require them)

The safetensors metadata holds ``format: "pt"`` (as PEFT writes) and our
``tinylora_base_fingerprint``: a hash of the targeted base weights (see base_fingerprint),
so an adapter is not silently applied to a different base model. PEFT's files have none
and are accepted. Loading checks everything before it changes the model.
"""
from __future__ import annotations

import hashlib
import os

from ..version import __version__
from ..backend import np, xp
from ..hints import Fix, hinted
from ..io import load_json, load_safetensors, read_safetensors_header, save_json, save_safetensors
from ..nn.module import Parameter
from ..tensor import no_grad
from .config import LoraConfig
from .inject import inject
from .layers import LoraLayer, LoRAEmbedding, LoRALinear
from .modules_to_save import ModulesToSaveWrapper
from .protocol import is_linear_like, weight_digest
from .registry import adapter_modules, all_adapter_names, check_adapter_name, lora_layers, registry
from .targets import find_modules_to_save, find_targets

__all__ = ["save_adapter", "load_adapter", "load_adapter_weights", "adapter_state_dict", "base_fingerprint",
           "AdapterLoadError", "BaseModelMismatchError", "WEIGHTS_NAME", "CONFIG_NAME", "PREFIX"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
FINGERPRINT_KEY = "tinylora_base_fingerprint"
_FP_SCHEME = "sha256-sampled-v1"


class AdapterLoadError(ValueError):
    """An adapter file that does not fit the model (missing, extra or mis-shaped tensors)."""


class BaseModelMismatchError(AdapterLoadError):
    """An adapter saved from a different base model (its fingerprint differs)."""


# ----------------------------------------------------------------------------- fingerprint

def base_fingerprint(layers) -> str:
    """Hash over (module path, digest of the unmerged base weight) for (path, layer) pairs,
    sorted by path; a layer may be a LoRA wrapper or the plain base layer it will wrap."""
    h = hashlib.sha256()
    for path, m in sorted(layers, key=lambda pm: pm[0]):
        digest = m.base_digest() if isinstance(m, LoraLayer) else weight_digest(m)
        h.update(f"{path}:{digest}\n".encode())
    return f"{_FP_SCHEME}:{h.hexdigest()}"


# ----------------------------------------------------------------------------- keys

def _bias_keys(model, bias: str, layers, to_save=()) -> dict:
    """{key: bias Parameter} that bias mode ``bias`` saves, named as they are once the
    adapted ``layers`` (path, module) are wrapped: "lora_only" takes the adapted layers'
    biases, "all" every bias outside modules_to_save (whose copies carry their own)."""
    if bias == "lora_only":
        out = {}
        for path, m in layers:
            b = getattr(m.base_layer if isinstance(m, LoraLayer) else m, "bias", None)
            if isinstance(b, Parameter):
                out[f"{path}.base_layer.bias"] = b
        return out
    if bias != "all":
        return {}
    adapted = {p for p, _ in layers}
    whole = {p for p, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    whole |= {p for p, _ in to_save}
    out = {}
    for path, m in model.named_modules():
        if any(path == w or path.startswith(w + ".") for w in whole):
            continue
        b = m._parameters.get("bias")          # a LoRA wrapper has none: its base does
        if isinstance(b, Parameter):
            out[f"{path}.base_layer.bias" if path in adapted else f"{path}.bias"] = b
    return out


def adapter_state_dict(model, adapter_name: str = "default") -> dict:
    """{file key: the model's tensor} for one adapter, exactly what save_adapter writes."""
    cfg = registry(model).get(adapter_name)
    if cfg is None:
        raise ValueError(f"no adapter named {adapter_name!r} in this model "
                         f"(adapters: {all_adapter_names(model)})")
    out = {}
    for path, m in adapter_modules(model):
        if adapter_name not in m.adapters:
            continue
        if isinstance(m, LoRALinear):
            out[f"{path}.lora_A.weight"] = m.lora_A[adapter_name].weight
            out[f"{path}.lora_B.weight"] = m.lora_B[adapter_name].weight
            if m.use_dora[adapter_name]:
                out[f"{path}.lora_magnitude_vector"] = m.lora_magnitude_vector[adapter_name].weight
        elif isinstance(m, LoRAEmbedding):
            out[f"{path}.lora_embedding_A"] = m.lora_embedding_A[adapter_name]
            out[f"{path}.lora_embedding_B"] = m.lora_embedding_B[adapter_name]
        else:
            for k, t in m.modules_to_save[adapter_name].state_dict().items():
                out[f"{path}.{k}"] = t
    layers = [(p, m) for p, m in lora_layers(model) if adapter_name in m.r]
    out.update(_bias_keys(model, cfg.bias, layers))
    return {PREFIX + k: t for k, t in out.items()}


def _expected_shapes(model, cfg: LoraConfig, targets, to_save) -> dict:
    """{file key: shape} that an adapter with ``cfg`` must hold for this model."""
    out, r = {}, cfg.r
    for path, m in targets:
        base = m.base_layer if isinstance(m, LoraLayer) else m
        if is_linear_like(base):
            out[f"{path}.lora_A.weight"] = (r, base.in_features)
            out[f"{path}.lora_B.weight"] = (base.out_features, r)
            if cfg.use_dora:
                out[f"{path}.lora_magnitude_vector"] = (base.out_features,)
        else:
            out[f"{path}.lora_embedding_A"] = (r, base.num_embeddings)
            out[f"{path}.lora_embedding_B"] = (base.embedding_dim, r)
    for path, m in to_save:
        orig = m.original_module if isinstance(m, ModulesToSaveWrapper) else m
        for k, t in orig.state_dict().items():
            out[f"{path}.{k}"] = tuple(t.shape)
    for k, b in _bias_keys(model, cfg.bias, targets, to_save).items():
        out[k] = tuple(b.shape)
    return {PREFIX + k: tuple(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- save / load

def save_adapter(model, save_directory, adapter_name: str = "default") -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (each atomically)
    into ``save_directory``, in PEFT's layout, with the base fingerprint in the metadata."""
    state = adapter_state_dict(model, adapter_name)
    cfg = registry(model)[adapter_name]
    layers = [(p, m) for p, m in lora_layers(model) if adapter_name in m.r]
    meta = {"format": "pt", FINGERPRINT_KEY: base_fingerprint(layers),
            "tinylora_version": __version__}
    d = os.fspath(save_directory)
    save_safetensors(os.path.join(d, WEIGHTS_NAME), {k: t.data for k, t in state.items()}, meta)
    save_json(os.path.join(d, CONFIG_NAME), cfg.to_peft_dict())


def _listing(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    names = (k.removeprefix(PREFIX) for k in keys[:limit])
    text = ", ".join(n if n.isprintable() else repr(n) for n in names)   # names from the file
    return text + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_adapter(model, adapter_dir, adapter_name: str = "default", *, check_base: bool = True,
                 is_trainable: bool = False) -> LoraConfig:
    """Read an adapter folder (ours or PEFT's) into ``model`` as ``adapter_name``.

    Every tensor's presence and shape, the config, the values' finiteness and the base
    fingerprint are checked before the model changes; on any error the model is exactly as
    it was. check_base=False accepts an adapter whose fingerprint names a different base.
    is_trainable=False (PEFT's default) loads it frozen, for inference. The adapter becomes
    active only when the model had no adapter before. Returns its LoraConfig.
    """
    d = os.fspath(adapter_dir)
    cfg_path, w_path = os.path.join(d, CONFIG_NAME), os.path.join(d, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} does not exist: an adapter folder holds {CONFIG_NAME} "
                                    f"and {WEIGHTS_NAME} (lora.save_adapter writes both)")
    cfg = LoraConfig.from_peft_dict(load_json(cfg_path), source=cfg_path)
    header, meta = read_safetensors_header(w_path)
    check_adapter_name(adapter_name)
    if adapter_name in all_adapter_names(model):
        raise ValueError(f"adapter {adapter_name!r} already exists in this model; "
                         "load under another adapter_name, or lora.delete_adapter it first")
    try:
        targets = find_targets(model, cfg)
        to_save = find_modules_to_save(model, cfg, targets)
    except ValueError as e:
        raise AdapterLoadError(f"{cfg_path}: {e}") from None
    expected = _expected_shapes(model, cfg, targets, to_save)

    problems = []
    # bias "lora_only" / "all": PEFT writes the adapted layers' biases as
    # '<path>.base_layer.bias' (checked against peft 0.21.2), so they are required like the rest
    missing = expected.keys() - header.keys()
    extra = header.keys() - expected.keys()
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {_listing(extra)}")
    shapes, dtypes = [], []
    for k in sorted(expected.keys() & header.keys()):
        shape, code = tuple(header[k]["shape"]), header[k]["dtype"]
        if shape != expected[k]:
            shapes.append(f"{k.removeprefix(PREFIX)} has shape {shape}, this model needs "
                          f"{expected[k]}")
        if code not in ("F16", "BF16", "F32", "F64"):
            dtypes.append(f"{k.removeprefix(PREFIX)} has dtype {code}; adapter tensors are floats")
    for found in (shapes, dtypes):  # a model of another size mis-shapes every tensor: show a few
        problems += found[:2] + ([f"... {len(found)} such tensors in all"] if len(found) > 2 else [])
    if problems:
        raise AdapterLoadError(f"{w_path} does not fit this model (r={cfg.r}, target_modules="
                               f"{cfg.target_modules!r}); nothing was changed: "
                               + "; ".join(problems))
    tensors = _finite_tensors(w_path)
    if check_base:
        _check_fingerprint(w_path, meta, [(p, m) for p, m in targets])

    # ---- checked: change the model
    inject(model, cfg, adapter_name, _init="zeros")
    state = adapter_state_dict(model, adapter_name)
    if state.keys() != expected.keys():  # the two key builders disagree: a bug, not bad input
        raise AssertionError(f"internal: adapter keys {_listing(state.keys() ^ expected.keys())}")
    with no_grad():
        for k, t in state.items():
            if k in tensors:
                t.data[...] = xp.asarray(tensors[k]).astype(t.dtype, copy=False)
                t._version += 1
    if not is_trainable:
        for t in state.values():
            t.requires_grad = False
    return cfg


def load_adapter_weights(model, adapter_dir, adapter_name: str = "default", *,
                         check_base: bool = True) -> None:
    """Copy a saved adapter's values into the model's existing adapter ``adapter_name``, in
    place: the same Parameter objects get the saved values, so an optimizer that holds them
    goes on working. This resumes an adapter-only fine-tune (``Trainer(load_model=...)``);
    ``load_adapter`` instead adds a new adapter. The file must hold exactly this adapter's
    tensors, of the same shapes, finite, saved from this base (check_base=False skips the
    fingerprint); on any error the model is unchanged."""
    d = os.fspath(adapter_dir)
    w_path = os.path.join(d, WEIGHTS_NAME)
    if not os.path.isfile(w_path):
        raise FileNotFoundError(f"{w_path} does not exist: an adapter folder holds {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME} (lora.save_adapter writes both)")
    state = adapter_state_dict(model, adapter_name)
    header, meta = read_safetensors_header(w_path)
    problems = []
    if header.keys() != state.keys():
        if state.keys() - header.keys():
            problems.append(f"missing tensors: {_listing(state.keys() - header.keys())}")
        if header.keys() - state.keys():
            problems.append(f"unexpected tensors: {_listing(header.keys() - state.keys())}")
    shapes = [f"{k.removeprefix(PREFIX)} has shape {tuple(header[k]['shape'])}, the adapter "
              f"{tuple(t.shape)}" for k, t in sorted(state.items())
              if k in header and tuple(header[k]["shape"]) != tuple(t.shape)]
    problems += shapes[:2] + ([f"... {len(shapes)} such tensors in all"] if len(shapes) > 2 else [])
    if problems:
        raise AdapterLoadError(f"{w_path} does not fit adapter {adapter_name!r} of this model; "
                               "nothing was changed: " + "; ".join(problems))
    tensors = _finite_tensors(w_path)
    if check_base:
        _check_fingerprint(w_path, meta, [(p, m) for p, m in lora_layers(model)
                                          if adapter_name in m.r])
    with no_grad():
        for k, t in state.items():
            t.data[...] = xp.asarray(tensors[k]).astype(t.dtype, copy=False)
            t._version += 1


def _finite_tensors(w_path) -> dict:
    tensors, _ = load_safetensors(w_path)
    for k, a in tensors.items():
        if not np.isfinite(a).all():
            raise AdapterLoadError(f"{w_path}: tensor {k.removeprefix(PREFIX)} holds NaN or inf; "
                                   "the adapter is corrupt (nothing was changed)")
    return tensors


def _check_fingerprint(w_path, meta: dict, layers) -> None:
    """BaseModelMismatchError when the file's base fingerprint (if it has one) is not that
    of ``layers``' base weights."""
    theirs = meta.get(FINGERPRINT_KEY)
    if theirs is None:
        return
    ours = base_fingerprint(layers)
    if theirs != ours:
        raise hinted(BaseModelMismatchError(
            f"{w_path} was trained on a different base model: its fingerprint of the targeted "
            f"base weights is {theirs[-16:]}, this model's is {ours[-16:]}; load it into the "
            "base it was trained on, or pass check_base=False to load it anyway"),
            Fix("check_base", "pass check_base=False", "pass {flag}"))

