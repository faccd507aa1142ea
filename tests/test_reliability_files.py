"""Reliability of files: nothing is ever unpickled or executed, and every save is atomic.

Every public loader is handed a hostile pickle (whose unpickling would create a marker
file), a torch-style zip and a NumPy .npy where it expects safetensors, JSON or a text
vocabulary: it must refuse with a message saying what it expected, and the marker must
never appear. Saves are SIGKILLed at random moments (seeded) while writing real training
checkpoints and adapters: the last complete version must always load, whole.
"""
import ast
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import tinylora as tl
from tinylora import lora, quant
from tinylora.checkpoint import load_gpt, resolve_checkpoint
from tinylora.data import load_data
from tinylora.io import FormatError, load_json, save_json
from tinylora.models import GPT, GPTConfig
from tinylora.models.bert import BertModel
from tinylora.data.wordpiece import WordPieceTokenizer
from tinylora.optim import AdamW, load_optimizer
from tinylora.train import TrainConfig, Trainer

PACKAGE = Path(tl.__file__).parent
SMALL = dict(block_size=16, n_layer=2, n_head=2, n_embd=64)


# ----------------------------------------------------------------------------- helpers

class _Boobytrap:
    """Unpickling this creates ``marker``: what a hostile .bin or .pt could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payloads(marker) -> dict:
    """name -> bytes of formats people hand over by mistake (or by malice)."""
    trap = {"weight": _Boobytrap(marker)}
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:                   # torch.save's layout
        z.writestr("archive/data.pkl", pickle.dumps(trap, protocol=2))
        z.writestr("archive/version", "3\n")
    npy = io.BytesIO()
    np.save(npy, np.zeros((2, 3), np.float32))
    return {"pickle2": pickle.dumps(trap, protocol=2), "pickle4": pickle.dumps(trap, protocol=4),
            "pickle5": pickle.dumps(trap, protocol=5), "zip": zipped.getvalue(),
            "npy": npy.getvalue()}


def test_the_boobytrap_really_fires(tmp_path):
    # the marker tests below mean something only if unpickling would create the file
    marker = tmp_path / "fired"
    pickle.loads(_payloads(marker)["pickle4"])["weight"].close()
    assert marker.exists()


@pytest.fixture(scope="module")
def prose():
    return load_data("builtin:prose", block_size=16)


def small_trainer(prose, out_dir, **train):
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=prose.tokenizer.vocab_size, **SMALL))
    cfg = dict(max_iters=2, batch_size=2, eval_interval=0, warmup_iters=1, lr=1e-2,
               progress=False, keep_checkpoints=2)
    return Trainer(model, prose, TrainConfig(**{**cfg, **train}), out_dir)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, prose):
    """One of every kind of folder tinylora reads, written by tinylora."""
    root = tmp_path_factory.mktemp("artifacts")
    t = small_trainer(prose, root / "run")
    t.train()
    tl.manual_seed(1)
    base = GPT(GPTConfig(vocab_size=96, **SMALL))
    lora.inject(base, lora.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    lora.save_adapter(base, root / "adapter")
    q = GPT(GPTConfig(vocab_size=96, **SMALL))
    quant.quantize_model(q, print_fn=None)
    quant.save_quantized(q, root / "q4")
    bert = root / "bert"
    bert.mkdir()
    save_json(bert / "config.json", {"model_type": "bert", "vocab_size": 8, "hidden_size": 4,
                                     "num_hidden_layers": 1, "num_attention_heads": 1,
                                     "intermediate_size": 8, "max_position_embeddings": 8})
    (bert / "model.safetensors").write_bytes(b"")          # replaced by each case
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    save_json(bert / "tokenizer_config.json", {"do_lower_case": True})
    return {"run": root / "run", "checkpoint": Path(t.checkpoint), "adapter": root / "adapter",
            "q4": root / "q4", "bert": bert}


def _fresh_trainer(prose, folder):
    return small_trainer(prose, folder, max_iters=4)


def _gpt_small():
    return GPT(GPTConfig(vocab_size=96, **SMALL))


# loader name -> (folder key, file to replace, call(folder) , expected error, words the
# message must hold). Each case copies a valid folder and swaps one file for a payload.
LOADERS = {
    "load_gpt weights": ("run", "ckpt/model.safetensors", lambda f, p: load_gpt(f),
                         FormatError, "safetensors"),
    "load_gpt config": ("run", "ckpt/config.json", lambda f, p: load_gpt(f), FormatError, "JSON"),
    "latest.json": ("run", "latest.json", lambda f, p: load_gpt(f), FormatError, "JSON"),
    "resume weights": ("run", "ckpt/model.safetensors",
                       lambda f, p: _fresh_trainer(p, f).resume(), FormatError, "safetensors"),
    "resume optimizer": ("run", "ckpt/optimizer.safetensors",
                         lambda f, p: _fresh_trainer(p, f).resume(), FormatError, "safetensors"),
    "resume trainer_state": ("run", "ckpt/trainer_state.json",
                             lambda f, p: _fresh_trainer(p, f).resume(), FormatError, "JSON"),
    "load_optimizer": ("run", "ckpt/optimizer.safetensors",
                       lambda f, p: load_optimizer(_ckpt(f) / "optimizer.safetensors",
                                                   AdamW(_gpt_small().parameters())),
                       FormatError, "safetensors"),
    "adapter weights": ("adapter", "adapter_model.safetensors",
                        lambda f, p: lora.load_adapter(_gpt_small(), f), FormatError, "safetensors"),
    "adapter config": ("adapter", "adapter_config.json",
                       lambda f, p: lora.load_adapter(_gpt_small(), f), FormatError, "JSON"),
    "load_quantized weights": ("q4", "model.safetensors",
                               lambda f, p: quant.load_quantized(_gpt_small, f), FormatError,
                               "safetensors"),
    "load_quantized config": ("q4", "quantization_config.json",
                              lambda f, p: quant.load_quantized(_gpt_small, f), FormatError, "JSON"),
    "BertModel weights": ("bert", "model.safetensors", lambda f, p: BertModel.from_pretrained(f),
                          FormatError, "safetensors"),
    "BertModel config": ("bert", "config.json", lambda f, p: BertModel.from_pretrained(f),
                         FormatError, "JSON"),
    "WordPiece vocab.txt": ("bert", "vocab.txt", lambda f, p: WordPieceTokenizer.from_pretrained(f),
                            FormatError, "vocab"),
    "WordPiece tokenizer_config": ("bert", "tokenizer_config.json",
                                   lambda f, p: WordPieceTokenizer.from_pretrained(f),
                                   FormatError, "JSON"),
    "load_json": ("run", "ckpt/config.json", lambda f, p: load_json(_ckpt(f) / "config.json"),
                  FormatError, "JSON"),
}


def _ckpt(run) -> Path:
    return Path(resolve_checkpoint(run))


@pytest.mark.parametrize("loader", list(LOADERS))
def test_no_public_loader_unpickles_or_runs_anything(tmp_path, artifacts, prose, loader):
    key, target, call, error, expected = LOADERS[loader]
    marker = tmp_path / "marker"
    for kind, payload in _payloads(marker).items():
        folder = tmp_path / kind
        shutil.copytree(artifacts[key], folder)
        path = (_ckpt(folder) / target[len("ckpt/"):]) if target.startswith("ckpt/") \
            else folder / target
        path.write_bytes(payload)
        with pytest.raises(error) as info:
            call(folder, prose)
        msg = str(info.value)
        assert expected in msg and "\n" not in msg, (kind, msg)
        assert path.name in msg, (kind, msg)                 # names the file it refused
        if kind.startswith("pickle") and expected == "safetensors":
            assert "pickle" in msg and "never unpickles" in msg, msg
        assert not marker.exists(), f"{loader}: a {kind} payload ran"


def test_bert_folder_with_only_a_pickle_points_at_conversion(tmp_path, artifacts):
    folder = tmp_path / "bert"
    shutil.copytree(artifacts["bert"], folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    (folder / "pytorch_model.bin").write_bytes(_payloads(marker)["pickle2"])
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin is a pickle, which tinylora "
                                                "never loads; convert it to safetensors"):
        BertModel.from_pretrained(folder)
    assert not marker.exists()


def test_gpt2_tokenizer_files_refuse_a_pickle(tmp_path):
    from tinylora.data.gpt2_bpe import GPT2Tokenizer
    marker = tmp_path / "marker"
    (tmp_path / "vocab.json").write_bytes(_payloads(marker)["pickle2"])
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(FormatError, match="vocab.json"):
        GPT2Tokenizer.from_pretrained(tmp_path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- source scan

_FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal",
                      "shelve", "torch", "jax", "tensorflow"}
_FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
# text, as a grep would: the builtins eval( / exec( (not a method such as model.eval(),
# nor its definition, nor "train()/eval()" in prose)
_FORBIDDEN_TEXT = re.compile(r"import pickle|pickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True"
                             r"|(?<!def )(?<![\w./])(?:eval|exec)\(")


def _violations(path: Path) -> list:
    source = path.read_text(encoding="utf-8")
    found = [f"text {m.group(0)!r}" for m in _FORBIDDEN_TEXT.finditer(source)]
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name.split(".")[0] in _FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in _FORBIDDEN_MODULES:
                found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in _FORBIDDEN_CALLS:
                found.append(f"call {f.id}()")
            if isinstance(f, ast.Attribute) and f.attr in ("load", "loads") and \
                    isinstance(f.value, ast.Name) and f.value.id in _FORBIDDEN_MODULES:
                found.append(f"call {f.value.id}.{f.attr}()")
            if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant)
                                                   and k.value.value is False)
                   for k in node.keywords):
                found.append("allow_pickle")
    return found


def test_package_source_never_unpickles_evals_or_imports_torch():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30                                   # the scan sees the whole package
    bad = {str(p.relative_to(PACKAGE)): v for p in files if (v := _violations(p))}
    assert not bad, f"forbidden code in the package: {bad}"


def _raw_writes(path: Path) -> list:
    """open(..., "w"/"a"/"x"/"+") and Path.write_text/write_bytes calls: writes that bypass
    io's atomic writers."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in ("write_text", "write_bytes"):
            found.append(f"line {node.lineno}: .{f.attr}()")
        if isinstance(f, ast.Name) and f.id == "open" or \
                isinstance(f, ast.Attribute) and f.attr == "open" and \
                isinstance(f.value, ast.Name) and f.value.id in ("io", "builtins"):
            mode = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            if mode is not None and not (isinstance(mode, ast.Constant) and
                                         not set(str(mode.value)) & set("wax+")):
                found.append(f"line {node.lineno}: open(..., {ast.unparse(mode)})")
    return found


# the only writes outside io's atomic writers: the append-only metrics log (a torn last line
# is dropped on resume) and a kernel knob the memory benchmark pokes
_RAW_WRITES_ALLOWED = {"train.py": 1, "apps/bench_qlora.py": 1}


def test_every_file_the_package_writes_goes_through_atomic_writers():
    raw = {str(p.relative_to(PACKAGE)): w for p in sorted(PACKAGE.rglob("*.py"))
           if p.name != "io.py" and (w := _raw_writes(p))}
    extra = {k: v for k, v in raw.items() if len(v) > _RAW_WRITES_ALLOWED.get(k, 0)}
    assert not extra, f"files written without io.atomic_write (a crash leaves them torn): {extra}"


def test_the_source_scan_catches_what_it_should(tmp_path):
    snippets = ["import pickle\n", "import torch.nn\n", "from pickle import loads\n",
                "x = eval('1')\n", "exec('pass')\n", "np.load(f, allow_pickle=True)\n",
                "import marshal\n", "t = torch.load(p)\n"]
    for i, s in enumerate(snippets):
        p = tmp_path / f"m{i}.py"
        p.write_text(s)
        assert _violations(p), s
    ok = tmp_path / "ok.py"
    ok.write_text("model.eval()\nnp.load(f, allow_pickle=False)\nself.exec_count = 1\n")
    assert _violations(ok) == []
    for s in ["open(p, 'w')\n", "open(p, mode='ab')\n", "open(p, m)\n", "Path(p).write_text(t)\n",
              "io.open(p, 'r+b')\n"]:
        (tmp_path / "w.py").write_text(s)
        assert _raw_writes(tmp_path / "w.py"), s
    (tmp_path / "r.py").write_text("open(p)\nopen(p, 'rb')\nopen(p, encoding='utf-8')\n")
    assert _raw_writes(tmp_path / "r.py") == []


# ----------------------------------------------------------------------------- atomic writes

def _spy_file_ops(monkeypatch):
    """Record fsync'd paths and renames, in order."""
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        try:
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            events.append(("fsync", None))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("rename", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, **kw)

    def rename(src, dst, **kw):
        events.append(("rename", os.fspath(src), os.fspath(dst)))
        return real_rename(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events


def _assert_written_atomically(events, final_path):
    """final_path came from a rename of a fsynced temp sibling (same folder), or sits in a
    folder that itself was renamed from a temp folder after its files were written so."""
    final_path = os.path.realpath(final_path)
    renames = [(i, e[1], e[2]) for i, e in enumerate(events) if e[0] == "rename"]
    for i, src, dst in reversed(renames):                    # the last write wins
        dst = os.path.realpath(dst)
        if dst == final_path:
            assert os.path.dirname(os.path.realpath(src)) == os.path.dirname(dst)
            assert ".tmp-" in os.path.basename(src), src
            assert ("fsync", os.path.realpath(src)) in events[:i], f"{src} not fsynced"
            return
        if final_path.startswith(dst + os.sep):                # written inside a temp folder
            assert ".tmp-" in os.path.basename(src), src
            inner = os.path.join(os.path.realpath(src), os.path.relpath(final_path, dst))
            _assert_written_atomically(events[:i], inner)
            return
    raise AssertionError(f"{final_path} was not written through a rename: {renames}")


def test_checkpoints_adapters_and_json_go_through_fsynced_temp_files(tmp_path, prose, monkeypatch):
    events = _spy_file_ops(monkeypatch)
    t = small_trainer(prose, tmp_path / "run", max_iters=1)
    t.train()
    folder = Path(t.checkpoint)
    for name in ("model.safetensors", "optimizer.safetensors", "config.json", "trainer_state.json"):
        _assert_written_atomically(events, folder / name)
    _assert_written_atomically(events, tmp_path / "run" / "latest.json")
    lora.inject(t.model, lora.LoraConfig(r=2, target_modules=["c_attn"]))
    lora.save_adapter(t.model, tmp_path / "adapter")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        _assert_written_atomically(events, tmp_path / "adapter" / name)
    save_json(tmp_path / "summary.json", {"val_loss": 1.5})
    _assert_written_atomically(events, tmp_path / "summary.json")
    q = _gpt_small()
    quant.quantize_model(q, print_fn=None)
    quant.save_quantized(q, tmp_path / "q4")
    for name in ("model.safetensors", "quantization_config.json"):
        _assert_written_atomically(events, tmp_path / "q4" / name)
    # a resumed run rewrites metrics.jsonl (dropping the steps it will redo) atomically too
    again = small_trainer(prose, tmp_path / "run", max_iters=1)
    events.clear()
    again.resume()
    _assert_written_atomically(events, tmp_path / "run" / "metrics.jsonl")
    assert not list(tmp_path.rglob("*.tmp-*"))              # nothing left behind


# -- SIGKILL while saving: a forked child (tinylora already imported) saves in a loop

def _offset(k: int):
    return np.float32(k * 1e-5)


def _set_version(trainer, base: dict, k: int) -> None:
    """Make every weight, moment and counter a known function of k."""
    for name, p in trainer.model.state_dict().items():
        p.data[...] = tl.backend.asarray(base[name] + _offset(k))
    for st in trainer.optimizer.state.values():
        st["step"] = k
        st["exp_avg"][...] = _offset(k)
        st["exp_avg_sq"][...] = _offset(2 * k)
    trainer.step, trainer.tokens_seen = k, 10 * k


def _kill_while(child_body, rng, max_delay: float | None) -> bool:
    """Fork; the child runs child_body forever; SIGKILL it after a random delay (None: the
    child kills itself). True when the child died by the signal, not by an error of its own."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                             # the child: never returns
        code = 1
        try:
            os.close(r)
            os.write(w, b"go")
            child_body()
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    assert os.read(r, 2) == b"go"
    os.close(r)
    if max_delay is not None:
        time.sleep(rng.uniform(0.0, max_delay))
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _stray(run: Path) -> list:
    return [p for p in run.rglob("*") if ".tmp-" in p.name]


@pytest.mark.cpu_only("os.fork() after CUDA is initialised leaves the child without a GPU")
def test_sigkill_while_saving_checkpoints_always_leaves_a_loadable_one(tmp_path, prose):
    run = tmp_path / "run"
    t = small_trainer(prose, run, max_iters=1, keep_checkpoints=2)
    t.train()                                                # real optimizer state exists
    base = {k: v.numpy().copy() for k, v in t.model.state_dict().items()}
    _set_version(t, base, 1)
    max_delay = 4 * _seconds(t.save)          # kills land before, inside and between saves
    rng, steps_seen, torn, next_k = random.Random(20240229), set(), 0, 2

    for kill in range(24):
        start = next_k

        def saver():
            k = start
            while True:
                _set_version(t, base, k)
                t.save()
                k += 1
        strays = set(_stray(run))
        assert _kill_while(saver, rng, max_delay), "the saving child died of an error"
        next_k += 1000                                       # later rounds write later steps
        torn += bool(set(_stray(run)) - strays)              # left as they are on purpose
        # the checkpoint latest.json names is complete and exactly one version
        folder = resolve_checkpoint(run)
        state = load_json(os.path.join(folder, "trainer_state.json"))
        k = state["step"]
        assert json.load(open(run / "latest.json"))["step"] == k
        assert state["tokens_seen"] == 10 * k and set(state["rng"]) == {"seed", "host", "device"}
        model, tok, _ = load_gpt(run)
        assert tok == prose.tokenizer
        for name, p in model.state_dict().items():
            assert np.array_equal(p.numpy(), base[name] + _offset(k)), (kill, name)
        fresh = small_trainer(prose, run)
        fresh.resume()
        assert fresh.step == k
        for st in fresh.optimizer.state.values():
            assert st["step"] == k and (st["exp_avg"] == _offset(k)).all()
            assert (st["exp_avg_sq"] == _offset(2 * k)).all()
        steps_seen.add(k)
    # the kills landed at many moments: several versions survived, several writes were torn
    assert len(steps_seen) >= 3 and torn >= 3, (len(steps_seen), torn)

    # leftovers of killed saves break neither the next save nor a resume
    assert _stray(run)
    _set_version(t, base, 99_999)
    t.save()
    fresh = small_trainer(prose, run, max_iters=100_001)
    assert fresh.resume().endswith("step-0099999") and fresh.step == 99_999
    fresh.train()                                            # two more steps, then a save
    assert json.load(open(run / "latest.json"))["step"] == 100_001
    done = sorted(p.name for p in (run / "checkpoints").iterdir() if "." not in p.name)
    assert done == ["step-0099999", "step-0100001"]          # keep=2 ignored the strays


@pytest.mark.cpu_only("os.fork() after CUDA is initialised leaves the child without a GPU")
def test_sigkill_while_saving_adapters_always_leaves_a_loadable_one(tmp_path):
    tl.manual_seed(3)
    model = _gpt_small()
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    state = lora.adapter_state_dict(model)
    base = {k: v.numpy().copy() for k, v in state.items()}

    def set_version(k):
        for key, p in state.items():
            p.data[...] = tl.backend.asarray(base[key] + np.float32(k))

    out = tmp_path / "adapter"
    set_version(0)
    max_delay = 4 * _seconds(lambda: lora.save_adapter(model, out))
    rng, seen, torn = random.Random(7), set(), 0
    for kill in range(16):
        first = 1000 * (kill + 1)

        def saver():
            k = first
            while True:
                set_version(k)
                lora.save_adapter(model, out)
                k += 1
        strays = set(_stray(out))
        assert _kill_while(saver, rng, max_delay)
        torn += bool(set(_stray(out)) - strays)
        fresh = _gpt_small()                                 # same seed-free shapes; no check_base
        cfg = lora.load_adapter(fresh, out, check_base=False)
        assert cfg.r == 4
        got = {k: v.numpy() for k, v in lora.adapter_state_dict(fresh).items()}
        offsets = {float(got[k].flat[0] - base[k].flat[0]) for k in got}
        assert len(offsets) == 1, "tensors from two different saves"
        k = round(offsets.pop())
        for key in got:
            assert np.array_equal(got[key], base[key] + np.float32(k)), (kill, key)
        seen.add(k)
    # at least one kill must have landed mid-write (leaving a temp file) for the test to mean
    # anything; how many depends on timing
    assert len(seen) >= 3 and torn >= 1, (seen, torn)
    lora.save_adapter(model, out)                            # leftovers do not get in the way
    lora.load_adapter(_gpt_small(), out, check_base=False)


@pytest.mark.cpu_only("os.fork() after CUDA is initialised leaves the child without a GPU")
def test_resaving_the_same_step_survives_a_kill_between_the_two_renames(tmp_path, prose):
    """Saving step N again (right after resuming from it) moves the old folder aside, then
    moves the new one in; a crash between the two must not lose step N."""
    run = tmp_path / "run"
    t = small_trainer(prose, run, max_iters=2)
    t.train()
    before = {k: v.numpy().copy() for k, v in t.model.state_dict().items()}
    real_rename = os.rename

    def body():
        calls = []

        def rename(src, dst):
            real_rename(src, dst)
            calls.append(dst)
            if ".old-" in os.fspath(dst):                    # the old folder just moved aside
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = rename
        with tl.no_grad():
            for p in t.model.parameters():
                p.data[...] = 0.0
        t.save()                                             # same step 2 again

    assert _kill_while(body, None, None)
    model, _, _ = load_gpt(run)
    for k, v in model.state_dict().items():
        assert np.array_equal(v.numpy(), before[k]), k
    fresh = small_trainer(prose, run, max_iters=3)
    assert fresh.resume() and fresh.step == 2
    fresh.train()
    assert json.load(open(run / "latest.json"))["step"] == 3
