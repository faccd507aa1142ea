"""GPT-2's byte-level BPE tokenizer, read from a Hugging Face folder (vocab.json + merges.txt).

Three steps, as in OpenAI's encoder.py:

1. Pre-tokenize with GPT-2's pattern
   ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``:
   contractions, then an optional space with a run of letters, of numbers or of other
   symbols, then whitespace (a run before a word leaves its last space to the word).
   Python's ``re`` has no ``\\p{L}``, so ``pretokenize`` scans the text by Unicode category
   (letters: L*, numbers: N*), which is what the pattern means.
2. Map each piece's UTF-8 bytes to printable characters (``bytes_to_unicode``: the 188
   printable Latin-1 bytes stand for themselves, the other 68 get code points from 256 on),
   so every string, in any language, has a spelling in the base vocabulary.
3. Merge adjacent symbol pairs, lowest rank in merges.txt first, until none applies.

Special tokens (``<|endoftext|>``) written in the text are encoded as ordinary text.
"""
from __future__ import annotations

import functools
import os
import unicodedata

from ..backend import np
from ..io import FormatError, decode_utf8, load_json
from .text import host_ids

__all__ = ["GPT2Tokenizer", "bytes_to_unicode", "pretokenize"]

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict:
    """{byte: character}: GPT-2's reversible map from bytes to printable characters."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


@functools.lru_cache(maxsize=65536)
def _kind(c: str) -> str:
    """'L' letter, 'N' number, 's' whitespace, 'o' anything else."""
    if c.isspace():
        return "s"
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "o"


def pretokenize(text: str) -> list:
    """Split text as GPT-2's regular expression does (see the module docstring)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "'":
            hit = next((k for k in _CONTRACTIONS if text.startswith(k, i)), None)
            if hit:
                out.append(hit)
                i += len(hit)
                continue
        j = i + 1 if c == " " and i + 1 < n and _kind(text[i + 1]) != "s" else i
        kind = _kind(text[j])
        if kind != "s":              # ' ?\p{L}+', ' ?\p{N}+' or ' ?[^\s\p{L}\p{N}]+'
            k = j + 1
            while k < n and _kind(text[k]) == kind:
                k += 1
            out.append(text[i:k])
            i = k
            continue
        k = i + 1                    # a whitespace run
        while k < n and _kind(text[k]) == "s":
            k += 1
        if k < n and k - i > 1:      # '\s+(?!\S)': leave the last space to the next word
            k -= 1
        out.append(text[i:k])
        i = k
    return out


class GPT2Tokenizer:
    """Byte-level BPE. ``encoder``: {token: id} (vocab.json); ``merges``: [(a, b)] in rank
    order (merges.txt without its version line)."""

    def __init__(self, encoder: dict, merges):
        if not encoder:
            raise ValueError("GPT2Tokenizer: the vocabulary is empty")
        self.encoder = dict(encoder)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.merges = [tuple(m) for m in merges]
        self.ranks = {m: r for r, m in enumerate(self.merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        missing = [c for c in self.byte_encoder.values() if c not in self.encoder]
        if missing:
            raise ValueError(f"GPT2Tokenizer: the vocabulary lacks {len(missing)} of the 256 byte "
                             f"symbols (e.g. {missing[0]!r}); it is not a byte-level BPE vocabulary")
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    @classmethod
    def from_pretrained(cls, folder) -> "GPT2Tokenizer":
        """Read ``vocab.json`` and ``merges.txt`` from a Hugging Face GPT-2 folder."""
        folder = os.fspath(folder)
        vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        for p in (vocab, merges):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p} is missing: a GPT-2 tokenizer folder holds "
                                        "vocab.json and merges.txt")
        encoder = load_json(vocab)                   # FormatError on anything but JSON text
        if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
            raise FormatError(f"{vocab}: expected a JSON object mapping tokens to integer ids")
        with open(merges, "rb") as f:
            text = decode_utf8(f.read(), merges, "expected GPT-2's merges.txt")
        pairs = []
        for n, line in enumerate(text.split("\n"), 1):
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise FormatError(f"{merges}: line {n} is not two symbols separated by a space")
            pairs.append(tuple(parts))
        return cls(encoder, pairs)

    @property
    def vocab_size(self) -> int:
        return max(self.decoder) + 1

    def _bpe_uncached(self, piece: str) -> tuple:
        word = list(piece)
        while len(word) > 1:
            pairs = [(self.ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            ranked = [(r, i) for r, i in pairs if r is not None]
            if not ranked:
                break
            best = min(ranked)[0]
            a, b = self.merges[best]
            merged, i = [], 0
            while i < len(word):                 # merge every occurrence, left to right
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def encode(self, text: str, dtype=np.int64):
        """A host array of token ids."""
        ids = []
        for piece in pretokenize(text):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(symbols))
        return np.asarray(ids, dtype=dtype)

    def decode(self, ids) -> str:
        a = host_ids(ids).tolist()
        bad = [i for i in a if i not in self.decoder]
        if bad:
            raise ValueError(f"token id {bad[0]} is not in this tokenizer's vocabulary")
        text = "".join(self.decoder[i] for i in a)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "gpt2-bpe", "vocab": self.encoder, "merges": [" ".join(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Tokenizer":
        if not isinstance(d, dict) or d.get("type") != "gpt2-bpe":
            raise ValueError("not a GPT-2 tokenizer description ({'type': 'gpt2-bpe', ...})")
        return cls(d["vocab"], [tuple(m.split(" ")) for m in d["merges"]])

    def __repr__(self):
        return f"GPT2Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"
