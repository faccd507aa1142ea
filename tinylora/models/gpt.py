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
from .. import functional as F
from ..backend import np, xp
from ..nn import (Block, Dropout, Embedding, KVCache, LayerNorm, Linear, Module, ModuleDict,
                  ModuleList, Parameter, adapter_routing, checkpoint)
from ..tensor import Tensor, is_grad_enabled, no_grad
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


class GPT(Module):
    """idx (B, T) token ids -> logits (B, T, vocab_size), and the loss when targets are given."""

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
    def _check_ids(self, idx, past: int = 0):
        """idx as a device int array (B, T), after the checks that give clear errors."""
        arr = idx.data if isinstance(idx, Tensor) else idx
        if not backend.is_array(arr):
            arr = np.asarray(arr)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"GPT: idx must hold integer token ids, got dtype {arr.dtype}; "
                            "pass an int64 array, e.g. tl.tensor(ids, dtype=tl.int64)")
        if arr.ndim != 2 or arr.shape[1] == 0:
            hint = " (add a batch axis: idx[None])" if arr.ndim == 1 else ""
            raise ValueError(f"GPT: idx must have shape (B, T) with T >= 1, got "
                             f"{tuple(arr.shape)}{hint}")
        T, bs = arr.shape[1], self.config.block_size
        if past + T > bs:
            where = f" after {past} cached positions" if past else ""
            raise ValueError(f"GPT: a sequence of {T} tokens{where} is longer than "
                             f"block_size={bs}; crop it to the last {bs - past} tokens "
                             f"(idx[:, -{bs - past}:]) or use a model with a larger block_size")
        if isinstance(arr, np.ndarray) and arr.size:  # host ids: a cheap check before the lookup
            lo, hi, V = int(arr.min()), int(arr.max()), self.config.vocab_size
            if lo < 0 or hi >= V:
                bad = lo if lo < 0 else hi
                raise IndexError(f"GPT: token id {bad} is out of range for vocab_size={V} "
                                 f"(ids must lie in [0, {V})); encode with the model's tokenizer")
        return xp.asarray(arr)

    def forward(self, idx, targets=None, adapter_names=None, attention_mask=None,
                kv_cache: KVCache | None = None):
        """idx (B, T) int -> (logits (B, T, V), loss or None).

        targets (B, T): next-token ids (-100 = ignored) for the mean cross-entropy loss.
        adapter_names: one LoRA adapter name per row (``nn.BASE`` for none), for mixed batches.
        attention_mask (B, S): 1 for tokens, 0 for padding (S covers cached + new positions).
        kv_cache: inference only; the T positions continue after the cached ones.
        """
        past = 0 if kv_cache is None else kv_cache.length
        ids = self._check_ids(idx, past)
        if adapter_names is None:
            return self._forward(ids, targets, attention_mask, kv_cache, past)
        names = list(adapter_names)
        if len(names) != ids.shape[0]:
            raise ValueError(f"GPT: adapter_names has {len(names)} names but the batch has "
                             f"{ids.shape[0]} rows; give one adapter name per row")
        with adapter_routing(names):
            return self._forward(ids, targets, attention_mask, kv_cache, past)

    def _forward(self, ids, targets, attention_mask, kv_cache, past):
        tr = self.transformer
        T = ids.shape[1]
        pos = xp.arange(past, past + T)[None]                # (1, T): one row shared by the batch
        x = tr.drop(tr.wte(ids) + tr.wpe(pos))               # (B, T, C) + (1, T, C)
        recompute = self.gradient_checkpointing and self.training and is_grad_enabled() \
            and kv_cache is None
        for i, block in enumerate(tr.h):
            if recompute:   # keep only each block's input; rerun the block in backward
                x = checkpoint(block, x, attention_mask, params=block.parameters())
            else:
                x = block(x, attention_mask, None if kv_cache is None else kv_cache.layers[i])
        x = tr.ln_f(x)
        logits = self.lm_head(x)                             # (B, T, V)
        if targets is None:
            return logits, None
        t = targets.data if isinstance(targets, Tensor) else xp.asarray(targets)
        return logits, F.cross_entropy(logits, t)

    # ------------------------------------------------------------------ utilities
    gradient_checkpointing = False

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block's activations in backward instead of keeping them (training
        memory drops to about one block's activations, for one extra forward per step)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context to ``block_size`` positions (keeps wpe's first rows)."""
        if not 1 <= block_size <= self.config.block_size:
            raise ValueError(f"crop_block_size: block_size must be in [1, {self.config.block_size}], "
                             f"got {block_size}")
        wpe = self.transformer.wpe
        wpe.weight = Parameter(wpe.weight.data[:block_size].copy(), wpe.weight.requires_grad)
        wpe.num_embeddings = block_size
        self.config.block_size = block_size

    def weights_to_save(self) -> dict:
        """{name: array} of every weight, with the tied ``lm_head.weight`` left out (it is
        ``transformer.wte.weight``), as Hugging Face writes GPT-2."""
        sd = self.state_dict()
        if sd.get("lm_head.weight") is sd.get("transformer.wte.weight"):
            sd.pop("lm_head.weight")
        return {k: v.data for k, v in sd.items()}

    def load_weights(self, tensors: dict, source: str = "weights") -> None:
        """Load {name: array} as written by ``weights_to_save`` (strict; nothing changes on error)."""
        tensors = dict(tensors)
        if "lm_head.weight" not in tensors and "transformer.wte.weight" in tensors:
            tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
        try:
            self.load_state_dict(tensors)
        except RuntimeError as e:
            raise type(e)(f"{source}: {e}") from None

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

    # ------------------------------------------------------------------ generation
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, *, use_cache: bool = True, adapter_names=None,
                 output_logits: bool = False, rng=None):
        """Continue each row of idx (B, T) by ``max_new_tokens`` sampled tokens.

        The prompt is run once (prefill) into a KV cache, then each step feeds only the new
        token. Once the cache holds block_size positions, each step recomputes the last
        block_size tokens instead (the window slides). temperature 0 picks the argmax;
        otherwise tokens are drawn from the host RNG (``rng``, default ``backend.host_rng()``),
        after keeping the top_k logits and/or the smallest set with probability >= top_p.

        Returns the ids (B, T + max_new_tokens) as a host int64 array, and with
        ``output_logits`` also each step's next-token logits (B, max_new_tokens, V).
        """
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        arr = idx.data if isinstance(idx, Tensor) else idx
        out = backend.to_numpy(arr) if backend.is_array(arr) else np.asarray(arr)
        if out.ndim == 1:
            out = out[None]
        self._check_ids(out[:, -self.config.block_size:])      # integer ids, in range, (B, T)
        out = out.astype(np.int64, copy=False)
        rng = backend.host_rng() if rng is None else rng
        cfg = self.config
        cache = None
        if use_cache:
            cache = KVCache(cfg.n_layer, out.shape[0], cfg.n_head, cfg.block_size,
                            cfg.n_embd // cfg.n_head, self.transformer.wte.weight.dtype)
        steps = []
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                for _ in range(max_new_tokens):
                    if cache is not None and 0 < cache.length < cfg.block_size:
                        feed = out[:, -1:]                    # decode: only the newest token
                    else:                                     # prefill, or the cache is full
                        feed = out[:, -cfg.block_size:]
                        if cache is not None:
                            cache.reset()
                    logits, _ = self(feed, adapter_names=adapter_names, kv_cache=cache)
                    last = backend.to_numpy(logits.data[:, -1, :])          # (B, V) on the host
                    if output_logits:
                        steps.append(last.copy())
                    nxt = sample_logits(last, temperature, top_k, top_p, rng)
                    out = np.concatenate([out, nxt[:, None]], axis=1)
        finally:
            self.train(was_training)
        if output_logits:
            V = cfg.vocab_size
            return out, (np.stack(steps, axis=1) if steps else np.zeros((out.shape[0], 0, V)))
        return out


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p}")


def sample_logits(logits, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, rng=None):
    """One token id per row of logits (B, V), on the host: greedy at temperature 0, else a
    draw from softmax(logits / temperature) restricted by top_k / top_p. Returns (B,) int64."""
    x = backend.to_numpy(logits).astype(np.float64)          # (B, V), small: float64 is cheap here
    if temperature == 0:
        return x.argmax(axis=-1).astype(np.int64)
    rng = backend.host_rng() if rng is None else rng
    x = x / temperature
    V = x.shape[-1]
    if top_k is not None and top_k < V:
        kth = np.partition(x, V - top_k, axis=-1)[:, V - top_k:V - top_k + 1]   # (B, 1)
        x = np.where(x < kth, -np.inf, x)
    x -= x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        ps = np.take_along_axis(p, order, axis=-1)
        # keep a token if the mass before it is still below top_p (the first is always kept)
        drop_sorted = (np.cumsum(ps, axis=-1) - ps) >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(p, axis=-1)
    u = (1.0 - rng.random(p.shape[0]))[:, None] * cdf[:, -1:]    # in (0, total]
    return np.minimum((cdf < u).sum(axis=-1), V - 1).astype(np.int64)
