"""LoRA layers: a frozen base layer plus any number of named low-rank adapters.

    LoRALinear:    y = base(x)   + Σ_active s_a · (dropout_a(x) Aₐᵀ) Bₐᵀ   A (r, in), B (out, r)
    LoRAEmbedding: y = base(ids) + Σ_active s_a · Aₐ[:, ids]ᵀ Bₐᵀ           A (r, V), B (dim, r)

with s_a = lora_alpha / r (lora_alpha / √r for rsLoRA). The forward multiplies by A, then
by B: it never forms the (out, in) product B·A. The base layer is kept whole, unchanged and
frozen, at ``.base_layer``; the wrapper takes its place at the same module path.

Submodule names follow PEFT, so the state-dict keys read ``lora_A.<adapter>.weight``,
``lora_B.<adapter>.weight``, ``lora_embedding_A.<adapter>`` and
``lora_magnitude_vector.<adapter>.weight``.

Which adapters run: ``active_adapters`` (their outputs add up), unless ``disabled`` (base
only), or unless ``nn.current_routing()`` gives each batch row its own adapter (mixed
batches: rows are grouped by adapter, each group runs its adapter once, and the groups'
outputs are put back in row order). Merged adapters live inside the base weight, so the
forward skips them.
"""
from __future__ import annotations

import math

from .. import backend, nn, ops
from .. import functional as F
from ..backend import xp
from ..nn.module import Module, Parameter
from ..nn.routing import BASE, current_routing
from ..tensor import Tensor
from . import dora
from .protocol import dense_weight, weight_digest, weight_dtype, weight_stamp, write_dense_weight

__all__ = ["LoraLayer", "LoRALinear", "LoRAEmbedding", "AdapterWeight", "ParameterDict"]


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


class LoraLayer(Module):
    """What LoRALinear and LoRAEmbedding share: per-adapter settings, the active set,
    mixed-batch routing, merging and the base fingerprint. Subclasses define
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

    # ------------------------------------------------------------------ forward
    def forward(self, x):
        fused = self._fused_forward(x)
        if fused is not None:
            return fused
        result = self.base_layer(x)
        if self.disabled:
            return result
        names = current_routing()
        if names is not None:
            return self._forward_routed(x, result, names)
        for name in self.active_adapters:
            if name in self.r and name not in self.merged_adapters:
                result = result + self._delta(name, x, result)
        return result

    def _fused_forward(self, x):
        """The common case in one op (see LoRALinear); None where it does not apply."""
        return None

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
        groups = {}
        for i, name in enumerate(names):
            if name != BASE and name not in known and name not in self.r:
                raise ValueError(f"adapter_names[{i}] = {name!r} is not an adapter of this "
                                 f"model (adapters: {sorted(set(known) | set(self.r))}; "
                                 f"'{BASE}' = the base model)")
            if name in self.r:
                groups.setdefault(name, []).append(i)
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

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Add adapters (default: the active ones) into the base weight."""
        plan = self.plan_merge(self.active_adapters if adapter_names is None else adapter_names)
        if plan is None:
            return
        if safe_merge and not bool(xp.isfinite(plan[0]).all()):
            raise ValueError(f"merging {plan[1]} gives non-finite weights; nothing was merged")
        self.commit_merge(plan)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight again (last merged first)."""
        if not self.merged_adapters:
            return
        digest = self.base_digest()
        W = dense_weight(self.base_layer)
        for n in reversed(self.merged_adapters):
            if n in self._dora_norms:  # V = W' ⊙ ‖V‖ / m
                W = W * (self._dora_norms.pop(n) / self.lora_magnitude_vector[n].weight.data)[:, None]
            W = W - self.delta_weight(n).astype(W.dtype, copy=False)
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


class LoRALinear(LoraLayer):
    """A frozen linear base (nn.Linear or a 4-bit Linear) plus adapters; y (..., out) from x (..., in).

    Adapter a: A (r, in) Kaiming-uniform (bound 1/√in, PyTorch Linear's init, a = √5), or
    N(0, (1/r)²) with init_lora_weights="gaussian" (standard deviation 1/r, as PEFT draws
    it); B (out, r) zero, so adding an adapter changes no output. With use_dora, a magnitude
    m (out,) = ‖W + s·B·A‖_row (see dora.py).
    """

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.use_dora = {}

    def _add_weights(self, name, r, init, p, use_dora) -> None:
        dt, n_in, n_out = weight_dtype(self.base_layer), self.in_features, self.out_features
        B = xp.zeros((n_out, r), dtype=dt)
        if init == "zeros":
            A = xp.zeros((r, n_in), dtype=dt)
        elif init == "gaussian":
            A = backend.normal(0.0, 1.0 / r, (r, n_in), dt)
        else:
            bound = 1.0 / math.sqrt(n_in)
            A = backend.uniform(-bound, bound, (r, n_in), dt)
            if init is False:  # B as PyTorch would initialise a Linear(r, out)
                B = backend.uniform(-1.0 / math.sqrt(r), 1.0 / math.sqrt(r), (n_out, r), dt)
        self.lora_A[name] = AdapterWeight(A)
        self.lora_B[name] = AdapterWeight(B)
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.use_dora[name] = bool(use_dora)
        if use_dora:
            W = dense_weight(self.base_layer)
            m = dora.weight_norm(W, A, B, self.scaling[name]).astype(dt)
            self.lora_magnitude_vector[name] = AdapterWeight(m)

    def _remove_weights(self, name) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in d:
                del d[name]
        self.use_dora.pop(name, None)
        self._dora_norms.pop(name, None)

    def _fused_forward(self, x):
        """One active, unmerged, plain LoRA adapter and no routing: base and adapter as a
        single op (``F.lora_linear`` on a float nn.Linear, the base's own ``lora_forward`` on
        a 4-bit one): the same values, fewer passes, nodes and kept arrays."""
        base = self.base_layer
        fused = getattr(base, "lora_forward", None)
        if (self.disabled or len(self.active_adapters) != 1 or self.merged_adapters
                or (type(base) is not nn.Linear and fused is None)
                or current_routing() is not None):
            return None
        name = self.active_adapters[0]
        if name not in self.r or self.use_dora[name]:
            return None
        if x.ndim == 0 or x.shape[-1] != base.in_features:
            base(x)  # raises the layer's own ShapeError
        xd = self.lora_dropout[name](x)
        A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        xd = None if xd is x else xd
        if fused is not None:
            return fused(x, A, B, s, xd)
        return F.lora_linear(x, base.weight, base.bias, A, B, s, xd)

    def _delta(self, name, x: Tensor, base_out: Tensor) -> Tensor:
        """Adapter ``name``'s addition to the base output for input x (..., in) -> (..., out)."""
        dropout = self.lora_dropout[name]
        xd = dropout(x)
        A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        if not self.use_dora[name]:
            return ops.linear(ops.linear(xd, A) * s, B)   # scale the thin (..., r) tensor
        W = dense_weight(self.base_layer)
        norm = dora.weight_norm(W, A.data, B.data, s)   # a constant: no graph, no gradient
        if xd is x:  # no dropout now: reuse x Wᵀ from the base output
            bias = self.bias
            base_nobias = base_out if bias is None else base_out - bias
        else:        # PEFT's rule: with dropout, DoRA's base term uses the dropped-out x
            base_nobias = ops.linear(xd, Tensor._wrap(W))
        return dora.dora_delta(xd, base_nobias, A, B, self.lora_magnitude_vector[name].weight, s, norm)

    def delta_weight(self, name):
        """s·B·A (out, in), as an array: what merging adds to the base weight."""
        return self.scaling[name] * (self.lora_B[name].weight.data @ self.lora_A[name].weight.data)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, " + super().extra_repr())


class LoRAEmbedding(LoraLayer):
    """A frozen nn.Embedding (V, dim) plus adapters; ids (...) -> (..., dim).

    Adapter a: A (r, V) zero and B (dim, r) standard normal, as PEFT (and loralib) start
    embedding adapters; the update of the table is ΔW = s·(B·A)ᵀ (V, dim). No dropout:
    PEFT applies none to embedding adapters either.
    """

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.num_embeddings = base_layer.num_embeddings
        self.embedding_dim = base_layer.embedding_dim
        self.lora_embedding_A = ParameterDict()
        self.lora_embedding_B = ParameterDict()
        self.use_dora = {}

    def _add_weights(self, name, r, init, p, use_dora) -> None:
        if use_dora:
            raise ValueError("DoRA is implemented for Linear layers only; leave embeddings out "
                             "of target_modules or set use_dora=False")
        dt = weight_dtype(self.base_layer)
        shape_a, shape_b = (r, self.num_embeddings), (self.embedding_dim, r)
        if init == "zeros":
            A, B = xp.zeros(shape_a, dtype=dt), xp.zeros(shape_b, dtype=dt)
        elif init is False:
            A, B = backend.randn(*shape_a, dtype=dt), backend.randn(*shape_b, dtype=dt)
        else:  # True and "gaussian" alike, as in PEFT
            A, B = xp.zeros(shape_a, dtype=dt), backend.randn(*shape_b, dtype=dt)
        self.lora_embedding_A[name] = A
        self.lora_embedding_B[name] = B
        self.use_dora[name] = False

    def _remove_weights(self, name) -> None:
        for d in (self.lora_embedding_A, self.lora_embedding_B):
            if name in d:
                del d[name]
        self.use_dora.pop(name, None)

    def forward(self, ids):
        ids = xp.asarray(ids.data if isinstance(ids, Tensor) else ids)
        if ids.ndim < 2 and current_routing() is not None and not self.disabled:
            # (T,) position ids and (B,) token ids look alike; only a batch axis tells rows apart
            raise ValueError(f"{type(self).__name__}: ids of shape {tuple(ids.shape)} under per-row "
                             "adapter routing are ambiguous; pass (B, T) ids, or ids that all "
                             "rows share as (1, T)")
        return super().forward(ids)

    def _delta(self, name, ids, base_out: Tensor) -> Tensor:
        """s · A[:, ids]ᵀ Bᵀ: ids (...) -> (..., dim), through the thin (..., r) rows."""
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        rows = F.embedding(ids, A.T)                     # (..., r): column ids of A
        return ops.linear(rows * self.scaling[name], B)  # (..., dim)

    def delta_weight(self, name):
        """s·(B·A)ᵀ (V, dim): what merging adds to the embedding table."""
        B, A = self.lora_embedding_B[name].data, self.lora_embedding_A[name].data
        return self.scaling[name] * (B @ A).T

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, " + super().extra_repr())


def _owner(param_key: str):
    """The adapter a LoRA parameter key belongs to: 'lora_A.<name>.weight' -> name."""
    parts = param_key.split(".")
    if parts[0] in ("lora_A", "lora_B", "lora_magnitude_vector") and len(parts) == 3:
        return parts[1]
    if parts[0] in ("lora_embedding_A", "lora_embedding_B") and len(parts) == 2:
        return parts[1]
    return None
