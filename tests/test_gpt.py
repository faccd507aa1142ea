"""GPT: gradients end to end, KV-cache decoding, errors, GPT-2 names and init, HF loading."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tinylora as tl
from tinylora import nn
from tinylora.io import FormatError, load_safetensors, save_safetensors
from tinylora.models import GPT, GPTConfig
from tinylora.models.gpt import sample_logits
from tinylora.nn.attention import CausalSelfAttention

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2_tiny"
TINY = dict(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=8)


def ids(shape, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def test_gpt2_module_names_tying_and_init():
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    names = set(model.state_dict())
    for i in range(2):
        for n in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                  "attn.c_proj.weight", "ln_2.weight", "mlp.c_fc.weight", "mlp.c_proj.bias"):
            assert f"transformer.h.{i}.{n}" in names
    for n in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
              "lm_head.weight"):
        assert n in names
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in dict(model.named_parameters())       # listed once
    assert model.transformer.h[0].attn.c_attn.weight.shape == (96, 32)   # Linear: (out, in)
    h0 = model.transformer.h[0]
    assert np.all(h0.attn.c_attn.bias.numpy() == 0) and np.all(h0.ln_1.weight.numpy() == 1)
    assert np.std(h0.mlp.c_fc.weight.numpy()) == pytest.approx(0.02, rel=0.1)
    assert np.std(h0.mlp.c_proj.weight.numpy()) == pytest.approx(0.02 / 2, rel=0.1)  # 1/√(2·2)
    assert model.num_parameters() == sum(p.data.size for p in model.parameters())
    assert model.transformer.wte.weight.dtype == np.float32


def test_one_layer_gpt_passes_gradcheck_wrt_every_weight():
    with tl.default_dtype(tl.float64):
        tl.manual_seed(1)
        model = GPT(GPTConfig(**TINY))
    params = list(model.parameters())
    for p in params:   # GPT-2's tiny init makes most of the graph nearly linear; wake it up
        p.data[...] = tl.backend.asarray(np.random.default_rng(len(p.shape)).normal(0, 0.5, p.shape))
    x, y = ids((2, 6), 11, 1), ids((2, 6), 11, 2)
    tl.gradcheck(lambda *ps: model(x)[0], params, element_limit=64, n_directions=4)
    tl.gradcheck(lambda *ps: model(x, y)[1], params, element_limit=64, n_directions=4)


def test_attention_and_block_pass_gradcheck_with_a_padding_mask():
    with tl.default_dtype(tl.float64):
        tl.manual_seed(2)
        attn = CausalSelfAttention(8, 2)
        block = nn.Block(8, 2)
        x = tl.randn(2, 5, 8, requires_grad=True)
    mask = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]])
    tl.gradcheck(lambda x, *ps: attn(x), [x] + list(attn.parameters()))
    tl.gradcheck(lambda x, *ps: attn(x, attention_mask=mask), [x] + list(attn.parameters()))
    tl.gradcheck(lambda x, *ps: block(x, attention_mask=mask), [x] + list(block.parameters()),
                 element_limit=64)


def test_padding_mask_hides_keys():
    with tl.default_dtype(tl.float64):
        tl.manual_seed(3)
        attn = CausalSelfAttention(8, 2)
        x = tl.randn(1, 4, 8)
    with tl.no_grad():
        masked = attn(x, attention_mask=np.array([[1, 0, 1, 1]])).numpy()[0]
    # reference by hand: position 1 is invisible to every other query
    W, b = attn.c_attn.weight.numpy(), attn.c_attn.bias.numpy()
    qkv = x.numpy()[0] @ W.T + b
    q, k, v = np.split(qkv, 3, axis=1)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        s = q[:, sl] @ k[:, sl].T / 2.0
        allowed = np.tril(np.ones((4, 4), bool)) & np.array([True, False, True, True])
        s = np.where(allowed, s, -np.inf)
        p = np.exp(s - s.max(1, keepdims=True))
        heads.append((p / p.sum(1, keepdims=True)) @ v[:, sl])
    ref = np.concatenate(heads, 1) @ attn.c_proj.weight.numpy().T + attn.c_proj.bias.numpy()
    np.testing.assert_allclose(masked, ref, atol=1e-12)


def test_kv_cache_decoding_matches_full_recompute_at_every_step():
    with tl.default_dtype(tl.float64):
        tl.manual_seed(4)
        model = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16))
    prompt = ids((2, 3), 13, 5)
    # 9 new tokens: the cache fills at 8 positions, then decoding slides the window
    out, logits = model.generate(prompt, 9, temperature=0.0, output_logits=True)
    assert out.shape == (2, 12) and logits.shape == (2, 9, 13)
    for step in range(9):
        context = out[:, :3 + step][:, -8:]
        with tl.no_grad():
            full, _ = model(context)
        np.testing.assert_allclose(logits[:, step], full.numpy()[:, -1], atol=1e-10)
    again = model.generate(prompt, 9, temperature=0.0, use_cache=False)
    assert np.array_equal(out, again)
    assert model.training  # generate restores the mode


def test_sampling_is_seeded_and_respects_top_k_top_p():
    with tl.default_dtype(tl.float64):
        tl.manual_seed(5)
        model = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=8))
    prompt = ids((3, 2), 13, 6)
    a = model.generate(prompt, 5, temperature=1.0, rng=np.random.default_rng(0))
    b = model.generate(prompt, 5, temperature=1.0, rng=np.random.default_rng(0))
    assert np.array_equal(a, b)
    logits = np.random.default_rng(1).normal(size=(64, 20))
    greedy = logits.argmax(-1)
    rng = np.random.default_rng(2)
    assert np.array_equal(sample_logits(logits, 0.0), greedy)
    assert np.array_equal(sample_logits(logits, 1.0, top_k=1, rng=rng), greedy)
    assert np.array_equal(sample_logits(logits, 1.0, top_p=1e-9, rng=rng), greedy)
    top3 = np.argsort(-logits, -1)[:, :3]
    draws = sample_logits(logits, 2.0, top_k=3, rng=rng)
    assert all(d in row for d, row in zip(draws, top3))
    # top_p: with probabilities .5/.3/.2, p=0.6 keeps the first two tokens only
    skewed = np.log(np.tile([0.5, 0.3, 0.2], (500, 1)))
    draws = sample_logits(skewed, 1.0, top_p=0.6, rng=rng)
    assert set(draws.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)


def test_clear_errors_for_bad_inputs():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match=r"longer than block_size=6; crop it.*idx\[:, -6:\]"):
        model(ids((1, 7), 11))
    with pytest.raises(IndexError, match="token id 11 is out of range for vocab_size=11"):
        model(np.array([[1, 11]]))
    with pytest.raises(IndexError, match="token id -1"):
        model(np.array([[-1, 2]]))
    with pytest.raises(TypeError, match="integer token ids, got dtype float32"):
        model(tl.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"add a batch axis"):
        model(np.array([1, 2]))
    with pytest.raises(ValueError, match="adapter_names has 1 names but the batch has 2 rows"):
        model(ids((2, 3), 11), adapter_names=["a"])
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=3, n_embd=8)


def test_adapter_names_set_the_routing_for_the_forward():
    model = GPT(GPTConfig(**TINY))
    seen = []

    class Probe(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            seen.append(nn.current_routing())
            return self.inner(x)

    model.transformer["ln_f"] = Probe(model.transformer.ln_f)
    model(ids((2, 3), 11), adapter_names=["a", nn.BASE])
    model(ids((2, 3), 11))
    assert seen == [("a", nn.BASE), None]


def test_overfits_one_batch():
    tl.manual_seed(6)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=32))
    opt = tl.optim.AdamW.from_model(model, lr=1e-2, weight_decay=0.0)
    x, y = ids((4, 8), 11, 7), ids((4, 8), 11, 8)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_crop_block_size():
    model = GPT(GPTConfig(**TINY))
    model.crop_block_size(4)
    assert model.transformer.wpe.weight.shape == (4, 8) and model.config.block_size == 4
    model(ids((1, 4), 11))
    with pytest.raises(ValueError, match="block_size=4"):
        model(ids((1, 5), 11))


# ----------------------------------------------------------------------------- Hugging Face

def test_from_hf_matches_the_reference_logits():
    ref, _ = load_safetensors(FIXTURE / "gpt2_reference.safetensors")
    x = ref["input_ids"]
    model = GPT.from_hf(FIXTURE)
    with tl.no_grad():
        logits, _ = model(x)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits.numpy(), ref["logits_f32"], atol=1e-5, rtol=0)
    with tl.default_dtype(tl.float64):
        model = GPT.from_hf(FIXTURE)
    with tl.no_grad():
        logits, loss = model(x)
        _, shifted = model(x[:, :-1], x[:, 1:])
    np.testing.assert_allclose(logits.numpy(), ref["logits_f64"], atol=1e-10, rtol=0)
    assert shifted.item() == pytest.approx(float(ref["loss_f64"]), abs=1e-6)  # HF's loss is f32
    assert model.lm_head.weight is model.transformer.wte.weight


def copy_fixture(tmp_path):
    dst = tmp_path / "gpt2"
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURE / name, dst / name)
    return dst


def test_from_hf_clear_errors(tmp_path):
    folder = copy_fixture(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    bad = dict(cfg, model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(bad))
    with pytest.raises(FormatError, match=r"config.json: model_type 'llama'"):
        GPT.from_hf(folder)
    (folder / "config.json").write_text(json.dumps(dict(cfg, activation_function="relu")))
    with pytest.raises(FormatError, match="activation_function='relu' is not supported"):
        GPT.from_hf(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors, _ = load_safetensors(folder / "model.safetensors")
    tensors["transformer.h.0.attn.bias"] = np.ones((1, 1, 16, 16), np.float32)  # old buffer: ignored
    save_safetensors(folder / "model.safetensors", tensors)
    GPT.from_hf(folder)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(FormatError,
                       match=r"model.safetensors: missing tensor\(s\) transformer.h.1.mlp.c_fc.bias"):
        GPT.from_hf(folder)
    tensors["transformer.h.1.mlp.c_fc.bias"] = np.zeros(128, np.float32)
    tensors["transformer.h.0.attn.c_attn.weight"] = np.zeros((96, 32), np.float32)  # not transposed
    save_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(FormatError, match=r"'transformer.h.0.attn.c_attn.weight' has shape "
                                          r"\(96, 32\), expected \(32, 96\)"):
        GPT.from_hf(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="never pickles"):
        GPT.from_hf(folder)


def test_residual_branch_gets_both_gradients():
    # x feeds the sum directly and through a branch: backward must wait for both paths
    x = tl.tensor(np.array([0.5, 1.0]), requires_grad=True)
    (x + x.tanh()).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 - np.tanh([0.5, 1.0]) ** 2, rtol=1e-6)
