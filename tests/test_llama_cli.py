"""The CLI on Llama-family folders: finetune (LoRA, QLoRA, full; text and instruction data),
generate with and without an adapter (the Python API's tokens), merge into a Hugging Face
folder (PEFT's logits for PEFT's adapter), and `train --arch llama` with checkpoint/resume."""
import json
import pathlib
import shutil

import pytest

import tinylora as tl
from tinylora import backend, lora
from tinylora.apps.finetune import load_finetuned
from tinylora.backend import np
from tinylora.cli import main
from tinylora.io import load_safetensors
from tinylora.models import BPETokenizer, Llama, LlamaConfig

FIX = pathlib.Path(__file__).parent / "fixtures" / "llama"
TOKENIZER = FIX / "bpe" / "smollm.json"      # ChatML special tokens, as SmolLM2's
PROMPT = "The cat sat on"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny GQA Llama folder as Hugging Face lays it out: config.json and model.safetensors
    (written by save_pretrained, which test_llama_hf checks against transformers) and the
    fixture tokenizer.json (the fixture checkpoints' vocabularies are smaller than any
    byte-level tokenizer's)."""
    folder = tmp_path_factory.mktemp("llama") / "base"
    tok = BPETokenizer.from_file(TOKENIZER)
    tl.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64, initializer_range=0.2))
    model.save_pretrained(folder)
    shutil.copy(TOKENIZER, folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    recs = [{"prompt": f"Say {w}.", "response": f"{w} {w} {w}"} for w in ("cat", "dog", "sun")]
    recs.append({"messages": [{"role": "user", "content": "Say sky."},
                              {"role": "assistant", "content": "sky sky sky"}]})
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n", encoding="utf-8")
    return p


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys, *argv):
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def logits(model, ids):
    with tl.no_grad():
        return backend.to_numpy(model.eval()(ids)[0].data)


def greedy_text(model, tok, n=12):
    out = model.generate([tok.encode(PROMPT)], n, temperature=0)
    return tok.decode(out[0])


@pytest.fixture(scope="module")
def lora_adapter(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert main(["finetune", "--pretrained", str(base), "--data", "builtin:prose",
                 "--max-iters", "3", "--batch-size", "2", "--block-size", "32",
                 "--eval-iters", "1", "--lr", "3e-2", "--out", str(out), "--no-progress"]) == 0
    return out


def test_finetune_lora_on_text_writes_a_peft_adapter(base, lora_adapter):
    cfg = json.loads((lora_adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]   # PEFT's default for llama
    keys = load_safetensors(lora_adapter / "adapter_model.safetensors")[0]
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert {k.split(".")[-2] for k in keys} == {"lora_A", "lora_B"}
    # the adapter learned something: B moved away from zero
    assert any(np.abs(v).max() > 0 for k, v in keys.items() if "lora_B" in k)


def test_finetune_qlora_on_instructions_lowers_the_response_loss(base, records, tmp_path, capsys):
    out = tmp_path / "qlora"
    s = cli_json(capsys, "finetune", "--pretrained", base, "--data", records, "--qlora",
                 "--target-modules", "all-linear", "--max-iters", "12", "--batch-size", "4",
                 "--lr", "3e-2", "--out", out)
    assert s["method"] == "qlora" and s["model_type"] == "llama" and s["steps"] == 12
    assert s["val_after"] < s["val_before"] - 0.5, s
    info = json.loads((out / "tinylora_finetune.json").read_text())
    assert info["quantize"]["quant_type"] == "nf4"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert len(cfg["target_modules"]) == 7
    model, _, _ = load_finetuned(out)   # the base is quantized again before the adapter loads
    assert type(model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"


def test_generate_with_and_without_adapter_equals_the_python_api(base, lora_adapter, capsys):
    tok = BPETokenizer.from_pretrained(base)
    common = ["--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "12"]
    code, plain, err = cli(capsys, "generate", "--pretrained", base, *common)
    assert code == 0, err
    assert plain.rstrip("\n") == greedy_text(Llama.from_hf(base), tok)
    code, adapted, err = cli(capsys, "generate", "--adapter", lora_adapter, *common)
    assert code == 0, err
    model, _, _ = load_finetuned(lora_adapter)
    assert adapted.rstrip("\n") == greedy_text(model, tok)
    assert adapted != plain        # the adapter changes what the model writes


def test_merge_writes_a_hf_folder_with_the_adapted_logits(base, lora_adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    r = cli_json(capsys, "merge", "--adapter", lora_adapter, "--out", out)
    assert r["merged"] == str(out.resolve())
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    ids = np.random.default_rng(0).integers(0, 400, (2, 20))
    adapted, _, _ = load_finetuned(lora_adapter)
    merged = Llama.from_hf(out)
    assert np.abs(logits(merged, ids) - logits(adapted, ids)).max() < 1e-4
    assert np.abs(logits(merged, ids) - logits(Llama.from_hf(base), ids)).max() > 1e-3
    code, text, err = cli(capsys, "generate", "--pretrained", out, "--prompt", PROMPT,
                          "--temperature", "0", "--max-new-tokens", "12")
    assert code == 0, err
    assert text.rstrip("\n") == greedy_text(adapted, BPETokenizer.from_pretrained(base))


def test_merge_of_a_peft_adapter_gives_peft_logits(tmp_path, capsys):
    """The fixture adapter PEFT wrote, merged onto the fixture base transformers wrote: the
    folder's logits are those PEFT computed (no tokenizer.json needed to merge)."""
    gqa = FIX / "llama_gqa"
    out = tmp_path / "merged"
    r = cli_json(capsys, "merge", "--adapter", gqa / "peft_adapter", "--base", gqa, "--out", out)
    assert r["max_logit_diff"] < 1e-4
    ref = load_safetensors(gqa / "reference.safetensors")[0]
    assert np.abs(logits(Llama.from_hf(out), ref["input_ids"]) - ref["lora_logits"]).max() < 1e-4


def test_finetune_full_writes_a_hf_folder(base, tmp_path, capsys):
    out = tmp_path / "full"
    s = cli_json(capsys, "finetune", "--pretrained", base, "--data", "builtin:prose", "--full",
                 "--max-iters", "2", "--batch-size", "2", "--block-size", "16", "--eval-iters", "1",
                 "--out", out)
    assert s["trainable"] == s["total"]
    model = Llama.from_hf(out)
    ids = np.arange(10)[None]
    assert np.abs(logits(model, ids) - logits(Llama.from_hf(base), ids)).max() > 0
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("argv, msg", [
    (["--block-size", "65"], "--block-size must be between 1 and the model's max_position_embeddings=64"),
    (["--target-modules", "c_attn"], "c_attn"),
])
def test_finetune_bad_options_are_one_line(base, tmp_path, capsys, argv, msg):
    code, _, err = cli(capsys, "finetune", "--pretrained", base, "--data", "builtin:prose",
                       "--max-iters", "1", "--out", tmp_path / "x", *argv)
    assert code == 1 and msg in err and len(err.strip().splitlines()) == 1, err


def test_finetune_without_tokenizer_says_so(tmp_path, capsys):
    code, _, err = cli(capsys, "finetune", "--pretrained", FIX / "llama_gqa", "--data",
                       "builtin:prose", "--out", tmp_path / "x")
    assert code == 1 and "tokenizer.json is missing" in err


def test_train_arch_llama_resumes_and_generates(tmp_path, capsys):
    args = ["train", "--arch", "llama", "--data", "builtin:prose", "--n-layer", "2",
            "--n-embd", "32", "--n-head", "4", "--n-kv-head", "2", "--block-size", "32",
            "--batch-size", "4", "--eval-interval", "2", "--eval-iters", "1"]
    straight = cli_json(capsys, *args, "--max-iters", "4", "--out", tmp_path / "a")
    cli_json(capsys, *args, "--max-iters", "2", "--out", tmp_path / "b")
    resumed = cli_json(capsys, "train", "--out", tmp_path / "b", "--resume", "--max-iters", "4")
    assert resumed["start_step"] == 2 and resumed["steps"] == 4
    assert resumed["last_eval"] == straight["last_eval"]           # bit for bit on the CPU
    a = load_safetensors(tmp_path / "a" / "checkpoints" / "step-0000004" / "model.safetensors")[0]
    b = load_safetensors(tmp_path / "b" / "checkpoints" / "step-0000004" / "model.safetensors")[0]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "a" / "checkpoints" / "step-0000004" / "config.json").read_text())
    assert cfg["model"]["type"] == "Llama"
    assert cfg["model"]["config"]["num_key_value_heads"] == 2
    code, text, err = cli(capsys, "generate", "--checkpoint", tmp_path / "a", "--prompt", "The ",
                          "--max-new-tokens", "8", "--temperature", "0")
    assert code == 0 and text.startswith("The ") and len(text.rstrip("\n")) == 12, (text, err)
    code, _, err = cli(capsys, "train", "--arch", "gpt", "--out", tmp_path / "a", "--resume")
    assert code == 1 and "trains a llama, not a gpt" in err


def test_finetune_a_toy_llama_run_then_merge(tmp_path, capsys):
    cli_json(capsys, "train", "--arch", "llama", "--data", "builtin:prose", "--n-layer", "1",
             "--n-embd", "16", "--block-size", "16", "--max-iters", "1", "--eval-interval", "0",
             "--out", tmp_path / "run")
    cli_json(capsys, "finetune", "--base", tmp_path / "run", "--data", "builtin:python",
             "--max-iters", "2", "--block-size", "16", "--eval-iters", "1", "--lr", "1e-2",
             "--out", tmp_path / "ad")
    r = cli_json(capsys, "merge", "--adapter", tmp_path / "ad", "--out", tmp_path / "m")
    assert r["max_logit_diff"] < 1e-4
    code, text, err = cli(capsys, "generate", "--checkpoint", tmp_path / "m", "--prompt", "def ",
                          "--max-new-tokens", "4", "--temperature", "0")
    assert code == 0 and text.startswith("def "), err


def test_train_n_kv_head_is_for_llama(tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--data", "builtin:prose", "--n-kv-head", "2",
                       "--max-iters", "1", "--out", tmp_path / "g")
    assert code == 1 and "--n-kv-head is for --arch llama" in err


def test_finetune_on_a_4bit_folder_is_qlora_without_quantizing_again(base, tmp_path, capsys):
    """A folder saved 4-bit in bitsandbytes' layout (here written from tinylora's Linear4bit
    state dict, which is that layout) trains LoRA on its 4-bit base; the adapter loads back
    onto the folder as it is."""
    from tinylora import quant
    from tinylora.io import save_safetensors
    q4 = tmp_path / "q4"
    q4.mkdir()
    m = Llama.from_hf(base)
    quant.quantize_model(m, print_fn=None)
    save_safetensors(q4 / "model.safetensors", {k: backend.to_numpy(v.data)
                                                for k, v in m.state_dict().items()})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                  "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    (q4 / "config.json").write_text(json.dumps(cfg))
    shutil.copy(TOKENIZER, q4 / "tokenizer.json")
    s = cli_json(capsys, "finetune", "--pretrained", q4, "--data", "builtin:prose", "--max-iters", "2",
                 "--batch-size", "2", "--block-size", "16", "--eval-iters", "1", "--lr", "1e-2",
                 "--out", tmp_path / "ad")
    assert s["method"] == "qlora"
    model, _, _ = load_finetuned(tmp_path / "ad")
    assert type(model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    code, _, err = cli(capsys, "finetune", "--pretrained", q4, "--data", "builtin:prose", "--full",
                       "--out", tmp_path / "f")
    assert code == 1 and "holds 4-bit weights" in err
