"""Checkpoint folders: written whole or not at all, found again by ``latest.json``.

A training run's folder::

    RUN/
      latest.json                 {"checkpoint": "checkpoints/step-0000500", "step": 500}
      metrics.jsonl               one JSON object per line (see tinylora.train)
      checkpoints/step-0000500/
        model.safetensors         the weights (tied lm_head left out), or what save_model wrote
        config.json               {"format", "version", "model": {"type", "config"},
                                   "tokenizer", "train", "data"}
        optimizer.safetensors     moments by parameter index; JSON state in the metadata
        trainer_state.json        {"step", "tokens_seen", "nonfinite_skipped", "rng",
                                   "evals", "last_train_loss", "data"}

Each checkpoint is written into a hidden temporary folder and renamed into place, and
only then does ``latest.json`` (replaced atomically) point at it: a crash at any moment
leaves the previous checkpoint whole and ``latest.json`` pointing at a complete one.
"""
from __future__ import annotations

import os
import secrets
import shutil

from .io import FormatError, config_from_dict, load_json, load_safetensors, save_json, save_safetensors

__all__ = ["save_checkpoint", "resolve_checkpoint", "save_model_weights", "load_model_weights",
           "load_gpt", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "tinylora-checkpoint"
MODEL_FILE = "model.safetensors"


def save_model_weights(model, folder) -> None:
    """Write ``model.safetensors``: every parameter and buffer, a shared (tied) tensor once."""
    if hasattr(model, "weights_to_save"):
        tensors = model.weights_to_save()
    else:
        tensors, seen = {}, set()
        for k, t in model.state_dict().items():
            if id(t) not in seen:
                seen.add(id(t))
                tensors[k] = t.data
    save_safetensors(os.path.join(folder, MODEL_FILE), tensors, {"format": "tinylora"})


def load_model_weights(model, folder) -> None:
    """Load ``model.safetensors`` from ``folder`` into ``model`` (strict)."""
    path = os.path.join(folder, MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {folder} is not a complete checkpoint")
    tensors, _ = load_safetensors(path)
    if hasattr(model, "load_weights"):
        model.load_weights(tensors, source=path)
        return
    sd = model.state_dict()
    for k, t in sd.items():   # tied names written once: fill in the aliases
        if k not in tensors:
            twin = next((j for j, u in sd.items() if u is t and j in tensors), None)
            if twin is not None:
                tensors[k] = tensors[twin]
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise type(e)(f"{path}: {e}") from None


def _fsync_dir(path) -> None:
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(run_dir, step: int, *, model, optimizer, config: dict, trainer_state: dict,
                    save_model=save_model_weights, keep: int = 2) -> str:
    """Write checkpoint ``step`` under ``run_dir/checkpoints`` and point latest.json at it.

    save_model(model, folder) writes the weights (a LoRA run passes one that writes only the
    adapter). Keeps the newest ``keep`` checkpoints. Returns the checkpoint's path.
    """
    from .optim import save_optimizer

    root = os.path.join(os.fspath(run_dir), "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:07d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    os.makedirs(tmp)
    try:
        save_model(model, tmp)
        save_json(os.path.join(tmp, "config.json"), config)
        save_optimizer(os.path.join(tmp, "optimizer.safetensors"), optimizer)
        save_json(os.path.join(tmp, "trainer_state.json"), trainer_state)
        if os.path.exists(final):   # the same step saved again (e.g. right after a resume)
            old = final + f".old-{secrets.token_hex(3)}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    save_json(os.path.join(os.fspath(run_dir), "latest.json"),
              {"checkpoint": f"checkpoints/{name}", "step": step})
    done = sorted(d for d in os.listdir(root) if d.startswith("step-") and "." not in d)
    for d in done[:-keep] if keep > 0 else []:
        if d != name:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return final


def resolve_checkpoint(path) -> str:
    """A checkpoint folder from itself or from a run folder (via latest.json)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "trainer_state.json")) or \
            os.path.isfile(os.path.join(path, "config.json")):
        return path
    latest = os.path.join(path, "latest.json")
    if os.path.isfile(latest):
        info = load_json(latest)
        target = os.path.join(path, info.get("checkpoint", "")) if isinstance(info, dict) else ""
        if not os.path.isfile(os.path.join(target, "config.json")):
            raise FormatError(f"{latest} points at {target!r}, which is not a checkpoint folder")
        return target
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    raise FileNotFoundError(f"no checkpoint in {path!r}: expected latest.json (a run folder) or "
                            "config.json (a checkpoint folder)")


def load_gpt(path):
    """``(model, tokenizer, config)`` from a GPT checkpoint (or run folder), weights loaded."""
    from .data import CharTokenizer
    from .models.gpt import GPT, GPTConfig

    folder = resolve_checkpoint(path)
    cfg_path = os.path.join(folder, "config.json")
    config = load_json(cfg_path)
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise FormatError(f"{cfg_path}: not a tinylora checkpoint config (format != "
                          f"{CHECKPOINT_FORMAT!r})")
    model_info = config.get("model") or {}
    if model_info.get("type") != "GPT":
        raise FormatError(f"{cfg_path}: the checkpoint holds a {model_info.get('type')!r} model, "
                          "not a GPT")
    gpt_config = config_from_dict(GPTConfig, model_info.get("config"), source=cfg_path)
    if not config.get("tokenizer"):
        raise FormatError(f"{cfg_path}: no tokenizer recorded; cannot encode a prompt")
    tokenizer = CharTokenizer.from_dict(config["tokenizer"])
    model = GPT(gpt_config)
    load_model_weights(model, folder)
    return model, tokenizer, config
