"""What GPT and Llama share around their transformer: input checks, per-row adapter routing,
tied-weight saving and KV-cached generation, written once.

A model subclasses ``CausalLM`` and supplies its own ``__init__``, ``_forward`` (the
transformer itself), ``make_cache`` and the names below; ``sample_logits`` turns next-token
logits into ids (greedy, temperature, top-k, top-p).
"""
from __future__ import annotations

from .. import backend
from .. import functional as F
from ..backend import np, xp
from ..nn import KVCache, Module, adapter_routing, checkpoint
from ..tensor import Tensor, is_grad_enabled, no_grad

__all__ = ["CausalLM", "sample_logits"]


class CausalLM(Module):
    """idx (B, T) token ids -> logits (B, T, vocab_size), and the loss when targets are given.

    A subclass sets ``context_name`` (its config field for the longest sequence) and
    ``embedding_key`` (the state_dict name of the token embedding lm_head may be tied to)."""

    context_name = "block_size"
    embedding_key = ""
    gradient_checkpointing = False

    @property
    def context_length(self) -> int:
        return getattr(self.config, self.context_name)

    def _check_ids(self, idx, past: int = 0):
        """idx as a device int array (B, T), after the checks that give clear errors."""
        name = type(self).__name__
        arr = idx.data if isinstance(idx, Tensor) else idx
        if not backend.is_array(arr):
            arr = np.asarray(arr)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name}: idx must hold integer token ids, got dtype {arr.dtype}; "
                            "pass an int64 array, e.g. tl.tensor(ids, dtype=tl.int64)")
        if arr.ndim != 2 or arr.shape[1] == 0:
            hint = " (add a batch axis: idx[None])" if arr.ndim == 1 else ""
            raise ValueError(f"{name}: idx must have shape (B, T) with T >= 1, got "
                             f"{tuple(arr.shape)}{hint}")
        T, n = arr.shape[1], self.context_length
        if past + T > n:
            where = f" after {past} cached positions" if past else ""
            raise ValueError(f"{name}: a sequence of {T} tokens{where} is longer than "
                             f"{self.context_name}={n}; crop it to the last {n - past} tokens "
                             f"(idx[:, -{n - past}:]) or use a model with a larger "
                             f"{self.context_name}")
        if isinstance(arr, np.ndarray) and arr.size:  # host ids: a cheap check before the lookup
            lo, hi, V = int(arr.min()), int(arr.max()), self.config.vocab_size
            if lo < 0 or hi >= V:
                bad = lo if lo < 0 else hi
                raise IndexError(f"{name}: token id {bad} is out of range for vocab_size={V} "
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
            raise ValueError(f"{type(self).__name__}: adapter_names has {len(names)} names but "
                             f"the batch has {ids.shape[0]} rows; give one adapter name per row")
        with adapter_routing(names):
            return self._forward(ids, targets, attention_mask, kv_cache, past)

    def _forward(self, ids, targets, attention_mask, kv_cache, past):
        raise NotImplementedError(f"{type(self).__name__} must define _forward")

    def _run_blocks(self, blocks, x, args: tuple, kv_cache):
        """x (B, T, C) through each ``block(x, *args, layer_cache)``. With gradient
        checkpointing on in training, only each block's input is kept and the block reruns
        in backward."""
        recompute = self.gradient_checkpointing and self.training and is_grad_enabled() \
            and kv_cache is None
        for i, block in enumerate(blocks):
            if recompute:
                x = checkpoint(block, x, *args, params=block.parameters())
            else:
                x = block(x, *args, None if kv_cache is None else kv_cache.layers[i])
        return x

    @staticmethod
    def _with_loss(logits, targets):
        """(logits, mean cross-entropy against targets (B, T), or None without targets)."""
        if targets is None:
            return logits, None
        t = targets.data if isinstance(targets, Tensor) else xp.asarray(targets)
        return logits, F.cross_entropy(logits, t)

    # ------------------------------------------------------------------ utilities
    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block's activations in backward instead of keeping them (training
        memory drops to about one block's activations, for one extra forward per step)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def _tied(self) -> bool:
        """Whether lm_head.weight is the token embedding (a subclass may make it optional)."""
        return True

    def weights_to_save(self) -> dict:
        """{name: array} of every weight, with a tied ``lm_head.weight`` left out (it is the
        token embedding), as Hugging Face writes it."""
        sd = self.state_dict()
        if sd.get("lm_head.weight") is sd.get(self.embedding_key):
            sd.pop("lm_head.weight")
        return {k: v.data for k, v in sd.items()}

    def load_weights(self, tensors: dict, source: str = "weights") -> None:
        """Load {name: array} as written by ``weights_to_save`` (strict; nothing changes on error)."""
        tensors = dict(tensors)
        if self._tied() and "lm_head.weight" not in tensors and self.embedding_key in tensors:
            tensors["lm_head.weight"] = tensors[self.embedding_key]
        try:
            self.load_state_dict(tensors)
        except RuntimeError as e:
            raise type(e)(f"{source}: {e}") from None

    # ------------------------------------------------------------------ generation
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, *, use_cache: bool = True, adapter_names=None,
                 eos_token_id=None, output_logits: bool = False, rng=None):
        """The prompt idx (B, T) followed by up to ``max_new_tokens`` sampled tokens.

        The prompt runs once (prefill) into a KV cache, then each step feeds only the new
        token. Once the cache is full, each step recomputes the last context_length tokens
        instead (the window slides). temperature 0 picks the argmax; otherwise tokens are drawn
        from the host RNG (``rng``, default ``backend.host_rng()``) after keeping the top_k
        logits and/or the smallest set with probability >= top_p. With ``eos_token_id`` (an id
        or a list), generation stops once every row has produced one (finished rows are padded
        with it). Returns a host int64 array (B, T + new), and with ``output_logits`` also each
        step's next-token logits (B, new, V).
        """
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        arr = idx.data if isinstance(idx, Tensor) else idx
        out = backend.to_numpy(arr) if backend.is_array(arr) else np.asarray(arr)
        out = out[None] if out.ndim == 1 else out
        n = self.context_length
        self._check_ids(out[:, -n:])                          # integer ids, in range, (B, T)
        out = out.astype(np.int64, copy=False)
        rng = backend.host_rng() if rng is None else rng
        eos = None if eos_token_id is None else np.atleast_1d(np.asarray(eos_token_id))
        done = np.zeros(out.shape[0], dtype=bool)
        cache = self.make_cache(out.shape[0], out.shape[1] + max_new_tokens) if use_cache else None
        steps = []
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                for _ in range(max_new_tokens):
                    if cache is not None and 0 < cache.length < cache.capacity:
                        feed = out[:, -1:]                    # decode: only the newest token
                    else:                                     # prefill, or the cache is full
                        feed = out[:, -n:]
                        if cache is not None:
                            cache.reset()
                            feed = feed[:, -cache.capacity:]  # the window slides
                    logits, _ = self(feed, adapter_names=adapter_names, kv_cache=cache)
                    last = backend.to_numpy(logits.data[:, -1, :])          # (B, V) on the host
                    if output_logits:
                        steps.append(last.copy())
                    nxt = sample_logits(last, temperature, top_k, top_p, rng)
                    if eos is not None:
                        nxt = np.where(done, eos[0], nxt)
                        done |= np.isin(nxt, eos)
                    out = np.concatenate([out, nxt[:, None]], axis=1)
                    if eos is not None and done.all():
                        break
        finally:
            self.train(was_training)
        if output_logits:
            V = self.config.vocab_size
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
