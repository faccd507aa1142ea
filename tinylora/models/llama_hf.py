"""Load a Hugging Face Llama or Qwen2 folder into tinylora's Llama.

``config.json`` (``model_type`` "llama" or "qwen2") and ``model.safetensors`` or the shards
listed in ``model.safetensors.index.json``; float32, float16 and bfloat16 weights (bfloat16 is
the top half of a float32: ``tinylora.io`` widens it with a bit shift, no torch). Our module
names are HF's, so tensors load by name; every key and shape is checked against the headers
before any tensor data is read.

A folder saved pre-quantized by transformers with bitsandbytes 4-bit
(``quantization_config``: ``load_in_4bit``, nf4/fp4, with or without double quantization)
loads as it is: bitsandbytes' per-layer tensors are tinylora's ``Linear4bit`` state dict
(see ``tinylora.quant.prequantized``, shared with GPT-2's loader), so no weight is rounded
again and the logits are bitsandbytes'.

Config fields that do not change the math (``architectures``, ``initializer_range``,
``use_cache``, ``torch_dtype``, token ids, ...) are ignored. A field that would change it and
that tinylora does not implement is refused with a one-line error naming the field.
"""
from __future__ import annotations

import os

from ..io import (FormatError, load_json, load_safetensors, make_folder, read_safetensors_header,
                  save_json, save_safetensors)

__all__ = ["load_llama_hf", "llama_config_from_hf", "rope_from_hf", "weight_files",
           "hf_config_dict", "save_llama_hf"]

_REFUSED = {
    "mistral": "sliding-window attention", "mixtral": "a mixture-of-experts MLP",
    "gemma": "(1 + w) RMSNorm, GELU and scaled embeddings", "gemma2": "soft-capped logits",
    "gemma3": "sliding-window layers and q/k norms", "qwen3": "RMSNorm on q and k",
    "phi3": "fused qkv and gate_up projections", "qwen2_moe": "a mixture-of-experts MLP",
    "olmo2": "RMSNorm on q and k", "cohere": "LayerNorm and a parallel block",
}
_IGNORED_TENSORS = ("rotary_emb.inv_freq",)   # old checkpoints store RoPE's table; we compute it


def _refuse(where, key, value, why):
    raise FormatError(f"{where}: {key}={value!r} is not supported ({why})")


def rope_from_hf(cfg: dict, where: str):
    """(rope_theta, rope_scaling or None) from a transformers 4.x config (top-level
    ``rope_theta`` / ``rope_scaling``) or a 5.x one (``rope_parameters``)."""
    theta = cfg.get("rope_theta", 10000.0)
    scaling = cfg.get("rope_scaling")
    params = cfg.get("rope_parameters")
    key = "rope_scaling"
    if isinstance(params, dict):
        if isinstance(params.get("full_attention"), dict):   # per-layer-type form
            params = params["full_attention"]
        theta = params.get("rope_theta", theta)
        scaling, key = params, "rope_parameters"
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        _refuse(where, key, scaling, "expected an object")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        _refuse(where, f"{key}.rope_type", kind, "tinylora implements 'default', 'linear' and "
                "'llama3' rotary embeddings")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(where, f"{key}.partial_rotary_factor", scaling["partial_rotary_factor"],
                "rotary embedding on the whole head only")
    if scaling.get("attention_factor") not in (None, 1, 1.0):
        _refuse(where, f"{key}.attention_factor", scaling["attention_factor"], "must be 1")
    if kind == "default":
        return float(theta), None
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    out = {"rope_type": kind, **{k: scaling[k] for k in keep if k in scaling}}
    return float(theta), out


def llama_config_from_hf(cfg: dict, where: str, config_cls):
    """``config_cls`` (LlamaConfig) from a parsed config.json; unsupported variants are
    FormatErrors. The class comes from the caller, so this module does not import llama."""

    mt = cfg.get("model_type")
    if mt not in ("llama", "qwen2"):
        why = f" (it has {_REFUSED[mt]})" if mt in _REFUSED else ""
        raise FormatError(f"{where}: model_type {mt!r} is not supported{why}; Llama.from_hf "
                          "loads model_type 'llama' (Llama, TinyLlama, SmolLM) and 'qwen2'")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in cfg]
    if missing:
        raise FormatError(f"{where}: missing config key(s) {', '.join(missing)}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        _refuse(where, "hidden_act", act, "the SwiGLU MLP uses SiLU")
    if cfg.get("quantization_config") is not None:
        from ..quant.prequantized import bnb_4bit_settings
        bnb_4bit_settings(cfg["quantization_config"], where)
    sliding = cfg.get("use_sliding_window", mt == "llama" and cfg.get("sliding_window") is not None)
    if sliding:
        _refuse(where, "use_sliding_window", True, "tinylora attends to the whole context")
    if "sliding_attention" in (cfg.get("layer_types") or []):
        _refuse(where, "layer_types", "sliding_attention", "tinylora attends to the whole context")
    theta, scaling = rope_from_hf(cfg, where)
    try:
        return config_cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            rope_scaling=scaling, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=True if mt == "qwen2" else bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)), model_type=mt)
    except ValueError as e:
        raise FormatError(f"{where}: {e}") from None


def weight_files(folder: str, who: str = "Llama.from_hf") -> dict:
    """{tensor name: file} of a folder's model.safetensors or sharded index."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        header, _ = read_safetensors_header(single)
        return {k: single for k in header}
    if os.path.isfile(index):
        wm = load_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise FormatError(f"{index}: no 'weight_map' object naming each tensor's shard")
        out = {}
        for name, shard in wm.items():
            path = os.path.join(folder, shard)
            if os.path.basename(shard) != shard or not os.path.isfile(path):
                raise FormatError(f"{index}: shard {shard!r} of tensor {name!r} is not a file "
                                  f"in {folder}")
            out[name] = path
        return out
    other = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
             if os.path.exists(os.path.join(folder, n))]
    hint = (f" (found {other[0]}: tinylora never unpickles; convert it with transformers' "
            "save_pretrained(safe_serialization=True))") if other else ""
    raise FileNotFoundError(f"{who}: {folder} has neither model.safetensors nor "
                            f"model.safetensors.index.json{hint}")


def load_llama_hf(cls, folder, config_cls):
    """``cls(config)`` (a Llama; config a ``config_cls``) with the weights of the HF folder."""
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Llama.from_hf: {folder!r} is not a folder; give the folder "
                                "that holds config.json and model.safetensors")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"Llama.from_hf: {cfg_path} is missing")
    raw = load_json(cfg_path)
    config = llama_config_from_hf(raw, cfg_path, config_cls)
    files = weight_files(folder)
    model = cls(config)
    quantized = raw.get("quantization_config") is not None
    if quantized:   # bitsandbytes' 4-bit layers load as tinylora's Linear4bit (quant.prequantized)
        from ..quant.prequantized import quantize_like_the_file

        def read(key):
            return load_safetensors(files[key], keys=[key])[0][key]
        quantize_like_the_file(model, raw["quantization_config"], files, read, cfg_path)
    ours = model.state_dict()
    want = [k for k in ours if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    missing = [k for k in want if k not in files]
    if missing:
        raise FormatError(f"{folder}: missing tensor(s) {', '.join(missing[:6])}"
                          f"{' ...' if len(missing) > 6 else ''} (does config.json match the "
                          "weights? an untied lm_head needs its own lm_head.weight)")
    unexpected = [k for k in files if k not in ours and not k.endswith(_IGNORED_TENSORS)]
    if unexpected:
        raise FormatError(f"{folder}: unexpected tensor(s) {', '.join(unexpected[:6])}; this is "
                          f"not a plain {config.model_type} checkpoint")
    by_file: dict = {}
    for k in want:
        by_file.setdefault(files[k], []).append(k)
    for path, keys in by_file.items():
        header, _ = read_safetensors_header(path)
        for k in keys:
            got, exp = tuple(header[k]["shape"]), tuple(ours[k].shape)
            if got != exp and not (".quant_state.bitsandbytes__" in k and len(got) == 1):
                raise FormatError(f"{path}: tensor {k!r} has shape {got}, expected {exp} "
                                  "from config.json")
    state = {}
    for path, keys in by_file.items():
        arrays, _ = load_safetensors(path, keys=keys)
        for k in keys:
            state[k] = arrays.pop(k).astype(ours[k].dtype, copy=False)
    from ..quant.prequantized import load_hf_state
    return load_hf_state(model, state, folder, quantized)


# ----------------------------------------------------------------------------- writing

def hf_config_dict(config) -> dict:
    """config.json for a LlamaConfig, in the form transformers 4.x writes and 5.x also reads
    (top-level rope_theta / rope_scaling)."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.model_type]
    d = {"architectures": [arch], "model_type": config.model_type, "hidden_act": "silu",
         "torch_dtype": "float32"}
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
              "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings",
              "attention_dropout", "initializer_range"):
        d[k] = getattr(config, k)
    if config.model_type == "llama":
        d.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
    else:
        d.update(use_sliding_window=False)
    return d


def save_llama_hf(model, folder) -> None:
    """Write ``model`` as a Hugging Face folder (config.json + model.safetensors, float32)
    that ``transformers`` and ``Llama.from_hf`` load. LoRA layers must be merged first."""
    weights = model.weights_to_save()
    odd = [k for k in weights if "lora_" in k or "base_layer" in k or k.endswith((".absmax", ".quant"))]
    bad = [n for n, m in model.named_modules() if type(m).__name__ not in _PLAIN_MODULES]
    if odd or bad:
        raise ValueError(f"save_pretrained: the model holds {(odd or bad)[0]!r}; a Hugging Face "
                         "folder holds plain float weights: lora.merge_and_unload(model) first "
                         "(a 4-bit model is saved with tinylora.quant instead)")
    folder = make_folder(folder)
    save_safetensors(os.path.join(folder, "model.safetensors"),
                     {k: v.astype("float32", copy=False) for k, v in weights.items()},
                     metadata={"format": "pt"})
    save_json(os.path.join(folder, "config.json"), hf_config_dict(model.config))


_PLAIN_MODULES = ("Llama", "LlamaModel", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP",
                  "RMSNorm", "Linear", "Embedding", "ModuleList")
