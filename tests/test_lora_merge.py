"""Merging: merged and unmerged outputs agree, unmerge restores, safe_merge, unloading,
tied weights, DoRA, and a quantized base through the dequantize/requantize_ protocol."""
import numpy as np
import pytest

import tinylora as tl
from tinylora import lora, nn
from tinylora.backend import xp
from tinylora.lora import LoraLayer, ModulesToSaveWrapper

from test_lora_common import assert_same_snapshot, ids, snapshot, tiny_gpt, toy

TARGETS = ["c_attn", "c_proj", "c_fc", "wpe"]


def rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def adapted_gpt(dtype, use_dora=False, seed=0):
    g = tiny_gpt(seed=seed, dtype=dtype)
    targets = TARGETS[:3] if use_dora else TARGETS
    lora.inject(g, lora.LoraConfig(r=3, lora_alpha=6, target_modules=targets, use_dora=use_dora,
                                   init_lora_weights=False))
    if use_dora:  # a trained-looking magnitude
        for _, m in g.named_modules():
            if isinstance(m, LoraLayer):
                v = m.lora_magnitude_vector["default"].weight
                v.data *= xp.linspace(0.7, 1.3, v.shape[0]).astype(v.dtype)
    return g


@pytest.mark.parametrize("dtype, tol", [(tl.float64, 1e-10), (tl.float32, 1e-5)])
@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_equals_unmerged_and_unmerge_restores(dtype, tol, use_dora):
    g = adapted_gpt(dtype, use_dora)
    x = ids(T=6)
    base_w = {n: p.numpy().copy() for n, p in g.named_parameters() if "base_layer" in n}
    want, _ = g(x)
    lora.merge(g)
    assert all(m.merged_adapters == ["default"] for _, m in g.named_modules() if isinstance(m, LoraLayer))
    got, _ = g(x)
    assert rel_err(got.numpy(), want.numpy()) < tol
    lora.merge(g)                                     # merging twice adds nothing
    assert rel_err(g(x)[0].numpy(), want.numpy()) < tol
    lora.unmerge(g)
    assert rel_err(g(x)[0].numpy(), want.numpy()) < tol
    eps = np.finfo(dtype).eps
    for n, p in g.named_parameters():
        if n in base_w:
            np.testing.assert_allclose(p.numpy(), base_w[n], rtol=0, atol=64 * eps * np.abs(base_w[n]).max(),
                                       err_msg=n)


def test_merge_chooses_adapters_and_forward_skips_only_merged_ones():
    g = tiny_gpt(dtype=tl.float64)
    lora.inject(g, lora.LoraConfig(target_modules=["c_attn"], init_lora_weights=False))
    lora.inject(g, lora.LoraConfig(target_modules=["c_attn"], init_lora_weights=False, r=2), "b")
    x = ids()
    lora.set_adapter(g, ["default", "b"])
    both, _ = g(x)
    lora.merge(g, adapter_names=["b"])    # b in the weight, default still added by the forward
    assert rel_err(g(x)[0].numpy(), both.numpy()) < 1e-12
    lora.merge(g)
    assert rel_err(g(x)[0].numpy(), both.numpy()) < 1e-12
    lora.unmerge(g)
    with pytest.raises(ValueError, match="no adapter named 'zzz'"):
        lora.merge(g, adapter_names=["zzz"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # inf * 0 in the bad adapter's B·A
def test_safe_merge_refuses_non_finite_and_changes_nothing():
    g = adapted_gpt(tl.float32)
    bad = g.transformer.h[1].mlp.c_fc.lora_B["default"].weight
    bad.data[0, 0] = np.inf
    before = snapshot(g)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc gives non-finite"):
        lora.merge(g, safe_merge=True)
    assert_same_snapshot(before, snapshot(g))
    assert not any(m.merged_adapters for _, m in g.named_modules() if isinstance(m, LoraLayer))


def test_merge_and_unload_gives_the_plain_model():
    g = adapted_gpt(tl.float64)
    plain_keys = set(tiny_gpt().state_dict())
    x = ids()
    want, _ = g(x)
    out = lora.merge_and_unload(g)
    assert out is g and not hasattr(g, "peft_config")
    assert not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in g.modules())
    assert set(g.state_dict()) == plain_keys
    assert isinstance(g.transformer.h[0].attn.c_attn, nn.Linear)
    assert rel_err(g(x)[0].numpy(), want.numpy()) < 1e-10


def test_unload_takes_adapters_out_without_merging_and_keeps_saved_copies():
    m = toy()
    x = ids()
    base_logits, _ = m(x)
    lora.inject(m, lora.LoraConfig(target_modules=["q"], modules_to_save=["classifier"],
                                   init_lora_weights=False))
    copy = m.classifier.modules_to_save["default"]
    lora.unload(m)
    assert m.classifier is copy
    np.testing.assert_array_equal(m(x)[0].numpy(), base_logits.numpy())


def test_merging_into_a_tied_weight_is_refused():
    g = tiny_gpt()
    lora.inject(g, lora.LoraConfig(target_modules=["wte"], init_lora_weights=False))
    with pytest.raises(ValueError, match=r"transformer\.wte's weight is shared with \['lm_head'\]"):
        lora.merge(g)


# ----------------------------------------------------------------------------- quantized base

class RoundedLinear(nn.Module):
    """A stand-in for a 4-bit Linear: keeps its weight rounded to float16 in a buffer and
    speaks the protocol (in_features, out_features, dequantize, requantize_)."""

    def __init__(self, dense: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = dense.in_features, dense.out_features
        self.register_buffer("packed", dense.weight.data.astype(np.float16))
        self.bias = dense.bias
        self.requantized = 0

    def dequantize(self):
        return self.packed.data.astype(np.float32)

    def requantize_(self, W):
        self.packed = tl.Tensor(W.astype(np.float16))
        self.requantized += 1

    def forward(self, x):
        return tl.functional.linear(x, tl.Tensor._wrap(self.dequantize()), self.bias)


def quantized_toy():
    m = toy()
    for i in range(2):
        m.blocks[i].attn["q"] = RoundedLinear(m.blocks[i].attn["q"])
    return m


def test_merge_into_a_quantized_base_goes_through_requantize():
    m = quantized_toy()
    lora.inject(m, lora.LoraConfig(target_modules=["q"], init_lora_weights=False))
    assert isinstance(m.blocks[0].attn["q"], lora.LoRALinear)
    x = ids()
    want, _ = m(x)
    lora.merge(m)
    q = m.blocks[0].attn["q"].base_layer
    assert q.requantized == 1
    got, _ = m(x)
    assert rel_err(got.numpy(), want.numpy()) < 5e-3     # float16 rounding of the merged weight
    assert rel_err(got.numpy(), want.numpy()) > 0


def test_merge_and_unload_dequantize_merges_in_float():
    m = quantized_toy()
    lora.inject(m, lora.LoraConfig(target_modules=["q"], init_lora_weights=False))
    layer = m.blocks[0].attn["q"]
    W = tl.backend.to_numpy(layer.base_layer.dequantize() + layer.delta_weight("default"))
    x = ids()
    want, _ = m(x)
    lora.merge_and_unload(m, dequantize=True)
    q = m.blocks[0].attn["q"]
    assert type(q) is nn.Linear and not q.weight.requires_grad
    np.testing.assert_allclose(q.weight.numpy(), W, rtol=1e-6, atol=1e-7)
    assert rel_err(m(x)[0].numpy(), want.numpy()) < 1e-5
