"""Pretrain a small character-level GPT on English (builtin:prose), then fine-tune it on Python
source (builtin:python) three ways: full fine-tuning, LoRA and QLoRA (4-bit NF4 base + LoRA).
Prints a table (trainable parameters, validation loss before/after, time per step, peak memory,
saved size), samples from the base and adapted models, and writes the adapters, the full
checkpoint, metrics.json, loss curves and the autograd picture of a LoRA layer to --out.
Nothing is downloaded. A finished base in OUT/base/ with the same settings and seed is reused.
"""
from __future__ import annotations

from .common import add_command, add_json, add_out, add_seed, print_json


def register(sub, name, summary):
    p = add_command(sub, name, summary, __doc__)
    add_out(p, "tinylora-demo", "output folder (the base model is cached in OUT/base/)")
    p.add_argument("--quick", action="store_true",
                   help="the smallest settings: a CI-sized run (well under 30 s)")
    add_seed(p)
    p.add_argument("--fresh", action="store_true", help="pretrain again even if OUT/base/ matches")
    p.add_argument("--in-process", action="store_true",
                   help="run every phase in this process (faster start; no per-phase peak memory)")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads per phase (0: auto, the cores free now, as in training); the "
                        "demo's matrices are small, so one thread is as fast on 2 cores and "
                        "leaves its timings alone when the machine gets busy")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..apps.demo import format_report, run_demo
    results = run_demo(args.out, quick=args.quick, seed=args.seed, isolate=not args.in_process,
                       progress=not (args.no_progress or args.json), fresh=args.fresh,
                       threads=args.threads, debug=args.debug or args.debug_cmd)
    if args.json:
        print_json(results)
    else:
        print(format_report(results))
    return 0
