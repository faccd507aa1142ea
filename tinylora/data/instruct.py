"""Instruction data: JSONL records -> token ids with the loss on the responses only.

Each line is one JSON object, either ``{"prompt": ..., "response": ...}`` or
``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`` (the chat
format). The text is laid out with the ChatML template when the tokenizer knows
``<|im_start|>`` (Qwen2, SmolLM2-Instruct), else with a plain one:

    ChatML:  <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{response}<|im_end|>\\n
    plain:   ### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}{eos}

Only the assistant's tokens (its text and the token that ends it) are learned: every other
target is -100, which ``cross_entropy`` ignores, so the model is not trained to write prompts.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..backend import np
from ..io import decode_utf8

__all__ = ["load_jsonl", "encode_record", "InstructionData", "IGNORE"]

IGNORE = -100
_ROLES = ("system", "user", "assistant")
_EOS_NAMES = ("<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<|eot_id|>")


def load_jsonl(path) -> list:
    """The records of a JSONL file (one object per non-empty line)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        text = decode_utf8(f.read(), path, "save the file as UTF-8")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one "
                             "object such as {\"prompt\": ..., \"response\": ...}") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append(rec)
    if not out:
        raise ValueError(f"{path}: no records (one JSON object per line)")
    return out


def _messages(rec: dict, where: str) -> list:
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        for m in msgs:
            if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: each message needs a role in {_ROLES} and a string "
                                 f"content, got {str(m)[:80]}")
    else:
        if not isinstance(rec.get("prompt"), str):
            raise ValueError(f"{where}: a record needs 'prompt' and 'response' strings, or "
                             "'messages' in the chat format")
        msgs = [{"role": "user", "content": rec["prompt"]}]
        if isinstance(rec.get("response"), str):
            msgs.append({"role": "assistant", "content": rec["response"]})
    if not any(m["role"] == "assistant" and m["content"] for m in msgs):
        raise ValueError(f"{where}: the record has no response (no non-empty 'response' or "
                         "assistant message): there would be nothing to learn from it")
    return msgs


def _encode(tok, text: str) -> list:
    if not text:
        return []
    try:
        return list(tok.encode(text, add_special_tokens=False))
    except TypeError:   # tokenizers without special-token handling (GPT2Tokenizer)
        return [int(i) for i in tok.encode(text)]


def _special(tok, name):
    """The id of special token ``name``, or None (a BPETokenizer's added tokens only: a
    vocabulary may hold the same text as an ordinary token)."""
    added = getattr(tok, "added", None)
    if added is not None:
        t = added.get(name)
        return None if t is None else t["id"]
    lookup = getattr(tok, "token_to_id", None)
    return None if lookup is None else lookup(name)


def _run(tok, parts):
    """Token ids of consecutive text parts [(text, learned)], encoded as one text (as the
    tokenizer would see the whole conversation), and which tokens are learned: a token is
    learned when it lies wholly past the end of the text before a learned part."""
    full = "".join(t for t, _ in parts)
    ids = _encode(tok, full)
    learned, pos = [False] * len(ids), 0
    for text, learn in parts:
        a, pos = pos, pos + len(text)
        if learn:
            lo, hi = _common(tok, full[:a], ids), _common(tok, full[:pos], ids)
            learned[lo:hi] = [True] * (hi - lo)
    return ids, learned


def _common(tok, prefix: str, ids) -> int:
    """How many leading tokens of ids the text ``prefix`` alone encodes to."""
    if not prefix:
        return 0
    p, n = _encode(tok, prefix), 0
    while n < min(len(p), len(ids)) and p[n] == ids[n]:
        n += 1
    return n


def encode_record(rec: dict, tok, max_len: int | None = None, where: str = "record"):
    """(ids, targets): model inputs and next-token targets, the same length; targets are
    -100 except where the next token belongs to an assistant turn."""
    msgs = _messages(rec, where)
    start, end = _special(tok, "<|im_start|>"), _special(tok, "<|im_end|>")
    try:
        bos = list(tok.encode("", add_special_tokens=True))   # the post-processor's BOS, if any
    except TypeError:
        bos = []
    items = [(bos, False)] if bos else []                    # [(ids, learned) | [(text, learned)]]
    if start is not None and end is not None:                # ChatML
        for m in msgs:
            learn = m["role"] == "assistant"
            items += [([start], False), [(m["role"] + "\n", False), (m["content"], learn)],
                      ([end], learn), [("\n", False)]]
    else:
        eos = next((i for i in (_special(tok, n) for n in _EOS_NAMES) if i is not None), None)
        header = {"system": "### System:\n", "user": "### Instruction:\n",
                  "assistant": "### Response:\n"}
        parts = []
        for i, m in enumerate(msgs):
            learn = m["role"] == "assistant"
            parts += [(("" if i == 0 else "\n\n") + header[m["role"]], False), (m["content"], learn)]
            if learn and eos is not None:
                items += [parts, ([eos], True)]
                parts = []
        if parts:
            items.append(parts)
    ids, learned = [], []
    for item in items:
        if isinstance(item, list):
            item = _run(tok, item)
        else:
            item = (item[0], [item[1]] * len(item[0]))
        ids += item[0]
        learned += item[1]
    if max_len is not None and len(ids) - 1 > max_len:
        raise ValueError(f"{where}: {len(ids) - 1} tokens, longer than the context of {max_len}; "
                         "shorten the record or train with a longer block size")
    targets = [t if learn else IGNORE for t, learn in zip(ids[1:], learned[1:])]
    return ids[:-1], targets


@dataclass
class InstructionData:
    """Encoded records and padded batches of them."""
    examples: list           # [(ids, targets)]
    pad_id: int = 0

    @classmethod
    def from_jsonl(cls, path, tokenizer, max_len: int) -> "InstructionData":
        recs = load_jsonl(path)
        where = os.fspath(path)
        return cls([encode_record(r, tokenizer, max_len, f"{where}: record {i + 1}")
                    for i, r in enumerate(recs)])

    def batch(self, indices):
        """idx (B, T) int64 padded on the right with pad_id, targets (B, T) padded with -100.
        Right padding needs no attention mask: causal attention never looks ahead."""
        rows = [self.examples[i] for i in indices]
        T = max(len(ids) for ids, _ in rows)
        idx = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        tgt = np.full((len(rows), T), IGNORE, dtype=np.int64)
        for r, (ids, targets) in enumerate(rows):
            idx[r, :len(ids)] = ids
            tgt[r, :len(targets)] = targets
        return idx, tgt

    def sample(self, batch_size: int, rng):
        """A random batch (indices drawn with replacement from ``rng``)."""
        return self.batch(rng.integers(0, len(self.examples), batch_size))
