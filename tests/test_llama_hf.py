"""Llama.from_hf on the edges: transformers 4.x and 5.x config forms, fields that are ignored,
fields that are refused with a one-line error naming them, and broken folders."""
import json
import pathlib
import shutil

import pytest

import tinylora as tl
from tinylora import backend
from tinylora.backend import np
from tinylora.functional import rope_tables
from tinylora.io import FormatError, load_safetensors
from tinylora.models import Llama
from tinylora.models import LlamaConfig
from tinylora.models.llama_hf import llama_config_from_hf, rope_from_hf

FIX = pathlib.Path(__file__).parent / "fixtures" / "llama"


def copy(tmp_path, name="llama_gqa"):
    dst = tmp_path / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(FIX / name, dst, ignore=shutil.ignore_patterns("peft_adapter"))
    return dst


def edit_config(folder, **changes):
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


def logits(model, name):
    r = load_safetensors(FIX / name / "reference.safetensors")[0]
    with tl.no_grad():
        out, _ = model.eval()(r["input_ids"])
    return np.abs(backend.to_numpy(out.data) - r["logits"]).max()


def test_transformers_4x_config_form(tmp_path):
    """4.x wrote rope_theta and rope_scaling (with "type") at the top level."""
    d = copy(tmp_path, "llama3_rope")
    rp = json.loads((d / "config.json").read_text())["rope_parameters"]
    scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type")}
    edit_config(d, rope_parameters=None, rope_theta=rp["rope_theta"],
                rope_scaling={**scaling, "type": "llama3"}, torch_dtype="float32",
                transformers_version="4.46.0", pretraining_tp=1)
    m = Llama.from_hf(d)
    assert m.config.rope_scaling["rope_type"] == "llama3"
    assert logits(m, "llama3_rope") < 1e-4


def test_4x_default_rope_with_null_scaling(tmp_path):
    d = copy(tmp_path)
    edit_config(d, rope_parameters=None, rope_theta=10000.0, rope_scaling=None)
    assert logits(Llama.from_hf(d), "llama_gqa") < 1e-4


def test_math_free_fields_are_ignored(tmp_path):
    d = copy(tmp_path)
    edit_config(d, architectures=["SomethingElse"], initializer_range=0.5, use_cache=False,
                layer_types=["full_attention", "full_attention"], bos_token_id=1,
                eos_token_id=[2, 3], attention_dropout=0.0, sliding_window=None,
                custom_field={"anything": 1})
    assert logits(Llama.from_hf(d), "llama_gqa") < 1e-4


@pytest.mark.parametrize("changes,field", [
    (dict(model_type="mistral"), "model_type 'mistral'"),
    (dict(model_type="gemma"), "model_type 'gemma'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 2.0}),
     "rope_parameters.rope_type='yarn'"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling.rope_type='dynamic'"),
    (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "default", "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(use_sliding_window=True, sliding_window=16), "use_sliding_window"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=None), "missing config key"),
])
def test_refused_fields_name_themselves(tmp_path, changes, field):
    d = copy(tmp_path)
    edit_config(d, **changes)
    with pytest.raises(FormatError) as e:
        Llama.from_hf(d)
    text = str(e.value)
    assert field in text and "\n" not in text and "config.json" in text


def test_wrong_shapes_and_missing_tensors(tmp_path):
    d = copy(tmp_path)
    edit_config(d, intermediate_size=48)
    with pytest.raises(FormatError, match="mlp.gate_proj.weight' has shape"):
        Llama.from_hf(d)
    d = copy(tmp_path, "qwen2_tied")
    edit_config(d, tie_word_embeddings=False)         # an untied head needs lm_head.weight
    with pytest.raises(FormatError, match="lm_head.weight"):
        Llama.from_hf(d)
    d = copy(tmp_path, "qwen2_tied")
    edit_config(d, model_type="llama")                # llama has no q/k/v biases: unexpected
    with pytest.raises(FormatError, match="unexpected tensor.*q_proj.bias"):
        Llama.from_hf(d)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Llama.from_hf(tmp_path / "nope")
    d = copy(tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        Llama.from_hf(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        Llama.from_hf(d)


def test_sharded_index_errors(tmp_path):
    d = copy(tmp_path, "llama_sharded")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(idx["weight_map"].values()))[0]
    (d / shard).unlink()
    with pytest.raises(FormatError, match=f"shard '{shard}'"):
        Llama.from_hf(d)
    idx["weight_map"] = {"a": "../x.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(FormatError, match="not a file"):
        Llama.from_hf(d)


def test_bf16_weights_are_read_bit_exactly():
    """bfloat16 widened by a shift equals transformers' bf16 -> float32 conversion."""
    m = Llama.from_hf(FIX / "llama_bf16")
    w = m.model.embed_tokens.weight.numpy()
    bits = w.view(np.uint32)
    assert (bits & 0xFFFF).max() == 0          # the low half of every float32 is zero
    assert logits(m, "llama_bf16") < 1e-4


def test_rope_forms_agree():
    a = rope_from_hf({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}, "x")
    b = rope_from_hf({"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}}, "x")
    assert a == b == (5e5, {"rope_type": "linear", "factor": 2.0})
    assert rope_from_hf({}, "x") == (10000.0, None)
    cos_lin, _ = rope_tables(range(6), 8, 100.0, {"rope_type": "linear", "factor": 2.0})
    cos_half, _ = rope_tables(np.arange(6) / 2, 8, 100.0)   # linear scaling = positions / factor
    assert np.allclose(backend.to_numpy(cos_lin), backend.to_numpy(cos_half), atol=1e-6)


def test_qwen2_config_has_qkv_bias_without_the_field():
    cfg = json.loads((FIX / "qwen2_tied" / "config.json").read_text())
    assert "attention_bias" not in cfg
    c = llama_config_from_hf(cfg, "x", LlamaConfig)
    assert c.attention_bias and c.model_type == "qwen2" and c.tie_word_embeddings


@pytest.mark.parametrize("name", ["qwen2_tied", "llama3_rope", "llama_gqa"])
def test_save_pretrained_round_trips(tmp_path, name):
    m = Llama.from_hf(FIX / name)
    m.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == m.config.model_type and cfg["hidden_act"] == "silu"
    again = Llama.from_hf(tmp_path / "out")
    assert again.config == m.config
    assert logits(again, name) < 1e-4


def test_save_pretrained_of_a_merged_lora_model(tmp_path):
    from tinylora import lora
    m = Llama.from_hf(FIX / "llama_gqa")
    lora.load_adapter(m, FIX / "llama_gqa" / "peft_adapter")
    with pytest.raises(ValueError, match="merge_and_unload"):
        m.save_pretrained(tmp_path / "x")
    lora.merge_and_unload(m)
    m.save_pretrained(tmp_path / "merged")
    r = load_safetensors(FIX / "llama_gqa" / "reference.safetensors")[0]
    with tl.no_grad():
        out, _ = Llama.from_hf(tmp_path / "merged").eval()(r["input_ids"])
    assert np.abs(backend.to_numpy(out.data) - r["lora_logits"]).max() < 1e-4


def test_prequantized_bitsandbytes_folder_gives_bitsandbytes_logits():
    """llama_q4_bnb was saved by transformers with BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True): its codes load as they are."""
    from tinylora.quant import Linear4bit
    m = Llama.from_hf(FIX / "llama_q4_bnb")
    q = [p for p, mod in m.named_modules() if isinstance(mod, Linear4bit)]
    assert len(q) == 7 and not isinstance(m.lm_head, Linear4bit)
    assert m.model.layers[0].self_attn.q_proj.double_quant
    assert logits(m, "llama_q4_bnb") < 1e-4


def test_prequantized_with_adapter(tmp_path):
    """A PEFT adapter on a downloaded 4-bit base: PEFT's outputs over bitsandbytes' layers."""
    from tinylora import lora
    m = Llama.from_hf(FIX / "llama_q4_bnb")
    lora.load_adapter(m, FIX / "llama_q4" / "peft_adapter", check_base=False)
    r = load_safetensors(FIX / "llama_q4_bnb" / "reference.safetensors")[0]
    with tl.no_grad():
        out, _ = m.eval()(r["input_ids"])
    assert np.abs(backend.to_numpy(out.data) - r["lora_logits"]).max() < 1e-4
    assert np.abs(r["lora_logits"] - r["logits"]).max() > 1e-2


@pytest.mark.parametrize("qc,msg", [
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes 8-bit"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "int4"),
    ({"quant_method": "awq"}, "'awq'"),
])
def test_other_quantizations_are_refused(tmp_path, qc, msg):
    d = copy(tmp_path, "llama_q4_bnb")
    edit_config(d, quantization_config=qc)
    with pytest.raises(FormatError, match=msg):
        Llama.from_hf(d)
