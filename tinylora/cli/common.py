"""Options every command spells the same way, and JSON / table output helpers."""
from __future__ import annotations

import argparse
import json
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, a required
    option, an on/off flag)."""

    def _get_help_string(self, action):
        if (action.default is None or action.required or "%(default)" in (action.help or "")
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return action.help
        return super()._get_help_string(action)


def add_command(sub, name: str, summary: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser whose --help shows defaults."""
    p = sub.add_parser(name, help=summary, description=description or summary,
                       formatter_class=HelpFormatter)
    p.add_argument("--debug", dest="debug_cmd", action="store_true",
                   help="show full tracebacks on errors")
    return p


def add_seed(p: argparse.ArgumentParser, default: int = 0) -> None:
    p.add_argument("--seed", type=int, default=default, help="random seed (weights, data order, dropout)")


def add_out(p: argparse.ArgumentParser, default: str | None, help_text: str = "output folder",
            what: str = "output folder") -> None:
    """--out; ``what`` names the folder in the error an unusable path gets (checked up front)."""
    p.add_argument("--out", default=default, help=help_text)
    p.set_defaults(out_what=what)


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=_jsonable)
    sys.stdout.write("\n")


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain aligned text table from a list of dicts."""
    if not rows:
        return ""
    cols = columns or list(rows[0])
    cells = [[str(c) for c in cols]] + [[_cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-3 or abs(v) >= 1e5) and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)
