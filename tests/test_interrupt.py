"""Ctrl-C during training: the running step finishes, a checkpoint is written, one line says
where and how to continue, and the resumed run ends exactly where an uninterrupted one does.
Through the real command line, in a real process, with a real SIGINT."""
import signal
from pathlib import Path

import numpy as np
import pytest

from tinylora.checkpoint import resolve_checkpoint
from tinylora.io import load_safetensors

from cli_process import start_cli, wait_for_steps

ARGS = ["--data", "builtin:prose", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
        "--block-size", "16", "--batch-size", "4", "--max-iters", "400", "--eval-interval", "100",
        "--eval-iters", "2", "--log-interval", "1", "--dropout", "0.1", "--no-progress"]


def _weights(run):
    tensors, _ = load_safetensors(Path(resolve_checkpoint(str(run))) / "model.safetensors")
    return tensors


@pytest.mark.cpu_only("compares the resumed run with a clean one bit for bit")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_train_saves_and_resumes_bit_for_bit(tmp_path, sig):
    run = tmp_path / "run"
    p = start_cli(["train", *ARGS, "--out", str(run)])
    wait_for_steps(run / "metrics.jsonl", 5, p)
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

    resumed = start_cli(["train", "--out", str(run), "--resume", "--no-progress"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "trained 400 steps" in out

    clean = start_cli(["train", *ARGS, "--out", str(tmp_path / "clean")])
    out, err = clean.communicate(timeout=300)
    assert clean.returncode == 0, err
    a, b = _weights(run), _weights(tmp_path / "clean")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    again = start_cli(["train", "--out", str(run), "--resume", "--no-progress"])
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert "already finished (step 400)" in out
