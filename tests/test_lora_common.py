"""Small models and helpers shared by the LoRA tests (plus sanity checks of the helpers).

Toy: an embedding, two blocks with attention-like (q, v) and MLP (fc, proj) Linear layers
and LayerNorms, an LM head tied to the embedding and a classifier head: every kind of
layer LoRA meets, in a few hundred parameters.
"""
import contextlib
import pathlib

import numpy as np

import tinylora as tl
from tinylora import lora, nn
from tinylora.models import GPT, GPTConfig

VOCAB, DIM, N_CLS = 13, 8, 3
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
GPT2_TINY = FIXTURES / "gpt2_tiny"


class ToyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"q": nn.Linear(d, d), "v": nn.Linear(d, d)})
        self.mlp = nn.ModuleDict({"fc": nn.Linear(d, 2 * d), "proj": nn.Linear(2 * d, d)})

    def forward(self, x):
        h = self.ln(x)
        x = x + self.attn["q"](h).tanh() * self.attn["v"](h)
        return x + self.mlp["proj"](self.mlp["fc"](h).gelu())


class Toy(nn.Module):
    """ids (B, T) -> (logits (B, T, VOCAB), class scores (B, N_CLS))."""

    def __init__(self, n_layer=2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([ToyBlock(DIM) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.emb.weight
        self.classifier = nn.Linear(DIM, N_CLS)

    def forward(self, idx, adapter_names=None):
        ctx = nn.adapter_routing(adapter_names) if adapter_names is not None else contextlib.nullcontext()
        with ctx:
            x = self.emb(idx)
            for b in self.blocks:
                x = b(x)
            x = self.ln_f(x)
            return self.lm_head(x), self.classifier(x.mean(dim=1))


def toy(seed=0, dtype=None):
    tl.manual_seed(seed)
    if dtype is None:
        return Toy()
    with tl.default_dtype(dtype):
        return Toy()


def tiny_gpt(seed=0, dtype=None, n_layer=2):
    tl.manual_seed(seed)
    cfg = GPTConfig(vocab_size=VOCAB, block_size=8, n_layer=n_layer, n_head=2, n_embd=DIM)
    if dtype is None:
        return GPT(cfg)
    with tl.default_dtype(dtype):
        return GPT(cfg)


def ids(batch=3, T=5, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, T))


def snapshot(model):
    """Everything a failed operation must leave alone: module structure, every tensor's
    values and requires_grad flag, the adapter registry and the random streams."""
    return {
        "modules": [(p, type(m).__name__) for p, m in model.named_modules()],
        "tensors": {k: (t.numpy().copy(), t.requires_grad) for k, t in model.state_dict().items()},
        "registry": dict(getattr(model, "peft_config", {})),
        "rng": repr(tl.backend.get_rng_state()),
    }


def assert_same_snapshot(a, b):
    assert a["modules"] == b["modules"]
    assert a["registry"] == b["registry"]
    assert a["rng"] == b["rng"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        (x, gx), (y, gy) = a["tensors"][k], b["tensors"][k]
        assert gx == gy, k
        np.testing.assert_array_equal(x, y, err_msg=k)


def nonzero_adapter(model, adapter_name="default", **kw):
    """Inject with init_lora_weights=False so the adapter changes outputs from the start."""
    return lora.inject(model, lora.LoraConfig(init_lora_weights=False, **kw), adapter_name)


# ----------------------------------------------------------------------------- sanity

def test_toy_model_runs_and_is_tied():
    m = toy()
    logits, cls = m(ids())
    assert logits.shape == (3, 5, VOCAB) and cls.shape == (3, N_CLS)
    assert m.lm_head.weight is m.emb.weight


def test_snapshot_sees_a_change():
    m = toy()
    s = snapshot(m)
    with tl.no_grad():
        m.blocks[0].attn["q"].weight.data[0, 0] += 1
    try:
        assert_same_snapshot(s, snapshot(m))
    except AssertionError:
        return
    raise AssertionError("snapshot missed a weight change")
