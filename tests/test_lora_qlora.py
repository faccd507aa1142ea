"""QLoRA: LoRA over 4-bit NF4 base layers (quant.Linear4bit), through the same protocol."""
import warnings

import numpy as np
import pytest

import tinylora as tl
from tinylora import lora, nn
from tinylora.models import GPT
from tinylora.optim import AdamW
from tinylora.quant import Linear4bit, QuantizationWarning

from test_lora_common import GPT2_TINY, assert_same_snapshot, ids, snapshot, tiny_gpt


def quantize(model, blocksize=8):
    """Every Linear except the tied head becomes a Linear4bit."""
    for path, m in list(model.named_modules()):
        if type(m) is nn.Linear and not path.endswith("lm_head"):
            model.set_submodule(path, Linear4bit.from_linear(m, blocksize=blocksize))
    return model


def qlora_gpt(**cfg):
    g = quantize(tiny_gpt(seed=1))
    kw = dict(target_modules="all-linear", r=2, init_lora_weights=False)
    kw.update(cfg)
    lora.inject(g, lora.LoraConfig(**kw))
    return g


def test_qlora_injects_over_4bit_layers_and_changes_nothing_at_init():
    g = quantize(tiny_gpt(seed=1))
    x = ids()
    base, _ = g(x)
    lora.inject(g, lora.LoraConfig(target_modules="all-linear", r=2))
    layer = g.transformer.h[0].attn.c_attn
    assert isinstance(layer, lora.LoRALinear) and isinstance(layer.base_layer, Linear4bit)
    np.testing.assert_array_equal(g(x)[0].numpy(), base.numpy())
    n_lora = sum(p.data.size for p in lora.trainable_parameters(g))
    line = lora.trainable_summary(g, print_fn=None)
    dense = sum(p.data.size for p in tiny_gpt().parameters())   # 4-bit weights count in·out
    assert line.startswith(f"trainable params: {n_lora:,d} || all params: {dense + n_lora:,d}")


def test_qlora_training_leaves_the_4bit_codes_untouched():
    g = quantize(GPT.from_hf(GPT2_TINY))
    lora.inject(g, lora.LoraConfig(target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=8))
    codes = {k: t.numpy().copy() for k, t in g.state_dict().items() if "base_layer" in k}
    opt = AdamW(lora.trainable_parameters(g), lr=1e-2)
    x = np.random.default_rng(0).integers(0, g.config.vocab_size, (4, 13))
    losses = []
    for _ in range(10):
        _, loss = g(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    for k, t in g.state_dict().items():
        if k in codes:
            np.testing.assert_array_equal(t.numpy(), codes[k], err_msg=k)
    assert all(".lora_" in n for n, p in g.named_parameters() if p.requires_grad)


def test_gradcheck_lora_and_dora_over_a_4bit_base():
    tl.manual_seed(0)
    with tl.default_dtype(tl.float64):
        base = Linear4bit(16, 6, blocksize=8, dtype=tl.float64)
        x = tl.randn(3, 16, requires_grad=True)
    for use_dora in (False, True):
        layer = lora.LoRALinear(base)
        layer.update_layer("default", 2, 4.0, init_lora_weights=False, use_dora=use_dora)
        layer.active_adapters = ["default"]
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if use_dora:   # the norm is detached: check x and m (A, B: test_lora_layers.py)
            tl.gradcheck(lambda x, m: layer(x), [x, layer.lora_magnitude_vector["default"].weight])
        else:
            tl.gradcheck(lambda x, A, B: layer(x), [x, A, B])


def test_merge_into_4bit_requantizes_with_a_warning_and_dequantize_merges_in_float():
    g = qlora_gpt()
    layers = [(p, m) for p, m in g.named_modules() if isinstance(m, lora.LoRALinear)]
    with tl.no_grad():
        for _, m in layers:   # a trained-sized update, comparable to W
            m.lora_B["default"].weight.data *= 0.01
    targets = [m.base_layer.dequantize() + m.delta_weight("default") for _, m in layers]
    x = ids()
    want, _ = g(x)
    with lora.disable_adapter(g):
        base, _ = g(x)
    with pytest.warns(QuantizationWarning):
        lora.merge(g)
    ref = tiny_gpt(seed=1)          # a float model holding exactly the re-quantized weights
    for (path, m), W in zip(layers, targets):
        # W + ΔW, rounded to 4 bits once more: the codes of an independent quantization of it
        lin = nn.Linear(m.in_features, m.out_features)
        lin.weight.data[...] = W
        again = tl.backend.to_numpy(Linear4bit.from_linear(lin, blocksize=8).dequantize())
        merged = tl.backend.to_numpy(m.base_layer.dequantize())
        np.testing.assert_array_equal(merged, again, err_msg=path)
        assert np.abs(merged - tl.backend.to_numpy(W)).max() > 0          # it was rounded
        ref.get_submodule(path).weight.data[...] = m.base_layer.dequantize()
    got, _ = g(x)
    np.testing.assert_allclose(got.numpy(), ref(x)[0].numpy(), rtol=1e-6, atol=1e-7)
    # the rounding moves the outputs less than the adapter does (here 1.6% vs 6.4% of max |y|)
    moved = np.abs(got.numpy() - want.numpy()).max()
    assert 0 < moved < 0.5 * np.abs(want.numpy() - base.numpy()).max()
    g = qlora_gpt()
    want, _ = g(x)
    layer = g.transformer.h[1].mlp.c_fc
    W = tl.backend.to_numpy(layer.base_layer.dequantize() + layer.delta_weight("default"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizationWarning)
        lora.merge_and_unload(g, dequantize=True)
    assert not any(isinstance(m, (Linear4bit, lora.LoraLayer)) for m in g.modules())
    np.testing.assert_allclose(g.transformer.h[1].mlp.c_fc.weight.numpy(), W, rtol=1e-6, atol=1e-7)
    got, _ = g(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_qlora_adapter_round_trip_and_fingerprint(tmp_path):
    g = qlora_gpt()
    x = ids()
    want, _ = g(x)
    lora.save_adapter(g, tmp_path)
    fresh = quantize(tiny_gpt(seed=1))
    lora.load_adapter(fresh, tmp_path)
    np.testing.assert_array_equal(fresh(x)[0].numpy(), want.numpy())
    float_base = tiny_gpt(seed=1)      # the weights before quantization: a different base
    with pytest.raises(lora.BaseModelMismatchError):
        lora.load_adapter(float_base, tmp_path)
    lora.load_adapter(float_base, tmp_path, check_base=False)
    err = np.abs(float_base(x)[0].numpy() - want.numpy()).max()
    assert err < 0.05 * np.abs(want.numpy()).max()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # inf * 0 in the bad adapter's B·A
def test_refused_dequantizing_merge_leaves_the_4bit_model_as_it_was():
    g = qlora_gpt()
    g.transformer.h[1].mlp.c_proj.lora_B["default"].weight.data[0, 0] = np.inf
    before = snapshot(g)
    with pytest.raises(ValueError, match="non-finite"):
        lora.merge_and_unload(g, safe_merge=True, dequantize=True)
    assert_same_snapshot(before, snapshot(g))
    assert isinstance(g.transformer.h[0].attn.c_attn.base_layer, Linear4bit)
