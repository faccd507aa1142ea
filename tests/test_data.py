"""tinylora.data: the character tokenizer, built-in corpora, text loading and batches."""
import numpy as np
import pytest

import tinylora as tl
from tinylora.data import text as data
from tinylora.data import BUILTIN_VOCAB, CharTokenizer, get_batch, load_data, load_text


def test_char_tokenizer_round_trip_and_json():
    tok = CharTokenizer.from_text("hello world\n")
    assert tok.vocab == sorted(set("hello world\n")) and tok.vocab_size == 9
    ids = tok.encode("hello\nworld")
    assert ids.dtype == np.int64 and ids.tolist() == [tok.stoi[c] for c in "hello\nworld"]
    assert tok.decode(ids) == "hello\nworld"
    assert tok.decode(tl.tensor(ids)) == "hello\nworld"
    again = CharTokenizer.from_dict(tok.to_dict())
    assert again == tok and again.to_dict() == {"type": "char", "vocab": "\n dehlorw"}
    with pytest.raises(ValueError, match=r"character 'z' \(U\+007A\) on line 2 \(offset 4\)"):
        tok.encode("hel\nz")
    with pytest.raises(ValueError, match=r"token id 9 is outside"):
        tok.decode([1, 9])
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("aa")
    with pytest.raises(ValueError, match="not a character tokenizer"):
        CharTokenizer.from_dict({"type": "bpe"})


def test_builtin_corpora_are_different_domains_in_one_vocabulary():
    tok = CharTokenizer.builtin()
    assert tok.vocab_size == 96 and "".join(tok.vocab) == BUILTIN_VOCAB
    prose, code = data.builtin_text("prose"), data.builtin_text("python")
    for text in (prose, code):
        assert 100_000 <= len(text) <= 400_000
        assert set(text) <= set(BUILTIN_VOCAB)
        assert tok.decode(tok.encode(text)) == text
    # a tiny model can see the difference: keywords and indentation vs English words
    per_k = lambda text, s: 1000 * text.count(s) / len(text)  # noqa: E731
    assert per_k(code, "def ") > 5 * per_k(prose, "def ")
    assert per_k(code, "\n        ") > 5 * per_k(prose, "\n        ")
    assert per_k(prose, " the ") > 2 * per_k(code, " the ")
    assert per_k(code, "self.") > 5 * per_k(prose, "self.")
    # deterministic: built again from the sources, the same text
    assert data._cap(data.normalize_ascii(data._python())) == code
    with pytest.raises(ValueError, match="choose one of: builtin:prose, builtin:python"):
        data.builtin_text("poetry")


def test_normalize_ascii():
    assert data.normalize_ascii("\u201cna\u00efve\u201d \u2014 caf\u00e9\tok\r\n\u00df") == \
        '"naive" -- cafe    ok\n'


def test_get_batch_windows_shift_and_follow_the_seed():
    tokens = np.arange(100, dtype=np.uint16)
    tl.manual_seed(3)
    x, y = get_batch(tokens, 8, 5)
    assert x.shape == y.shape == (5, 8) and x.dtype == np.int64
    assert np.array_equal(y, x + 1) and np.all(np.diff(x, axis=1) == 1)
    tl.manual_seed(3)
    x2, _ = get_batch(tokens, 8, 5)
    assert np.array_equal(x, x2)
    x3, _ = get_batch(tokens, 8, 5)
    assert not np.array_equal(x, x3)
    assert get_batch(tokens, 99, 3)[0].shape == (3, 99)     # the longest window that fits
    with pytest.raises(ValueError, match="block_size \\+ 1 = 101 tokens, but the data has 100"):
        get_batch(tokens, 100, 1)


def test_load_text_and_load_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match="does not exist; give a UTF-8 text file or one of builtin:prose"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(IsADirectoryError):
        load_text(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\nna\u00efve".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not UTF-8 text \(byte 0xe9 at offset 3, line 1\)"):
        load_text(tmp_path / "latin1.txt")
    (tmp_path / "short.txt").write_text("abcdefghij" * 3)
    with pytest.raises(ValueError, match="validation split has 3 tokens but block_size \\+ 1 = 9"):
        load_data(str(tmp_path / "short.txt"), block_size=8)
    d = load_data(str(tmp_path / "short.txt"), block_size=2)
    assert d.tokenizer.vocab_size == 10 and len(d.train) == 27 and len(d.val) == 3
    assert d.info()["source"].endswith("short.txt") and len(d.info()["sha256"]) == 64


def test_load_builtin_with_a_given_tokenizer():
    d = load_data("builtin:python", block_size=64)
    assert d.tokenizer == CharTokenizer.builtin() and d.train.dtype == np.uint16
    assert len(d.train) + len(d.val) == len(data.builtin_text("python"))
    narrow = CharTokenizer("abc")
    with pytest.raises(ValueError, match="not in the tokenizer's 3-character vocabulary"):
        load_data("builtin:prose", tokenizer=narrow)
