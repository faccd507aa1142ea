"""Read and write Hugging Face GPT-2 folders (config.json + model.safetensors) for tinylora's GPT.

HF's GPT-2 keeps its projections (c_attn, c_proj, c_fc) as Conv1D, whose weight is stored
(in, out); our Linear stores (out, in), so those four weights per block are transposed.
``lm_head.weight`` is tied to ``transformer.wte.weight`` (HF omits it from the file);
the causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` that old files carry are ignored.
Every key and shape is checked against the header before any tensor data is read.
``save_gpt2_hf`` (``GPT.save_hf``) writes the same layout back, so a merged model loads in
transformers' ``GPT2LMHeadModel.from_pretrained``.

A folder saved pre-quantized by transformers with bitsandbytes 4-bit (``quantization_config``
in config.json) loads as it is: transformers quantizes the Conv1D weights transposed, as
(out, in), which is our Linear's layout, so its 4-bit layers are tinylora's ``Linear4bit``
state dicts (``tinylora.quant.prequantized``, shared with the Llama loader) and the logits
are bitsandbytes'.
"""
from __future__ import annotations

import os

from ..backend import np, to_numpy
from ..io import (FormatError, atomic_write_text, load_json, load_safetensors, make_folder,
                  read_safetensors_header, save_json, save_safetensors)

__all__ = ["load_gpt2_hf", "save_gpt2_hf", "gpt_config_from_hf", "hf_config_from_gpt"]

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")   # one function, three spellings


def gpt_config_from_hf(cfg: dict, where: str, config_cls, dropout: float = 0.0):
    """``config_cls`` (GPTConfig) from a parsed HF GPT-2 config.json; unsupported variants
    are FormatErrors. The classes come from the caller: gpt.py imports this loader, not
    the other way round."""
    arch = cfg.get("architectures") or []
    if cfg.get("model_type") != "gpt2" or any(a not in ("GPT2LMHeadModel", "GPT2Model") for a in arch):
        raise FormatError(f"{where}: model_type {cfg.get('model_type')!r} / architectures {arch} "
                          "is not a GPT-2 model; GPT.from_hf loads model_type 'gpt2' "
                          "(GPT2LMHeadModel or GPT2Model) only")
    missing = [k for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd") if k not in cfg]
    if missing:
        raise FormatError(f"{where}: missing GPT-2 config key(s) {', '.join(missing)}")
    C = cfg["n_embd"]
    checks = [
        ("activation_function", cfg.get("activation_function", "gelu_new") in _TANH_GELUS,
         "tinylora's GPT uses GELU with the tanh approximation ('gelu_new')"),
        ("n_inner", cfg.get("n_inner") in (None, 4 * C), f"the MLP width must be 4 * n_embd = {4 * C}"),
        ("layer_norm_epsilon", abs(cfg.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12,
         "LayerNorm eps must be 1e-5"),
        ("tie_word_embeddings", cfg.get("tie_word_embeddings", True) is True,
         "lm_head must be tied to wte"),
        ("add_cross_attention", not cfg.get("add_cross_attention", False), "no cross-attention"),
        ("scale_attn_weights", cfg.get("scale_attn_weights", True) is True,
         "attention scores must be scaled by 1/sqrt(head size)"),
        ("scale_attn_by_inverse_layer_idx", not cfg.get("scale_attn_by_inverse_layer_idx", False),
         "no per-layer attention scaling"),
    ]
    for key, ok, need in checks:
        if not ok:
            raise FormatError(f"{where}: {key}={cfg.get(key)!r} is not supported ({need})")
    try:
        return config_cls(vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"],
                         n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=C, dropout=dropout)
    except ValueError as e:
        raise FormatError(f"{where}: {e}") from None


def load_gpt2_hf(cls, folder, *, config_cls, dropout: float = 0.0):
    """``cls(config_cls(...))`` (a GPT) with the weights of the HF GPT-2 in ``folder``."""
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"GPT.from_hf: {folder!r} is not a folder; give the folder "
                                "that holds config.json and model.safetensors")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"GPT.from_hf: {cfg_path} is missing")
    if not os.path.isfile(weights):
        other = [n for n in ("pytorch_model.bin", "model.safetensors.index.json")
                 if os.path.exists(os.path.join(folder, n))]
        hint = (f" (found {other[0]}: tinylora reads single-file safetensors only, never pickles; "
                "convert it with transformers' save_pretrained(safe_serialization=True))") if other else ""
        raise FileNotFoundError(f"GPT.from_hf: {weights} is missing{hint}")
    raw = load_json(cfg_path)
    config = gpt_config_from_hf(raw, cfg_path, config_cls, dropout)
    model = cls(config)

    header, _ = read_safetensors_header(weights)
    prefix = "transformer." if "transformer.wte.weight" in header else ""
    if prefix + "wte.weight" not in header:
        raise FormatError(f"{weights}: no 'transformer.wte.weight' (or 'wte.weight'): "
                          "not a GPT-2 weight file")
    quantized = ()                                 # paths of the layers the file holds in 4 bits
    if raw.get("quantization_config") is not None:
        from ..quant.prequantized import quantize_like_the_file

        def ours_to_file(k):
            return prefix + k[len("transformer."):]
        names = ["transformer." + k[len(prefix):] for k in header if k.startswith(prefix)]
        quantized = set(quantize_like_the_file(
            model, raw["quantization_config"], names,
            lambda k: load_safetensors(weights, keys=[ours_to_file(k)])[0][ours_to_file(k)],
            cfg_path))
    ours = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    to_file = {k: prefix + k[len("transformer."):] for k in ours}
    missing = [f for f in to_file.values() if f not in header]
    if missing:
        raise FormatError(f"{weights}: missing tensor(s) {', '.join(missing[:6])}"
                          f"{' ...' if len(missing) > 6 else ''} for a {config.n_layer}-layer GPT-2 "
                          "(does config.json match the weights?)")
    known = set(to_file.values()) | {"lm_head.weight"}
    ignored = (".attn.bias", ".attn.masked_bias")
    unexpected = [k for k in header if k not in known and not k.endswith(ignored)]
    if unexpected:
        raise FormatError(f"{weights}: unexpected tensor(s) {', '.join(unexpected[:6])}; "
                          "this is not a plain GPT-2 checkpoint")
    conv1d = [k for k in ours if k.endswith(_CONV1D) and k[:-len(".weight")] not in quantized]
    for k, f in to_file.items():
        want = tuple(ours[k].shape)
        if k in conv1d:
            want = want[::-1]                      # Conv1D: (in, out)
        got = tuple(header[f]["shape"])
        if ".quant_state.bitsandbytes__" in k and len(got) == 1:
            continue                               # JSON text: its length varies (fitted below)
        if got != want:
            raise FormatError(f"{weights}: tensor {f!r} has shape {got}, expected {want} "
                              "from config.json")

    arrays, _ = load_safetensors(weights, keys=list(to_file.values()))
    state = {}
    for k, f in to_file.items():
        a = arrays.pop(f)
        if k in conv1d:
            a = np.ascontiguousarray(a.T)
        state[k] = a.astype(ours[k].dtype, copy=False)
    from ..quant.prequantized import load_hf_state
    return load_hf_state(model, state, weights, quantized)


def hf_config_from_gpt(config, dtype: str = "float32", tokenizer=None) -> dict:
    """The config.json transformers' GPT2Config reads for a GPTConfig (GPT-2's field names)."""
    eos = None
    if tokenizer is not None and "<|endoftext|>" in getattr(tokenizer, "encoder", {}):
        eos = tokenizer.encoder["<|endoftext|>"]
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False,
        "tie_word_embeddings": True, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": eos, "eos_token_id": eos, "dtype": dtype,
    }


def save_gpt2_hf(model, folder, tokenizer=None) -> str:
    """Write ``model`` (a plain GPT: no LoRA or 4-bit layers left) as a Hugging Face GPT-2
    folder: ``config.json`` and ``model.safetensors`` (keys ``transformer.*``, Conv1D weights
    transposed back to (in, out), tied ``lm_head`` left out), plus ``vocab.json`` and
    ``merges.txt`` when ``tokenizer`` is a GPT2Tokenizer. A model built without biases
    (``GPTConfig(bias=False)``) gets zero biases, which compute the same function. Each file
    is replaced atomically, weights first and config.json last. Returns the folder."""
    from ..data.gpt2_bpe import GPT2Tokenizer

    config = model.config
    ours = model.state_dict()
    plain = {f"transformer.{m}.weight" for m in ("wte", "wpe", "ln_f")} | {"lm_head.weight"} | {
        f"transformer.h.{i}.{m}.weight" for i in range(config.n_layer)
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")}
    extra = [k for k in ours if k not in plain and not k.endswith(".bias")]
    if extra or not plain <= set(ours):
        raise ValueError(f"save_hf: {(extra or sorted(plain - set(ours)))[0]!r} is not a plain GPT-2 "
                         "weight (a LoRA or 4-bit layer?); call lora.merge_and_unload(model, "
                         "dequantize=True) first")
    wte = ours["transformer.wte.weight"]
    if ours["lm_head.weight"] is not wte and not np.array_equal(
            to_numpy(ours["lm_head.weight"].data), to_numpy(wte.data)):
        raise ValueError("save_hf: lm_head.weight differs from transformer.wte.weight; GPT-2 "
                         "ties them (tie_word_embeddings), so this model has no GPT-2 folder")
    like = model.transformer.wte.weight.data
    dtype = str(like.dtype)
    if dtype not in ("float32", "float64", "float16"):
        raise ValueError(f"save_hf: weights of dtype {dtype} cannot be written for transformers")
    C = config.n_embd
    tensors = {}
    for k, t in ours.items():
        if k == "lm_head.weight":
            continue
        a = t.data
        tensors[k] = a.T if k.endswith(_CONV1D) else a     # Linear (out, in) -> Conv1D (in, out)
    widths = {"ln_1": C, "ln_2": C, "attn.c_attn": 3 * C, "attn.c_proj": C,
              "mlp.c_fc": 4 * C, "mlp.c_proj": C}
    names = [f"transformer.h.{i}.{m}.bias" for i in range(config.n_layer) for m in widths]
    for name in names + ["transformer.ln_f.bias"]:
        if name not in tensors:                           # bias=False: zero biases, same function
            width = C if name == "transformer.ln_f.bias" else widths[name.split(".", 3)[3][:-5]]
            tensors[name] = np.zeros(width, dtype=dtype)
    folder = make_folder(os.fspath(folder))
    save_safetensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
    is_bpe = isinstance(tokenizer, GPT2Tokenizer)
    if is_bpe:
        save_json(os.path.join(folder, "vocab.json"), tokenizer.encoder)
        atomic_write_text(os.path.join(folder, "merges.txt"),
                          "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.merges))
    save_json(os.path.join(folder, "config.json"),
              hf_config_from_gpt(config, dtype, tokenizer if is_bpe else None))
    return folder
