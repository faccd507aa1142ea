"""GPT.save_hf: a GPT (e.g. after lora.merge_and_unload) written as a Hugging Face GPT-2
folder, read back by GPT.from_hf with the same logits; the file has the fixture's layout."""
import json
from pathlib import Path

import numpy as np
import pytest

import tinylora as tl
from tinylora import lora
from tinylora.backend import to_numpy
from tinylora.io import load_safetensors, read_safetensors_header
from tinylora.models import GPT, GPTConfig
from tinylora.data.gpt2_bpe import GPT2Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2_tiny"
BPE = Path(__file__).parent / "fixtures" / "gpt2_bpe"


def _logits(model, idx):
    model.eval()
    with tl.no_grad():
        return to_numpy(model(idx)[0].data)


def _ids(vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (2, 12))


def test_fixture_round_trips_exactly_in_hugging_face_layout(tmp_path):
    model = GPT.from_hf(FIXTURE)
    assert model.save_hf(tmp_path / "hf") == str(tmp_path / "hf")
    ref, _ = load_safetensors(FIXTURE / "model.safetensors")
    got, meta = load_safetensors(tmp_path / "hf" / "model.safetensors")
    assert meta == {"format": "pt"}                       # transformers refuses other formats
    assert set(got) == set(ref)                           # transformer.* keys, no lm_head
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype, k
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)   # Conv1D (in, out) again
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    want = json.loads((FIXTURE / "config.json").read_text())
    for key in ("model_type", "architectures", "vocab_size", "n_positions", "n_layer", "n_head",
                "n_embd", "n_inner", "activation_function", "layer_norm_epsilon",
                "tie_word_embeddings", "scale_attn_weights", "dtype"):
        assert cfg[key] == want[key], key
    idx = _ids(61)
    np.testing.assert_array_equal(_logits(GPT.from_hf(tmp_path / "hf"), idx), _logits(model, idx))


def test_merged_lora_model_saves_and_reloads_with_the_adapted_logits(tmp_path):
    model = GPT.from_hf(FIXTURE)
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    rng = np.random.default_rng(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data[...] = tl.backend.asarray(rng.normal(0, 0.1, p.shape).astype(p.data.dtype))
    idx = _ids(61, 1)
    adapted = _logits(model, idx)
    with pytest.raises(ValueError, match="merge_and_unload"):
        model.save_hf(tmp_path / "refused")
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    lora.merge_and_unload(model)
    model.save_hf(tmp_path / "hf")
    back = _logits(GPT.from_hf(tmp_path / "hf"), idx)
    assert np.abs(back - _logits(model, idx)).max() == 0
    np.testing.assert_allclose(back, adapted, atol=1e-5)
    assert np.abs(back - _logits(GPT.from_hf(FIXTURE), idx)).max() > 1e-3   # the adapter mattered


def test_model_without_biases_gets_zero_biases(tmp_path):
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=False))
    model.save_hf(tmp_path / "hf")
    header, _ = read_safetensors_header(tmp_path / "hf" / "model.safetensors")
    assert header["transformer.h.0.mlp.c_fc.bias"]["shape"] == [32]
    assert header["transformer.h.0.attn.c_attn.weight"]["shape"] == [8, 24]
    back = GPT.from_hf(tmp_path / "hf")
    idx = np.random.default_rng(0).integers(0, 13, (2, 8))
    np.testing.assert_array_equal(_logits(back, idx), _logits(model, idx))


def test_a_gpt2_tokenizer_is_written_beside_the_weights(tmp_path):
    tok = GPT2Tokenizer.from_pretrained(BPE)
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8))
    model.save_hf(tmp_path / "hf", tok)
    again = GPT2Tokenizer.from_pretrained(tmp_path / "hf")
    text = "def f(x):\n    return x ** 2  # café"
    np.testing.assert_array_equal(again.encode(text), tok.encode(text))
    assert again.merges == tok.merges and again.encoder == tok.encoder
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["eos_token_id"] == tok.encoder.get("<|endoftext|>")
    from tinylora.apps.finetune import load_pretrained      # `finetune --pretrained` reads it back
    m2, tok2, _ = load_pretrained(tmp_path / "hf")
    assert tok2.encoder == tok.encoder and m2.config.n_embd == 8


def test_an_untied_head_is_refused(tmp_path):
    from tinylora.nn import Parameter
    model = GPT.from_hf(FIXTURE)
    w = model.transformer.wte.weight.numpy()
    model.lm_head.weight = Parameter(tl.backend.asarray(w.copy()), requires_grad=False)
    model.save_hf(tmp_path / "same")           # an untied copy with equal values is fine
    model.lm_head.weight.data[...] += 1.0
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        model.save_hf(tmp_path / "untied")
    assert not (tmp_path / "untied").exists()
