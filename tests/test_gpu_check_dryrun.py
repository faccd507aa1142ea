"""scripts/gpu_check.sh --dry-run: the GPU check's own steps on the CPU, so the script cannot rot.

The dry run runs the same tests and benchmark cells as on a GPU, at tiny sizes: tinylora on
device "guard", PyTorch on the CPU when it is installed (skipped, saying so, when not).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None
CONFIGS = ("nanogpt-cpu", "gpt-6x384", "gpt-12x768")
MODES = ("full", "lora", "qlora")


def _env(tmp_path) -> dict:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("TINYLORA_DEVICE", None)
    return env


def test_gpu_check_dry_run_writes_the_full_report(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "CUDA skipped" in out and "device 'guard'" in out
    data = json.loads((tmp_path / "gpu_results.json").read_text())
    assert data["mode"] == "dry-run" and data["complete"] and data["cells_failed"] == 0
    assert data["env"]["tinylora_device"] == "guard" and "cupy" in data["env"]
    assert data["date"] and data["dtype"] == "float32"
    assert data["tests"]["exit_code"] == 0 and "passed" in data["tests"]["summary"]
    assert "test_gpu_parity" in (tmp_path / "gpu_pytest.log").read_text()
    assert {(r["config"], r["mode"]) for r in data["results"]} == {(c, m) for c in CONFIGS
                                                                  for m in MODES}
    for r in data["results"]:
        tiny = r["tinylora"]
        assert tiny["ms_median"] > 0 and tiny["steps_timed"] >= 1 and tiny["params_trained"] > 0
        assert tiny["array_ops_per_step"] > 100 and isinstance(tiny["host_sync_free"], bool)
        torch_side = r["torch"]
        if not HAS_TORCH:
            assert torch_side == {"skipped": "torch is not installed"}
        elif r["mode"] == "qlora":
            assert "no NF4 layer" in torch_side["skipped"]
        else:
            assert torch_side["ms_median"] > 0 and r["tinylora_over_torch_time"] > 0
    if not HAS_TORCH:
        assert "torch is not installed" in out


def test_gpu_bench_without_a_gpu_says_so(tmp_path):
    cupy = pytest.importorskip("cupy")
    if cupy.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--out", str(tmp_path / "r.json")],
                          cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no usable GPU" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "r.json").exists()
