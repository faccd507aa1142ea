"""LoRA layers: a frozen base layer plus named low-rank adapters.

    LoRALinear:    y = base(x)   + Σ_active s_a · (dropout_a(x) Aₐᵀ) Bₐᵀ   A (r, in), B (out, r)
    LoRAEmbedding: y = base(ids) + Σ_active s_a · Aₐ[:, ids]ᵀ Bₐᵀ           A (r, V), B (dim, r)

with s_a = lora_alpha / r (lora_alpha / √r for rsLoRA). The forward multiplies by A, then
by B: it never forms the (out, in) product B·A. The base layer is kept whole at
``.base_layer`` and frozen by the wrapper itself; the wrapper takes the base's place at the
same module path.

    layer = lora.LoRALinear(nn.Linear(64, 32), r=8, lora_alpha=16)   # base frozen, adapter on

What lets several named adapters share a layer (adding and deleting them, mixed batches
where each row picks its adapter, the merge plan, the base fingerprint) lives beside this
file, in ``layer_base.py``; the forward here only asks which adapters run.
"""
from __future__ import annotations

import math

from .. import backend, nn, ops
from .. import functional as F
from ..backend import xp
from ..nn.routing import current_routing
from ..tensor import Tensor
from . import dora
from .layer_base import AdapterWeight, LoraLayerBase, ParameterDict
from .protocol import dense_weight, lora_weight, weight_dtype

__all__ = ["LoraLayer", "LoRALinear", "LoRAEmbedding", "AdapterWeight", "ParameterDict"]


class LoraLayer(LoraLayerBase):
    """A frozen base layer and its adapters: what LoRALinear and LoRAEmbedding share."""

    def __init__(self, base_layer):
        super().__init__(base_layer)
        base_layer.requires_grad_(False)        # frozen: only the adapters train

    def _add_first(self, adapter_name, r, lora_alpha, lora_dropout, init_lora_weights,
                   use_rslora, use_dora) -> None:
        """The constructor's adapter (none when r is None), active from the start."""
        if r is not None:
            self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights,
                              use_rslora, use_dora)
            self.active_adapters = [adapter_name]

    def forward(self, x):
        """base(x) plus the output of every running adapter (see ``running_adapters``)."""
        if self.disabled:
            return self.base_layer(x)
        routing = current_routing()
        if routing is not None:                 # a mixed batch: each row picks its adapter
            return self._forward_routed(x, self.base_layer(x), routing)
        y = self.base_layer(x)
        for name in self.running_adapters():
            y = y + self._delta(name, x, y)
        return y

    def one_plain_adapter(self):
        """The name of the one adapter that runs, when exactly one plain (not DoRA) adapter
        does and rows do not pick their own; else None."""
        names = self.running_adapters()
        if self.disabled or current_routing() is not None or len(names) != 1:
            return None
        return None if self.use_dora[names[0]] else names[0]

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """W ← W + ΔW for adapters ``adapter_names`` (default: the active ones), so
        inference costs nothing extra; the adapter stays, and ``unmerge`` takes it out."""
        plan = self.plan_merge(self.active_adapters if adapter_names is None else adapter_names)
        if plan is None:
            return
        if safe_merge and not bool(xp.isfinite(plan[0]).all()):
            raise ValueError(f"merging {plan[1]} gives non-finite weights; nothing was merged")
        self.commit_merge(plan)

    def unmerge(self) -> None:
        """W ← W − ΔW for every merged adapter, last merged first."""
        if not self.merged_adapters:
            return
        W = dense_weight(self.base_layer)
        for n in reversed(self.merged_adapters):
            if n in self._dora_norms:  # DoRA merged W' = m ⊙ V / ‖V‖: back to V first
                W = W * (self._dora_norms.pop(n) / self.lora_magnitude_vector[n].weight.data)[:, None]
            W = W - self.delta_weight(n).astype(W.dtype, copy=False)
        self.commit_unmerge(W)


class LoRALinear(LoraLayer):
    """A frozen linear base (nn.Linear or a 4-bit Linear) plus adapters; y (..., out) from x (..., in).

    ``LoRALinear(base, r=8, lora_alpha=8)`` freezes the base and adds adapter
    ``adapter_name``, active and trainable (PEFT's arguments). With r=None the wrapper
    starts without adapters (``update_layer`` adds them; ``lora.inject`` does so).

    Adapter a: A (r, in) Kaiming-uniform (bound 1/√in, PyTorch Linear's init, a = √5), or
    N(0, (1/r)²) with init_lora_weights="gaussian" (standard deviation 1/r, as PEFT draws
    it); B (out, r) zero, so adding an adapter changes no output. With use_dora, a magnitude
    m (out,) = ‖W + s·B·A‖_row (see dora.py).
    """

    def __init__(self, base_layer, r: int | None = None, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, adapter_name: str = "default", init_lora_weights=True,
                 use_rslora: bool = False, use_dora: bool = False):
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self._add_first(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights,
                        use_rslora, use_dora)

    def forward(self, x: Tensor) -> Tensor:
        """One plain (not DoRA) adapter running, the common case: base and adapter as the
        one op ``F.lora_linear``. Anything else: the base, then each adapter's output."""
        name = self.one_plain_adapter()
        if name is None:
            return super().forward(x)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            return self.base_layer(x)           # raises the base layer's ShapeError
        xd = self.lora_dropout[name](x)
        return F.lora_linear(x, lora_weight(self.base_layer), self.bias,
                             self.lora_A[name].weight, self.lora_B[name].weight,
                             self.scaling[name], None if xd is x else xd)

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

    def __init__(self, base_layer, r: int | None = None, lora_alpha: float = 8,
                 adapter_name: str = "default", init_lora_weights=True, use_rslora: bool = False):
        super().__init__(base_layer)
        self.num_embeddings = base_layer.num_embeddings
        self.embedding_dim = base_layer.embedding_dim
        self.lora_embedding_A = ParameterDict()
        self.lora_embedding_B = ParameterDict()
        self._add_first(adapter_name, r, lora_alpha, 0.0, init_lora_weights, use_rslora, False)

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
