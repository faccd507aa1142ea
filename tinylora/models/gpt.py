"""GPT: a decoder-only transformer language model with GPT-2's layout and names.

Module names match Hugging Face's GPT-2 exactly (``transformer.wte``, ``transformer.h.0.attn.c_attn``,
``lm_head``, ...), so LoRA ``target_modules`` and weight files speak the same language.
The only layout difference: HF stores GPT-2's projections as Conv1D (in, out); ours are
Linear (out, in). ``GPT.from_hf`` transposes them on load.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .. import backend
from ..backend import xp
from ..nn import (Block, Dropout, Embedding, KVCache, LayerNorm, Linear, ModuleDict, ModuleList,
                  Parameter)
from .causal_lm import CausalLM, sample_logits
from .gpt2_hf import load_gpt2_hf

__all__ = ["GPTConfig", "GPT", "sample_logits"]


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int          # the longest sequence the model can see (rows of wpe)
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True        # biases in Linear and LayerNorm layers, as GPT-2

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} must be divisible by "
                             f"n_head={self.n_head} (each head gets n_embd / n_head features)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


class GPT(CausalLM):
    """idx (B, T) token ids -> logits (B, T, vocab_size), and the loss when targets are given.
    Input checks, adapter routing, saving and ``generate`` come from ``CausalLM``."""

    context_name = "block_size"
    embedding_key = "transformer.wte.weight"   # lm_head.weight is tied to it

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.transformer = ModuleDict(dict(
            wte=Embedding(config.vocab_size, C),
            wpe=Embedding(config.block_size, C),
            drop=Dropout(config.dropout),
            h=ModuleList([Block(C, config.n_head, config.dropout, config.bias)
                          for _ in range(config.n_layer)]),
            ln_f=LayerNorm(C, bias=config.bias),
        ))
        self.lm_head = Linear(C, config.vocab_size, bias=False)
        # weight tying (Press & Wolf): the output projection is the token embedding itself
        self.lm_head.weight = self.transformer.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02) weights and embeddings, zero biases, and residual
        projections (c_proj) scaled by 1/√(2·n_layer) so the residual stream's variance does
        not grow with depth."""
        proj_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, m in self.named_modules():
            if isinstance(m, (Linear, Embedding)):
                if isinstance(m, Linear) and m.bias is not None:
                    m.bias.data[...] = 0
                if m is self.lm_head:   # tied: initialised as wte
                    continue
                std = proj_std if name.endswith("c_proj") else 0.02
                m.weight.data[...] = backend.normal(0.0, std, m.weight.shape, m.weight.dtype)

    # ------------------------------------------------------------------ forward
    def _forward(self, ids, targets, attention_mask, kv_cache, past):
        tr = self.transformer
        T = ids.shape[1]
        pos = xp.arange(past, past + T)[None]                # (1, T): one row shared by the batch
        x = tr.drop(tr.wte(ids) + tr.wpe(pos))               # (B, T, C) + (1, T, C)
        x = self._run_blocks(tr.h, x, (attention_mask,), kv_cache)
        x = tr.ln_f(x)
        logits = self.lm_head(x)                             # (B, T, V)
        return self._with_loss(logits, targets)

    # ------------------------------------------------------------------ utilities
    def make_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty KV cache for ``batch`` rows of at most ``capacity`` (<= block_size) positions."""
        c = self.config
        cap = c.block_size if capacity is None else min(capacity, c.block_size)
        return KVCache(c.n_layer, batch, c.n_head, cap, c.n_embd // c.n_head,
                       self.transformer.wte.weight.dtype)

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context to ``block_size`` positions (keeps wpe's first rows)."""
        if not 1 <= block_size <= self.config.block_size:
            raise ValueError(f"crop_block_size: block_size must be in [1, {self.config.block_size}], "
                             f"got {block_size}")
        wpe = self.transformer.wpe
        wpe.weight = Parameter(wpe.weight.data[:block_size].copy(), wpe.weight.requires_grad)
        wpe.num_embeddings = block_size
        self.config.block_size = block_size

    @classmethod
    def from_hf(cls, folder, *, dropout: float = 0.0) -> "GPT":
        """A GPT-2 from a Hugging Face folder (config.json + model.safetensors), in the
        default dtype. See ``tinylora.models.gpt2_hf``."""
        return load_gpt2_hf(cls, folder, config_cls=GPTConfig, dropout=dropout)

    def save_hf(self, folder, tokenizer=None) -> str:
        """Write this GPT as a Hugging Face GPT-2 folder that ``from_hf`` and transformers'
        ``GPT2LMHeadModel.from_pretrained`` read. See ``tinylora.models.gpt2_hf``."""
        from .gpt2_hf import save_gpt2_hf
        return save_gpt2_hf(self, folder, tokenizer)

