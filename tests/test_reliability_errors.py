"""Reliability of errors: bad input is one clear line that names the thing and the fix, in
the library and on the command line, and a load that fails changes nothing at all."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinylora as tl
from tinylora import backend, lora, nn, quant
from tinylora.backend import DeviceError
from tinylora.checkpoint import load_gpt, resolve_checkpoint, save_checkpoint
from tinylora.cli import main as cli
from tinylora.data import load_data
from tinylora.configs import ConfigError
from tinylora.io import FormatError, load_safetensors, save_json, save_safetensors
from tinylora.lora import AdapterLoadError, BaseModelMismatchError
from tinylora.lora.adapters import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from tinylora.models import GPT, GPTConfig
from tinylora.nn import ShapeError, StateDictError
from tinylora.apps.train import train_gpt
from tinylora.train import TrainConfig, Trainer

TINY = dict(block_size=8, n_layer=2, n_head=2, n_embd=8)


def one_line(exc) -> str:
    msg = str(exc.value if hasattr(exc, "value") else exc)
    assert msg and "\n" not in msg, msg
    return msg


def gpt(seed=0, vocab=11, **kw):
    tl.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, **{**TINY, **kw}))


@pytest.fixture(scope="module")
def prose():
    return load_data("builtin:prose", block_size=8)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small finished run (two checkpoints) to damage in copies."""
    out = tmp_path_factory.mktemp("run") / "run"
    train_gpt("builtin:prose", out, model_args=dict(TINY, n_embd=16),
              train_args=dict(max_iters=4, batch_size=2, eval_interval=2, eval_iters=1,
                              progress=False))
    return out


def copy_run(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


# ----------------------------------------------------------------------------- model input

def test_token_ids_out_of_range_name_the_id_the_range_and_the_fix():
    m = gpt()
    for bad, ids in ((11, [[1, 2, 11]]), (-1, [[-1, 2, 3]])):
        with pytest.raises(IndexError) as e:
            m(np.array(ids))
        msg = one_line(e)
        assert f"token id {bad} is out of range for vocab_size=11" in msg
        assert "[0, 11)" in msg and "encode with the model's tokenizer" in msg
    with pytest.raises(IndexError, match="token id 99"):
        m.generate(np.array([[1, 99]]), 2)
    with pytest.raises(TypeError, match="integer token ids.*int64"):
        m(np.array([[1.5, 2.0]]))


def test_a_sequence_longer_than_block_size_says_how_to_crop_it():
    m = gpt()
    with pytest.raises(ValueError) as e:
        m(np.zeros((2, 9), np.int64))
    msg = one_line(e)
    assert "a sequence of 9 tokens is longer than block_size=8" in msg
    assert "idx[:, -8:]" in msg and "larger block_size" in msg
    out = m.generate(np.zeros((1, 9), np.int64), 3, temperature=0)   # generate crops itself
    assert out.shape == (1, 12)


def test_wrong_shapes_into_a_layer_name_its_path_expected_and_got():
    m = gpt()
    m.transformer.h[0].attn.c_attn = nn.Linear(7, 24)                # a mis-built layer
    with pytest.raises(ShapeError) as e:
        m(np.array([[1, 2, 3]]))
    msg = one_line(e)
    assert msg.startswith("transformer.h.0.attn.c_attn (Linear(in_features=7")
    assert "expected input of shape (..., 7), got (1, 3, 8)" in msg
    m = gpt()
    m.transformer.h[1].ln_2 = nn.LayerNorm(6)
    with pytest.raises(ShapeError, match=r"^transformer\.h\.1\.ln_2 \(LayerNorm.*expected input "
                                         r"of shape \(\.\.\., 6\), got \(1, 3, 8\)"):
        m(np.array([[1, 2, 3]]))
    # inside a LoRA wrapper the path goes down to the base layer
    m = gpt()
    lora.inject(m, lora.LoraConfig(r=2, target_modules=["c_proj"]))
    m.transformer.h[0].mlp.c_fc = nn.Linear(8, 30)
    with pytest.raises(ShapeError) as e:
        m(np.array([[1, 2, 3]]))
    assert one_line(e).startswith("transformer.h.0.mlp.c_proj.base_layer (Linear(in_features=32")
    assert "got (1, 3, 30)" in str(e.value)


# ----------------------------------------------------------------------------- LoRA config

@pytest.mark.parametrize("field,value,words", [
    ("r", 0, "r must be a positive int"), ("r", -2, "r must be a positive int"),
    ("r", 2.5, "r must be a positive int"), ("r", True, "r must be a positive int"),
    ("lora_alpha", 0, "lora_alpha must be a positive number"),
    ("lora_alpha", -1.0, "lora_alpha must be a positive number"),
    ("lora_alpha", float("nan"), "lora_alpha must be a positive number"),
    ("lora_dropout", 1.0, "lora_dropout must be in [0, 1)"),
    ("lora_dropout", -0.1, "lora_dropout must be in [0, 1)"),
    ("lora_dropout", float("nan"), "lora_dropout must be in [0, 1)"),
])
def test_lora_config_values_are_checked(tmp_path, field, value, words):
    with pytest.raises(ValueError) as e:
        lora.LoraConfig(**{field: value, "target_modules": ["c_attn"]})
    msg = one_line(e)
    assert msg.startswith("LoraConfig: ") and words in msg and repr(value) in msg
    # the same value arriving in an adapter_config.json names the file too
    d = {**lora.LoraConfig(target_modules=["c_attn"]).to_peft_dict(), field: value}
    with pytest.raises(ConfigError) as e:
        lora.LoraConfig.from_peft_dict(d, source=str(tmp_path / CONFIG_NAME))
    assert one_line(e).startswith(str(tmp_path / CONFIG_NAME)) and words in str(e.value)


def test_target_modules_that_match_nothing_list_the_layers_and_change_nothing():
    m = gpt()
    before = snapshot(m)
    for tm in (["c_atn"], "transformer\\.h\\.9\\..*"):
        with pytest.raises(ValueError) as e:
            lora.inject(m, lora.LoraConfig(target_modules=tm))
        msg = one_line(e)
        assert f"target_modules {tm!r} matches no layer of this GPT" in msg
        assert "transformer.h.*.attn.c_attn (Linear)" in msg             # what to write instead
    assert_same(before, snapshot(m))


# ----------------------------------------------------------------------------- adapter files

def saved_adapter(tmp_path, seed=0):
    m = gpt(seed)
    lora.inject(m, lora.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                   init_lora_weights=False))
    lora.save_adapter(m, tmp_path / "adapter")
    return tmp_path / "adapter"


def _rewrite(path, edit):
    t, meta = load_safetensors(path)
    edit(t)
    save_safetensors(path, t, meta)


ADAPTER_CASES = {
    "other base": (lambda w, c: None, BaseModelMismatchError,
                   ["trained on a different base model", "check_base=False"]),
    "missing": (lambda w, c: _rewrite(w, lambda t: t.pop(f"{PREFIX}transformer.h.1.mlp.c_fc.lora_B.weight")),
                AdapterLoadError, ["missing tensors: transformer.h.1.mlp.c_fc.lora_B.weight",
                                   "nothing was changed"]),
    "extra": (lambda w, c: _rewrite(w, lambda t: t.update({f"{PREFIX}lm_head.lora_A.weight": np.ones((2, 8), np.float32)})),
              AdapterLoadError, ["unexpected tensors: lm_head.lora_A.weight"]),
    "mis-shaped": (lambda w, c: _rewrite(w, lambda t: t.update({f"{PREFIX}transformer.h.0.attn.c_attn.lora_A.weight": np.ones((3, 8), np.float32)})),
                   AdapterLoadError, ["transformer.h.0.attn.c_attn.lora_A.weight has shape (3, 8), "
                                      "this model needs (2, 8)"]),
    "truncated": (lambda w, c: w.write_bytes(w.read_bytes()[:-7]), FormatError,
                  [WEIGHTS_NAME, "truncated or corrupt"]),
    "corrupted header": (lambda w, c: w.write_bytes(w.read_bytes()[:8] + b"#" + w.read_bytes()[9:]),
                         FormatError, [WEIGHTS_NAME, "header is not valid JSON"]),
    "config missing r": (lambda w, c: c.write_text(json.dumps({k: v for k, v in json.loads(c.read_text()).items() if k != "r"})),
                         ConfigError, [CONFIG_NAME, "missing field(s) r"]),
    "config unknown feature": (lambda w, c: c.write_text(json.dumps({**json.loads(c.read_text()), "use_qalora": True})),
                               ConfigError, [CONFIG_NAME, "use_qalora=True", "re-save the adapter without it"]),
    "config targets elsewhere": (lambda w, c: c.write_text(json.dumps({**json.loads(c.read_text()), "target_modules": ["q_proj"]})),
                                 AdapterLoadError, [CONFIG_NAME, "matches no layer"]),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_bad_adapters_are_one_line_errors_and_change_nothing(tmp_path, case):
    edit, error, words = ADAPTER_CASES[case]
    folder = saved_adapter(tmp_path)
    edit(folder / WEIGHTS_NAME, folder / CONFIG_NAME)
    m = gpt(seed=1 if case == "other base" else 0)                  # seed 1: another base
    lora.inject(m, lora.LoraConfig(r=2, target_modules=["c_proj"]), "existing")
    before = snapshot(m)
    with pytest.raises(error) as e:
        lora.load_adapter(m, folder, adapter_name="new")
    msg = one_line(e)
    assert all(w in msg for w in words), msg
    assert_same(before, snapshot(m))
    if case == "other base":                                        # the documented way out
        lora.load_adapter(m, folder, adapter_name="new", check_base=False)


# ----------------------------------------------------------------------------- checkpoints

def _edit_config(folder, edit):
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


CHECKPOINT_CASES = {
    "missing field": (lambda c: c["model"]["config"].pop("n_layer"), ConfigError,
                      ["missing required GPTConfig field(s): n_layer"]),
    "unknown field": (lambda c: c["model"]["config"].update(n_layers=2), ConfigError,
                      ["unknown GPTConfig field(s): 'n_layers' (did you mean 'n_layer'?)"]),
    "wrong type": (lambda c: c["model"]["config"].update(n_head="2"), ConfigError,
                   ["GPTConfig field 'n_head' must be int"]),
    "inconsistent": (lambda c: c["model"]["config"].update(n_embd=15), ConfigError,
                     ["n_embd=15 must be divisible by n_head=2"]),
    "other model size": (lambda c: c["model"]["config"].update(n_embd=32), FormatError,
                         ["does not match", "model.safetensors", "(96, 32)", "(96, 16)"]),
    "huge vocab": (lambda c: c["model"]["config"].update(vocab_size=10 ** 9), FormatError,
                   ["tokenizer has 96 characters but the model's vocab_size is 1000000000"]),
    "bad tokenizer": (lambda c: c.update(tokenizer={"type": "bpe"}), FormatError,
                      ["not a character tokenizer description"]),
    "not ours": (lambda c: c.update(format="other"), FormatError, ["not a tinylora checkpoint"]),
    "model not an object": (lambda c: c.update(model="GPT"), FormatError, ["holds a None model"]),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_configs_name_the_file_and_field(tmp_path, run_dir, case):
    edit, error, words = CHECKPOINT_CASES[case]
    run = copy_run(run_dir, tmp_path)
    folder = resolve_checkpoint(run)
    _edit_config(folder, edit)
    with pytest.raises(error) as e:
        load_gpt(run)
    msg = one_line(e)
    assert msg.startswith(os.path.join(folder, "config.json")) and all(w in msg for w in words), msg


def test_bad_training_config_and_trainer_state_on_resume(tmp_path, run_dir):
    run = copy_run(run_dir, tmp_path)
    folder = Path(resolve_checkpoint(run))
    _edit_config(folder, lambda c: c["train"].update(max_iter=9))
    with pytest.raises(ConfigError, match=r"unknown TrainConfig field\(s\): 'max_iter' \(did you "
                                          r"mean 'max_iters'\?\)"):
        train_gpt(None, run, resume=True)
    _edit_config(folder, lambda c: c["train"].pop("max_iter"))
    state = json.loads((folder / "trainer_state.json").read_text())
    for edit, words in ((lambda s: s.pop("step"), "'step' must be an integer >= 0, got None"),
                        (lambda s: s.update(tokens_seen=-5), "'tokens_seen' must be an integer"),
                        (lambda s: s["rng"].update(host={"bit_generator": "MT19937"}),
                         "'rng' is not a saved random-generator state")):
        bad = json.loads(json.dumps(state))
        edit(bad)
        (folder / "trainer_state.json").write_text(json.dumps(bad))
        with pytest.raises(FormatError) as e:
            train_gpt(None, run, resume=True, train_args=dict(progress=False))
        msg = one_line(e)
        assert msg.startswith(str(folder / "trainer_state.json")) and words in msg, msg


@pytest.mark.parametrize("damage,words", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated or corrupt"),
    (lambda p: p.write_bytes(b"\x00" * 8 + p.read_bytes()[8:]), "expected safetensors"),
    (lambda p: p.write_bytes(p.read_bytes()[:20] + b"\xff" + p.read_bytes()[21:]), "not UTF-8"),
])
def test_truncated_or_corrupted_weights_name_the_file(tmp_path, run_dir, damage, words):
    run = copy_run(run_dir, tmp_path)
    path = Path(resolve_checkpoint(run)) / "model.safetensors"
    damage(path)
    with pytest.raises(FormatError) as e:
        load_gpt(run)
    msg = one_line(e)
    assert msg.startswith(str(path)) and words in msg, msg


# ----------------------------------------------------------------------------- training data

@pytest.mark.parametrize("content,words", [
    (b"", "is empty; it needs some text"),
    (b"  \n\t\n", "is empty"),
    (b"tiny", "is too short: its training split has 4 tokens but block_size + 1 = 9"),
    (b"caf\xe9 au lait " * 9, "is not UTF-8 text (byte 0xe9 at offset 3, line 1); convert it"),
])
def test_bad_training_files(tmp_path, content, words):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_data(str(path), block_size=8)
    msg = one_line(e)
    assert str(path) in msg and words in msg, msg


# ----------------------------------------------------------------------------- output folders

def _unwritable(tmp_path):
    """Folders that cannot be created even by root: below a regular file, and inside /proc."""
    (tmp_path / "file.txt").write_text("not a folder")
    return [tmp_path / "file.txt" / "out", Path("/proc/tinylora-no-such/out")]


def test_an_unwritable_output_folder_is_one_line_naming_it(tmp_path, prose):
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, **TINY))
    for out in _unwritable(tmp_path):
        writers = {
            "save_json": lambda: save_json(out / "summary.json", {"a": 1}),
            "save_safetensors": lambda: save_safetensors(out / "w.safetensors", {}),
            "Trainer.train": lambda: Trainer(model, prose, TrainConfig(max_iters=1, batch_size=1,
                                                                       progress=False), out).train(),
            "save_checkpoint": lambda: save_checkpoint(out, 1, model=model, optimizer=tl.optim.AdamW(
                model.parameters()), config={}, trainer_state={}),
        }
        for name, write in writers.items():
            with pytest.raises(OSError) as e:
                write()
            msg = one_line(e)
            assert str(out) in msg and "choose a" in msg and "folder you can write to" in msg, \
                (name, msg)
        m = gpt()
        lora.inject(m, lora.LoraConfig(r=2, target_modules=["c_attn"]))
        with pytest.raises(OSError, match="folder you can write to"):
            lora.save_adapter(m, out / "adapter")
        q = gpt(n_embd=64)
        quant.quantize_model(q, print_fn=None)
        with pytest.raises(OSError, match="folder you can write to"):
            quant.save_quantized(q, out / "q4")
    assert model.transformer.wte.weight.grad is None                     # no step was taken


# ----------------------------------------------------------------------------- devices

def test_unknown_device_and_cuda_without_cupy_or_gpu(monkeypatch):
    before = backend.get_device()
    with pytest.raises(DeviceError) as e:
        tl.set_device("tpu")
    assert one_line(e) == "unknown device 'tpu': use 'cpu' or 'cuda' (TINYLORA_DEVICE)"
    monkeypatch.setitem(sys.modules, "cupy", None)                     # as if not installed
    with pytest.raises(DeviceError) as e:
        tl.set_device("cuda")
    assert "needs CuPy, which is not installed" in one_line(e) and "TINYLORA_DEVICE=cpu" in str(e.value)
    assert backend.get_device() == before                              # nothing switched


def test_cuda_without_a_gpu_is_a_clear_error():
    pytest.importorskip("cupy")
    import cupy
    try:
        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0 and cupy.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        pytest.skip("this machine has a GPU")
    before = backend.get_device()            # "cpu", or "guard" under the device guard
    with pytest.raises(DeviceError) as e:
        tl.set_device("cuda")
    assert "finds no usable GPU" in one_line(e) and "TINYLORA_DEVICE=cpu" in str(e.value)
    assert backend.get_device() == before


def _run_cli(args, env=None):
    exe = Path(sys.executable).with_name("tinylora")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tinylora.cli"]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_a_bad_tinylora_device_is_one_clear_error_at_first_use():
    # import works (so the command line can report the problem); the first array op raises
    r = subprocess.run([sys.executable, "-c", "import tinylora; tinylora.zeros(2)"],
                       capture_output=True, text=True,
                       env={**os.environ, "TINYLORA_DEVICE": "tpu"}, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].endswith(
        "DeviceError: unknown device 'tpu': use 'cpu' or 'cuda' (TINYLORA_DEVICE)")


def test_cli_with_a_bad_tinylora_device_prints_one_line():
    r = _run_cli(["generate", "--checkpoint", "x"], env={"TINYLORA_DEVICE": "tpu"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "tinylora: error: unknown device 'tpu': use 'cpu' or 'cuda' (TINYLORA_DEVICE)"


# ----------------------------------------------------------------------------- the CLI

def _cli_cases(tmp_path, run_dir):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 50)
    (tmp_path / "short.txt").write_text("abc")
    (tmp_path / "file.txt").write_text("x")
    broken = copy_run(run_dir, tmp_path)
    p = Path(resolve_checkpoint(broken)) / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    small = ["--n-layer", "1", "--n-head", "2", "--n-embd", "8", "--block-size", "8",
             "--max-iters", "1", "--no-progress"]
    return {
        "no data file": (["train", "--data", "/nonexistent/data.txt"], "data file '/nonexistent/data.txt' does not exist"),
        "empty data": (["train", "--data", str(tmp_path / "empty.txt")] + small, "is empty"),
        "not UTF-8": (["train", "--data", str(tmp_path / "latin1.txt")] + small, "is not UTF-8 text"),
        "too short": (["train", "--data", str(tmp_path / "short.txt")] + small, "is too short"),
        "data is a folder": (["train", "--data", str(tmp_path)] + small, "is a folder"),
        "unknown corpus": (["train", "--data", "builtin:poetry"], "no built-in corpus 'poetry'"),
        "out under a file": (["train", "--data", "builtin:prose", "--out", str(tmp_path / "file.txt" / "run")] + small,
                             "cannot create the run folder"),
        "bad model shape": (["train", "--data", "builtin:prose", "--n-embd", "7", "--n-head", "2"],
                            "n_embd=7 must be divisible by n_head=2"),
        "negative lr": (["train", "--data", "builtin:prose", "--lr", "-1"], "lr must be > 0"),
        "resume nothing": (["train", "--resume", "--out", str(tmp_path / "nothing")], "does not exist"),
        "no checkpoint": (["generate", "--checkpoint", str(tmp_path / "nothing")], "does not exist"),
        "corrupt checkpoint": (["generate", "--checkpoint", str(broken)], "expected safetensors"),
        "prompt outside vocab": (["generate", "--checkpoint", str(run_dir), "--prompt", "naïve"],
                                 "'ï' (U+00EF) on line 1 (offset 2) is not in the tokenizer"),
    }


def test_cli_errors_are_one_line_exit_1_no_traceback(tmp_path, run_dir, capsys):
    for name, (args, words) in _cli_cases(tmp_path, run_dir).items():
        assert cli(args) == 1, name
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert "\n" not in err and "Traceback" not in err, (name, err)
        assert err.startswith(f"tinylora {args[0]}: error: ") and words in err, (name, err)


def test_cli_error_from_a_real_process(tmp_path):
    r = _run_cli(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("tinylora train: error: data file") and "does not exist" in r.stderr


# ----------------------------------------------------------------------------- failed loads

def snapshot(model) -> dict:
    """Everything a load could touch: the module tree and types, every parameter and
    buffer (values, dtype, requires_grad), training flags, LoRA's adapters."""
    tensors = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        tensors[name] = (t.numpy().copy(), str(t.dtype), t.requires_grad, id(t))
    return {"modules": [(n, type(m).__name__, id(m), m.training) for n, m in model.named_modules()],
            "tensors": tensors, "adapters": lora.list_adapters(model) if _has_lora(model) else None}


def _has_lora(model) -> bool:
    return any(isinstance(m, lora.LoraLayer) for m in model.modules())


def assert_same(a, b) -> None:
    assert a["modules"] == b["modules"]
    assert a["adapters"] == b["adapters"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k, (x, dt, rg, ident) in a["tensors"].items():
        y, dt2, rg2, ident2 = b["tensors"][k]
        assert (dt, rg, ident) == (dt2, rg2, ident2) and np.array_equal(x, y, equal_nan=True), k


def test_failed_load_state_dict_changes_nothing():
    m = gpt()
    m.transformer.wte.weight.requires_grad_(False)
    before = snapshot(m)
    good = {k: v.numpy() + 1 for k, v in m.state_dict().items()}
    for bad in ({**good, "transformer.h.1.mlp.c_fc.weight": np.ones((3, 3), np.float32)},
                {k: v for k, v in good.items() if k != "transformer.ln_f.bias"},
                {**good, "transformer.h.7.attn.c_attn.weight": good["transformer.h.0.attn.c_attn.weight"]}):
        with pytest.raises(StateDictError) as e:
            m.load_state_dict(bad)
        assert "nothing was changed" in one_line(e)
        assert_same(before, snapshot(m))
    m.load_state_dict(good)                                            # a good one does load
    assert np.array_equal(m.transformer.wpe.weight.numpy(), good["transformer.wpe.weight"])


def _trained_trainer(prose, out, steps=3):
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, **{**TINY, "n_embd": 16}))
    t = Trainer(model, prose, TrainConfig(max_iters=steps, batch_size=2, eval_interval=0,
                                          progress=False), out)
    t.train()
    return t


def _trainer_state(t) -> dict:
    opt = {id(p): (st["step"], st["exp_avg"].copy(), st["exp_avg_sq"].copy())
           for p in t.params for st in [t.optimizer.state[id(p)]]}
    return {"model": snapshot(t.model), "opt": opt,
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in t.optimizer.param_groups],
            "counters": (t.step, t.tokens_seen, t.skipped, list(t.evals), t.last_loss, t.checkpoint),
            "rng": json.dumps(backend.get_rng_state())}


def _assert_same_trainer(a, b):
    assert_same(a["model"], b["model"])
    assert a["opt"].keys() == b["opt"].keys()
    for k, (s, m, v) in a["opt"].items():
        s2, m2, v2 = b["opt"][k]
        assert s == s2 and np.array_equal(m, m2) and np.array_equal(v, v2)
    assert a["groups"] == b["groups"] and a["counters"] == b["counters"] and a["rng"] == b["rng"]


def _damage_optimizer(folder):
    p = folder / "optimizer.safetensors"
    p.write_bytes(p.read_bytes()[:-4])


def _damage_state(folder):
    s = json.loads((folder / "trainer_state.json").read_text())
    s["rng"]["host"]["state"] = "x"
    (folder / "trainer_state.json").write_text(json.dumps(s))


def _damage_weights(folder):
    t, meta = load_safetensors(folder / "model.safetensors")
    t["transformer.h.1.mlp.c_proj.bias"] = np.zeros(3, np.float32)
    save_safetensors(folder / "model.safetensors", t, meta)


def _optimizer_for_other_params(folder):
    t, meta = load_safetensors(folder / "optimizer.safetensors")
    info = json.loads(meta["tinylora.optimizer"])
    info["param_groups"][0]["params"].append(99)
    save_safetensors(folder / "optimizer.safetensors", t, {"tinylora.optimizer": json.dumps(info)})


@pytest.mark.parametrize("damage,error,words", [
    (_damage_optimizer, FormatError, "optimizer.safetensors"),
    (_damage_state, FormatError, "'rng' is not a saved random-generator state"),
    (_damage_weights, StateDictError, "transformer.h.1.mlp.c_proj.bias"),
    (_optimizer_for_other_params, FormatError, "param groups of sizes"),
])
def test_failed_resume_into_a_live_trainer_changes_nothing(tmp_path, prose, damage, error, words):
    source = _trained_trainer(prose, tmp_path / "source", steps=3)
    folder = Path(source.checkpoint)
    damage(folder)
    live = _trained_trainer(prose, tmp_path / "live", steps=2)         # mid-run, its own state
    before = _trainer_state(live)
    with pytest.raises(error) as e:
        live.resume(folder)
    assert words in one_line(e)
    _assert_same_trainer(before, _trainer_state(live))
    live.config.max_iters = 3
    live.train()                                                       # and it trains on


def test_failed_load_quantized_changes_nothing(tmp_path):
    q = gpt(n_embd=64)
    quant.quantize_model(q, print_fn=None)
    quant.save_quantized(q, tmp_path / "q4")
    cases = {
        "pickle": lambda f: (f / "model.safetensors").write_bytes(b"\x80\x04\x95junk." * 4),
        "truncated": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-9]),
        "wrong tensor": lambda f: _rewrite(f / "model.safetensors", lambda t: t.update(
            {"transformer.h.0.mlp.c_fc.bias": np.zeros(5, np.float32)})),
        "config lists a missing layer": lambda f: (f / "quantization_config.json").write_text(
            json.dumps({**json.loads((f / "quantization_config.json").read_text()),
                        "modules": [{"path": "transformer.h.9.mlp.c_fc"}]})),
        "config entry without settings": lambda f: (f / "quantization_config.json").write_text(
            json.dumps({**json.loads((f / "quantization_config.json").read_text()),
                        "modules": [{"path": "transformer.h.0.mlp.c_fc"}]})),
    }
    for name, damage in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        shutil.copytree(tmp_path / "q4", folder)
        damage(folder)
        m = gpt(n_embd=64)
        before = snapshot(m)
        with pytest.raises((FormatError, StateDictError)) as e:
            quant.load_quantized(m, folder)
        one_line(e)
        assert_same(before, snapshot(m)), name
    loaded = quant.load_quantized(gpt(n_embd=64), tmp_path / "q4")       # the intact one loads
    x = np.array([[1, 2, 3]])
    assert np.array_equal(loaded(x)[0].numpy(), q(x)[0].numpy())


def test_an_adapter_for_a_model_of_another_size_gets_a_short_message(tmp_path):
    # every tensor is mis-shaped: the message shows a few and the count, not all of them
    big = gpt(n_layer=3, n_embd=16)
    lora.inject(big, lora.LoraConfig(r=2, target_modules=["c_attn", "c_proj", "c_fc"]))
    lora.save_adapter(big, tmp_path / "big")
    small = gpt(n_layer=3)
    with pytest.raises(AdapterLoadError) as e:
        lora.load_adapter(small, tmp_path / "big", check_base=False)
    msg = one_line(e)
    assert "has shape" in msg and "such tensors in all" in msg
    assert msg.count("has shape") == 2 and len(msg) < 500, msg


def test_a_diverging_run_prints_only_its_one_line(tmp_path):
    # --lr 1e6 overflows within a few steps; NumPy's RuntimeWarnings must not come first
    r = _run_cli(["train", "--data", "builtin:prose", "--out", str(tmp_path / "o"), "--lr", "1e6",
                  "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
                  "--batch-size", "4", "--max-iters", "40", "--no-progress"])
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("tinylora train: error: non-finite"), r.stderr
