"""Reliability of memory: each training step's graph is freed by reference counting alone
(no cycles for the garbage collector to find), so a long run keeps a flat resident size."""
import gc
import os
import weakref

import numpy as np
import pytest

import tinylora as tl
from tinylora import lora
from tinylora.data import load_data
from tinylora.models import GPT, GPTConfig
from tinylora.tensor import Tensor
from tinylora.train import TrainConfig, Trainer

TINY = dict(block_size=16, n_layer=2, n_head=2, n_embd=32)
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def live_tensors() -> int:
    return sum(isinstance(o, Tensor) for o in gc.get_objects())


class gc_off:
    """Automatic garbage collection off: whatever reference counting leaves stays."""

    def __enter__(self):
        gc.collect()
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.was:
            gc.enable()


@pytest.fixture(scope="module")
def prose():
    return load_data("builtin:prose", block_size=16)


def graph_tensors(root: Tensor) -> list:
    """Every non-leaf tensor of root's graph (the ones a step creates)."""
    seen, stack, out = set(), [root], []
    while stack:
        t = stack.pop()
        if id(t) in seen or t._node is None:
            continue
        seen.add(id(t))
        out.append(t)
        stack.extend(p for p in t._node.parents if isinstance(p, Tensor))
    return out


@pytest.mark.parametrize("with_lora", [False, True])
def test_a_steps_graph_is_freed_as_soon_as_its_references_drop(prose, with_lora):
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, dropout=0.1, **TINY))
    if with_lora:
        lora.inject(model, lora.LoraConfig(r=4, lora_dropout=0.1, target_modules=["c_attn", "c_fc"]))
    x = np.random.default_rng(0).integers(0, 96, (4, 16))
    with gc_off():
        logits, loss = model(x, x)
        refs = [weakref.ref(t) for t in graph_tensors(loss)]
        assert len(refs) > 20                                      # the whole graph is tracked
        loss.backward()
        del logits, loss
        alive = [r() for r in refs if r() is not None]
        assert not alive, f"{len(alive)} graph tensors outlive the step, e.g. {alive[0].shape}"


def test_steps_leave_no_tensor_cycles_for_the_garbage_collector(prose):
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, dropout=0.1, **TINY))
    t = Trainer(model, prose, TrainConfig(max_iters=3, batch_size=4, grad_accum_steps=2,
                                          eval_interval=0, progress=False))
    t.train()                                                      # optimizer state exists
    with gc_off():
        before = live_tensors()
        t.config.max_iters = 13
        t.train()
        after = live_tensors()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            cyclic = [o for o in gc.garbage if isinstance(o, Tensor)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert after == before, f"{after - before} tensors more after 10 steps"
    assert not cyclic, f"{len(cyclic)} tensors were only freeable by the cycle collector"


def test_a_500_step_run_keeps_a_flat_resident_size(prose):
    class Measured(Trainer):
        def _accumulate(self):
            if self.step in (50, 500 - 1):
                rss[self.step] = rss_bytes()
                tensors[self.step] = live_tensors()
            return super()._accumulate()

    rss, tensors = {}, {}
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, dropout=0.1, **TINY))
    t = Measured(model, prose, TrainConfig(max_iters=500, batch_size=4, eval_interval=0,
                                           log_interval=50, progress=False))
    with gc_off():                                                 # refcounting alone must do
        t.train()
    growth = rss[499] - rss[50]
    assert tensors[499] == tensors[50], (tensors[50], tensors[499])
    assert growth < 5 * 2 ** 20, f"resident size grew {growth / 2**20:.1f} MB over 450 steps"
