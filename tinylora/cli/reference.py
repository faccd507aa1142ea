"""docs/cli.md's reference section, made from the parsers themselves so that it cannot drift.

    python -m tinylora.cli.reference --write docs/cli.md   # replace what follows "## Reference"
"""
from __future__ import annotations

import argparse
import os
import sys

MARKER = "## Reference\n"


def _commands(parser, path=()):
    """(command path, parser) of every command that has options (not a group of actions)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                if not nested:
                    yield path + (name,), sub
                yield from _commands(sub, path + (name,))


def markdown(width: int = 100) -> str:
    """Every command's --help, as markdown sections."""
    from . import build_parser
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)      # argparse wraps at the terminal's width
    try:
        parts = []
        for path, parser in _commands(build_parser()):
            lines = [ln for ln in parser.format_help().rstrip().splitlines()
                     if "show this help message and exit" not in ln]
            parts.append(f"### `tinylora {' '.join(path)}`\n\n```text\n" + "\n".join(lines) + "\n```\n")
        return "\n".join(parts)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinylora.cli.reference", description=__doc__)
    ap.add_argument("--write", metavar="FILE", help="replace FILE's text after '## Reference'")
    args = ap.parse_args(argv)
    text = markdown()
    if not args.write:
        sys.stdout.write(text)
        return 0
    from ..io import atomic_write_text
    with open(args.write, encoding="utf-8") as f:
        doc = f.read()
    if MARKER not in doc:
        raise SystemExit(f"{args.write} has no line '## Reference' to write after")
    atomic_write_text(args.write, doc.split(MARKER, 1)[0] + MARKER + "\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
