"""`tinylora bench TARGET`: benchmark figures as JSON (figures to report, not timed tests).

Targets register in ``_TARGETS`` as name -> (summary, add_arguments, run); later ones
(lora, qlora, encode, infer) add a row there.
"""
from __future__ import annotations

from .common import HelpFormatter, add_json, print_json, table


def _train_args(p) -> None:
    from ..bench import TRAIN_CONFIGS
    p.add_argument("--config", action="append", choices=sorted(TRAIN_CONFIGS), default=None,
                   help="configuration to time (repeatable; default: all)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--threads", type=int, default=None,
                   help="cap BLAS threads (threadpoolctl); default: the library's own setting")
    p.add_argument("--in-process", action="store_true",
                   help="run every config in this process (faster; peak memory is then cumulative)")


def _train_run(args) -> list:
    from ..bench import TRAIN_CONFIGS, bench_train_step, run_isolated
    fn = bench_train_step if args.in_process else run_isolated
    return [fn(name, warmup=args.warmup, repeats=args.repeats, threads=args.threads)
            for name in (args.config or list(TRAIN_CONFIGS))]


_TARGETS = {
    "train": ("one GPT training step (forward, backward, AdamW): ms/step, tokens/s, peak RSS",
              _train_args, _train_run),
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
        add_json(tp)
        tp.set_defaults(func=run)


def run(args) -> int:
    rows = _TARGETS[args.target][2](args)
    if args.json:
        print_json(rows)
    else:
        cols = ["config", "params", "tokens_per_step", "ms_per_step", "tokens_per_s", "peak_rss_mb"]
        print(table(rows, cols))
        blas = rows[0].get("blas", {}) if rows else {}
        print(f"\ndevice {rows[0]['device'] if rows else '?'}, BLAS {blas.get('libraries')}, "
              f"threads requested: {blas.get('threads_requested')}")
    return 0
