"""finetune -> adapters -> generate --adapter -> merge -> generate, on a tiny base, through
the command line (in-process): each file a command writes is one the next command reads."""
import json

import numpy as np
import pytest

from tinylora.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    assert main(["train", "--data", "builtin:prose", "--out", str(folder), "--n-layer", "1",
                 "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--max-iters", "4",
                 "--eval-interval", "4", "--eval-iters", "1", "--batch-size", "4",
                 "--no-progress"]) == 0
    return folder


def _finetune(capsys, base, out, *extra):
    text = _run(capsys, "finetune", "--base", base, "--data", "builtin:python", "--out", out,
                "--max-iters", 3, "--eval-interval", 3, "--eval-iters", 1, "--batch-size", 4,
                "--json", *extra)
    return json.loads(text)


def _greedy(capsys, *argv):
    return _run(capsys, "generate", "--prompt", "def ", "--max-new-tokens", 12,
                "--temperature", 0, *argv)


def test_lora_adapter_round_trip_through_the_cli(base, tmp_path, capsys):
    res = _finetune(capsys, base, tmp_path / "lora", "--lora-r", 2, "--target-modules", "c_attn")
    assert res["method"] == "lora" and 0 < res["trainable"] < res["total"]
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["target_modules"] == ["c_attn"] and cfg["peft_type"] == "LORA"

    listing = _run(capsys, "adapters", "list", tmp_path)
    assert "lora" in listing and "c_attn" in listing
    info = json.loads(_run(capsys, "adapters", "inspect", tmp_path / "lora", "--base", base, "--json"))
    assert info["base_check"]["fits"] and info["fingerprint"].startswith("sha256-sampled-v1:")
    assert {t["key"].rsplit(".", 2)[-2] for t in info["tensors"]} == {"lora_A", "lora_B"}

    adapted = _greedy(capsys, "--adapter", tmp_path / "lora")
    _run(capsys, "merge", "--adapter", tmp_path / "lora", "--out", tmp_path / "merged",
         "--hf-out", tmp_path / "hf")
    assert _greedy(capsys, "--checkpoint", tmp_path / "merged") == adapted
    from tinylora.checkpoint import load_gpt       # the HF folder holds the same merged weights
    from tinylora.models import GPT
    merged, hf = load_gpt(tmp_path / "merged")[0].state_dict(), GPT.from_hf(tmp_path / "hf").state_dict()
    assert merged.keys() == hf.keys()
    assert all(np.array_equal(merged[k].numpy(), hf[k].numpy()) for k in merged)
    assert adapted.startswith("def ")


def test_qlora_adapter_is_used_on_a_requantized_base(base, tmp_path, capsys):
    res = _finetune(capsys, base, tmp_path / "q", "--qlora", "--lora-r", 2)
    assert res["method"] == "qlora"
    meta = json.loads((tmp_path / "q" / "tinylora_finetune.json").read_text())
    assert meta["method"] == "qlora" and meta["quantize"]["quant_type"] == "nf4"
    adapted = _greedy(capsys, "--adapter", tmp_path / "q")        # fingerprint check passes
    _run(capsys, "merge", "--adapter", tmp_path / "q", "--out", tmp_path / "qm")
    assert _greedy(capsys, "--checkpoint", tmp_path / "qm") == adapted


def test_full_finetune_writes_a_checkpoint_generate_reads(base, tmp_path, capsys):
    res = _finetune(capsys, base, tmp_path / "full", "--full")
    assert res["method"] == "full" and res["trainable"] == res["total"]
    assert _greedy(capsys, "--checkpoint", tmp_path / "full").startswith("def ")


def test_an_adapter_on_another_base_is_refused(base, tmp_path, capsys):
    _finetune(capsys, base, tmp_path / "a", "--lora-r", 2)
    other = tmp_path / "other"
    assert main(["train", "--data", "builtin:prose", "--out", str(other), "--n-layer", "1",
                 "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--max-iters", "1",
                 "--eval-interval", "1", "--eval-iters", "1", "--batch-size", "2", "--seed", "7",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["adapters", "inspect", str(tmp_path / "a"), "--base", str(other)]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["generate", "--adapter", str(tmp_path / "a"), "--checkpoint", str(other)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different base model" in err


def test_finetune_errors_name_the_fix(base, tmp_path, capsys):
    assert main(["finetune", "--base", str(tmp_path / "nope"), "--data", "builtin:python"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["finetune", "--base", str(base), "--data", "builtin:python", "--target-modules",
                 "no_such_layer", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_layer" in err
    assert main(["merge", "--adapter", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
