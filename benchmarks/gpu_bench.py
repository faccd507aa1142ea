"""tinylora on CuPy vs PyTorch eager on CUDA: one GPT training step, same shapes, float32.

    python benchmarks/gpu_bench.py [--budget-s 140] [--out FILE]   # on a GPU machine
    python benchmarks/gpu_bench.py --dry-run                       # anywhere: tiny sizes, no CUDA

Run by scripts/gpu_check.sh. For each configuration (the two benchmark GPTs and one large
enough to be compute-bound) and mode (full training; LoRA r=8 on the attention and MLP
linears; QLoRA, tinylora only) it builds both models from random tokens, warms both up,
then times steps alternately (tinylora, torch, tinylora, ...), each between device
synchronizations, and reports medians, tokens/s, achieved TFLOP/s, the GPU memory pool's
size, and whether a tinylora step ran with no host sync (``backend.no_host_sync``). A time
budget caps every measurement; what did not fit is listed, with why.

--dry-run: the same steps on the CPU at tiny sizes, tinylora on device "guard" (NumPy behind
CuPy's rules, so the device path is checked; it also counts array operations per step, an
estimate of kernel launches) and torch on the CPU when it is installed. The timings mean
nothing there; the run proves the script works. The JSON goes to ``--out``, else
``$OUT/gpu_results.json`` when OUT is set, else ``gpu_results.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402  (a benchmark script, not the package)

from tinylora import backend, lora, quant  # noqa: E402
from tinylora.models import GPT, GPTConfig  # noqa: E402
from tinylora.optim import AdamW  # noqa: E402

CONFIGS = {   # batch_size and block_size are the step's shape; nanogpt-cpu, gpt-6x384 as tinylora.apps.bench
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "gpt-6x384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8),
    "gpt-12x768": dict(n_layer=12, n_head=12, n_embd=768, block_size=512, batch_size=16),
}
DRY_CONFIGS = {   # the same three, shrunk so that the CPU runs each step in milliseconds
    "nanogpt-cpu": dict(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2),
    "gpt-6x384": dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=2),
    "gpt-12x768": dict(n_layer=2, n_head=4, n_embd=32, block_size=16, batch_size=2),
}
MODES = ("full", "lora", "qlora")
VOCAB = 96            # the built-in corpora's character vocabulary
LORA_R, LORA_ALPHA = 8, 16.0
LORA_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]   # torch_gpt.add_lora's
LR = 1e-3


# ----------------------------------------------------------------------------- helpers

def step_flops(cfg: dict, mode: str) -> float:
    """Model FLOPs of one step (2 per multiply-add; attention's full T×T is computed).

    Forward per token and layer: 12·C² weights in the four linears, 4·T·C for scores and the
    weighted sum; the tied head C·V. Backward: 2× forward where weights train (dx and dW),
    1× for frozen ones (dx only); attention always 2×. LoRA adds r·(in + out) per wrapped
    linear, trained (3×)."""
    L, C, T, B = cfg["n_layer"], cfg["n_embd"], cfg["block_size"], cfg["batch_size"]
    tok = B * T
    linear, attn, head = 2 * tok * L * 12 * C * C, 2 * tok * L * 2 * T * C, 2 * tok * C * VOCAB
    if mode == "full":
        return 3.0 * (linear + attn + head)
    adapters = 2 * tok * L * LORA_R * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    return 2.0 * linear + 3.0 * attn + 2.0 * head + 3.0 * adapters


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(dry_run: bool, torch) -> dict:
    env = {"python": platform.python_version(), "numpy": np.__version__,
           "tinylora_device": backend.get_device(), "git_commit": _git_commit(),
           "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        import cupy
        env["cupy"] = cupy.__version__
        if not dry_run:
            props = cupy.cuda.runtime.getDeviceProperties(0)
            env["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            env["gpu_memory_gib"] = round(props["totalGlobalMem"] / 2**30, 1)
            env["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            env["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    except ImportError:
        env["cupy"] = None
    if torch is not None:
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        if not dry_run and torch.cuda.is_available():
            env["torch_gpu"] = torch.cuda.get_device_name(0)
    return env


class Budget:
    """Seconds left for the whole benchmark; each measurement takes a capped share."""

    def __init__(self, total_s: float):
        self.end = time.perf_counter() + total_s

    def left(self) -> float:
        return self.end - time.perf_counter()


# ----------------------------------------------------------------------------- the two sides

class TinyloraSide:
    name = "tinylora"

    def __init__(self, cfg: dict, mode: str, dry_run: bool):
        shape = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
        backend.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=VOCAB, dropout=0.0, **shape))
        if mode == "qlora":
            quant.quantize_model(model, print_fn=None)
        if mode in ("lora", "qlora"):
            lora.inject(model, lora.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                               target_modules=LORA_TARGETS))
        self.model = model
        self.opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
        rng = np.random.default_rng(0)
        xp = backend.xp   # the batch lives on the device, as torch's does
        self.x, self.y = (xp.asarray(rng.integers(0, VOCAB, (cfg["batch_size"], cfg["block_size"])))
                          for _ in range(2))
        self.cuda = backend.is_cuda()
        self.guard = backend.get_device() == "guard"
        if self.cuda:
            import cupy
            self.cupy = cupy

    def step(self):
        _, loss = self.model(self.x, self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()

    def sync(self):
        if self.cuda:
            self.cupy.cuda.Device().synchronize()

    def extra(self) -> dict:
        """Checks made outside the timings: one step with host syncs forbidden."""
        out = {"params_trained": sum(p.data.size for p in self.model.parameters() if p.requires_grad)}
        if self.guard:              # array operations in one step: about the kernels CuPy launches
            from tinylora import guard
            before = guard.op_count()
            self.step()
            out["array_ops_per_step"] = guard.op_count() - before
        try:
            with backend.no_host_sync():
                self.step()
            out["host_sync_free"] = True
        except backend.HostSyncError as e:
            out["host_sync_free"] = False
            out["host_sync"] = str(e)[:300]
        self.sync()
        if self.cuda:
            out["gpu_pool_mib"] = round(self.cupy.get_default_memory_pool().total_bytes() / 2**20, 1)
        return out

    def close(self):
        self.model = self.opt = self.x = self.y = None
        if self.cuda:
            self.cupy.get_default_memory_pool().free_all_blocks()


class TorchSide:
    name = "torch"

    def __init__(self, torch, cfg: dict, mode: str, device: str):
        from torch_gpt import TorchGPT, add_lora, make_step
        self.torch, self.device = torch, device
        torch.manual_seed(0)
        model = TorchGPT(VOCAB, cfg["block_size"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"])
        model = model.to(device=device, dtype=torch.float32)
        if mode == "lora":
            model = add_lora(model, LORA_R, LORA_ALPHA).to(device)
        self.model = model
        self._step = make_step(model, lr=LR)
        g = torch.Generator().manual_seed(0)
        self.x, self.y = (torch.randint(0, VOCAB, (cfg["batch_size"], cfg["block_size"]),
                                        generator=g).to(device) for _ in range(2))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def step(self):
        self._step(self.x, self.y)

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def extra(self) -> dict:
        out = {"params_trained": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}
        if self.device == "cuda":
            out["gpu_peak_mib"] = round(self.torch.cuda.max_memory_allocated() / 2**20, 1)
        return out

    def close(self):
        self.model = self._step = self.x = self.y = None
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


def measure(sides: list, warmup: int, repeats: int, cap_s: float) -> dict:
    """Warm every side up (one step always: CuPy compiles its kernels then), then time steps
    alternately until each has ``repeats`` timings or ``cap_s`` (warm-up included) is spent;
    at least one timed step each. {name: [seconds, ...]}."""
    t_end = time.perf_counter() + cap_s
    for s in sides:
        for i in range(warmup):
            if i and time.perf_counter() > t_end - cap_s / 2:
                break
            s.step()
        s.sync()
    times = {s.name: [] for s in sides}
    while any(len(t) < repeats for t in times.values()):
        for s in sides:
            if len(times[s.name]) >= repeats:
                continue
            s.sync()
            t0 = time.perf_counter()
            s.step()
            s.sync()
            times[s.name].append(time.perf_counter() - t0)
        if time.perf_counter() > t_end:
            break
    return times


def summarize(ts: list, tokens: int, flops: float) -> dict:
    med = statistics.median(ts)
    return {"ms_median": round(med * 1e3, 3), "ms_min": round(min(ts) * 1e3, 3),
            "steps_timed": len(ts), "tokens_per_s": round(tokens / med, 1),
            "tflops": float(f"{flops / med / 1e12:.4g}")}


# ----------------------------------------------------------------------------- the run

def run(args, path: str) -> dict:
    """Measure every cell within the budget; the JSON is rewritten after each one, so a run
    stopped from outside keeps what it measured."""
    dry = args.dry_run
    notes = []
    try:
        import torch
    except ImportError:
        torch = None
        notes.append("torch is not installed: the PyTorch side is skipped")
    if dry:
        try:
            backend.set_device("guard")
        except backend.DeviceError as e:   # no CuPy: plain NumPy still runs the steps
            notes.append(f"device guard unavailable ({e}); tinylora runs on the CPU")
            backend.set_device("cpu")
        torch_device = "cpu"
        notes.append("dry run: CUDA skipped; tinylora on the CPU (device "
                     f"{backend.get_device()!r}), torch on the CPU; tiny sizes, timings mean nothing")
        configs = DRY_CONFIGS
    else:
        backend.set_device("cuda")         # DeviceError, with its reason, when there is no GPU
        torch_device = "cuda"
        if torch is not None and not torch.cuda.is_available():
            notes.append("torch.cuda.is_available() is False: the PyTorch side is skipped")
            torch = None
        configs = CONFIGS
    if args.configs:
        configs = {k: configs[k] for k in args.configs}
    out = {"script": "benchmarks/gpu_bench.py", "mode": "dry-run" if dry else "gpu",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "env": environment(dry, torch), "budget_s": args.budget_s, "vocab_size": VOCAB,
           "dtype": "float32", "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "targets": LORA_TARGETS},
           "results": [], "skipped": [], "notes": notes}
    if args.tests_rc is not None:
        out["tests"] = {"exit_code": args.tests_rc, "summary": args.tests_summary}
    budget = Budget(args.budget_s)
    for mode in MODES:
        for name, cfg in configs.items():
            left = budget.left()
            if left < args.min_cell_s:
                out["skipped"].append({"config": name, "mode": mode,
                                       "reason": f"time budget spent ({left:.0f} s left)"})
                continue
            out["results"].append(bench_cell(name, cfg, mode, torch, torch_device, dry,
                                             min(args.cell_s, left), args))
            out["elapsed_s"] = round(args.budget_s - budget.left(), 1)
            write_json(path, out)
            print(json.dumps({k: out["results"][-1].get(k) for k in ("config", "mode")}
                             | {"tinylora_ms": out["results"][-1].get("tinylora", {}).get("ms_median"),
                                "torch_ms": out["results"][-1].get("torch", {}).get("ms_median")}),
                  flush=True)
    out["elapsed_s"] = round(args.budget_s - budget.left(), 1)
    return out


def write_json(path: str, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, path)


def bench_cell(name, cfg, mode, torch, torch_device, dry, cap_s, args) -> dict:
    tokens = cfg["batch_size"] * cfg["block_size"]
    flops = step_flops(cfg, mode)
    rec = {"config": name, "mode": mode, **cfg, "tokens_per_step": tokens,
           "model_tflop_per_step": float(f"{flops / 1e12:.4g}")}
    sides = []
    t_build = time.perf_counter()
    try:
        sides.append(TinyloraSide(cfg, mode, dry))
    except Exception as e:
        rec["tinylora"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
    if torch is None:
        rec["torch"] = {"skipped": "torch is not installed" if "torch" not in sys.modules
                        else "no CUDA device for torch"}
    elif mode == "qlora":
        rec["torch"] = {"skipped": "no NF4 layer in plain PyTorch (bitsandbytes is not assumed)"}
    else:
        try:
            sides.append(TorchSide(torch, cfg, mode, torch_device))
        except Exception as e:
            rec["torch"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
    rec["build_s"] = round(time.perf_counter() - t_build, 2)
    try:
        if sides:
            times = measure(sides, args.warmup, args.repeats, cap_s)
            for s in sides:
                rec[s.name] = {**summarize(times[s.name], tokens, flops), **s.extra()}
    except Exception as e:    # one failing cell must not lose the others' numbers
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["trace"] = traceback.format_exc()[-1500:]
    finally:
        for s in sides:
            s.close()
    a, b = rec.get("tinylora", {}).get("ms_median"), rec.get("torch", {}).get("ms_median")
    if a and b:
        rec["tinylora_over_torch_time"] = round(a / b, 2)
    return rec


def main(argv=None) -> int:
    backend.tune_malloc()   # as tinylora's Trainer and command line do
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU; no CUDA needed")
    ap.add_argument("--out", default=None, help="JSON file (default $OUT/gpu_results.json or "
                                                "./gpu_results.json)")
    ap.add_argument("--budget-s", type=float, default=140.0, help="seconds for all measurements")
    ap.add_argument("--cell-s", type=float, default=20.0, help="most seconds of timed steps per "
                                                             "configuration and mode")
    ap.add_argument("--min-cell-s", type=float, default=4.0, help="skip a cell with less left")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), default=None)
    ap.add_argument("--tests-rc", type=int, default=None, help="(gpu_check.sh) the tests' exit code")
    ap.add_argument("--tests-summary", default=None, help="(gpu_check.sh) the tests' last line")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
    path = args.out or os.path.join(os.environ.get("OUT") or ".", "gpu_results.json")
    try:
        out = run(args, path)
    except backend.DeviceError as e:
        print(f"gpu_bench: {e} (use --dry-run on a machine without a GPU)", file=sys.stderr)
        return 2
    failed = [r for r in out["results"] if "error" in r or "error" in r.get("tinylora", {})
              or "error" in r.get("torch", {})]
    out["cells_failed"] = len(failed)
    out["complete"] = True
    write_json(path, out)
    print(f"gpu_bench: {len(out['results'])} measurements, {len(out['skipped'])} skipped, "
          f"{len(failed)} failed -> {path}")
    for note in out["notes"]:
        print(f"gpu_bench: note: {note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
