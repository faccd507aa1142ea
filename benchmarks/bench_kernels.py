"""Fast kernels vs reference definitions: one GPT training step in each mode, alternating.

    python benchmarks/bench_kernels.py [--threads 1] [--rounds 6] [--json-out FILE]

For each configuration, one model and one batch; rounds alternate the modes (fast, reference,
fast, ...) so machine noise hits both alike; medians are reported. Both modes compute the
same values (tests/test_kernels.py); this measures only what the kernels buy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from compare_torch import cpu_name, write_json  # noqa: E402  (the same machine facts and output)
CONFIGS = {
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "gpt-6x384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8),
}


def measure(name, rounds, per_round):
    import tinylora as tl
    from tinylora.backend import np
    from tinylora.models.gpt import GPT, GPTConfig
    from tinylora.optim import AdamW
    cfg = CONFIGS[name]
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=0.1))
    opt = AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, 65, (cfg["batch_size"], cfg["block_size"])) for _ in range(2))

    def step():
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    times = {"fast": [], "reference": []}
    for mode in times:                                   # warm-up
        with tl.kernels_mode(mode):
            step()
    for _ in range(rounds):
        for mode in times:
            with tl.kernels_mode(mode):
                for _ in range(per_round):
                    t = time.perf_counter()
                    step()
                    times[mode].append(time.perf_counter() - t)
    fast, ref = statistics.median(times["fast"]), statistics.median(times["reference"])
    return {"config": name, **cfg, "steps_timed": len(times["fast"]),
            "fast_ms": round(fast * 1e3, 2), "reference_ms": round(ref * 1e3, 2),
            "reference_over_fast": round(ref / fast, 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits
    import numpy
    from tinylora import backend
    backend.tune_malloc()
    rows = []
    with threadpool_limits(a.threads, user_api="blas"):
        for name in a.configs:
            small = CONFIGS[name]["n_embd"] < 256
            rows.append(measure(name, a.rounds, 5 if small else 2))
            print(json.dumps(rows[-1]), file=sys.stderr)
    out = {"results": rows, "threads": a.threads, "numpy": numpy.__version__,
           "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "processor": cpu_name(), "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
           "date": time.strftime("%Y-%m-%d")}
    write_json(out, a.json_out)


if __name__ == "__main__":
    main()
