"""Per-row adapter routing for mixed batches (several LoRA adapters served in one batch).

A model's forward that accepts ``adapter_names`` (one name per batch row, or "__base__")
wraps its body in ``adapter_routing(names)``; adapter layers deep inside read
``current_routing()`` and group the rows by adapter. Models need not know about LoRA, and
LoRA layers need no extra forward arguments.
"""
from __future__ import annotations

import contextlib
import contextvars

BASE = "__base__"

_routing: contextvars.ContextVar = contextvars.ContextVar("tinylora_adapter_routing", default=None)


@contextlib.contextmanager
def adapter_routing(adapter_names):
    """Within this block, batch row i uses adapter ``adapter_names[i]`` (None: no routing)."""
    token = _routing.set(None if adapter_names is None else tuple(adapter_names))
    try:
        yield
    finally:
        _routing.reset(token)


def current_routing():
    """The active per-row adapter names, or None when every row uses the active adapters."""
    return _routing.get()


def rows_by_adapter(names, known, here) -> dict:
    """{adapter: [row indices]} for a layer's mixed batch: rows naming an adapter this layer
    has (``here``) under its name, every other row under BASE. ``known`` is the model's
    adapters: a name that is neither BASE nor one of them is an error."""
    groups = {}
    for i, name in enumerate(names):
        if name != BASE and name not in known and name not in here:
            raise ValueError(f"adapter_names[{i}] = {name!r} is not an adapter of this "
                             f"model (adapters: {sorted(set(known) | set(here))}; "
                             f"'{BASE}' = the base model)")
        groups.setdefault(name if name in here else BASE, []).append(i)
    return groups
