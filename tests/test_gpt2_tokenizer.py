"""GPT-2's byte-level BPE against Hugging Face's ids, and fine-tuning a Hugging Face GPT-2
folder with `tinylora finetune --pretrained`."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tinylora as tl
from tinylora.cli import main
from tinylora.io import save_safetensors
from tinylora.models import GPT, GPTConfig
from tinylora.data.gpt2_bpe import GPT2Tokenizer, bytes_to_unicode, pretokenize

FIX = Path(__file__).resolve().parent / "fixtures" / "gpt2_bpe"
CASES = json.loads((FIX / "cases.json").read_text(encoding="utf-8"))["cases"]


@pytest.fixture(scope="module")
def tok():
    return GPT2Tokenizer.from_pretrained(FIX)


@pytest.mark.parametrize("case", CASES, ids=[repr(c["text"][:24]) for c in CASES])
def test_ids_match_hugging_face(tok, case):
    ids = tok.encode(case["text"])
    assert ids.tolist() == case["ids"]
    assert tok.decode(ids) == case["text"]


def test_pretokenize_follows_gpt2s_pattern():
    assert pretokenize("I'm here  now\n\nok") == ["I", "'m", " here", " ", " now", "\n", "\n", "ok"]
    assert pretokenize("x² = ½!!  ") == ["x", "²", " =", " ½", "!!", "  "]
    assert pretokenize("def f(x):") == ["def", " f", "(", "x", "):"]


def test_byte_map_is_a_bijection():
    m = bytes_to_unicode()
    assert sorted(m) == list(range(256)) and len(set(m.values())) == 256


def test_round_trip_through_a_dict(tok):
    again = GPT2Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    text = "def resume(self):\n    return 42  # ok"
    assert again.encode(text).tolist() == tok.encode(text).tolist()


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        (tmp_path / "vocab.json").write_text("{}")
        GPT2Tokenizer.from_pretrained(tmp_path)


def _hf_folder(folder: Path, vocab_size: int) -> Path:
    """A tiny Hugging Face GPT-2 folder: config.json, model.safetensors (Conv1D weights
    stored (in, out), lm_head left out as HF writes it), and the fixture's tokenizer."""
    folder.mkdir()
    tl.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg)
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    tensors = {k: (np.ascontiguousarray(v.T) if k.endswith(conv1d) else v)
               for k, v in model.weights_to_save().items()}
    save_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab_size,
        "n_positions": 16, "n_layer": 1, "n_head": 2, "n_embd": 16,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(FIX / name, folder / name)
    return folder


def test_finetune_a_pretrained_gpt2_folder(tmp_path, capsys):
    hf = _hf_folder(tmp_path / "gpt2", 512)
    common = ["--pretrained", str(hf), "--data", "builtin:python", "--max-iters", "2",
              "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2", "--json"]
    assert main(["finetune", *common, "--out", str(tmp_path / "lora")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "lora" and res["base"] == str(hf)
    assert main(["generate", "--adapter", str(tmp_path / "lora"), "--prompt", "def f",
                 "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def f")
    # a full fine-tune keeps the BPE tokenizer inside its own checkpoint
    assert main(["finetune", *common, "--full", "--out", str(tmp_path / "full")]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "full"), "--prompt", "import os",
                 "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("import os")


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, capsys):
    hf = _hf_folder(tmp_path / "gpt2", 300)
    assert main(["finetune", "--pretrained", str(hf), "--data", "builtin:python",
                 "--out", str(tmp_path / "x")]) == 1
    assert "belongs to another model" in capsys.readouterr().err
