"""Generation speed with the KV cache: tinylora vs PyTorch eager on the CPU, alternating.

    PYTHONPATH=$PWD python benchmarks/bench_generate.py [--configs gpt-6x384 nanogpt-cpu]
        [--batch-sizes 1 8] [--prompt 32] [--new-tokens 128] [--threads N] [--rounds 5]
        [--baseline DIR] [--tinylora-only] [--json-out FILE]

Both sides hold the same GPT (compare_torch's configurations, float32): tinylora builds it
with seed 0 and the PyTorch side (benchmarks/torch_gpt.py) copies those weights. Each decodes
greedily with the same KV cache semantics (a preallocated cache written in place, the prompt
once, then one token per step; PyTorch under ``torch.inference_mode()``), and the greedy
tokens must come out equal. tokens/s = batch · new tokens / the median time of one
``generate`` call. As in compare_torch.py each side runs in its own spawned process, rounds
alternate with a rotating order, and both get the same thread count. ``--baseline DIR`` also
times tinylora from another checkout (before/after in one run); ``--tinylora-only`` needs no
torch.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare_torch import CONFIGS, VOCAB, Side, alternate, cpu_name, write_json  # noqa: E402


def _tinylora_gpt(name: str):
    import tinylora as tl
    from tinylora.models.gpt import GPT, GPTConfig
    cfg = CONFIGS[name]
    tl.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                         n_head=cfg["n_head"], n_embd=cfg["n_embd"]))


def prompt_ids(batch: int, length: int):
    import numpy as np
    return np.random.default_rng(1).integers(0, VOCAB, (batch, length))


def _build(side: str, name: str, batch: int, prompt: int, new: int):
    """The step a worker times: one greedy ``generate`` call; it returns the ids (host int64)."""
    import tinylora as tl
    getattr(tl.backend, "tune_malloc", lambda: None)()   # as the command line does
    model = _tinylora_gpt(name)
    ids = prompt_ids(batch, prompt)
    if side != "torch":
        return lambda: model.generate(ids, new, temperature=0)
    import torch
    from torch_gpt import TorchGPT
    cfg = CONFIGS[name]
    theirs = TorchGPT(VOCAB, cfg["block_size"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"])
    weights = {k: torch.from_numpy(tl.backend.to_numpy(v.data).copy())
               for k, v in model.state_dict().items()}
    theirs.load_state_dict(weights, strict=True)
    theirs.eval()
    x = torch.from_numpy(ids)
    return lambda: theirs.generate(x, new).numpy()


def run_config(ctx, name, batch, a) -> dict:
    args = (name, batch, a.prompt, a.new_tokens)
    sides = {"tinylora": Side(ctx, "tinylora", a.threads, _build, args)}
    if not a.tinylora_only:
        sides["torch"] = Side(ctx, "torch", a.threads, _build, args)
    if a.baseline:
        sides["baseline"] = Side(ctx, "tinylora", a.threads, _build, args,
                                 str(Path(a.baseline).resolve()))
    try:
        times = alternate(list(sides.values()), a.warmup, a.rounds, 1, a.pause)
        tokens = {k: s.last() for k, s in sides.items()}
    finally:
        peaks = {k: s.close() for k, s in sides.items()}
    med = {k: statistics.median(times[id(s)]) for k, s in sides.items()}
    new = batch * a.new_tokens
    row = {"config": name, "batch_size": batch, "prompt_tokens": a.prompt,
           "new_tokens": a.new_tokens, "calls_timed": a.rounds}
    for k in sides:
        row[f"{k}_ms_per_token_step"] = round(med[k] / a.new_tokens * 1e3, 3)
        row[f"{k}_tokens_per_s"] = round(new / med[k], 1)
        row[f"{k}_peak_rss_mb"] = round(peaks[k], 1)
    if "torch" in sides:
        row["ratio_tokens_per_s"] = round(med["torch"] / med["tinylora"], 3)
        row["tokens_equal"] = check_tokens(tokens["tinylora"], tokens["torch"])
    if "baseline" in sides:
        row["ratio_vs_baseline"] = round(med["baseline"] / med["tinylora"], 3)
        row["baseline_tokens_equal"] = bool((tokens["baseline"] == tokens["tinylora"]).all())
    return row


def check_tokens(ours, theirs) -> bool:
    """The greedy tokens of both sides are equal (the same weights, the same decoding)."""
    if ours.shape != theirs.shape or not (ours == theirs).all():
        diff = [(r, int(c)) for r, c in enumerate((ours != theirs).argmax(axis=1))
                if (ours[r] != theirs[r]).any()]
        raise AssertionError(f"greedy tokens differ from PyTorch's: (row, first position) {diff}")
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["gpt-6x384"], choices=list(CONFIGS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="BLAS threads for tinylora and torch.set_num_threads for PyTorch")
    ap.add_argument("--warmup", type=int, default=1, help="untimed generate calls per side")
    ap.add_argument("--rounds", type=int, default=5, help="timed generate calls per side")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between calls")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also time tinylora from this checkout (before/after in one run)")
    ap.add_argument("--tinylora-only", action="store_true",
                    help="time tinylora alone (no torch needed); default: against PyTorch")
    ap.add_argument("--json-out", default=None, help="also write the JSON here (default: none)")
    a = ap.parse_args(argv)
    for name in a.configs:
        if a.prompt < 1 or a.new_tokens < 1 or a.prompt + a.new_tokens > CONFIGS[name]["block_size"]:
            ap.error(f"--prompt {a.prompt} + --new-tokens {a.new_tokens} must be >= 1 each and "
                     f"fit in {name}'s block_size={CONFIGS[name]['block_size']}")
    if min(a.batch_sizes) < 1 or a.threads < 1 or a.rounds < 1 or a.warmup < 0:
        ap.error("--batch-sizes, --threads and --rounds must be >= 1, --warmup >= 0")
    ctx = mp.get_context("spawn")
    rows = []
    for name in a.configs:
        for batch in a.batch_sizes:
            rows.append(run_config(ctx, name, batch, a))
            print(json.dumps(rows[-1]), file=sys.stderr)
    import numpy as np
    out = {"results": rows, "threads": a.threads, "numpy": np.__version__,
           "python": platform.python_version(), "machine": platform.machine(),
           "processor": cpu_name(), "cpu_count": os.cpu_count(),
           "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
           "date": time.strftime("%Y-%m-%d")}
    if not a.tinylora_only:
        import torch
        out["torch"] = torch.__version__
    write_json(out, a.json_out)
    return out


if __name__ == "__main__":
    main()
