"""tinylora vs PyTorch eager on the CPU: the same GPT, the same training step, alternating.

    python benchmarks/compare_torch.py [--threads 2] [--rounds 6] [--json-out FILE]
                                       [--baseline DIR]

Needs torch (``pip install torch==2.13.0``) next to tinylora; the tinylora package itself
never imports it. For each configuration and mode (full training; LoRA r=8 on the attention
and MLP linears) both sides build the same model in float32 and run the same step (forward,
backward, AdamW). One run of this script drives both, alternating rounds of steps between
them (tinylora, torch, tinylora, ...; the order rotates each round) so machine noise hits
both alike, and reports medians.

Each side lives in its own worker process: NumPy's OpenBLAS threads and PyTorch's OpenMP
threads both spin-wait between calls, and in one process each side's idle spinning threads
steal the cores from the other (measured here: PyTorch's small-config step went from 38 ms
to 134 ms beside NumPy). Separate processes with a pause between rounds keep the comparison
about the libraries. Each worker's peak RSS is its own.

``--baseline DIR`` adds a third side: tinylora imported from another checkout (DIR holds its
``tinylora/`` package), timed in the same alternation, so a change is measured before and
after in one run (``ratio_vs_baseline`` > 1: the change is faster).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "gpt-6x384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8),
}
VOCAB = 65
LORA_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def step_flops(cfg: dict, mode: str, r: int = 8) -> float:
    """FLOPs of the GEMMs one step runs (2 per multiply-add).

    Per layer and token the four linears hold 12·C² weights; attention adds 2·T·C for the
    scores and 2·T·C for the weighted sum (the full T×T is computed). A trained weight's
    backward costs 2× its forward (dx and dW), a frozen one's 1× (dx only).
    """
    L, C, T, B = cfg["n_layer"], cfg["n_embd"], cfg["block_size"], cfg["batch_size"]
    tokens = B * T
    linear = 2 * tokens * 12 * C * C * L
    attn = 2 * tokens * 2 * T * C * L
    head = 2 * tokens * C * VOCAB
    if mode == "full":
        return 3 * (linear + attn + head)
    lora = 2 * tokens * L * r * (2 * C + 4 * C + 2 * C + 5 * C)   # x·Aᵀ then ·Bᵀ, four linears
    return 2 * linear + 3 * attn + 3 * head + 3 * lora


def _build_tinylora(cfg, mode):
    model, opt, x, y = tinylora_parts(cfg, mode)

    def step():
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def tinylora_parts(cfg, mode):
    """The model (LoRA injected for mode "lora"), its AdamW and one (x, y) batch."""
    import tinylora as tl
    from tinylora import lora
    getattr(tl.backend, "tune_malloc", lambda: None)()   # as the Trainer does (older tinylora: at import)
    from tinylora.backend import np
    from tinylora.models.gpt import GPT, GPTConfig
    from tinylora.optim import AdamW

    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"]))
    if mode == "lora":
        lora.inject(model, lora.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, VOCAB, (cfg["batch_size"], cfg["block_size"])) for _ in range(2))
    return model, opt, x, y


def _build_torch(cfg, mode):
    sys.path.insert(0, str(HERE))
    import torch
    from torch_gpt import TorchGPT, add_lora, make_step

    torch.manual_seed(0)
    model = TorchGPT(VOCAB, cfg["block_size"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"])
    if mode == "lora":
        add_lora(model, r=8, alpha=16)
    inner = make_step(model, lr=1e-4)
    x, y = (torch.randint(0, VOCAB, (cfg["batch_size"], cfg["block_size"])) for _ in range(2))
    return lambda: inner(x, y)


def _build(side: str, name: str, mode: str):
    cfg = CONFIGS[name]
    return _build_torch(cfg, mode) if side == "torch" else _build_tinylora(cfg, mode)


def _worker(conn, side: str, threads: int, build, args: tuple, path: str | None = None) -> None:
    """Build one side's step with ``build(side, *args)``, then time ``n`` steps whenever the
    parent asks ("last" asks for the last step's return value instead)."""
    import resource
    if path is not None:  # the baseline side: its tinylora comes first on the path
        sys.path.insert(0, path)
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
        if side == "torch":
            import torch
            torch.set_num_threads(threads)
        step = build(side, *args)
        limits = None if side == "torch" else threadpool_limits(threads, user_api="blas")
        info = [{k: d.get(k) for k in ("user_api", "internal_api", "version", "num_threads")}
                for d in threadpool_info()]
        conn.send(("ready", info))
        last = None
        while True:
            n = conn.recv()
            if n is None:
                break
            if n == "last":
                conn.send(last)
                continue
            times = []
            for _ in range(n):
                t = time.perf_counter()
                last = step()
                times.append(time.perf_counter() - t)
            conn.send(times)
        if limits is not None:
            limits.restore_original_limits()
        conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    except Exception as exc:  # report, don't hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Side:
    """One side in its own spawned process: ``build(side, *args)`` (a module-level function,
    run there) returns the step to time. ``side`` is "torch" or "tinylora"; ``path`` puts
    another checkout's tinylora first (the baseline)."""

    def __init__(self, ctx, side, threads, build=_build, args=(), path=None):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, side, threads, build, args, path),
                                daemon=True)
        self.proc.start()
        msg = self.conn.recv()
        if msg[0] == "error":
            raise RuntimeError(f"{side} worker failed: {msg[1]}")
        self.blas = msg[1]

    def run(self, n):
        self.conn.send(n)
        out = self.conn.recv()
        if isinstance(out, tuple):
            raise RuntimeError(f"worker failed: {out[1]}")
        return out

    def last(self):
        """What the last timed step returned (sent back by pickle)."""
        self.conn.send("last")
        return self.conn.recv()

    def close(self):
        self.conn.send(None)
        peak = self.conn.recv()
        if isinstance(peak, tuple):
            raise RuntimeError(f"worker failed: {peak[1]}")
        self.proc.join(timeout=30)
        return peak


def gemm_peak(threads: int) -> float:
    """This machine's float32 GEMM GFLOP/s (NumPy, 2048²): the denominator of model FLOPs use."""
    import numpy as np
    from threadpoolctl import threadpool_limits
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


def alternate(sides, warmup, rounds, per_round, pause) -> dict:
    """{id(side): step times}: each side warms up, then rounds of ``per_round`` steps run
    side after side, the order rotating each round (no side always goes first), with a
    pause before each (the other side's spinning threads go to sleep)."""
    times = {id(s): [] for s in sides}
    for s in sides:
        s.run(warmup)
        time.sleep(pause)
    for k in range(rounds):
        for s in sides[k % len(sides):] + sides[:k % len(sides)]:
            time.sleep(pause)
            times[id(s)] += s.run(per_round)
    return times


def compare(ctx, name, mode, threads, warmup, rounds, per_round, pause, baseline=None):
    cfg = CONFIGS[name]
    args = (name, mode)
    ours, theirs = Side(ctx, "tinylora", threads, args=args), Side(ctx, "torch", threads, args=args)
    base = None if baseline is None else Side(ctx, "tinylora", threads, args=args, path=baseline)
    sides = [ours, theirs] + ([] if base is None else [base])
    try:
        times = alternate(sides, warmup, rounds, per_round, pause)
    finally:
        peaks = [s.close() for s in sides]
    a, b = times[id(ours)], times[id(theirs)]
    peak_a, peak_b = peaks[0], peaks[1]
    ta, tb = statistics.median(a), statistics.median(b)
    tokens = cfg["batch_size"] * cfg["block_size"]
    flops = step_flops(cfg, mode)
    return {"config": name, "mode": mode, **cfg, "tokens_per_step": tokens,
            "steps_timed": len(a),
            "tinylora_ms": round(ta * 1e3, 2), "torch_ms": round(tb * 1e3, 2),
            "tinylora_tokens_per_s": round(tokens / ta), "torch_tokens_per_s": round(tokens / tb),
            "ratio_tokens_per_s": round(tb / ta, 3),
            "gflop_per_step": round(flops / 1e9, 3),
            "tinylora_gflops": round(flops / ta / 1e9, 1), "torch_gflops": round(flops / tb / 1e9, 1),
            "tinylora_peak_rss_mb": round(peak_a, 1), "torch_peak_rss_mb": round(peak_b, 1),
            "blas": {"tinylora": ours.blas, "torch": theirs.blas},
            **({} if base is None else _baseline_row(times[id(base)], ta, tb, peaks[2], baseline))}


def _baseline_row(c, ta, tb, peak, path):
    tc = statistics.median(c)
    return {"baseline": str(path), "baseline_ms": round(tc * 1e3, 2),
            "baseline_ratio_tokens_per_s": round(tb / tc, 3),
            "ratio_vs_baseline": round(tc / ta, 3), "baseline_peak_rss_mb": round(peak, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="BLAS threads for tinylora and torch.set_num_threads for PyTorch")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between rounds")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also time tinylora from this checkout (before/after in one run)")
    a = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    peak = gemm_peak(a.threads)
    rows = []
    for name in a.configs:
        small = CONFIGS[name]["n_embd"] < 256
        for mode in a.modes:
            row = compare(ctx, name, mode, a.threads, a.warmup, a.rounds, 5 if small else 2, a.pause,
                          None if a.baseline is None else str(Path(a.baseline).resolve()))
            row["tinylora_mfu"] = round(row["tinylora_gflops"] / peak, 3)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "blas"}), file=sys.stderr)
    import numpy as np
    import torch
    out = {"results": rows, "threads": a.threads, "gemm_peak_gflops": round(peak, 1),
           "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "machine": platform.machine(),
           "processor": cpu_name(), "cpu_count": os.cpu_count(),
           "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
           "date": time.strftime("%Y-%m-%d")}
    write_json(out, a.json_out)


def write_json(out: dict, path=None) -> None:
    """Print the figures as JSON, and store them in ``path`` when one is given."""
    text = json.dumps(out, indent=2)
    if path:
        Path(path).write_text(text + "\n")
    print(text)


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo), for the stored figures."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
