"""Many adapters on one base: activation, disabling, deletion, weighted combination, and
mixed batches (each row its own adapter) checked against running each row alone."""
import numpy as np
import pytest

import tinylora as tl
from tinylora import lora, nn
from tinylora.lora import LoraLayer, ModulesToSaveWrapper

from test_lora_common import ids, tiny_gpt, toy


def three_adapter_gpt():
    """float64 GPT with adapters a (c_attn, c_fc, wte), b (c_attn, c_proj; rank 3) and d (DoRA)."""
    g = tiny_gpt(dtype=tl.float64, seed=2)
    lora.inject(g, lora.LoraConfig(r=2, target_modules=["c_attn", "c_fc", "wte"], init_lora_weights=False), "a")
    lora.inject(g, lora.LoraConfig(r=3, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                   init_lora_weights=False), "b")
    lora.inject(g, lora.LoraConfig(r=2, target_modules=["c_fc"], use_dora=True, init_lora_weights=False), "d")
    return g


def logits(model, x, **kw):
    with tl.no_grad():
        return model(x, **kw)[0].numpy()


# ----------------------------------------------------------------------------- active set

def test_active_adapters_add_up():
    g = three_adapter_gpt()
    x = ids()
    with lora.disable_adapter(g):
        base = logits(g, x)
    lora.set_adapter(g, "a")
    a = logits(g, x)
    lora.set_adapter(g, "b")
    b = logits(g, x)
    assert lora.active_adapters(g) == ["b"]
    assert not g.transformer.h[0].attn.c_attn.lora_A["a"].weight.requires_grad
    assert g.transformer.h[0].attn.c_attn.lora_A["b"].weight.requires_grad
    # on one layer the two deltas add exactly
    layer = g.transformer.h[0].attn.c_attn
    h = tl.randn(2, 8, dtype=tl.float64)
    lora.set_adapter(g, ["a", "b"])
    both = layer(h).numpy()
    with lora.disable_adapter(g):
        plain = layer(h).numpy()
    da = layer._delta("a", h, None).numpy()
    db = layer._delta("b", h, None).numpy()
    np.testing.assert_allclose(both, plain + da + db, rtol=1e-13, atol=1e-13)
    assert not np.allclose(a, base) and not np.allclose(b, base) and not np.allclose(a, b)
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        lora.set_adapter(g, ["a", "zz"])


def test_disable_adapter_is_the_base_model_and_restores():
    g = tiny_gpt(dtype=tl.float64)
    x = ids()
    base = logits(g, x)
    lora.inject(g, lora.LoraConfig(target_modules=["c_attn", "wte"], init_lora_weights=False))
    adapted = logits(g, x)
    with lora.disable_adapter(g):
        np.testing.assert_array_equal(logits(g, x), base)
    np.testing.assert_array_equal(logits(g, x), adapted)
    lora.inject(g, lora.LoraConfig(target_modules=["c_proj"], init_lora_weights=False), "two")
    g2 = g.transformer.h[0].attn.c_proj
    lora.merge(g, adapter_names=["two"])
    with pytest.raises(RuntimeError, match="merged into the base weights.*unmerge"):
        with lora.disable_adapter(g):
            pass
    assert not g2.disabled


def test_delete_adapter_unwraps_and_reactivates():
    g = tiny_gpt()
    keys = set(g.state_dict())
    lora.inject(g, lora.LoraConfig(target_modules=["c_attn"]), "a")
    lora.inject(g, lora.LoraConfig(target_modules=["c_attn", "c_fc"]), "b")
    lora.delete_adapter(g, "a")                 # the active one: b takes over
    assert lora.active_adapters(g) == ["b"] and list(g.peft_config) == ["b"]
    assert g.transformer.h[0].attn.c_attn.adapters == ["b"]
    assert g.transformer.h[0].attn.c_attn.lora_A["b"].weight.requires_grad
    lora.delete_adapter(g, "b")
    assert set(g.state_dict()) == keys and not hasattr(g, "peft_config")
    assert not any(isinstance(m, LoraLayer) for m in g.modules())
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        lora.delete_adapter(g, "b")


# ----------------------------------------------------------------------------- combining

def _deltas(g, names, weights):
    out = {}
    for p, m in g.named_modules():
        if isinstance(m, LoraLayer) and any(n in m.r for n in names):
            out[p] = tl.backend.to_numpy(sum(w * m.delta_weight(n) for n, w in zip(names, weights)
                                             if n in m.r))
    return out


@pytest.mark.parametrize("kind, kw", [("cat", {}), ("svd", {"svd_rank": 5})])
def test_weighted_adapter_cat_and_full_rank_svd_are_exact(kind, kw):
    g = three_adapter_gpt()
    want = _deltas(g, ["a", "b"], [0.7, -1.3])
    lora.add_weighted_adapter(g, ["a", "b"], [0.7, -1.3], "mix", combination_type=kind, **kw)
    assert g.peft_config["mix"].r == 5 and g.peft_config["mix"].lora_alpha == 5
    for p, m in g.named_modules():
        if p in want:
            assert m.scaling["mix"] == 1.0
            np.testing.assert_allclose(tl.backend.to_numpy(m.delta_weight("mix")), want[p],
                                       rtol=1e-10, atol=1e-12, err_msg=p)
    assert lora.active_adapters(g) == ["a"]
    assert not any(p.requires_grad for n, p in g.named_parameters() if ".mix" in n)


def test_weighted_adapter_low_rank_svd_is_the_best_approximation():
    g = three_adapter_gpt()
    want = _deltas(g, ["a", "b"], [1.0, 1.0])
    lora.add_weighted_adapter(g, ["a", "b"], [1.0, 1.0], "low", combination_type="svd", svd_rank=1)
    for p, m in g.named_modules():
        if p in want:
            s = np.linalg.svd(want[p], compute_uv=False)
            err = np.linalg.norm(tl.backend.to_numpy(m.delta_weight("low")) - want[p], 2)
            np.testing.assert_allclose(err, s[1] if s.size > 1 else 0.0, rtol=1e-8, atol=1e-12)


def test_weighted_adapter_linear_follows_peft():
    g = tiny_gpt(dtype=tl.float64)
    for n in ("a", "b"):
        lora.inject(g, lora.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False), n)
    lora.add_weighted_adapter(g, ["a", "b"], [0.5, 2.0], "lin", combination_type="linear")
    m = g.transformer.h[1].attn.c_attn
    c = [np.sqrt(0.5 * 2.0), np.sqrt(2.0 * 2.0)]
    for part in ("lora_A", "lora_B"):
        want = sum(ci * getattr(m, part)[n].weight.numpy() for ci, n in zip(c, "ab"))
        np.testing.assert_allclose(getattr(m, part)["lin"].weight.numpy(), want, rtol=1e-14)
    lora.inject(g, lora.LoraConfig(r=3, target_modules=["c_attn"]), "r3")
    with pytest.raises(ValueError, match="equal rank.*'cat'"):
        lora.add_weighted_adapter(g, ["a", "r3"], [1, 1], "x", combination_type="linear")



def test_weighted_adapter_linear_puts_a_negative_sign_on_a_only():
    g = tiny_gpt(dtype=tl.float64)
    for n in ("a", "b"):
        lora.inject(g, lora.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False), n)
    lora.add_weighted_adapter(g, ["a", "b"], [-0.5, 2.0], "neg", combination_type="linear")
    m = g.transformer.h[1].attn.c_attn
    A = {n: m.lora_A[n].weight.numpy() for n in "ab"}
    B = {n: m.lora_B[n].weight.numpy() for n in "ab"}
    # PEFT: sign(w·s)·√|w·s| on A, √|w·s| on B (s = 4/2 = 2)
    np.testing.assert_allclose(m.lora_A["neg"].weight.numpy(), -1.0 * A["a"] + 2.0 * A["b"], rtol=1e-14)
    np.testing.assert_allclose(m.lora_B["neg"].weight.numpy(), 1.0 * B["a"] + 2.0 * B["b"], rtol=1e-14)
    # one adapter with a negative weight is exactly w·ΔW: the sign is applied once, not twice
    lora.add_weighted_adapter(g, ["a"], [-0.5], "minus", combination_type="linear")
    np.testing.assert_allclose(tl.backend.to_numpy(m.delta_weight("minus")),
                               -0.5 * tl.backend.to_numpy(m.delta_weight("a")), rtol=1e-12, atol=1e-14)


def test_weighted_adapter_refuses_dora():
    g = three_adapter_gpt()
    with pytest.raises(ValueError, match="DoRA adapters cannot be combined"):
        lora.add_weighted_adapter(g, ["a", "d"], [1, 1], "x")


# ----------------------------------------------------------------------------- mixed batches

def test_mixed_batch_equals_each_row_alone():
    g = three_adapter_gpt()
    x = ids(batch=6, T=7, seed=4)
    names = ["a", "__base__", "b", "a", "d", "b"]
    got = logits(g, x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with lora.disable_adapter(g):
                want = logits(g, x[i:i + 1])
        else:
            lora.set_adapter(g, name)
            want = logits(g, x[i:i + 1])
        np.testing.assert_allclose(got[i:i + 1], want, rtol=1e-12, atol=1e-12, err_msg=f"row {i} ({name})")


def test_mixed_batch_gradients_reach_each_adapter_from_its_rows_only():
    g = three_adapter_gpt()
    x = ids(batch=4, T=5, seed=6)
    names = ["b", "a", "a", "__base__"]
    lora.mark_only_lora_as_trainable(g)
    params = lora.trainable_parameters(g)
    v = np.random.default_rng(0).standard_normal((4, 5, 13))
    g(x, adapter_names=names)[0].backward(v)
    mixed = {id(p): (p.grad.numpy().copy() if p.grad is not None else None) for p in params}
    g.zero_grad()
    for rows, name in (([1, 2], "a"), ([0], "b")):
        lora.set_adapter(g, name)
        g(x[rows])[0].backward(v[rows])
    lora.mark_only_lora_as_trainable(g)
    for p in params:
        alone = None if p.grad is None else p.grad.numpy()
        if mixed[id(p)] is None or alone is None:
            assert (mixed[id(p)] is None or not mixed[id(p)].any()) and (alone is None or not alone.any())
        else:
            np.testing.assert_allclose(mixed[id(p)], alone, rtol=1e-10, atol=1e-12)


def test_mixed_batch_input_shared_by_all_rows():
    """An input with a leading axis of 1 (position ids (1, T)) is shared: each row gets the
    output of its own adapter, (n, T, dim)."""
    tl.manual_seed(0)
    with tl.default_dtype(tl.float64):
        wpe = nn.Embedding(8, 4)
    m = nn.ModuleDict({"wpe": wpe})
    for n in ("p", "q"):
        lora.inject(m, lora.LoraConfig(target_modules=["wpe"], init_lora_weights=False), n)
    pos = np.arange(5)[None]
    with nn.adapter_routing(["q", "__base__", "p"]):
        out = m["wpe"](pos).numpy()
    assert out.shape == (3, 5, 4)
    lora.set_adapter(m, "q")
    np.testing.assert_allclose(out[0], m["wpe"](pos).numpy()[0], rtol=1e-14)
    np.testing.assert_allclose(out[1], wpe(pos).numpy()[0], rtol=1e-14)
    with nn.adapter_routing(["q", "p"]), pytest.raises(ValueError, match=r"input has 5 rows"):
        m["wpe"](np.arange(10).reshape(5, 2) % 8)
    with nn.adapter_routing(["q", "p"]), pytest.raises(ValueError, match=r"\(2,\) under per-row"):
        m["wpe"](np.arange(2))    # (T,) positions with T == batch: refused, not misread


def test_mixed_batch_errors():
    g = three_adapter_gpt()
    x = ids(batch=2)
    with pytest.raises(ValueError, match=r"adapter_names\[1\] = 'typo' is not an adapter"):
        g(x, adapter_names=["a", "typo"])
    with pytest.raises(ValueError, match="2 rows"):
        g(x, adapter_names=["a"])
    lora.merge(g, adapter_names=["b"])
    with pytest.raises(RuntimeError, match="merged into the base weight"):
        g(x, adapter_names=["a", "b"])


def test_mixed_batch_with_modules_to_save_heads():
    m = toy()
    for n in ("x", "y"):
        lora.inject(m, lora.LoraConfig(target_modules=["q"], modules_to_save=["classifier"],
                                       init_lora_weights=False), n)
        with tl.no_grad():
            m.classifier.modules_to_save[n].bias.data += 1.0 if n == "x" else -1.0
    assert isinstance(m.classifier, ModulesToSaveWrapper)
    with pytest.raises(ValueError, match="only one of them can be active"):
        lora.set_adapter(m, ["x", "y"])
    x = ids(batch=3)
    names = ["y", "__base__", "x"]
    with tl.no_grad():
        _, cls = m(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with lora.disable_adapter(m), tl.no_grad():
                want = m(x[i:i + 1])[1].numpy()
        else:
            lora.set_adapter(m, name)
            with tl.no_grad():
                want = m(x[i:i + 1])[1].numpy()
        np.testing.assert_allclose(cls.numpy()[i:i + 1], want, rtol=1e-6, atol=1e-7)
