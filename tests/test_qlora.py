"""QLoRA: quantize_model, LoRA over a 4-bit base (gradients, training, merging), and the
quantized model's state dict and files."""
import os
import warnings

import numpy as np
import pytest

import tinylora as tl
from tinylora import lora, nn, quant
from tinylora.io import load_safetensors
from tinylora.models.gpt import GPT, GPTConfig
from tinylora.optim import AdamW
from tinylora.quant import Linear4bit, QuantizationWarning

SMALL = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=64)


def gpt(seed=0, **kw):
    tl.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, **kw}))


def qlora_gpt(seed=0, r=4, init=False, **kw):
    m = gpt(seed, **kw)
    quant.quantize_model(m, print_fn=None)
    lora.inject(m, lora.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                   init_lora_weights=init))
    return m


def batch(seed=0, B=3, T=16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 65, (B, T)), rng.integers(0, 65, (B, T))


def quantized_arrays(model) -> dict:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()
            if ".weight" in k and v.dtype == np.uint8 or "weight." in k}


# ----------------------------------------------------------------------------- quantize_model

def test_quantize_model_converts_every_linear_but_the_tied_head():
    m = gpt()
    lines = []
    rep = quant.quantize_model(m, print_fn=lines.append)
    paths = [f"transformer.h.{i}.{n}" for i in range(2)
             for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert rep.layers == paths and rep.skipped == [("lm_head", "skip")]
    assert all(isinstance(m.get_submodule(p), Linear4bit) for p in paths)
    assert type(m.lm_head) is nn.Linear and m.lm_head.weight is m.transformer.wte.weight
    C = SMALL["n_embd"]
    assert rep.params == 2 * 12 * C * C and rep.bytes_before == 4 * rep.params
    assert rep.bytes_after == sum(m.get_submodule(p).weight_nbytes for p in paths)
    assert "quantized 8 Linear layers to nf4" in lines[0] and "bytes/param" in lines[0]
    logits, _ = m(batch()[0])                                        # still runs
    assert logits.shape == (3, 16, 65)


def test_quantize_model_without_skip_still_leaves_a_tied_head_alone():
    rep = quant.quantize_model(gpt(), skip=(), print_fn=None)
    assert rep.skipped == [("lm_head", "tied weight")] and len(rep.layers) == 8


def test_quantize_model_targets_lists_and_regexes_like_lora():
    m = gpt()
    rep = quant.quantize_model(m, target_modules=["c_attn"], print_fn=None)
    assert rep.layers == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    rep = quant.quantize_model(m, target_modules=r".*\.mlp\.c_(fc|proj)", quant_type="fp4",
                               double_quant=False, print_fn=None)
    assert len(rep.layers) == 4 and m.transformer.h[1].mlp.c_fc.quant_type == "fp4"
    assert type(m.transformer.h[0].attn.c_proj) is nn.Linear


def test_quantize_model_errors_leave_the_model_unchanged():
    m = gpt()
    with pytest.raises(ValueError, match="selects no Linear layer.*transformer.h.0.attn.c_attn"):
        quant.quantize_model(m, target_modules=["q_proj"], print_fn=None)
    with pytest.raises(ValueError, match="shares its weight.*tied"):
        quant.quantize_model(m, target_modules=["lm_head", "c_attn"], skip=(), print_fn=None)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        quant.quantize_model(m, target_modules="c_(attn", print_fn=None)
    assert not any(isinstance(x, Linear4bit) for x in m.modules())


def test_bytes_per_param_with_double_quant_is_at_most_0_52():
    m = gpt(n_layer=2, n_head=6, n_embd=384, block_size=32)
    rep = quant.quantize_model(m, print_fn=None)
    assert rep.bytes_per_param <= 0.52, str(rep)
    plain = quant.quantize_model(gpt(n_layer=2, n_head=6, n_embd=384, block_size=32),
                                 double_quant=False, print_fn=None)
    assert plain.bytes_per_param > 0.5625                           # 4 + 32/64 bits, plus tables


# ----------------------------------------------------------------------------- QLoRA

def test_qlora_gpt_gradcheck_wrt_lora_parameters_in_float64():
    with tl.default_dtype(tl.float64):
        m = qlora_gpt(n_layer=1, n_embd=32, block_size=8)
    params = lora.trainable_parameters(m)
    assert len(params) == 8 and all(p.dtype == np.float64 for p in params)
    x, y = batch(B=2, T=8)
    tl.gradcheck(lambda *ps: m(x, y)[1], params, element_limit=64, n_directions=4)


def test_qlora_training_lowers_the_loss_and_leaves_the_4bit_base_bit_identical():
    m = qlora_gpt(init=True)
    frozen = quantized_arrays(m)
    assert len(frozen) == 8 * 6                      # codes + 5 state entries per layer
    opt = AdamW(lora.trainable_parameters(m), lr=3e-3)
    x, y = batch()
    losses = []
    for _ in range(8):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = quantized_arrays(m)
    assert after.keys() == frozen.keys()
    for k in frozen:
        assert after[k].dtype == frozen[k].dtype
        np.testing.assert_array_equal(after[k], frozen[k], err_msg=k)


def test_merge_into_4bit_base_warns_and_changes_outputs_only_by_the_rounding():
    m = qlora_gpt()
    layer = m.transformer.h[0].attn.c_attn
    x = tl.randn(4, SMALL["n_embd"])
    before = layer(x).numpy()
    target = tl.backend.to_numpy(layer.base_layer.dequantize() + layer.delta_weight("default"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora.merge(m)
    assert any(issubclass(w.category, QuantizationWarning) for w in caught)
    assert layer.merged_adapters == ["default"] and isinstance(layer.base_layer, Linear4bit)
    E = tl.backend.to_numpy(layer.base_layer.dequantize()) - target    # the re-quantization error
    np.testing.assert_allclose(layer(x).numpy(), before + x.numpy() @ E.T, rtol=1e-5, atol=1e-5)
    # the error is 4-bit rounding of the merged weight: NF4's, no more
    assert 0 < np.abs(E).mean() < 0.2 * np.abs(target).mean()


def test_merge_and_unload_dequantize_gives_float_linears_with_the_same_outputs():
    m = qlora_gpt()
    m.eval()
    x, _ = batch()
    want = m(x)[0].numpy()
    lora.merge_and_unload(m, dequantize=True)
    assert not any(isinstance(x, (Linear4bit, lora.LoraLayer)) for x in m.modules())
    c_attn = m.transformer.h[0].attn.c_attn
    assert type(c_attn) is nn.Linear and c_attn.weight.dtype == np.float32
    np.testing.assert_allclose(m(x)[0].numpy(), want, rtol=1e-5, atol=1e-5)


def test_adapter_files_round_trip_on_a_4bit_base(tmp_path):
    m = qlora_gpt()
    x, _ = batch()
    lora.save_adapter(m, tmp_path / "adapter")
    other = gpt()
    quant.quantize_model(other, print_fn=None)
    lora.load_adapter(other, tmp_path / "adapter")
    np.testing.assert_array_equal(other(x)[0].numpy(), m(x)[0].numpy())


# ----------------------------------------------------------------------------- state and files

def test_quantized_state_dict_round_trip_restores_exactly():
    a, b = gpt(0), gpt(1)
    quant.quantize_model(a, print_fn=None)
    quant.quantize_model(b, print_fn=None)
    x, _ = batch()
    b(x)                                                            # caches b's own quant states
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b(x)[0].numpy(), a(x)[0].numpy())
    sd = a.state_dict()
    assert sd["transformer.h.0.attn.c_attn.weight"].dtype == np.uint8
    assert "transformer.h.0.attn.c_attn.weight.quant_state.bitsandbytes__nf4" in sd


def test_save_and_load_quantized_files_hold_codes_not_floats(tmp_path):
    a = gpt(0)
    quant.quantize_model(a, print_fn=None)
    quant.save_quantized(a, tmp_path / "q4")
    tensors, _ = load_safetensors(tmp_path / "q4" / "model.safetensors")
    for i in range(2):
        assert tensors[f"transformer.h.{i}.mlp.c_fc.weight"].dtype == np.uint8
    assert "lm_head.weight" not in tensors                          # tied: written once
    floats = sum(v.nbytes for k, v in tensors.items() if v.dtype.kind == "f" and "weight." not in k)
    codes = 0.6 * 2 * 12 * 64 * 64                                # < 0.6 bytes per quantized weight
    assert os.path.getsize(tmp_path / "q4" / "model.safetensors") < floats + codes + 20_000
    b = quant.load_quantized(lambda: gpt(1), tmp_path / "q4")
    x, _ = batch()
    np.testing.assert_array_equal(b(x)[0].numpy(), a(x)[0].numpy())
    assert b.lm_head.weight is b.transformer.wte.weight
    with pytest.raises(ValueError, match="no Linear4bit layers; call quant.quantize_model"):
        quant.save_quantized(gpt(), tmp_path / "float")
    with pytest.raises(FileNotFoundError, match="quantization_config.json is missing"):
        quant.load_quantized(gpt(), tmp_path)


def test_load_quantized_accepts_unpadded_quant_state_json(tmp_path):
    """bitsandbytes writes the metadata JSON without padding: loading re-pads it."""
    from tinylora.io import save_safetensors
    a = gpt(0)
    quant.quantize_model(a, print_fn=None)
    quant.save_quantized(a, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors, _ = load_safetensors(path)
    for k in [k for k in tensors if "quant_state.bitsandbytes__" in k]:
        tensors[k] = np.frombuffer(bytes(tensors[k]).rstrip(b" "), dtype=np.uint8)
    save_safetensors(path, tensors)
    b = quant.load_quantized(gpt(1), tmp_path)
    x, _ = batch()
    np.testing.assert_array_equal(b(x)[0].numpy(), a(x)[0].numpy())


def test_one_shared_workspace_holds_the_largest_dense_weight():
    from tinylora.quant import linear4bit
    linear4bit.clear_workspace()
    m = qlora_gpt()
    x, y = batch()
    m(x, y)[1].backward()
    bufs = list(linear4bit._workspace.values())
    assert len(bufs) == 1 and bufs[0].size == 4 * 64 * 64 and bufs[0].dtype == np.float32


def test_quantizing_after_inject_equals_injecting_after_quantizing():
    a = qlora_gpt()
    b = gpt()
    lora.inject(b, lora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                   init_lora_weights=False))
    rep = quant.quantize_model(b, print_fn=None)
    assert all(p.endswith(".base_layer") for p in rep.layers) and len(rep.layers) == 8
    x, _ = batch()
    np.testing.assert_array_equal(b(x)[0].numpy(), a(x)[0].numpy())


def test_gpt_checkpoint_weights_round_trip_after_apply_quantization_config(tmp_path):
    """The GPT checkpoint path: record quantization_config(model) with the checkpoint, and
    apply it to the freshly built model before load_model_weights."""
    from tinylora.checkpoint import load_model_weights, save_model_weights
    a = gpt(0)
    quant.quantize_model(a, target_modules=["c_fc", "c_attn"], print_fn=None)
    save_model_weights(a, tmp_path)
    cfg = quant.quantization_config(a)
    assert [e["path"] for e in cfg["modules"]] == [f"transformer.h.{i}.{n}" for i in range(2)
                                                   for n in ("attn.c_attn", "mlp.c_fc")]
    b = quant.apply_quantization_config(gpt(1), cfg)
    load_model_weights(b, tmp_path)
    x, _ = batch()
    np.testing.assert_array_equal(b(x)[0].numpy(), a(x)[0].numpy())
    assert quant.quantization_config(gpt()) is None


def test_fused_lora_forward_of_a_4bit_base_matches_the_lora_layer():
    """Linear4bit.lora_forward is the one-node path LoRALinear can take over a 4-bit base:
    the same outputs and adapter gradients as the layer's own forward."""
    layer = qlora_gpt().transformer.h[0].mlp.c_fc
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = tl.randn(3, 5, SMALL["n_embd"], requires_grad=True)
    g = tl.randn(3, 5, 4 * SMALL["n_embd"])
    grads = []
    for fn in (layer, lambda x: layer.base_layer.lora_forward(x, A, B, layer.scaling["default"])):
        for t in (x, A, B):
            t.grad = None
        y = fn(x)
        y.backward(g)
        grads.append([y.numpy()] + [t.grad.numpy() for t in (x, A, B)])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
