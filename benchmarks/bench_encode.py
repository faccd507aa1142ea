"""Sentence-encoding throughput: tinylora's SentenceEncoder vs sentence-transformers, on CPU.

Both encode the same sentences (about 16 tokens each, all-MiniLM-L6-v2, batch 32) with the
same number of BLAS / torch threads; we report the median time of each. Each side runs in
its own spawned worker process (compare_torch.py's ``Side``): in one process NumPy's
OpenBLAS threads and PyTorch's OpenMP threads spin-wait between calls and steal each
other's cores. One run alternates rounds between the workers (the order rotates) after a
warm-up, with a pause before each round. Prints JSON: sentences/s for each, the ratio
(tinylora / sentence-transformers) and how closely the embeddings agree.

    python benchmarks/bench_encode.py                        # tinylora only, without torch
    PYTHONPATH=. .ref/venv/bin/python benchmarks/bench_encode.py   # both, in the reference venv
    ... bench_encode.py --baseline DIR   # also tinylora from another checkout: before / after
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

from compare_torch import Side  # one worker process per side; see its docstring

# tinylora is imported inside the functions: a --baseline worker must import its own copy

_SUBJECTS = ["the old fisherman", "a young programmer", "my neighbour's cat", "the city council",
             "our new teacher", "the tired nurse", "a small startup", "the orchestra"]
_VERBS = ["quietly repaired", "carefully reviewed", "finally announced", "slowly painted",
          "eagerly explained", "secretly moved", "proudly presented", "gently cleaned"]
_OBJECTS = ["the broken wooden fence near the river", "an unusual plan for the summer festival",
            "three reports about rising housing costs", "the blue boat behind the harbour wall",
            "a long letter to the regional newspaper", "the garden before the heavy rain"]


def sentences(n: int) -> list:
    """n deterministic sentences of about 16 WordPiece tokens ([CLS] and [SEP] included)."""
    out = []
    for i in range(n):
        s = (f"{_SUBJECTS[i % len(_SUBJECTS)]} {_VERBS[(i // 3) % len(_VERBS)]} "
             f"{_OBJECTS[(i // 7) % len(_OBJECTS)]}.")
        out.append(s[0].upper() + s[1:])
    return out


def _build(side: str, n: int, batch_size: int):
    """One side's encode of ``n`` sentences (run in its worker): a step returning (n, H)."""
    from tinylora.models.hub import find_minilm
    texts, folder = sentences(n), find_minilm()
    if side == "torch":
        import sentence_transformers
        import torch
        model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")

        def step():
            with torch.inference_mode():
                return model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
        return step
    from tinylora import backend
    from tinylora.models.sentence import SentenceEncoder
    getattr(backend, "tune_malloc", lambda: None)()   # as tinylora's Trainer and CLI do
    encoder = SentenceEncoder.from_pretrained(folder)
    return lambda: encoder.encode(texts, batch_size=batch_size)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="sentences encoded per round")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds per library")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--settle", type=float, default=0.5,
                    help="seconds to idle before each timed round (lets the other side's "
                         "spinning worker threads go to sleep)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="BLAS threads for NumPy and intra-op threads for torch")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also time tinylora from this checkout (DIR holds its tinylora/)")
    args = ap.parse_args(argv)

    from tinylora.models.hub import find_minilm
    from tinylora.models.sentence import SentenceEncoder
    import numpy as np

    tokenizer = SentenceEncoder.from_pretrained(find_minilm()).tokenizer
    n_tokens = [len(tokenizer.encode(t)) for t in sentences(args.n)]
    try:
        import sentence_transformers
        import torch
    except ImportError:
        torch = sentence_transformers = None
    ctx = mp.get_context("spawn")
    build = functools.partial(_build, n=args.n, batch_size=args.batch_size)
    sides = {"tinylora": Side(ctx, "tinylora", args.threads, build=build)}
    if torch is not None:
        sides["sentence-transformers"] = Side(ctx, "torch", args.threads, build=build)
    if args.baseline:
        sides["baseline"] = Side(ctx, "tinylora", args.threads, build=build,
                                 path=str(Path(args.baseline).resolve()))
    times = {name: [] for name in sides}
    try:
        for s in sides.values():
            s.run(args.warmup)
        order = list(sides)
        for k in range(args.rounds):   # alternate, rotating: drifts in machine load hit all
            for name in order[k % len(order):] + order[:k % len(order)]:
                time.sleep(args.settle)
                times[name] += sides[name].run(1)
        outputs = {name: s.last() for name, s in sides.items()}
    finally:
        peaks = {name: s.close() for name, s in sides.items()}

    per_s = {name: args.n / statistics.median(ts) for name, ts in times.items()}
    result = {
        "sentences_per_s": {k: round(v, 1) for k, v in per_s.items()},
        "median_s_per_round": {k: round(statistics.median(ts), 4) for k, ts in times.items()},
        "ratio_tinylora_over_st": (round(per_s["tinylora"] / per_s["sentence-transformers"], 3)
                                   if "sentence-transformers" in per_s else None),
        "n_sentences": args.n, "batch_size": args.batch_size, "rounds": args.rounds,
        "settle_s": args.settle, "processes": "one spawned worker per side",
        "mean_tokens": round(float(np.mean(n_tokens)), 1), "threads": args.threads,
        "peak_rss_mb": {k: round(v, 1) for k, v in peaks.items()},
        "numpy": np.__version__, "torch": None if torch is None else torch.__version__,
        "sentence_transformers": None if torch is None else sentence_transformers.__version__,
        "python": platform.python_version(),
    }
    if "baseline" in per_s:
        result["baseline"] = str(Path(args.baseline).resolve())
        result["ratio_vs_baseline"] = round(per_s["tinylora"] / per_s["baseline"], 3)
        result["max_abs_diff_vs_baseline"] = float(np.abs(outputs["tinylora"]
                                                          - outputs["baseline"]).max())
    if "sentence-transformers" in outputs:
        a, b = outputs["tinylora"], np.asarray(outputs["sentence-transformers"])
        result["min_cosine"] = float((a * b).sum(axis=1).min())
        result["max_abs_diff"] = float(np.abs(a - b).max())
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
