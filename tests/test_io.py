"""tinylora.io: safetensors read/write, atomic writes, JSON and config checks."""
import dataclasses
import hashlib
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import tinylora
from tinylora.configs import ConfigError, config_from_dict
from tinylora.io import (FormatError, atomic_write, atomic_write_bytes, load_json, load_safetensors,
                         read_safetensors_header, save_json, save_safetensors)

DTYPES = {np.float64: "F64", np.float32: "F32", np.float16: "F16", np.int64: "I64",
          np.int32: "I32", np.int16: "I16", np.int8: "I8", np.uint8: "U8", np.uint16: "U16",
          np.uint32: "U32", np.uint64: "U64", np.bool_: "BOOL", np.complex64: "C64"}
SHAPES = [(), (0,), (3, 0, 2), (5,), (2, 3), (2, 1, 4)]
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def sample(dtype, shape, rng):
    x = np.asarray(rng.standard_normal(shape) * 100)
    if dtype is np.bool_:
        return x > 0
    if dtype is np.complex64:
        return (x + 1j * rng.standard_normal(shape)).astype(dtype)
    return x.astype(dtype) if np.dtype(dtype).kind == "f" else (np.abs(x) % 100).astype(dtype)


def write_raw(path, header, data=b""):
    """A safetensors-like file from a header (dict or raw bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(path).write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_round_trip_every_dtype_and_shape(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {f"layer.{i}.w": sample(dtype, s, rng) for i, s in enumerate(SHAPES)}
    path = tmp_path / "m.safetensors"
    save_safetensors(path, tensors, {"step": "7"})
    header, meta = read_safetensors_header(path)
    assert meta == {"step": "7"}
    for mmap in (False, True):
        got, meta = load_safetensors(path, mmap=mmap)
        assert meta == {"step": "7"} and set(got) == set(tensors)
        for k, want in tensors.items():
            assert got[k].dtype == want.dtype and got[k].shape == want.shape  # never upcast
            np.testing.assert_array_equal(got[k], want)
            assert header[k]["dtype"] == DTYPES[dtype] and header[k]["shape"] == list(want.shape)


def test_layout_is_aligned_and_inputs_are_normalised(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    tensors = {"a_byte": np.arange(3, dtype=np.uint8), "b_f64": np.arange(5.0),
               "c_transposed": base.T, "d_strided": base[::2, ::3],
               "e_bigendian": base.astype(">f4"), "f_scalar": np.float16(2.5)}
    path = tmp_path / "x.safetensors"
    save_safetensors(path, tensors)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and raw[8 + n - 1:8 + n] in (b"}", b" ")  # space-padded header
    header, _ = read_safetensors_header(path)
    for k, e in header.items():
        assert (8 + n + e["data_offsets"][0]) % np.dtype(tensors[k].dtype).itemsize == 0
    got, _ = load_safetensors(path)
    for k, want in tensors.items():
        np.testing.assert_array_equal(got[k], want)
        assert got[k].dtype.isnative and got[k].flags.writeable and got[k].flags.c_contiguous
    assert got["f_scalar"].shape == () and got["e_bigendian"].dtype == np.float32


def test_mmap_views_are_read_only_and_keys_select(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"a": np.ones((4, 4), np.float32), "b": np.zeros(3, np.int64)})
    got, _ = load_safetensors(path, mmap=True)
    assert not got["a"].flags.writeable
    with pytest.raises(ValueError):
        got["a"][0, 0] = 2
    only, _ = load_safetensors(path, keys=["b"])
    assert list(only) == ["b"]
    assert list(load_safetensors(path, keys="a")[0]) == ["a"]
    with pytest.raises(KeyError, match="'nope'"):
        load_safetensors(path, keys=["a", "nope"])


def test_interop_with_the_reference_library_both_ways(tmp_path):
    rng = np.random.default_rng(2)
    tensors = {f"t_{DTYPES[d]}": sample(d, (3, 2), rng) for d in DTYPES}
    tensors["scalar"], tensors["empty"] = np.array(1.5, np.float32), np.zeros((0, 4), np.int32)
    meta = {"format": "np", "note": "héllo ✓"}
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    save_safetensors(ours, tensors, meta)
    save_file(tensors, theirs, metadata=meta)
    with safe_open(ours, framework="numpy") as f:
        assert f.metadata() == meta
    loaded = [(load_file(ours), meta)] + [load_safetensors(theirs, mmap=m) for m in (False, True)]
    for got, got_meta in loaded:
        assert got_meta == meta and set(got) == set(tensors)
        for k, want in tensors.items():
            assert got[k].dtype == want.dtype and got[k].shape == want.shape
            np.testing.assert_array_equal(got[k], want)


def test_bf16_and_f8_are_widened_to_float32(tmp_path):
    want = np.array([1.0, -3.0, 0.15625, np.inf, -0.0], np.float32)  # exact in bfloat16
    bf16 = (want.view(np.uint32) >> 16).astype("<u2").tobytes()
    e4m3 = bytes([0x38, 0x7E, 0x01, 0xB8, 0x7F, 0x08])  # 1, 448 (max), 2^-9, -1, NaN, 2^-6
    e5m2 = bytes([0x3C, 0x7C, 0xC0])                    # 1, inf, -2
    header = {"b": entry("BF16", [5], 0, 10), "e": entry("F8_E4M3", [2, 3], 10, 16),
              "m": entry("F8_E5M2", [3], 16, 19)}
    path = write_raw(tmp_path / "w.safetensors", header, bf16 + e4m3 + e5m2)
    got, _ = load_safetensors(path)
    np.testing.assert_array_equal(got["b"], want)
    np.testing.assert_array_equal(got["e"].ravel(), [1, 448, 2.0 ** -9, -1, np.nan, 2.0 ** -6])
    np.testing.assert_array_equal(got["m"], [1, np.inf, -2])
    assert {a.dtype for a in got.values()} == {np.dtype(np.float32)}


def test_save_refuses_what_safetensors_cannot_hold(tmp_path):
    path = tmp_path / "x.safetensors"
    for bad in (np.array([object()]), np.zeros(2, np.complex128), np.array(["ab"])):
        with pytest.raises(TypeError, match="cannot be stored"):
            save_safetensors(path, {"t": bad})
    with pytest.raises(TypeError, match="metadata"):
        save_safetensors(path, {"t": np.zeros(2)}, {"step": 3})
    with pytest.raises(TypeError, match="__metadata__"):
        save_safetensors(path, {"__metadata__": np.zeros(2)})
    assert not path.exists()


# ----------------------------------------------------------------------------- malformed files

U8 = {"dtype": "U8", "shape": [1]}
MALFORMED = [  # (name, header or None for raw bytes, data, text expected in the message)
    ("empty", None, b"", "too short"), ("seven_bytes", None, b"\x01" * 7, "too short"),
    ("length_past_end", None, (1000).to_bytes(8, "little") + b"{}", "only 2 follow"),
    ("length_over_limit", None, (2 ** 63).to_bytes(8, "little") + b"{}", "100 MB"),
    ("not_utf8", b'{"\xff\xfe": 1}', b"", "not UTF-8"),
    ("not_json", b"{'a': 1}", b"", "not valid JSON"), ("json_array", b"[1]", b"", "JSON object"),
    ("duplicate_key", b'{"a": 1, "a": 2}', b"", "duplicate key 'a'"),
    ("nan_in_header", b'{"a": NaN}', b"", "NaN"),
    ("entry_not_object", {"w": [1, 2]}, b"", "tensor 'w': header entry"),
    ("entry_missing_dtype", {"w": {"shape": [1], "data_offsets": [0, 1]}}, b"\0", "no 'dtype'"),
    ("unknown_dtype", {"w": entry("F128", [1], 0, 16)}, b"\0" * 16, "unknown dtype 'F128'"),
    ("shape_not_list", {"w": entry("F32", 4, 0, 16)}, b"\0" * 16, "shape must be"),
    ("shape_negative", {"w": entry("F32", [-1, 4], 0, 16)}, b"\0" * 16, "non-negative"),
    ("shape_bool", {"w": entry("U8", [True], 0, 1)}, b"\0", "shape must be"),
    ("shape_float", {"w": entry("U8", [1.0], 0, 1)}, b"\0", "shape must be"),
    ("too_many_dims", {"w": entry("U8", [1] * 40, 0, 1)}, b"\0", "40 dims"),
    ("impossibly_large", {"w": entry("F32", [0, 2 ** 40, 2 ** 40], 0, 0)}, b"", "impossibly"),
    ("offsets_three", {"w": {**U8, "data_offsets": [0, 1, 2]}}, b"\0", "data_offsets must be"),
    ("offsets_float", {"w": {**U8, "data_offsets": [0, 1.0]}}, b"\0", "data_offsets must be"),
    ("offsets_reversed", {"w": entry("U8", [0], 3, 2)}, b"\0" * 3, "begin <= end"),
    ("size_mismatch", {"w": entry("F32", [2, 2], 0, 12)}, b"\0" * 12,
     "span 12 bytes but shape [2, 2] F32 needs 16"),
    ("truncated", {"x.lora_A.weight": entry("F32", [8, 128], 0, 4096)}, b"\0" * 100,
     "tensor 'x.lora_A.weight' needs 4096 bytes (shape [8, 128] F32) but the file holds 100 "
     "— the file is truncated or corrupt"),
    ("overlap", {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}, b"\0" * 6,
     "overlaps tensor 'a'"),
    ("gap", {"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 4, 6)}, b"\0" * 6, "gap before"),
    ("not_from_zero", {"a": entry("U8", [2], 2, 4)}, b"\0" * 4, "belong to no tensor"),
    ("trailing_bytes", {"a": entry("U8", [2], 0, 2)}, b"\0" * 5, "3 bytes after"),
    ("metadata_not_object", {"__metadata__": ["a"]}, b"", "__metadata__ must be"),
    ("metadata_value_int", {"__metadata__": {"step": 3}}, b"", "__metadata__['step']"),
]


@pytest.mark.parametrize("name,header,data,expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_give_one_line_format_errors(tmp_path, name, header, data, expected):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(data) if header is None else write_raw(path, header, data)
    for read in (load_safetensors, read_safetensors_header,
                 lambda p: load_safetensors(p, mmap=True)):
        with pytest.raises(FormatError) as err:
            read(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg


def test_missing_file_and_folder_are_clear_oserrors(tmp_path):
    for read in (load_safetensors, read_safetensors_header):
        with pytest.raises(FileNotFoundError, match="no such file: .*nope.safetensors"):
            read(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError):
        load_safetensors(tmp_path)


def test_every_truncation_is_a_format_error(tmp_path):
    full = tmp_path / "full.safetensors"
    save_safetensors(full, {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                            "b": np.arange(5, dtype=np.int16), "c": np.zeros((0, 3))},
                     {"k": "v"})
    data, cut = full.read_bytes(), tmp_path / "cut.safetensors"
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        for read in (load_safetensors, read_safetensors_header):
            with pytest.raises(FormatError, match=re.escape(str(cut))):
                read(cut)
    assert len(load_safetensors(full)[0]) == 3


@dataclasses.dataclass
class _Boobytrap:
    marker: str  # unpickling creates this file: what a hostile .bin could do

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickles_and_other_formats_are_refused_never_executed(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Boobytrap(probe))).close()  # the payload runs when unpickled
    assert probe.exists()
    marker = tmp_path / "marker"
    payload = pickle.dumps({"weight": _Boobytrap(marker)}, protocol=4)
    with zipfile.ZipFile(tmp_path / "model.pt", "w") as z:  # torch.save: a zip with data.pkl
        z.writestr("archive/data.pkl", payload)
    (tmp_path / "pytorch_model.bin").write_bytes(payload)
    (tmp_path / "proto2.bin").write_bytes(pickle.dumps(_Boobytrap(marker), protocol=2))
    np.save(tmp_path / "w.npy", np.zeros(3))
    # a plausible length field followed by pickle bytes instead of JSON
    (tmp_path / "sneaky.safetensors").write_bytes(len(payload).to_bytes(8, "little") + payload)
    cases = {"pytorch_model.bin": "pickle", "proto2.bin": "pickle", "model.pt": "zip",
             "w.npy": ".npy", "sneaky.safetensors": "header is not"}
    for name, kind in cases.items():
        with pytest.raises(FormatError, match="safetensors") as err:
            load_safetensors(tmp_path / name)
        assert kind in str(err.value) and name in str(err.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- fuzzing

def _only_format_errors(path, blob):
    path.write_bytes(blob)
    for mmap in (False, True):
        try:
            got, _ = load_safetensors(path, mmap=mmap)
        except FormatError as e:
            assert str(e).startswith(str(path))
            continue
        header, _ = read_safetensors_header(path)
        assert {k: list(v.shape) for k, v in got.items()} == {
            k: e["shape"] for k, e in header.items()}


@FUZZ
@given(blob=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda n, body: n.to_bytes(8, "little") + body,
              st.integers(0, 2 ** 64 - 1) | st.integers(0, 300), st.binary(max_size=300))))
def test_fuzz_random_bytes(tmp_path, blob):
    _only_format_errors(tmp_path / "fuzz.safetensors", blob)


_CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3"]
_junk = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=4),
                  st.integers(-2 ** 70, 2 ** 70), st.lists(st.integers(), max_size=3))
_dim = st.integers(-2, 5) | st.sampled_from([2 ** 31, 2 ** 64, 10 ** 40]) | _junk


def _mostly(good, bad):  # good about 4 times in 5 (one_of would flatten bad's many branches)
    return st.sampled_from([good] * 4 + [bad]).flatmap(lambda s: s)


_fields = {
    "dtype": _mostly(st.sampled_from(_CODES), st.sampled_from(["F4", "f32", ""]) | _junk),
    "shape": _mostly(st.lists(st.integers(0, 4), max_size=3), st.lists(_dim, max_size=4) | _junk),
    "data_offsets": _mostly(st.lists(st.integers(0, 40), min_size=2, max_size=2),
                            st.lists(st.integers(-3, 80) | st.sampled_from([2 ** 63, 2 ** 65]),
                                     max_size=3) | _junk)}
_entry = _mostly(st.fixed_dictionaries(_fields),
                 _junk | st.fixed_dictionaries({}, optional={**_fields, "extra": _junk}))
_meta = _mostly(st.none() | st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
                _junk | st.dictionaries(st.text(max_size=3), _junk, min_size=1, max_size=2))


@FUZZ
@given(header=st.dictionaries(st.text(max_size=4), _entry, max_size=4), meta=_meta,
       data=st.binary(max_size=120), length_delta=_mostly(st.just(0), st.sampled_from([-1, 1, 8])))
def test_fuzz_valid_looking_headers(tmp_path, header, meta, data, length_delta):
    if meta is not None:
        header = {**header, "__metadata__": meta}
    raw = json.dumps(header).encode()
    _only_format_errors(tmp_path / "fuzz.safetensors",
                        (len(raw) + length_delta).to_bytes(8, "little") + raw + data)


@FUZZ
@given(specs=st.lists(st.tuples(st.sampled_from(_CODES), st.lists(st.integers(0, 3), max_size=3)),
                      max_size=4),
       mutation=st.sampled_from(["none", "drop_byte", "add_byte", "shift", "grow", "huge"]),
       which=st.integers(0, 3), seed=st.integers(0, 2 ** 16))
def test_fuzz_consistent_headers_with_one_mutation(tmp_path, specs, mutation, which, seed):
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}
    header, pos = {}, 0
    for i, (code, shape) in enumerate(specs):
        n = int(np.prod(shape)) * size.get(code, 1)
        header[f"t{i}"] = entry(code, shape, pos, pos + n)
        pos += n
    data = bytes(random.Random(seed).getrandbits(8) for _ in range(pos))
    if header:
        target = header[f"t{which % len(header)}"]
        if mutation == "shift":
            target["data_offsets"][0] += 1
        elif mutation in ("grow", "huge"):  # huge dims are consistent when another dim is 0
            target["shape"] = target["shape"] + ([2] if mutation == "grow" else [2 ** 40] * 2)
    data = {"drop_byte": data[:-1], "add_byte": data + b"\0"}.get(mutation, data)
    path = tmp_path / "fuzz.safetensors"
    write_raw(path, header, data)
    _only_format_errors(path, path.read_bytes())
    if mutation == "none":  # consistent files must load, with the shapes the header gives
        got, _ = load_safetensors(path)
        assert {k: list(v.shape) for k, v in got.items()} == {
            k: e["shape"] for k, e in header.items()}


# ----------------------------------------------------------------------------- atomic writes

def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_safetensors(path, {"w": np.ones(4, np.float32)})
    before = path.read_bytes()
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with atomic_write(path) as f:
                f.write(b"half a file")
                raise exc("boom")
    with pytest.raises(TypeError):  # a bad tensor fails before a byte is written
        save_safetensors(path, {"w": np.array([object()])})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_atomic_write_creates_folders_and_keeps_permissions(tmp_path):
    path = tmp_path / "a" / "b" / "notes.txt"
    with atomic_write(path, "w") as f:
        f.write("héllo\n")
    assert path.read_bytes() == "héllo\n".encode()
    os.chmod(path, 0o600)
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and (path.stat().st_mode & 0o777) == 0o600
    assert sorted(os.listdir(path.parent)) == ["notes.txt"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(path, "a"):
            pass


def test_unwritable_folder_is_a_clear_oserror(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=f"cannot write into folder '{re.escape(str(blocker))}"):
        save_json(blocker / "cfg.json", {})  # a folder that is a file can't be created
    real_open = os.open  # root ignores chmod, so deny the temp file's creation by hand

    def deny(p, *args, **kw):
        if ".tmp-" in str(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *args, **kw)
    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(PermissionError, match=r"'.*ro' \(Permission denied\).*permissions"):
        save_json(tmp_path / "ro" / "cfg.json", {})


def test_sigkill_during_saves_never_leaves_a_broken_file(tmp_path):
    """A child saves two alternating ~3 MB checkpoints in a loop; we SIGKILL it 24 times."""
    script = tmp_path / "saver.py"
    script.write_text(textwrap.dedent("""
        import hashlib, sys
        import numpy as np
        from tinylora.io import save_safetensors
        versions = []
        for v in (1.0, 2.0):
            t = {"w": np.full((768, 1024), v, np.float32), "b": np.full(1024, v, np.float32)}
            digest = hashlib.sha256(t["w"].tobytes() + t["b"].tobytes()).hexdigest()
            versions.append((t, {"value": repr(v), "sha256": digest}))
        save_safetensors(sys.argv[1], *versions[0])
        print("ready", flush=True)
        i = 1
        while True:
            save_safetensors(sys.argv[1], *versions[i % 2])
            i += 1
    """))
    path, rng, seen, torn = tmp_path / "ckpt.safetensors", random.Random(1234), set(), 0
    env = {**os.environ, "PYTHONPATH": str(Path(tinylora.__file__).parents[1])}
    for _ in range(24):
        child = subprocess.Popen([sys.executable, str(script), str(path)], env=env,
                                 stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"ready\n"
        child.stdout.close()
        time.sleep(rng.uniform(0.0, 0.06))
        child.send_signal(signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
        got, meta = load_safetensors(path)
        digest = hashlib.sha256(got["w"].tobytes() + got["b"].tobytes()).hexdigest()
        assert digest == meta["sha256"] and meta["value"] in ("1.0", "2.0")
        assert (got["w"] == float(meta["value"])).all() and got["w"].shape == (768, 1024)
        seen.add(meta["value"])
        for stray in tmp_path.glob(".ckpt.safetensors.tmp-*"):  # killed mid-write
            torn += 1
            stray.unlink()
    assert torn >= 3 and seen == {"1.0", "2.0"}  # the kills did land inside writes


# ----------------------------------------------------------------------------- JSON

def test_save_json_is_sorted_indented_and_strict(tmp_path):
    path = tmp_path / "cfg.json"
    save_json(path, {"b": (1, 2), "a": {"loss": np.float32(0.5), "ok": True, "x": None}})
    assert path.read_text() == ('{\n  "a": {\n    "loss": 0.5,\n    "ok": true,\n    "x": null\n'
                                '  },\n  "b": [\n    1,\n    2\n  ]\n}\n')
    assert load_json(path) == {"a": {"loss": 0.5, "ok": True, "x": None}, "b": [1, 2]}
    bad = [({"h": [1.0, float("nan")]}, ValueError, r"\['h'\]\[1\] is nan; JSON has no NaN"),
           ({"x": float("inf")}, ValueError, "inf"), ({1: "a"}, TypeError, "not a str"),
           ({"w": np.zeros(2)}, TypeError, r"ndarray.*\.tolist"), ({"s": {1}}, TypeError, "set")]
    for obj, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            save_json(path, obj)
    loop = []
    loop.append(loop)
    with pytest.raises(ValueError, match="contains itself"):
        save_json(path, loop)
    assert load_json(path)["b"] == [1, 2]  # failed saves left the old file


def test_load_json_errors_name_file_and_line(tmp_path):
    cases = {"bad.json": (b'{\n  "a": 1,\n  "b": oops\n}', "line 3 column 8"),
             "latin1.json": (b'{"name": "caf\xe9"}', "not UTF-8"),
             "nan.json": (b'{"a": NaN}', "NaN"), "dup.json": (b'{"a": 1, "a": 2}', "duplicate")}
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FormatError, match=msg) as err:
            load_json(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name))
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert load_json(tmp_path / "bom.json") == {"a": 1}
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_json(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- configs

@dataclasses.dataclass
class _Cfg:
    r: int
    lora_alpha: float = 16.0
    target_modules: typing.List[str] = dataclasses.field(default_factory=list)
    bias: typing.Literal["none", "all"] = "none"
    name: "str | None" = None
    sizes: typing.Tuple[int, ...] = (1, 2)
    use_dora: bool = False


def test_config_from_dict_checks_fields_and_types(tmp_path):
    cfg = config_from_dict(_Cfg, {"r": 8, "lora_alpha": 32, "sizes": [3], "name": None})
    assert cfg == _Cfg(r=8, lora_alpha=32.0, sizes=(3,)) and isinstance(cfg.lora_alpha, float)
    save_json(tmp_path / "c.json", dataclasses.asdict(cfg))
    assert config_from_dict(_Cfg, load_json(tmp_path / "c.json")) == cfg
    src = "adapter_config.json"
    bad = [({}, "missing required _Cfg field.*: r"),
           ({"r": 8, "lora_alpah": 1, "rank": 2},
            r"unknown _Cfg field\(s\): 'lora_alpah' \(did you mean 'lora_alpha'\?\), 'rank'"),
           ({"r": "8"}, "field 'r' must be int, got str '8'"), ({"r": True}, "'r' must be int"),
           ({"r": 8, "use_dora": 1}, "'use_dora' must be bool"),
           ({"r": 8, "target_modules": ["q", 1]}, "'target_modules' must be List"),
           ({"r": 8, "bias": "some"}, "'bias' must be Literal"),
           ({"r": 8, "name": 3}, "'name' must be"), ([8], "must be a JSON object")]
    for d, msg in bad:
        with pytest.raises(ConfigError, match=f"^{src}: .*{msg}"):
            config_from_dict(_Cfg, d, source=src)
    with pytest.raises(TypeError):
        config_from_dict(dict, {})
