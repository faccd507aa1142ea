"""Llama / Qwen2: logits and greedy generations equal transformers' on checkpoints it wrote
(tests/fixtures/llama, made by make_llama_fixtures.py), the KV cache changes nothing, and the
whole model passes a float64 gradient check at a tiny size."""
import pathlib

import pytest

import tinylora as tl
from tinylora import backend
from tinylora.backend import np
from tinylora.io import load_safetensors
from tinylora.models import Llama, LlamaConfig

FIX = pathlib.Path(__file__).parent / "fixtures" / "llama"
FOLDERS = ["llama_gqa", "llama_sharded", "llama_bf16", "qwen2_tied", "llama3_rope", "llama_q4"]


def ref(name):
    return load_safetensors(FIX / name / "reference.safetensors")[0]


@pytest.fixture(scope="module", params=FOLDERS)
def loaded(request):
    return request.param, Llama.from_hf(FIX / request.param)


def test_logits_equal_transformers(loaded):
    name, model = loaded
    r = ref(name)
    with tl.no_grad():
        logits, _ = model.eval()(r["input_ids"])
    assert logits.dtype == np.float32
    gap = np.abs(backend.to_numpy(logits.data) - r["logits"]).max()
    assert gap < 1e-4, (name, gap)


def test_greedy_generation_equals_transformers(loaded):
    name, model = loaded
    r = ref(name)
    prompt = r["generated"][:, :5]
    out = model.generate(prompt, r["generated"].shape[1] - 5, temperature=0)
    assert out.tolist() == r["generated"].tolist(), name
    assert model.generate(prompt, 6, temperature=0, use_cache=False).tolist() == \
        r["generated"][:, :11].tolist()


def test_what_the_loader_built():
    q = Llama.from_hf(FIX / "qwen2_tied")
    assert q.lm_head.weight is q.model.embed_tokens.weight
    attn = q.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    assert q.config.rope_theta == 1e6 and q.config.model_type == "qwen2"
    m = Llama.from_hf(FIX / "llama_gqa")
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert (m.config.num_attention_heads, m.config.num_key_value_heads) == (4, 2)
    r = Llama.from_hf(FIX / "llama3_rope").config.rope_scaling
    assert r["rope_type"] == "llama3" and r["factor"] == 8.0
    names = dict(m.named_parameters())
    for key in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight",
                "model.layers.0.mlp.gate_proj.weight", "model.layers.0.input_layernorm.weight",
                "model.layers.0.post_attention_layernorm.weight", "model.norm.weight",
                "lm_head.weight"):
        assert key in names


def tiny(**kw):
    cfg = dict(vocab_size=23, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24)
    cfg.update(kw)
    backend.manual_seed(0)
    return Llama(LlamaConfig(**cfg))


@pytest.mark.parametrize("kw", [{}, {"model_type": "qwen2", "attention_bias": True,
                                      "tie_word_embeddings": True}])
def test_cache_equals_no_cache(kw):
    m = tiny(**kw)
    idx = np.random.default_rng(1).integers(0, 23, (3, 4))
    a, la = m.generate(idx, 8, temperature=0, output_logits=True)
    b, lb = m.generate(idx, 8, temperature=0, output_logits=True, use_cache=False)
    assert a.tolist() == b.tolist()
    assert np.abs(la - lb).max() < 1e-5
    with tl.no_grad():   # prefill in two pieces = one pass over the whole sequence
        full, _ = m(idx)
        cache = m.make_cache(3)
        m(idx[:, :2], kv_cache=cache)
        tail, _ = m(idx[:, 2:], kv_cache=cache)
    assert np.abs(backend.to_numpy(tail.data) - backend.to_numpy(full.data[:, 2:])).max() < 1e-5


def test_sampling_and_window():
    m = tiny()
    idx = np.array([[1, 2, 3]])
    out = m.generate(idx, 30, temperature=0.8, top_k=5, top_p=0.9, rng=np.random.default_rng(0))
    assert out.shape == (1, 33) and out[:, :3].tolist() == [[1, 2, 3]]  # past max positions: slides
    stop = m.generate(idx, 10, temperature=0, eos_token_id=int(m.generate(idx, 1, temperature=0)[0, -1]))
    assert stop.shape == (1, 4)


def test_whole_model_gradcheck_float64():
    """Every weight of a 2-layer GQA Qwen2-style model (biases, tied head, llama3 RoPE)."""
    with backend.default_dtype("float64"):
        m = tiny(hidden_size=8, intermediate_size=12, vocab_size=11, attention_bias=True,
                 model_type="qwen2", tie_word_embeddings=True,
                 rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 2.0, "original_max_position_embeddings": 8})
    params = list(m.parameters())
    rng = np.random.default_rng(3)
    for p in params:   # a random, non-trivial point (norm weights near one)
        base = 1.0 if p.ndim == 1 and p.shape[0] == 8 else 0.0
        p.data[...] = backend.asarray(base + rng.normal(0, 0.5, p.shape))
    x, y = rng.integers(0, 11, (2, 5)), rng.integers(0, 11, (2, 5))
    tl.gradcheck(lambda *ps: m(x)[0], params, element_limit=64, n_directions=4)
    tl.gradcheck(lambda *ps: m(x, y)[1], params, element_limit=64, n_directions=4)


@pytest.mark.parametrize("bad,msg", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type='yarn'"),
    (dict(model_type="mistral"), "model_type"),
])
def test_config_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**bad)


def test_bad_ids():
    m = tiny()
    with pytest.raises(ValueError, match="max_position_embeddings=24"):
        m(np.zeros((1, 25), dtype=np.int64))
    with pytest.raises(IndexError, match="vocab_size=23"):
        m(np.array([[23]]))
