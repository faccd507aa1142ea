"""`tinylora bench TARGET`: benchmark figures (figures to report, not timed tests).

Every target prints a table, or with --json every figure it measured as JSON on stdout
(the form benchmarks/results/ stores); a progress bar goes to stderr unless --no-progress
or --json. Targets register in ``_TARGETS`` as name -> (summary, add_arguments, run). The
PyTorch side of the comparisons lives in benchmarks/compare_torch.py (it needs torch).
"""
from __future__ import annotations

from .common import HelpFormatter, add_json, print_json, table


def _train_args(p) -> None:
    from ..apps.bench import TRAIN_CONFIGS
    p.add_argument("--config", action="append", choices=sorted(TRAIN_CONFIGS), default=None,
                   help="configuration to time (repeatable; default: all)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--threads", type=int, default=None,
                   help="cap BLAS threads (threadpoolctl); default: the library's own setting")
    p.add_argument("--in-process", action="store_true",
                   help="run every config in this process (faster; peak memory is then cumulative)")
    p.add_argument("--mode", default="full", choices=["full", "lora"],
                   help="train every weight, or LoRA r=8 on the attention and MLP linears")


def _train_run(args) -> list:
    from ..apps.bench import TRAIN_CONFIGS, bench_train_step, progress_bar, run_isolated
    fn = bench_train_step if args.in_process else run_isolated
    names = args.config or list(TRAIN_CONFIGS)
    bar, rows = progress_bar(len(names), "bench train", args.progress), []
    for name in names:
        bar.set_postfix_str(name)
        rows.append(fn(name, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                       mode=args.mode))
        bar.update()
    bar.close()
    return rows


def _one_config(p, default="gpt-6x384") -> None:
    from ..apps.bench import TRAIN_CONFIGS
    p.add_argument("--config", default=default, choices=sorted(TRAIN_CONFIGS), help="configuration")
    p.add_argument("--threads", type=int, default=None, help="cap BLAS threads (default: the library's own setting)")


def _lora_args(p) -> None:
    _one_config(p)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per mode")


def _lora_run(args) -> list:
    from ..apps.bench import lora_vs_full
    return [lora_vs_full(args.config, repeats=args.repeats, threads=args.threads,
                         progress=args.progress)]


def _infer_args(p) -> None:
    _one_config(p)
    p.add_argument("--repeats", type=int, default=7, help="timed forwards per model")


def _infer_run(args) -> list:
    from ..apps.bench import inference_figures
    return [inference_figures(args.config, repeats=args.repeats, threads=args.threads,
                              progress=args.progress)]


def _qlora_args(p) -> None:
    _one_config(p)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per run")
    p.add_argument("--matrix", type=int, default=4096, help="side of the square matrix case")


def _qlora_run(args) -> list:
    import sys
    from ..apps.bench_qlora import qlora_figures
    if args.progress:   # its runs are subprocesses and kernels with no steps to count
        print("bench qlora: 4 fine-tuning runs in fresh processes, then the 4-bit layer and "
              "storage figures (minutes at the default sizes) ...", file=sys.stderr, flush=True)
    return [{"target": "qlora", "config": args.config,
             **qlora_figures(args.config, matrix=args.matrix, steps=args.steps, threads=args.threads)}]


def _encode_args(p) -> None:
    p.add_argument("--threads", type=int, default=None, help="cap BLAS threads (default: the library's own setting)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per batch")


def _encode_run(args) -> list:
    from ..apps.bench import encode_figures
    return [encode_figures(batch_size=args.batch_size, threads=args.threads,
                           progress=args.progress)]


_TARGETS = {
    "train": ("one GPT training step (forward, backward, AdamW): ms/step, tokens/s, GFLOP/s, "
              "peak RSS", _train_args, _train_run),
    "lora": ("LoRA vs full fine-tuning of one GPT: step time and peak memory ratios",
             _lora_args, _lora_run),
    "qlora": ("QLoRA vs LoRA: bytes/param, weight and peak memory, step time, NF4 throughput",
              _qlora_args, _qlora_run),
    "infer": ("forward speed: base vs merged LoRA vs unmerged LoRA", _infer_args, _infer_run),
    "encode": ("all-MiniLM-L6-v2 sentence encoding: sentences/s", _encode_args, _encode_run),
}


def register(sub, name, summary):
    p = sub.add_parser(name, help=summary, description=__doc__.splitlines()[0],
                       formatter_class=HelpFormatter)
    targets = p.add_subparsers(dest="target", metavar="TARGET", title="targets", required=True)
    for tname, (tsummary, add_args, _) in _TARGETS.items():
        tp = targets.add_parser(tname, help=tsummary, description=tsummary,
                                formatter_class=HelpFormatter)
        tp.add_argument("--debug", dest="debug_cmd", action="store_true",
                        help="show full tracebacks on errors")
        add_args(tp)
        tp.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")
        add_json(tp)
        tp.set_defaults(func=run, _parser=tp)


def run(args) -> int:
    args.progress = not (args.no_progress or args.json)
    rows = _TARGETS[args.target][2](args)
    if args.json:
        print_json(rows)
        return 0
    if args.target == "train":
        print(table(rows, ["config", "mode", "params", "tokens_per_step", "ms_per_step",
                           "tokens_per_s", "gflops", "mfu", "peak_rss_mb"]))
        blas = rows[0].get("blas", {}) if rows else {}
        print(f"\ndevice {rows[0]['device'] if rows else '?'}, BLAS {blas.get('libraries')}, "
              f"threads requested: {blas.get('threads_requested')}")
    elif args.target == "lora":
        r = rows[0]
        print(table([{"mode": m, "ms_per_step": r[m]["ms_per_step"], "peak_rss_mb": r[m]["peak_rss_mb"],
                      "trainable": r[m]["trainable_params"]}
                     for m in ("full", "lora", "lora_checkpointing")]))
        print(f"\nLoRA/full: time {r['time_ratio']}, peak memory {r['peak_rss_ratio']}; with "
              f"activation checkpointing: time {r['checkpointing_time_ratio']}, peak memory "
              f"{r['checkpointing_peak_rss_ratio']}")
    elif args.target == "qlora":
        print(_qlora_table(rows[0]))
    else:
        print(table([{k: v for k, v in r.items() if k != "blas"} for r in rows]))
    return 0


def _qlora_table(r: dict) -> str:
    """The headline QLoRA figures: one row per model (the GPT and the square matrix)."""
    rows = []
    for kind in ("gpt", "matrix"):
        k = r[kind]
        rows.append({"model": kind, "lora_weight_mb": k["lora"]["weight_mb"],
                     "qlora_weight_mb": k["qlora"]["weight_mb"],
                     "weight_ratio": k["weight_memory_ratio"],
                     "lora_ms": k["step_time"]["lora_ms"], "qlora_ms": k["step_time"]["qlora_ms"],
                     "time_ratio": k["step_time"]["qlora_over_lora"],
                     "peak_rss_ratio": k["train_peak_rss_ratio"]})
    return (table(rows) + f"\n\nconfig {r['config']}, device {r['device']}; every figure "
            "(bytes/param, NF4 throughput, layer speed): --json")
