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
Saving a step that exists already (right after resuming from it) first moves the old
folder to ``step-N.old-*``; after a crash between the two renames ``resolve_checkpoint``
finds that complete copy, and the next save removes it. A crash mid-write may leave a
hidden ``.step-N.tmp-*`` folder behind; it is never read, and saving goes on around it.
"""
from __future__ import annotations

import os
import secrets
import shutil

from .backend import np
from .configs import config_from_dict
from .io import FormatError, load_json, make_folder, read_safetensors_header, save_json
from .nn.weights import MODEL_FILE, load_model_weights, save_model_weights

__all__ = ["save_checkpoint", "resolve_checkpoint", "save_model_weights", "load_model_weights",
           "load_gpt", "save_gpt", "read_trainer_state", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "tinylora-checkpoint"


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

    root = make_folder(os.path.join(os.fspath(run_dir), "checkpoints"), "checkpoint folder")
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
    aside = [d for d in os.listdir(root) if d.startswith("step-") and ".old-" in d]
    for d in (done[:-keep] if keep > 0 else []) + aside:   # aside: left by a crash mid-swap
        if d != name:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return final


def save_gpt(folder, model, tokenizer, extra: dict | None = None) -> str:
    """Write a standalone GPT checkpoint (``model.safetensors`` + ``config.json``) that
    ``load_gpt`` and ``tinylora generate`` read: a fine-tuned or merged model, without the
    optimizer and trainer state of a run. Written into a temporary folder and renamed into
    place, so ``folder`` is either the old checkpoint or the new one, never half of each.
    extra: more JSON for config.json (e.g. how the model was made)."""
    from dataclasses import asdict

    from .lora.protocol import is_quantized
    from .lora.registry import adapter_modules

    left = [p for p, _ in adapter_modules(model)] + [p for p, m in model.named_modules()
                                                      if is_quantized(m)]
    if left:
        raise ValueError(f"save_gpt: {left[0]} is a LoRA or 4-bit layer; a plain checkpoint holds "
                         "float weights only: call lora.merge_and_unload(model, dequantize=True) "
                         "first, or save the adapter with lora.save_adapter")
    config = {"format": CHECKPOINT_FORMAT, "version": 1,
              "model": {"type": type(model).__name__, "config": asdict(model.config)},
              "tokenizer": tokenizer.to_dict(), **(extra or {})}
    final = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(final)
    make_folder(parent)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    os.makedirs(tmp)
    old = None
    try:
        save_model_weights(model, tmp)
        save_json(os.path.join(tmp, "config.json"), config)
        if os.path.exists(final):
            old = final + f".old-{secrets.token_hex(3)}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(parent)
    except BaseException:
        if old and not os.path.exists(final):
            os.rename(old, final)           # put the previous checkpoint back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _moved_aside(folder):
    """The complete previous copy of ``folder`` that a save of the same name moved to
    ``folder.old-*`` just before renaming the new one in (a crash between the two renames
    leaves only it), or None."""
    parent, name = os.path.split(os.path.abspath(folder))
    try:
        names = sorted(n for n in os.listdir(parent) if n.startswith(name + ".old-"))
    except OSError:
        return None
    done = [os.path.join(parent, n) for n in names
            if os.path.isfile(os.path.join(parent, n, "config.json"))]
    return done[-1] if done else None


def resolve_checkpoint(path) -> str:
    """A checkpoint folder from itself or from a run folder (via latest.json)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "trainer_state.json")) or \
            os.path.isfile(os.path.join(path, "config.json")):
        return path
    latest = os.path.join(path, "latest.json")
    if os.path.isfile(latest):
        info = load_json(latest)
        rel = info.get("checkpoint") if isinstance(info, dict) else None
        if not isinstance(rel, str) or not rel:
            raise FormatError(f"{latest}: expected {{\"checkpoint\": \"checkpoints/step-...\", "
                              "\"step\": N}; delete it and pass a checkpoint folder instead")
        target = os.path.join(path, rel)
        if not os.path.isfile(os.path.join(target, "config.json")):
            target = _moved_aside(target)
        if target is None:
            raise FormatError(f"{latest} points at {rel!r}, which is not a checkpoint folder")
        return target
    if not os.path.exists(path):
        aside = _moved_aside(path)
        if aside is not None:
            return aside
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    raise FileNotFoundError(f"no checkpoint in {path!r}: expected latest.json (a run folder) or "
                            "config.json (a checkpoint folder)")


def _check_gpt_weights(folder, cfg, cfg_path) -> None:
    """FormatError when model.safetensors cannot hold a GPT of config ``cfg`` (read from its
    header only), so a corrupt config.json never builds a model of the wrong size."""
    path = os.path.join(folder, MODEL_FILE)
    if not os.path.isfile(path):
        return                                  # load_model_weights says it is missing
    header, _ = read_safetensors_header(path)
    layers = {int(k.split(".")[2]) for k in header
              if k.startswith("transformer.h.") and k.split(".")[2].isdigit()}
    got = {k: tuple(header[k]["shape"]) if k in header else None
           for k in ("transformer.wte.weight", "transformer.wpe.weight")}
    got["n_layer"] = len(layers)
    want = {"transformer.wte.weight": (cfg.vocab_size, cfg.n_embd),
            "transformer.wpe.weight": (cfg.block_size, cfg.n_embd), "n_layer": cfg.n_layer}
    bad = [k for k in want if got[k] != want[k]]
    if bad:
        k = bad[0]
        raise FormatError(f"{cfg_path} does not match {path}: the config implies {k} = {want[k]}, "
                          f"the weights hold {got[k]}; the two files come from different models")


def read_checkpoint_config(path, model_type: str, config_cls):
    """``(folder, config.json's path, its dict, the model's config_cls)`` of a tinylora
    checkpoint (or run folder) that holds a ``model_type`` model ("GPT", "Llama")."""
    folder = resolve_checkpoint(path)
    cfg_path = os.path.join(folder, "config.json")
    config = load_json(cfg_path)
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise FormatError(f"{cfg_path}: not a tinylora checkpoint config (format != "
                          f"{CHECKPOINT_FORMAT!r})")
    model_info = config.get("model")
    kind = model_info.get("type") if isinstance(model_info, dict) else None
    if kind != model_type:
        raise FormatError(f"{cfg_path}: the checkpoint holds a {kind!r} model, not a {model_type}")
    return folder, cfg_path, config, config_from_dict(config_cls, model_info.get("config"),
                                                      source=cfg_path)


def load_gpt(path):
    """``(model, tokenizer, config)`` from a GPT checkpoint (or run folder), weights loaded."""
    from .data import CharTokenizer
    from .models.gpt import GPT, GPTConfig

    folder, cfg_path, config, gpt_config = read_checkpoint_config(path, "GPT", GPTConfig)
    if not config.get("tokenizer"):
        raise FormatError(f"{cfg_path}: no tokenizer recorded; cannot encode a prompt")
    bpe = isinstance(config["tokenizer"], dict) and config["tokenizer"].get("type") == "gpt2-bpe"
    try:
        if bpe:    # a model fine-tuned from a Hugging Face GPT-2 keeps its BPE tokenizer
            from .data.gpt2_bpe import GPT2Tokenizer
            tokenizer = GPT2Tokenizer.from_dict(config["tokenizer"])
        else:
            tokenizer = CharTokenizer.from_dict(config["tokenizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{cfg_path}: {e}") from None
    if tokenizer.vocab_size > gpt_config.vocab_size or (
            not bpe and tokenizer.vocab_size != gpt_config.vocab_size):
        raise FormatError(f"{cfg_path}: the tokenizer has {tokenizer.vocab_size} characters but "
                          f"the model's vocab_size is {gpt_config.vocab_size}; the config is corrupt")
    _check_gpt_weights(folder, gpt_config, cfg_path)   # before allocating a model of that size
    model = GPT(gpt_config)
    load_model_weights(model, folder)
    return model, tokenizer, config


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_trainer_state(path) -> dict:
    """trainer_state.json, checked field by field (FormatError naming the file and field)."""
    state = load_json(path)
    if not isinstance(state, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(state).__name__}")
    for key in ("step", "tokens_seen", "nonfinite_skipped"):
        if not _is_count(state.get(key)):
            raise FormatError(f"{path}: {key!r} must be an integer >= 0, got {state.get(key)!r:.40}")
    if not isinstance(state.get("evals"), list):
        raise FormatError(f"{path}: 'evals' must be a list, got {state.get('evals')!r:.40}")
    loss = state.get("last_train_loss")
    if loss is not None and not (isinstance(loss, (int, float)) and not isinstance(loss, bool)):
        raise FormatError(f"{path}: 'last_train_loss' must be a number or null, got {loss!r:.40}")
    rng = state.get("rng")
    try:   # each stream's state must be one a generator accepts (tried on a scratch one)
        if not (isinstance(rng, dict) and _is_count(rng.get("seed"))):
            raise ValueError("it needs 'seed', 'host' and 'device'")
        for stream in ("host", "device"):
            if rng.get(stream) is not None or stream == "host":
                np.random.default_rng().bit_generator.state = rng[stream]
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise FormatError(f"{path}: 'rng' is not a saved random-generator state ({e})") from None
    return state
