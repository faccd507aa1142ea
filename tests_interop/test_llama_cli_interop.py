"""`tinylora finetune` then `tinylora merge` on a Llama folder: transformers loads the merged
folder with the logits of tinylora's base + adapter, and PEFT loads the adapter the CLI
wrote onto transformers' base with the same logits."""
import json
import shutil

import numpy as np
import peft
import pytest
import torch
import transformers

import tinylora as tl
from tinylora.apps.finetune import load_finetuned
from tinylora.backend import to_numpy
from tinylora.cli import main
from tinylora.models import BPETokenizer, Llama, LlamaConfig

from conftest import FIXTURES, numpy_of

TOKENIZER = FIXTURES / "llama" / "bpe" / "smollm.json"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_cli_adapter_and_merged_folder_load_in_transformers(method, tmp_path, capsys):
    tok = BPETokenizer.from_file(TOKENIZER)
    tl.manual_seed(0)
    Llama(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, initializer_range=0.2)).save_pretrained(tmp_path / "base")
    shutil.copy(TOKENIZER, tmp_path / "base" / "tokenizer.json")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say {w}.", "response": f"{w} {w}"})
                              for w in ("cat", "dog", "sun")) + "\n")
    argv = ["finetune", "--pretrained", tmp_path / "base", "--data", data, "--target-modules",
            "all-linear", "--max-iters", "5", "--batch-size", "3", "--lr", "3e-2",
            "--out", tmp_path / "adapter", "--no-progress"] + (["--qlora"] if method == "qlora" else [])
    assert main([str(a) for a in argv]) == 0
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0

    ids = np.random.default_rng(3).integers(0, tok.vocab_size, (2, 12))
    ours, _, _ = load_finetuned(tmp_path / "adapter")
    with tl.no_grad():
        want = to_numpy(ours.eval()(ids)[0].data)
    x = torch.from_numpy(ids.astype(np.int64))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        assert np.abs(numpy_of(merged(input_ids=x).logits) - want).max() < 1e-4
        # greedy decoding of the merged folder: transformers' tokens are the CLI's
        prompt = tok.encode("Say cat.")
        theirs = merged.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10,
                                 min_new_tokens=10, pad_token_id=0)[0].tolist()
    capsys.readouterr()
    assert main(["generate", "--pretrained", str(tmp_path / "merged"), "--prompt", "Say cat.",
                 "--temperature", "0", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(theirs)
    if method == "lora":   # PEFT over transformers' float base: the adapter as trained
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                                 dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        with torch.no_grad():
            assert np.abs(numpy_of(model(input_ids=x).logits) - want).max() < 1e-4
