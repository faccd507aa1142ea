"""The device path follows CuPy's rules: checked on machines without a GPU by device "guard".

Device "guard" binds ``xp`` to NumPy restricted to CuPy's namespace, whose arrays refuse what
CuPy's refuse (implicit host conversion, host arrays mixed into device work) and count every
host sync (see ``tinylora.guard``). The tests below plant each kind of bug and watch the guard
catch it, check that a training step (GPT, LoRA, QLoRA, DoRA) makes no host sync, and rerun
most of the suite under the guard in a subprocess.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinylora as tl
from tinylora import backend, lora, quant
from tinylora import functional as F
from tinylora.models import GPT, GPTConfig
from tinylora.optim import AdamW, grad_norm

ROOT = Path(__file__).resolve().parents[1]
# The files whose code runs on the device. Left out: host-only work (io, data, wordpiece)
# and the slow end-to-end ones (sentence, demo, examples: minutes).
GUARDED = ["tests/test_engine.py", "tests/test_ops_gradcheck.py", "tests/test_kernels.py",
           "tests/test_broadcast_props.py", "tests/test_optim.py", "tests/test_nf4.py",
           "tests/test_linear4bit.py", "tests/test_qlora.py", "tests/test_lora_layers.py",
           "tests/test_lora_inject.py",
           "tests/test_lora_merge.py", "tests/test_lora_adapters.py", "tests/test_lora_multi.py",
           "tests/test_lora_gpt.py", "tests/test_lora_qlora.py", "tests/test_gpt.py",
           "tests/test_train.py", "tests/test_reliability_resume.py",
           "tests/test_reliability_errors.py", "tests/test_viz.py", "tests/test_gpu_parity.py",
           "tests/test_bert.py", "tests/test_cli.py", "tests/test_reliability_fuzz.py"]


def _gpu_available() -> bool:
    try:
        import cupy
        return cupy.is_available()
    except Exception:          # not installed, or no driver / runtime
        return False


@pytest.fixture
def guard():
    """Run the test under device "guard", then restore the device the suite runs on."""
    before = backend.get_device()
    backend.set_device("guard")
    backend.manual_seed(0)
    try:
        yield backend.xp
    finally:
        backend.set_device(before)


def test_cupy_imports_without_a_gpu():
    cupy = pytest.importorskip("cupy")
    assert isinstance(cupy.is_available(), bool)


def test_stored_cupy_names_are_the_installed_cupys():
    """The guard reads CuPy's names from tinylora/cupy_namespace.json (no CuPy needed); with
    the pinned CuPy installed they must be exactly what it has."""
    from tinylora import guard as g
    stored = g.stored_cupy_names()
    for key in ("names", "ndarray", "linalg", "random", "fft"):
        assert stored[key] == sorted(set(stored[key])) and len(stored[key]) > 10, key
    assert {"exp", "einsum", "matmul", "take_along_axis"} <= set(stored["names"])
    assert "frompyfunc" not in stored["names"] and "resize" not in stored["ndarray"]
    assert set(stored["ufunc_methods"]["add"]) >= {"reduce", "at"}
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed: the stored names stand")
    if cupy.__version__ != stored["cupy_version"]:
        pytest.skip(f"CuPy {cupy.__version__} is installed; the stored names are CuPy "
                    f"{stored['cupy_version']}'s (tests/fixtures/make_cupy_namespace.py)")
    assert g.describe_cupy(cupy) == stored, ("tinylora/cupy_namespace.json differs from the "
                                             "installed CuPy: run tests/fixtures/make_cupy_namespace.py")


def test_guard_refuses_numpy_only_names(guard):
    xp = guard
    assert xp.exp.__name__ == "exp" and float(xp.exp(xp.zeros(()))) == 1.0
    with pytest.raises(AttributeError, match="CuPy lacks it"):
        xp.frompyfunc
    with pytest.raises(AttributeError, match="NumPy-only"):
        xp.ones(3).resize((4,))
    with pytest.raises(AttributeError, match="CuPy lacks it"):
        xp.linalg.multi_dot


def test_guard_refuses_implicit_host_conversion(guard):
    xp = guard
    a = xp.ones((2, 3))
    for host_use in (np.asarray, np.array, lambda v: np.testing.assert_allclose(v, 1.0),
                     lambda v: np.asarray([v[0], v[1]])):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
            host_use(a)
    # NumPy functions that CuPy has dispatch to the device, as with CuPy's arrays
    assert isinstance(np.exp(a), xp.ndarray) and np.concatenate([a, a]).shape == (4, 3)
    assert backend.is_array(a) and not isinstance(a, np.ndarray)
    assert np.array_equal(backend.to_numpy(a), np.ones((2, 3)))   # the explicit way
    assert np.array_equal(tl.tensor(a).numpy(), np.ones((2, 3)))


def test_guard_refuses_host_arrays_in_device_work(guard):
    xp = guard
    a, host = xp.ones(3), np.ones(3)
    for mixed in (lambda: a + host, lambda: host * a, lambda: xp.where(a > 0, host, a),
                  lambda: xp.maximum(a, host), lambda: xp.concatenate([a, host])):
        with pytest.raises(TypeError, match="host numpy.ndarray"):
            mixed()
    with pytest.raises(TypeError, match="host numpy.ndarray"):
        a[...] = host
    a[...] = 2.0                                  # scalars are fine
    d = xp.asarray(host)                          # the explicit copy to the device
    host[0] = 5.0
    assert float(d[0]) == 1.0                     # a copy, never a shared buffer
    a[xp.asarray([0, 2])] = host[:2]              # CuPy copies host values of a fancy index
    assert a.get().tolist() == [5.0, 2.0, 1.0]


def test_guard_arrays_have_cupy_scalars_and_conversions(guard):
    xp = guard
    s = xp.arange(4.0).sum()
    assert isinstance(s, xp.ndarray) and s.shape == ()           # a 0-d array, not np.float64
    assert isinstance(xp.ones(3)[1], xp.ndarray)
    with pytest.raises(TypeError, match="only 0-dimensional"):
        float(xp.ones(1))


def test_guard_catches_host_syncs(guard):
    xp = guard
    a = xp.arange(6.0)
    syncing = {"item": lambda: a.sum().item(), "float": lambda: float(a.sum()),
               "bool": lambda: bool(a.sum() > 0), "to_numpy": lambda: backend.to_numpy(a),
               "tolist": lambda: a.tolist(), "mask": lambda: a[a > 2],
               "nonzero": lambda: xp.nonzero(a), "repr": lambda: repr(a)}
    with backend.no_host_sync():
        b = (a * 2).sum(axis=0, keepdims=True)   # device work is fine
        for name, fn in syncing.items():
            with pytest.raises(backend.HostSyncError, match="GPU sync"):
                fn()
    assert float(b[0]) == 30.0                   # outside the block, reading is allowed


def test_a_planted_host_side_dropout_mask_is_caught(guard, monkeypatch):
    """The bug this backend once had: after set_device("cuda") the dropout stream stayed a
    NumPy one, so masks were host arrays; CuPy then fails on x * mask. On the CPU it passes
    unnoticed; the guard fails it here like the GPU would."""
    x = tl.randn(4, 5, requires_grad=True)
    F.dropout(x, 0.5).sum().backward()           # the real mask is drawn on the device
    host_rng = np.random.default_rng(0)
    monkeypatch.setattr(backend, "dropout_mask",
                        lambda shape, p, dtype=None: (host_rng.random(shape) >= p).astype(dtype)
                        / (1 - p))
    with pytest.raises(TypeError, match="host numpy.ndarray"):
        F.dropout(x, 0.5)


def test_a_planted_per_step_sync_is_caught(guard):
    """A loss read every step (float(loss) in the loop) stalls a GPU: the guard names it."""
    model, opt, x, y = _setup("full")
    _step(model, opt, x, y)
    with pytest.raises(backend.HostSyncError, match=r"float\(array\)"):
        with backend.no_host_sync():
            _, loss = model(x, y)
            print(f"loss {float(loss.data):.3f}")


def _setup(kind: str):
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32,
                          dropout=0.1))
    if kind == "qlora":
        quant.quantize_model(model, print_fn=None)
    if kind != "full":
        lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                           target_modules=["c_attn", "c_fc"],
                                           use_dora=kind == "dora"))
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, 65, (4, 16)) for _ in range(2))
    return model, opt, x, y


def _step(model, opt, x, y):
    _, loss = model(x, y)
    loss.backward()
    grad_norm([p for p in model.parameters() if p.grad is not None])
    opt.step()
    opt.zero_grad()
    return loss


@pytest.fixture(params=["guard", pytest.param("cuda", marks=pytest.mark.skipif(
    not _gpu_available(), reason="no GPU: cupy.is_available() is False"))])
def device(request):
    """device "guard", and "cuda" where there is a GPU (CuPy's own sync detector checks it)."""
    before = backend.get_device()
    backend.set_device(request.param)
    try:
        if request.param == "cuda":
            with pytest.raises(backend.HostSyncError), backend.no_host_sync():
                backend.xp.ones(3).get()
    except pytest.fail.Exception:
        backend.set_device(before)
        pytest.skip("this CuPy's sync detector (cupyx.allow_synchronize) detects nothing")
    try:
        yield request.param
    finally:
        backend.set_device(before)


@pytest.mark.parametrize("kind", ["full", "lora", "qlora", "dora"])
def test_a_training_step_makes_no_host_sync(device, kind):
    # the embedding / cross-entropy id checks read ids on the CPU only: backend.on_device()
    # is true under the guard as on a GPU, so they take the device branch here
    assert backend.on_device()
    model, opt, x, y = _setup(kind)
    _step(model, opt, x, y)                      # first use: QLoRA reads its state JSON once
    with backend.no_host_sync():
        loss = _step(model, opt, x, y)
        with tl.no_grad():
            model.eval()
            model(x, y)
            model.train()
    assert np.isfinite(loss.item())


def test_trainer_reads_the_device_only_at_log_time(guard):
    from tinylora import guard as g
    from tinylora.train import TrainConfig, Trainer
    tl.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, 65, 4000)
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16))
    cfg = TrainConfig(max_iters=12, batch_size=4, log_interval=4, eval_interval=0,
                      warmup_iters=2, progress=False)
    trainer = Trainer(model, (tokens[:3000], tokens[3000:]), cfg)
    before = g.sync_count()
    result = trainer.train()
    assert sorted(result.losses) == list(range(1, 13))
    assert g.sync_count() - before == 3          # one read at steps 4, 8 and 12: not one per step


def test_engine_suite_passes_under_the_guard():
    env = dict(os.environ, TINYLORA_DEVICE="guard")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *GUARDED],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_tokenizers_decode_ids_that_live_on_the_device(guard):
    # generate() returns device arrays; np.asarray of one raises on CuPy (as under the guard)
    from tinylora.data import CharTokenizer
    from tinylora.data.gpt2_bpe import GPT2Tokenizer
    char = CharTokenizer.builtin()
    ids = char.encode("def f(x):")
    assert char.decode(backend.xp.asarray(ids)) == "def f(x):"
    bpe = GPT2Tokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "gpt2_bpe")
    ids = bpe.encode("hello world")
    assert bpe.decode(tl.tensor(backend.xp.asarray(ids))) == "hello world"
