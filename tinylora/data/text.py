"""Text data for language-model training: a character tokenizer, built-in corpora, batches.

Built-in corpora (``builtin:NAME``) need no download; they are read from text that ships
with Python itself, so a base model and a LoRA fine-tune can be trained anywhere:

  prose   English prose: the Python Language Reference as plain text (``pydoc_data.topics``,
          the help() pages; sections in name order, first ~300 KB).
  python  Python source code: pure-Python standard-library modules (textwrap, heapq,
          fractions, ..., in a fixed order, first ~300 KB).

Both are folded to one fixed 96-symbol vocabulary (newline + printable ASCII; curly quotes
and dashes become ASCII, tabs four spaces), so a model trained on one can be fine-tuned on
the other with the same tokenizer. The exact text follows the running Python's standard
library (3.10 and 3.12 differ a little); checkpoints record its SHA-256.

Batches are drawn with the seeded host RNG (``backend.host_rng()``), so a run restored
with ``backend.set_rng_state`` draws exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
import unicodedata
from dataclasses import dataclass

from .. import backend
from ..backend import np
from ..io import decode_utf8
from ..hints import Fix, hinted
from ..tensor import Tensor

__all__ = ["CharTokenizer", "BUILTIN_VOCAB", "BUILTIN_CORPORA", "builtin_text", "load_text",
           "read_corpus", "train_val_split", "get_batch", "TextData", "load_data", "normalize_ascii",
           "host_ids"]

def host_ids(ids):
    """Token ids as a flat int64 host array, from a Tensor, a host or device array, or a list
    (a device array is copied to the host: ``np.asarray`` of a CuPy array would raise)."""
    if isinstance(ids, Tensor):
        ids = ids.data
    a = backend.to_numpy(ids) if backend.is_array(ids) else np.asarray(ids)
    return a.reshape(-1).astype(np.int64, copy=False)


BUILTIN_VOCAB = "\n" + "".join(chr(i) for i in range(32, 127))   # 96 symbols
_CORPUS_CHARS = 300_000


class CharTokenizer:
    """One token per character. ``vocab``: the characters, in id order."""

    def __init__(self, vocab):
        chars = list(vocab)
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer: vocab must be a non-empty sequence of single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: vocab has repeated characters")
        self.vocab = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        codes = np.array([ord(c) for c in chars], dtype=np.int64)
        # a lookup table by code point; one extra slot (-1) catches every larger code point
        self._lut = np.full(int(codes.max()) + 2, -1, dtype=np.int64)
        self._lut[codes] = np.arange(len(chars))
        self._chars = np.array(chars, dtype=object)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The sorted set of characters in ``text``."""
        return cls(sorted(set(text)))

    @classmethod
    def builtin(cls) -> "CharTokenizer":
        """The fixed vocabulary shared by every built-in corpus."""
        return cls(BUILTIN_VOCAB)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, dtype=np.int64):
        """A host array of ids, one per character. An unknown character is a ValueError that
        names it and where it is."""
        cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        ids = self._lut[np.minimum(cp, len(self._lut) - 1)]
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            at = int(bad[0])
            ch = text[at]
            line = text.count("\n", 0, at) + 1
            raise hinted(ValueError(
                f"character {ch!r} (U+{ord(ch):04X}) on line {line} (offset {at}) is not in the "
                f"tokenizer's {self.vocab_size}-character vocabulary ({bad.size} such characters "
                "in all); remove or replace them (data.normalize_ascii folds text to the "
                "built-in vocabulary)"),
                Fix("normalize_ascii", "data.normalize_ascii folds", "{flag} folds"))
        return ids.astype(dtype, copy=False)

    def decode(self, ids) -> str:
        a = host_ids(ids)
        if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
            bad = int(a.min()) if a.min() < 0 else int(a.max())
            raise ValueError(f"token id {bad} is outside this tokenizer's vocabulary "
                             f"[0, {self.vocab_size})")
        return "".join(self._chars[a].tolist())

    def to_dict(self) -> dict:
        return {"type": "char", "vocab": "".join(self.vocab)}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        if not isinstance(d, dict) or d.get("type") != "char" or not isinstance(d.get("vocab"), str):
            raise ValueError(f"not a character tokenizer description: expected "
                             f"{{'type': 'char', 'vocab': '...'}}, got {repr(d)[:80]}")
        return cls(d["vocab"])

    def __eq__(self, other):
        return isinstance(other, CharTokenizer) and self.vocab == other.vocab

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------- built-ins

_FOLD = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                       "\u2026": "...", "\u2014": "--", "\u2013": "-", "\t": "    ", "\r": None,
                       "\u00a0": " "})
_KEEP = frozenset(BUILTIN_VOCAB)


def normalize_ascii(text: str) -> str:
    """Fold text into BUILTIN_VOCAB: typographic quotes and dashes to ASCII, accents
    stripped, tabs to four spaces; any other character is dropped."""
    text = unicodedata.normalize("NFKD", text.translate(_FOLD))
    return "".join(c for c in text if c in _KEEP)


def _cap(text: str, limit: int = _CORPUS_CHARS) -> str:
    """The first ``limit`` characters, cut back to the end of a line."""
    if len(text) <= limit:
        return text
    return text[:text.rfind("\n", 0, limit) + 1]


def _prose() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise RuntimeError("builtin:prose reads the standard library's pydoc_data module, which "
                           "this Python installation lacks; pass a text file instead") from None
    return "\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"


# pure-Python modules present in CPython 3.10-3.13, in a fixed order
_PY_MODULES = ("textwrap", "string", "heapq", "bisect", "colorsys", "fractions", "calendar",
               "shlex", "graphlib", "statistics", "functools", "queue", "sched", "fnmatch",
               "glob", "copy", "pprint", "reprlib", "numbers", "abc", "random", "cmd",
               "contextlib", "selectors", "csv")


def _python() -> str:
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in _PY_MODULES:
        path = os.path.join(root, name + ".py")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                parts.append(f"# ---- {name}.py ----\n{f.read()}")
    text = "\n".join(parts)
    if len(text) < 100_000:
        raise RuntimeError(f"builtin:python reads standard-library sources from {root}, but only "
                           f"{len(text)} characters were found (is the stdlib shipped without "
                           ".py files?); pass a text file instead")
    return text


BUILTIN_CORPORA = {
    "prose": ("English prose: the Python Language Reference as plain text (pydoc_data)", _prose),
    "python": ("Python source code: pure-Python standard-library modules", _python),
}


@functools.lru_cache(maxsize=None)
def builtin_text(name: str) -> str:
    """The text of built-in corpus ``name``, folded to BUILTIN_VOCAB and capped at ~300 KB."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"no built-in corpus {name!r}; choose one of: "
                         + ", ".join(f"builtin:{n}" for n in BUILTIN_CORPORA))
    return _cap(normalize_ascii(BUILTIN_CORPORA[name][1]()))


def load_text(path) -> str:
    """A UTF-8 text file's content; clear errors when it is missing, empty or not UTF-8."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist; give a UTF-8 text file or "
                                f"one of {', '.join('builtin:' + n for n in BUILTIN_CORPORA)}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"data path {path!r} is a folder; give a UTF-8 text file")
    with open(path, "rb") as f:
        raw = f.read()
    text = decode_utf8(raw, f"data file {path!r}", "convert it to UTF-8 first")
    if not text.strip():
        raise ValueError(f"data file {path!r} is empty; it needs some text to train on")
    return text.replace("\r\n", "\n")


def read_corpus(spec: str):
    """``(text, tokenizer)`` for ``builtin:NAME`` (the shared built-in vocabulary) or a file
    path (a tokenizer over the file's own characters)."""
    if spec.startswith("builtin:"):
        return builtin_text(spec[len("builtin:"):]), CharTokenizer.builtin()
    text = load_text(spec)
    return text, CharTokenizer.from_text(text)


# ----------------------------------------------------------------------------- batches

def train_val_split(tokens, val_fraction: float = 0.1):
    """The first (1 - val_fraction) of the tokens for training, the rest for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = int(round(len(tokens) * (1.0 - val_fraction)))
    return tokens[:n], tokens[n:]


def get_batch(data, block_size: int, batch_size: int, rng=None):
    """``(x, y)``: batch_size random windows of ``data`` (B, T) and the same shifted by one,
    as host int64 arrays. Offsets come from ``rng`` (default: the seeded host stream)."""
    n = len(data)
    if n < block_size + 1:
        raise ValueError(f"a batch needs block_size + 1 = {block_size + 1} tokens, but the data "
                         f"has {n}; use a smaller block size or more text")
    rng = backend.host_rng() if rng is None else rng
    ix = rng.integers(0, n - block_size, size=batch_size)
    windows = np.lib.stride_tricks.sliding_window_view(data, block_size + 1)[ix]   # (B, T + 1)
    return windows[:, :-1].astype(np.int64), windows[:, 1:].astype(np.int64)


@dataclass
class TextData:
    """A corpus ready for training: tokenizer, train and validation token arrays, provenance."""
    source: str              # "builtin:prose" or the file path
    sha256: str              # of the text, to notice a changed file on resume
    tokenizer: CharTokenizer
    train: object            # host int array
    val: object

    def info(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "train_tokens": int(len(self.train)),
                "val_tokens": int(len(self.val))}


def load_data(spec: str, *, tokenizer: CharTokenizer | None = None, block_size: int | None = None,
              val_fraction: float = 0.1, fold_ascii: bool = False) -> TextData:
    """Read ``builtin:NAME`` or a text file, encode it and split it.

    tokenizer: use this one (e.g. the base model's, for fine-tuning) instead of the corpus's
    default. block_size: check that both splits hold at least one window of block_size + 1.
    fold_ascii: pass the text through ``normalize_ascii`` first (into the built-in vocabulary).
    """
    text, own = read_corpus(spec)
    if fold_ascii and not spec.startswith("builtin:"):   # the built-ins are folded already
        text = normalize_ascii(text)
        own = CharTokenizer.from_text(text)
    tok = tokenizer or own
    tokens = tok.encode(text, np.uint16 if tok.vocab_size <= 65535 else np.int32)
    train, val = train_val_split(tokens, val_fraction)
    if block_size is not None:
        for split, arr in (("training", train), ("validation", val)):
            if len(arr) < block_size + 1:
                raise hinted(ValueError(
                    f"data {spec!r} is too short: its {split} split has {len(arr)} tokens but "
                    f"block_size + 1 = {block_size + 1} are needed; use a smaller block_size or "
                    "a longer text"),
                    Fix("block_size", "a smaller block_size or a longer", "a smaller {flag} or a "
                        "longer", otherwise="a longer"))
    sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return TextData(spec, sha, tok, train, val)
