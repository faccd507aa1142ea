"""The GPU gives the CPU's numbers: one code path, two array modules.

A tiny GPT (dropout 0) trains 20 steps from the same seed on the CPU and on the device, and
the losses agree to 1e-4 (float32). LoRA and QLoRA forwards and their adapter gradients agree
too. The device is "cuda" where CuPy finds a GPU (skipped otherwise, saying so), and always
"guard": NumPy behind CuPy's rules, so the device code path (deferred loss reads, clipping on
the device, CuPy-only names) is exercised on every machine, where it must match bit for bit.
"""
import contextlib

import numpy as np
import pytest

import tinylora as tl
from tinylora import backend, lora, quant
from tinylora.data import load_data
from tinylora.models import GPT, GPTConfig
from tinylora.train import TrainConfig, Trainer

def _gpu_available() -> bool:
    try:
        import cupy        # only "cuda" needs CuPy; "guard" has CuPy's names stored
        return cupy.is_available() and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:      # not installed, or no driver / runtime (CuPy's own error types)
        return False


DEVICES = [pytest.param("cuda", marks=pytest.mark.skipif(
               not _gpu_available(), reason="no GPU: cupy.is_available() is False on this machine "
                                            "(scripts/gpu_check.sh runs this on a GPU)")),
           "guard"]
CFG = dict(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
STEPS = 20


@contextlib.contextmanager
def on(device: str):
    before = backend.get_device()
    backend.set_device(device)
    try:
        yield
    finally:
        backend.set_device(before)


def host_state(model) -> dict:
    return {k: backend.to_numpy(t.data).copy() for k, t in model.state_dict().items()}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def prose():
    return load_data("builtin:prose", block_size=CFG["block_size"])


def train_tiny_gpt(device: str, data) -> tuple:
    """(losses of steps 1..STEPS, initial weights, final weights), all on the host."""
    with on(device):
        tl.manual_seed(0)
        model = GPT(GPTConfig(**CFG))
        start = host_state(model)
        cfg = TrainConfig(max_iters=STEPS, batch_size=8, lr=3e-3, warmup_iters=5,
                          eval_interval=0, log_interval=5, seed=0, progress=False)
        result = Trainer(model, data, cfg).train()
        return [result.losses[s] for s in range(1, STEPS + 1)], start, host_state(model)


@pytest.fixture(scope="module")
def cpu_run(prose):
    return train_tiny_gpt("cpu", prose)


@pytest.mark.parametrize("device", DEVICES)
def test_twenty_training_steps_match_the_cpu(device, prose, cpu_run):
    want_losses, want_start, want_end = cpu_run
    losses, start, end = train_tiny_gpt(device, prose)
    for k, a in want_start.items():              # weights drawn on the host: identical starts
        assert np.array_equal(start[k], a), k
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert want_losses[-1] < want_losses[0] - 0.5                 # it learned something
    for step, (got, want) in enumerate(zip(losses, want_losses), 1):
        assert abs(got - want) <= 1e-4 * abs(want), (step, got, want)
    worst = max(rel_err(end[k], a) for k, a in want_end.items())
    assert worst < 1e-3, worst
    if device == "guard":                        # NumPy underneath: the device path changes no bit
        assert losses == want_losses
        assert all(np.array_equal(end[k], a) for k, a in want_end.items())


def adapted_gpt(kind: str):
    tl.manual_seed(1)
    model = GPT(GPTConfig(**CFG))
    if kind == "qlora":
        quant.quantize_model(model, print_fn=None)
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                       target_modules=["c_attn", "c_proj", "c_fc"]))
    return model


def forward_and_grads(model, x, y) -> tuple:
    logits, loss = model(x, y)
    loss.backward()
    grads = {n: backend.to_numpy(p.grad.data) for n, p in model.named_parameters()
             if p.requires_grad}
    return backend.to_numpy(logits.data), loss.item(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_lora_and_qlora_forward_and_adapter_grads_match_the_cpu(device, kind):
    rng = np.random.default_rng(2)
    x, y = (rng.integers(0, CFG["vocab_size"], (3, CFG["block_size"])) for _ in range(2))
    with on("cpu"):
        ref = adapted_gpt(kind)
        state = host_state(ref)
        want_logits, want_loss, want_grads = forward_and_grads(ref, x, y)
    with on(device):
        model = adapted_gpt(kind)
        # the same 4-bit codes and scales: quantizing on the device may round the double-quant
        # offset (a float64 mean) differently, which moves a block's scale by one 8-bit step
        model.load_state_dict(state)
        logits, loss, grads = forward_and_grads(model, x, y)
        assert all(backend.is_array(t.data) and not isinstance(t.data, np.ndarray)
                   for t in model.state_dict().values())           # everything on the device
    assert rel_err(logits, want_logits) < 1e-5
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    assert grads.keys() == want_grads.keys() and any("lora_A" in n for n in grads)
    for n, g in want_grads.items():
        assert rel_err(grads[n], g) < 1e-4, n


@pytest.mark.parametrize("device", DEVICES)
def test_nf4_quantization_on_the_device_matches_the_cpu(device):
    w = np.random.default_rng(3).standard_normal((96, 64)).astype(np.float32)
    with on("cpu"):
        packed, state = quant.quantize_4bit(w, blocksize=64, double_quant=False)
        want = quant.dequantize_4bit(packed, state)
    with on(device):
        dpacked, dstate = quant.quantize_4bit(backend.asarray(w), blocksize=64, double_quant=False)
        got = backend.to_numpy(quant.dequantize_4bit(dpacked, dstate))
        codes = backend.to_numpy(dpacked)
    assert np.array_equal(codes, packed)             # IEEE float32 ops: the same codes
    assert np.array_equal(got, want)
