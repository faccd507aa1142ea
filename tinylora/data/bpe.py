"""BPETokenizer: the BPE tokenizers of Hugging Face ``tokenizer.json`` files, in plain Python.

One pipeline, configured by the file, as in the ``tokenizers`` library:

    text -> split out added/special tokens (<|im_start|>, <s>, ...) -> normalizer (NFC, ...)
         -> pre-tokenizer (the regex split of GPT-2 or of Llama-3/Qwen2, digits, bytes->chars)
         -> BPE merges per piece (byte fallback to <0xNN> tokens) -> post-processor (BOS, ...)

Covers byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM) and SentencePiece-style BPE with byte
fallback (Llama 2, TinyLlama). Python's ``re`` has no ``\\p{L}``: the split patterns are
rewritten with explicit character classes built from ``unicodedata`` (letters L*, numbers N*,
and Unicode's White_Space for ``\\s``, which Rust's regex uses and Python's ``\\s`` is not).
A component this module does not implement is refused by name when the file is read.
"""
from __future__ import annotations

import functools
import os
import re
import unicodedata

from ..io import FormatError, load_json
from .gpt2_bpe import bytes_to_unicode
from .text import host_ids

__all__ = ["BPETokenizer", "translate_regex"]

# Unicode White_Space (Rust's \s); Python's \s also takes U+001C..U+001F
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.lru_cache(maxsize=None)
def _category_classes() -> dict:
    """{"L": body, "N": body}: character-class bodies matching every letter / number code
    point (one pass over Unicode, about a second, once per process)."""
    ranges: dict = {"L": [], "N": []}
    cur, start = None, 0
    for cp in range(0x110001):
        major = unicodedata.category(chr(cp))[0] if cp < 0x110000 else None
        if major != cur:
            if cur in ranges:
                ranges[cur].append((start, cp - 1))
            cur, start = major, cp
    return {k: "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in v)
            for k, v in ranges.items()}


def translate_regex(pattern: str) -> str:
    """A tokenizers (Oniguruma) pattern in Python ``re`` syntax: \\p{L}, \\p{N}, \\s, \\S."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt in "pP" and pattern[i + 2:i + 3] == "{":
                end = pattern.index("}", i)
                name = pattern[i + 3:end]
                if name not in ("L", "N") or nxt == "P":
                    raise FormatError(f"tokenizer regex {pattern!r}: \\{nxt}{{{name}}} is not "
                                      "supported (only \\p{L} and \\p{N})")
                body = _category_classes()[name]
                out.append(body if in_class else f"[{body}]")
                i = end + 1
                continue
            if nxt == "s":
                out.append(_WS if in_class else f"[{_WS}]")
            elif nxt == "S" and not in_class:
                out.append(f"[^{_WS}]")
            else:
                out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class and out and out[-1] not in ("[", "[^"):
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def _is_number(c: str) -> bool:
    return unicodedata.category(c)[0] == "N"


def _stage(node, key: str, step, x, *args):
    """x through one stage of tokenizer.json's pipeline: none leaves it as it is, a
    ``Sequence`` runs its nodes (listed under ``key``) in turn, any other node is one
    ``step(node, x, *args)``."""
    if node is None:
        return x
    if node["type"] == "Sequence":
        for sub in node[key]:
            x = _stage(sub, key, step, x, *args)
        return x
    return step(node, x, *args)


def _split(text: str, regex, behavior: str, invert: bool) -> list:
    """Pieces of text around the matches of regex (``tokenizers``' Split behaviours)."""
    pieces, last = [], 0
    for m in regex.finditer(text):
        if m.start() == m.end():
            continue
        pieces.append((text[last:m.start()], False))
        pieces.append((m.group(), True))
        last = m.end()
    pieces.append((text[last:], False))
    if invert:
        pieces = [(p, not hit) for p, hit in pieces]
    if behavior == "Isolated":
        return [p for p, _ in pieces if p]
    if behavior == "Removed":
        return [p for p, hit in pieces if p and not hit]
    raise FormatError(f"tokenizer Split behavior {behavior!r} is not supported "
                      "(Isolated, Removed)")


class BPETokenizer:
    """encode(str) -> list[int], decode(ids) -> str, equal to ``tokenizers``' Tokenizer."""

    def __init__(self, spec: dict, where: str = "tokenizer.json"):
        self.where = where
        model = spec.get("model") or {}
        if model.get("type", "BPE") != "BPE":
            raise FormatError(f"{where}: model type {model.get('type')!r} is not supported "
                              "(BPETokenizer reads BPE models)")
        for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
            if model.get(key):
                raise FormatError(f"{where}: model.{key}={model[key]!r} is not supported")
        self.vocab = dict(model.get("vocab") or {})
        merges = model.get("merges") or []
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        self.ranks = {p: i for i, p in enumerate(pairs)}
        self.byte_fallback = bool(model.get("byte_fallback", False))
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self.fuse_unk = bool(model.get("fuse_unk", False))
        self.unk_token = model.get("unk_token")
        self.added = {t["content"]: t for t in spec.get("added_tokens") or []}
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        for t in self.added.values():
            self.id_to_token[t["id"]] = t["content"]
        self.special_ids = {t["id"] for t in self.added.values() if t.get("special")}
        self._added_re = None
        if self.added:
            alts = []
            for t in sorted(self.added.values(), key=lambda t: -len(t["content"])):
                alts.append((r"\s*" if t.get("lstrip") else "") + re.escape(t["content"])
                            + (r"\s*" if t.get("rstrip") else ""))
            self._added_re = re.compile("|".join(alts))
        self.normalizer = self._check("normalizer", spec.get("normalizer"), _NORMALIZERS)
        self.pre_tokenizer = self._check("pre_tokenizer", spec.get("pre_tokenizer"), _PRE)
        self.post_processor = self._check("post_processor", spec.get("post_processor"), _POST)
        self.decoder = self._check("decoder", spec.get("decoder"), _DECODERS)
        self._regexes: dict = {}
        self._cache: dict = {}
        self.b2u = bytes_to_unicode()
        self.u2b = {c: b for b, c in self.b2u.items()}

    def _check(self, kind, node, known):
        if node is None:
            return None
        t = node.get("type")
        if t not in known:
            raise FormatError(f"{self.where}: {kind} {t!r} is not supported (BPETokenizer "
                              f"implements {', '.join(sorted(known))})")
        for sub in node.get("normalizers") or node.get("pretokenizers") or \
                node.get("processors") or node.get("decoders") or []:
            self._check(kind, sub, known)
        return node

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path) -> "BPETokenizer":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BPETokenizer.from_file: {path} is not a file; give a "
                                    "tokenizer.json written by Hugging Face tokenizers")
        return cls(load_json(path), path)

    @classmethod
    def from_pretrained(cls, folder) -> "BPETokenizer":
        path = os.path.join(os.fspath(folder), "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BPETokenizer.from_pretrained: {path} is missing (only "
                                    "tokenizer.json is read; a slow tokenizer's vocab/merges "
                                    "files are not)")
        return cls.from_file(path)

    @property
    def vocab_size(self) -> int:
        return max(self.id_to_token) + 1 if self.id_to_token else 0

    def token_to_id(self, token: str):
        t = self.added.get(token)
        return t["id"] if t is not None else self.vocab.get(token)

    # ------------------------------------------------------------------ encode
    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.encode: expected a str, got {type(text).__name__}")
        ids, first = [], True
        for piece, is_added in self._split_added(text):
            if is_added:
                ids.append(self.added[piece]["id"])
            else:
                norm = _stage(self.normalizer, "normalizers", self._normalize, piece)
                words = _stage(self.pre_tokenizer, "pretokenizers", self._pre_tokenize, [norm], first)
                for word in words:
                    if word:
                        ids.extend(self._bpe(word))
            first = False
        if not add_special_tokens:
            return ids
        return _stage(self.post_processor, "processors", self._post_process, ids)

    def _split_added(self, text):
        if self._added_re is None:
            return [(text, False)] if text else []
        out, last = [], 0
        for m in self._added_re.finditer(text):
            if m.start() > last:
                out.append((text[last:m.start()], False))
            out.append((m.group().strip() if m.group() not in self.added else m.group(), True))
            last = m.end()
        if last < len(text):
            out.append((text[last:], False))
        return out

    def _normalize(self, node, s: str) -> str:
        t = node["type"]
        if t in ("NFC", "NFD", "NFKC", "NFKD"):
            return unicodedata.normalize(t, s)
        if t == "Lowercase":
            return s.lower()
        if t == "Prepend":
            return node["prepend"] + s if s else s
        if t == "Replace":
            pat = node["pattern"]
            if "String" not in pat:
                return re.sub(self._regex(pat["Regex"]), node["content"], s)
            return s.replace(pat["String"], node["content"])
        raise AssertionError(t)

    def _regex(self, pattern: str):
        r = self._regexes.get(pattern)
        if r is None:
            r = self._regexes[pattern] = re.compile(translate_regex(pattern))
        return r

    def _pre_tokenize(self, node, pieces: list, first: bool) -> list:
        t = node["type"]
        out = []
        for p in pieces:
            if t == "ByteLevel":
                if node.get("add_prefix_space") and not p.startswith(" "):
                    p = " " + p
                parts = [p]
                if node.get("use_regex", True):
                    parts = [m.group() for m in self._regex(_GPT2_PATTERN).finditer(p)]
                out += ["".join(self.b2u[b] for b in q.encode("utf-8")) for q in parts]
            elif t == "Split":
                pat = node["pattern"]
                rx = self._regex(pat["Regex"]) if "Regex" in pat else re.compile(re.escape(pat["String"]))
                out += _split(p, rx, node.get("behavior", "Isolated"), node.get("invert", False))
            elif t == "Digits":
                rx = _NUM_ONE if node.get("individual_digits") else _NUM_RUN
                out += _split(p, rx, "Isolated", False)
            elif t == "Metaspace":
                rep = node.get("replacement", "\u2581")
                scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
                q = p.replace(" ", rep)
                if (scheme == "always" or (scheme == "first" and first)) and not q.startswith(rep):
                    q = rep + q
                if node.get("split", True):   # each piece starts at a ▁ (merged with the next)
                    out += [s for s in re.split(f"(?={re.escape(rep)})", q) if s]
                else:
                    out.append(q)
            else:  # Whitespace-like splitters
                out += [m.group() for m in _WHITESPACE.finditer(p)]
        return [p for p in out if p]

    def _bpe(self, word: str) -> list:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        if self.ignore_merges and word in self.vocab:
            ids = [self.vocab[word]]
        else:
            ids = self._merge(word)
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def _merge(self, word: str) -> list:
        # symbols: vocab strings that may merge; fallback bytes / unk are (id,) tuples that never do
        syms: list = []
        for c in word:
            if c in self.vocab:
                syms.append(c)
            elif self.byte_fallback and all(f"<0x{b:02X}>" in self.vocab for b in c.encode()):
                syms += [(self.vocab[f"<0x{b:02X}>"],) for b in c.encode()]
            elif self.unk_token is not None and self.unk_token in self.vocab:
                if not (self.fuse_unk and syms and syms[-1] == (self.vocab[self.unk_token],)):
                    syms.append((self.vocab[self.unk_token],))
            else:
                raise ValueError(f"BPETokenizer: character {c!r} is not in the vocabulary and "
                                 "the tokenizer has no byte fallback or unk_token")
        while len(syms) > 1:   # merge the best-ranked adjacent pair, leftmost first, until none
            best, at = None, -1
            for i in range(len(syms) - 1):
                a, b = syms[i], syms[i + 1]
                if isinstance(a, str) and isinstance(b, str):
                    r = self.ranks.get((a, b))
                    if r is not None and (best is None or r < best):
                        best, at = r, i
            if best is None:
                break
            pair, merged, i = (syms[at], syms[at + 1]), [], 0
            while i < len(syms):
                if i < len(syms) - 1 and (syms[i], syms[i + 1]) == pair:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(syms[i])
                    i += 1
            syms = merged
        return [s[0] if isinstance(s, tuple) else self.vocab[s] for s in syms]

    def _post_process(self, node, ids: list) -> list:
        t = node["type"]
        if t == "TemplateProcessing":
            out = []
            for item in node["single"]:
                if "Sequence" in item:
                    out += ids
                else:
                    out += node["special_tokens"][item["SpecialToken"]["id"]]["ids"]
            return out
        return ids   # ByteLevel: only offsets change

    # ------------------------------------------------------------------ decode
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        tokens = []
        for i in host_ids(ids).tolist():
            if i not in self.id_to_token:
                raise ValueError(f"BPETokenizer.decode: id {i} is not in the vocabulary "
                                 f"(size {self.vocab_size})")
            if skip_special_tokens and i in self.special_ids:
                continue
            tokens.append(self.id_to_token[i])
        return "".join(_stage(self.decoder, "decoders", self._decode, tokens))

    def _decode(self, node, tokens: list) -> list:
        t = node["type"]
        if t == "ByteLevel":   # a token with a character outside the byte map keeps its UTF-8
            raw = b"".join(bytes(self.u2b[c] for c in tok) if all(c in self.u2b for c in tok)
                           else tok.encode() for tok in tokens)
            return [raw.decode("utf-8", errors="replace")]
        if t == "Replace":
            return [tok.replace(node["pattern"]["String"], node["content"]) for tok in tokens]
        if t == "ByteFallback":
            out, buf = [], []
            for tok in tokens + [None]:
                m = tok is not None and re.fullmatch(r"<0x([0-9A-F]{2})>", tok)
                if m:
                    buf.append(int(m.group(1), 16))
                    continue
                if buf:
                    try:
                        out.append(bytes(buf).decode("utf-8"))
                    except UnicodeDecodeError:
                        out += ["\ufffd"] * len(buf)
                    buf = []
                if tok is not None:
                    out.append(tok)
            return out
        if t == "Fuse":
            return ["".join(tokens)]
        if t == "Strip":
            c, start, stop = node["content"], node.get("start", 0), node.get("stop", 0)
            out = []
            for tok in tokens:
                s = 0
                while s < start and tok[s:s + 1] == c:
                    s += 1
                e = len(tok)
                while len(tok) - e < stop and e > s and tok[e - 1] == c:
                    e -= 1
                out.append(tok[s:e])
            return out
        if t == "Metaspace":
            rep = node.get("replacement", "\u2581")
            scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
            out = []
            for i, tok in enumerate(tokens):
                tok = tok.replace(rep, " ")
                if i == 0 and scheme != "never" and tok.startswith(" "):
                    tok = tok[1:]
                out.append(tok)
            return out
        raise AssertionError(t)

    def __repr__(self):
        return (f"BPETokenizer(vocab_size={self.vocab_size}, added={len(self.added)}, "
                f"byte_fallback={self.byte_fallback})")


_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


class _CategoryRuns:
    """finditer over runs (or single characters) of Unicode numbers (Rust's char::is_numeric)."""

    def __init__(self, single: bool):
        self.single = single

    def finditer(self, text):
        i = 0
        while i < len(text):
            if _is_number(text[i]):
                j = i + 1
                while not self.single and j < len(text) and _is_number(text[j]):
                    j += 1
                yield _Match(text, i, j)
                i = j
            else:
                i += 1


class _Match:
    def __init__(self, text, start, end):
        self._t, self._s, self._e = text, start, end

    def start(self):
        return self._s

    def end(self):
        return self._e

    def group(self):
        return self._t[self._s:self._e]


_NUM_ONE, _NUM_RUN = _CategoryRuns(True), _CategoryRuns(False)
_WHITESPACE = re.compile(r"\w+|[^\w\s]+")
_NORMALIZERS = {"Sequence", "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend", "Replace"}
_PRE = {"Sequence", "ByteLevel", "Split", "Digits", "Metaspace", "Whitespace"}
_POST = {"Sequence", "TemplateProcessing", "ByteLevel"}
_DECODERS = {"Sequence", "ByteLevel", "Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}
