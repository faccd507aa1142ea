"""The ``tinylora`` command line: thin subcommands over the library.

Each command lives in its own module with ``register(subparsers, name, summary)``, which
adds a parser whose ``func(args)`` does the work and returns an exit code (or None for 0);
the module's docstring is the command's ``--help`` description (passed as ``__doc__``). Shared
conventions: ``--seed``, ``--out``, ``--json`` mean the same everywhere (see ``common``);
an error prints one line and exits 1, with the traceback only under ``--debug``; where
the library's error names its fix as a Python argument (tinylora.hints), the line names the
command's flag for it instead.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import warnings

# (module, one-line description shown by `tinylora --help`), in the order listed there
_COMMANDS = [
    ("demo", "the main job: pretrain a GPT, then full vs LoRA vs QLoRA"),
    ("gradcheck", "check every op's backward against finite differences"),
    ("graph", "draw the autograd graph of a LoRA layer (DOT, SVG)"),
    ("train", "train a character-level GPT (or Llama) on a corpus or text file"),
    ("finetune", "fine-tune a GPT or Llama with LoRA, QLoRA or in full"),
    ("merge", "merge an adapter into its base: a plain checkpoint"),
    ("adapters", "list adapter folders, or inspect one"),
    ("generate", "sample text from a GPT or Llama, optionally with an adapter"),
    ("bench", "benchmark figures (ms/step, tokens/s, memory): a table, or JSON with --json"),
    ("embed", "sentence embeddings with all-MiniLM-L6-v2"),
    ("classify", "fine-tune MiniLM on a built-in task: probe vs LoRA vs full"),
]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


class _TopLevelHelp(argparse.RawDescriptionHelpFormatter):
    """Counts the commands' names at the indentation they are printed with, so that each
    command's line starts in one column (argparse measures them one level too shallow)."""

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action._get_subactions():
                width = len(self._format_action_invocation(sub))
                width += self._current_indent + 2 * self._indent_increment
                self._action_max_length = max(self._action_max_length, width)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinylora",
        description="LoRA and QLoRA fine-tuning from scratch on NumPy/CuPy.",
        formatter_class=_TopLevelHelp,
        epilog="Run `tinylora COMMAND --help` for a command's options and defaults.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="BLAS threads for every command, never changed (default: auto: "
                             "while training, the cores free now, re-checked every few seconds; "
                             "otherwise all cores; also TINYLORA_NUM_THREADS)")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, summary in _COMMANDS:
        module = importlib.import_module(f".{name}_cmd", __name__)
        module.register(sub, name, summary)
    return parser


def _version() -> str:
    from ..version import __version__
    return f"tinylora {__version__}"


def main(argv=None) -> int:
    from .. import backend
    if backend.startup_error is not None:
        print(f"tinylora: error: {backend.startup_error}", file=sys.stderr)
        return 1
    backend.tune_malloc()   # a command owns its process: keep freed arrays in the heap
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    unknown = _unknown_command(argv)
    if unknown is not None:
        names = [n for n, _ in _COMMANDS]
        close = difflib.get_close_matches(unknown, names, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else f"; commands: {', '.join(names)}"
        print(f"tinylora: error: unknown command {unknown!r}{hint}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    debug = args.debug or getattr(args, "debug_cmd", False)
    try:
        if args.threads is not None:
            from ..blas import set_num_threads
            set_num_threads(args.threads)
        if getattr(args, "out", None):  # every command reports an unusable --out the same way
            from ..io import check_folder
            check_folder(args.out, getattr(args, "out_what", "output folder"))
        with warnings.catch_warnings():
            # NumPy's overflow/NaN warnings: the trainer checks every step's loss and gradient
            # itself and stops with one line that says what happened, so they only add noise
            warnings.filterwarnings("ignore", category=RuntimeWarning,
                                    message=r"(overflow|invalid value|divide by zero) encountered")
            code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return 0 if code is None else int(code)
    except KeyboardInterrupt as exc:
        from ..train import TrainingInterrupted
        if isinstance(exc, TrainingInterrupted) and exc.checkpoint:
            again = getattr(args, "resume_hint", None)
            hint = f"; continue with: {again.format(out=args.out)}" if again else ""
            print(f"tinylora {args.command}: interrupted ({exc.signame}) after step {exc.step}; "
                  f"checkpoint saved to {exc.checkpoint}{hint}", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`tinylora adapters list --json | head`): stop quietly, and
        # point stdout at /dev/null so the interpreter's final flush cannot raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by the pipe
    except Exception as exc:  # noqa: BLE001  (every failure becomes one clear line)
        if debug:
            raise
        from .common import error_line       # a fix is named by this command's flag
        print(f"tinylora {args.command}: error: {error_line(exc, getattr(args, '_parser', None))}",
              file=sys.stderr)
        return 1


def _unknown_command(argv):
    """The first positional word when it names no command (global options skipped), else None."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--threads":
            i += 2
            continue
        if word.startswith("-"):
            i += 1
            continue
        return None if word in {n for n, _ in _COMMANDS} else word
    return None


if __name__ == "__main__":
    sys.exit(main())
