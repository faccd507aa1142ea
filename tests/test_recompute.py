"""Activation checkpointing: the same losses and gradients as the plain graph, less memory."""
import tracemalloc

import numpy as np
import pytest

import tinylora as tl
from tinylora import lora, nn
from tinylora.models import GPT, GPTConfig


def _run(checkpointed, use_lora=False, dropout=0.0, mixed=False):
    tl.manual_seed(0)
    with tl.default_dtype(tl.float64):
        m = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=dropout))
    if use_lora:
        cfg = lora.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
        lora.inject(m, cfg)
        if mixed:
            lora.inject(m, cfg, adapter_name="b")
    if checkpointed:
        m.gradient_checkpointing_enable()
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 11, (3, 8)), rng.integers(0, 11, (3, 8))
    tl.manual_seed(5)
    _, loss = m(x, y, adapter_names=["default", "b", "__base__"] if mixed else None)
    loss.backward()
    return loss.item(), {n: p.grad.numpy().copy() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_lora, dropout, mixed", [(False, 0.0, False), (True, 0.0, False),
                                                      (False, 0.2, False), (True, 0.2, False),
                                                      (True, 0.0, True)])
def test_checkpointed_gpt_equals_the_plain_graph(use_lora, dropout, mixed):
    loss, grads = _run(False, use_lora, dropout, mixed)
    loss_c, grads_c = _run(True, use_lora, dropout, mixed)
    assert loss == loss_c
    assert grads.keys() == grads_c.keys() and grads
    for k in grads:
        np.testing.assert_array_equal(grads[k], grads_c[k], err_msg=k)


def test_checkpoint_gradchecks():
    with tl.default_dtype(tl.float64):
        lin = nn.Linear(4, 3)
        x = tl.randn(2, 4, requires_grad=True)
    fn = lambda t: nn.checkpoint(lambda u: lin(u).tanh() * u.sum(), t, params=lin.parameters())
    assert tl.gradcheck(fn, [x]).ok
    assert tl.gradcheck(lambda w: nn.checkpoint(lambda u: (u @ w.T).tanh(), x.detach(), params=[w]),
                        [lin.weight]).ok


def test_checkpointing_keeps_fewer_activations():
    def peak_after_forward(checkpointed):
        tl.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=11, block_size=64, n_layer=4, n_head=2, n_embd=64))
        lora.inject(m, lora.LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
        if checkpointed:
            m.gradient_checkpointing_enable()
        x = np.random.default_rng(0).integers(0, 11, (8, 64))
        tracemalloc.start()
        _, loss = m(x, x)
        kept = tracemalloc.get_traced_memory()[0]   # what the graph holds until backward
        tracemalloc.stop()
        loss.backward()
        return kept
    assert peak_after_forward(True) < 0.4 * peak_after_forward(False)
