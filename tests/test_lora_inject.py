"""Injection: which layers are targeted, what is frozen, bias modes, modules_to_save,
training with AdamW, and errors that change nothing."""
import numpy as np
import pytest

from tinylora import lora
from tinylora.lora import LoRAEmbedding, LoRALinear, ModulesToSaveWrapper
from tinylora.models import GPT
from tinylora.optim import AdamW

from test_lora_common import GPT2_TINY, assert_same_snapshot, ids, snapshot, tiny_gpt, toy


def lora_paths(model):
    return sorted(p for p, m in model.named_modules() if isinstance(m, lora.LoraLayer))


# ----------------------------------------------------------------------------- targets

def test_names_match_paths_or_dotted_suffixes():
    m = toy()
    lora.inject(m, lora.LoraConfig(target_modules=["q", "mlp.fc"]))
    assert lora_paths(m) == ["blocks.0.attn.q", "blocks.0.mlp.fc", "blocks.1.attn.q", "blocks.1.mlp.fc"]


def test_a_name_must_match_a_whole_component():
    with pytest.raises(ValueError, match="matches no layer"):
        lora.inject(toy(), lora.LoraConfig(target_modules=["c"]))   # not a suffix of "fc"


def test_regex_must_match_the_whole_path():
    m = toy()
    lora.inject(m, lora.LoraConfig(target_modules=r"blocks\.1\.attn\.(q|v)"))
    assert lora_paths(m) == ["blocks.1.attn.q", "blocks.1.attn.v"]
    with pytest.raises(ValueError, match="matches no layer"):
        lora.inject(toy(), lora.LoraConfig(target_modules=r"attn\.q"))  # a suffix is not enough


def test_all_linear_skips_the_tied_head_and_the_classifier():
    m = toy()
    lora.inject(m, lora.LoraConfig(target_modules="all-linear"))
    assert lora_paths(m) == sorted(f"blocks.{i}.{n}" for i in (0, 1)
                                   for n in ("attn.q", "attn.v", "mlp.fc", "mlp.proj"))
    assert m.peft_config["default"].target_modules == ["fc", "proj", "q", "v"]
    g = tiny_gpt()
    lora.inject(g, lora.LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in lora_paths(g) and len(lora_paths(g)) == 8


def test_no_match_lists_the_layers_shortly():
    with pytest.raises(ValueError) as e:
        lora.inject(tiny_gpt(n_layer=2), lora.LoraConfig(target_modules=["query"]))
    msg = str(e.value)
    assert "matches no layer of this GPT" in msg
    assert "transformer.h.*.attn.c_attn (Linear)" in msg and "transformer.wte (Embedding)" in msg
    assert "transformer.h.0" not in msg   # layer numbers are folded


def test_a_container_is_not_a_target():
    with pytest.raises(ValueError, match=r"matches 'blocks.0.attn' \(ModuleDict\), which LoRA cannot wrap"):
        lora.inject(toy(), lora.LoraConfig(target_modules=["attn"]))


def test_missing_target_modules_is_explained():
    with pytest.raises(ValueError, match="target_modules is not set"):
        lora.inject(toy(), lora.LoraConfig())


# ----------------------------------------------------------------------------- structure

def test_paths_stay_and_outputs_do_not_change():
    m = toy()
    x = ids()
    before_logits, before_cls = m(x)
    q = m.blocks[0].attn["q"]
    lora.inject(m, lora.LoraConfig(target_modules=["q", "v", "emb"], r=2))
    layer = m.get_submodule("blocks.0.attn.q")
    assert isinstance(layer, LoRALinear) and layer.base_layer is q
    assert isinstance(m.emb, LoRAEmbedding)
    keys = set(m.state_dict())
    assert {"blocks.0.attn.q.base_layer.weight", "blocks.0.attn.q.lora_A.default.weight",
            "blocks.0.attn.q.lora_B.default.weight", "emb.lora_embedding_A.default",
            "emb.lora_embedding_B.default"} <= keys
    logits, cls = m(x)
    np.testing.assert_array_equal(logits.numpy(), before_logits.numpy())
    np.testing.assert_array_equal(cls.numpy(), before_cls.numpy())


def test_everything_but_the_adapter_is_frozen_and_summary_counts():
    m = toy()
    total = sum(p.data.size for p in m.parameters())
    lora.inject(m, lora.LoraConfig(target_modules=["q", "v"], r=2))
    train = dict((n, p) for n, p in m.named_parameters() if p.requires_grad)
    assert train and all(".lora_" in n for n in train)
    n_lora = 2 * 2 * (2 * 8 + 8 * 2)
    assert sum(p.data.size for p in lora.trainable_parameters(m)) == n_lora
    line = lora.trainable_summary(m, print_fn=None)
    assert line == (f"trainable params: {n_lora:,d} || all params: {total + n_lora:,d} || "
                    f"trainable%: {100 * n_lora / (total + n_lora):.4f}")


@pytest.mark.parametrize("mode", ["none", "all", "lora_only"])
def test_bias_modes(mode):
    m = toy()
    lora.inject(m, lora.LoraConfig(target_modules=["q"], bias=mode))
    trainable_biases = sorted(n for n, p in m.named_parameters() if p.requires_grad and n.endswith("bias"))
    all_biases = sorted(n for n, _ in m.named_parameters() if n.endswith("bias"))
    want = {"none": [], "all": all_biases,
            "lora_only": ["blocks.0.attn.q.base_layer.bias", "blocks.1.attn.q.base_layer.bias"]}[mode]
    assert trainable_biases == want
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.endswith("weight") and "lora" not in n)


def test_mark_only_lora_as_trainable():
    m = toy()
    lora.inject(m, lora.LoraConfig(target_modules=["q"]))
    lora.inject(m, lora.LoraConfig(target_modules=["v"]), "second")
    assert not m.blocks[0].attn["v"].lora_A["second"].weight.requires_grad   # inactive: frozen
    lora.mark_only_lora_as_trainable(m, bias="lora_only")
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "blocks.0.attn.v.lora_A.second.weight" in names and "blocks.1.attn.q.base_layer.bias" in names
    assert all("lora_" in n or n.endswith("base_layer.bias") for n in names)


def test_second_adapter_joins_the_wrappers_inactive_and_frozen():
    m = toy()
    lora.inject(m, lora.LoraConfig(target_modules=["q"]))
    q = m.blocks[0].attn["q"]
    lora.inject(m, lora.LoraConfig(target_modules=["q", "fc"], r=3), "other")
    assert m.blocks[0].attn["q"] is q and q.adapters == ["default", "other"]
    assert q.active_adapters == ["default"] and m.blocks[0].mlp["fc"].active_adapters == ["default"]
    assert not q.lora_A["other"].weight.requires_grad and q.lora_A["default"].weight.requires_grad
    assert list(m.peft_config) == ["default", "other"]
    with pytest.raises(ValueError, match="already exists"):
        lora.inject(m, lora.LoraConfig(target_modules=["q"]), "other")


@pytest.mark.parametrize("bad", [
    dict(config=lora.LoraConfig(target_modules=["q", "emb"], use_dora=True), match="DoRA"),
    dict(config=lora.LoraConfig(target_modules=["q"], modules_to_save=["nothing"]), match="matches no module"),
    dict(config=lora.LoraConfig(target_modules=["q"], modules_to_save=["blocks"]), match="both a LoRA target"),
    dict(config=lora.LoraConfig(target_modules=["nope"]), match="matches no layer"),
    dict(config=lora.LoraConfig(target_modules=["q"]), name="a.b", match="not allowed"),
    dict(config=lora.LoraConfig(target_modules=["q"]), name="__base__", match="not allowed"),
])
def test_failed_injection_changes_nothing(bad):
    m = toy()
    lora.inject(m, lora.LoraConfig(target_modules=["v"]))
    before = snapshot(m)
    with pytest.raises(ValueError, match=bad["match"]):
        lora.inject(m, bad["config"], bad.get("name", "x"))
    assert_same_snapshot(before, snapshot(m))


# ----------------------------------------------------------------------------- modules_to_save

def test_modules_to_save_wraps_a_trainable_copy():
    m = toy()
    head = m.classifier
    lora.inject(m, lora.LoraConfig(target_modules=["q"], modules_to_save=["classifier"]))
    w = m.classifier
    assert isinstance(w, ModulesToSaveWrapper) and w.original_module is head
    copy = w.modules_to_save["default"]
    assert copy is not head and copy.weight is not head.weight
    np.testing.assert_array_equal(copy.weight.numpy(), head.weight.numpy())
    assert copy.weight.requires_grad and not head.weight.requires_grad
    assert "classifier.modules_to_save.default.weight" in m.state_dict()
    # training moves the copy, not the original
    opt = AdamW(lora.trainable_parameters(m), lr=0.1)
    _, cls = m(ids())
    cls.sum().backward()
    opt.step()
    assert not np.array_equal(copy.weight.numpy(), head.weight.numpy())
    with lora.disable_adapter(m):
        np.testing.assert_array_equal(m(ids())[1].numpy(), head(m.ln_f(_trunk(m, ids())).mean(dim=1)).numpy())


def _trunk(m, x):
    h = m.emb(x)
    for b in m.blocks:
        h = b(h)
    return h


# ----------------------------------------------------------------------------- training

def test_twenty_adamw_steps_train_only_the_adapter():
    g = GPT.from_hf(GPT2_TINY)   # GPT-2's layout with weights large enough to learn fast
    lora.inject(g, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "wpe"]))
    frozen = {n: p.numpy().copy() for n, p in g.named_parameters() if not p.requires_grad}
    assert "transformer.wte.weight" in frozen and "transformer.h.0.attn.c_attn.base_layer.weight" in frozen
    opt = AdamW(lora.trainable_parameters(g), lr=1e-2)
    x = np.random.default_rng(0).integers(0, g.config.vocab_size, (4, 13))
    losses = []
    for _ in range(20):
        _, loss = g(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for n, p in g.named_parameters():
        if n in frozen:
            assert p.grad is None, n
            np.testing.assert_array_equal(p.numpy(), frozen[n], err_msg=n)
    assert all(p.grad is not None for p in lora.trainable_parameters(g))
