"""The one LoRA linear op (float and 4-bit bases), its kernel, and LoRALinear on its own."""
import numpy as np
import pytest

import tinylora as tl
from tinylora import backend, dispatch, lora, nn, quant
from tinylora import functional as F
from tinylora.quant import linear4bit

REFERENCE = dispatch.reference_of("lora_linear")
KERNEL = dispatch.kernel_of("lora_linear")


# ----------------------------------------------------------------------------- LoRALinear alone

def test_lora_linear_alone_freezes_its_base_and_trains_only_A_and_B():
    layer = lora.LoRALinear(nn.Linear(4, 3), r=2)
    base = layer.base_layer
    assert base.weight.requires_grad is False and base.bias.requires_grad is False
    assert layer.active_adapters == ["default"] and layer.r == {"default": 2}
    assert layer.scaling["default"] == 8 / 2                    # lora_alpha=8 by default
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.requires_grad and B.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == \
        ["lora_A.default.weight", "lora_B.default.weight"]
    x = tl.randn(5, 4, requires_grad=True)
    layer(x).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert A.grad is not None and B.grad is not None and np.abs(A.grad.numpy()).sum() == 0
    assert np.abs(B.grad.numpy()).sum() > 0                      # B = 0, so only dB is non-zero


def test_lora_linear_alone_takes_peft_arguments_and_adds_its_adapter():
    tl.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = lora.LoRALinear(base, r=4, lora_alpha=16, lora_dropout=0.1, adapter_name="a",
                            init_lora_weights=False, use_rslora=True)
    assert layer.active_adapters == ["a"] and layer.scaling["a"] == 16 / 2
    assert isinstance(layer.lora_dropout["a"], nn.Dropout)
    layer.eval()
    x = tl.randn(3, 6)
    A, B = layer.lora_A["a"].weight.numpy(), layer.lora_B["a"].weight.numpy()
    want = base(x).numpy() + 8.0 * (x.numpy() @ A.T) @ B.T
    np.testing.assert_allclose(layer(x).numpy(), want, rtol=1e-5, atol=1e-6)
    layer.merge()
    np.testing.assert_allclose(base(x).numpy(), want, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged_adapters


def test_lora_linear_without_r_is_an_empty_frozen_wrapper():
    layer = lora.LoRALinear(nn.Linear(4, 3))
    assert layer.adapters == [] and layer.active_adapters == []
    assert not any(p.requires_grad for p in layer.parameters())
    x = tl.randn(2, 4)
    np.testing.assert_array_equal(layer(x).numpy(), layer.base_layer(x).numpy())


@pytest.mark.parametrize("kw, match", [({"r": 0}, "r must be a positive int"),
                                       ({"r": 2.5}, "r must be a positive int"),
                                       ({"r": 2, "lora_alpha": 0}, "lora_alpha must be a positive"),
                                       ({"r": 2, "lora_dropout": 1.0}, "lora_dropout must be in")])
def test_lora_linear_rejects_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        lora.LoRALinear(nn.Linear(4, 3), **kw)


def test_one_plain_adapter_runs_as_one_op_over_a_float_and_a_4bit_base():
    for base in (nn.Linear(8, 6), quant.Linear4bit(8, 6)):
        layer = lora.LoRALinear(base, r=2)
        x = tl.randn(3, 8, requires_grad=True)
        assert layer(x).grad_fn == "lora_linear"
        layer.update_layer("b", 2, 4.0)
        layer.active_adapters = ["default", "b"]                 # two adapters: the general path
        assert layer(x).grad_fn != "lora_linear"


# ----------------------------------------------------------------------------- the op, both ways

def parts(dtype, four_bit, bias, dropped, w_trains=False, seed=0):
    tl.manual_seed(seed)
    with tl.default_dtype(dtype):
        if four_bit:
            layer = quant.Linear4bit(70, 9)
            weight = layer.weight_provider()
            b = layer.bias if bias else None
        else:
            weight = tl.randn(9, 70, requires_grad=w_trains)
            b = tl.randn(9, requires_grad=True) if bias else None
        if b is not None:
            b.requires_grad = True
        A = tl.randn(3, 70, requires_grad=True)
        B = tl.randn(9, 3, requires_grad=True)
        x = tl.randn(2, 4, 70, requires_grad=True)
        xd = tl.randn(2, 4, 70, requires_grad=True) if dropped else None
    inputs = [t for t in (x, weight, b, A, B, xd) if isinstance(t, tl.Tensor) and t.requires_grad]
    return (x, weight, b, A, B, 0.7, xd), inputs


def run(fn, args, inputs, seed=1):
    for t in inputs:
        t.grad = None
    y = fn(*args)
    g = np.random.default_rng(seed).standard_normal(y.shape).astype(y.dtype)
    y.backward(tl.tensor(g))
    return [y.numpy()] + [t.grad.numpy() for t in inputs]


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "4bit"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dropped", [False, True], ids=["x", "x_dropped"])
@pytest.mark.parametrize("dtype, rtol", [(tl.float64, 1e-12), (tl.float32, 1e-6)],
                         ids=["float64", "float32"])
def test_kernel_equals_reference(four_bit, bias, dropped, dtype, rtol):
    args, inputs = parts(dtype, four_bit, bias, dropped, w_trains=not four_bit)
    ref = run(REFERENCE, args, inputs)
    fast = run(KERNEL, args, inputs)
    assert len(ref) == len(inputs) + 1
    for r, f in zip(ref, fast):
        assert r.dtype == f.dtype == np.dtype(dtype)
        np.testing.assert_allclose(f, r, rtol=rtol, atol=rtol * max(1.0, float(np.abs(r).max())))


@pytest.mark.parametrize("dropped", [False, True])
def test_reference_gradcheck_with_a_4bit_weight_provider(dropped):
    args, inputs = parts(tl.float64, True, True, dropped)
    with tl.kernels_mode("reference"):
        tl.gradcheck(lambda *ts: F.lora_linear(*args), inputs)


def test_4bit_lora_path_is_the_lora_linear_op():
    args, inputs = parts(tl.float32, True, True, False)
    layer_out = F.lora_linear(*args)
    assert layer_out.grad_fn == "lora_linear" and not hasattr(quant, "lora_linear_4bit")
    assert dispatch.kernel_of("lora_linear").__module__ == "tinylora.kernels.lora"


def test_4bit_backward_dequantizes_again_and_keeps_no_float_weight():
    """Another layer's forward overwrites the shared workspace between this layer's forward
    and backward: dx must still be dy·W of this layer."""
    linear4bit.clear_workspace()
    tl.manual_seed(0)
    a, other = quant.Linear4bit(64, 32), quant.Linear4bit(64, 48)
    A, B = tl.randn(2, 64, requires_grad=True), tl.randn(32, 2, requires_grad=True)
    x = tl.randn(5, 64, requires_grad=True)
    y = F.lora_linear(x, a.weight_provider(), a.bias, A, B, 0.5)
    other(tl.randn(5, 64))                                       # overwrites the workspace
    g = np.ones(y.shape, np.float32)
    y.backward(tl.tensor(g))
    W = backend.to_numpy(a.dequantize())
    want = g @ W + 0.5 * (g @ B.numpy()) @ A.numpy()
    np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-5, atol=1e-5)
    assert all(buf.size == 48 * 64 for buf in linear4bit._workspace.values())


def test_requantizing_between_forward_and_backward_is_an_error():
    tl.manual_seed(0)
    a = quant.Linear4bit(64, 8)
    A, B = tl.randn(2, 64, requires_grad=True), tl.randn(8, 2, requires_grad=True)
    x = tl.randn(3, 64, requires_grad=True)
    y = F.lora_linear(x, a.weight_provider(), None, A, B, 1.0)
    a.requantize_(a.dequantize() * 2, warn=False)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_compute_dtype_of_a_4bit_provider_promotes_like_the_layer():
    """A float64 compute dtype over float32 input: the product in float64, the result float32,
    exactly Linear4bit's own output plus the adapter."""
    tl.manual_seed(0)
    q = quant.Linear4bit(64, 8, compute_dtype=tl.float64)
    A, B = tl.randn(2, 64, requires_grad=True), tl.randn(8, 2, requires_grad=True)
    x = tl.randn(3, 64, requires_grad=True)
    y = q.lora_forward(x, A, B, 0.5)
    assert y.dtype == np.float32
    want = q(x).numpy() + 0.5 * (x.numpy() @ A.numpy().T) @ B.numpy().T
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the device path

def test_dequantize_takes_the_device_path_on_the_guard():
    """On a device (the guard here) dequantization runs in chunks of the device budget;
    the values are those of the CPU's cache-sized chunks."""
    pytest.importorskip("cupy")
    from tinylora.quant import nf4
    w = np.random.default_rng(0).standard_normal(64 * 40 + 6).astype(np.float32)
    p, s = quant.quantize_4bit(w)
    want = backend.to_numpy(quant.dequantize_4bit(p, s, dtype=np.float16))
    before = backend.get_device()
    old = nf4._DEVICE_CHUNK
    backend.set_device("guard")
    try:
        from tinylora.kernels.blocking import block_rows
        assert backend.on_device() and block_rows(40, 64, 8, device_budget=64 * 7) == 7
        nf4._DEVICE_CHUNK = 64 * 7                      # several device chunks, a ragged last one
        p2, s2 = quant.quantize_4bit(backend.xp.asarray(w))
        got = backend.to_numpy(quant.dequantize_4bit(p2, s2, dtype=np.float16))
    finally:
        nf4._DEVICE_CHUNK = old
        backend.set_device(before)
    np.testing.assert_array_equal(got, want)
