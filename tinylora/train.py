"""The training loop: batches, accumulation, clipping, LR schedule, eval, checkpoints, resume.

``Trainer`` trains any Module whose ``forward(x, y)`` returns ``(logits, loss)``, updating
only parameters that require grad, so a LoRA fine-tune reuses it unchanged: pass the
prepared model, its optimizer and a ``save_model`` that writes only the adapter. Besides
text (random windows of a token array), it takes any batch source: an object whose
``train_batch(batch_size)`` returns the model's inputs (a tuple, or a dict of keyword
arguments) with the loss second in what the model returns (the MiniLM classifier's batches
of sentences and labels, for one). It is the one training loop of the package.

Reproducible by construction: a fresh run reseeds both RNG streams with ``config.seed`` at
step 0; batches come from the host stream, dropout from the device stream, and both states
go into every checkpoint, so on the CPU a resumed run repeats the uninterrupted run's losses
and weights bit for bit. Validation batches come from their own fixed generator, so every
evaluation sees the same windows and evaluating does not shift the training batches.
While it trains, BLAS uses the cores free now (blas.FreeCores) unless a count was chosen.

``metrics.jsonl`` (in the run folder) has one JSON object per line:
  {"event": "train", "step", "train_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
  {"event": "eval", "step", "train_loss", "val_loss"}       (estimates over eval_iters batches)
  {"event": "skip", "step", "reason"}                       (a non-finite step skipped)
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field

from . import backend
from .backend import np
from .blas import training_threads
from .checkpoint import (CHECKPOINT_FORMAT, load_model_weights, read_trainer_state,
                         resolve_checkpoint, save_checkpoint, save_model_weights)
from .data import TextData, get_batch
from .hints import Fix, hinted
from .io import FormatError, atomic_write_text, load_json, make_folder
from .optim import AdamW, clip_grad_norm_, cosine_lr, grad_norm, load_optimizer, param_groups
from .tensor import no_grad

__all__ = ["TrainConfig", "Trainer", "TrainResult", "NonFiniteError", "TrainingInterrupted",
           "estimate_loss"]


@dataclass
class TrainConfig:
    max_iters: int = 2000            # optimizer steps in all (a resumed run continues to this)
    batch_size: int = 12
    block_size: int | None = None    # window length; None = the model's config.block_size
    grad_accum_steps: int = 1        # micro-batches summed into one step
    lr: float = 1e-3
    min_lr: float | None = None      # floor of the cosine decay; None = lr / 10
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # the cosine ends here; None = max_iters
    weight_decay: float = 0.1        # on matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0           # max global grad norm; 0 = no clipping
    eval_interval: int = 250         # 0 = never evaluate
    eval_iters: int = 20
    log_interval: int = 10
    checkpoint_interval: int | None = None  # None = eval_interval; 0 = only at the end
    keep_checkpoints: int = 2
    seed: int = 0                    # the same default as every command's --seed
    skip_nonfinite: bool = False     # skip (and count) steps whose loss or gradient is NaN/Inf
    progress: bool = True            # tqdm bar on stderr

    def __post_init__(self):
        # each message names the field as TrainConfig.NAME, which a command shows as its flag
        for name in ("batch_size", "grad_accum_steps", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise _field_error(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_iters", "eval_interval", "warmup_iters"):
            if getattr(self, name) < 0:
                raise _field_error(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise _field_error("lr", f"must be > 0 and finite, got {self.lr}")


def _field_error(name: str, problem: str) -> ValueError:
    return hinted(ValueError(f"TrainConfig.{name} {problem}"), Fix(name, f"TrainConfig.{name}"))


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/Inf; ``.step`` and ``.checkpoint`` say where to go back."""

    def __init__(self, msg: str, step: int, checkpoint: str | None):
        super().__init__(msg)
        self.step, self.checkpoint = step, checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM during ``Trainer.train``: the step that was running finished,
    and a checkpoint of it was written (when the trainer has a run folder)."""

    def __init__(self, step: int, checkpoint: str | None, signame: str):
        self.step, self.checkpoint, self.signame = step, checkpoint, signame
        where = f"; checkpoint {checkpoint}" if checkpoint else "; no run folder, nothing saved"
        super().__init__(f"{signame} at step {step}{where}")


class _StopRequests:
    """While training, the first SIGINT/SIGTERM only asks to stop (``.signal`` is read after
    each step), so the step finishes and a checkpoint is written; a second one stops at once
    (KeyboardInterrupt), leaving the last checkpoint whole (saves are atomic)."""

    def __init__(self):
        self.signal, self._old = None, {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return                                   # handlers can only be set in the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old = {}

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name


@dataclass
class TrainResult:
    step: int                                    # optimizer steps completed
    losses: dict = field(default_factory=dict)   # step -> training loss of that step (this run)
    evals: list = field(default_factory=list)    # {"step", "train_loss", "val_loss"}
    skipped: int = 0
    tokens_seen: int = 0
    checkpoint: str | None = None                # the last checkpoint written
    elapsed_s: float = 0.0
    start_step: int = 0                          # where this call began (> 0 on a resume)

    @property
    def val_loss(self):
        return self.evals[-1]["val_loss"] if self.evals else None


def estimate_loss(model, splits: dict, batch_size: int, block_size: int, eval_iters: int,
                  seed: int = 0) -> dict:
    """Mean loss over ``eval_iters`` batches of each split, in eval mode without a graph.
    Batches come from ``np.random.default_rng([seed, i])``: the same windows on every call."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        with no_grad():
            for i, (name, data) in enumerate(splits.items()):
                rng = np.random.default_rng([seed, i])
                total = None   # summed on the device in float64: one host read per split
                for _ in range(eval_iters):
                    x, y = get_batch(data, block_size, batch_size, rng)
                    loss = model(x, y)[1].data.astype("float64")
                    total = loss if total is None else total + loss
                out[name] = float(total) / eval_iters
    finally:
        model.train(was_training)
    return out


class Trainer:
    """Trains ``model`` on ``data`` (a TextData, or a (train, val) pair of token arrays).

    out_dir: the run folder for checkpoints and metrics.jsonl (None: keep nothing on disk).
    optimizer: default AdamW over the trainable parameters (decay on ndim >= 2 only). Each
    param group's lr follows the warmup + cosine schedule scaled by its initial lr / config.lr.
    save_model / load_model: ``fn(model, folder)`` writing / reading the weights of a
    checkpoint (default: model.safetensors with every weight).
    run_config: extra JSON merged into each checkpoint's config.json (e.g. a LoRA config).
    on_step: ``fn(trainer)`` called after every optimizer step (timing, logging).

    ``data`` may instead be a batch source (see the module docstring): training draws its
    batches from ``data.train_batch(batch_size)``; evaluation (text only) is then off.
    """

    def __init__(self, model, data, config: TrainConfig | None = None, out_dir=None, *,
                 optimizer=None, save_model=None, load_model=None, run_config: dict | None = None,
                 on_step=None):
        self.model, self.config = model, config or TrainConfig()
        cfg = self.config
        self.source = data if hasattr(data, "train_batch") else None
        self.data = data if isinstance(data, TextData) else None
        model_cfg = getattr(model, "config", None)
        if self.source is not None:
            if cfg.eval_interval:
                raise ValueError("Trainer: a batch source has no validation windows; set "
                                 "TrainConfig.eval_interval=0 and evaluate the model yourself")
            self.train_data = self.val_data = None
            self.block_size = cfg.block_size
        else:
            self.train_data, self.val_data = (data.train, data.val) if self.data else data
            self.block_size = cfg.block_size or getattr(model_cfg, "block_size", None)
            if not self.block_size:
                raise ValueError("Trainer: set TrainConfig.block_size (the model has no "
                                 "config.block_size)")
            for name, arr in (("training", self.train_data), ("validation", self.val_data)):
                if len(arr) < self.block_size + 1:
                    raise ValueError(f"the {name} data has {len(arr)} tokens, fewer than "
                                     f"block_size + 1 = {self.block_size + 1}; use a smaller "
                                     "block size or more text")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if optimizer is None:
            optimizer = AdamW(param_groups(self.params, cfg.weight_decay), lr=cfg.lr,
                              betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        self.optimizer = optimizer
        # each group follows the schedule in proportion to its own starting lr (a LoRA+ style
        # group with 4x the lr keeps 4x); groups built from config.lr follow it exactly
        self._lr_scale = [g["lr"] / cfg.lr for g in optimizer.param_groups]
        self.out_dir = None if out_dir is None else os.fspath(out_dir)
        self.save_model = save_model or save_model_weights
        self.load_model = load_model or load_model_weights
        self.run_config = run_config or {}
        self.on_step = on_step
        self._source_tokens = 0         # tokens of a batch source's batches in this step
        self.step, self.tokens_seen, self.skipped = 0, 0, 0
        self.evals, self.last_loss = [], None
        self.checkpoint = None          # the last checkpoint written or resumed from
        self._resumed = False

    # ------------------------------------------------------------------ schedule & files
    def lr_at(self, step: int) -> float:
        c = self.config
        min_lr = c.lr / 10 if c.min_lr is None else c.min_lr
        return cosine_lr(step, c.warmup_iters, c.lr_decay_iters or c.max_iters, c.lr, min_lr)

    def checkpoint_config(self) -> dict:
        model_cfg = getattr(self.model, "config", None)
        return {"format": CHECKPOINT_FORMAT, "version": 1,
                "model": {"type": type(self.model).__name__,
                          "config": asdict(model_cfg) if model_cfg is not None else None},
                "tokenizer": self.data.tokenizer.to_dict() if self.data else None,
                "train": asdict(self.config),
                "data": self.data.info() if self.data else None,
                **self.run_config}

    def save(self) -> str:
        state = {"step": self.step, "tokens_seen": self.tokens_seen,
                 "nonfinite_skipped": self.skipped, "rng": backend.get_rng_state(),
                 "evals": self.evals, "last_train_loss": self.last_loss,
                 "data": {"sampling": "random windows drawn from the host RNG stream (see rng)",
                          "batches_drawn": self.step * self.config.grad_accum_steps}}
        self.checkpoint = save_checkpoint(self.out_dir, self.step, model=self.model,
                                          optimizer=self.optimizer, config=self.checkpoint_config(),
                                          trainer_state=state, save_model=self.save_model,
                                          keep=self.config.keep_checkpoints)
        return self.checkpoint

    def resume(self, path=None) -> str:
        """Restore weights, optimizer, step and RNG from a checkpoint (default: the run
        folder's latest). Returns the checkpoint folder. On any error (FormatError for a
        damaged file) the trainer, its model and its optimizer are left as they were."""
        folder = resolve_checkpoint(path if path is not None else self.out_dir)
        cfg_path = os.path.join(folder, "config.json")
        saved = load_json(cfg_path)
        if not isinstance(saved, dict) or not isinstance(saved.get("data") or {}, dict):
            raise FormatError(f"{cfg_path}: not a tinylora checkpoint config (expected a JSON "
                              "object as tinylora.checkpoint writes)")
        if self.data and saved.get("data") and saved["data"].get("sha256") != self.data.sha256:
            raise ValueError(f"cannot resume from {folder}: it was trained on "
                             f"{saved['data'].get('source')!r} with different content (SHA-256 "
                             "mismatch); resume with the same data")
        state = read_trainer_state(os.path.join(folder, "trainer_state.json"))
        undo = _snapshot(self.model, self.optimizer)
        try:
            self.load_model(self.model, folder)
            load_optimizer(os.path.join(folder, "optimizer.safetensors"), self.optimizer)
        except BaseException:
            _restore(undo)
            raise
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped, self.evals = state["nonfinite_skipped"], list(state["evals"])
        self.last_loss = state.get("last_train_loss")
        backend.set_rng_state(state["rng"])
        self.checkpoint, self._resumed = folder, True
        if self.out_dir:
            self._truncate_metrics()
        return folder

    def _truncate_metrics(self) -> None:
        """Drop metrics logged after the checkpoint we resume from (they will be redone)."""
        path = os.path.join(self.out_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            return
        keep = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= self.step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass                              # a line torn by a crash mid-write
        atomic_write_text(path, "".join(keep))

    def _log(self, record: dict) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    # ------------------------------------------------------------------ the loop
    def evaluate(self) -> dict:
        c = self.config
        training_threads.check()   # evaluation is a phase of its own: check before and after
        est = estimate_loss(self.model, {"train": self.train_data, "val": self.val_data},
                            c.batch_size, self.block_size, c.eval_iters, c.seed)
        training_threads.check()
        rec = {"step": self.step, "train_loss": est["train"], "val_loss": est["val"]}
        self.evals.append(rec)
        self._log({"event": "eval", **rec})
        return rec

    def train(self) -> TrainResult:
        from tqdm.auto import tqdm

        c = self.config
        backend.tune_malloc()   # keep freed arrays in the heap: see backend (opt-out env var)
        if self.step == 0 and not self._resumed:
            backend.manual_seed(c.seed)
        self._metrics = None
        if self.out_dir:
            make_folder(self.out_dir, "run folder")
            path = os.path.join(self.out_dir, "metrics.jsonl")
            try:
                self._metrics = open(path, "a", encoding="utf-8")
            except OSError as e:
                raise OSError(e.errno, f"cannot write {path!r} ({e.strerror}) — choose a run "
                                       "folder you can write to") from None
        ckpt_every = c.eval_interval if c.checkpoint_interval is None else c.checkpoint_interval
        result = TrainResult(step=self.step, skipped=self.skipped, start_step=self.step)
        # text: batch_size windows of block_size tokens; a batch source's batches are counted
        tokens_per_step = c.batch_size * self.block_size * c.grad_accum_steps if self.block_size else 0
        bar = tqdm(total=c.max_iters, initial=self.step, disable=not c.progress, unit="step",
                   dynamic_ncols=True, leave=True)
        t_start = t_log = time.perf_counter()
        tokens_since_log = 0
        # On a GPU, reading the loss every step would stall it: steps run ahead and their
        # (loss, grad norm) pairs wait on the device until the next log, eval or save, where
        # one transfer reads them all and checks them for NaN/Inf. Skipping a non-finite step
        # must decide before the update, so skip_nonfinite reads every step, as on the CPU.
        deferred = backend.on_device() and not c.skip_nonfinite
        pending = []                                   # (step, loss sum, grad norm) on the device
        self.model.train()
        stop = _StopRequests()
        stop.install()
        try:
            training_threads.start()                   # BLAS threads: the cores free now
            if self.step == 0 and c.eval_interval and c.max_iters:
                self.evaluate()
            while self.step < c.max_iters:
                lr = self.lr_at(self.step)
                for g, scale in zip(self.optimizer.param_groups, self._lr_scale):
                    g["lr"] = lr * scale
                self._source_tokens = 0
                loss_sum = self._accumulate()
                step_tokens = tokens_per_step or self._source_tokens
                if deferred:
                    norm = clip_grad_norm_(self.params, c.grad_clip, sync=False)
                    finite = True                      # checked when read, below
                else:
                    norm = clip_grad_norm_(self.params, c.grad_clip)   # a float: one sync
                    loss = float(loss_sum) / c.grad_accum_steps
                    finite = math.isfinite(loss) and math.isfinite(norm)
                if finite:
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                    self.step += 1
                    self.tokens_seen += step_tokens
                    if deferred:
                        pending.append((self.step, loss_sum, norm))
                    else:
                        self.last_loss = result.losses[self.step] = loss
                else:
                    self._nonfinite(loss, norm)        # raises, or counts the step as skipped
                tokens_since_log += step_tokens
                bar.update(1)
                training_threads.tick()                # a re-check every few seconds
                end = self.step == c.max_iters
                log_due = finite and (self.step % c.log_interval == 0 or end)
                eval_due = c.eval_interval and (self.step % c.eval_interval == 0 or end)
                save_due = self.out_dir and ((ckpt_every and self.step % ckpt_every == 0) or end)
                if pending and (log_due or eval_due or save_due):
                    loss, norm = self._read_pending(pending, result)   # raises on NaN/Inf
                if log_due:
                    now = time.perf_counter()
                    tps = tokens_since_log / max(now - t_log, 1e-9)
                    t_log, tokens_since_log = now, 0
                    self._log({"event": "train", "step": self.step, "train_loss": loss, "lr": lr,
                               "grad_norm": norm, "tokens_per_s": tps,
                               "elapsed_s": now - t_start})
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
                if eval_due:
                    rec = self.evaluate()
                    if c.progress:
                        bar.write(f"step {self.step}: train loss {rec['train_loss']:.4f}, "
                                  f"val loss {rec['val_loss']:.4f}")
                if save_due:
                    self.save()
                if self.on_step is not None and finite:
                    self.on_step(self)
                if stop.signal is not None and not end:
                    if pending:
                        self._read_pending(pending, result)
                    if self.out_dir and not save_due:
                        self.save()
                    raise TrainingInterrupted(self.step, self.checkpoint if self.out_dir else None,
                                              stop.signal)
        finally:
            training_threads.stop()
            stop.restore()
            bar.close()
            if self._metrics is not None:
                self._metrics.close()
        result.step, result.skipped, result.tokens_seen = self.step, self.skipped, self.tokens_seen
        result.evals = list(self.evals)
        result.checkpoint = self.checkpoint
        result.elapsed_s = time.perf_counter() - t_start
        return result

    def _accumulate(self):
        """Forward and backward over grad_accum_steps micro-batches; the micro-batch losses'
        sum as a 0-d device array (no sync; the mean loss is float(sum) / grad_accum_steps).
        A batch source's batches count their first input's size as the step's tokens."""
        c = self.config
        total = None
        for _ in range(c.grad_accum_steps):
            if self.source is None:
                _, loss = self.model(*get_batch(self.train_data, self.block_size, c.batch_size))
            else:
                batch = self.source.train_batch(c.batch_size)
                args = list(batch.values()) if isinstance(batch, dict) else batch
                self._source_tokens += int(args[0].size)
                loss = (self.model(**batch) if isinstance(batch, dict) else self.model(*batch))[1]
            (loss * (1.0 / c.grad_accum_steps)).backward()
            total = loss.data if total is None else total + loss.data
        return total

    def _read_pending(self, pending: list, result: TrainResult) -> tuple:
        """Copy the waiting steps' losses and norms to the host in one transfer, record them,
        and stop at the first non-finite one. Returns the newest (loss, norm)."""
        xp = backend.xp
        f64 = xp.float64
        rows = backend.to_numpy(xp.stack([xp.stack([xp.asarray(t, f64), xp.asarray(n, f64)])
                                          for _, t, n in pending]))
        steps = [s for s, _, _ in pending]
        pending.clear()
        for step, (t, n) in zip(steps, rows.tolist()):
            loss, norm = t / self.config.grad_accum_steps, n
            if not (math.isfinite(loss) and math.isfinite(norm)):
                self._nonfinite(loss, norm, failed=step)   # raises (skipping never defers)
            self.last_loss = result.losses[step] = loss
        return loss, norm

    def _nonfinite(self, loss: float, norm: float, failed: int | None = None) -> None:
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
        failed = self.step + 1 if failed is None else failed
        self.optimizer.zero_grad()
        if self.config.skip_nonfinite:
            self.skipped += 1
            self.step += 1
            self._log({"event": "skip", "step": self.step, "reason": what})
            return
        if self.checkpoint:
            where = (f"the last good checkpoint is {self.checkpoint} "
                     f"(resume from it, perhaps with a lower learning rate)")
        else:
            where = "no checkpoint was saved yet"
        raise hinted(NonFiniteError(f"non-finite {what} at step {failed}; training stopped and "
                                    f"{where}; or set skip_nonfinite=True to skip such steps",
                                    failed, self.checkpoint),
                     Fix("skip_nonfinite", "set skip_nonfinite=True", "pass {flag}"))


# ----------------------------------------------------------------------------- resume helpers

def _snapshot(model, optimizer):
    """What resume may change: every weight's array, the optimizer's state and groups."""
    tensors = {id(t): t for t in model.state_dict().values()}.values()
    return ([(t, t.data.copy()) for t in tensors], optimizer, optimizer.state,
            [dict(g) for g in optimizer.param_groups])


def _restore(undo) -> None:
    arrays, optimizer, opt_state, groups = undo
    for t, a in arrays:
        t.data = a
    optimizer.state = opt_state
    for g, old in zip(optimizer.param_groups, groups):
        g.clear()
        g.update(old)
