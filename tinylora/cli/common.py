"""Options every command spells the same way, and JSON / table output helpers."""
from __future__ import annotations

import argparse
import json
import sys

from ..apps.report import table  # noqa: F401  (the commands' tables; the demo prints one too)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, a required
    option, an on/off flag)."""

    def _get_help_string(self, action):
        if (action.default is None or action.required or "%(default)" in (action.help or "")
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return action.help
        return super()._get_help_string(action)


def add_command(sub, name: str, summary: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser whose --help shows defaults. A command passes its module's
    ``__doc__`` as ``description`` (argparse re-wraps it, so its line breaks do not matter)."""
    p = sub.add_parser(name, help=summary, description=description or summary,
                       formatter_class=HelpFormatter)
    p.add_argument("--debug", dest="debug_cmd", action="store_true",
                   help="show full tracebacks on errors")
    p.set_defaults(_parser=p)   # the running command's parser: its flags name an error's fix
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


def _target_modules(text: str):
    if text == "all-linear":
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError("--target-modules is empty; give layer names such as c_attn,c_proj or all-linear")
    return names


def lora_config(args, default_targets: str):
    """The LoraConfig of the --lora-* and --target-modules options."""
    from .. import lora
    return lora.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                           target_modules=_target_modules(args.target_modules or default_targets))


# ----------------------------------------------------------------------------- errors

def flag_for(parser, setting: str) -> str | None:
    """The option of ``parser`` that sets ``setting`` (a library argument or config field, as
    a tinylora.hints.Fix names it): the parser's ``setting_flags`` default maps it, else the
    option whose dest is that name. None when the command has none."""
    if parser is None:
        return None
    mapping = parser.get_default("setting_flags") or {}
    if setting in mapping:          # None: the command has an option of that name for another use
        return mapping[setting]
    for action in parser._actions:
        if action.dest == setting and action.option_strings:
            return max(action.option_strings, key=len)
    return None


def error_line(exc: BaseException, parser=None) -> str:
    """The first line of ``exc``'s message, with each fix it carries (tinylora.hints) named
    as the running command's flag instead of the Python argument."""
    from ..hints import fixes_of
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    for fix in fixes_of(exc):
        flag = flag_for(parser, fix.setting)
        if flag is not None:
            msg = msg.replace(fix.python, fix.cli.format(flag=flag))
        elif fix.otherwise is not None:
            msg = msg.replace(fix.python, fix.otherwise)
    return msg
