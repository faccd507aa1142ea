"""What a graph keeps for backward (tinylora.memory), and that the fast kernels keep little.

The kernels recompute what is cheap to recompute (GELU's tanh(u), layer norm's x̂, attention's
probabilities) instead of keeping it; the reference ops keep it. Their values and gradients
are equal (tests/test_kernels.py); here: what stays alive between forward and backward.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinylora as tl
from tinylora import functional as F
from tinylora.memory import by_class, saved_arrays
from tinylora.models import GPT, GPTConfig


def _t(shape, grad=True, seed=0):
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return tl.tensor(a, requires_grad=grad)


def test_inventory_counts_each_buffer_once_and_leaves_not_at_all():
    x, w = _t((4, 5)), _t((3, 5), seed=1)                # leaves: not counted
    y = F.linear(x, w)                                   # (4, 3): read by gelu's backward
    z = F.gelu(y.reshape(12), approximate="tanh")        # the reshape is a view of y: once
    d = F.dropout(z, 0.5)                                # keeps its (12,) mask, not z
    loss = d.sum()                                       # keeps d's shape, not d
    kept = saved_arrays(loss)
    assert by_class(kept) == {"linear output": 48, "gelu_tanh output, unread": 48,
                              "dropout output, unread": 48, "dropout saved": 48}
    assert sorted(k.shape for k in kept if k.cls == "linear output") == [(4, 3)]
    loss.backward()                                      # the inventory changed nothing
    assert x.grad.shape == (4, 5) and w.grad.shape == (3, 5)


def test_inventory_follows_nested_closures_and_views():
    x, w = _t((6, 7)), _t((7,), seed=1)
    with tl.kernels_mode("reference"):                   # the reference keeps x̂ and rstd
        ref = by_class(saved_arrays(F.layer_norm(x, 7, w).sum()))
    with tl.kernels_mode("fast"):   # the kernel: μ and rstd, two views of one (2, 6, 1) array
        fast = by_class(saved_arrays(F.layer_norm(x, 7, w).sum()))   # held by a nested function
    assert ref["layer_norm saved"] == 6 * 7 * 4 + 6 * 4
    assert fast["layer_norm saved"] == 2 * 6 * 4


def test_inventory_rejects_what_is_no_tensor():
    with pytest.raises(TypeError, match="root must be a Tensor"):
        saved_arrays(np.zeros(3))


B, T, C, NH, L = 3, 16, 32, 4, 2
ACT = B * T * C * 4                                      # one (B, T, C) float32 activation


@pytest.fixture(autouse=True)
def several_chunks(monkeypatch):
    """Attention keeps probabilities that fit in one chunk (1 MiB), GELU a small tanh(u); these
    tests' small GPT is treated as a large one, so it recomputes them."""
    from tinylora.kernels import attention, blocking
    monkeypatch.setattr(attention, "SCORE_BUDGET", NH * T * T)
    monkeypatch.setattr(blocking, "KEEP_VALUES", 0)   # and GELU recomputes even small tanh(u)


def _gpt_graph(mode, dropout=0.0):
    with tl.kernels_mode(mode):
        tl.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=17, block_size=T, n_layer=L, n_head=NH, n_embd=C,
                              dropout=dropout))
        ids = np.random.default_rng(0).integers(0, 17, (B, T + 1))
        _, loss = model(ids[:, :-1], ids[:, 1:])
        return saved_arrays(loss), loss


def test_the_kernels_keep_no_probabilities_no_tanh_no_xhat():
    kept, loss = _gpt_graph("fast")
    assert not [k for k in kept if k.shape == (B, NH, T, T)], "attention kept its probabilities"
    classes = by_class(kept)
    assert "gelu_tanh saved" not in classes              # tanh(u) is recomputed
    # per row: layer norm's μ and rstd (2L + 1 norms), attention's max and 1/sum (L layers);
    # and the one cached (T, T) causal bias the attention layers share
    assert classes["layer_norm saved"] == (2 * L + 1) * 2 * B * T * 4
    assert classes["self_attention saved"] == L * 2 * B * NH * T * 4 + T * T * 4
    loss.backward()
    # the reference ops keep all three (and c·Q): the same inventory tells them apart
    ref_kept = _gpt_graph("reference")[0]
    ref = by_class(ref_kept)
    assert len([k for k in ref_kept if k.shape == (B, NH, T, T)]) == L
    assert ref["gelu_tanh saved"] >= L * 4 * ACT and ref["layer_norm saved"] >= (2 * L + 1) * ACT


def test_with_dropout_attention_keeps_only_a_bool_mask():
    kept, _ = _gpt_graph("fast", dropout=0.1)
    big = [k for k in kept if k.shape == (B, NH, T, T)]
    assert len(big) == L and all(k.dtype == "bool" and k.cls == "self_attention saved" for k in big)


def test_layer_norm_kernel_rereads_its_input_so_an_in_place_change_is_caught():
    x = _t((4, 8), grad=False)
    w = _t((8,), seed=1)
    y = F.layer_norm(x, 8, w)
    x.copy_(x.data * 2)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_bench_memory_reports_both_modes(tmp_path):
    """benchmarks/bench_memory.py on the small config: each mode in its own process."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "memory.json"
    env = dict(os.environ, PYTHONPATH=str(root), OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_memory.py"),
                           "--config", "nanogpt-cpu", "--threads", "1", "--steps", "1",
                           "--json-out", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    full, lora = res["results"]
    assert (full["mode"], lora["mode"]) == ("full", "lora")
    assert lora["grads_mb"] < full["grads_mb"] and lora["optimizer_state_mb"] < full["optimizer_state_mb"]
    for r in (full, lora):
        assert r["peak_rss_mb"] > r["rss_after_build_mb"] > 0 and r["step_ms"] > 0
        assert r["kept_for_backward_mb"] == pytest.approx(sum(r["kept_by_class_mb"].values()), abs=0.1)
        # the small config's tanh(u) (768 × 512 values) is under KEEP_VALUES: kept, not recomputed
        assert r["kept_by_class_mb"]["gelu_tanh saved"] == pytest.approx(4 * 768 * 512 * 4 / 2**20, abs=0.01)
    assert res["lora_over_full_peak"] == round(lora["peak_rss_mb"] / full["peak_rss_mb"], 3)


def test_probabilities_that_fit_in_one_chunk_are_kept_and_give_the_same_gradients(monkeypatch):
    from tinylora.kernels import attention
    grads = {}
    for budget in (NH * T * T, attention.CACHE_VALUES * 4):   # three chunks; one chunk
        monkeypatch.setattr(attention, "SCORE_BUDGET", budget)
        x = tl.tensor(np.random.default_rng(1).standard_normal((B, T, 3 * C)).astype("float32"),
                      requires_grad=True)
        y = F.self_attention(x, NH)
        kept = saved_arrays(y)
        probs = [k for k in kept if k.shape == (B, NH, T, T) and k.dtype == "float32"]
        assert len(probs) == (1 if budget > NH * T * T * B else 0)
        y.backward(tl.tensor(np.ones(y.shape, dtype="float32")))
        grads[budget] = np.array(x.grad.data)
    a, b = grads.values()
    assert np.array_equal(a, b)
