"""tinylora vs PyTorch eager on the CPU: the same GPT, the same step, one process, alternating.

    python benchmarks/compare_torch.py [--threads 2] [--repeats 10] [--json-out FILE]

Needs torch (``pip install torch==2.13.0``) next to tinylora; tinylora itself never imports
it. For each configuration and mode (full training, LoRA r=8 on the attention and MLP
linears) it builds both models with identical shapes in float32, warms both up, then times
steps alternately (tinylora, torch, tinylora, ...) so that machine noise hits both sides
alike, and prints JSON: median ms/step, tokens/s, the ratio, achieved GFLOP/s against this
machine's measured float32 GEMM peak, and the BLAS libraries with their thread counts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402  (a benchmark script, not the package)
import torch  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

import tinylora as tl  # noqa: E402
from tinylora import lora  # noqa: E402
from tinylora.models.gpt import GPT, GPTConfig  # noqa: E402
from tinylora.optim import AdamW  # noqa: E402
from torch_gpt import TorchGPT, add_lora, make_step  # noqa: E402

CONFIGS = {
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "gpt-6x384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8),
}
VOCAB = 65
LORA_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def step_flops(cfg: dict, mode: str, r: int = 8) -> float:
    """FLOPs of the GEMMs one step actually runs (2 per multiply-add).

    Per layer and token the four linears hold 12·C² weights; attention adds 2·T·C for the
    scores and 2·T·C for the weighted sum (the full T×T is computed). Backward of a trained
    weight costs 2× its forward (dx and dW); of a frozen one 1× (dx only).
    """
    L, C, T, B = cfg["n_layer"], cfg["n_embd"], cfg["block_size"], cfg["batch_size"]
    tokens = B * T
    linear = 2 * tokens * 12 * C * C * L
    attn = 2 * tokens * 2 * T * C * L
    head = 2 * tokens * C * VOCAB
    fwd = linear + attn + head
    if mode == "full":
        return 3 * fwd
    lora_fwd = 2 * tokens * L * r * (C + 3 * C + C + C + C + 4 * C + 4 * C + C)  # x·Aᵀ, ·Bᵀ per linear
    # frozen linears: forward + dx; attention/head: forward + dx (+ dW for the tied head);
    # LoRA: forward + dx + dA + dB
    return 2 * linear + 3 * attn + 3 * head + 3 * lora_fwd


def gemm_peak(threads: int) -> float:
    """Measured float32 GEMM GFLOP/s (2048², NumPy) — the denominator of model FLOPs use."""
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    with threadpool_limits(threads, user_api="blas"):
        for _ in range(2):
            a @ a
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            a @ a
            ts.append(time.perf_counter() - t)
    return 2 * 2048 ** 3 / min(ts) / 1e9


def build_tinylora(cfg, mode):
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"]))
    if mode == "lora":
        lora.inject(model, lora.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def step(x, y):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss
    return step


def build_torch(cfg, mode):
    torch.manual_seed(0)
    model = TorchGPT(VOCAB, cfg["block_size"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"])
    if mode == "lora":
        add_lora(model, r=8, alpha=16)
    return make_step(model, lr=1e-4)


def compare(name: str, mode: str, threads: int, warmup: int, repeats: int) -> dict:
    cfg = CONFIGS[name]
    B, T = cfg["batch_size"], cfg["block_size"]
    rng = np.random.default_rng(0)
    x_np, y_np = (rng.integers(0, VOCAB, (B, T)) for _ in range(2))
    xt, yt = torch.from_numpy(x_np), torch.from_numpy(y_np)
    tl_step, th_step = build_tinylora(cfg, mode), build_torch(cfg, mode)
    ours, theirs = [], []
    with threadpool_limits(threads):
        torch.set_num_threads(threads)
        for _ in range(warmup):
            tl_step(x_np, y_np)
            th_step(xt, yt)
        for _ in range(repeats):
            t = time.perf_counter()
            tl_step(x_np, y_np)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            th_step(xt, yt)
            theirs.append(time.perf_counter() - t)
    a, b = statistics.median(ours), statistics.median(theirs)
    flops = step_flops(cfg, mode)
    return {"config": name, "mode": mode, **cfg, "tokens_per_step": B * T,
            "tinylora_ms": round(a * 1e3, 2), "torch_ms": round(b * 1e3, 2),
            "tinylora_tokens_per_s": round(B * T / a), "torch_tokens_per_s": round(B * T / b),
            "ratio_tokens_per_s": round(b / a, 3),
            "gflop_per_step": round(flops / 1e9, 3),
            "tinylora_gflops": round(flops / a / 1e9, 1), "torch_gflops": round(flops / b / 1e9, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--threads", type=int, default=tl.backend.blas_threads() if hasattr(tl.backend, "blas_threads") else 2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args(argv)
    peak = gemm_peak(a.threads)
    rows = []
    for name in a.configs:
        for mode in a.modes:
            reps = a.repeats if CONFIGS[name]["n_embd"] < 256 else max(3, a.repeats // 2)
            row = compare(name, mode, a.threads, a.warmup, reps)
            row["tinylora_mfu"] = round(row["tinylora_gflops"] / peak, 3)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    out = {"results": rows, "threads": a.threads, "gemm_peak_gflops": round(peak, 1),
           "blas": [{k: d.get(k) for k in ("user_api", "internal_api", "version", "num_threads", "filepath")}
                    for d in threadpool_info()],
           "torch": torch.__version__, "numpy": np.__version__, "tinylora": tl.__version__,
           "python": platform.python_version(), "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    text = json.dumps(out, indent=2)
    if a.json_out:
        Path(a.json_out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
