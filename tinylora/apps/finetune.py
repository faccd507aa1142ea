"""Fine-tuning a pretrained GPT three ways — full, LoRA, QLoRA — and using the result.

    model, tok, _ = load_base("runs/prose")                      # a tinylora checkpoint
    data = load_data("builtin:python", tokenizer=tok, block_size=model.config.block_size)
    info = prepare(model, "lora", lora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    res = finetune(model, data, TrainConfig(max_iters=300, lr=3e-3))
    # or with checkpoints that hold only the adapter (and resume=True to continue them):
    res = finetune(model, data, cfg, out_dir="out/adapter", **adapter_checkpoints())
    save_finetuned(model, tok, "lora", "out/adapter", base="runs/prose")
    model, tok, meta = load_finetuned("out/adapter")             # base + adapter, ready to generate

``prepare`` changes the model in place: "full" trains every weight; "lora" freezes the base
and injects adapters; "qlora" first replaces the frozen Linear layers by 4-bit NF4 layers
(``quant.quantize_model``), then injects. An adapter folder is PEFT's layout
(``adapter_model.safetensors`` + ``adapter_config.json``, whose ``base_model_name_or_path``
names the base checkpoint) plus ``tinylora_finetune.json``: how it was trained, and
whether the base must be quantized again to use it (quantization is deterministic, so the
re-quantized base is bit-identical to the one the adapter was trained on).
"""
from __future__ import annotations

import os
import time

from .. import lora
from ..lora.adapters import CONFIG_NAME, WEIGHTS_NAME
from ..lora.registry import registry as adapter_registry
from ..checkpoint import load_gpt, resolve_checkpoint, save_gpt
from ..hints import Fix, hinted
from ..io import load_json, save_json
from ..train import TrainConfig, Trainer
from .llama import (checkpoint_model_type, instruction_loss, is_llama_folder,
                    load_llama_checkpoint, load_llama_pretrained)

__all__ = ["METHODS", "FINETUNE_INFO", "load_base", "load_pretrained", "prepare", "finetune",
           "save_finetuned", "load_finetuned", "training_state_bytes", "is_adapter_dir",
           "is_hf_gpt2_folder", "TimedTrainer", "finetune_instructions", "adapter_checkpoints"]

METHODS = ("full", "lora", "qlora")
FINETUNE_INFO = "tinylora_finetune.json"   # our side file in an adapter folder (PEFT ignores it)


def is_hf_gpt2_folder(path) -> bool:
    """A Hugging Face model folder (its config.json names a model_type), not ours."""
    cfg = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg):
        return False
    d = load_json(cfg)
    return isinstance(d, dict) and "model_type" in d and "format" not in d


def load_pretrained(folder):
    """``(model, tokenizer, folder)`` of a Hugging Face GPT-2 folder: config.json,
    model.safetensors, and the tokenizer's vocab.json + merges.txt; or of a Llama-family
    folder (model_type llama or qwen2; ``apps.llama.load_llama_pretrained``)."""
    from ..models.gpt import GPT
    from ..data.gpt2_bpe import GPT2Tokenizer
    folder = os.fspath(folder)
    if is_llama_folder(folder):
        return load_llama_pretrained(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"pretrained model folder {folder!r} does not exist")
    tok = GPT2Tokenizer.from_pretrained(folder)
    model = GPT.from_hf(folder)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embeddings; vocab.json belongs to another model")
    return model, tok, folder


def load_base(base):
    """``(model, tokenizer, folder)`` of a base model: a tinylora checkpoint or run folder,
    or a Hugging Face GPT-2 folder (``load_pretrained``)."""
    if base is None:
        raise _needs_base(ValueError("no base model: give a checkpoint folder or run folder "
                                     "(base=...)"))
    if is_hf_gpt2_folder(base):
        return load_pretrained(base)
    if checkpoint_model_type(base) == "Llama":   # a toy Llama trained by `tinylora train`
        model, tok, _ = load_llama_checkpoint(base)
        return model, tok, resolve_checkpoint(base)
    model, tok, _ = load_gpt(base)
    return model, tok, resolve_checkpoint(base)


def _needs_base(exc):
    """An error whose fix is to name the base model: ``base=...`` here, a flag in the CLI."""
    return hinted(exc, Fix("base", "(base=...)", "({flag})"))


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def prepare(model, method: str, lora_config: lora.LoraConfig | None = None, *,
            quant_kwargs: dict | None = None) -> dict:
    """Make ``model`` ready to fine-tune by ``method``, in place. Returns what it did:
    ``{"method", "trainable", "total", "quantized": QuantReport text or None}``; ``total``
    counts every base weight once (a 4-bit one as in_features·out_features)."""
    from .. import quant
    _check_method(method)
    total = sum(p.data.size for p in model.parameters())
    report = None
    if method == "full":
        model.requires_grad_(True)
    else:
        if lora_config is None:
            raise ValueError(f"method {method!r} needs a lora.LoraConfig")
        if method == "qlora":
            report = str(quant.quantize_model(model, print_fn=None, **(quant_kwargs or {})))
        lora.inject(model, lora_config)
    trainable = sum(p.data.size for p in model.parameters() if p.requires_grad)
    return {"method": method, "trainable": int(trainable), "total": int(total),
            "trainable_pct": 100.0 * trainable / total, "quantized": report}


def training_state_bytes(model, optimizer_slots: int = 2) -> int:
    """Bytes of what training keeps between steps, counted, not measured: every weight and
    buffer once (4-bit codes and scales as stored), plus a gradient and ``optimizer_slots``
    AdamW moments per trainable value. Activations come on top and depend on the batch."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.data.nbytes
    trainable = sum(p.data.nbytes for p in model.parameters() if p.requires_grad)
    return int(total + (1 + optimizer_slots) * trainable)


class TimedTrainer(Trainer):
    """A Trainer that also adds up the seconds (wall and CPU) spent evaluating and the CPU
    seconds of the whole run, so that the time per training step can be reported without the
    evaluations in it. CPU time is this process's: with one BLAS thread it is what the wall
    time would be on an idle core, whatever else the machine is running."""

    eval_seconds = 0.0
    eval_cpu_seconds = 0.0
    cpu_seconds = 0.0

    def evaluate(self) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return super().evaluate()
        finally:
            self.eval_seconds += time.perf_counter() - t0
            self.eval_cpu_seconds += time.process_time() - c0

    def train(self):
        c0 = time.process_time()
        try:
            return super().train()
        finally:
            self.cpu_seconds += time.process_time() - c0

    def step_times(self, result) -> dict:
        """ms per training step, wall and CPU, evaluations left out."""
        steps = max(result.step - result.start_step, 1)   # this call's steps (resumed: fewer)
        wall = max(result.elapsed_s - self.eval_seconds, 0.0)
        cpu = max(self.cpu_seconds - self.eval_cpu_seconds, 0.0)
        return {"train_seconds": round(wall, 3), "eval_seconds": round(self.eval_seconds, 3),
                "ms_per_step": round(1e3 * wall / steps, 2),
                "cpu_ms_per_step": round(1e3 * cpu / steps, 2)}


def adapter_checkpoints(check_base: bool = True) -> dict:
    """``save_model`` / ``load_model`` for ``finetune`` (or a Trainer) whose checkpoints hold
    only the adapter: PEFT's two files, loaded back into the model's existing adapter in
    place (``lora.load_adapter_weights``), so the optimizer keeps its Parameters. The frozen
    base is not copied into every checkpoint; a resumed run rebuilds it from its folder."""
    def load(model, folder):
        lora.load_adapter_weights(model, folder, check_base=check_base)
    return {"save_model": lora.save_adapter, "load_model": load}


def finetune(model, data, config: TrainConfig, *, out_dir=None, save_model=None,
             load_model=None, run_config: dict | None = None, resume=False) -> dict:
    """Train the prepared ``model`` on ``data`` (a TextData) and report.

    out_dir: a run folder for checkpoints and metrics.jsonl (see tinylora.train); then
    Ctrl-C saves a checkpoint and raises train.TrainingInterrupted, and ``resume=True``
    continues from the latest one exactly (``resume=FOLDER``: from that checkpoint).
    save_model / load_model: how a checkpoint's weights are written and read (default every
    weight; ``adapter_checkpoints()`` for LoRA). run_config: extra JSON for each checkpoint's
    config.json.

    Returns ``{"steps", "start_step", "val_before", "val_after", "train_seconds",
    "eval_seconds", "ms_per_step", "cpu_ms_per_step", "state_bytes", "curve": [(step,
    val_loss)], "evals", "checkpoint"}``; ``val_before`` is the evaluation at step 0 (needs
    ``config.eval_interval`` > 0); the times count this call's steps only."""
    trainer = TimedTrainer(model, data, config, out_dir, save_model=save_model,
                           load_model=load_model, run_config=run_config)
    if resume:
        trainer.resume(None if resume is True else resume)
    result = trainer.train()
    evals = result.evals
    return {"steps": result.step, "start_step": result.start_step,
            "checkpoint": result.checkpoint,
            "val_before": evals[0]["val_loss"] if evals else None,
            "val_after": evals[-1]["val_loss"] if evals else None,
            **trainer.step_times(result), "state_bytes": training_state_bytes(model),
            "curve": [(e["step"], e["val_loss"]) for e in evals], "evals": evals}


def finetune_instructions(model, data, config: TrainConfig) -> dict:
    """``finetune`` on instruction records (``apps.llama.InstructionBatches``): the same
    report, with ``val_before`` / ``val_after`` the loss on the held-out records' responses
    (on the training records when too few were held out; ``config.eval_interval`` is unused)."""
    from dataclasses import replace
    held_out = data.val or data.train
    before = instruction_loss(model, held_out, config.batch_size)
    trainer = TimedTrainer(model, data, replace(config, eval_interval=0, block_size=None))
    result = trainer.train()
    after = instruction_loss(model, held_out, config.batch_size)
    return {"steps": result.step, "val_before": before, "val_after": after,
            **trainer.step_times(result), "state_bytes": training_state_bytes(model),
            "curve": [(0, before), (result.step, after)], "evals": [],
            "val_on": "held-out records" if data.val else "training records"}


def is_adapter_dir(path) -> bool:
    return (os.path.isfile(os.path.join(path, CONFIG_NAME))
            and os.path.isfile(os.path.join(path, WEIGHTS_NAME)))


def save_finetuned(model, tokenizer, method: str, out, *, base=None, extra: dict | None = None,
                   quant_kwargs: dict | None = None) -> str:
    """Save a fine-tuned model: the adapter folder (LoRA, QLoRA) or a standalone checkpoint
    (full). Returns the path of the weights file. ``base``: the base checkpoint, recorded as
    ``base_model_name_or_path`` so that ``load_finetuned`` finds it."""
    _check_method(method)
    out = os.fspath(out)
    base = None if base is None else os.path.abspath(os.fspath(base))
    info = {"format": "tinylora-finetune", "version": 1, "method": method, "base": base,
            "quantize": ({"blocksize": 64, "double_quant": True, "quant_type": "nf4",
                          **(quant_kwargs or {})} if method == "qlora" else None),
            **(extra or {})}
    if method == "full":
        save_gpt(out, model, tokenizer, {"finetune": info})
        return os.path.join(out, "model.safetensors")
    cfg = adapter_registry(model).get("default")
    if cfg is None:
        raise ValueError("save_finetuned: the model has no adapter 'default' (call prepare first)")
    cfg.base_model_name_or_path = base
    lora.save_adapter(model, out)
    save_json(os.path.join(out, FINETUNE_INFO), info)
    return os.path.join(out, WEIGHTS_NAME)


def finetune_info(adapter_dir) -> dict:
    """``tinylora_finetune.json`` of an adapter folder, or {} for a folder PEFT wrote."""
    path = os.path.join(os.fspath(adapter_dir), FINETUNE_INFO)
    return load_json(path) if os.path.isfile(path) else {}


def adapter_base(adapter_dir) -> str | None:
    """The base checkpoint an adapter folder names (its base_model_name_or_path), if any."""
    cfg = load_json(os.path.join(os.fspath(adapter_dir), CONFIG_NAME))
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    return base or finetune_info(adapter_dir).get("base")


def load_finetuned(adapter_dir, base=None, *, check_base: bool = True):
    """``(model, tokenizer, info)``: the base GPT with the adapter in ``adapter_dir`` loaded
    (frozen, for inference). base: the base checkpoint; default the one the adapter names.
    An adapter trained with QLoRA gets its base quantized the same way first."""
    from .. import quant
    adapter_dir = os.fspath(adapter_dir)
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"adapter folder {adapter_dir!r} does not exist")
    if not is_adapter_dir(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir!r} is not an adapter folder: it needs "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    info = finetune_info(adapter_dir)
    base = base or adapter_base(adapter_dir)
    if base is None:
        raise _needs_base(ValueError(f"{adapter_dir}: the adapter names no base model "
                                     "(base_model_name_or_path is empty); give the base "
                                     "checkpoint (base=...)"))
    if not os.path.exists(base):
        raise _needs_base(FileNotFoundError(f"{adapter_dir}: its base model {base!r} does not "
                                            "exist; give the base checkpoint it was trained on "
                                            "(base=...)"))
    model, tok, folder = load_base(base)
    if info.get("quantize"):
        quant.quantize_model(model, print_fn=None, **info["quantize"])
    lora.load_adapter(model, adapter_dir, check_base=check_base)
    return model, tok, {"base": folder, "method": info.get("method", "lora"), **info}

