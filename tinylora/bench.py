"""Benchmark figures (not tests): the time, throughput and memory of one training step.

``bench_train_step`` times forward + backward + AdamW on a GPT with random tokens: a few
warm-up steps, then ``repeats`` timed steps; it reports the median and the minimum.
Peak memory is the process's resident-set high-water mark (``getrusage``), which never
goes down, so ``run_isolated`` measures each configuration in a fresh subprocess
(``python -m tinylora.bench NAME``) for an honest per-configuration peak.

BLAS threads: ``threads`` caps them with threadpoolctl; the report names the BLAS library
and the thread count used, since small GEMMs on a few cores can run slower with more threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from . import backend
from .backend import np, xp

__all__ = ["TRAIN_CONFIGS", "bench_train_step", "run_isolated", "peak_rss_mb"]

# nanoGPT's CPU recipe (shakespeare_char on a laptop) and a larger GPT-2-like one
TRAIN_CONFIGS = {
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "gpt-6x384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8),
}
VOCAB = 96   # the built-in corpora's character vocabulary


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _blas_info(threads):
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"threads_requested": threads}
    libs = [{k: d.get(k) for k in ("internal_api", "version", "num_threads")}
            for d in threadpool_info() if d.get("user_api") == "blas"]
    return {"threads_requested": threads, "libraries": libs}


def bench_train_step(name: str = "nanogpt-cpu", *, warmup: int = 2, repeats: int = 5,
                     threads: int | None = None, config: dict | None = None) -> dict:
    """Time one training step of TRAIN_CONFIGS[name] (or ``config``); a dict of figures."""
    from contextlib import nullcontext

    from .models.gpt import GPT, GPTConfig
    from .optim import AdamW

    cfg = dict(config or TRAIN_CONFIGS[name])
    B, T = cfg.pop("batch_size"), cfg["block_size"]
    rss_start = peak_rss_mb()
    limits = nullcontext()
    if threads:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(limits=threads, user_api="blas")
    with limits:
        backend.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=VOCAB, **cfg))
        opt = AdamW.from_model(model, lr=1e-4, weight_decay=0.1)
        rng = np.random.default_rng(0)
        x, y = (rng.integers(0, VOCAB, (B, T)) for _ in range(2))
        last = list(model.parameters())[-1]

        def step():
            _, loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            backend.to_numpy(last.data.reshape(-1)[:1])   # wait for the device (a no-op on CPU)

        for _ in range(warmup):
            step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        blas = _blas_info(threads)
    med = statistics.median(times)
    return {"target": "train", "config": name, **cfg, "batch_size": B, "vocab_size": VOCAB,
            "params": model.num_parameters(), "tokens_per_step": B * T,
            "ms_per_step": round(med * 1e3, 2), "ms_per_step_min": round(min(times) * 1e3, 2),
            "tokens_per_s": round(B * T / med, 1), "warmup": warmup, "repeats": repeats,
            "peak_rss_mb": round(peak_rss_mb(), 1), "rss_before_model_mb": round(rss_start, 1),
            "device": backend.get_device(), "dtype": str(model.transformer.wte.weight.dtype),
            "blas": blas, "numpy": np.__version__, "array_module": xp.__name__,
            "python": platform.python_version(), "cpu_count": os.cpu_count()}


def run_isolated(name: str, *, warmup: int = 2, repeats: int = 5, threads: int | None = None) -> dict:
    """``bench_train_step`` in a fresh Python process, so peak_rss_mb is this config's alone."""
    cmd = [sys.executable, "-m", "tinylora.bench", name, "--warmup", str(warmup),
           "--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"benchmark {name!r} failed in its subprocess: {tail[0]}")
    return json.loads(proc.stdout)


def _main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tinylora.bench",
                                 description="time one training step of a config; prints JSON")
    ap.add_argument("config", choices=sorted(TRAIN_CONFIGS))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    print(json.dumps(bench_train_step(a.config, warmup=a.warmup, repeats=a.repeats,
                                      threads=a.threads)))


if __name__ == "__main__":
    _main()
