"""Every fast kernel computes what its reference op defines: same values, same gradients.

The list of ops comes from ``dispatch.registered()``: a kernel registered without a case
here fails ``test_kernel_matches_its_reference``. Tolerance is relative to the largest
reference value: float64 1e-12, float32 1e-6. Shapes include odd sizes that cross block
boundaries (kernels/blocking.py: 65536 values per block on the CPU).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import tinylora as tl
from tinylora import backend, dispatch
from tinylora import functional as F
from tinylora.models import GPT, GPTConfig
from tinylora.optim import AdamW, adamw_update

TOL = {"float64": 1e-12, "float32": 1e-6}
KERNELS = sorted(name for name, (_, kernel) in dispatch.registered().items() if kernel is not None)


def _np(a):
    return backend.to_numpy(a.data if isinstance(a, tl.Tensor) else a)


def _assert_close(got, want, dtype, what):
    got, want = _np(got), _np(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    scale = max(float(np.abs(want).max(initial=0.0)), np.finfo(want.dtype).tiny)
    err = float(np.abs(got - want).max(initial=0.0)) / scale
    assert err <= TOL[dtype], f"{what}: kernel differs from the reference by {err:.3g} (relative)"


@pytest.fixture
def stream_dropout(monkeypatch):
    """Dropout masks from one float64 stream: drawing a block in chunks along its leading axis
    (the attention kernel) gives the same values as drawing it whole (the reference)."""
    def install(seed):
        rng = np.random.default_rng(seed)

        def keep(shape, p):   # dropout_mask (the reference's) is built on dropout_keep too
            return backend.asarray(rng.random(shape) >= p)
        monkeypatch.setattr(backend, "dropout_keep", keep)
    return install


# ---------------------------------------------------------------------- cases per op
# Each case: (label, fn(*tensors) -> Tensor, input shapes[, "no_grad": compare the forward only])

def _bool_mask(rng, shape, full_row=True):
    m = rng.random(shape) > 0.4
    if full_row:
        m[(0,) * (len(shape) - 2) + (1,)] = False        # one fully masked row: uniform, no grad
    return m


def _gelu_cases(rng, dt):
    cases = []
    for shape in ((3,), (7, 10001), (2, 3, 5)):
        cases += [("erf", lambda x: F.gelu(x), [shape]),
                  ("tanh", lambda x: F.gelu(x, approximate="tanh"), [shape])]
    cases.append(("erf, no_grad", lambda x: F.gelu(x), [(65537,)], "no_grad"))
    cases.append(("tanh, decode, no_grad", lambda x: F.gelu(x, approximate="tanh"), [(8, 1, 96)],
                  "no_grad"))
    big = (9, 65543)      # over blocking.KEEP_VALUES: tanh(u) and Φ(x) recomputed in backward
    cases += [("erf, recomputed", lambda x: F.gelu(x), [big]),
              ("tanh, recomputed", lambda x: F.gelu(x, approximate="tanh"), [big])]
    return cases


def _layer_norm_cases(rng, dt):
    return [("w, b", lambda x, w, b: F.layer_norm(x, 7, w, b), [(3, 5, 7), (7,), (7,)]),
            ("blocks", lambda x, w, b: F.layer_norm(x, 1001, w, b, 1e-6),
             [(131, 1001), (1001,), (1001,)]),
            ("w only", lambda x, w: F.layer_norm(x, (7,), w), [(4, 7), (7,)]),
            ("no affine", lambda x: F.layer_norm(x, (3, 4)), [(2, 3, 4)]),
            ("frozen x", lambda x, w, b: F.layer_norm(x.detach(), 5, w, b), [(6, 5), (5,), (5,)]),
            ("decode, no_grad", lambda x, w, b: F.layer_norm(x, 48, w, b),
             [(8, 1, 48), (48,), (48,)], "no_grad")]


def _sdpa_cases(rng, dt):
    sdpa = F.scaled_dot_product_attention
    qkv = [(2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6)]
    bool_m = _bool_mask(rng, (2, 1, 5, 7))
    add_m = rng.standard_normal((5, 7)).astype(dt)
    return [("plain", lambda q, k, v: sdpa(q, k, v), qkv),
            ("causal", lambda q, k, v: sdpa(q, k, v, is_causal=True), qkv),
            ("bool mask", lambda q, k, v: sdpa(q, k, v, attn_mask=bool_m), qkv),
            ("bool + causal", lambda q, k, v: sdpa(q, k, v, attn_mask=bool_m, is_causal=True), qkv),
            ("additive + causal", lambda q, k, v: sdpa(q, k, v, attn_mask=add_m, is_causal=True),
             qkv),
            ("dropout, scale", lambda q, k, v: sdpa(q, k, v, dropout_p=0.3, scale=0.7), qkv),
            ("broadcast", lambda q, k, v: sdpa(q, k, v, is_causal=True),
             [(1, 3, 5, 4), (2, 3, 7, 4), (2, 1, 7, 6)]),
            ("chunks", lambda q, k, v: sdpa(q, k, v, is_causal=True, dropout_p=0.1),
             [(5, 14, 64, 8)] * 3),
            ("3-d, frozen k", lambda q, k, v: sdpa(q, k.detach(), v), [(3, 5, 4)] * 3)]


def _self_attention_cases(rng, dt):
    bool_m = _bool_mask(rng, (3, 1, 9, 9))
    pad = rng.random((3, 1, 1, 9)) > 0.3
    add_m = rng.standard_normal((3, 2, 9, 9)).astype(dt)
    x = [(3, 9, 24)]
    return [("causal", lambda x: F.self_attention(x, 2), x),
            ("bool mask", lambda x: F.self_attention(x, 2, attn_mask=bool_m, is_causal=False), x),
            ("pad + causal", lambda x: F.self_attention(x, 4, attn_mask=pad), x),
            ("additive", lambda x: F.self_attention(x, 2, attn_mask=add_m, is_causal=False), x),
            ("dropout", lambda x: F.self_attention(x, 2, dropout_p=0.25), x),
            ("chunks", lambda x: F.self_attention(x, 4, dropout_p=0.1), [(9, 100, 48)])]


def _lora_linear_cases(rng, dt):
    # x (..., in), W (out, in), b (out,), A (r, in), B (out, r); a frozen W gets no dW
    shapes = [(2, 5, 6), (4, 6), (4,), (3, 6), (4, 3)]
    return [("W, b", lambda x, w, b, a, bb: F.lora_linear(x, w, b, a, bb, 0.5), shapes),
            ("frozen W", lambda x, w, b, a, bb: F.lora_linear(x, w.detach(), b, a, bb, 2.0), shapes),
            ("no bias", lambda x, w, a, bb: F.lora_linear(x, w, None, a, bb, 0.25),
             [shapes[0], shapes[1], shapes[3], shapes[4]]),
            ("dropped x", lambda x, xd, w, b, a, bb: F.lora_linear(x, w, b, a, bb, 0.5, xd),
             [shapes[0], shapes[0]] + shapes[1:]),
            ("rows", lambda x, w, b, a, bb: F.lora_linear(x, w, b, a, bb, 1.0),
             [(257, 33), (65, 33), (65,), (8, 33), (65, 8)])]


def _cross_entropy_cases(rng, dt):
    t = rng.integers(0, 37, (4, 9))
    t[0, :3] = -100                                   # ignored targets
    big = rng.integers(0, 5003, 70)                   # rows of a large vocabulary: several blocks
    return [("mean", lambda z: F.cross_entropy(z, t), [(4, 9, 37)]),
            ("sum, smoothing", lambda z: F.cross_entropy(z, t, reduction="sum",
                                                         label_smoothing=0.1), [(4, 9, 37)]),
            ("none", lambda z: F.cross_entropy(z, t, reduction="none"), [(4, 9, 37)]),
            ("blocks", lambda z: F.cross_entropy(z, big), [(70, 5003)])]


def _fused_cases(rng, dt):
    # the kernels' own route runs under no_grad (with grad they are the reference); odd row
    # counts cross layer norm's and GELU's blocks (65536 values: 170 rows of 384, 42 of 1536)
    cat3 = lambda x, a, b, c, ba, bb, bc: F.linear_cat(x, [a, b, c], [ba, bb, bc])  # noqa: E731
    gelu = lambda x, w, b: F.linear_gelu(x, w, b)                                   # noqa: E731
    post = lambda h, w, b, r, g, be: F.linear_add_layer_norm(h, w, b, r, g, be, 1e-12)  # noqa: E731
    pad = rng.random((3, 1, 1, 9)) > 0.3                 # BERT's padding mask (B, 1, 1, S)
    pad[1] = False                                       # a fully masked row: uniform
    long_pad = rng.random((2, 1, 1, 80)) > 0.2           # more keys than the column loop takes
    return {
        "linear_cat": [
            ("q, k, v", cat3, [(2, 5, 6), (4, 6), (3, 6), (4, 6), (4,), (3,), (4,)]),
            ("q, k, v, no_grad", cat3, [(3, 67, 12), (20, 12), (20, 12), (20, 12), (20,), (20,),
                                        (20,)], "no_grad"),
            ("no bias, no_grad", lambda x, a, b: F.linear_cat(x, [a, b], [None, None]),
             [(9, 7), (5, 7), (3, 7)], "no_grad")],
        "linear_self_attention": [
            ("pad mask", lambda x, a, b, c, ba, bb, bc: F.linear_self_attention(
                x, [a, b, c], [ba, bb, bc], 2, attn_mask=pad), [(3, 9, 8)] + [(8, 8)] * 3 + [(8,)] * 3),
            ("pad mask, no_grad", lambda x, a, b, c, ba, bb, bc: F.linear_self_attention(
                x, [a, b, c], [ba, bb, bc], 4, attn_mask=pad), [(3, 9, 8)] + [(8, 8)] * 3 + [(8,)] * 3,
             "no_grad"),
            ("no mask, chunks, no_grad", lambda x, a, b, c: F.linear_self_attention(
                x, [a, b, c], [None] * 3, 4), [(40, 70, 16)] + [(16, 16)] * 3, "no_grad"),
            ("long rows, no_grad", lambda x, a, b, c: F.linear_self_attention(
                x, [a, b, c], [None] * 3, 2, attn_mask=long_pad), [(2, 80, 8)] + [(8, 8)] * 3,
             "no_grad")],
        "linear_gelu": [
            ("w, b", gelu, [(2, 5, 6), (7, 6), (7,)]),
            ("tanh", lambda x, w, b: F.linear_gelu(x, w, b, "tanh"), [(4, 6), (7, 6), (7,)]),
            ("no_grad, blocks", gelu, [(2, 50, 8), (1536, 8), (1536,)], "no_grad"),
            ("no bias, no_grad", lambda x, w: F.linear_gelu(x, w), [(33, 8), (101, 8)], "no_grad")],
        "linear_add_layer_norm": [
            ("post-norm", post, [(2, 5, 8), (6, 8), (6,), (2, 5, 6), (6,), (6,)]),
            ("no_grad, blocks", post, [(3, 117, 24), (384, 24), (384,), (3, 117, 384), (384,),
                                       (384,)], "no_grad"),
            ("no affine, no_grad", lambda h, w, r: F.linear_add_layer_norm(h, w, None, r),
             [(11, 5), (9, 5), (11, 9)], "no_grad")],
    }


def _linear_cases(rng, dt):
    # a few rows without a graph take the decode kernel; with one, or with many rows, the GEMM
    # of the reference
    return [("grad", lambda x, w, b: F.linear(x, w, b), [(2, 3, 5), (4, 5), (4,)]),
            ("decode, no_grad", lambda x, w, b: F.linear(x, w, b), [(8, 1, 33), (70, 33), (70,)],
             "no_grad"),
            ("one row, no bias", lambda x, w: F.linear(x, w), [(1, 33), (70, 33)], "no_grad"),
            ("rows past the decode size", lambda x, w: F.linear(x, w), [(65, 9), (7, 9)],
             "no_grad")]


def _cached_attention_cases(rng, dt):
    # the caches hold garbage past the filled positions: a kernel that read it would differ
    def attend(past, n_head, mask=None):
        return lambda qkv, k, v: F.cached_self_attention(qkv, k.data.copy(), v.data.copy(), past,
                                                         n_head, attn_mask=mask)
    pad = rng.random((3, 1, 1, 6)) > 0.3
    add = rng.standard_normal((3, 1, 1, 6)).astype(dt)
    cache = (3, 2, 9, 4)
    return [(f"T={T}, past={past}{label}", attend(past, 2, m), [(3, T, 24), cache, cache], "no_grad")
            for T, past in ((1, 5), (1, 0), (3, 3))
            for label, m in (("", None), (", pad", pad[..., :past + T]),
                             (", additive", add[..., :past + T]))]


CASES = {"gelu": _gelu_cases, "linear": _linear_cases,
         "cached_self_attention": _cached_attention_cases, "cross_entropy": _cross_entropy_cases,
         "layer_norm": _layer_norm_cases,
         "scaled_dot_product_attention": _sdpa_cases, "self_attention": _self_attention_cases,
         "lora_linear": _lora_linear_cases,
         **{name: (lambda name: lambda rng, dt: _fused_cases(rng, dt)[name])(name)
            for name in ("linear_cat", "linear_self_attention", "linear_gelu",
                         "linear_add_layer_norm")}}


def _run(mode, fn, arrays, g_out, no_grad):
    with tl.kernels_mode(mode):
        ts = [tl.tensor(a.copy(), requires_grad=True) for a in arrays]
        if no_grad:
            with tl.no_grad():
                return [fn(*ts)]
        out = fn(*ts)
        out.backward(tl.tensor(g_out(out.shape)))
        return [out] + [t.grad if t.grad is not None else np.zeros(t.shape, t.dtype) for t in ts]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_matches_its_reference(name, dtype, stream_dropout):
    if name == "adamw":
        return _check_adamw(dtype)
    assert name in CASES, f"kernel {name!r} is registered but tests/test_kernels.py has no case"
    rng = np.random.default_rng(0)
    for label, fn, shapes, *flags in CASES[name](rng, dtype):
        arrays = [(rng.standard_normal(s) * 2).astype(dtype) for s in shapes]
        seed = int(rng.integers(1 << 30))

        def g_out(shape):
            return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
        results = []
        for mode in ("reference", "fast"):
            stream_dropout(seed)
            results.append(_run(mode, fn, arrays, g_out, "no_grad" in flags))
        for i, (want, got) in enumerate(zip(*results)):
            what = "output" if i == 0 else f"grad of input {i - 1}"
            _assert_close(got, want, dtype, f"{name} [{label}] {what}")


def _check_adamw(dtype):
    for shape, wd in (((3, 70001), 0.1), ((5,), 0.0), ((65536,), 0.01)):
        states = []
        for mode in ("reference", "fast"):
            r = np.random.default_rng(1)
            p, m, v = (backend.asarray(a.astype(dtype)) for a in
                       (r.standard_normal(shape), np.zeros(shape), np.zeros(shape)))
            with tl.kernels_mode(mode):
                for step in (1, 2, 3):
                    g = backend.asarray(r.standard_normal(shape).astype(dtype))
                    adamw_update(p, g, m, v, step=step, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=wd)
            states.append((p, m, v))
        for what, want, got in zip("pmv", *states):
            _assert_close(got, want, dtype, f"adamw {shape} wd={wd}: {what}")


def test_every_case_names_a_registered_op():
    assert set(CASES) <= set(dispatch.registered()), set(CASES) - set(dispatch.registered())


# ---------------------------------------------------------------------- whole model

def _gpt_step(mode):
    with tl.default_dtype("float64"), tl.kernels_mode(mode):
        tl.manual_seed(0)
        # with dropout where the device stream gives the same values drawn in chunks or whole
        # (NumPy's: the attention kernel draws its mask chunk by chunk, the reference at once)
        p = 0.0 if backend.is_cuda() else 0.1
        cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=p)
        model = GPT(cfg)
        opt = AdamW(model, lr=1e-2)
        ids = np.random.default_rng(0).integers(0, 11, (3, 9))
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        grads = [_np(p.grad) for p in model.parameters()]
        opt.step()
        params = [_np(p) for p in model.parameters()]
    return float(loss.data), grads, params


def test_reference_mode_runs_a_gpt_step_with_no_kernel_and_the_same_numbers(monkeypatch):
    mode, calls = tl.get_kernels(), []
    for name in KERNELS:  # spies: record every kernel call
        kernel = dispatch.kernel_of(name)
        def spy(*args, _kernel=kernel, _name=name, **kwargs):
            calls.append(_name)
            return _kernel(*args, **kwargs)
        monkeypatch.setitem(dispatch._fast, name, spy)
    loss_f, grads_f, params_f = _gpt_step("fast")
    assert {"gelu", "layer_norm", "self_attention", "adamw"} <= set(calls)
    calls.clear()
    loss_r, grads_r, params_r = _gpt_step("reference")
    assert calls == []
    assert abs(loss_r - loss_f) <= 1e-12 * abs(loss_f)
    for want, got in zip(grads_f + params_f, grads_r + params_r):
        assert np.abs(got - want).max() <= 1e-10 * max(np.abs(want).max(), 1e-30)
    assert tl.get_kernels() == mode                  # kernels_mode restores the mode


def test_kernel_mode_errors_are_clear():
    with pytest.raises(ValueError, match="mode must be one of"):
        tl.set_kernels("bogus")
    env = dict(os.environ, TINYLORA_KERNELS="bogus")
    proc = subprocess.run([sys.executable, "-c", "import tinylora"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "TINYLORA_KERNELS='bogus' is not a kernel mode" in proc.stderr
