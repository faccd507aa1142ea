"""The GPT-2 transformer block: pre-norm attention and MLP, each added back to the residual."""
from __future__ import annotations

from ..tensor import Tensor
from .attention import CausalSelfAttention, LayerKVCache
from .layers import GELU, Dropout, LayerNorm, Linear
from .module import Module

__all__ = ["MLP", "Block"]


class MLP(Module):
    """c_fc (C -> 4C), GELU (tanh approximation, as GPT-2), c_proj (4C -> C), dropout."""

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.c_fc = Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = GELU(approximate="tanh")
        self.c_proj = Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(·)). x (B, T, C) -> (B, T, C)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: Tensor, attention_mask=None, kv_cache: LayerKVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attention_mask=attention_mask, kv_cache=kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x
