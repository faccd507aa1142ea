"""examples/00_lora_from_scratch.py computes exactly what the package computes.

The one-file version is what readers study first; these checks make it a trustworthy
reference: the same loss and gradients (full and LoRA), the same AdamW trajectory, the same
NF4 bytes, and an adapter file the package loads. (Its --quick run is in test_examples.py.)
"""
import ast
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import tinylora as tl
from tinylora import lora, quant
from tinylora.models import GPT, GPTConfig
from tinylora.optim import AdamW

PATH = Path(__file__).resolve().parents[1] / "examples" / "00_lora_from_scratch.py"
CFG = dict(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)
TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(scope="module")
def one():
    spec = importlib.util.spec_from_file_location("lora_from_scratch", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up here
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    return mod


def lib_gpt(dtype, seed=0):
    tl.manual_seed(seed)
    with tl.default_dtype(dtype):
        return GPT(GPTConfig(**CFG))


def file_gpt(one, lib, dtype):
    """The one-file GPT holding the library model's weights (moved by name)."""
    model = one.GPT(one.GPTConfig(**CFG), seed=99, dtype=dtype)
    model.load_state_dict({k: t.numpy() for k, t in lib.state_dict().items()})
    return model


def batch(seed, B=3, T=CFG["block_size"]):
    ids = np.random.default_rng(seed).integers(0, CFG["vocab_size"], (B, T + 1))
    return ids[:, :-1], ids[:, 1:]


def lib_name(name):
    """A LoRA tensor's name in the package (PEFT's, with the adapter name) from the file's."""
    return name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")


def rel(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-300)


def test_imports_only_numpy_and_the_standard_library():
    tree = ast.parse(PATH.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            roots.add(node.module.split(".")[0])
    assert "numpy" in roots
    assert roots - {"numpy"} <= set(sys.stdlib_module_names), roots - {"numpy"}


def test_the_file_is_one_readable_file():
    text = PATH.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 625      # readable in an evening (~600; bitsandbytes-exact rounding)
    for title in ("1. Tensor and autograd", "2. Gradient check", "3. A tiny GPT",
                  "4. Training with AdamW", "5. LoRA", "6. QLoRA", "7. The adapter file",
                  "8. Full vs LoRA vs QLoRA"):
        assert f"# %% {title}\n" in text, title


@pytest.mark.parametrize("with_lora", [False, True], ids=["full", "lora"])
def test_same_loss_and_gradients_in_float64(one, with_lora):
    lib = lib_gpt(tl.float64)
    model = file_gpt(one, lib, np.float64)
    if with_lora:   # B random too (init_lora_weights=False), so every gradient is non-zero
        lora.inject(lib, lora.LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS,
                                         init_lora_weights=False))
        one.add_lora(model, r=3, alpha=6)
        ours = model.named_parameters()
        theirs = dict(lib.named_parameters())
        for k, t in ours.items():
            if "lora_" in k:
                t.data = theirs[lib_name(k)].numpy().copy()
    x, y = batch(1)
    _, loss = lib(x, y)
    loss.backward()
    _, our_loss = model(x, y)
    our_loss.backward()
    assert rel(our_loss.data, loss.item()) < 1e-10
    theirs = dict(lib.named_parameters())
    trainable = {k: t for k, t in model.named_parameters().items() if t.requires_grad}
    assert len(trainable) == (16 if with_lora else 28)   # 2 layers x 4 linears x (A, B), or all
    for k, t in trainable.items():
        g = theirs[lib_name(k)].grad
        assert g is not None, k
        assert rel(t.grad, g.numpy()) < 1e-10, k
    for k, t in model.named_parameters().items():      # frozen: no gradient formed at all
        if not t.requires_grad:
            assert t.grad is None, k


@pytest.mark.parametrize("with_lora", [False, True], ids=["full", "lora"])
def test_twenty_adamw_steps_give_the_same_losses(one, with_lora):
    lib = lib_gpt(tl.float64, seed=3)
    model = file_gpt(one, lib, np.float64)
    if with_lora:
        lora.inject(lib, lora.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
        one.add_lora(model, r=2, alpha=4)
        theirs = dict(lib.named_parameters())
        for k, t in model.named_parameters().items():
            if "lora_" in k:
                t.data = theirs[lib_name(k)].numpy().copy()
    params = [p for p in lib.parameters() if p.requires_grad]
    opt_lib = AdamW(params, lr=3e-2, weight_decay=0.1)
    opt_one = one.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    ours, theirs = [], []
    for step in range(20):
        x, y = batch(100 + step % 2)          # two batches: the loss must fall
        _, loss = lib(x, y)
        opt_lib.zero_grad()
        loss.backward()
        opt_lib.step()
        theirs.append(loss.item())
        _, loss = model(x, y)
        opt_one.zero_grad()
        loss.backward()
        opt_one.step()
        ours.append(float(loss.data))
    assert theirs[-1] < theirs[0] - 0.1          # it trained
    np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=0)


@pytest.mark.parametrize("shape", [(64, 64), (121, 161), (3, 70)])
def test_nf4_bytes_and_state_equal_the_package(one, shape):
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 2.0, (shape[0], 1))).astype(np.float32)
    w.reshape(-1)[:64] = 0.0                     # an all-zero block
    w.reshape(-1)[100] = 5.0                     # an outlier
    packed, st = one.nf4_quantize(w)
    ref_packed, ref = quant.nf4_quantize(w, blocksize=64, double_quant=True)
    ref_packed = tl.backend.to_numpy(ref_packed)
    assert packed.dtype == np.uint8 and packed.tobytes() == ref_packed.tobytes()
    for name in ("absmax", "nested_absmax", "quant_map", "nested_quant_map"):
        ours, theirs = np.asarray(st[name]), tl.backend.to_numpy(getattr(ref, name))
        assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes(), name
    assert np.float32(st["offset"]).tobytes() == np.float32(ref.offset).tobytes()
    assert st["blocksize"] == ref.blocksize and tuple(st["shape"]) == ref.shape
    deq = tl.backend.to_numpy(quant.nf4_dequantize(ref_packed, ref))
    assert one.nf4_dequantize(packed, st).tobytes() == deq.tobytes()


def test_adapter_file_loads_into_the_package_with_the_same_logits(one, tmp_path):
    lib = lib_gpt(tl.float32, seed=4)
    model = file_gpt(one, lib, np.float32)
    one.add_lora(model, r=4, alpha=8, seed=1)
    x, y = batch(7)
    one.train(model, np.random.default_rng(0).integers(0, CFG["vocab_size"], 500), steps=3,
              lr=1e-2, batch_size=4)                       # so that B is no longer zero
    assert all(np.abs(m.lora_B.data).max() > 0 for m in model.modules.values()
               if isinstance(m, one.LoRALinear))
    one.save_adapter(model, tmp_path / "adapter", r=4, alpha=8)
    cfg = lora.load_adapter(lib, tmp_path / "adapter")
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules) == (4, 8, TARGETS)
    lib.eval()
    with tl.no_grad():
        theirs = lib(x)[0].numpy()
    ours = model(x)[0].data
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    lora.merge(lib)                                         # and merged, as the file merges
    with tl.no_grad():
        np.testing.assert_allclose(one.merged(model)(x)[0].data, lib(x)[0].numpy(),
                                   rtol=1e-5, atol=1e-5)
