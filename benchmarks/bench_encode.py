"""Sentence-encoding throughput: tinylora's SentenceEncoder vs sentence-transformers, on CPU.

Both encode the same sentences (about 16 tokens each, all-MiniLM-L6-v2, batch 32) in ONE
process, alternating round by round after a warm-up, with the same number of BLAS / torch
threads; we report the median time of each. Prints JSON: sentences/s for each, the ratio
(tinylora / sentence-transformers) and how closely the embeddings agree.

    python benchmarks/bench_encode.py                        # tinylora only, without torch
    PYTHONPATH=. .ref/venv/bin/python benchmarks/bench_encode.py   # both, in the reference venv
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from tinylora import backend
from tinylora.models.hub import find_minilm
from tinylora.models.sentence import SentenceEncoder

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


def main(argv=None) -> dict:
    backend.tune_malloc()   # as tinylora's Trainer and command line do
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="sentences encoded per round")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds per library")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--settle", type=float, default=0.5,
                    help="seconds to idle before each timed round (lets the other library's "
                         "spinning worker threads go to sleep)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="BLAS threads for NumPy and intra-op threads for torch")
    args = ap.parse_args(argv)

    folder = find_minilm()
    texts = sentences(args.n)
    tl_enc = SentenceEncoder.from_pretrained(folder)
    n_tokens = [len(tl_enc.tokenizer.encode(t)) for t in texts]

    runners = {"tinylora": lambda: tl_enc.encode(texts, batch_size=args.batch_size)}
    st_version = None
    try:
        import torch
        import sentence_transformers
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(args.threads)
        st_model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
        st_version = sentence_transformers.__version__

        def st_encode():
            with torch.inference_mode():
                return st_model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
        runners["sentence-transformers"] = st_encode

    times = {name: [] for name in runners}
    outputs = {}
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for name, run in runners.items():
            for _ in range(args.warmup):
                outputs[name] = run()
        for _ in range(args.rounds):
            for name, run in runners.items():  # alternate, so drifts in machine load hit both
                # Idle BLAS / OpenMP worker threads spin-wait for a while after each call
                # (OpenBLAS ~0.1 s, Intel OpenMP 0.2 s); without a pause the library that ran
                # last steals CPU from the one being timed.
                time.sleep(args.settle)
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)

    per_s = {name: args.n / statistics.median(ts) for name, ts in times.items()}
    result = {
        "sentences_per_s": {k: round(v, 1) for k, v in per_s.items()},
        "median_s_per_round": {k: round(statistics.median(ts), 4) for k, ts in times.items()},
        "ratio_tinylora_over_st": (round(per_s["tinylora"] / per_s["sentence-transformers"], 3)
                                   if "sentence-transformers" in per_s else None),
        "n_sentences": args.n, "batch_size": args.batch_size, "rounds": args.rounds,
        "settle_s": args.settle,
        "mean_tokens": round(float(np.mean(n_tokens)), 1), "threads": args.threads,
        "numpy": np.__version__, "torch": None if torch is None else torch.__version__,
        "sentence_transformers": st_version, "python": platform.python_version(),
    }
    if "sentence-transformers" in outputs:
        a, b = outputs["tinylora"], np.asarray(outputs["sentence-transformers"])
        result["min_cosine"] = float((a * b).sum(axis=1).min())
        result["max_abs_diff"] = float(np.abs(a - b).max())
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
