"""Blocked kernels on several threads give the same bits as on one.

``kernels.blocking.parallel`` hands contiguous runs of blocks to threads; each block writes
only its own slice, so the count of threads must not change a single value. Every
registered kernel's cases (from test_kernels.py, shapes that cross block boundaries) run
with 1 and with 3 threads and are compared bit for bit.
"""
import numpy as np
import pytest

import tinylora as tl
from tinylora.kernels import blocking
from tinylora.optim import adamw_update

from test_kernels import CASES, KERNELS, _np, _run, stream_dropout  # noqa: F401 (fixture)


@pytest.fixture
def spy_parts(monkeypatch):
    """The largest number of parts ``parallel`` split a pass into."""
    seen = [0]
    real = blocking.parallel

    def spy(run, slices, **kw):
        slices = list(slices)
        seen[0] = max(seen[0], min(blocking.threads(), len(slices) // 4))
        return real(run, slices, **kw)
    for mod in _kernel_modules():
        if hasattr(mod, "parallel"):
            monkeypatch.setattr(mod, "parallel", spy)
    return seen


def _kernel_modules():
    import sys
    return [m for name, m in sys.modules.items() if name.startswith("tinylora.kernels.")]


def _big_cases(name):
    """Shapes of many blocks (65536 values each), so that every thread gets several."""
    from tinylora import functional as F
    t = np.random.default_rng(1).integers(0, 5003, 600)
    mask = np.random.default_rng(2).random((8, 1, 64, 64)) > 0.2
    return {"gelu": [("erf, big", lambda x: F.gelu(x), [(9, 65536 + 7)]),
                     ("tanh, big", lambda x: F.gelu(x, approximate="tanh"), [(9, 65536 + 7)])],
            "layer_norm": [("big", lambda x, w, b: F.layer_norm(x, 1001, w, b), [(700, 1001), (1001,), (1001,)])],
            "cross_entropy": [("big", lambda z: F.cross_entropy(z, t), [(600, 5003)])],
            "self_attention": [("big, dropout", lambda x: F.self_attention(x, 4, dropout_p=0.1),
                                [(160, 64, 96)])],
            "scaled_dot_product_attention": [
                ("big, bool mask", lambda q, k, v: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=True), [(8, 64, 64, 8)] * 3)],
            }.get(name, [])


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_gives_the_same_bits_on_several_threads(name, spy_parts, stream_dropout):
    rng = np.random.default_rng(0)
    if name == "adamw":
        cases = [("adamw", None, [(9, 70001)] * 2)]
    else:
        cases = list(CASES[name](rng, "float32")) + _big_cases(name)
    for label, fn, shapes, *flags in cases:
        arrays = [(rng.standard_normal(s) * 2).astype("float32") for s in shapes]
        seed = int(rng.integers(1 << 30))
        runs = []
        for n in (1, 3):
            stream_dropout(seed)
            runs.append(_once(name, fn, arrays, seed, "no_grad" in flags, n))
        for i, (a, b) in enumerate(zip(*runs)):
            assert np.array_equal(_np(a), _np(b)), f"{name} [{label}] result {i}: 1 vs 3 threads"


def _once(name, fn, arrays, seed, no_grad, n):
    import tinylora.kernels.blocking as blk
    old = blk.threads
    blk.threads = lambda: n
    try:
        if name == "adamw":
            p, g = (a.copy() for a in arrays)
            m, v = np.zeros_like(p), np.zeros_like(p)
            with tl.kernels_mode("fast"):
                for step in (1, 2):
                    adamw_update(p, g, m, v, step=step, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=0.1)
            return [p, m, v]

        def g_out(shape):
            return np.random.default_rng(seed).standard_normal(shape).astype("float32")
        return _run("fast", fn, arrays, g_out, no_grad)
    finally:
        blk.threads = old


@pytest.mark.parametrize("name", ["gelu", "layer_norm", "cross_entropy", "self_attention",
                                  "scaled_dot_product_attention", "adamw"])
def test_the_kernel_really_splits_its_passes(name, spy_parts, stream_dropout):
    test_kernel_gives_the_same_bits_on_several_threads(name, spy_parts, stream_dropout)
    assert spy_parts[0] >= 2


def test_an_error_in_a_thread_reaches_the_caller():
    def run(part):
        if part[0] == 5:
            raise RuntimeError("block 5 failed")
    old = blocking.threads
    blocking.threads = lambda: 2
    try:
        with pytest.raises(RuntimeError, match="block 5 failed"):
            blocking.parallel(run, range(10))
    finally:
        blocking.threads = old


def test_parts_cover_every_block_once_in_order():
    got = []
    old = blocking.threads
    blocking.threads = lambda: 3
    try:
        blocking.parallel(lambda part: got.append(list(part)), range(13))
    finally:
        blocking.threads = old
    assert sorted(sum(got, [])) == list(range(13)) and len(got) == 3
    assert all(p == list(range(p[0], p[0] + len(p))) for p in got)   # contiguous runs
