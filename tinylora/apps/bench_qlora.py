"""QLoRA benchmark figures (figures to report, not tests): memory, speed and error of 4-bit bases.

``qlora_figures()`` gathers everything as one JSON-able dict:

* storage: bytes per parameter of the frozen 4-bit base (GPT and a square matrix),
  with and without double quantization, and quantize / dequantize throughput;
* fine-tuning LoRA vs QLoRA on the same model: the model's weight memory, the step time
  (forward + backward + AdamW on the adapters) and the peak resident memory. Each run is
  a fresh subprocess (``python -m tinylora.apps.bench_qlora --child ...``), since the peak RSS
  (``getrusage``) never goes down. ``build_peak_rss_mb`` covers building the float model
  (which QLoRA then quantizes) and injecting the adapters; ``train_peak_rss_mb`` the
  training steps alone (Linux: the high-water mark is reset after building, by writing
  "5" to /proc/self/clear_refs; None elsewhere); ``peak_rss_mb`` the larger of the two.
  ``step_time`` times LoRA and QLoRA steps in alternation in one process, so that load
  from other processes slows both alike and their ratio holds. ``threads`` caps the BLAS
  threads (threadpoolctl): on an oversubscribed machine OpenBLAS's spinning threads made
  a step up to 20x slower;
* one 4-bit layer's forward + backward against a float layer's, and the share of it spent
  dequantizing;
* mean absolute round-trip error of NF4, FP4 and int4 on N(0, 1) values.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from .. import backend, lora, nn
from ..backend import np, xp
from ..blas import limit_threads
from ..quant.convert import quantize_model
from ..quant.int4 import quantization_error
from ..quant.linear4bit import Linear4bit, _dequantize_to_workspace
from ..quant.nf4 import dequantize_4bit, quantize_4bit
from ..tensor import Tensor
from .bench import TRAIN_CONFIGS, peak_rss_mb

__all__ = ["qlora_figures", "finetune_figures", "GPT_CONFIGS"]

GPT_CONFIGS = TRAIN_CONFIGS    # the GPT bench's: "gpt-6x384", "nanogpt-cpu"


def _sync(arr) -> None:
    backend.to_numpy(arr.reshape(-1)[:1])     # waits for the device; a no-op on the CPU


def _best_ms(fn, repeat: int) -> float:
    _sync(fn())                               # warm-up: allocator, caches, GPU kernels
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        _sync(fn())
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for _, b in model.named_buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += int(t.data.nbytes)
    return total


class _Matrix(nn.Module):
    """One n×n linear layer and a squared-error loss: the frozen weight dominates memory."""

    def __init__(self, n: int):
        super().__init__()
        self.proj = nn.Linear(n, n, bias=False)

    def forward(self, x, target):
        d = self.proj(x) - target
        return (d * d).mean()


def finetune_figures(kind: str, mode: str, *, threads: int | None = None, **kw) -> dict:
    """One fine-tuning run in this process: kind "gpt" or "matrix", mode "lora" or "qlora"."""
    backend.tune_malloc()   # as the Trainer does: freed arrays stay in the heap
    if not threads:
        return _finetune(kind, mode, **kw)
    with limit_threads(threads):
        return {**_finetune(kind, mode, **kw), "blas_threads": threads}


def _build(kind: str, mode: str, *, config: str = "gpt-6x384", vocab_size: int = 65,
           matrix: int = 4096, matrix_tokens: int = 512, r: int = 8) -> dict:
    """A model with LoRA (mode "lora") or QLoRA (mode "qlora") adapters, its AdamW and a
    ``step()`` (forward + backward + update) returning an array to synchronise on."""
    from ..models.gpt import GPT, GPTConfig
    from ..optim import AdamW

    backend.manual_seed(0)
    rng = np.random.default_rng(0)
    if kind == "gpt":
        cfg = dict(GPT_CONFIGS[config])
        B, T = cfg.pop("batch_size"), cfg["block_size"]
        model = GPT(GPTConfig(vocab_size=vocab_size, **cfg))
        x, y = (rng.integers(0, vocab_size, (B, T)) for _ in range(2))
        loss_fn = lambda: model(x, y)[1]      # noqa: E731
        info = {"tokens_per_step": B * T, "config": {**GPT_CONFIGS[config], "vocab_size": vocab_size}}
    else:
        model = _Matrix(matrix)
        x = Tensor(backend.randn(matrix_tokens, matrix))
        y = Tensor(backend.randn(matrix_tokens, matrix))
        loss_fn = lambda: model(x, y)         # noqa: E731
        info = {"tokens_per_step": matrix_tokens, "shape": [matrix, matrix]}
    info["float_model_weight_mb"] = round(_weight_bytes(model) / 2**20, 3)
    if mode == "qlora":
        rep = quantize_model(model, print_fn=None)
        info.update(frozen_base_params=rep.params, frozen_base_bytes=rep.bytes_after,
                    frozen_base_bytes_per_param=round(rep.bytes_per_param, 5))
    lora.inject(model, lora.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    params = lora.trainable_parameters(model)
    opt = AdamW(params, lr=1e-4)
    info.update(kind=kind, mode=mode, r=r, trainable_params=sum(int(p.data.size) for p in params),
                weight_mb=round(_weight_bytes(model) / 2**20, 3))

    def step():
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return params[-1].data
    return {"model": model, "step": step, "info": info}


def _timed(step) -> float:
    t0 = time.perf_counter()
    _sync(step())
    return time.perf_counter() - t0


def _finetune(kind: str, mode: str, *, warmup: int = 1, steps: int = 3, **kw) -> dict:
    rss_start = peak_rss_mb()
    run = _build(kind, mode, **kw)
    build_peak = peak_rss_mb()
    reset = _reset_peak()     # from here on the high-water mark is training's alone
    for _ in range(warmup):
        _sync(run["step"]())
    times = [_timed(run["step"]) for _ in range(steps)]
    return {**run["info"], "ms_per_step": round(1e3 * statistics.median(times), 1),
            "ms_per_step_min": round(1e3 * min(times), 1), "steps": steps, "warmup": warmup,
            "rss_start_mb": round(rss_start, 1), "build_peak_rss_mb": round(build_peak, 1),
            "train_peak_rss_mb": round(peak_rss_mb(), 1) if reset else None,
            "peak_rss_mb": round(max(build_peak, peak_rss_mb()), 1)}


def _alternating_step_times(kind: str, *, steps: int = 3, **kw) -> dict:
    """LoRA and QLoRA steps in turn, in one process: other load on the machine then slows
    both alike, so their ratio holds even where the absolute times do not."""
    runs = {mode: _build(kind, mode, **kw)["step"] for mode in ("lora", "qlora")}
    times = {mode: [] for mode in runs}
    for i in range(steps + 1):              # the first round warms up
        for mode, step in runs.items():
            t = _timed(step)
            if i:
                times[mode].append(t)
    med = {m: statistics.median(t) for m, t in times.items()}
    best = {m: min(t) for m, t in times.items()}
    return {"lora_ms": round(1e3 * med["lora"], 1), "qlora_ms": round(1e3 * med["qlora"], 1),
            "lora_ms_min": round(1e3 * best["lora"], 1), "qlora_ms_min": round(1e3 * best["qlora"], 1),
            "qlora_over_lora": round(best["qlora"] / best["lora"], 3), "steps": steps}


def _isolated(kind: str, mode: str, **kw) -> dict:
    cmd = [sys.executable, "-m", "tinylora.apps.bench_qlora", "--child", kind, mode, json.dumps(kw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"QLoRA benchmark {kind}/{mode} failed in its subprocess: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _storage_and_throughput(n: int, blocksize: int, repeat: int) -> dict:
    w = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    gb = n * n * 4 / 1e9
    out = {}
    for dq in (True, False):
        packed, state = quantize_4bit(w, blocksize=blocksize, double_quant=dq)
        t_q = _best_ms(lambda: quantize_4bit(w, blocksize=blocksize, double_quant=dq)[0], repeat)
        t_d = _best_ms(lambda: dequantize_4bit(packed, state), repeat)
        total = int(packed.nbytes) + state.nbytes
        out["double_quant" if dq else "plain"] = {
            "bytes_per_param": round(total / (n * n), 5),
            "quantize_ms": round(t_q, 2), "quantize_GBps": round(gb / (t_q / 1e3), 3),
            "dequantize_ms": round(t_d, 2), "dequantize_GBps": round(gb / (t_d / 1e3), 3)}
    out["mean_abs_error_N01"] = {q: round(quantization_error(w, q, blocksize), 5)
                                 for q in ("nf4", "fp4", "int4")}
    return out


def _layer_speed(n: int, tokens: int, repeat: int) -> dict:
    """Forward + backward (dx only: the weight is frozen) of one n×n layer, float vs 4-bit,
    timed in alternation (best of ``repeat``) so that load from other processes hits both."""
    backend.manual_seed(0)
    dense = nn.Linear(n, n, bias=False).requires_grad_(False)
    q4 = Linear4bit.from_linear(dense)
    x = Tensor(backend.randn(tokens, n), requires_grad=True)
    g = backend.randn(tokens, n)

    def fwd_bwd(layer):
        def f():
            x.grad = None
            layer(x).backward(Tensor._wrap(g))
            return x.grad.data
        return f
    state = q4.quant_state
    fns = {"float": fwd_bwd(dense), "nf4": fwd_bwd(q4),
           "deq": lambda: _dequantize_to_workspace(q4.weight.data, state, np.float32)}
    best = {k: _best_ms(f, 1) for k, f in fns.items()}
    for _ in range(repeat - 1):
        best = {k: min(best[k], _best_ms(f, 1)) for k, f in fns.items()}
    return {"shape": [n, n], "tokens": tokens, "float_fwd_bwd_ms": round(best["float"], 2),
            "nf4_fwd_bwd_ms": round(best["nf4"], 2),
            "nf4_over_float": round(best["nf4"] / best["float"], 3),
            "dequantize_ms": round(best["deq"], 2),   # paid twice: in forward and in backward
            "dequantize_share": round(2 * best["deq"] / best["nf4"], 3)}


def qlora_figures(config: str = "gpt-6x384", *, vocab_size: int = 65, matrix: int = 4096,
                  matrix_tokens: int = 512, r: int = 8, warmup: int = 1, steps: int = 3,
                  repeat: int = 3, blocksize: int = 64, isolated: bool = True,
                  threads: int | None = None) -> dict:
    """Every QLoRA figure as a JSON-able dict (see the module docstring).

    config: a GPT_CONFIGS name; matrix: side of the square matrix; matrix_tokens: rows of
    its training batch; isolated: each fine-tuning run in a fresh subprocess (honest peak
    memory; False runs them here, where the peak then accumulates).
    """
    backend.tune_malloc()   # as the Trainer does: freed arrays stay in the heap
    run = _isolated if isolated else finetune_figures
    common = dict(config=config, vocab_size=vocab_size, matrix=matrix,
                  matrix_tokens=matrix_tokens, r=r, warmup=warmup, steps=steps, threads=threads)
    out = {"device": backend.get_device(), "array_module": xp.__name__, "numpy": np.__version__,
           "python": platform.python_version(), "cpu_count": os.cpu_count(), "blocksize": blocksize}
    for kind in ("gpt", "matrix"):
        lo, qlo = run(kind, "lora", **common), run(kind, "qlora", **common)
        out[kind] = {"lora": lo, "qlora": qlo,
                     "weight_memory_ratio": round(qlo["weight_mb"] / lo["weight_mb"], 4),
                     "train_peak_rss_ratio": (round(qlo["train_peak_rss_mb"] / lo["train_peak_rss_mb"], 3)
                                              if lo["train_peak_rss_mb"] else None)}
    with limit_threads(threads):
        for kind in ("gpt", "matrix"):
            out[kind]["step_time"] = _alternating_step_times(
                kind, steps=steps, **{k: v for k, v in common.items()
                                      if k not in ("warmup", "steps", "threads")})
        out["matrix"].update(_storage_and_throughput(matrix, blocksize, repeat))
        out["layer_speed"] = _layer_speed(matrix, matrix_tokens, repeat)
    return out


def _main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tinylora.apps.bench_qlora",
                                 description="QLoRA benchmark figures as JSON")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "MODE", "JSON"),
                    help="(internal) one fine-tuning run, printed as JSON")
    ap.add_argument("--config", default="gpt-6x384", choices=sorted(GPT_CONFIGS))
    ap.add_argument("--matrix", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="cap BLAS threads (threadpoolctl)")
    ap.add_argument("--in-process", action="store_true")
    a = ap.parse_args(argv)
    if a.child:
        kind, mode, kw = a.child
        print(json.dumps(finetune_figures(kind, mode, **json.loads(kw))))
        return
    print(json.dumps(qlora_figures(a.config, matrix=a.matrix, steps=a.steps, threads=a.threads,
                                   isolated=not a.in_process), indent=1))


if __name__ == "__main__":
    _main()
