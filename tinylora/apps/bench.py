"""Benchmark figures (not tests): the time, throughput and memory of one training step.

``bench_train_step`` times forward + backward + AdamW on a GPT with random tokens: a few
warm-up steps, then ``repeats`` timed steps; it reports the median and the minimum.
Peak memory is the process's resident-set high-water mark (``getrusage``), which never
goes down, so ``run_isolated`` measures each configuration in a fresh subprocess
(``python -m tinylora.apps.bench NAME``) for an honest per-configuration peak.

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

from .. import backend
from ..backend import np, xp
from ..blas import blas_info, limit_threads

__all__ = ["TRAIN_CONFIGS", "bench_train_step", "run_isolated", "peak_rss_mb", "progress_bar"]

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


def progress_bar(total: int, desc: str, progress: bool = True, unit: str = "run"):
    """A tqdm bar on stderr (off when ``progress`` is False), so JSON on stdout stays clean."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False,
                file=sys.stderr, dynamic_ncols=True)


def _blas_info(threads):
    libs = [{k: d[k] for k in ("internal_api", "version", "num_threads")} for d in blas_info()]
    return {"threads_requested": threads, "libraries": libs}


LORA_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def step_flops(cfg: dict, mode: str, r: int = 8, vocab: int = VOCAB) -> float:
    """FLOPs of the GEMMs one training step runs (2 per multiply-add).

    Per layer and token the four linears hold 12·C² weights; attention adds 2·T·C for the
    scores and 2·T·C for the weighted sum (the whole T×T is computed). A trained weight's
    backward costs twice its forward (dx and dW), a frozen one's once (dx only); in "lora"
    mode r-rank adapters sit on the four linears and the base is frozen.
    """
    L, C, T = cfg["n_layer"], cfg["n_embd"], cfg["block_size"]
    tokens = cfg["batch_size"] * T
    linear = 2 * tokens * 12 * C * C * L
    attn = 2 * tokens * 2 * T * C * L
    head = 2 * tokens * C * vocab
    if mode == "full":
        return 3 * (linear + attn + head)
    adapters = 2 * tokens * L * r * (2 * C + 4 * C + 2 * C + 5 * C)   # x·Aᵀ, then ·Bᵀ
    return 2 * linear + 3 * attn + 3 * head + 3 * adapters


def gemm_peak_gflops(n: int = 2048) -> float:
    """This machine's float32 GEMM speed (best of 5, n×n, current BLAS threads): the
    denominator of model FLOPs utilisation."""
    a = backend.randn(n, n)
    for _ in range(2):
        a @ a
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        backend.to_numpy((a @ a)[:1, :1])
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def bench_train_step(name: str = "nanogpt-cpu", *, warmup: int = 2, repeats: int = 5,
                     threads: int | None = None, config: dict | None = None,
                     mode: str = "full", checkpointing: bool = False, progress: bool = False) -> dict:
    """Time one training step of TRAIN_CONFIGS[name] (or ``config``); a dict of figures.

    mode "full" trains every weight; "lora" freezes the base and trains LoRA r=8 adapters on
    the attention and MLP linears (AdamW holds state for the adapters only)."""
    backend.tune_malloc()   # as the Trainer does: freed arrays stay in the heap
    from ..models.gpt import GPT, GPTConfig
    from ..optim import AdamW

    cfg = dict(config or TRAIN_CONFIGS[name])
    B, T = cfg.pop("batch_size"), cfg["block_size"]
    rss_start = peak_rss_mb()
    with limit_threads(threads):
        backend.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=VOCAB, **cfg))
        if mode == "lora":
            from .. import lora
            lora.inject(model, lora.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
        elif mode != "full":
            raise ValueError(f"bench: mode must be 'full' or 'lora', got {mode!r}")
        if checkpointing:
            model.gradient_checkpointing_enable()
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

        bar = progress_bar(warmup + repeats, f"{name} {mode}", progress, unit="step")
        for _ in range(warmup):
            step()
            bar.update()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            bar.update()                                # outside the timed span
        bar.close()
        blas = _blas_info(threads)
        peak = gemm_peak_gflops()
    med = statistics.median(times)
    flops = step_flops({**cfg, "batch_size": B}, mode)
    return {"target": "train", "config": name, "mode": mode, "checkpointing": checkpointing,
            **cfg, "batch_size": B,
            "vocab_size": VOCAB, "params": model.num_parameters(),
            "trainable_params": model.num_parameters(trainable_only=True), "tokens_per_step": B * T,
            "gflop_per_step": round(flops / 1e9, 3), "gflops": round(flops / med / 1e9, 1),
            "gemm_peak_gflops": round(peak, 1), "mfu": round(flops / med / 1e9 / peak, 3),
            "ms_per_step": round(med * 1e3, 2), "ms_per_step_min": round(min(times) * 1e3, 2),
            "tokens_per_s": round(B * T / med, 1), "warmup": warmup, "repeats": repeats,
            "peak_rss_mb": round(peak_rss_mb(), 1), "rss_before_model_mb": round(rss_start, 1),
            "device": backend.get_device(), "dtype": str(model.transformer.wte.weight.dtype),
            "blas": blas, "numpy": np.__version__, "array_module": xp.__name__,
            "python": platform.python_version(), "cpu_count": os.cpu_count()}


def run_isolated(name: str, *, warmup: int = 2, repeats: int = 5, threads: int | None = None,
                 mode: str = "full", checkpointing: bool = False) -> dict:
    """``bench_train_step`` in a fresh Python process, so peak_rss_mb is this config's alone."""
    cmd = [sys.executable, "-m", "tinylora.apps.bench", name, "--warmup", str(warmup),
           "--repeats", str(repeats), "--mode", mode] + (["--checkpointing"] if checkpointing else [])
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"benchmark {name!r} failed in its subprocess: {tail[0]}")
    return json.loads(proc.stdout)


def lora_vs_full(name: str = "gpt-6x384", *, warmup: int = 2, repeats: int = 5,
                 threads: int | None = None, progress: bool = False) -> dict:
    """LoRA's own promise, measured: a LoRA step's time and peak memory against a full
    fine-tuning step of the same model, each in a fresh process; and LoRA with activation
    checkpointing (blocks recomputed in backward), which trades time for memory."""
    kw = dict(warmup=warmup, repeats=repeats, threads=threads)
    runs = {"full": dict(mode="full"), "lora": dict(mode="lora"),
            "lora + checkpointing": dict(mode="lora", checkpointing=True)}
    bar, done = progress_bar(len(runs), f"{name}", progress), []
    for what, how in runs.items():
        bar.set_postfix_str(what)
        done.append(run_isolated(name, **how, **kw))
        bar.update()
    bar.close()
    full, lo, lo_ck = done
    return {"target": "lora", "config": name, "full": full, "lora": lo, "lora_checkpointing": lo_ck,
            "time_ratio": round(lo["ms_per_step"] / full["ms_per_step"], 3),
            "peak_rss_ratio": round(lo["peak_rss_mb"] / full["peak_rss_mb"], 3),
            "checkpointing_time_ratio": round(lo_ck["ms_per_step"] / full["ms_per_step"], 3),
            "checkpointing_peak_rss_ratio": round(lo_ck["peak_rss_mb"] / full["peak_rss_mb"], 3),
            "trainable_fraction": round(lo["trainable_params"] / lo["params"], 5)}


def inference_figures(name: str = "gpt-6x384", *, repeats: int = 7, threads: int | None = None,
                      progress: bool = False) -> dict:
    """Forward-only speed of the base model, the same model with LoRA r=8 merged into it,
    and with the adapters unmerged (computed on the side), timed alternately in one process."""
    backend.tune_malloc()   # as the Trainer does: freed arrays stay in the heap
    from .. import lora
    from ..models.gpt import GPT, GPTConfig
    from ..tensor import no_grad

    cfg = dict(TRAIN_CONFIGS[name])
    B, T = cfg.pop("batch_size"), cfg["block_size"]
    with limit_threads(threads), no_grad():
        backend.manual_seed(0)
        base = GPT(GPTConfig(vocab_size=VOCAB, **cfg))
        backend.manual_seed(0)
        merged = GPT(GPTConfig(vocab_size=VOCAB, **cfg))
        backend.manual_seed(0)
        unmerged = GPT(GPTConfig(vocab_size=VOCAB, **cfg))
        for m in (merged, unmerged):
            lora.inject(m, lora.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS,
                                           init_lora_weights=False))
        lora.merge(merged)
        x = np.random.default_rng(0).integers(0, VOCAB, (B, T))
        models = {"base": base, "merged": merged, "unmerged": unmerged}
        times = {k: [] for k in models}
        bar = progress_bar(repeats + 1, f"{name} forwards", progress, unit="round")
        for m in models.values():
            m.eval()
            m(x)
        bar.update()
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                logits, _ = m(x)
                backend.to_numpy(logits.data[:1, :1, :1])
                times[k].append(time.perf_counter() - t0)
            bar.update()
        bar.close()
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"target": "infer", "config": name, "tokens": B * T,
            **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
            "merged_vs_base": round(ms["merged"] / ms["base"], 3),
            "unmerged_vs_base": round(ms["unmerged"] / ms["base"], 3),
            "blas": _blas_info(threads)}


def encode_figures(*, n: int = 128, batch_size: int = 32, repeats: int = 7,
                   threads: int | None = None, progress: bool = False) -> dict:
    """all-MiniLM-L6-v2 sentence encoding: sentences/s at batch 32 for ~16-token sentences."""
    backend.tune_malloc()   # as the Trainer does: freed arrays stay in the heap
    from ..models.sentence import SentenceEncoder

    enc = SentenceEncoder.from_pretrained()
    subjects = ["the old fisherman", "a young programmer", "my neighbour's cat", "the city council"]
    verbs = ["quietly repaired", "carefully reviewed", "finally announced", "slowly painted"]
    objects = ["the broken wooden fence near the river", "an unusual plan for the summer festival",
               "three reports about rising housing costs", "the blue boat behind the harbour wall"]
    texts = [f"{subjects[i % 4]} {verbs[(i // 4) % 4]} {objects[(i // 16) % 4]}." for i in range(n)]
    with limit_threads(threads):
        bar = progress_bar(repeats + 1, "encode", progress, unit="round")
        enc.encode(texts, batch_size=batch_size)
        bar.update()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            enc.encode(texts, batch_size=batch_size)
            times.append(time.perf_counter() - t0)
            bar.update()
        bar.close()
    tokens = sum(len(enc.tokenizer.encode(t)) for t in texts) / n
    med = statistics.median(times)
    return {"target": "encode", "sentences": n, "batch_size": batch_size,
            "mean_tokens": round(tokens, 1), "sentences_per_s": round(n / med, 1),
            "ms_per_batch": round(med * 1e3 * batch_size / n, 2), "blas": _blas_info(threads)}


def _main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tinylora.apps.bench",
                                 description="time one training step of a config; prints JSON")
    ap.add_argument("config", choices=sorted(TRAIN_CONFIGS))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mode", default="full", choices=["full", "lora"])
    ap.add_argument("--checkpointing", action="store_true")
    a = ap.parse_args(argv)
    print(json.dumps(bench_train_step(a.config, warmup=a.warmup, repeats=a.repeats,
                                      threads=a.threads, mode=a.mode, checkpointing=a.checkpointing)))


if __name__ == "__main__":
    _main()
