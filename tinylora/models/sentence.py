"""Sentence embeddings: BERT + WordPiece + mean pooling + L2 normalisation.

The sentence-transformers pipeline of all-MiniLM-L6-v2 (``modules.json``: Transformer, then
Pooling with mode "mean", then Normalize), reproduced on tinylora's engine:

    ids, mask = tokenizer(texts)                    # truncated to max_seq_length (256)
    h = bert(ids, mask)                             # (B, T, H)
    e = Σ_t mask·h / Σ_t mask                       # mean over real tokens only
    e = e / ‖e‖                                     # unit length: cosine = dot product
"""
from __future__ import annotations

import contextvars
import pathlib
from concurrent.futures import ThreadPoolExecutor

from .. import backend, blas
from ..backend import np, xp
from ..data.wordpiece import WordPieceTokenizer
from ..io import load_json
from ..tensor import Tensor, no_grad
from .bert import BertModel
from .hub import find_minilm

__all__ = ["SentenceEncoder", "mean_pool"]

DEFAULT_MAX_SEQ_LENGTH = 256  # sentence-transformers' default when its config is absent


def mean_pool(last_hidden_state: Tensor, attention_mask) -> Tensor:
    """Mean of the hidden states over real tokens: (B, T, H), mask (B, T) -> (B, H).

    Built from differentiable ops, so a classifier on top trains through it.
    """
    m = attention_mask.data if isinstance(attention_mask, Tensor) else xp.asarray(attention_mask)
    m = m.astype(last_hidden_state.dtype)
    count = xp.maximum(m.sum(axis=1, keepdims=True), 1)             # (B, 1); an all-pad row -> 0
    return (last_hidden_state * m[:, :, None]).sum(dim=1) / count   # (B, H)


class SentenceEncoder:
    """A BERT sentence encoder: ``encode(list of str) -> (n, H)`` float32 host array."""

    def __init__(self, model: BertModel, tokenizer: WordPieceTokenizer,
                 max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH):
        if max_seq_length > model.config.max_position_embeddings:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds the model's "
                             f"{model.config.max_position_embeddings} positions")
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_length = int(max_seq_length)
        self.model_dir = None  # the folder it was loaded from, if any

    @classmethod
    def from_pretrained(cls, directory=None, dtype=None) -> "SentenceEncoder":
        """Load a sentence-transformers folder (default: the installed all-MiniLM-L6-v2).

        Reads ``config.json`` + ``model.safetensors`` (the BERT), ``vocab.txt`` (+
        ``tokenizer_config.json``) and, when present, ``sentence_bert_config.json`` for
        ``max_seq_length``.
        """
        directory = find_minilm() if directory is None else pathlib.Path(directory)
        model = BertModel.from_pretrained(directory, dtype=dtype)
        tokenizer = WordPieceTokenizer.from_pretrained(directory)
        max_len = DEFAULT_MAX_SEQ_LENGTH
        st_config = directory / "sentence_bert_config.json"
        if st_config.is_file():
            max_len = int(load_json(st_config).get("max_seq_length") or max_len)
        encoder = cls(model, tokenizer, max_len)
        encoder.model_dir = directory
        return encoder

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, texts) -> dict:
        """Host (B, T) int64 arrays ``input_ids``, ``attention_mask``, ``token_type_ids``."""
        return self.tokenizer(texts, max_length=self.max_seq_length, padding="longest",
                              truncation=True)

    def encode(self, sentences, batch_size: int = 32, normalize: bool = True):
        """Embeddings of ``sentences`` (a str or a list of str): host float32 (n, H).

        Sentences are batched by token length (so little padding is computed) and the rows
        come back in the input order.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode expects str sentences, got {type(t).__name__}")
        ids = [self.tokenizer.encode(t, max_length=self.max_seq_length) for t in texts]
        out = self.encode_ids(ids, batch_size=batch_size, normalize=normalize)
        return out[0] if single else out

    def encode_ids(self, ids, batch_size: int = 32, normalize: bool = True):
        """Embeddings of already tokenized sentences (lists of ids with [CLS] and [SEP]);
        rows longer than ``max_seq_length`` keep their first tokens and their last ([SEP])."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        L = self.max_seq_length
        ids = [list(map(int, row)) for row in ids]
        ids = [row if len(row) <= L else row[:L - 1] + row[-1:] for row in ids]  # keep [SEP]
        if any(not row for row in ids):
            raise ValueError("encode_ids: every sentence needs at least one token ([CLS] [SEP])")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together
        batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        pad = self.tokenizer.pad_token_id

        def encode_batch(rows):
            width = len(ids[rows[-1]])                               # the batch's longest
            input_ids = np.full((len(rows), width), pad, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for b, i in enumerate(rows):
                input_ids[b, :len(ids[i])] = ids[i]
                mask[b, :len(ids[i])] = 1
            mask_dev = xp.asarray(mask)
            # a batch without padding needs no attention mask at all
            h = self.model(xp.asarray(input_ids), None if mask.all() else mask_dev)  # (B, T, H)
            e = mean_pool(h, mask_dev).data                           # (B, H)
            if normalize:
                e = e / xp.maximum(xp.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            out[rows] = backend.to_numpy(e)

        workers = min(len(batches), self._workers())
        was_training = self.model.training
        self.model.eval()
        try:
            with no_grad():
                if workers <= 1:
                    for rows in batches:
                        encode_batch(rows)
                else:
                    self._encode_concurrently(encode_batch, batches, workers)
        finally:
            self.model.train(was_training)
        return out

    @staticmethod
    def _workers() -> int:
        """Batches encoded at once: on the CPU one per BLAS thread (1 on a device)."""
        if backend.on_device():
            return 1
        return max(1, blas.get_num_threads() or 1)

    @staticmethod
    def _encode_concurrently(encode_batch, batches, workers: int) -> None:
        """Several batches at once, one per thread, each with one BLAS thread.

        NumPy and BLAS release the GIL, so with n threads every pass of the forward (GELU's,
        layer norm's, the softmax's, not only the GEMMs) runs n-wide, where one batch at a
        time would run the elementwise passes on one core and split only the GEMMs. The
        threads share the no_grad and eval state set above; each runs in a copy of the
        caller's context (context variables: adapter routing, default dtype). The longest
        batches go first, so the threads finish together.
        """
        with blas.limit_threads(1), ThreadPoolExecutor(workers) as pool:
            jobs = [pool.submit(contextvars.copy_context().run, encode_batch, rows)
                    for rows in batches[::-1]]                        # the longest first
            for job in jobs:
                job.result()                                          # re-raises a failure

    __call__ = encode
