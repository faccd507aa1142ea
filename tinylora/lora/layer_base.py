"""What every LoRA layer carries besides its math: adapters by name, and their bookkeeping.

``layers.py`` holds the math (LoRALinear, LoRAEmbedding: the forward, the frozen base,
merge and unmerge). This module holds what makes several named adapters live in one layer
the way PEFT's do:

* settings per adapter (``r``, ``lora_alpha``, ``scaling``, ``use_dora``), adding and
  deleting adapters, the active set and the merged ones;
* mixed batches: with ``nn.current_routing()`` set, row i of the batch uses adapter
  names[i] (or the base); rows are grouped by adapter, each group runs its adapter once,
  and the groups' outputs are put back in row order;
* the merge plan (the merged dense weight, computed before anything is written, so a
  non-finite result leaves the layer untouched) and its commit;
* the base fingerprint (a digest of the unmerged base weight that adapter files record).

PEFT's state-dict names: ``lora_A.<adapter>.weight`` and ``lora_B.<adapter>.weight`` (the
adapter matrices sit in bias-free "Linear" modules), ``lora_embedding_A.<adapter>``.
"""
from __future__ import annotations

import math

from .. import backend, ops
from ..backend import xp
from ..nn.module import Module, Parameter
from ..nn.routing import BASE, rows_by_adapter
from ..tensor import Tensor
from . import dora
from .protocol import dense_weight, weight_digest, weight_stamp, write_dense_weight

__all__ = ["LoraLayerBase", "AdapterWeight", "ParameterDict"]


class AdapterWeight(Module):
    """One adapter matrix or vector, in ``.weight`` (PEFT keeps lora_A / lora_B as bias-free
    Linear modules, hence the key ``lora_A.<adapter>.weight``)."""

    def __init__(self, data):
        super().__init__()
        self.weight = Parameter(data)

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight)

    def extra_repr(self):
        return f"shape={tuple(self.weight.shape)}"


class ParameterDict(Module):
    """Parameters keyed by adapter name (state-dict key ``lora_embedding_A.<adapter>``)."""

    def __getitem__(self, key) -> Parameter:
        return self._parameters[key]

    def __setitem__(self, key, value) -> None:
        self._parameters[key] = value if isinstance(value, Parameter) else Parameter(value)

    def __delitem__(self, key) -> None:
        del self._parameters[key]

    def __contains__(self, key) -> bool:
        return key in self._parameters

    def __len__(self):
        return len(self._parameters)

    def __iter__(self):
        return iter(self._parameters)

    def keys(self):
        return self._parameters.keys()

    def extra_repr(self):
        return ", ".join(f"{k}: {tuple(p.shape)}" for k, p in self._parameters.items())


class LoraLayerBase(Module):
    """The bookkeeping under every LoRA layer: per-adapter settings, the active set,
    mixed-batch routing, the merge plan and the base fingerprint. Subclasses define
    ``_add_weights``, ``_remove_weights``, ``_delta`` (the adapter's output) and
    ``delta_weight`` (the adapter's dense update, shaped like the base weight)."""

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.active_adapters = []      # names whose outputs are added, in order
        self.merged_adapters = []      # names already added into the base weight, in order
        self.disabled = False          # True: the base layer alone (lora.disable_adapter)
        self.known_adapters = None     # the model's registry, to tell unknown names in routing
        self.use_dora = {}             # adapter -> DoRA (magnitude and direction) or plain LoRA
        self._dora_norms = {}          # merged DoRA adapter -> ‖V‖ it was merged with
        self._digest = None            # (weight stamp, digest) of the unmerged base weight

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list:
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self):
        """The base layer's weight (models that read ``layer.weight`` keep working)."""
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    def update_layer(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False) -> None:
        """Add adapter ``name``. init_lora_weights: True, "gaussian", False, or "zeros"
        (all zeros without drawing random numbers: for weights about to be loaded)."""
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"{type(self).__name__}: r must be a positive int (the adapter's "
                             f"rank), got {r!r}")
        if not lora_alpha > 0:
            raise ValueError(f"{type(self).__name__}: lora_alpha must be a positive number, "
                             f"got {lora_alpha!r}")
        if not 0 <= lora_dropout < 1:
            raise ValueError(f"{type(self).__name__}: lora_dropout must be in [0, 1), "
                             f"got {lora_dropout!r}")
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self._add_weights(name, r, init_lora_weights, lora_dropout, use_dora)
        for m in self.modules():
            object.__setattr__(m, "training", self.training)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; unmerge first")
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)
        self._remove_weights(name)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def adapter_parameters(self, name: str) -> list:
        """The trainable tensors of adapter ``name`` in this layer."""
        return [p for key, p in self.named_parameters() if _owner(key) == name]

    # ------------------------------------------------------------------ which adapters run
    def running_adapters(self) -> list:
        """The active adapters this layer has and has not merged into its base weight."""
        return [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]

    # ------------------------------------------------------------------ mixed batches
    def _forward_routed(self, x, result: Tensor, names) -> Tensor:
        """Row i of the batch uses adapter names[i] (or the base): one pass per adapter.

        The input's first axis is the batch. An input shared by all rows has a first axis
        of 1 (e.g. position ids (1, T)); each row then gets its own output, (n, ...)."""
        n = len(names)
        lead = result.shape[0] if result.ndim else 0
        shared = lead == 1 and n > 1
        if lead != n and not shared:
            raise ValueError(f"adapter_names has {n} entries but this layer's input has "
                             f"{lead} rows (output shape {tuple(result.shape)}); give one "
                             "adapter name (or '__base__') per row, and pass inputs that all "
                             "rows share with a leading axis of 1")
        if self.merged_adapters:
            raise RuntimeError(f"adapters {self.merged_adapters} are merged into the base "
                               "weight, so rows cannot choose adapters; lora.unmerge(model) first")
        known = self.known_adapters if self.known_adapters is not None else self.r
        groups = rows_by_adapter(names, known, self.r)
        groups.pop(BASE, None)   # the base rows add nothing (zeros below)
        if not groups:
            return result
        parts, order = [], []
        for name, rows in groups.items():
            if shared:  # one pass over the shared input, repeated for the group's rows
                d = self._delta(name, x, result)
                parts.append(ops.expand(d, (len(rows),) + d.shape[1:]))
            else:
                idx = xp.asarray(rows)
                parts.append(self._delta(name, x[idx], result[idx]))
            order.extend(rows)
        if len(order) < n:  # rows of the base (or of adapters this layer lacks) add zero
            rest = sorted(set(range(n)) - set(order))
            zeros = xp.zeros((len(rest),) + result.shape[1:], dtype=result.dtype)
            parts.append(Tensor._wrap(zeros))
            order.extend(rest)
        delta = parts[0] if len(parts) == 1 else ops.cat(parts, 0)
        if order != list(range(n)):
            delta = delta[xp.asarray(backend.np.argsort(order))]
        return result + delta

    # ------------------------------------------------------------------ merging
    def plan_merge(self, names):
        """The merged dense weight for adapters ``names`` (those present and not yet merged),
        computed without writing anything: (W, merged names, DoRA norms), or None."""
        todo = [n for n in names if n in self.r and n not in self.merged_adapters]
        if not todo:
            return None
        W = dense_weight(self.base_layer)
        norms = {}
        for n in todo:
            V = W + self.delta_weight(n).astype(W.dtype, copy=False)
            if self.use_dora.get(n):
                norms[n] = dora.row_norm(V)      # W' = m ⊙ V / ‖V‖_row
                V = (self.lora_magnitude_vector[n].weight.data / norms[n])[:, None] * V
            W = V
        return W, todo, norms

    def commit_merge(self, plan) -> None:
        """Write a ``plan_merge`` result into the base layer."""
        W, todo, norms = plan
        digest = self.base_digest()  # the unmerged base's, kept while merged
        write_dense_weight(self.base_layer, W)
        self.merged_adapters.extend(todo)
        self._dora_norms.update(norms)
        self._digest = (weight_stamp(self.base_layer), digest)

    def commit_unmerge(self, W) -> None:
        """Write the unmerged dense weight W into the base layer; nothing is merged after."""
        digest = self.base_digest()  # the pre-merge digest, kept through merge and unmerge
        write_dense_weight(self.base_layer, W)
        self.merged_adapters = []
        self._digest = (weight_stamp(self.base_layer), digest)

    # ------------------------------------------------------------------ fingerprint
    def base_digest(self) -> str:
        """Digest of the base weight as it was before any merge (see protocol.weight_digest).

        Cached while the weight is untouched; merge and unmerge keep the pre-merge digest,
        so float rounding in merge-then-unmerge does not make the base look different."""
        stamp = weight_stamp(self.base_layer)
        if self._digest is not None and (self.merged_adapters or self._digest[0] == stamp):
            return self._digest[1]
        self._digest = (stamp, weight_digest(self.base_layer))
        return self._digest[1]

    def extra_repr(self):
        return f"adapters={self.adapters}, active={self.active_adapters}, merged={self.merged_adapters}"




def _owner(param_key: str):
    """The adapter a LoRA parameter key belongs to: 'lora_A.<name>.weight' -> name."""
    parts = param_key.split(".")
    if parts[0] in ("lora_A", "lora_B", "lora_magnitude_vector") and len(parts) == 3:
        return parts[1]
    if parts[0] in ("lora_embedding_A", "lora_embedding_B") and len(parts) == 2:
        return parts[1]
    return None
