"""Config validation: a dataclass from a dict read out of a JSON file, with errors that name
the file and the missing, unknown or mistyped fields."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing

from .io import FormatError, _is_int

__all__ = ["ConfigError", "config_from_dict"]


class ConfigError(FormatError):
    """A config dict with missing, unknown or mistyped fields."""


_SCALAR_CHECKS = {bool: lambda v: isinstance(v, bool), int: _is_int,
                  str: lambda v: isinstance(v, str), type(None): lambda v: v is None}


def _type_ok(value, tp):
    """(ok, value converted) for a light check of value against annotation tp."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any or isinstance(tp, (str, typing.TypeVar)):
        return True, value
    if origin in (typing.Union, types.UnionType):
        return next((r for r in (_type_ok(value, a) for a in args) if r[0]), (False, value))
    if origin is typing.Literal:
        return value in args, value
    if tp in _SCALAR_CHECKS:
        return _SCALAR_CHECKS[tp](value), value
    if tp is float:
        ok = _is_int(value) or isinstance(value, float)
        return ok, float(value) if ok else value
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        same = origin is list or len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis)
        if args and same:  # list[T] or tuple[T, ...]: check each element
            checked = [_type_ok(v, args[0]) for v in value]
            if not all(ok for ok, _ in checked):
                return False, value
            value = [v for _, v in checked]
        return True, (tuple(value) if tuple in (tp, origin) else list(value))
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    return True, value  # other classes: not checked here


def config_from_dict(cls, d, *, source: str = "<dict>"):
    """Build dataclass ``cls`` from dict ``d`` (e.g. a loaded JSON config), checking it first.

    Missing required fields and unknown fields are ConfigError listing them by name;
    values are checked lightly against the annotations (int/float/bool/str/list/dict,
    Optional, Literal); ints are accepted for floats, lists for tuples.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"config_from_dict needs a dataclass, got {cls!r}")
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: a {cls.__name__} config must be a JSON object, "
                          f"got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in d if k not in fields]
    if unknown:
        close = [difflib.get_close_matches(str(k), fields, 1) for k in unknown]
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if m else repr(k)
                 for k, m in zip(unknown, close)]
        raise ConfigError(f"{source}: unknown {cls.__name__} field(s): {', '.join(hints)}; "
                          f"known fields: {', '.join(fields)}")
    missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing required {cls.__name__} field(s): "
                          f"{', '.join(missing)}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: fall back to no type checks
        hints = {}
    kwargs = {}
    for name, value in d.items():
        ok, kwargs[name] = _type_ok(value, hints.get(name, typing.Any))
        if not ok:
            tp = hints[name]
            want = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            raise ConfigError(f"{source}: {cls.__name__} field {name!r} must be {want}, got "
                              f"{type(value).__name__} {value!r:.60}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:   # the dataclass's own checks (__post_init__)
        raise ConfigError(f"{source}: {e}") from None

