#!/usr/bin/env bash
# The GPU check: the test suite on CUDA, then tinylora (CuPy) vs PyTorch eager, one JSON.
#
#   bash scripts/gpu_check.sh            # on a machine with an NVIDIA GPU, CuPy and PyTorch
#   bash scripts/gpu_check.sh --dry-run  # anywhere: the same steps on the CPU at tiny sizes
#
# Needs no network and no install: the repository goes on PYTHONPATH. Python: $PYTHON, else
# python3. Writes to $OUT when set (else the repository root):
#   gpu_results.json   environment (GPU, CUDA, CuPy, torch, date), test outcome, benchmark
#   gpu_pytest.log     the tests' output
# Budget, about 8 minutes in all: tests at most $TEST_S s (300), benchmark $BENCH_S s (150).
# Exit status: 0 when the tests and every benchmark measurement passed, else 1.
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DEST=${OUT:-$ROOT}
TEST_S=${TEST_S:-300}
BENCH_S=${BENCH_S:-150}
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
mkdir -p "$DEST"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
say() { echo "gpu_check: $*"; }

# ---------------------------------------------------------------- 1. what is here
"$PY" - <<'EOF'
import importlib, platform
print("gpu_check: python", platform.python_version())
for name in ("numpy", "cupy", "torch", "pytest", "tqdm"):
    try:
        print(f"gpu_check: {name} {importlib.import_module(name).__version__}")
    except ImportError:
        print(f"gpu_check: {name} is not installed")
EOF
if [ $DRY = 0 ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader \
    | sed 's/^/gpu_check: /'
fi

# ---------------------------------------------------------------- 2. the tests on the device
# CPU-only tests (bit-exact resume, fork) skip themselves on CUDA; BERT/sentence/examples and
# host-only files (io, data, cli) are left out to fit the budget. The first CUDA run also
# compiles CuPy's kernels (cached for the benchmark).
if [ $DRY = 1 ]; then
  DEVICE=guard
  TESTS=(tests/test_gpu_parity.py)
  say "dry run: tests on device 'guard' (NumPy behind CuPy's rules), CUDA skipped"
else
  DEVICE=cuda
  TESTS=(tests/test_gpu_parity.py tests/test_device_guard.py tests/test_engine.py
         tests/test_ops_gradcheck.py tests/test_optim.py tests/test_nf4.py tests/test_linear4bit.py
         tests/test_lora_layers.py tests/test_gpt.py tests/test_train.py tests/test_qlora.py
         tests/test_lora_gpt.py tests/test_lora_qlora.py tests/test_lora_merge.py)
fi
EXTRA=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then EXTRA+=(--timeout=120); fi
# A fresh device compiles each CuPy kernel on first use (0.1-0.5 s each) and tiny ops cost
# 10-30 us there: warm CuPy's on-disk kernel cache with one LoRA and one QLoRA step, then
# spread the test files over worker processes (pytest-xdist) when it is installed.
say "warming the kernel cache"
TINYLORA_DEVICE=$DEVICE timeout -k 10 120 "$PY" benchmarks/gpu_warmup.py \
  || say "warm-up failed (the tests will show why)"
if [ $DRY = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then EXTRA+=(-n 4); fi
if "$PY" -c "import pytest" 2>/dev/null; then
  say "pytest on $DEVICE: ${#TESTS[@]} files, at most ${TEST_S}s"
  TINYLORA_DEVICE=$DEVICE timeout -k 10 "$TEST_S" "$PY" -m pytest -p no:cacheprovider \
      --maxfail=5 -rfEs --durations=10 "${EXTRA[@]}" \
      --deselect tests/test_device_guard.py::test_engine_suite_passes_under_the_guard \
      "${TESTS[@]}" 2>&1 | tee "$DEST/gpu_pytest.log"
  TESTS_RC=${PIPESTATUS[0]}
  [ "$TESTS_RC" = 124 ] && say "tests stopped at the ${TEST_S}s limit"
  SUMMARY=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$DEST/gpu_pytest.log" | tail -n 1)
else
  say "pytest is not installed: tests skipped"
  TESTS_RC=0
  SUMMARY="skipped: pytest is not installed"
fi

# ---------------------------------------------------------------- 3. the benchmark
BENCH_ARGS=(--out "$DEST/gpu_results.json" --budget-s $((BENCH_S - 25)) --tests-rc "$TESTS_RC"
            --tests-summary "$SUMMARY")
[ $DRY = 1 ] && BENCH_ARGS+=(--dry-run)
say "benchmark: at most ${BENCH_S}s"
timeout -k 10 "$BENCH_S" "$PY" benchmarks/gpu_bench.py "${BENCH_ARGS[@]}"
BENCH_RC=$?
[ "$BENCH_RC" = 124 ] && say "benchmark stopped at the ${BENCH_S}s limit (the JSON holds what it measured)"

say "tests exit $TESTS_RC ($SUMMARY); benchmark exit $BENCH_RC; results in $DEST"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
