"""Folders saved pre-quantized by transformers with bitsandbytes (NF4, double quantization):
GPT.from_hf on tests/fixtures/gpt2_bnb (made by tests/fixtures/make_gpt2_bnb_fixtures.py),
Linear4bit taking bitsandbytes' state dict as it is, and tinylora's own quantization of the
float Llama equal to bitsandbytes' folder byte for byte (tinylora.quant.prequantized)."""
import json
import pathlib
import shutil

import pytest

import tinylora as tl
from tinylora import backend, lora
from tinylora.backend import np
from tinylora.io import FormatError, load_safetensors
from tinylora.models import GPT, Llama
from tinylora.quant import Linear4bit, quantize_model

FIX = pathlib.Path(__file__).parent / "fixtures" / "gpt2_bnb"
LLAMA = pathlib.Path(__file__).parent / "fixtures" / "llama"
LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _logits(m, ids):
    with tl.no_grad():
        out, _ = m.eval()(tl.tensor(ids.astype(np.int64)))
    return backend.to_numpy(out.data)


def copy(tmp_path):
    dst = tmp_path / "gpt2_bnb"
    shutil.copytree(FIX, dst)
    return dst


def edit_config(folder, **changes):
    p = folder / "config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))


def test_prequantized_gpt2_gives_bitsandbytes_logits():
    m = GPT.from_hf(FIX)
    q = [p for p, mod in m.named_modules() if isinstance(mod, Linear4bit)]
    assert q == [f"transformer.h.{i}.{name}" for i in range(2) for name in LAYERS]
    layer = m.transformer.h[0].attn.c_attn
    assert layer.quant_type == "nf4" and layer.double_quant and layer.weight_shape == (192, 64)
    r = load_safetensors(FIX / "reference.safetensors")[0]
    assert np.abs(_logits(m, r["input_ids"]) - r["logits"]).max() < 1e-4


def test_prequantized_codes_load_as_they_are():
    """Every 4-bit tensor of the file is the layer's, byte for byte; the JSON keeps its values."""
    m = GPT.from_hf(FIX)
    file, _ = load_safetensors(FIX / "model.safetensors")
    ours = m.state_dict()
    for path in (f"transformer.h.{i}.{name}.weight" for i in range(2) for name in LAYERS):
        for suffix in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"):
            assert backend.to_numpy(ours[path + suffix].data).tobytes() == file[path + suffix].tobytes()
        key = path + ".quant_state.bitsandbytes__nf4"
        theirs, mine = bytes(file[key]), bytes(backend.to_numpy(ours[key].data))
        assert len(mine) > len(theirs) and json.loads(mine) == json.loads(theirs)


def test_linear4bit_loads_bitsandbytes_state_dict_directly():
    """bitsandbytes' Linear4bit state dict, unpadded JSON (166-167 bytes here) included."""
    file, _ = load_safetensors(FIX / "model.safetensors")
    prefix = "transformer.h.1.mlp.c_proj."
    sd = {k[len(prefix):]: v for k, v in file.items() if k.startswith(prefix)}
    layer = Linear4bit(256, 64, blocksize=64, double_quant=True)
    assert layer.state_dict()["weight.quant_state.bitsandbytes__nf4"].shape[0] != \
        sd["weight.quant_state.bitsandbytes__nf4"].shape[0]
    layer.load_state_dict(sd)
    want = GPT.from_hf(FIX).transformer.h[1].mlp.c_proj.dequantize()
    assert backend.to_numpy(layer.dequantize()).tobytes() == backend.to_numpy(want).tobytes()
    # a JSON that describes another weight is refused, naming the field
    other = dict(sd)
    other["weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(json.dumps(
        {**json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"])), "shape": [64, 255]}
    ).encode(), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        Linear4bit(256, 64).load_state_dict(other)
    with pytest.raises(ValueError, match="double_quant"):
        Linear4bit(256, 64, double_quant=False).load_state_dict(sd, strict=False)


def test_qlora_on_the_prequantized_gpt2():
    """LoRA over the downloaded 4-bit base: B = 0 keeps bitsandbytes' logits; gradients reach
    only A and B."""
    m = GPT.from_hf(FIX)
    lora.inject(m, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["attn.c_attn", "mlp.c_fc"]))
    r = load_safetensors(FIX / "reference.safetensors")[0]
    assert np.abs(_logits(m, r["input_ids"]) - r["logits"]).max() < 1e-4
    m.train()
    ids = tl.tensor(r["input_ids"].astype(np.int64))
    _, loss = m(ids, ids)
    loss.backward()
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in m.named_parameters() if "lora_A" in n or "lora_B" in n)


@pytest.mark.parametrize("qc,msg", [
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes 8-bit"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
     "no tensor carries a bitsandbytes quant state"),
    ({"quant_method": "gptq"}, "'gptq'"),
])
def test_other_quantizations_are_refused(tmp_path, qc, msg):
    d = copy(tmp_path)
    edit_config(d, quantization_config=qc)
    with pytest.raises(FormatError, match=msg):
        GPT.from_hf(d)


def test_float_folder_with_4bit_tensors_is_refused(tmp_path):
    d = copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="unexpected tensor"):
        GPT.from_hf(d)


def test_quantize_model_gives_bitsandbytes_bytes():
    """quantize_model on the float llama_q4 (NF4, double quantization) writes every tensor of
    llama_q4_bnb, which bitsandbytes quantized from the same weights, byte for byte."""
    m = Llama.from_hf(LLAMA / "llama_q4")
    quantize_model(m, double_quant=True, print_fn=None)
    ours, theirs = m.state_dict(), Llama.from_hf(LLAMA / "llama_q4_bnb").state_dict()
    assert ours.keys() == theirs.keys() and any(k.endswith(".nested_absmax") for k in ours)
    for k in ours:
        assert backend.to_numpy(ours[k].data).tobytes() == backend.to_numpy(theirs[k].data).tobytes(), k
    r = load_safetensors(LLAMA / "llama_q4_bnb" / "reference.safetensors")[0]
    assert np.abs(_logits(m, r["input_ids"]) - r["logits"]).max() < 1e-4
