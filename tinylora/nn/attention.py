"""Causal self-attention (GPT-2's layout) and the KV cache that makes decoding one token cheap."""
from __future__ import annotations

from .. import backend
from .. import functional as F
from ..backend import xp
from ..tensor import Tensor, is_grad_enabled
from .layers import Dropout, Linear
from .module import Module, ShapeError

__all__ = ["CausalSelfAttention", "KVCache", "LayerKVCache", "padding_mask"]


class LayerKVCache:
    """One layer's keys and values for the positions seen so far, in preallocated buffers.

    k, v: (B, nh, capacity, hs); ``length`` positions are filled. Arrays, not graph nodes:
    the cache is for inference (under ``tl.no_grad()``).
    """

    def __init__(self, batch: int, n_head: int, capacity: int, head_size: int, dtype):
        self.k = xp.empty((batch, n_head, capacity, head_size), dtype=dtype)
        self.v = xp.empty((batch, n_head, capacity, head_size), dtype=dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, T: int) -> int:
        """Check that T more positions fit; return where they start (the caller writes them
        and then sets ``length``)."""
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache is full: {self.length} + {T} positions exceed its "
                             f"capacity {self.capacity}; reset it (or recompute) first")
        return self.length

    def append(self, k, v):
        """Store (B, nh, T, hs) new keys/values; return views of all keys/values so far."""
        end = self.reserve(k.shape[2]) + k.shape[2]
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """A LayerKVCache per block; ``length`` is how many positions the model has seen."""

    def __init__(self, n_layer: int, batch: int, n_head: int, capacity: int, head_size: int,
                 dtype=None):
        dt = backend.get_default_dtype() if dtype is None else dtype
        self.layers = [LayerKVCache(batch, n_head, capacity, head_size, dt) for _ in range(n_layer)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    def reset(self) -> None:
        for layer in self.layers:
            layer.length = 0


def padding_mask(attention_mask, dtype=None):
    """(B, S) keep-mask (1/True = a real token, 0/False = padding) -> (B, 1, 1, S) boolean,
    which broadcasts over heads and queries in ``scaled_dot_product_attention``."""
    m = attention_mask.data if isinstance(attention_mask, Tensor) else xp.asarray(attention_mask)
    if m.ndim != 2:
        raise ValueError(f"attention_mask must have shape (B, S) with 1 for tokens and 0 for "
                         f"padding, got shape {tuple(m.shape)}")
    return (m != 0)[:, None, None, :]


class CausalSelfAttention(Module):
    """Multi-head masked self-attention: each position attends to itself and the past.

    c_attn (C -> 3C) makes queries, keys and values in one GEMM; c_proj (C -> C) mixes the
    heads. x (B, T, C) -> (B, T, C).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"CausalSelfAttention: n_embd={n_embd} must be divisible by "
                             f"n_head={n_head}")
        self.n_embd, self.n_head, self.dropout = n_embd, n_head, dropout
        self.c_attn = Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = Dropout(dropout)

    def forward(self, x: Tensor, attention_mask=None, kv_cache: LayerKVCache | None = None) -> Tensor:
        """x (B, T, C). attention_mask: (B, S) keep-mask over all keys (cached + new), 1 for
        tokens, 0 for padding. kv_cache: this layer's cache (inference only); the T new
        positions follow the cached ones."""
        if x.ndim != 3 or x.shape[-1] != self.n_embd:
            raise ShapeError(self, f"expected input of shape (B, T, {self.n_embd}), got {tuple(x.shape)}")
        T, nh = x.shape[1], self.n_head
        p = self.dropout if self.training else 0.0
        qkv = self.c_attn(x)                                     # (B, T, 3C)
        mask = None if attention_mask is None else padding_mask(attention_mask)
        if kv_cache is None:
            if mask is not None and mask.shape[-1] != T:
                raise ShapeError(self, f"attention_mask covers {mask.shape[-1]} positions but "
                                       f"the input has {T}; pass a (B, {T}) mask")
            # one fused op: split into heads, causal attention, merge heads -> (B, T, C)
            y = F.self_attention(qkv, nh, attn_mask=mask, dropout_p=p, is_causal=True)
            return self.resid_dropout(self.c_proj(y))
        if is_grad_enabled() and x.requires_grad:
            raise RuntimeError("the KV cache is for inference: call the model under "
                               "tl.no_grad() when passing a cache")
        past = kv_cache.reserve(T)                               # the T new positions follow
        if mask is not None and mask.shape[-1] != past + T:
            raise ShapeError(self, f"attention_mask covers {mask.shape[-1]} positions but there "
                                   f"are {past + T} keys (cached + new); pass a (B, S) mask")
        # new keys/values into the cache; causal, aligned bottom-right: new query i sees every
        # cached key and the new keys <= i
        y = F.cached_self_attention(qkv, kv_cache.k, kv_cache.v, past, nh, attn_mask=mask)
        kv_cache.length = past + T
        return self.resid_dropout(self.c_proj(y))                # y (B, T, C)

    def extra_repr(self):
        return f"n_embd={self.n_embd}, n_head={self.n_head}, dropout={self.dropout}"
