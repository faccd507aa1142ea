"""ModulesToSaveWrapper: a module trained in full for each adapter (e.g. a classifier head).

PEFT's layout: the frozen original at ``original_module``, one trainable copy per adapter
at ``modules_to_save.<adapter>``. The forward runs the active adapter's copy (the original
when adapters are disabled or none of the active ones has a copy here). In a mixed batch,
rows are grouped by adapter like in the LoRA layers; only the first positional argument is
split by rows, the rest are passed to every group unchanged.
"""
from __future__ import annotations

import copy

from .. import backend, nn, ops
from ..backend import xp
from ..nn.module import Module
from ..nn.routing import BASE, current_routing, rows_by_adapter
from ..tensor import Tensor

__all__ = ["ModulesToSaveWrapper"]


class ModulesToSaveWrapper(Module):
    def __init__(self, module: Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters = []
        self.disabled = False
        self.known_adapters = None

    @property
    def adapters(self) -> list:
        return list(self.modules_to_save.keys())

    def update(self, name: str) -> None:
        """Add a copy of the original module for adapter ``name`` (tied tensors inside the
        module stay tied in the copy; ties to modules outside it are not kept)."""
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy in this modules_to_save wrapper")
        clone = copy.deepcopy(self.original_module)
        clone.train(self.training)
        self.modules_to_save[name] = clone

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def adapter_parameters(self, name: str) -> list:
        return list(self.modules_to_save[name].parameters()) if name in self.modules_to_save else []

    def active_module(self) -> Module:
        """The copy of the first active adapter that has one here, else the original."""
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        names = current_routing()
        if names is None or self.disabled or not args:
            return self.active_module()(*args, **kwargs)
        x = args[0]
        n = x.shape[0]
        if len(names) != n:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {n} rows; "
                             "give one adapter name (or '__base__') per row")
        known = self.known_adapters if self.known_adapters is not None else self.modules_to_save
        groups = rows_by_adapter(names, known, self.modules_to_save)
        parts, order = [], []
        for key, rows in groups.items():
            module = self.original_module if key == BASE else self.modules_to_save[key]
            parts.append(module(x[xp.asarray(rows)], *args[1:], **kwargs))
            order.extend(rows)
        out = parts[0] if len(parts) == 1 else ops.cat(parts, 0)
        if order != list(range(n)):
            out = out[xp.asarray(backend.np.argsort(order))]
        return out if isinstance(out, Tensor) else Tensor._wrap(out)

    def extra_repr(self):
        return f"adapters={self.adapters}, active={self.active_adapters}"
