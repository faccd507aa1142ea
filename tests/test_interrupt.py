"""Ctrl-C during training: the running step finishes, a checkpoint is written, one line says
where and how to continue, and the resumed run ends exactly where an uninterrupted one does.
Through the real command line, in a real process, with a real SIGINT."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinylora.checkpoint import resolve_checkpoint
from tinylora.io import load_safetensors

ARGS = ["--data", "builtin:prose", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
        "--block-size", "16", "--batch-size", "4", "--max-iters", "400", "--eval-interval", "100",
        "--eval-iters", "2", "--log-interval", "1", "--dropout", "0.1", "--no-progress"]


def _cli(args, **kw):
    code = "import sys; from tinylora.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def _weights(run):
    tensors, _ = load_safetensors(Path(resolve_checkpoint(str(run))) / "model.safetensors")
    return tensors


def _wait_for_steps(metrics: Path, n: int, proc, timeout=90):
    t = time.time()
    while time.time() - t < timeout:
        if metrics.exists() and metrics.read_text().count('"event": "train"') >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("training made no progress")


@pytest.mark.cpu_only("compares the resumed run with a clean one bit for bit")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_train_saves_and_resumes_bit_for_bit(tmp_path, sig):
    run = tmp_path / "run"
    p = _cli(["train", *ARGS, "--out", str(run)])
    _wait_for_steps(run / "metrics.jsonl", 5, p)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    name = signal.Signals(sig).name
    assert lines[0].startswith(f"tinylora train: interrupted ({name}) after step "), err
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert 5 <= step < 400
    assert f"continue with: tinylora train --out {run} --resume" in lines[0]
    ckpt = resolve_checkpoint(str(run))
    assert ckpt in lines[0] and ckpt.endswith(f"{step:07d}")

    resumed = _cli(["train", "--out", str(run), "--resume", "--no-progress"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "trained 400 steps" in out

    clean = _cli(["train", *ARGS, "--out", str(tmp_path / "clean")])
    out, err = clean.communicate(timeout=300)
    assert clean.returncode == 0, err
    a, b = _weights(run), _weights(tmp_path / "clean")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    again = _cli(["train", "--out", str(run), "--resume", "--no-progress"])
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert "already finished (step 400)" in out
