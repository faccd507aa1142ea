"""Llama: the decoder of today's small open LLMs (Llama 2/3, TinyLlama, SmolLM2, Qwen2).

Against GPT-2 it changes four things: RMSNorm instead of LayerNorm, rotary position
embedding on q and k instead of a learned position table, a gated SwiGLU MLP
(``down(silu(gate(x)) * up(x))``) instead of GELU, and grouped-query attention (fewer K/V
heads than query heads). Module names follow Hugging Face's ``LlamaForCausalLM``
(``model.layers.0.self_attn.q_proj``, ``model.layers.0.mlp.gate_proj``, ``lm_head``, ...),
so weight files and PEFT adapters speak the same language. Qwen2 is the same model with
biases on q/k/v (``model_type="qwen2"``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import backend
from .. import functional as F
from ..backend import xp
from ..nn import Embedding, KVCache, Linear, Module, ModuleList, Parameter, ShapeError
from ..nn.attention import LayerKVCache, padding_mask
from ..tensor import Tensor, is_grad_enabled
from .causal_lm import CausalLM

__all__ = ["LlamaConfig", "Llama", "RMSNorm"]

MODEL_TYPES = ("llama", "qwen2")


@dataclass
class LlamaConfig:
    """Hugging Face's field names and defaults (LlamaConfig); ``model_type="qwen2"`` puts the
    attention biases on q/k/v only, as Qwen2 does (``attention_bias=True`` then)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None   # None: as many as query heads (no grouping)
    head_dim: int | None = None              # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048      # the longest sequence (rotary: no table to outgrow)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None         # {"rope_type": "llama3" | "linear", "factor": ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False             # llama: q, k, v, o biases; qwen2: q, k, v
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads={self.num_attention_heads} must be "
                             f"a multiple of num_key_value_heads={self.num_key_value_heads} "
                             "(each K/V head serves a whole group of query heads)")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even (rotary "
                             "embedding turns pairs of features)")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig.model_type must be one of {MODEL_TYPES}, "
                             f"got {self.model_type!r}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"LlamaConfig.attention_dropout must be in [0, 1), "
                             f"got {self.attention_dropout}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    def to_dict(self) -> dict:
        return asdict(self)


_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}


def _check_rope_scaling(rs):
    """None, or a dict with "rope_type" (HF 4.x also spelled it "type") and its fields."""
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"LlamaConfig.rope_scaling must be a dict or None, got {rs!r}")
    rs = dict(rs)
    kind = rs.pop("type", None)
    rs["rope_type"] = rs.get("rope_type", kind) or "default"
    if rs["rope_type"] == "default":
        return None
    if rs["rope_type"] not in _ROPE_KEYS:
        raise ValueError(f"rope_scaling rope_type={rs['rope_type']!r} is not supported "
                         f"(tinylora implements 'default', 'linear' and 'llama3')")
    missing = [k for k in _ROPE_KEYS[rs["rope_type"]] if k not in rs]
    if missing:
        raise ValueError(f"rope_scaling of type {rs['rope_type']!r} lacks {', '.join(missing)}")
    return rs


class RMSNorm(Module):
    """y = x / √(mean(x²) + eps) ⊙ weight over the last axis (weight starts at ones)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        dt = backend.get_default_dtype() if dtype is None else dtype
        self.weight = Parameter(xp.ones(hidden_size, dtype=dt))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.hidden_size, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}"


class LlamaAttention(Module):
    """Grouped-query self-attention with rotary q and k. x (B, T, C) -> (B, T, C)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = config
        self.n_head, self.n_kv_head, self.head_dim = (c.num_attention_heads,
                                                      c.num_key_value_heads, c.head_dim)
        self.dropout = c.attention_dropout
        qkv_bias, o_bias = c.attention_bias, c.attention_bias and c.model_type == "llama"
        self.q_proj = Linear(c.hidden_size, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(c.hidden_size, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(c.hidden_size, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.n_head * self.head_dim, c.hidden_size, bias=o_bias)

    def forward(self, x: Tensor, cos, sin, attention_mask=None,
                kv_cache: LayerKVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).reshape(B, T, nh, hd).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).reshape(B, T, nkv, hd).transpose(1, 2)    # (B, nkv, T, hd)
        v = self.v_proj(x).reshape(B, T, nkv, hd).transpose(1, 2)    # (B, nkv, T, hd)
        q, k = F.apply_rotary(q, cos, sin), F.apply_rotary(k, cos, sin)   # rotate by position
        if kv_cache is not None:
            if is_grad_enabled() and x.requires_grad:
                raise RuntimeError("the KV cache is for inference: call the model under "
                                   "tl.no_grad() when passing a cache")
            ks, vs = kv_cache.append(k.data, v.data)                 # (B, nkv, S, hd), S = past + T
            k, v = Tensor._wrap(ks), Tensor._wrap(vs)
        mask = None if attention_mask is None else padding_mask(attention_mask)
        if mask is not None and mask.shape[-1] != k.shape[2]:
            raise ShapeError(self, f"attention_mask covers {mask.shape[-1]} positions but there "
                                   f"are {k.shape[2]} keys (cached + new); pass a (B, S) mask")
        p = self.dropout if self.training else 0.0
        # causal, aligned bottom-right: new query i sees every cached key and new keys <= i
        y = F.grouped_query_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)                 # heads side by side again
        return self.o_proj(y)


class LlamaMLP(Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), C -> intermediate_size -> C."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, H, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(C, H, bias=b)
        self.up_proj = Linear(C, H, bias=b)
        self.down_proj = Linear(H, C, bias=b)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(Module):
    """x + attn(norm(x)), then + mlp(norm(·)). x (B, T, C) -> (B, T, C)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos, sin, attention_mask=None, kv_cache=None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, kv_cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class LlamaModel(Module):
    """The trunk: embed_tokens, the decoder layers, the final norm (HF's ``model.``)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = ModuleList([LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(CausalLM):
    """idx (B, T) token ids -> logits (B, T, vocab_size), and the loss when targets are given.
    Input checks, adapter routing, saving and ``generate`` come from ``CausalLM``."""

    context_name = "max_position_embeddings"
    embedding_key = "model.embed_tokens.weight"   # lm_head.weight is tied to it if configured

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:   # the output projection is the token embedding itself
            self.lm_head.weight = self.model.embed_tokens.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """Hugging Face's init: N(0, initializer_range) weights and embeddings, zero biases
        (RMSNorm weights start at one)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (Linear, Embedding)):
                if m is self.lm_head and self.config.tie_word_embeddings:
                    continue
                m.weight.data[...] = backend.normal(0.0, std, m.weight.shape, m.weight.dtype)
                if isinstance(m, Linear) and m.bias is not None:
                    m.bias.data[...] = 0

    # ------------------------------------------------------------------ forward
    def _forward(self, ids, targets, attention_mask, kv_cache, past):
        c, m = self.config, self.model
        T = ids.shape[1]
        x = m.embed_tokens(ids)                                   # (B, T, C)
        cos, sin = F.rope_tables(range(past, past + T), c.head_dim, c.rope_theta,
                                 c.rope_scaling, dtype=x.dtype)   # (T, hd) each
        x = self._run_blocks(m.layers, x, (cos, sin, attention_mask), kv_cache)
        logits = self.lm_head(m.norm(x))                          # (B, T, V)
        return self._with_loss(logits, targets)

    # ------------------------------------------------------------------ utilities
    def make_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty KV cache for ``batch`` rows: n_kv heads per layer (not n_heads)."""
        c = self.config
        cap = c.max_position_embeddings if capacity is None else min(capacity, c.max_position_embeddings)
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, cap, c.head_dim,
                       self.model.embed_tokens.weight.dtype)

    def _tied(self) -> bool:
        return self.config.tie_word_embeddings

    @classmethod
    def from_hf(cls, folder) -> "Llama":
        """A Llama or Qwen2 from a Hugging Face folder (config.json + safetensors), in the
        default dtype. See ``tinylora.models.llama_hf``."""
        from .llama_hf import load_llama_hf
        return load_llama_hf(cls, folder, LlamaConfig)

    def save_pretrained(self, folder) -> None:
        """A Hugging Face folder (config.json + model.safetensors) that transformers loads.
        See ``tinylora.models.llama_hf.save_llama_hf``."""
        from .llama_hf import save_llama_hf
        save_llama_hf(self, folder)

