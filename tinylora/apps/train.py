"""Training runs from the command line's point of view: a character-level model trained on a
built-in corpus or a text file in a run folder, started or resumed (``tinylora train``).

``train_gpt`` builds a GPT; ``apps.llama.train_llama`` a Llama through the same two helpers.
"""
from __future__ import annotations

import os

from .. import backend
from ..checkpoint import resolve_checkpoint
from ..data import TextData
from ..io import load_json
from ..train import TrainConfig, Trainer

__all__ = ["GPT_DEFAULTS", "train_gpt", "resume_settings", "seed_and_train"]


def resume_settings(out_dir, config_cls, model_args: dict, data, train_args: dict, load_tokenizer):
    """What a resumed run keeps from the run in ``out_dir``: ``(checkpoint folder, tokenizer,
    model config, data source, TrainConfig)``, after the checks that it may be resumed as
    asked (the same model and data; train_args override the saved training settings).
    load_tokenizer(folder) reads the run's tokenizer (and checks the checkpoint's kind)."""
    from ..configs import config_from_dict

    if out_dir is None:
        raise ValueError("resume needs the run folder (out_dir) to continue from")
    folder = resolve_checkpoint(out_dir)
    tokenizer = load_tokenizer(folder)
    src = os.path.join(folder, "config.json")
    saved = load_json(src)
    saved_model = config_from_dict(config_cls, saved["model"]["config"], source=src)
    changed = {k: v for k, v in model_args.items() if getattr(saved_model, k) != v}
    if changed:
        raise ValueError(f"cannot change the model when resuming ({', '.join(changed)} differ "
                         f"from {src}); start a new run in another --out folder")
    saved_source = (saved.get("data") or {}).get("source")
    if data is not None and data != saved_source:
        raise ValueError(f"cannot resume on other data: the run was trained on "
                         f"{saved_source!r}, not {data!r}")
    config = config_from_dict(TrainConfig, {**saved["train"], **train_args}, source=src)
    return folder, tokenizer, saved_model, saved_source, config


def seed_and_train(model_cls, model_config, data: TextData, config: TrainConfig, out_dir,
                   resume_from=None):
    """Seed, build ``model_cls(model_config)`` and train it (continuing from the checkpoint
    folder ``resume_from``, if given): ``(model, tokenizer, result)``."""
    backend.manual_seed(config.seed)
    model = model_cls(model_config)
    trainer = Trainer(model, data, config, out_dir)
    if resume_from is not None:
        trainer.resume(resume_from)
    return model, data.tokenizer, trainer.train()


# ----------------------------------------------------------------------------- GPT runs

GPT_DEFAULTS = dict(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=True)


def train_gpt(data: str | None = None, out_dir=None, *, model_args: dict | None = None,
              train_args: dict | None = None, resume: bool = False):
    """Train a character-level GPT on ``builtin:NAME`` or a text file; ``(model, tokenizer, result)``.

    model_args: GPTConfig fields other than vocab_size (which the tokenizer sets), over
    ``GPT_DEFAULTS``. train_args: TrainConfig fields. resume: continue the run in
    ``out_dir`` from its latest checkpoint, with its model, tokenizer, data and training
    config; train_args given here override the saved ones (e.g. a larger max_iters).
    """
    from ..data import CharTokenizer, load_data
    from ..models.gpt import GPT, GPTConfig

    model_args, train_args = dict(model_args or {}), dict(train_args or {})
    tokenizer = None
    if resume:
        folder, tokenizer, model_config, data, config = resume_settings(
            out_dir, GPTConfig, model_args, data, train_args,
            lambda folder: CharTokenizer.from_dict(
                load_json(os.path.join(folder, "config.json"))["tokenizer"]))
    else:
        if data is None:
            raise ValueError("no data: give builtin:NAME or a text file")
        config = TrainConfig(**train_args)
        model_config = None
    block = config.block_size or (model_config.block_size if model_config else
                                  model_args.get("block_size", GPT_DEFAULTS["block_size"]))
    text_data = load_data(data, tokenizer=tokenizer, block_size=block)
    if model_config is None:
        args = {**GPT_DEFAULTS, **model_args}
        if args.pop("vocab_size", text_data.tokenizer.vocab_size) != text_data.tokenizer.vocab_size:
            raise ValueError("vocab_size is set by the tokenizer; leave it out of model_args")
        model_config = GPTConfig(vocab_size=text_data.tokenizer.vocab_size, **args)
    return seed_and_train(GPT, model_config, text_data, config, out_dir,
                          resume_from=folder if resume else None)
