"""Linear4bit: the 4-bit frozen linear layer. Forward against the dequantized weight, the
backward against finite differences (float64), the bitsandbytes state-dict layout, the
dtype rules, requantize_, and the checks that keep a stale weight out of a backward."""
import json
import warnings

import numpy as np
import pytest

import tinylora as tl
from tinylora import nn, quant
from tinylora.quant import Linear4bit, QuantizationWarning

NESTED_KEYS = ["bias", "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
               "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]


def layer_pair(n_in=70, n_out=33, seed=0, **kw):
    tl.manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    return lin, Linear4bit.from_linear(lin, **kw)


@pytest.mark.parametrize("n_in, n_out", [(70, 33), (35, 9), (64, 8)])   # 35·9 is odd
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_x_times_dequantized_weight_plus_bias(n_in, n_out, bias):
    tl.manual_seed(1)
    layer = Linear4bit(n_in, n_out, bias=bias)
    x = tl.randn(2, 5, n_in)
    W = tl.backend.to_numpy(layer.dequantize())
    assert W.shape == (n_out, n_in) and W.dtype == np.float32
    want = x.numpy() @ W.T + (layer.bias.numpy() if bias else 0)
    y = layer(x)
    assert y.shape == (2, 5, n_out) and y.dtype == np.float32
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"double_quant": False}, {"quant_type": "fp4", "blocksize": 128}])
def test_from_linear_stores_exactly_the_array_level_codes_and_state(kw):
    lin, q = layer_pair(**kw)
    packed, state = quant.quantize_4bit(lin.weight.data, **kw)
    sd = q.state_dict()
    assert sd["weight"].shape == (packed.size, 1) and sd["weight"].dtype == np.uint8  # bnb's layout
    np.testing.assert_array_equal(sd["weight"].numpy().reshape(-1), tl.backend.to_numpy(packed))
    ref = state.to_dict(packed=True)
    for k, v in ref.items():
        if "quant_state" in k:
            assert json.loads(bytes(sd["weight." + k].numpy()).decode()) == json.loads(bytes(v).decode())
        else:
            assert sd["weight." + k].dtype == v.dtype
            np.testing.assert_array_equal(sd["weight." + k].numpy(), v)
    assert set(sd) == {"bias", "weight"} | {"weight." + k for k in ref}
    np.testing.assert_array_equal(tl.backend.to_numpy(q.dequantize()),
                                  tl.backend.to_numpy(quant.dequantize_4bit(packed, state)))
    assert q.bias is lin.bias and not q.bias.requires_grad
    assert q.in_features == 70 and q.out_features == 33 and q.weight_shape == (33, 70)


def test_state_dict_keys_and_quant_state_reads_back_with_from_dict():
    _, q = layer_pair()
    sd = q.state_dict()
    assert list(sd) == NESTED_KEYS
    st = quant.QuantState.from_dict({k: v.numpy() for k, v in sd.items() if k.startswith("weight.")})
    np.testing.assert_array_equal(tl.backend.to_numpy(quant.dequantize_4bit(sd["weight"].data, st)),
                                  tl.backend.to_numpy(q.dequantize()))


def test_constructor_draws_like_nn_linear_then_quantizes():
    tl.manual_seed(3)
    a = Linear4bit(20, 12)
    tl.manual_seed(3)
    b = Linear4bit.from_linear(nn.Linear(20, 12))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        np.testing.assert_array_equal(va.numpy(), vb.numpy())


def test_gradcheck_wrt_x_and_bias_in_float64():
    tl.manual_seed(0)
    with tl.default_dtype(tl.float64):
        layer = Linear4bit(70, 9, compute_dtype=tl.float64)
        x = tl.randn(3, 2, 70, requires_grad=True)
    layer.bias.requires_grad_(True)
    assert layer.dtype == np.float64 and layer.bias.dtype == np.float64
    tl.gradcheck(lambda x, b: layer(x), [x, layer.bias])


def test_backward_gives_dx_eq_dy_W_and_touches_no_weight():
    _, q = layer_pair()
    x = tl.randn(4, 70, requires_grad=True)
    g = np.random.default_rng(0).standard_normal((4, 33)).astype(np.float32)
    q(x).backward(tl.tensor(g))
    W = tl.backend.to_numpy(q.dequantize())
    np.testing.assert_allclose(x.grad.numpy(), g @ W, rtol=1e-5, atol=1e-6)
    assert q.bias.grad is None                                    # frozen by default
    assert all(t.grad is None for _, t in q.named_buffers())
    # no float copy of W anywhere in the layer, before or after a step
    arrays = [t.data for _, t in q.named_buffers()]
    arrays += [v for v in vars(q).values() if hasattr(v, "dtype")]
    assert not any(a.dtype.kind == "f" and a.size >= 33 * 70 for a in arrays)
    meta = q.state_dict()["weight.quant_state.bitsandbytes__nf4"].data.size
    # codes 1155 + 8-bit scales 37 + levels 16·4 + nested absmax 1·4 + 8-bit map 256·4 + JSON
    assert q.weight_nbytes == 1155 + 37 + 64 + 4 + 1024 + meta


def test_requantize_between_forward_and_backward_is_caught():
    _, q = layer_pair()
    x = tl.randn(4, 70, requires_grad=True)
    y = q(x)
    q.requantize_(q.dequantize() * 2, warn=False)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_compute_dtype_sets_the_product_dtype_and_output_keeps_the_input_dtype():
    _, q32 = layer_pair()
    _, q64 = layer_pair(compute_dtype="float64")
    x = tl.randn(3, 70, requires_grad=True)
    y = q64(x)
    assert y.dtype == np.float32
    W64 = tl.backend.to_numpy(q64.dequantize(np.float64))
    want = x.numpy().astype(np.float64) @ W64.T + q64.bias.numpy()
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-6, atol=1e-7)
    y.sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(q32(x).numpy(), y.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="compute_dtype must be a float dtype"):
        Linear4bit(4, 4, compute_dtype="int32")


def test_double_keeps_the_stored_format_and_computes_in_float64():
    _, q = layer_pair()
    before = {k: v.numpy().copy() for k, v in q.state_dict().items()}
    q.double()
    sd = q.state_dict()
    assert sd["bias"].dtype == np.float64
    for k, v in sd.items():
        if k != "bias":
            assert v.dtype == before[k].dtype, k           # uint8 codes, float32 scales and maps
            np.testing.assert_array_equal(v.numpy(), before[k])
    x = tl.randn(2, 70, dtype=tl.float64)
    assert q(x).dtype == np.float64


def test_load_state_dict_between_layers_restores_exactly():
    _, a = layer_pair(seed=0)
    _, b = layer_pair(seed=1)
    x = tl.randn(5, 70)
    b(x)                                                  # fills b's cached quant state
    assert not np.array_equal(a(x).numpy(), b(x).numpy())
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())   # offset re-read from the JSON
    assert a.quant_state.offset == b.quant_state.offset
    for (_, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())


@pytest.mark.parametrize("case, shape, blocksize", [("nf4_f32_40x50_bs128", (40, 50), 128),
                                                    ("nf4_f16_93x177_bs64", (93, 177), 64)])
def test_load_state_dict_takes_bitsandbytes_unpadded_quant_state(case, shape, blocksize):
    """bitsandbytes' own state (tests/fixtures/nf4), its JSON unpadded: loads and dequantizes
    to bitsandbytes' values; the JSON is re-encoded at the layer's width, values kept."""
    import os
    from safetensors.numpy import load_file
    t = load_file(os.path.join(os.path.dirname(__file__), "fixtures", "nf4", case + ".safetensors"))
    sd = {"weight" if k == "dq.packed" else "weight." + k[3:]: v
          for k, v in t.items() if k.startswith("dq.") and k != "dq.dequant"}
    layer = Linear4bit(shape[1], shape[0], bias=False, blocksize=blocksize)
    key = "weight.quant_state.bitsandbytes__nf4"
    assert sd[key].shape != layer.state_dict()[key].shape        # 173 vs 168 bytes, say
    layer.load_state_dict(sd)
    assert json.loads(bytes(tl.backend.to_numpy(layer.state_dict()[key].data))) == json.loads(bytes(sd[key]))
    got = tl.backend.to_numpy(layer.dequantize(dtype=t["dq.dequant"].dtype))
    assert got.tobytes() == t["dq.dequant"].reshape(shape).tobytes()


def test_requantize_replaces_the_codes_in_place_and_warns():
    _, q = layer_pair()
    tl.manual_seed(5)
    W2 = tl.randn(33, 70).data
    buffers = {k: t.data for k, t in q.named_buffers()}
    with pytest.warns(QuantizationWarning, match="dequantize=True"):
        q.requantize_(W2)
    packed, state = quant.quantize_4bit(W2)
    np.testing.assert_array_equal(q.weight.numpy().reshape(-1), tl.backend.to_numpy(packed))
    np.testing.assert_array_equal(tl.backend.to_numpy(q.dequantize()),
                                  tl.backend.to_numpy(quant.dequantize_4bit(packed, state)))
    assert all(t.data is buffers[k] for k, t in q.named_buffers())   # same arrays, new values


def test_requantize_refuses_bad_input_and_changes_nothing():
    _, q = layer_pair()
    before = [t.numpy().copy() for t in q.state_dict().values()]
    with pytest.raises(nn.ShapeError, match=r"requantize_ needs a weight of shape \(33, 70\)"):
        q.requantize_(np.zeros((70, 33), np.float32))
    bad = np.ones((33, 70), np.float32)
    bad[3, 4] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizationWarning)
        with pytest.raises(ValueError, match="inf or NaN"):
            q.requantize_(bad)
    for b, t in zip(before, q.state_dict().values()):
        np.testing.assert_array_equal(b, t.numpy())


def test_errors_name_the_layer_and_the_fix():
    _, q = layer_pair()
    with pytest.raises(nn.ShapeError,
                       match=r"Linear4bit\(in_features=70.*expected input of shape \(\.\.\., 70\), got \(2, 7\)"):
        q(tl.randn(2, 7))
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        Linear4bit(0, 3)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        Linear4bit(8, 3, quant_type="int8")
    assert "quant_type=nf4, blocksize=64, double_quant=True" in repr(q)


# ----------------------------------------------------------------------------- fused LoRA op

def lora_parts(dtype=tl.float32, r=3, seed=0):
    tl.manual_seed(seed)
    with tl.default_dtype(dtype):
        layer = Linear4bit(70, 9)
        A = tl.randn(r, 70, requires_grad=True)
        B = tl.randn(9, r, requires_grad=True)
        x = tl.randn(2, 4, 70, requires_grad=True)
        xd = tl.randn(2, 4, 70, requires_grad=True)
    return layer, A, B, x, xd


@pytest.mark.parametrize("dropped", [False, True])
def test_fused_lora_forward_equals_base_plus_adapter(dropped):
    layer, A, B, x, xd = lora_parts()
    xa = xd if dropped else x
    got = layer.lora_forward(x, A, B, 0.5, xd if dropped else None)
    W = tl.backend.to_numpy(layer.dequantize())
    want = x.numpy() @ W.T + layer.bias.numpy() + 0.5 * (xa.numpy() @ A.numpy().T) @ B.numpy().T
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(nn.ShapeError, match="expected input of shape"):
        layer.lora_forward(tl.randn(2, 3), A, B, 0.5)


@pytest.mark.parametrize("dropped", [False, True])
def test_gradcheck_fused_lora_forward_wrt_x_A_B_bias(dropped):
    layer, A, B, x, xd = lora_parts(tl.float64)
    layer.bias.requires_grad_(True)
    inputs = [x, A, B, layer.bias] + ([xd] if dropped else [])
    tl.gradcheck(lambda *ts: layer.lora_forward(x, A, B, 0.7, xd if dropped else None), inputs)
