"""Llama-family models in the applications: load a Hugging Face folder with its tokenizer,
turn text or instruction JSONL into batches, write the folders transformers reads, and
train a toy Llama from scratch.

    model, tok, folder = load_llama_pretrained("SmolLM2-135M")   # config.json, *.safetensors, tokenizer.json
    data = load_llama_data("train.jsonl", tok, block_size=256)    # InstructionBatches (loss on responses)
    data = load_llama_data("builtin:prose", tok, block_size=256)  # TextData (random windows)
    save_llama_folder(model, "out/merged", tokenizer_from=folder) # config.json + model.safetensors + tokenizer
    model, tok, result = train_llama("builtin:prose", "runs/llama")  # a character-level toy Llama

``tinylora finetune/generate/merge --pretrained DIR`` pick this path when ``DIR/config.json``
names ``model_type`` "llama" or "qwen2" (``is_llama_folder``); anything else there is GPT-2.
"""
from __future__ import annotations

import hashlib
import os

from .. import backend
from ..backend import np
from ..checkpoint import load_model_weights, read_checkpoint_config, resolve_checkpoint
from ..data import CharTokenizer, TextData, builtin_text, load_text, train_val_split
from ..data.instruct import IGNORE, InstructionData
from ..io import FormatError, atomic_write_bytes, load_json
from ..models.llama import MODEL_TYPES, Llama, LlamaConfig
from ..tensor import no_grad
from ..train import TrainConfig
from .train import resume_settings, seed_and_train

__all__ = ["hf_model_type", "is_llama_folder", "load_llama_pretrained", "need_tokenizer",
           "eos_token_ids",
           "load_llama_data", "InstructionBatches", "instruction_loss", "save_llama_folder",
           "LLAMA_DEFAULTS", "train_llama", "checkpoint_model_type", "load_llama_checkpoint"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def hf_model_type(folder):
    """``model_type`` of a Hugging Face folder's config.json, or None (no such file, or a
    tinylora checkpoint's config.json, which has a "format" instead)."""
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(path):
        return None
    d = load_json(path)
    return d.get("model_type") if isinstance(d, dict) and "format" not in d else None


def is_llama_folder(folder) -> bool:
    return hf_model_type(folder) in MODEL_TYPES


def load_llama_pretrained(folder):
    """``(model, tokenizer, folder)`` of a Hugging Face Llama/Qwen2 folder: config.json,
    model.safetensors (or shards) and tokenizer.json (tokenizer None without one: merging
    needs none; ``need_tokenizer`` says so where one is needed)."""
    from ..data.bpe import BPETokenizer
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"pretrained model folder {folder!r} does not exist")
    has_tok = os.path.isfile(os.path.join(folder, "tokenizer.json"))
    tok = BPETokenizer.from_pretrained(folder) if has_tok else None
    model = Llama.from_hf(folder)
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{folder}: tokenizer.json has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embeddings; it belongs to another model")
    return model, tok, folder


def need_tokenizer(tok, folder):
    """``tok``, or a clear error when the folder came without tokenizer.json."""
    if tok is None:
        raise FileNotFoundError(f"{folder}: tokenizer.json is missing; download it with the "
                                "model (the Hub repo's tokenizer.json next to config.json)")
    return tok


def eos_token_ids(folder):
    """The end-of-sequence id(s) that generation stops at: generation_config.json's, else
    config.json's ``eos_token_id`` (None when neither names one)."""
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(os.fspath(folder), name)
        if os.path.isfile(path):
            d = load_json(path)
            eos = d.get("eos_token_id") if isinstance(d, dict) else None
            if eos is not None and eos != []:
                return eos
    return None


# ----------------------------------------------------------------------------- data

class InstructionBatches:
    """Training batches of instruction records for ``Trainer`` (a batch source): rows drawn
    from the host RNG stream, right-padded, targets -100 outside the responses."""

    def __init__(self, train: InstructionData, val: InstructionData | None, source: str):
        self.train, self.val, self.source = train, val, source

    def train_batch(self, batch_size: int):
        return self.train.sample(batch_size, backend.host_rng())


def load_llama_data(spec: str, tokenizer, block_size: int, val_fraction: float = 0.1):
    """``spec`` for a Llama: a ``.jsonl`` file of instruction records -> InstructionBatches
    (a tenth of the records, at least one, held out when there are ten or more); else
    ``builtin:NAME`` or a text file -> TextData, encoded with ``tokenizer``."""
    if spec.endswith(".jsonl"):
        data = InstructionData.from_jsonl(spec, tokenizer, max_len=block_size)
        ex = data.examples
        n_val = max(1, int(len(ex) * val_fraction)) if len(ex) >= 10 else 0
        val = InstructionData(ex[len(ex) - n_val:]) if n_val else None
        return InstructionBatches(InstructionData(ex[:len(ex) - n_val]), val, spec)
    text = builtin_text(spec[len("builtin:"):]) if spec.startswith("builtin:") else load_text(spec)
    if isinstance(tokenizer, CharTokenizer):   # a toy Llama's characters
        ids = tokenizer.encode(text)
    else:
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)
    train, val = train_val_split(ids, val_fraction)
    for split, arr in (("training", train), ("validation", val)):
        if len(arr) < block_size + 1:
            raise ValueError(f"data {spec!r} is too short: its {split} split has {len(arr)} "
                             f"tokens but block_size + 1 = {block_size + 1} are needed; use a "
                             "smaller --block-size or a longer text")
    sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return TextData(spec, sha, tokenizer, train, val)


def instruction_loss(model, data: InstructionData, batch_size: int) -> float:
    """Mean cross-entropy over every response token of ``data`` (eval mode, no graph)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with no_grad():
            for i in range(0, len(data.examples), batch_size):
                idx, tgt = data.batch(range(i, min(i + batch_size, len(data.examples))))
                n = int((tgt != IGNORE).sum())
                if n:
                    total += float(model(idx, tgt)[1].item()) * n
                    count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- writing

def save_llama_folder(model, out, tokenizer_from=None) -> str:
    """A Hugging Face folder (config.json + model.safetensors, float32) that transformers
    and ``Llama.from_hf`` load, with the tokenizer files of ``tokenizer_from`` copied."""
    model.save_pretrained(out)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(os.fspath(tokenizer_from), name)
            if os.path.isfile(src):
                with open(src, "rb") as f:
                    atomic_write_bytes(os.path.join(os.fspath(out), name), f.read())
    return os.fspath(out)


# ----------------------------------------------------------------------------- a toy Llama

# a small GQA Llama, tied head; intermediate_size None = about 8/3·hidden_size (as Llama's)
LLAMA_DEFAULTS = dict(max_position_embeddings=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, hidden_size=128, intermediate_size=None,
                      attention_dropout=0.0, tie_word_embeddings=True)


def checkpoint_model_type(path):
    """The model class name a tinylora checkpoint (or run folder) holds ("GPT", "Llama")."""
    folder = resolve_checkpoint(path)
    cfg = load_json(os.path.join(folder, "config.json"))
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return model.get("type") if isinstance(model, dict) else None


def load_llama_checkpoint(path):
    """``(model, tokenizer, config)`` of a Llama checkpoint written by ``train_llama``."""
    folder, cfg_path, config, llama_config = read_checkpoint_config(path, "Llama", LlamaConfig)
    try:
        tok = CharTokenizer.from_dict(config.get("tokenizer"))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{cfg_path}: no usable tokenizer recorded ({e})") from None
    if tok.vocab_size != llama_config.vocab_size:
        raise FormatError(f"{cfg_path}: the tokenizer has {tok.vocab_size} characters but the "
                          f"model's vocab_size is {llama_config.vocab_size}; the config is corrupt")
    model = Llama(llama_config)
    load_model_weights(model, folder)
    return model, tok, config


def _llama_config(vocab_size: int, args: dict) -> LlamaConfig:
    args = {**LLAMA_DEFAULTS, **args}
    if args["intermediate_size"] is None:   # 8/3·C (SwiGLU keeps the MLP's parameter count), ×32
        args["intermediate_size"] = -(-8 * args["hidden_size"] // 3 // 32) * 32
    if args["hidden_size"] % args["num_attention_heads"]:
        raise ValueError(f"--n-embd {args['hidden_size']} must be divisible by --n-head "
                         f"{args['num_attention_heads']}")
    return LlamaConfig(vocab_size=vocab_size, **args)


def train_llama(data: str | None = None, out_dir=None, *, model_args: dict | None = None,
                train_args: dict | None = None, resume: bool = False):
    """Train a character-level Llama on ``builtin:NAME`` or a text file, as ``train_gpt``
    trains a GPT: ``(model, tokenizer, result)``. model_args: LlamaConfig fields over
    ``LLAMA_DEFAULTS`` (the training window is max_position_embeddings). resume: continue
    the run in ``out_dir`` with its saved model, tokenizer, data and training config."""
    from ..data import load_data

    model_args, train_args = dict(model_args or {}), dict(train_args or {})
    tokenizer = None
    if resume:
        folder, tokenizer, model_config, data, config = resume_settings(
            out_dir, LlamaConfig, model_args, data, train_args,
            lambda folder: load_llama_checkpoint(folder)[1])
    else:
        if data is None:
            raise ValueError("no data: give builtin:NAME or a text file")
        model_config = None
        block = model_args.get("max_position_embeddings", LLAMA_DEFAULTS["max_position_embeddings"])
        config = TrainConfig(**{"block_size": block, **train_args})
    text_data = load_data(data, tokenizer=tokenizer, block_size=config.block_size)
    if model_config is None:
        model_config = _llama_config(text_data.tokenizer.vocab_size, model_args)
    return seed_and_train(Llama, model_config, text_data, config, out_dir,
                          resume_from=folder if resume else None)
