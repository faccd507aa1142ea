"""`tinylora finetune` stopped with Ctrl-C: the running step finishes, the run folder gets a
checkpoint (only the adapter for LoRA / QLoRA, with the optimizer and trainer state), one
line says how to continue, and `finetune --resume` ends exactly where an uninterrupted run
does. Through the real command line, in a real process, with a real SIGINT."""
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from tinylora.cli import main
from tinylora.io import load_safetensors

from cli_process import start_cli, wait_for_steps

ARGS = ["--data", "builtin:python", "--max-iters", "1500", "--eval-interval", "500",
        "--eval-iters", "2", "--batch-size", "4", "--lora-r", "2", "--no-progress"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    assert main(["train", "--data", "builtin:prose", "--out", str(folder), "--n-layer", "1",
                 "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--max-iters", "4",
                 "--eval-interval", "4", "--eval-iters", "1", "--batch-size", "4",
                 "--dropout", "0.1", "--no-progress"]) == 0
    return folder


def _final_weights(out: Path, method: str) -> dict:
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    return load_safetensors(out / name)[0]


@pytest.mark.cpu_only("compares the resumed run with a clean one bit for bit")
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_interrupted_finetune_saves_and_resumes_bit_for_bit(base, tmp_path, method, capsys):
    how = {"lora": [], "qlora": ["--qlora"], "full": ["--full"]}[method]
    run = tmp_path / "run"
    p = start_cli(["finetune", "--base", str(base), *ARGS, *how, "--out", str(run)])
    wait_for_steps(run / "metrics.jsonl", 2, p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tinylora finetune: interrupted (SIGINT) after step "), err
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert 20 <= step < 1500
    assert f"continue with: tinylora finetune --out {run} --resume" in lines[0]
    latest = json.loads((run / "latest.json").read_text())
    ckpt = run / latest["checkpoint"]
    assert latest["step"] == step and str(ckpt) in lines[0]
    files = sorted(os.listdir(ckpt))
    if method == "full":
        assert "model.safetensors" in files and "adapter_model.safetensors" not in files
    else:   # the adapter only (no copy of the frozen base), with the optimizer and trainer state
        assert files == ["adapter_config.json", "adapter_model.safetensors", "config.json",
                         "optimizer.safetensors", "trainer_state.json"]
        saved = load_safetensors(ckpt / "adapter_model.safetensors")[0]
        assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
    assert not (run / "adapter_model.safetensors").exists()          # no final result yet

    resumed = start_cli(["finetune", "--out", str(run), "--resume", "--no-progress"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "1500 steps" in out

    clean = start_cli(["finetune", "--base", str(base), *ARGS, *how, "--out", str(tmp_path / "clean")])
    out, err = clean.communicate(timeout=300)
    assert clean.returncode == 0, err
    a, b = _final_weights(run, method), _final_weights(tmp_path / "clean", method)
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    # a finished fine-tune says so, and does nothing
    before = {f: os.path.getmtime(run / f) for f in os.listdir(run) if (run / f).is_file()}
    assert main(["finetune", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "already finished (step 1500)" in capsys.readouterr().out
    assert before == {f: os.path.getmtime(run / f) for f in os.listdir(run) if (run / f).is_file()}


def test_resume_refuses_changed_settings_and_an_empty_folder(base, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", "--base", str(base), *ARGS[:1], ARGS[1], "--max-iters", "4",
                 "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2",
                 "--no-progress", "--out", str(run)]) == 0
    (run / "adapter_model.safetensors").unlink()          # as if stopped before the final save
    capsys.readouterr()
    assert main(["finetune", "--out", str(run), "--resume", "--lora-r", "4"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot change --lora-r when resuming" in err
    assert main(["finetune", "--out", str(run), "--resume", "--no-progress"]) == 0  # saves it
    assert (run / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["finetune", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "already finished (step 4)" in capsys.readouterr().out
    assert main(["finetune", "--out", str(run), "--resume", "--max-iters", "6", "--lr", "1e-3",
                 "--no-progress", "--json"]) == 0                  # more steps, a lower lr
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 6 and json.loads((run / "latest.json").read_text())["step"] == 6
    cfg = json.loads((run / "checkpoints" / "step-0000006" / "config.json").read_text())
    assert cfg["finetune_args"]["max_iters"] == 6 and cfg["finetune_args"]["lr"] == 1e-3
    capsys.readouterr()
    assert main(["finetune", "--out", str(tmp_path / "empty"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to resume" in err
    assert main(["finetune", "--data", "builtin:python", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--base" in err and "--pretrained" in err


def test_a_new_finetune_in_the_same_folder_starts_a_new_run(base, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["finetune", "--base", str(base), "--data", "builtin:python", "--eval-interval", "2",
            "--eval-iters", "1", "--batch-size", "2", "--no-progress", "--out", str(run)]
    assert main(argv + ["--max-iters", "6"]) == 0
    assert main(argv + ["--max-iters", "4"]) == 0
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert max(steps) == 4 and steps == sorted(steps)          # no lines of the first run
    assert sorted(os.listdir(run / "checkpoints")) == ["step-0000002", "step-0000004"]
    assert json.loads((run / "latest.json").read_text())["step"] == 4


def test_resume_a_full_finetune_over_an_earlier_result(base, tmp_path, capsys, monkeypatch):
    """OUT already holds a finished --full checkpoint (its config.json); a new run there is
    interrupted (a real SIGINT, sent by the process to itself) and resumed from latest.json."""
    from tinylora.train import Trainer
    run = tmp_path / "run"
    argv = ["finetune", "--base", str(base), "--data", "builtin:python", "--full",
            "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2", "--no-progress",
            "--out", str(run)]
    assert main(argv + ["--max-iters", "2"]) == 0
    real = Trainer._accumulate

    def interrupt_at_step_3(self):
        if self.step + 1 == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)
    monkeypatch.setattr(Trainer, "_accumulate", interrupt_at_step_3)
    capsys.readouterr()
    assert main(argv + ["--max-iters", "6", "--seed", "1"]) == 130
    assert "after step 3; checkpoint saved to" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "_accumulate", real)
    assert main(["finetune", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "6 steps" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["finetune"]["steps"] == 6
