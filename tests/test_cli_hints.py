"""Every hint in the command line's errors names a flag the running command has: the
library's errors carry their fix as a setting (tinylora.hints), and the CLI names it by the
command's own option (check_base=False -> --no-check-base, TrainConfig.lr -> --lr, ...)."""
import re
import shutil

import pytest

from tinylora.cli import build_parser, main
from tinylora.train import Trainer

PYTHON_WORDS = ("check_base", "skip_nonfinite", "TrainConfig", "normalize_ascii", "base=",
                "smaller block_size")
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--eval-iters", "1", "--batch-size", "2", "--no-progress"]


def _flags(command: str) -> set:
    for action in build_parser()._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict) and command in action.choices:
            return {s for a in action.choices[command]._actions for s in a.option_strings}
    raise AssertionError(f"no command {command}")


def _error(capsys, argv, names_a_flag=True) -> str:
    """Run a failing command; its one error line, checked to name only flags it has."""
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", err))
    assert named or not names_a_flag, f"the hint names no flag: {err}"
    assert named <= _flags(argv[0]), (named - _flags(argv[0]), err)
    for word in PYTHON_WORDS:
        assert word not in err, (word, err)
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hints")
    for name, seed in (("base", "0"), ("other", "7")):
        assert main(["train", "--data", "builtin:prose", "--out", str(root / name), "--max-iters",
                     "2", "--eval-interval", "2", "--seed", seed, *TINY]) == 0
    shutil.copytree(root / "base", root / "moved")
    for adapter, base in (("adapter", "base"), ("orphan", "moved")):
        assert main(["finetune", "--base", str(root / base), "--data", "builtin:python",
                     "--out", str(root / adapter), "--max-iters", "2", "--eval-interval", "2",
                     "--eval-iters", "1", "--batch-size", "2", "--lora-r", "2",
                     "--no-progress"]) == 0
    shutil.rmtree(root / "moved")                      # the orphan's base folder is gone
    return root


def test_another_base_names_no_check_base(runs, capsys):
    for argv in (["generate", "--adapter", runs / "adapter", "--checkpoint", runs / "other"],
                 ["merge", "--adapter", runs / "adapter", "--base", runs / "other",
                  "--out", runs / "merged"]):
        err = _error(capsys, argv)
        assert "different base model" in err and "pass --no-check-base to load it anyway" in err
        assert main([str(a) for a in argv] + ["--no-check-base", "--max-new-tokens", "2"]
                    if argv[0] == "generate" else [str(a) for a in argv] + ["--no-check-base"]) == 0
        capsys.readouterr()


def test_a_moved_base_names_the_option_that_gives_it(runs, capsys):
    err = _error(capsys, ["generate", "--adapter", runs / "orphan"])
    assert "does not exist" in err and "(--checkpoint)" in err
    err = _error(capsys, ["merge", "--adapter", runs / "orphan", "--out", runs / "m2"])
    assert "does not exist" in err and "(--base)" in err
    assert main(["generate", "--adapter", str(runs / "orphan"), "--checkpoint", str(runs / "base"),
                 "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("command,argv,flag", [
    ("train", ["--lr", "inf"], "--lr"),
    ("train", ["--grad-accum", "0"], "--grad-accum"),
    ("train", ["--warmup", "-1"], "--warmup"),
    ("finetune", ["--lr", "-1"], "--lr"),
    ("finetune", ["--batch-size", "0"], "--batch-size"),
])
def test_a_bad_training_setting_is_named_by_its_flag(runs, tmp_path, capsys, command, argv, flag):
    src = (["--data", "builtin:prose", *TINY] if command == "train"
           else ["--base", runs / "base", "--data", "builtin:python", "--no-progress"])
    err = _error(capsys, [command, *src, *argv, "--out", tmp_path / "x"])
    assert f"error: {flag} must be" in err


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_a_nonfinite_step_names_skip_nonfinite(runs, tmp_path, capsys, monkeypatch, command):
    real = Trainer._accumulate

    def nan_on_step_2(self):
        loss = real(self)
        return float("nan") if self.step + 1 == 2 else loss
    monkeypatch.setattr(Trainer, "_accumulate", nan_on_step_2)
    src = (["--data", "builtin:prose", *TINY] if command == "train"
           else ["--base", runs / "base", "--data", "builtin:python", "--batch-size", "2",
                 "--eval-iters", "1", "--no-progress"])
    argv = [command, *src, "--max-iters", "3", "--eval-interval", "1", "--out", tmp_path / "a"]
    err = _error(capsys, argv)
    assert "non-finite loss nan at step 2" in err and "pass --skip-nonfinite to skip" in err
    assert main([str(a) for a in argv] + ["--skip-nonfinite", "--out", str(tmp_path / "b")]) == 0


def test_text_outside_the_vocabulary_names_ascii(runs, tmp_path, capsys):
    text = tmp_path / "quotes.txt"
    text.write_text("def f():\n    return \u201cquoted\u201d \u2014 caf\u00e9\n" * 400, encoding="utf-8")
    argv = ["finetune", "--base", runs / "base", "--data", text, "--max-iters", "2",
            "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2", "--no-progress",
            "--out", tmp_path / "a"]
    err = _error(capsys, argv)
    assert "U+201C" in err and "(--ascii folds text to the built-in vocabulary)" in err
    assert main([str(a) for a in argv] + ["--ascii"]) == 0


def test_python_callers_keep_the_python_words(runs):
    from tinylora.apps.finetune import load_finetuned
    from tinylora.lora import BaseModelMismatchError
    with pytest.raises(BaseModelMismatchError, match="pass check_base=False"):
        load_finetuned(runs / "adapter", runs / "other")
    with pytest.raises(FileNotFoundError, match=r"\(base=\.\.\.\)"):
        load_finetuned(runs / "orphan")


def test_too_short_data_offers_block_size_only_where_there_is_one(runs, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n" * 2)
    err = _error(capsys, ["train", "--data", short, *TINY, "--out", tmp_path / "t"])
    assert "too short" in err and "use a smaller --block-size or a longer text" in err
    err = _error(capsys, ["finetune", "--base", runs / "base", "--data", short, "--out",
                          tmp_path / "f"], names_a_flag=False)     # the base fixes the block size
    assert "too short" in err and "; use a longer text" in err
