"""WordPiece tokenization for BERT-family models (all-MiniLM-L6-v2 and its kin).

Two stages, as in the original BERT release:

1. Basic tokenization turns a string into words: drop NUL, U+FFFD and control characters,
   map whitespace to a space, put spaces around CJK ideographs (those scripts are written
   without spaces, and BERT's vocabulary has one entry per ideograph), split on whitespace,
   lower-case and strip accents when the vocabulary is uncased, then split off every
   punctuation character as its own word. Special tokens such as "[MASK]" pass unchanged.
2. WordPiece splits each word greedily into the longest vocabulary entries, left to right;
   pieces after the first carry a "##" prefix. A word that cannot be covered completely,
   or that is longer than 100 characters, becomes a single "[UNK]".

Character classes use Python's ``unicodedata``; results match the reference pure-Python
BERT tokenizer. The Rust ``tokenizers`` backend differs on a few rare code points (it
drops no unassigned ones, ships older Unicode tables, and misses CJK Extension E);
tests/fixtures/README.md lists them.

Outputs of ``__call__`` are host NumPy int64 arrays; moving them to the device is the
model's job.
"""
from __future__ import annotations

import io
import pathlib
import re
import unicodedata

from ..backend import np
from ..io import FormatError, decode_utf8, load_json

__all__ = ["WordPieceTokenizer", "basic_tokenize", "wordpiece_split", "SPECIAL_TOKENS"]

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
MAX_CHARS_PER_WORD = 100  # longer words are [UNK]: bounds the quadratic greedy search

# The CJK Unified/Compatibility Ideograph blocks BERT pads with spaces. Hangul, Hiragana
# and Katakana are not here: those scripts separate words with spaces.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),    # CJK Unified Ideographs
    (0x3400, 0x4DBF),    # Extension A
    (0x20000, 0x2A6DF),  # Extension B
    (0x2A700, 0x2B73F),  # Extension C
    (0x2B740, 0x2B81F),  # Extension D
    (0x2B820, 0x2CEAF),  # Extension E
    (0xF900, 0xFAFF),    # CJK Compatibility Ideographs
    (0x2F800, 0x2FA1F),  # CJK Compatibility Ideographs Supplement
)

# Text clean-up after decoding: the spaces that joining tokens put before punctuation and
# around English contractions ("it ' s" -> "it's").
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
            (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


# ----------------------------------------------------------------------------- characters

def is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def is_control(ch: str) -> bool:
    # \t \n \r are "Cc" too, but they separate words, so they count as whitespace instead.
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch).startswith("C")  # Cc, Cf, Cn, Co, Cs


def is_punctuation(ch: str) -> bool:
    # All non-alphanumeric printable ASCII counts ("$", "^", "`" are symbols to Unicode, not
    # punctuation), plus every Unicode punctuation category (Pc Pd Pe Pf Pi Po Ps).
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


# ----------------------------------------------------------------------------- basic stage

# ASCII text takes the short routes below (same output): its control characters are 0-31 and
# 127, its whitespace \t \n \r and " ", its punctuation the four ranges of is_punctuation; it
# has no CJK and no accents.
_ASCII_CLEAN = {**{c: None for c in (*range(32), 127)}, **{ord(c): " " for c in "\t\n\r"}}
_ASCII_PIECES = re.compile(r"[!-/:-@\[-`{-~]|[^!-/:-@\[-`{-~]+")  # one punctuation, or a run


def clean_text(text: str) -> str:
    """Drop NUL, U+FFFD and control characters; every whitespace character becomes a space."""
    if text.isascii():
        return text.translate(_ASCII_CLEAN)
    out = []
    for ch in text:
        if ch == "\x00" or ch == "\ufffd" or is_control(ch):
            continue
        out.append(" " if is_whitespace(ch) else ch)
    return "".join(out)


def pad_cjk(text: str) -> str:
    if text.isascii():
        return text
    return "".join(f" {ch} " if is_cjk(ch) else ch for ch in text)


def remove_accents(word: str) -> str:
    # NFD splits "é" into "e" + U+0301 (a nonspacing mark, category Mn), which we drop.
    if word.isascii():
        return word
    return "".join(ch for ch in unicodedata.normalize("NFD", word)
                   if unicodedata.category(ch) != "Mn")


def split_punctuation(word: str) -> list[str]:
    """Each punctuation character becomes its own piece: don't! -> don ' t !"""
    if word.isascii():
        return _ASCII_PIECES.findall(word)
    pieces, current = [], []
    for ch in word:
        if is_punctuation(ch):
            if current:
                pieces.append("".join(current))
                current = []
            pieces.append(ch)
        else:
            current.append(ch)
    if current:
        pieces.append("".join(current))
    return pieces


def basic_tokenize(text: str, do_lower_case: bool = True, strip_accents: bool | None = None,
                   tokenize_chinese_chars: bool = True, never_split=()) -> list[str]:
    """Words of ``text`` before WordPiece. ``strip_accents=None`` follows ``do_lower_case``.

    Words in ``never_split`` are kept whole and unchanged (neither lower-cased nor split).
    """
    if strip_accents is None:
        strip_accents = do_lower_case
    text = clean_text(text)
    if tokenize_chinese_chars:
        text = pad_cjk(text)
    words = []
    for word in text.split():
        if word in never_split:
            words.append(word)
            continue
        if do_lower_case:
            word = word.lower()
        if strip_accents:
            word = remove_accents(word)
        words.extend(split_punctuation(word))  # an accent-only word may now be "", dropped here
    return words


# ----------------------------------------------------------------------------- WordPiece

def wordpiece_split(word: str, vocab, unk_token: str = UNK, max_token_chars: int | None = None,
                    max_chars_per_word: int = MAX_CHARS_PER_WORD) -> list[str]:
    """Greedy longest-match-first: "unaffable" -> ["una", "##ffa", "##ble"] (vocab permitting).

    ``vocab`` is any container of piece strings. ``max_token_chars`` (the longest entry,
    "##" included) only bounds the search; it never changes the result.
    """
    if len(word) > max_chars_per_word:
        return [unk_token]
    limit = max_token_chars if max_token_chars is not None else len(word) + 2
    pieces, start = [], 0
    while start < len(word):
        prefix = "##" if start > 0 else ""
        end = min(len(word), start + limit - len(prefix))
        while end > start and prefix + word[start:end] not in vocab:
            end -= 1
        if end == start:  # no piece starts here: the whole word is unknown, not just this part
            return [unk_token]
        pieces.append(prefix + word[start:end])
        start = end
    return pieces


# ----------------------------------------------------------------------------- tokenizer

def _read_vocab(path: pathlib.Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(
            f"WordPiece vocabulary not found: {path} (expected a vocab.txt file with one "
            "token per line, the line number being the token id)")
    raw = path.read_bytes()
    text = decode_utf8(raw, str(path), "expected vocab.txt with one token per line")
    return [line.rstrip("\r\n") for line in io.StringIO(text, newline=None)]


class WordPieceTokenizer:
    """BERT's tokenizer: text -> WordPiece tokens -> ids, and batches of padded id arrays.

    >>> tok = WordPieceTokenizer.from_pretrained(find_minilm())       # doctest: +SKIP
    >>> tok(["Hello, world!", "Hi"], padding="longest")["input_ids"]  # doctest: +SKIP
    array([[ 101, 7592, 1010, 2088,  999,  102],
           [ 101, 7632,  102,    0,    0,    0]])
    """

    def __init__(self, vocab_path, do_lower_case: bool = True, *, strip_accents: bool | None = None,
                 tokenize_chinese_chars: bool = True, model_max_length: int | None = None,
                 never_split=()):
        self.vocab_path = pathlib.Path(vocab_path)
        self.id_to_token = _read_vocab(self.vocab_path)
        # A duplicated line maps to its last id, as the line-numbered vocab format implies.
        self.vocab = {tok: i for i, tok in enumerate(self.id_to_token)}
        missing = [t for t in (PAD, UNK, CLS, SEP) if t not in self.vocab]
        if missing:
            raise ValueError(f"vocabulary {self.vocab_path} lacks the special token(s) "
                             f"{', '.join(missing)} that BERT inputs need")
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        self.model_max_length = model_max_length
        self.special_tokens = tuple(t for t in SPECIAL_TOKENS if t in self.vocab)
        self.never_split = frozenset(self.special_tokens) | frozenset(never_split)
        # Special tokens are recognised in the raw text first, so "[MASK]." stays "[MASK]" ".";
        # other never_split words are kept only when whitespace delimits them.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        self._max_token_chars = max(len(t) for t in self.id_to_token) if self.id_to_token else 1

    @classmethod
    def from_pretrained(cls, directory, **overrides) -> "WordPieceTokenizer":
        """Load ``vocab.txt`` (and ``tokenizer_config.json`` if present) from a model folder."""
        directory = pathlib.Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {directory} (expected a "
                                    "folder holding vocab.txt, e.g. a BERT model folder)")
        kwargs = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            config = load_json(config_path)
            if not isinstance(config, dict):
                raise FormatError(f"{config_path}: expected a JSON object, got "
                                  f"{type(config).__name__}")
            for key in ("do_lower_case", "strip_accents", "tokenize_chinese_chars"):
                if config.get(key) is not None:
                    kwargs[key] = config[key]
            max_len = config.get("model_max_length")
            # Configs write a huge number (about 1e30) to mean "no limit".
            if isinstance(max_len, int) and 0 < max_len < 10**9:
                kwargs["model_max_length"] = max_len
            if config.get("never_split"):
                kwargs["never_split"] = tuple(config["never_split"])
        kwargs.update(overrides)
        return cls(directory / "vocab.txt", **kwargs)

    # -- ids of the special tokens

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        return self.vocab[PAD]

    @property
    def unk_token_id(self) -> int:
        return self.vocab[UNK]

    @property
    def cls_token_id(self) -> int:
        return self.vocab[CLS]

    @property
    def sep_token_id(self) -> int:
        return self.vocab[SEP]

    @property
    def mask_token_id(self) -> int | None:
        return self.vocab.get(MASK)

    # -- text -> tokens -> ids

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text``, without [CLS]/[SEP]."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}"
                            + (" (decode bytes to str first)" if isinstance(text, bytes) else ""))
        tokens = []
        for i, segment in enumerate(self._special_re.split(text)):
            if i % 2 == 1:  # re.split puts the captured special tokens at odd positions
                tokens.append(segment)
                continue
            for word in basic_tokenize(segment, self.do_lower_case, self.strip_accents,
                                       self.tokenize_chinese_chars, self.never_split):
                if word in self.never_split:
                    tokens.append(word)
                else:
                    tokens.extend(wordpiece_split(word, self.vocab, UNK, self._max_token_chars))
        return tokens

    def convert_tokens_to_ids(self, tokens) -> list[int]:
        unk = self.unk_token_id
        return [self.vocab.get(t, unk) for t in tokens]

    def convert_ids_to_tokens(self, ids) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            out.append(self.id_to_token[i])
        return out

    def _limit(self, max_length: int | None, truncation: bool) -> int | None:
        if not truncation:
            return None
        limit = max_length if max_length is not None else self.model_max_length
        if limit is not None and int(limit) < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length}")
        return None if limit is None else int(limit)

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None,
               truncation: bool = True) -> list[int]:
        """Ids of ``[CLS] text [SEP]``; truncation drops tokens from the end of the text.

        With ``truncation`` and no ``max_length``, the limit is ``model_max_length`` when the
        tokenizer config gives one (512 for BERT: the number of learned positions).
        """
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        limit = self._limit(max_length, truncation)
        n_special = 2 if add_special_tokens else 0
        if limit is not None:
            if limit < n_special:
                raise ValueError(f"max_length={limit} leaves no room for [CLS] and [SEP]")
            ids = ids[:limit - n_special]  # [SEP] stays the last token of a truncated input
        if add_special_tokens:
            ids = [self.cls_token_id] + ids + [self.sep_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool = True) -> str:
        """Text of ``ids``: "##" pieces rejoin their word; lower-casing and accents stay lost.

        ``skip_special_tokens`` also drops [UNK]. ``clean_up_tokenization_spaces`` removes the
        space before ". , ! ?" and inside English contractions.
        """
        tokens = self.convert_ids_to_tokens(ids)
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in self.special_tokens]
        text = " ".join(tokens).replace(" ##", "").strip()
        if clean_up_tokenization_spaces:
            for before, after in _CLEANUP:
                text = text.replace(before, after)
        return text

    def __call__(self, texts, max_length: int | None = None, padding="longest",
                 truncation: bool = True) -> dict:
        """Encode a string or a list of strings into arrays for a BERT model.

        padding: "longest" (or True) pads to the longest sequence in the batch, "max_length"
        pads to ``max_length`` (default ``model_max_length``), False pads nothing and then
        needs sequences of equal length. Returns host NumPy int64 arrays of shape (B, T):
        ``input_ids``, ``attention_mask`` (1 = real token, 0 = padding) and
        ``token_type_ids`` (all 0: one segment).
        """
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            raise TypeError(f"expected a str or a list of str, got {type(texts).__name__}")
        if not texts:
            raise ValueError("cannot encode an empty batch")
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"every text must be a str, got {type(t).__name__}")
        rows = [self.encode(t, max_length=max_length, truncation=truncation) for t in texts]
        longest = max(len(r) for r in rows)
        if padding is True or padding == "longest":
            width = longest
        elif padding == "max_length":
            width = max_length if max_length is not None else self.model_max_length
            if width is None:
                raise ValueError('padding="max_length" needs max_length (this tokenizer has '
                                 "no model_max_length)")
            width = max(int(width), longest)  # without truncation, a longer row still fits
        elif padding is False or padding is None or padding == "do_not_pad":
            if any(len(r) != longest for r in rows):
                raise ValueError("sequences have different lengths; use padding='longest' or "
                                 "'max_length' to batch them into one array")
            width = longest
        else:
            raise ValueError(f"padding must be 'longest', 'max_length' or False, got {padding!r}")

        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for b, row in enumerate(rows):
            input_ids[b, :len(row)] = row
            attention_mask[b, :len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": np.zeros((len(rows), width), dtype=np.int64)}
