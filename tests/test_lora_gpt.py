"""A whole LoRA-injected GPT against finite differences (float64): every adapter parameter,
through attention, MLP, embeddings and the tied head."""
import numpy as np

import tinylora as tl
from tinylora import lora

from test_lora_common import VOCAB, tiny_gpt


def test_gradcheck_gpt_wrt_every_lora_parameter():
    g = tiny_gpt(dtype=tl.float64, seed=5)
    lora.inject(g, lora.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                   target_modules=["c_attn", "c_proj", "c_fc", "wte", "wpe"]))
    g.eval()
    params = lora.trainable_parameters(g)
    assert len(params) == 2 * (2 * 4) + 2 * 2       # A and B of 8 linear layers and 2 embeddings
    x = np.random.default_rng(0).integers(0, VOCAB, (2, 6))
    report = tl.gradcheck(lambda *ps: g(x[:, :-1], x[:, 1:])[1], params)
    assert len(report.inputs) == len(params)


def test_gradcheck_gpt_dora_wrt_magnitudes():
    """With DoRA the norm is detached by design, so finite differences agree for the
    magnitudes (the norm does not depend on them); A and B are checked layer by layer in
    test_lora_layers.py with the norm held constant."""
    g = tiny_gpt(dtype=tl.float64, seed=6)
    lora.inject(g, lora.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], use_dora=True,
                                   init_lora_weights=False))
    g.eval()
    mags = [p for n, p in g.named_parameters() if "lora_magnitude_vector" in n]
    assert len(mags) == 4
    x = np.random.default_rng(1).integers(0, VOCAB, (2, 6))
    tl.gradcheck(lambda *ps: g(x[:, :-1], x[:, 1:])[1], mags)
