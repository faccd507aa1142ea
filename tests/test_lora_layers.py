"""LoRA layers: the math, the initialisation, rsLoRA, DoRA, and gradients against finite
differences (float64)."""
import math

import numpy as np
import pytest

import tinylora as tl
from tinylora import lora, nn, ops
from tinylora.configs import ConfigError
from tinylora.lora import dora
from tinylora.lora.layers import LoRAEmbedding, LoRALinear


def f64_linear(n_in=6, n_out=5, seed=0):
    tl.manual_seed(seed)
    with tl.default_dtype(tl.float64):
        return nn.Linear(n_in, n_out)


def wrap(base, r=3, alpha=6.0, init=False, **kw):
    layer = LoRALinear(base) if isinstance(base, nn.Linear) else LoRAEmbedding(base)
    layer.update_layer("default", r, alpha, init_lora_weights=init, **kw)
    layer.active_adapters = ["default"]
    return layer


def arrays(layer, name="default"):
    return (layer.lora_A[name].weight.numpy(), layer.lora_B[name].weight.numpy(),
            layer.base_layer.weight.numpy(), layer.base_layer.bias.numpy())


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw, match", [
    ({"r": 0}, "r must be a positive int"),
    ({"r": -2}, "r must be a positive int"),
    ({"r": 2.5}, "r must be a positive int"),
    ({"lora_alpha": 0}, "lora_alpha must be a positive"),
    ({"lora_alpha": -1.0}, "lora_alpha must be a positive"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\)"),
    ({"bias": "some"}, "bias must be one of"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights must be"),
    ({"target_modules": []}, "empty list"),
    ({"target_modules": [3]}, "list of module names"),
    ({"modules_to_save": "classifier"}, "must be a list"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        lora.LoraConfig(**kw)


def test_config_scaling_and_peft_dict_round_trip():
    c = lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    assert c.scaling == 2.0
    assert c.replace(use_rslora=True).scaling == 8 / math.sqrt(4)
    d = c.to_peft_dict()
    assert d["peft_type"] == "LORA" and d["target_modules"] == ["q", "v"]
    assert lora.LoraConfig.from_peft_dict(d) == c
    with pytest.raises(ConfigError, match="rank_pattern"):
        lora.LoraConfig.from_peft_dict({**d, "rank_pattern": {"q": 8}})
    with pytest.raises(ConfigError, match="changes the base weights"):
        lora.LoraConfig.from_peft_dict({**d, "init_lora_weights": "pissa"})
    with pytest.raises(ConfigError, match="peft_type"):
        lora.LoraConfig.from_peft_dict({**d, "peft_type": "IA3"})
    # informational and "off" fields of newer PEFT versions are accepted
    assert lora.LoraConfig.from_peft_dict({**d, "peft_version": "9.9", "kasa_config": None,
                                           "use_bdlora": None, "loftq_config": {}}) == c


# ----------------------------------------------------------------------------- LoRALinear

def test_linear_forward_is_base_plus_scaled_low_rank_update():
    base = f64_linear()
    layer = wrap(base, r=3, alpha=6.0)
    x = np.random.default_rng(0).standard_normal((2, 4, 6))
    A, B, W, b = arrays(layer)
    want = x @ W.T + b + 2.0 * (x @ A.T) @ B.T
    np.testing.assert_allclose(layer(tl.tensor(x)).numpy(), want, rtol=1e-13, atol=1e-13)


def test_rslora_scales_by_alpha_over_sqrt_r():
    base = f64_linear()
    layer = wrap(base, r=4, alpha=6.0, use_rslora=True)
    assert layer.scaling["default"] == 6.0 / 2.0
    x = np.random.default_rng(1).standard_normal((3, 6))
    A, B, W, b = arrays(layer)
    np.testing.assert_allclose(layer(tl.tensor(x)).numpy(), x @ W.T + b + 3.0 * (x @ A.T) @ B.T,
                               rtol=1e-13, atol=1e-13)


def test_default_init_kaiming_A_zero_B_changes_nothing():
    tl.manual_seed(0)
    base = nn.Linear(64, 5)
    layer = wrap(base, r=8, init=True)
    A = layer.lora_A["default"].weight.numpy()
    assert A.shape == (8, 64) and layer.lora_B["default"].weight.shape == (5, 8)
    bound = 1 / math.sqrt(64)
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.9 * bound
    assert not layer.lora_B["default"].weight.numpy().any()
    x = tl.randn(2, 64)
    np.testing.assert_array_equal(layer(x).numpy(), base(x).numpy())


def test_gaussian_init_has_std_one_over_r():
    tl.manual_seed(0)
    layer = wrap(nn.Linear(4000, 3), r=4, init="gaussian")
    A = layer.lora_A["default"].weight.numpy()
    assert abs(A.std() - 1 / 4) < 0.01 and abs(A.mean()) < 0.01
    assert not layer.lora_B["default"].weight.numpy().any()


def test_init_false_makes_b_nonzero():
    layer = wrap(f64_linear(), init=False)
    assert np.abs(layer.lora_B["default"].weight.numpy()).min() > 0


def test_forward_never_forms_the_product_BA(monkeypatch):
    """Every array the LoRA path makes has r or the batch as a dimension, never (out, in)."""
    tl.manual_seed(0)
    base = nn.Linear(7, 11)
    layer = wrap(base, r=2)
    op_by_op = lora.LoraLayer.forward    # the general path; the one-op path is checked below
    shapes = []
    for name in ("linear", "matmul"):
        real = getattr(ops, name)

        def spy(*a, _real=real, **k):
            out = _real(*a, **k)
            shapes.append(tuple(out.shape))
            return out
        monkeypatch.setattr(ops, name, spy)
    op_by_op(layer, tl.randn(3, 7)).sum().backward()
    assert (11, 7) not in shapes and (7, 11) not in shapes
    assert (3, 2) in shapes  # the thin x Aᵀ


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_linear_equals_the_op_by_op_path(dropout):
    """F.lora_linear (one node) gives the values and gradients of base + s·(x'Aᵀ)Bᵀ."""
    grads = []
    for fused in (True, False):
        tl.manual_seed(3)
        with tl.default_dtype(tl.float64):
            layer = wrap(nn.Linear(7, 5), r=3, lora_dropout=dropout)
            layer.base_layer.requires_grad_(False)
            x = tl.randn(2, 4, 7, requires_grad=True)
        tl.manual_seed(9)                        # the same dropout mask both times
        out = layer(x) if fused else lora.LoraLayer.forward(layer, x)   # one op / op by op
        assert (out.grad_fn == "lora_linear") == fused
        (out * out).sum().backward()
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        grads.append([out.numpy(), x.grad.numpy(), A.grad.numpy(), B.grad.numpy()])
        assert layer.base_layer.weight.grad is None
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_dropout_only_on_the_adapter_path_and_only_in_training():
    tl.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = wrap(base, r=2, lora_dropout=0.5)
    x = tl.randn(50, 6)
    with tl.no_grad():
        y1, y2 = layer(x).numpy(), layer(x).numpy()
        assert not np.allclose(y1, y2)
        layer.eval()
        A, B, W, b = arrays(layer)
        want = x.numpy() @ W.T + b + layer.scaling["default"] * (x.numpy() @ A.T) @ B.T
        np.testing.assert_allclose(layer(x).numpy(), want, rtol=1e-5, atol=1e-6)


def test_gradcheck_lora_linear_wrt_x_A_B():
    layer = wrap(f64_linear(), r=3)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with tl.default_dtype(tl.float64):
        x = tl.randn(2, 3, 6, requires_grad=True)
    tl.gradcheck(lambda x, A, B: layer(x), [x, A, B])


def test_frozen_base_gets_no_gradient():
    layer = wrap(f64_linear(), r=2)
    layer.base_layer.requires_grad_(False)
    with tl.default_dtype(tl.float64):
        x = tl.randn(4, 6, requires_grad=True)
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert layer.lora_A["default"].weight.grad is not None and x.grad is not None


def test_weight_and_bias_read_through_to_the_base():
    base = f64_linear()
    layer = wrap(base)
    assert layer.weight is base.weight and layer.bias is base.bias


# ----------------------------------------------------------------------------- embedding

def test_embedding_forward_and_peft_init():
    tl.manual_seed(0)
    with tl.default_dtype(tl.float64):
        base = nn.Embedding(10, 4)
    layer = wrap(base, r=3, alpha=3.0, init=True)
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert A.shape == (3, 10) and B.shape == (4, 3)
    assert not A.numpy().any() and np.abs(B.numpy()).min() > 0   # A zero, B normal
    ids = np.array([[1, 9, 1], [0, 3, 4]])
    np.testing.assert_array_equal(layer(ids).numpy(), base(ids).numpy())
    with tl.no_grad():
        A.copy_(np.random.default_rng(0).standard_normal((3, 10)))   # copy_ moves it to the device
    want = base.weight.numpy()[ids] + 1.0 * A.numpy()[:, ids].transpose(1, 2, 0) @ B.numpy().T
    np.testing.assert_allclose(layer(tl.tensor(ids)).numpy(), want, rtol=1e-13, atol=1e-13)


def test_gradcheck_lora_embedding_wrt_A_B():
    tl.manual_seed(0)
    with tl.default_dtype(tl.float64):
        base = nn.Embedding(7, 4)
    layer = wrap(base, r=2, init=False)
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    ids = np.array([[1, 6, 1, 0], [2, 2, 5, 3]])
    tl.gradcheck(lambda A, B: layer(ids), [A, B])


# ----------------------------------------------------------------------------- DoRA

def test_dora_magnitude_starts_at_row_norms_and_changes_nothing():
    base = f64_linear()
    layer = wrap(base, r=2, init=True, use_dora=True)
    W = base.weight.numpy()
    np.testing.assert_allclose(layer.lora_magnitude_vector["default"].weight.numpy(),
                               np.linalg.norm(W, axis=1), rtol=1e-14)
    x = tl.randn(3, 6, dtype=tl.float64)
    np.testing.assert_allclose(layer(x).numpy(), base(x).numpy(), rtol=1e-12, atol=1e-13)


def test_dora_forward_matches_the_formula():
    base = f64_linear()
    layer = wrap(base, r=2, alpha=4.0, use_dora=True)
    m = layer.lora_magnitude_vector["default"].weight
    with tl.no_grad():
        m.data *= tl.backend.asarray(np.linspace(0.5, 1.5, m.shape[0]))   # a trained magnitude
    A, B, W, b = arrays(layer)
    V = W + 2.0 * B @ A
    Wp = m.numpy()[:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)
    x = np.random.default_rng(3).standard_normal((4, 6))
    np.testing.assert_allclose(layer(tl.tensor(x)).numpy(), x @ Wp.T + b, rtol=1e-12, atol=1e-12)


def test_gradcheck_dora_layer_wrt_x_and_m():
    layer = wrap(f64_linear(), r=2, use_dora=True)
    m = layer.lora_magnitude_vector["default"].weight
    with tl.default_dtype(tl.float64):
        x = tl.randn(3, 6, requires_grad=True)
    tl.gradcheck(lambda x, m: layer(x), [x, m])


def test_gradcheck_dora_wrt_A_B_with_the_norm_held_constant():
    """The norm ‖W + sBA‖ is detached: the backward must be that of the forward with the
    norm frozen at its current value; check it w.r.t. x, A, B and m."""
    layer = wrap(f64_linear(), r=2, alpha=4.0, use_dora=True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    W = layer.base_layer.weight
    norm0 = dora.weight_norm(W.data, A.data, B.data, 2.0).copy()
    with tl.default_dtype(tl.float64):
        x = tl.randn(3, 6, requires_grad=True)

    def frozen_norm(x, A, B, m):
        return dora.dora_delta(x, ops.linear(x, W), A, B, m, 2.0, norm0)
    tl.gradcheck(frozen_norm, [x, A, B, m])
    # and the layer's own gradients are exactly those of the frozen-norm function
    v = np.random.default_rng(0).standard_normal((3, 5))
    for t in (A, B, m):
        t.grad = None
    layer(x).backward(v)
    got = [t.grad.numpy().copy() for t in (A, B, m)]
    for t in (A, B, m):
        t.grad = None
    frozen_norm(x, A, B, m).backward(v)
    for g, t in zip(got, (A, B, m)):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_dora_with_dropout_uses_the_dropped_input_for_its_base_term():
    tl.manual_seed(0)
    layer = wrap(f64_linear(), r=2, use_dora=True, lora_dropout=0.5)
    x = tl.randn(6, 6, dtype=tl.float64)
    tl.manual_seed(5)
    y = layer(x).numpy()
    tl.manual_seed(5)
    mask = tl.backend.to_numpy(tl.backend.dropout_mask((6, 6), 0.5, np.float64))
    A, B, W, b = arrays(layer)
    m = layer.lora_magnitude_vector["default"].weight.numpy()
    s = layer.scaling["default"]
    g = m / np.linalg.norm(W + s * B @ A, axis=1)
    xd = x.numpy() * mask
    want = x.numpy() @ W.T + b + (g - 1) * (xd @ W.T) + g * (s * (xd @ A.T) @ B.T)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_dora_on_an_embedding_is_refused():
    with tl.default_dtype(tl.float64):
        base = nn.Embedding(5, 3)
    with pytest.raises(ValueError, match="DoRA is implemented for Linear layers only"):
        wrap(base, use_dora=True)
