"""tinylora's adapters load in PEFT, PEFT's load in tinylora, and a merged GPT-2 folder loads
in transformers, each with the same outputs (float32, atol 1e-5)."""
import numpy as np
import peft
import pytest
import torch
import transformers

import tinylora as tl
from tinylora import lora
from tinylora.backend import to_numpy
from tinylora.models import GPT

from conftest import BPE, GPT2_TINY, numpy_of, randomize_adapters

ATOL = 1e-5
IDS = np.random.default_rng(7).integers(0, 61, (3, 14))


def _ours(model, ids=IDS):
    model.eval()
    with tl.no_grad():
        return to_numpy(model(ids)[0].data)


def _hf_gpt2(folder=GPT2_TINY):
    return transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()


def _theirs(model, ids=IDS):
    with torch.no_grad():
        return numpy_of(model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64))).logits)


GPT2_CONFIGS = {
    "attn+mlp": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                     fan_in_fan_out=True),
    "rslora, lora_only biases": dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"],
                                     use_rslora=True, bias="lora_only", fan_in_fan_out=True),
    "all-linear, all biases": dict(r=2, lora_alpha=4, target_modules="all-linear", bias="all"),
}


@pytest.mark.parametrize("name", list(GPT2_CONFIGS))
def test_tinylora_gpt2_adapter_loads_in_peft(name, tmp_path):
    g = GPT.from_hf(GPT2_TINY)
    base = _ours(g)
    lora.inject(g, lora.LoraConfig(**GPT2_CONFIGS[name]))
    randomize_adapters(g, seed=1)
    ours = _ours(g)
    assert np.abs(ours - base).max() > 1e-2                     # the adapter matters
    lora.save_adapter(g, tmp_path)

    pm = peft.PeftModel.from_pretrained(_hf_gpt2(), tmp_path).eval()
    np.testing.assert_allclose(_theirs(pm), ours, atol=ATOL, rtol=0)
    with pm.disable_adapter():
        if GPT2_CONFIGS[name].get("bias", "none") == "none":   # PEFT's biases stay when disabled
            np.testing.assert_allclose(_theirs(pm), base, atol=ATOL, rtol=0)


def test_peft_gpt2_adapter_with_biases_loads_in_tinylora(tmp_path):
    hf = _hf_gpt2()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                 fan_in_fan_out=True, bias="lora_only"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp_path)
    keys = peft.utils.load_peft_weights(str(tmp_path)).keys()
    assert any(k.endswith("c_attn.base_layer.bias") for k in keys)     # PEFT writes these
    theirs = _theirs(pm.eval())

    g = GPT.from_hf(GPT2_TINY)
    lora.load_adapter(g, tmp_path)
    np.testing.assert_allclose(_ours(g), theirs, atol=ATOL, rtol=0)


def test_tinylora_minilm_adapter_loads_in_peft(tmp_path):
    from tinylora.io import load_safetensors
    from tinylora.models.bert import BertModel
    from tinylora.models.hub import find_minilm
    folder = find_minilm()
    ref, _ = load_safetensors(GPT2_TINY.parent / "minilm" / "peft_reference.safetensors")
    ids, mask, tt = ref["input_ids"], ref["attention_mask"], ref["token_type_ids"]

    bert = BertModel.from_pretrained(folder)
    lora.inject(bert, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"]))
    randomize_adapters(bert, seed=2, std=0.05)
    with tl.no_grad():
        ours = to_numpy(bert(ids, mask, tt).data)
    lora.save_adapter(bert, tmp_path)

    hf = transformers.BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        before = numpy_of(hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             token_type_ids=torch.from_numpy(tt)).last_hidden_state)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        theirs = numpy_of(pm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             token_type_ids=torch.from_numpy(tt)).last_hidden_state)
    assert np.abs(theirs - before).max() > 1e-2                  # PEFT applied the adapter
    real = mask.astype(bool)                                       # padded rows are not outputs
    np.testing.assert_allclose(theirs[real], ours[real], atol=ATOL, rtol=0)


def test_merged_gpt2_folder_loads_in_transformers(tmp_path):
    g = GPT.from_hf(GPT2_TINY)
    lora.inject(g, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                   fan_in_fan_out=True))
    randomize_adapters(g, seed=3)
    lora.save_adapter(g, tmp_path / "adapter")
    lora.merge_and_unload(g)
    merged = _ours(g)
    g.save_hf(tmp_path / "merged")

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert isinstance(hf, transformers.GPT2LMHeadModel)
    np.testing.assert_allclose(_theirs(hf), merged, atol=ATOL, rtol=0)
    # and PEFT's own merge of the same adapter gives the same weights as our file
    pm = peft.PeftModel.from_pretrained(_hf_gpt2(), tmp_path / "adapter").merge_and_unload()
    ref = pm.state_dict()
    for k, v in hf.state_dict().items():
        np.testing.assert_allclose(numpy_of(v), numpy_of(ref[k]), atol=1e-6, rtol=0, err_msg=k)


def test_cli_merge_hf_out_of_a_pretrained_finetune_loads_in_transformers(tmp_path, capsys):
    """finetune --pretrained (a GPT-2 BPE folder) -> merge --hf-out -> transformers."""
    from tinylora.cli import main
    from tinylora.apps.finetune import load_finetuned
    from tinylora.models import GPTConfig
    from tinylora.data.gpt2_bpe import GPT2Tokenizer
    tok = GPT2Tokenizer.from_pretrained(BPE)
    tl.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2,
                  n_embd=16)).save_hf(tmp_path / "base", tok)
    for argv in (["finetune", "--pretrained", tmp_path / "base", "--data", "builtin:python",
                  "--out", tmp_path / "ad", "--max-iters", 3, "--eval-interval", 3,
                  "--eval-iters", 1, "--batch-size", 2, "--lora-r", 2, "--lr", 0.05,
                  "--no-progress"],
                 ["merge", "--adapter", tmp_path / "ad", "--out", tmp_path / "m",
                  "--hf-out", tmp_path / "hf"]):
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    adapted, _, _ = load_finetuned(tmp_path / "ad")
    ids = tok.encode("def add(a, b):\n    return a + b\n")[None, :24]
    want = _ours(adapted, ids)
    assert np.abs(want - _ours(GPT.from_hf(tmp_path / "base"), ids)).max() > 1e-4   # it trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(_theirs(hf, ids), want, atol=ATOL, rtol=0)
    text = "def add(a, b):\n    return a + b  # café"
    theirs_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")   # vocab + merges
    assert theirs_tok(text)["input_ids"] == tok.encode(text).tolist()
    # the adapter itself, on the base folder, in PEFT
    pm = peft.PeftModel.from_pretrained(_hf_gpt2(tmp_path / "base"), tmp_path / "ad").eval()
    np.testing.assert_allclose(_theirs(pm, ids), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind, weights", [("linear", [0.7, -0.4]), ("linear", [-1.5, 0.5]),
                                           ("cat", [0.7, -0.4])])
def test_add_weighted_adapter_matches_peft(kind, weights, tmp_path):
    g = GPT.from_hf(GPT2_TINY)
    for i, n in enumerate("ab"):
        lora.inject(g, lora.LoraConfig(r=2, lora_alpha=3 + i, target_modules=["c_attn", "c_proj"],
                                       fan_in_fan_out=True), n)
    randomize_adapters(g, seed=4)
    for n in "ab":
        lora.save_adapter(g, tmp_path / n, adapter_name=n)
    lora.add_weighted_adapter(g, ["a", "b"], weights, "mix", combination_type=kind)
    lora.set_adapter(g, "mix")
    ours = _ours(g)

    pm = peft.PeftModel.from_pretrained(_hf_gpt2(), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=kind)
    pm.set_adapter("mix")
    np.testing.assert_allclose(_theirs(pm.eval()), ours, atol=ATOL, rtol=0)

