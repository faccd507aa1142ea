"""Decoding with the KV cache: the decode kernels (kernels/decode.py) against their references,
generation the same with kernels on and off, and benchmarks/bench_generate.py's own run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinylora as tl
from tinylora import dispatch
from tinylora import functional as F
from tinylora.kernels import decode
from tinylora.models import GPT, GPTConfig
from tinylora.nn import KVCache

ROOT = Path(__file__).resolve().parents[1]


def _arr(rng, shape, dtype):
    return (rng.standard_normal(shape) * 2).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("T, past", [(1, 0), (1, 6), (4, 3)])
@pytest.mark.parametrize("mask", [None, "pad", "additive"])
def test_cached_attention_kernel_writes_and_reads_the_cache_as_the_reference(dtype, T, past, mask):
    rng = np.random.default_rng(T + past)
    B, nh, hs, cap = 2, 3, 4, 11
    qkv = tl.tensor(_arr(rng, (B, T, 3 * nh * hs), dtype))
    k0, v0 = _arr(rng, (B, nh, cap, hs), dtype), _arr(rng, (B, nh, cap, hs), dtype)
    S = past + T
    m = {None: None, "pad": rng.random((B, S)) > 0.3,
         "additive": _arr(rng, (B, 1, 1, S), dtype)}[mask]
    if mask == "pad":
        m[:, -1] = True                                   # each row sees at least its new key
        m = m[:, None, None, :]
    got, want = [], []
    for fn, out in ((decode.cached_self_attention, got),
                    (dispatch.reference_of("cached_self_attention"), want)):
        k, v = k0.copy(), v0.copy()
        with tl.no_grad():
            y = fn(qkv, k, v, past, nh, attn_mask=m)
        out += [y.numpy(), k[:, :, :S], v[:, :, :S]]
    assert got[0].shape == (B, T, nh * hs) and got[0].dtype == np.dtype(dtype)
    tol = 1e-12 if dtype == "float64" else 1e-5
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    for k in (got[1], want[1]):                           # the new keys landed at [past, S)
        np.testing.assert_array_equal(k[:, :, past:], qkv.numpy().reshape(B, T, 3, nh, hs)[:, :, 1]
                                      .transpose(0, 2, 1, 3))


@pytest.mark.parametrize("rows", [1, 2, 8, 9, 64, 65])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])                # 2 to 8 rows on one thread: sliced
def test_decode_linear_equals_the_reference_and_keeps_it_under_a_graph(rows, bias, threads,
                                                                      monkeypatch):
    monkeypatch.setattr(decode, "num_threads_now", lambda: threads)
    rng = np.random.default_rng(rows)
    x = tl.tensor(_arr(rng, (rows, 1, 40), "float32"), requires_grad=True)
    w = tl.tensor(_arr(rng, (300, 40), "float32"), requires_grad=True)   # several slices
    b = tl.tensor(_arr(rng, (300,), "float32"), requires_grad=True) if bias else None
    ref = dispatch.reference_of("linear")
    with tl.no_grad():
        got, want = decode.linear(x, w, b), ref(x, w, b)
    assert got.shape == (rows, 1, 300) and got.data.flags.c_contiguous
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-5)
    y = decode.linear(x, w, b)                            # a graph: the reference, gradients and all
    assert y.requires_grad and np.array_equal(y.numpy(), ref(x, w, b).numpy())
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_decode_layer_norm_is_the_blocked_kernel_bit_for_bit():
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float64"):
        for shape in ((8, 1, 384), (1, 1, 48), (3, 7)):
            x = tl.tensor(_arr(rng, shape, dtype) + 3)
            w, b = (tl.tensor(_arr(rng, shape[-1:], dtype)) for _ in range(2))
            with tl.no_grad():
                for args in ((w, b), (w,), ()):
                    got = decode.layer_norm(x, shape[-1], *args).numpy()
                    want = decode.blocked_layer_norm(x, shape[-1], *args).numpy()
                    assert np.array_equal(got, want), (dtype, shape, len(args))


def test_decode_gelu_is_the_blocked_kernel_bit_for_bit():
    rng = np.random.default_rng(1)
    for dtype in ("float32", "float64"):
        for shape in ((8, 1, 1536), (1, 1, 7), (3, 5)):
            x = tl.tensor(_arr(rng, shape, dtype))
            with tl.no_grad():
                got = decode.gelu(x, approximate="tanh").numpy()
                want = decode.blocked_gelu(x, approximate="tanh").numpy()
            assert got.dtype == np.dtype(dtype) and np.array_equal(got, want), (dtype, shape)


def test_generation_is_the_same_with_the_decode_kernels_and_without():
    with tl.default_dtype(tl.float64):
        tl.manual_seed(3)
        model = GPT(GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=16))
    prompt = np.random.default_rng(3).integers(0, 17, (3, 4))
    runs = []
    for mode in ("fast", "reference"):
        with tl.kernels_mode(mode):
            runs.append(model.generate(prompt, 10, temperature=0.0, output_logits=True))
    assert np.array_equal(runs[0][0], runs[1][0])
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-12, atol=1e-12)


def test_the_cache_path_refuses_a_full_cache_before_writing():
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    model.eval()
    cache = KVCache(1, 1, 2, 3, 4)
    with tl.no_grad():
        model(np.zeros((1, 2), np.int64), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache is full: 2 \\+ 2 positions exceed its capacity 3"):
            model(np.zeros((1, 2), np.int64), kv_cache=cache)
    assert cache.length == 2


def _bench(*args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "benchmarks/bench_generate.py", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_bench_generate_runs_tinylora_alone_with_a_baseline(tmp_path):
    out = tmp_path / "g.json"
    proc = _bench("--configs", "nanogpt-cpu", "--batch-sizes", "1", "2", "--prompt", "3",
                  "--new-tokens", "4", "--rounds", "1", "--warmup", "0", "--pause", "0",
                  "--threads", "1", "--tinylora-only", "--baseline", str(ROOT),
                  "--json-out", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["batch_size"] for r in data["results"]] == [1, 2] and data["threads"] == 1
    for r in data["results"]:
        assert r["tinylora_tokens_per_s"] > 0 and r["baseline_tokens_equal"] is True
        assert "torch_tokens_per_s" not in r and r["new_tokens"] == 4


def test_bench_generate_rejects_a_run_longer_than_the_context(tmp_path):
    proc = _bench("--configs", "nanogpt-cpu", "--prompt", "40", "--new-tokens", "30",
                  "--tinylora-only", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "must be >= 1 each and fit in nanogpt-cpu's block_size=64" in proc.stderr


def test_openblas_reports_the_thread_count_threadpoolctl_sets():
    from threadpoolctl import threadpool_limits

    from tinylora import blas
    if blas._THREADS is None:
        pytest.skip("NumPy's BLAS is not OpenBLAS")
    with threadpool_limits(1, user_api="blas"):
        assert blas.num_threads_now() == 1
        with blas.one_thread():
            assert blas.num_threads_now() == 1
    with threadpool_limits(2, user_api="blas"):
        assert blas.num_threads_now() == 2
        with blas.one_thread():                 # OpenBLAS on the calling thread, then back
            assert blas.num_threads_now() == 1
        assert blas.num_threads_now() == 2
