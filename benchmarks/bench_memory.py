"""Training memory, full fine-tuning vs LoRA: what the graph keeps for backward, by class.

    python benchmarks/bench_memory.py [--config gpt-6x384] [--threads 2] [--steps 3]
                                      [--json-out FILE]

Each mode runs in a fresh spawned process (so its peak RSS is its own): it builds
compare_torch's GPT (LoRA r=8 on the attention and MLP linears for "lora"), runs a warm-up
step (which allocates AdamW's moments), then a forward, and before its backward lists the
arrays the graph keeps (``tinylora.memory.saved_arrays``: activations by the op that made
them, extras by the op whose backward holds them, each buffer once). Then it times a few
steps. Reported per mode: peak RSS of the process (ru_maxrss), RSS after building, the
bytes of parameters, gradients and optimizer state, the kept arrays by class, the median
step time; and the LoRA/full peak ratio.

It measures whichever tinylora comes first on the path: PYTHONPATH=/other/checkout measures
that one (an older tinylora without ``tinylora.memory`` gets this checkout's copy).
"""
from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare_torch import CONFIGS, cpu_name, tinylora_parts, write_json  # noqa: E402

MB = 1 << 20


def _memory_module():
    """tinylora.memory, or (an older tinylora without it) this checkout's file loaded into it."""
    try:
        from tinylora import memory
        return memory
    except ImportError:
        import tinylora
        spec = importlib.util.spec_from_file_location(
            "tinylora.memory", HERE.parent / "tinylora" / "memory.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["tinylora.memory"] = mod
        spec.loader.exec_module(mod)
        tinylora.memory = mod
        return mod


def _rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(config: str, mode: str, threads: int, steps: int) -> dict:
    """One mode's figures (run it in a fresh process: ru_maxrss is the process's peak)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(threads, user_api="blas"):
        import tinylora
        memory = _memory_module()
        model, opt, x, y = tinylora_parts(CONFIGS[config], mode)
        rss_built = _rss_mb()

        def step(inventory=False):
            _, loss = model(x, y)
            kept = memory.saved_arrays(loss) if inventory else None
            loss.backward()
            opt.step()
            opt.zero_grad()
            return kept
        step()                                            # warm-up: AdamW's moments appear
        kept = step(inventory=True)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        params = {id(p): p for p in model.parameters()}.values()
        trainable = [p for p in params if p.requires_grad]
        state = sum(int(a.nbytes) for st in opt.state.values() for a in st.values()
                    if hasattr(a, "nbytes"))
        by_class = memory.by_class(kept)
        return {"mode": mode, "tinylora": str(Path(tinylora.__file__).parent),
                "peak_rss_mb": round(_rss_mb(), 1), "rss_after_build_mb": round(rss_built, 1),
                "params_mb": round(sum(p.data.nbytes for p in params) / MB, 1),
                "trainable_params": sum(p.data.size for p in trainable),
                "grads_mb": round(sum(p.data.nbytes for p in trainable) / MB, 1),
                "optimizer_state_mb": round(state / MB, 1),
                "kept_for_backward_mb": round(sum(by_class.values()) / MB, 1),
                "kept_by_class_mb": {k: round(v / MB, 2) for k, v in by_class.items()},
                "kept_by_shape": _by_shape(kept),
                "step_ms": round(statistics.median(times) * 1e3, 1)}


def _by_shape(kept) -> list:
    """The kept arrays grouped by (class, shape, dtype), largest total first."""
    groups: dict = {}
    for k in kept:
        key = (k.cls, k.shape, k.dtype)
        n, total = groups.get(key, (0, 0))
        groups[key] = (n + 1, total + k.nbytes)
    return [{"class": c, "shape": list(s), "dtype": d, "count": n, "mb": round(total / MB, 2)}
            for (c, s, d), (n, total) in sorted(groups.items(), key=lambda kv: -kv[1][1])]


def _worker(conn, config, mode, threads, steps):
    try:
        conn.send(measure(config, mode, threads, steps))
    except Exception as exc:  # report, don't hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})


def run_mode(ctx, config, mode, threads, steps) -> dict:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(child, config, mode, threads, steps), daemon=True)
    proc.start()
    out = parent.recv()
    proc.join(timeout=30)
    if "error" in out:
        raise RuntimeError(f"{mode} worker failed: {out['error']}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="gpt-6x384", choices=list(CONFIGS))
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--threads", type=int, default=2, help="BLAS threads (default 2)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the inventory (default 3)")
    ap.add_argument("--json-out", default=None, help="also store the JSON here (default: print only)")
    a = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = [run_mode(ctx, a.config, m, a.threads, a.steps) for m in a.modes]
    out = {"config": a.config, **CONFIGS[a.config], "results": rows, "threads": a.threads,
           "processor": cpu_name(), "cpu_count": os.cpu_count(),
           "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
           "date": time.strftime("%Y-%m-%d")}
    peaks = {r["mode"]: r["peak_rss_mb"] for r in rows}
    if {"full", "lora"} <= set(peaks):
        out["lora_over_full_peak"] = round(peaks["lora"] / peaks["full"], 3)
    write_json(out, a.json_out)


if __name__ == "__main__":
    main()
