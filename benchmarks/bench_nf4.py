"""NF4 figures on a 4096x4096 float32 N(0, 1) matrix, printed as JSON (a benchmark, not a test).

    python benchmarks/bench_nf4.py [--size 4096] [--repeat 5]
    TINYLORA_DEVICE=cuda python benchmarks/bench_nf4.py

Reports storage (bytes and bits per parameter, with and without double quantization),
quantize / dequantize throughput in GB/s of float32 input / output (best of --repeat), and
the mean absolute round-trip error of NF4, FP4 and int4-absmax at blocksize 64.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

from tinylora.backend import get_device, is_cuda, np, tune_malloc, xp
from tinylora.quant import dequantize_4bit, quantization_error, quantize_4bit


def _sync() -> None:
    if is_cuda():
        xp.cuda.runtime.deviceSynchronize()


def _best_time(fn, repeat: int) -> float:
    fn()                                   # warm-up (allocator, caches, GPU kernels)
    _sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    tune_malloc()   # as tinylora's Trainer and command line do
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    n = args.size * args.size
    w = xp.asarray(np.random.default_rng(0).standard_normal((args.size, args.size), dtype=np.float32))
    gb = n * 4 / 1e9                       # float32 bytes in (quantize) or out (dequantize)
    out = {"device": get_device(), "shape": [args.size, args.size], "blocksize": args.blocksize,
           "numpy": np.__version__, "python": platform.python_version()}

    for dq in (False, True):
        packed, state = quantize_4bit(w, blocksize=args.blocksize, double_quant=dq)
        total = int(packed.nbytes) + state.nbytes
        key = "double_quant" if dq else "plain"
        t_q = _best_time(lambda: quantize_4bit(w, blocksize=args.blocksize, double_quant=dq), args.repeat)
        t_d = _best_time(lambda: dequantize_4bit(packed, state), args.repeat)
        out[key] = {
            "bytes_per_param": round(total / n, 5),
            "bits_per_param": round(8 * total / n, 4),
            "scale_bits_per_param": round(8 * (total - int(packed.nbytes)) / n, 4),
            "quantize_GBps": round(gb / t_q, 3),
            "quantize_ms": round(1e3 * t_q, 2),
            "dequantize_GBps": round(gb / t_d, 3),
            "dequantize_ms": round(1e3 * t_d, 2),
        }
    out["mean_abs_error_N01"] = {q: round(quantization_error(w, q, args.blocksize), 5)
                                 for q in ("nf4", "fp4", "int4")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
