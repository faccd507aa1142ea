"""The command line's shared conventions: every command's --help works and shows its
defaults, --seed/--out/--json mean the same everywhere, and an error is one line with exit
code 1 (a traceback only with --debug)."""
import argparse
import subprocess
import sys

import pytest

from tinylora.cli import _COMMANDS, build_parser, main


def _subparsers(parser, path=()):
    """(command path, parser) of every command and nested action, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + (name,), sub
                yield from _subparsers(sub, path + (name,))


ALL = list(_subparsers(build_parser()))


def test_top_level_help_lists_every_command_with_its_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = "".join(capsys.readouterr().out.split())    # argparse wraps (also at hyphens)
    for name, summary in _COMMANDS:
        assert name + "".join(summary.split()) in out, name


def test_the_main_job_and_the_new_commands_are_registered():
    names = [n for n, _ in _COMMANDS]
    for cmd in ("demo", "graph", "finetune", "merge", "adapters", "generate", "train"):
        assert cmd in names


@pytest.mark.parametrize("path,parser", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_every_command_help_works_and_shows_defaults(path, parser, capsys):
    with pytest.raises(SystemExit) as e:
        main(list(path) + ["--help"])
    assert e.value.code == 0
    out = "".join(capsys.readouterr().out.split())      # argparse wraps (also at hyphens)
    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS):
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        assert action.option_strings[-1] in out
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if action.default not in (None, argparse.SUPPRESS) and not flag and not action.required:
            assert "".join(f"(default: {action.default})".split()) in out, (path, action.option_strings)


def test_shared_options_mean_the_same_everywhere():
    helps = {"--json": set(), "--seed": set()}
    for path, parser in ALL:
        for action in parser._actions:
            for flag in helps:
                if flag in action.option_strings:
                    helps[flag].add(action.help.split(";")[0].split(" (")[0])
                    if flag == "--seed":
                        assert action.type is int, path
    assert helps["--json"] == {"print the results as JSON on stdout"}
    assert all(h.startswith("random seed") for h in helps["--seed"]), helps["--seed"]


def test_an_error_is_one_line_and_exit_code_1(tmp_path, capsys):
    code = main(["generate", "--checkpoint", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("tinylora generate: error: ")
    assert "does not exist" in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-c", "import sys; from tinylora.cli import main; sys.exit(main())"]
    plain = subprocess.run(cmd + ["generate", "--checkpoint", str(tmp_path / "x")],
                           capture_output=True, text=True)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
    for argv in (["--debug", "generate"], ["generate", "--debug"]):
        debug = subprocess.run(cmd + argv + ["--checkpoint", str(tmp_path / "x")],
                               capture_output=True, text=True)
        assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_docs_cli_md_reference_is_up_to_date():
    from pathlib import Path

    from tinylora.cli.reference import MARKER, markdown
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text(encoding="utf-8")
    assert doc.split(MARKER, 1)[1].strip() == markdown().strip(), \
        "docs/cli.md is out of date: python -m tinylora.cli.reference --write docs/cli.md"


def test_a_mistyped_command_gets_a_suggestion(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "did you mean `train`?" in err
    assert main(["--threads", "1", "xyzzy"]) == 2
    assert "commands: demo" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(tmp_path):
    # the reader closes the pipe at once; the writer must neither print a traceback nor
    # an "error: [Errno 32] Broken pipe" line
    code = ("import sys, os\n"
            "from tinylora.cli import main\n"
            "r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"
            f"sys.exit(main(['adapters', 'list', '--json', {str(tmp_path)!r}]))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 141, p.stderr
    assert p.stderr == ""


@pytest.mark.parametrize("command", ["demo", "train", "finetune", "classify", "graph"])
def test_every_command_names_an_unusable_out_folder_the_same_way(command, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = {"demo": ["--quick"], "train": ["--data", "builtin:prose"],
            "finetune": ["--base", str(tmp_path), "--data", "builtin:python"],
            "classify": [], "graph": []}[command]
    assert main([command, *args, "--out", str(blocker / "sub")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tinylora {command}: error:") and err.count("\n") == 0
    what = "run folder" if command == "train" else "output folder"
    assert f"cannot create the {what} '{blocker / 'sub'}'" in err
    assert "choose a folder you can write to" in err
    assert not (blocker.parent / "sub").exists()


# options whose absence is itself the meaning (an input not given), so there is no default to show
_INPUTS = {"--data", "--base", "--pretrained", "--checkpoint", "--adapter", "--file", "--out"}


@pytest.mark.parametrize("path,parser", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_every_option_without_a_value_default_says_what_happens_when_omitted(path, parser):
    for action in parser._actions:
        if not action.option_strings or action.required or action.default is not None:
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                               argparse._StoreTrueAction, argparse._StoreFalseAction)):
            continue
        if action.option_strings[-1] in _INPUTS:
            continue
        assert "default" in (action.help or ""), (path, action.option_strings)


def test_train_shows_the_library_defaults_and_seeds_like_the_others(capsys):
    from tinylora.train import TrainConfig
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"(default: {TrainConfig().lr}; on --resume: the run's)" in out
    assert "required (except with --resume" in out
    assert TrainConfig().seed == 0
