"""The default training step on a quiet machine and with one core kept busy, in one run.

    python benchmarks/bench_busy.py [--configs gpt-6x384] [--modes full] [--rounds 4]
                                    [--steps 4] [--json-out FILE]

The default is what a user gets without --threads: the Trainer's BLAS thread count, the cores
free now (tinylora.blas.FreeCores). The timed loop is the Trainer itself (``Trainer.train``,
a few steps per round, each step timed from one ``on_step`` to the next), so the count goes
through the same checks as in training: at each round's start and every few seconds.

Rounds alternate quiet and loaded, so drift on the machine hits both alike:
  quiet:  1 thread fixed (what one free core can do: the floor under load), then the default
          step, nothing else started here;
  loaded: a child process spinning on one core (``while True: pass``), started a moment
          before; under it, for context, fixed counts (all cores, then 1 thread:
          ``limit_threads``, an explicit choice the rule leaves alone), then the default.
The default runs last under load and first after it, so each of its rounds starts with the
window since its previous round: the spinner's time (loaded) or the pause without it (quiet).
The first step of every round is not timed (it includes the round's start). Reports medians,
each median over the quiet default's (target: the loaded default <= 1.3x), the threads the
rule chose, and the CPU; JSON with --json-out.
"""
from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from compare_torch import CONFIGS, LORA_TARGETS, VOCAB, cpu_name, write_json  # noqa: E402


class Spinner:
    """A child process keeping one core busy while it lives."""

    def __init__(self):
        self.proc = None

    def start(self, settle: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(settle)   # running, and in the rule's window before the next round

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def make_trainer(cfg: dict, mode: str):
    """A Trainer for the config's GPT (full training, or LoRA r=8 on the four linears)."""
    import tinylora as tl
    from tinylora import lora
    from tinylora.backend import np
    from tinylora.models.gpt import GPT, GPTConfig
    from tinylora.train import TrainConfig, Trainer

    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"]))
    if mode == "lora":
        lora.inject(model, lora.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    tokens = np.random.default_rng(0).integers(0, VOCAB, 200_000)
    config = TrainConfig(max_iters=0, batch_size=cfg["batch_size"], lr=1e-4, warmup_iters=0,
                         eval_interval=0, log_interval=10**9, progress=False)
    stamps = []     # (time, BLAS threads) after each step

    def on_step(trainer):
        stamps.append((time.perf_counter(), tl.get_num_threads()))
    return Trainer(model, (tokens[:150_000], tokens[150_000:]), config, on_step=on_step), stamps


def run_round(trainer, stamps, steps: int, threads: int | None):
    """``steps`` more steps of the Trainer (``threads``: a fixed count, None: the default);
    returns the timed steps' seconds and the thread counts they ran with."""
    from tinylora.blas import limit_threads
    stamps.clear()
    trainer.config.max_iters = trainer.step + steps
    with limit_threads(threads):
        trainer.train()
    times = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    return times, [n for _, n in stamps[1:]]


def measure(name: str, mode: str, rounds: int, steps: int, pause: float, settle: float) -> dict:
    cfg = CONFIGS[name]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    trainer, stamps = make_trainer(cfg, mode)
    run_round(trainer, stamps, 2, None)                # warm-up (and the rule's first window)
    sides = {"quiet_one": [], "quiet_default": [], "loaded_all": [], "loaded_one": [],
             "loaded_default": []}
    chosen = {"quiet_default": collections.Counter(), "loaded_default": collections.Counter()}
    spinner = Spinner()
    try:
        for _ in range(rounds):
            time.sleep(pause)
            sides["quiet_one"] += run_round(trainer, stamps, steps, 1)[0]   # the floor: 1 core
            t, n = run_round(trainer, stamps, steps, None)
            sides["quiet_default"] += t
            chosen["quiet_default"].update(n)
            spinner.start(settle)
            for side, threads in (("loaded_all", cores), ("loaded_one", 1), ("loaded_default", None)):
                t, n = run_round(trainer, stamps, steps, threads)
                sides[side] += t
                if side in chosen:
                    chosen[side].update(n)
            spinner.stop()
    finally:
        spinner.stop()
    med = {k: statistics.median(v) for k, v in sides.items()}
    quiet = med["quiet_default"]
    return {"config": name, "mode": mode, **cfg, "cores": cores, "rounds": rounds,
            "steps_timed_per_round": steps - 1,
            **{f"{k}_ms": round(v * 1e3, 2) for k, v in med.items()},
            **{f"{k}_over_quiet": round(v / quiet, 3) for k, v in med.items() if k != "quiet_default"},
            "threads_chosen": {k: {str(n): c for n, c in sorted(v.items())} for k, v in chosen.items()},
            "target_loaded_over_quiet": 1.3}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["gpt-6x384"], choices=list(CONFIGS))
    ap.add_argument("--modes", nargs="+", default=["full"], choices=["full", "lora"])
    ap.add_argument("--rounds", type=int, default=4, help="quiet/loaded round pairs")
    ap.add_argument("--steps", type=int, default=4, help="steps per round (the first is not timed)")
    ap.add_argument("--pause", type=float, default=1.0, help="quiet seconds before a quiet round")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds the spinner runs before the first loaded round")
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args(argv)
    if a.steps < 2:
        ap.error("--steps must be >= 2 (the first step of a round is not timed)")
    from tinylora import blas
    if blas.explicit_choice():
        ap.error(f"the BLAS thread count is fixed ({blas.explicit_choice()}): unset it to time "
                 "the default")
    import numpy as np
    rows = []
    for name in a.configs:
        for mode in a.modes:
            row = measure(name, mode, a.rounds, a.steps, a.pause, a.settle)
            rows.append(row)
            print({k: v for k, v in row.items() if k.endswith(("_ms", "_over_quiet"))},
                  file=sys.stderr)
    out = {"results": rows, "numpy": np.__version__,
           "blas": [{k: d[k] for k in ("internal_api", "version")} for d in blas.blas_info()],
           "python": platform.python_version(), "machine": platform.machine(),
           "processor": cpu_name(), "cpu_count": os.cpu_count(),
           "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
           "date": time.strftime("%Y-%m-%d")}
    write_json(out, a.json_out)


if __name__ == "__main__":
    main()
