"""BPETokenizer against Hugging Face `tokenizers` on hard text (Unicode, CJK, emoji, runs of
spaces and newlines, digits, contractions, special tokens), for six layouts trained with
`tokenizers` (tests/fixtures/llama/bpe, made by make_llama_fixtures.py)."""
import json
import pathlib

import pytest

from tinylora.io import FormatError
from tinylora.data.bpe import BPETokenizer, translate_regex

BPE = pathlib.Path(__file__).parent / "fixtures" / "llama" / "bpe"
CASES = json.loads((BPE / "cases.json").read_text())
NAMES = sorted(CASES["tokenizers"])


@pytest.fixture(scope="module", params=NAMES)
def tok(request):
    return request.param, BPETokenizer.from_file(BPE / f"{request.param}.json")


def test_encode_equals_tokenizers(tok):
    name, t = tok
    ref = CASES["tokenizers"][name]
    for text, ids, plain in zip(CASES["texts"], ref["ids"], ref["ids_no_special"]):
        assert t.encode(text) == ids, (name, text)
        assert t.encode(text, add_special_tokens=False) == plain, (name, text)


def test_decode_equals_tokenizers_and_round_trips(tok):
    name, t = tok
    ref = CASES["tokenizers"][name]
    for text, ids, dec, keep in zip(CASES["texts"], ref["ids"], ref["decoded"],
                                    ref["decoded_keep_special"]):
        assert t.decode(ids) == dec, (name, text)
        assert t.decode(ids, skip_special_tokens=False) == keep, (name, text)
        if name not in ("gpt2_prefix", "llama2", "qwen2") and "<|" not in text:
            assert t.decode(t.encode(text)) == text, (name, text)


def test_round_trip_where_the_normalizer_allows_it():
    """Qwen2 NFC-normalizes; Llama 2's byte fallback keeps everything; both round-trip on NFC text."""
    import unicodedata
    for name in ("qwen2", "llama2"):
        t = BPETokenizer.from_file(BPE / f"{name}.json")
        for text in CASES["texts"]:
            if "<|" in text:
                continue
            s = unicodedata.normalize("NFC", text) if name == "qwen2" else text
            assert t.decode(t.encode(s)) == s, (name, text)


def test_special_tokens_and_lookup():
    t = BPETokenizer.from_file(BPE / "qwen2.json")
    ids = t.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == t.token_to_id("<|im_start|>") and ids[-1] == t.token_to_id("<|im_end|>")
    assert t.decode(ids) == "user\nhi"
    assert t.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    llama3 = BPETokenizer.from_file(BPE / "llama3.json")
    assert llama3.encode("hi")[0] == llama3.token_to_id("<|begin_of_text|>")
    assert llama3.encode("hi", add_special_tokens=False)[0] != llama3.token_to_id("<|begin_of_text|>")


def test_byte_fallback_is_used_for_unseen_characters():
    t = BPETokenizer.from_file(BPE / "llama2.json")
    ids = t.encode("한", add_special_tokens=False)
    assert [t.id_to_token[i] for i in ids][-3:] == ["<0xED>", "<0x95>", "<0x9C>"]


def test_translate_regex_matches_unicode_classes():
    import re
    rx = re.compile(translate_regex(r" ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"))
    # U+001C is not Unicode White_Space (Python's own \s would call it a space)
    assert [m.group() for m in rx.finditer("abc 東京 ½3 \x1c")] == ["abc", " 東京", " ½3", " \x1c"]
    with pytest.raises(FormatError, match=r"\\p\{Lu\}"):
        translate_regex(r"\p{Lu}")


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        BPETokenizer.from_pretrained(tmp_path)
    spec = json.loads((BPE / "gpt2.json").read_text())
    spec["model"]["type"] = "WordPiece"
    with pytest.raises(FormatError, match="model type 'WordPiece'"):
        BPETokenizer(spec)
    spec = json.loads((BPE / "gpt2.json").read_text())
    spec["normalizer"] = {"type": "Precompiled"}
    with pytest.raises(FormatError, match="normalizer 'Precompiled'"):
        BPETokenizer(spec)
    t = BPETokenizer(json.loads((BPE / "gpt2.json").read_text()))
    with pytest.raises(ValueError, match="id 99999"):
        t.decode([99999])
    (tmp_path / "tokenizer.json").write_text((BPE / "smollm.json").read_text())
    assert BPETokenizer.from_pretrained(tmp_path).encode("12") == \
        BPETokenizer.from_file(BPE / "smollm.json").encode("12")
