"""Property tests: every file loader, fed random bytes and random valid-looking content,
raises only its documented error types (and a failed load changes nothing); and ops keep
each input's shape in its gradient for random shapes (matmul broadcasting, fancy indexing,
cat and stack). test_io.py fuzzes the safetensors reader itself; this covers what is
built on it.

Documented errors, by loader:
  lora.load_adapter            FormatError (ConfigError), AdapterLoadError (BaseModelMismatchError)
  checkpoint.load_gpt          FormatError (ConfigError), StateDictError
  Trainer.resume               FormatError, StateDictError
  optim.load_optimizer         FormatError
  quant.load_quantized         FormatError, StateDictError
  io.load_json                 FormatError
  configs.config_from_dict     ConfigError
  LoraConfig.from_peft_dict    ConfigError
  BertConfig.from_dict         BertLoadError, ConfigError (both FormatErrors)
  CharTokenizer.from_dict      ValueError
  WordPieceTokenizer(vocab)    FormatError (not UTF-8), ValueError (no special tokens)
"""
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import tinylora as tl
from tinylora import lora, quant
from tinylora.checkpoint import load_gpt, resolve_checkpoint
from tinylora.data import CharTokenizer, load_data
from tinylora.configs import ConfigError, config_from_dict
from tinylora.io import FormatError, load_json, save_safetensors
from tinylora.lora import AdapterLoadError
from tinylora.lora.adapters import CONFIG_NAME, WEIGHTS_NAME
from tinylora.models import GPT, GPTConfig
from tinylora.models.bert import BertConfig, BertLoadError
from tinylora.data.wordpiece import WordPieceTokenizer
from tinylora.nn import StateDictError
from tinylora.optim import load_optimizer
from tinylora.train import TrainConfig, Trainer

# TINYLORA_FUZZ_EXAMPLES=2000 fuzzes deeper (each test's default is sized for the suite)
_SCALE = int(os.environ.get("TINYLORA_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    return settings(max_examples=_SCALE or examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


FUZZ = fuzz(40)         # loaders that copy a folder per example
FUZZ_FAST = fuzz(300)   # pure functions of a dict
TINY = dict(block_size=8, n_layer=1, n_head=2, n_embd=8)

# ----------------------------------------------------------------------------- strategies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.sampled_from([0, 1, -1, 2, 64])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10)


# values that break naive code: zero and negative sizes, huge ints, empty containers
_EDGE = [0, -1, 1, 2, 3, 10 ** 9, 2 ** 63, -2 ** 63, 0.5, 1e300, "", "x", None, True, False,
         [], {}, [0], {"": 0}]


def _paths(obj, prefix=()):
    """Every (path to a dict key or list index) inside obj."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_paths(v, prefix + (k,)))
    return out


@st.composite
def mutated(draw, base):
    """``base`` (a JSON-able dict) with 1-3 random edits: drop a key, replace a value by any
    JSON value, or add a key (often a known one, moved to the wrong place)."""
    d = copy.deepcopy(base)
    names = sorted({str(p[-1]) for p in _paths(base) if isinstance(p[-1], str)})
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(d)
        op = draw(st.sampled_from(["drop", "set", "set", "add"]))
        if not paths:
            op = "add"
        value = copy.deepcopy(draw(st.sampled_from(_EDGE) | json_values))   # no shared lists
        if op == "add":
            d[draw(st.sampled_from(names) | st.text(max_size=6))] = value
            continue
        path = draw(st.sampled_from(paths))
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        if op == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return d


def file_bytes(valid: bytes):
    """Random bytes, or the valid file truncated, or with a few bytes overwritten."""
    return st.one_of(
        st.binary(max_size=200),
        st.integers(0, max(0, len(valid) - 1)).map(lambda n: valid[:n]),
        st.lists(st.tuples(st.integers(0, max(0, len(valid) - 1)), st.integers(0, 255)),
                 min_size=1, max_size=4).map(lambda edits: _overwrite(valid, edits)))


def _overwrite(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for i, v in edits:
        b[i] = v
    return bytes(b)


DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_]


@st.composite
def tensor_dicts(draw, names):
    """A valid safetensors payload whose tensors have some of the expected names (or others),
    random small shapes and dtypes: a valid-looking file with the wrong content."""
    chosen = draw(st.lists(st.sampled_from(sorted(names)) | st.text(min_size=1, max_size=8),
                           max_size=len(names) + 2, unique=True))
    out = {}
    for k in chosen:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        dt = draw(st.sampled_from(DTYPES))
        out[k] = np.ones(shape, dt) if dt is not np.bool_ else np.zeros(shape, bool)
    return out


def expect(call, allowed):
    """Run call; a failure must be one of ``allowed`` (exact documented classes or their
    subclasses) and one line. Returns the error or None."""
    try:
        call()
    except allowed as e:
        msg = str(e)
        assert msg.strip() and "\n" not in msg.strip(), repr(msg)
        assert type(e) not in (KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError)
        return e
    except BaseException as e:  # noqa: BLE001
        raise AssertionError(f"leaked {type(e).__name__}: {e}") from e
    return None


def write(path: Path, content) -> None:
    if isinstance(content, (bytes, bytearray)):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content))


def model_state(model):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.numpy().copy() for k, v in model.state_dict().items()})


def assert_state(before, model):
    mods, tensors = model_state(model)
    assert mods == before[0]
    for k, v in before[1].items():
        assert np.array_equal(v, tensors[k], equal_nan=True), k


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def prose():
    return load_data("builtin:prose", block_size=8)


@pytest.fixture(scope="module")
def files(tmp_path_factory, prose):
    root = tmp_path_factory.mktemp("fuzz")
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, **TINY))
    t = Trainer(model, prose, TrainConfig(max_iters=2, batch_size=2, eval_interval=0,
                                          progress=False), root / "run")
    t.train()
    lora.inject(model, lora.LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    lora.save_adapter(model, root / "adapter")
    q = GPT(GPTConfig(vocab_size=96, **{**TINY, "n_embd": 64}))
    quant.quantize_model(q, print_fn=None)
    quant.save_quantized(q, root / "q4")
    return {"run": root / "run", "ckpt": Path(resolve_checkpoint(root / "run")),
            "adapter": root / "adapter", "q4": root / "q4"}


def _read(path):
    return Path(path).read_bytes()


def _json(path):
    return json.loads(Path(path).read_text())


def _tensors(path):
    from tinylora.io import load_safetensors
    return load_safetensors(path)


# ----------------------------------------------------------------------------- adapters

def fresh_gpt():
    tl.manual_seed(0)
    return GPT(GPTConfig(vocab_size=96, **TINY))


@pytest.fixture(scope="module")
def adapter_case(files):
    cfg = _json(files["adapter"] / CONFIG_NAME)
    tensors, meta = _tensors(files["adapter"] / WEIGHTS_NAME)
    return cfg, tensors, meta, _read(files["adapter"] / CONFIG_NAME), _read(files["adapter"] / WEIGHTS_NAME)


def _load_adapter_with(adapter_case, config=None, weights=None):
    cfg, tensors, meta, raw_cfg, raw_w = adapter_case
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write(d / CONFIG_NAME, raw_cfg if config is None else config)
        if isinstance(weights, dict):
            save_safetensors(d / WEIGHTS_NAME, weights, meta)
        else:
            write(d / WEIGHTS_NAME, raw_w if weights is None else weights)
        m = fresh_gpt()
        before = model_state(m)
        err = expect(lambda: lora.load_adapter(m, d), (FormatError, AdapterLoadError))
        if err is not None:
            assert_state(before, m)


@FUZZ
@given(data=st.data())
def test_fuzz_adapter_config(adapter_case, data):
    cfg = adapter_case[0]
    content = data.draw(st.one_of(mutated(cfg), json_values, file_bytes(adapter_case[3])))
    _load_adapter_with(adapter_case, config=content)


@FUZZ
@given(data=st.data())
def test_fuzz_adapter_weights(adapter_case, data):
    names = adapter_case[1].keys()
    content = data.draw(st.one_of(file_bytes(adapter_case[4]), tensor_dicts(names)))
    _load_adapter_with(adapter_case, weights=content)


# ----------------------------------------------------------------------------- checkpoints

def _with_checkpoint(files, name, content, call):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ckpt"
        shutil.copytree(files["ckpt"], folder)
        if isinstance(content, dict) and name.endswith(".safetensors"):
            save_safetensors(folder / name, content)
        else:
            write(folder / name, content)
        return call(folder)


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_config(files, data):
    valid = _json(files["ckpt"] / "config.json")
    content = data.draw(st.one_of(mutated(valid), mutated(valid), json_values,
                                  file_bytes(_read(files["ckpt"] / "config.json"))))
    _with_checkpoint(files, "config.json", content,
                     lambda f: expect(lambda: load_gpt(f), (FormatError, StateDictError)))


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_weights(files, data):
    names, _ = _tensors(files["ckpt"] / "model.safetensors")
    content = data.draw(st.one_of(file_bytes(_read(files["ckpt"] / "model.safetensors")),
                                  tensor_dicts(names.keys())))
    _with_checkpoint(files, "model.safetensors", content,
                     lambda f: expect(lambda: load_gpt(f), (FormatError, StateDictError)))


@FUZZ
@given(content=st.one_of(json_values, st.binary(max_size=40),
                         st.fixed_dictionaries({"checkpoint": json_values, "step": json_values}),
                         st.fixed_dictionaries({"checkpoint": st.sampled_from(
                             ["checkpoints", "..", "/", "checkpoints/step-0000002/x", ""])})))
def test_fuzz_latest_json(files, content):
    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        shutil.copytree(files["run"], run)
        write(run / "latest.json", content)
        expect(lambda: load_gpt(run), (FormatError, StateDictError, FileNotFoundError))


def live_trainer(prose, files):
    """A trainer mid-run (resumed from the valid checkpoint: it has optimizer state), fresh
    for each example so that one example's successful load cannot affect the next."""
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, **TINY))
    t = Trainer(model, prose, TrainConfig(max_iters=1, batch_size=2, eval_interval=0,
                                          progress=False))
    t.resume(files["ckpt"])
    return t


def _trainer_view(t):
    return (model_state(t.model), t.step, t.tokens_seen, t.skipped, len(t.evals),
            {k: (v["step"], v["exp_avg"].copy()) for k, v in t.optimizer.state.items()},
            json.dumps(tl.backend.get_rng_state()))


def _resume_expecting_no_change(t, folder):
    before = _trainer_view(t)
    err = expect(lambda: t.resume(folder), (FormatError, StateDictError))
    if err is None:
        return
    after = _trainer_view(t)
    assert_state(before[0], t.model)
    assert before[1:5] == after[1:5] and before[6] == after[6]
    assert before[5].keys() == after[5].keys()
    for k, (s, m) in before[5].items():
        assert s == after[5][k][0] and np.array_equal(m, after[5][k][1])


@FUZZ
@given(data=st.data())
def test_fuzz_trainer_state_on_resume(files, prose, data):
    valid = _json(files["ckpt"] / "trainer_state.json")
    content = data.draw(st.one_of(mutated(valid), mutated(valid), json_values,
                                  file_bytes(_read(files["ckpt"] / "trainer_state.json"))))
    t = live_trainer(prose, files)
    _with_checkpoint(files, "trainer_state.json", content,
                     lambda f: _resume_expecting_no_change(t, f))


# ----------------------------------------------------------------------------- optimizer state

@FUZZ
@given(data=st.data())
def test_fuzz_optimizer_state(files, prose, data):
    path = files["ckpt"] / "optimizer.safetensors"
    tensors, meta = _tensors(path)
    valid = json.loads(meta["tinylora.optimizer"])
    kind = data.draw(st.sampled_from(["bytes", "meta", "meta", "tensors"]))
    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "optimizer.safetensors"
        if kind == "bytes":
            target.write_bytes(data.draw(file_bytes(_read(path))))
        elif kind == "meta":
            m = data.draw(st.one_of(mutated(valid), json_values))
            save_safetensors(target, tensors, {"tinylora.optimizer": json.dumps(m)})
        else:
            t = data.draw(tensor_dicts(tensors.keys()))
            save_safetensors(target, t, meta)
        t = live_trainer(prose, files)
        before = _trainer_view(t)
        groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                                for g in t.optimizer.param_groups])
        err = expect(lambda: load_optimizer(target, t.optimizer), (FormatError,))
        if err is not None:                                      # nothing changed
            after = _trainer_view(t)
            assert before[5].keys() == after[5].keys()
            for k, (s, m) in before[5].items():
                assert s == after[5][k][0] and np.array_equal(m, after[5][k][1])
            assert groups == [{k: v for k, v in g.items() if k != "params"}
                              for g in t.optimizer.param_groups]
        else:                                                    # what loaded can take a step
            for g in t.optimizer.param_groups:
                assert isinstance(g["betas"], tuple) and len(g["betas"]) == 2
                assert all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in (g["lr"], g["eps"], g["weight_decay"], *g["betas"]))


# ----------------------------------------------------------------------------- quantized

@FUZZ
@given(data=st.data())
def test_fuzz_quantization_config(files, data):
    valid = _json(files["q4"] / "quantization_config.json")
    content = data.draw(st.one_of(mutated(valid), json_values))
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "q4"
        shutil.copytree(files["q4"], folder)
        write(folder / "quantization_config.json", content)
        tl.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=96, **{**TINY, "n_embd": 64}))
        before = model_state(m)
        if expect(lambda: quant.load_quantized(m, folder), (FormatError, StateDictError)):
            assert_state(before, m)


# ----------------------------------------------------------------------------- JSON configs

@FUZZ_FAST
@given(d=st.one_of(json_values, mutated({"vocab_size": 96, "block_size": 8, "n_layer": 1,
                                         "n_head": 2, "n_embd": 8, "dropout": 0.0, "bias": True})))
def test_fuzz_gpt_config(d):
    expect(lambda: config_from_dict(GPTConfig, d, source="config.json"), (ConfigError,))


@FUZZ_FAST
@given(d=st.one_of(json_values, mutated({k: v for k, v in vars(TrainConfig()).items()})))
def test_fuzz_train_config(d):
    expect(lambda: config_from_dict(TrainConfig, d, source="config.json"), (ConfigError,))


@FUZZ_FAST
@given(d=st.one_of(json_values, mutated(lora.LoraConfig(target_modules=["c_attn"]).to_peft_dict())))
def test_fuzz_adapter_config_dict(d):
    expect(lambda: lora.LoraConfig.from_peft_dict(d), (ConfigError,))


@FUZZ_FAST
@given(d=st.one_of(json_values, mutated({"model_type": "bert", "vocab_size": 8, "hidden_size": 4,
                                         "num_hidden_layers": 1, "num_attention_heads": 2,
                                         "intermediate_size": 8, "hidden_act": "gelu",
                                         "layer_norm_eps": 1e-12, "pad_token_id": 0})))
def test_fuzz_bert_config(d):
    expect(lambda: BertConfig.from_dict(d, source="config.json"), (BertLoadError, ConfigError))


@FUZZ_FAST
@given(blob=file_bytes(b'{"a": [1, 2.5, "x", null, true], "b": {"c": {}}}\n'))
def test_fuzz_load_json(blob):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.json"
        p.write_bytes(blob)
        expect(lambda: load_json(p), (FormatError,))


# ----------------------------------------------------------------------------- tokenizers

@FUZZ_FAST
@given(d=st.one_of(json_values, st.fixed_dictionaries({"type": st.just("char"),
                                                       "vocab": st.text(max_size=30)})))
def test_fuzz_char_tokenizer_from_dict(d):
    tok = None

    def build():
        nonlocal tok
        tok = CharTokenizer.from_dict(d)
    if expect(build, (ValueError,)) is None:                        # a valid one round-trips
        text = "".join(tok.vocab)
        assert tok.decode(tok.encode(text)) == text


SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@FUZZ_FAST
@given(blob=st.one_of(
    st.binary(max_size=120),
    st.lists(st.text(max_size=6), max_size=12).map(lambda ws: "\n".join(SPECIAL + ws).encode()),
    st.lists(st.text(max_size=6), max_size=12).map(lambda ws: "\r\n".join(ws + SPECIAL[:3]).encode())),
    text=st.text(max_size=30))
def test_fuzz_wordpiece_vocab(blob, text):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "vocab.txt"
        p.write_bytes(blob)
        tok = []
        err = expect(lambda: tok.append(WordPieceTokenizer(p)), (FormatError, ValueError))
        if err is None:                                             # a valid vocab tokenizes
            ids = tok[0](text)["input_ids"]
            assert ids.shape[0] == 1 and 0 <= ids.min() and ids.max() < tok[0].vocab_size


# ----------------------------------------------------------------------------- op shapes

OPS_FUZZ = settings(max_examples=40, deadline=None, database=None)


@st.composite
def matmul_shapes(draw):
    """(a, b) shapes that matmul accepts: 1-d vectors, matrices, broadcast batch dims."""
    n, k, m = (draw(st.integers(1, 3)) for _ in range(3))
    batch = draw(st.lists(st.integers(1, 3), max_size=2))

    def side(core):
        keep = draw(st.integers(0, len(batch)))
        b = [1 if draw(st.booleans()) else x for x in batch[len(batch) - keep:]]
        return tuple(b) + core
    a = (k,) if draw(st.integers(0, 4)) == 0 else side((n, k))
    b = (k,) if draw(st.integers(0, 4)) == 0 else side((k, m))
    return a, b


def _check_grads(fn, inputs):
    out = fn(*inputs)
    out.sum().backward()
    for t in inputs:
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype
    for t in inputs:
        t.grad = None
    assert tl.gradcheck(fn, inputs).ok


@OPS_FUZZ
@given(shapes=matmul_shapes(), seed=st.integers(0, 2 ** 16))
def test_matmul_broadcasting_gradients_keep_shapes(shapes, seed):
    rng = np.random.default_rng(seed)
    a = tl.tensor(rng.standard_normal(shapes[0]), requires_grad=True)
    b = tl.tensor(rng.standard_normal(shapes[1]), requires_grad=True)
    expected = np.matmul(a.numpy(), b.numpy())
    assert np.allclose((a @ b).numpy(), expected)
    _check_grads(lambda x, y: x @ y, [a, b])


def _on_device(i):
    return tl.backend.asarray(i) if isinstance(i, np.ndarray) else i


@OPS_FUZZ
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), data=st.data())
def test_getitem_with_random_index_arrays(shape, data):
    rng = np.random.default_rng(len(shape))
    x = tl.tensor(rng.standard_normal(shape), requires_grad=True)
    kind = data.draw(st.sampled_from(["ints", "ints2d", "mask", "mixed", "negative"]))
    n0 = shape[0]
    if kind == "ints":          # repeats add up in the gradient
        idx = np.array(data.draw(st.lists(st.integers(0, n0 - 1), min_size=1, max_size=6)))
    elif kind == "negative":
        idx = np.array(data.draw(st.lists(st.integers(-n0, n0 - 1), min_size=1, max_size=6)))
    elif kind == "ints2d":
        idx = np.array(data.draw(st.lists(st.integers(0, n0 - 1), min_size=4, max_size=4))).reshape(2, 2)
    elif kind == "mask":
        idx = np.array(data.draw(st.lists(st.booleans(), min_size=n0, max_size=n0)))
    else:                       # an index array and a slice
        rows = np.array(data.draw(st.lists(st.integers(0, n0 - 1), min_size=1, max_size=4)))
        idx = (rows, slice(None, None, -1)) if len(shape) > 1 else rows
    expected = x.numpy()[idx]
    dev = tuple(_on_device(i) for i in idx) if isinstance(idx, tuple) else _on_device(idx)
    y = x[dev]
    assert np.array_equal(y.numpy(), expected)
    y.sum().backward()
    counts = np.zeros(shape)
    np.add.at(counts, idx, 1.0)                                    # how often each element was taken
    assert x.grad.shape == x.shape and np.array_equal(x.grad.numpy(), counts)
    x.grad = None
    if expected.size:
        assert tl.gradcheck(lambda t: t[dev] * t[dev], [x]).ok


@OPS_FUZZ
@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3), data=st.data())
def test_cat_and_stack_split_the_gradient_back(shape, data):
    ndim = len(shape)
    dim = data.draw(st.integers(-ndim, ndim - 1))
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    rng = np.random.default_rng(sum(sizes))
    parts = []
    for s in sizes:
        sh = list(shape)
        sh[dim] = s
        parts.append(tl.tensor(rng.standard_normal(sh), requires_grad=True))
    assert np.array_equal(tl.cat(parts, dim).numpy(), np.concatenate([p.numpy() for p in parts], dim))
    _check_grads(lambda *ps: tl.cat(list(ps), dim) ** 2, parts)
    sdim = data.draw(st.integers(-(ndim + 1), ndim))
    same = [tl.tensor(rng.standard_normal(shape), requires_grad=True) for _ in sizes]
    assert np.array_equal(tl.stack(same, sdim).numpy(), np.stack([p.numpy() for p in same], sdim))
    _check_grads(lambda *ps: tl.stack(list(ps), sdim) ** 2, same)
