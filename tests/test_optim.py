"""tinylora.optim: AdamW and SGD against hand computation, state round trips, clipping, LR."""
import math

import numpy as np
import pytest

import tinylora as tl
from tinylora import nn
from tinylora.optim import (SGD, AdamW, WarmupCosineLR, clip_grad_norm_, cosine_lr,
                            load_optimizer, param_groups, save_optimizer)


def two_params():
    W = nn.Parameter(np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32))
    b = nn.Parameter(np.array([0.5, -0.5], dtype=np.float32))
    return W, b


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = tl.tensor(np.asarray(g, dtype=np.float32))


GRADS = [([[0.1, -0.2], [0.3, 0.0]], [1.0, -2.0]),
         ([[-0.4, 0.5], [0.1, 0.2]], [0.5, 0.25])]


def test_adamw_matches_hand_computed_steps():
    W, b = two_params()
    lr, (b1, b2), eps, wd = 0.1, (0.9, 0.999), 1e-8, 0.1
    opt = AdamW([W, b], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    # the reference, written out in float64 from the paper's textbook form
    ref = {"W": W.numpy().astype(np.float64), "b": b.numpy().astype(np.float64)}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v = {k: np.zeros_like(x) for k, x in ref.items()}
    for t, (gW, gb) in enumerate(GRADS, start=1):
        set_grads([W, b], [gW, gb])
        opt.step()
        for k, g in (("W", np.array(gW)), ("b", np.array(gb))):
            decay = wd if k == "W" else 0.0          # 1-D parameters are not decayed by default
            ref[k] = ref[k] - lr * decay * ref[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            mhat, vhat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            ref[k] = ref[k] - lr * mhat / (np.sqrt(vhat) + eps)
        np.testing.assert_allclose(W.numpy(), ref["W"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b.numpy(), ref["b"], rtol=1e-6, atol=1e-7)
    assert W.dtype == np.float32 and b.dtype == np.float32
    for st in opt.state.values():
        assert st["exp_avg"].dtype == np.float32 and st["exp_avg_sq"].dtype == np.float32
    assert W._version == 2 and b._version == 2


def test_adamw_explicit_groups_decay_what_they_say():
    W, b = two_params()
    opt = AdamW([{"params": [W, b], "weight_decay": 0.5}], lr=0.1)
    set_grads([W, b], [np.zeros((2, 2)), np.zeros(2)])
    opt.step()                                      # zero grad: only the decay moves weights
    np.testing.assert_allclose(b.numpy(), [0.5 * 0.95, -0.5 * 0.95], rtol=1e-6)
    np.testing.assert_allclose(W.numpy(), np.array([[1, 2], [3, 4]]) * 0.95, rtol=1e-6)


def test_param_groups_from_model_split_by_ndim_and_skip_frozen():
    lin = nn.Linear(3, 2)
    emb = nn.Embedding(5, 3)
    emb.weight.requires_grad_(False)
    model = nn.ModuleList([lin, emb])
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 1]
    assert groups[0]["params"][0] is lin.weight and groups[0]["weight_decay"] == 0.1
    assert groups[1]["params"][0] is lin.bias and groups[1]["weight_decay"] == 0.0
    opt = AdamW.from_model(model, lr=1e-2, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_sgd_momentum_and_nesterov_match_hand_computation():
    for nesterov in (False, True):
        W, b = two_params()
        lr, mu, wd = 0.1, 0.9, 0.01
        opt = SGD([W, b], lr=lr, momentum=mu, weight_decay=wd, nesterov=nesterov)
        ref = {"W": W.numpy().astype(np.float64), "b": b.numpy().astype(np.float64)}
        buf = {}
        for gW, gb in GRADS:
            set_grads([W, b], [gW, gb])
            opt.step()
            for k, g in (("W", np.array(gW)), ("b", np.array(gb))):
                g = g + (wd if k == "W" else 0.0) * ref[k]
                buf[k] = g if k not in buf else mu * buf[k] + g
                d = g + mu * buf[k] if nesterov else buf[k]
                ref[k] = ref[k] - lr * d
            np.testing.assert_allclose(W.numpy(), ref["W"], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(b.numpy(), ref["b"], rtol=1e-6, atol=1e-7)


def test_frozen_and_gradless_params_are_untouched_and_stateless():
    W, b = two_params()
    frozen = nn.Parameter(np.ones((2, 2), dtype=np.float32), requires_grad=False)
    frozen.grad = tl.tensor(np.ones((2, 2), dtype=np.float32))   # a stray grad must not move it
    opt = AdamW([W, b, frozen], lr=0.1)
    W.grad = tl.tensor(np.ones((2, 2), dtype=np.float32))       # b has no grad
    before_b, before_f = b.numpy().copy(), frozen.numpy().copy()
    opt.step()
    assert np.array_equal(b.numpy(), before_b) and np.array_equal(frozen.numpy(), before_f)
    assert set(opt.state) == {id(W)}
    assert frozen._version == 0 and b._version == 0


def test_state_round_trip_through_safetensors(tmp_path):
    def build():
        W, b = two_params()
        return [W, b], AdamW([W, b], lr=0.05, weight_decay=0.2)
    (pa, oa), (pb, ob) = build(), build()
    set_grads(pa, GRADS[0])
    oa.step()
    save_optimizer(tmp_path / "opt.safetensors", oa)
    for p, q in zip(pa, pb):
        q.data[...] = p.data
    load_optimizer(tmp_path / "opt.safetensors", ob)
    assert ob.param_groups[0]["betas"] == (0.9, 0.999)
    for params, opt in ((pa, oa), (pb, ob)):
        set_grads(params, GRADS[1])
        opt.step()
    for p, q in zip(pa, pb):
        assert np.array_equal(p.numpy(), q.numpy())       # bit for bit
    # a different set of parameters is refused with a clear error
    W, b = two_params()
    with pytest.raises(ValueError, match="param groups of sizes"):
        load_optimizer(tmp_path / "opt.safetensors", AdamW([W], lr=0.1))
    with pytest.raises(ValueError, match="is for AdamW, not SGD"):
        load_optimizer(tmp_path / "opt.safetensors", SGD([W, b], lr=0.1))


def test_zero_grad_and_bad_arguments():
    W, b = two_params()
    opt = SGD([W, b], lr=0.1)
    set_grads([W, b], GRADS[0])
    opt.zero_grad(set_to_none=False)
    assert np.all(W.grad.numpy() == 0)
    opt.zero_grad()
    assert W.grad is None and b.grad is None
    with pytest.raises(TypeError, match="wrap it in a list"):
        AdamW(W)
    with pytest.raises(ValueError, match="no parameters"):
        AdamW([])
    with pytest.raises(ValueError, match="more than one param group"):
        AdamW([{"params": [W]}, {"params": [W]}])


def test_clip_grad_norm():
    W, b = two_params()
    set_grads([W, b], [[[3.0, 0.0], [0.0, 0.0]], [4.0, 0.0]])
    total = clip_grad_norm_([W, b], 1.0)
    assert isinstance(total, float) and total == pytest.approx(5.0)
    new = math.sqrt(float((W.grad.numpy() ** 2).sum() + (b.grad.numpy() ** 2).sum()))
    assert new == pytest.approx(1.0, rel=1e-5)
    assert W.grad.dtype == np.float32
    assert clip_grad_norm_([W, b], 10.0) == pytest.approx(1.0, rel=1e-5)  # below: unchanged
    W.grad.data[0, 0] = np.nan
    assert math.isnan(clip_grad_norm_([W, b], 1.0))


def test_cosine_lr_and_scheduler():
    lr, mn = 1.0, 0.1
    assert cosine_lr(0, 10, 110, lr, mn) == pytest.approx(1 / 11)
    assert cosine_lr(9, 10, 110, lr, mn) == pytest.approx(10 / 11)
    assert cosine_lr(10, 10, 110, lr, mn) == pytest.approx(1.0)
    assert cosine_lr(60, 10, 110, lr, mn) == pytest.approx(0.55)
    assert cosine_lr(110, 10, 110, lr, mn) == pytest.approx(0.1)
    assert cosine_lr(500, 10, 110, lr, mn) == pytest.approx(0.1)
    W, b = two_params()
    opt = AdamW([{"params": [W], "lr": 2.0}, {"params": [b], "lr": 1.0}])
    sched = WarmupCosineLR(opt, warmup=0, max_steps=10, min_lr_ratio=0.1)
    for _ in range(5):
        sched.step()
    assert sched.get_last_lr() == pytest.approx([2.0 * 0.55, 0.55])
    other = WarmupCosineLR(opt, warmup=0, max_steps=10)
    other.load_state_dict(sched.state_dict())
    assert other.get_last_lr() == pytest.approx([1.1, 0.55])
