"""Errors whose fix is a setting, spelled in the words of whoever reads them.

A library error says what went wrong and how to fix it. When the fix is a setting (an
argument a Python caller passes, which the command line spells as a flag), the error
carries it as a ``Fix`` next to its message: the message holds the Python wording, and the
command line, which knows its own flags, shows the flag instead::

    raise hinted(ValueError(f"... or pass check_base=False to load it anyway"),
                 Fix("check_base", "pass check_base=False", "pass {flag}"))

    # Python:              ... or pass check_base=False to load it anyway
    # tinylora generate:   ... or pass --no-check-base to load it anyway

``setting`` names the argument (the CLI finds the option that sets it; see
``tinylora.cli.hints``); ``python`` is the exact text of the message to replace; ``cli`` is
its replacement, with ``{flag}`` for the option; ``otherwise`` replaces it in a command that
has no such option.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Fix", "hinted", "fixes_of"]


@dataclass(frozen=True)
class Fix:
    setting: str       # the argument or config field that fixes it, e.g. "check_base"
    python: str        # its wording in the message, e.g. "pass check_base=False"
    cli: str = "{flag}"  # the command line's wording; {flag} is the option, e.g. "pass {flag}"
    otherwise: str | None = None  # the wording for a command without such an option (None: keep)


def hinted(exc: BaseException, *fixes: Fix) -> BaseException:
    """``exc`` with ``fixes`` attached (each one's ``python`` text is in its message);
    returns it, for ``raise hinted(ValueError(...), Fix(...))``."""
    msg = str(exc)
    for f in fixes:
        if f.python not in msg:     # the renderer replaces that text: it must be there
            raise AssertionError(f"internal: fix text {f.python!r} is not in {msg!r}")
    exc.fixes = tuple(getattr(exc, "fixes", ())) + fixes
    return exc


def fixes_of(exc: BaseException) -> tuple:
    """The Fix objects attached to ``exc`` (none: an empty tuple)."""
    return tuple(getattr(exc, "fixes", ()))
