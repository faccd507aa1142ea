"""Fine-tune the real all-MiniLM-L6-v2 on a built-in task: linear probe vs LoRA vs full.

    from tinylora.apps.classify import compare_finetuning, format_table
    rows = compare_finetuning()          # all-MiniLM-L6-v2 on data.agent_task()
    print(format_table(rows))

Three ways to adapt a pretrained encoder to a classification task, on the same data:

- probe: the encoder stays frozen; only the linear head learns, on mean-pooled embeddings.
- lora: rank-r adapters on the encoder's Linear layers plus the head (``modules_to_save``);
  the pretrained weights stay frozen and the adapter file is about a megabyte.
- full: every weight trains, and all of them (90 MB) must be stored again.

Each reports held-out accuracy, trainable parameters, the size of what must be saved, the
median time per training step and the peak memory allocated while training (the model's
weights excluded; optimizer state, activations and gradients included).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
import tracemalloc
from dataclasses import dataclass

from .. import backend, lora, nn
from .. import functional as F
from ..backend import np, xp
from ..data.agents import agent_task
from ..data.wordpiece import WordPieceTokenizer
from ..models.classify import BertClassifier
from ..models.hub import find_minilm
from ..optim import AdamW
from ..tensor import Tensor, no_grad
from ..train import TrainConfig, Trainer

__all__ = ["FinetuneSettings", "compare_finetuning", "finetune_classifier", "linear_probe", "evaluate",
           "encode_texts", "format_table", "METHODS"]

METHODS = ("probe", "lora", "full")
_TRACED_STEPS = 2  # memory is traced over the first steps only: tracemalloc slows Python


@dataclass
class FinetuneSettings:
    """Hyper-parameters of the comparison; the defaults take about 35 s on 2 CPU cores."""
    steps: int = 60               # optimizer steps for LoRA and for full fine-tuning
    batch_size: int = 16
    max_length: int = 32          # tokens per sentence ([CLS] and [SEP] included)
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    lora_targets: tuple = ("query", "key", "value", "output.dense", "intermediate.dense")
    lora_lr: float = 2e-3
    head_lr: float = 2e-3         # the classifier head in LoRA (modules_to_save)
    full_lr: float = 1e-4
    probe_lr: float = 1e-2
    probe_steps: int = 300        # full-batch steps on the frozen embeddings
    weight_decay: float = 0.01
    warmup: int = 6
    seed: int = 0


def encode_texts(tokenizer: WordPieceTokenizer, texts, max_length: int) -> dict:
    """Host (N, T) ``input_ids`` and ``attention_mask``, padded to the longest text."""
    enc = tokenizer(list(texts), max_length=max_length, padding="longest", truncation=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _batch(arrays: dict, rows) -> tuple:
    """Rows of the host arrays, trimmed to the batch's longest text, on the device."""
    mask = arrays["attention_mask"][rows]
    width = max(int(mask.sum(axis=1).max()), 1)
    return xp.asarray(arrays["input_ids"][rows, :width]), xp.asarray(mask[:, :width])


def _chunks(n: int, size: int):
    return [np.arange(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _accuracy(logits, labels) -> float:
    return float((backend.to_numpy(logits).argmax(axis=1) == np.asarray(labels)).mean())


def evaluate(model: BertClassifier, arrays: dict, labels, batch_size: int = 64) -> float:
    """Accuracy of ``model`` on tokenized texts (eval mode, no graph)."""
    was_training = model.training
    model.eval()
    with no_grad():
        logits = [model(*_batch(arrays, rows))[0].data
                  for rows in _chunks(len(labels), batch_size)]
    model.train(was_training)
    return _accuracy(xp.concatenate(logits), labels)


class _PeakMemory:
    """Peak bytes allocated from ``start()`` to ``stop()``: tracemalloc on the CPU (NumPy
    reports its buffers to it), the memory pool's growth on the GPU."""

    def start(self):
        if backend.is_cuda():
            self.pool = xp.get_default_memory_pool()
            self.base = self.pool.used_bytes()
        else:
            tracemalloc.start()

    def stop(self) -> float:
        if backend.is_cuda():
            return (self.pool.total_bytes() - self.base) / 2**20
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak / 2**20


class _StepMeter:
    """Peak memory over the first ``_TRACED_STEPS`` steps and the time of each later step.
    ``start()`` before the first step, ``step(i)`` after step i (0-based); ``result()`` is
    (median seconds of the untraced steps, peak MB)."""

    def __init__(self, steps: int):
        self.steps, self.mem, self.times, self.peak = steps, _PeakMemory(), [], 0.0

    def start(self):
        self.mem.start()
        self.t0 = time.perf_counter()

    def step(self, i: int):
        dt = time.perf_counter() - self.t0
        if i == min(_TRACED_STEPS, self.steps) - 1:
            self.peak = self.mem.stop()
        elif i >= _TRACED_STEPS:
            self.times.append(dt)
        self.t0 = time.perf_counter()

    def result(self) -> tuple:
        return (statistics.median(self.times) if self.times else float("nan")), self.peak


def _train(model, batches, config: TrainConfig, optimizer, on_log=None) -> tuple:
    """``config.max_iters`` steps of ``train.Trainer`` on a batch source, timed and traced:
    (median seconds of the untraced steps, peak MB)."""
    meter = _StepMeter(config.max_iters)

    def on_step(trainer):
        meter.step(trainer.step - 1)
        if on_log is not None:
            on_log(trainer.step - 1, trainer.last_loss)
    trainer = Trainer(model, batches, config, optimizer=optimizer, on_step=on_step)
    import tqdm.auto  # noqa: F401  (the Trainer's progress bar: imported before tracing starts)
    meter.start()
    trainer.train()
    return meter.result()


class _Probe(nn.Module):
    """The classifier head on fixed embeddings: ``forward(x, y)`` is (logits, loss)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x, y):
        logits = self.head(Tensor(x))
        return logits, F.cross_entropy(logits, y)


class _FullBatch:
    """The whole (embeddings, labels) set as every batch: the probe trains full-batch."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def train_batch(self, batch_size: int) -> tuple:
        return self.x, self.y


class _SentenceBatches:
    """Training batches for ``Trainer``: epochs of a seeded shuffle of the sentences, each
    batch trimmed to its longest text, as the classifier's keyword arguments."""

    def __init__(self, arrays: dict, labels, seed: int):
        self.arrays, self.labels = arrays, np.asarray(labels)
        self.rng = np.random.default_rng(seed)
        self.order = np.array([], dtype=np.int64)

    def train_batch(self, batch_size: int) -> dict:
        if len(self.order) < batch_size:
            self.order = np.concatenate([self.order, self.rng.permutation(len(self.labels))])
        rows, self.order = self.order[:batch_size], self.order[batch_size:]
        ids, mask = _batch(self.arrays, rows)
        return {"input_ids": ids, "attention_mask": mask, "labels": xp.asarray(self.labels[rows])}


def linear_probe(model: BertClassifier, train: dict, y_train, test: dict, y_test,
                 s: FinetuneSettings, progress: bool = False) -> dict:
    """Train only ``model.classifier`` on frozen mean-pooled embeddings (full batch).
    progress: the Trainer's bar on stderr."""
    model.eval()
    with no_grad():
        X_tr, X_te = (xp.concatenate([model.embed(*_batch(a, rows)).data
                                      for rows in _chunks(len(a["input_ids"]), 64)])
                      for a in (train, test))
    head = model.classifier
    opt = AdamW(head.parameters(), lr=s.probe_lr, weight_decay=s.weight_decay)
    y = xp.asarray(np.asarray(y_train))
    # a constant lr (min_lr = lr, no warmup) and no clipping: plain AdamW steps
    config = TrainConfig(max_iters=s.probe_steps, batch_size=len(y_train), lr=s.probe_lr,
                         min_lr=s.probe_lr, warmup_iters=0, grad_clip=0.0, eval_interval=0,
                         seed=s.seed, progress=progress)
    sec, peak = _train(_Probe(head), _FullBatch(X_tr, y), config, opt)
    with no_grad():
        test_acc, train_acc = (_accuracy(head(Tensor(X_te)).data, y_test),
                               _accuracy(head(Tensor(X_tr)).data, y_train))
    n_head = sum(p.data.size for p in head.parameters())
    return {"method": "probe", "test_accuracy": test_acc, "train_accuracy": train_acc,
            "trainable_params": n_head, "saved_bytes": n_head * 4, "sec_per_step": sec,
            "peak_train_mb": peak, "steps": s.probe_steps}


def finetune_classifier(model: BertClassifier, train: dict, y_train, test: dict, y_test,
             s: FinetuneSettings, method: str, out_dir=None, log=None,
             progress: bool = False) -> dict:
    """LoRA (``method="lora"``) or full fine-tuning of ``model`` for ``s.steps`` steps of
    AdamW (warmup then cosine decay to a tenth, gradients clipped to norm 1), run by
    ``train.Trainer`` on batches of the tokenized sentences."""
    if method == "lora":
        cfg = lora.LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                              target_modules=list(s.lora_targets), modules_to_save=["classifier"])
        lora.inject(model, cfg)
        head = {id(p) for p in model.classifier.parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in head], "lr": s.lora_lr},
                  {"params": [p for p in params if id(p) in head], "lr": s.head_lr}]
    elif method == "full":
        model.requires_grad_(True)
        groups = [{"params": list(model.parameters()), "lr": s.full_lr}]
    else:
        raise ValueError(f"finetune_classifier: method must be 'lora' or 'full', got {method!r}")
    params = [p for g in groups for p in g["params"]]
    opt = AdamW(groups, weight_decay=s.weight_decay)
    y_train = np.asarray(y_train)
    # the Trainer scales each group's schedule by its lr / config.lr: the head keeps its own
    config = TrainConfig(max_iters=s.steps, batch_size=s.batch_size, lr=groups[0]["lr"],
                         warmup_iters=s.warmup, grad_clip=1.0, eval_interval=0,
                         log_interval=20, seed=s.seed, progress=progress)

    def on_log(i, loss):
        if log is not None and (i % 20 == 0 or i == s.steps - 1) and loss is not None:
            log(f"  {method} step {i:4d}  loss {loss:.4f}")
    model.train()
    sec, peak = _train(model, _SentenceBatches(train, y_train, s.seed), config, opt, on_log)
    row = {"method": method, "test_accuracy": evaluate(model, test, y_test),
           "train_accuracy": evaluate(model, train, y_train),
           "trainable_params": sum(p.data.size for p in params), "sec_per_step": sec,
           "peak_train_mb": peak, "steps": s.steps}
    if method == "lora":
        # without out_dir the adapter is written to a temporary folder only to measure it
        with tempfile.TemporaryDirectory(prefix="tinylora-adapter-") as tmp:
            folder = os.fspath(out_dir) if out_dir else tmp
            lora.save_adapter(model, folder)
            row["saved_bytes"] = sum(os.path.getsize(os.path.join(folder, f))
                                     for f in os.listdir(folder))
        row["adapter_dir"] = os.path.abspath(out_dir) if out_dir else None
    else:
        row["saved_bytes"] = row["trainable_params"] * 4  # float32: every weight stored again
    return row


def compare_finetuning(model_dir=None, data=None, settings: FinetuneSettings | None = None,
                       methods=METHODS, out_dir=None, log=print, progress: bool = False) -> list:
    """Linear probe, LoRA and full fine-tuning of the same pretrained encoder (default: the
    installed all-MiniLM-L6-v2) on ``data`` (default ``data.agent_task()``).

    Returns one dict per method: ``test_accuracy``, ``train_accuracy``, ``trainable_params``,
    ``total_params``, ``trainable_pct``, ``saved_bytes`` (LoRA: the adapter folder on disk;
    full: all weights in float32), ``sec_per_step`` (median), ``peak_train_mb``, ``steps``,
    ``seconds``. ``out_dir``: where the LoRA adapter is saved (``adapter_dir``); default None:
    it is only measured, in a temporary folder that is removed. ``progress``: a bar per
    method's training on stderr.
    """
    s = settings or FinetuneSettings()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"compare_finetuning: unknown method(s) {unknown}; choose from {METHODS}")
    model_dir = find_minilm() if model_dir is None else model_dir
    data = data or agent_task(seed=s.seed)
    tokenizer = WordPieceTokenizer.from_pretrained(model_dir)
    train = encode_texts(tokenizer, data.train_texts, s.max_length)
    test = encode_texts(tokenizer, data.test_texts, s.max_length)
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        backend.manual_seed(s.seed)  # the same head init for every method
        model = BertClassifier.from_pretrained(model_dir, num_labels=len(data.classes))
        model.bert.requires_grad_(False)
        total = sum(p.data.size for p in model.parameters())  # before LoRA adds any
        if method == "probe":
            row = linear_probe(model, train, data.train_labels, test, data.test_labels, s,
                               progress=progress)
        else:
            sub = None if out_dir is None else os.path.join(os.fspath(out_dir), f"{method}_adapter")
            row = finetune_classifier(model, train, data.train_labels, test, data.test_labels, s, method,
                           out_dir=sub, log=log, progress=progress)
        row["total_params"] = total
        row["trainable_pct"] = 100.0 * row["trainable_params"] / total
        row["seconds"] = time.perf_counter() - t0
        if log is not None:
            log(f"{method}: held-out accuracy {row['test_accuracy']:.3f} ({row['seconds']:.0f} s)")
        rows.append(row)
    return rows


def format_table(rows) -> str:
    """The comparison as an aligned text table."""
    lines = [f"{'method':<7} {'test acc':>8} {'train acc':>9} {'trainable':>11} {'%':>8} "
             f"{'saved':>9} {'ms/step':>8} {'peak MB':>8}"]
    for r in rows:
        lines.append(f"{r['method']:<7} {r['test_accuracy']:>8.3f} {r['train_accuracy']:>9.3f} "
                     f"{r['trainable_params']:>11,} {r['trainable_pct']:>8.3f} "
                     f"{_size(r['saved_bytes']):>9} {1000 * r['sec_per_step']:>8.1f} "
                     f"{r['peak_train_mb']:>8.1f}")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
