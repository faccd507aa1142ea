"""QLoRA figures, printed as JSON (a benchmark, not a test).

    python benchmarks/bench_qlora.py [--config gpt-6x384] [--matrix 4096] [--steps 3] [--threads N]
    TINYLORA_DEVICE=cuda python benchmarks/bench_qlora.py

LoRA vs QLoRA fine-tuning of the GPT config and of one square matrix (each run in a fresh
subprocess: weight memory, step time, peak RSS), bytes per parameter of the 4-bit base,
quantize / dequantize throughput, one layer's forward + backward float vs NF4, and the
mean absolute error of NF4 / FP4 / int4 on N(0, 1). See ``tinylora.apps.bench_qlora``.
"""
from tinylora.apps.bench_qlora import _main

if __name__ == "__main__":
    _main()
