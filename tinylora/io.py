"""Files, never pickles: safetensors and JSON, read strictly and written atomically.

safetensors layout: an 8-byte little-endian u64 N, then N bytes of UTF-8 JSON
``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}``
(space-padded so the data starts 8-byte aligned), then the data buffer, which the offsets
count from. We implement it here so that every malformed file becomes one clear
``FormatError`` naming the file, and so that reading needs no extra copy (``mmap=True``
maps the file; otherwise each tensor is read straight into its own array).

Writes go to a temporary file in the target's folder, are fsynced, then renamed over the
target: a crash or SIGKILL at any moment leaves either the old file or the new one, never
half of one (a stray ``.NAME.tmp-*`` file may remain after a kill).
"""
from __future__ import annotations

import contextlib
import json
import math
import mmap as _mmap
import os
import secrets
import stat
import types

from .backend import np, to_numpy

__all__ = ["FormatError", "ConfigError", "decode_utf8", "save_safetensors", "load_safetensors",
           "read_safetensors_header", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "make_folder", "save_json", "load_json", "config_from_dict"]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit against JSON bombs
_MAX_NDIM = 32                        # NumPy's limit is 64 (32 in NumPy 1.x)
_MAX_NBYTES = 2 ** 62                 # larger shapes make NumPy raise even when one dim is 0


class FormatError(ValueError):
    """A file that is not what it claims: bad safetensors, bad JSON, a config's wrong fields."""


def _fail(where, msg: str):
    raise FormatError(f"{where}: {msg}")


# ----------------------------------------------------------------------------- dtypes
# code -> (storage dtype as read from disk, bytes per element). BF16 and F8 are stored as
# raw bits and widened to float32 on load, since NumPy has no such types.
_DTYPES = {
    "BOOL": ("u1", 1), "U8": ("u1", 1), "I8": ("i1", 1),
    "U16": ("<u2", 2), "I16": ("<i2", 2), "F16": ("<f2", 2), "BF16": ("<u2", 2),
    "U32": ("<u4", 4), "I32": ("<i4", 4), "F32": ("<f4", 4),
    "U64": ("<u8", 8), "I64": ("<i8", 8), "F64": ("<f8", 8), "C64": ("<c8", 8),
    "F8_E4M3": ("u1", 1), "F8_E5M2": ("u1", 1),
}
# (numpy kind, itemsize) -> code, for writing; never upcast
_CODE_OF = {("b", 1): "BOOL", ("u", 1): "U8", ("i", 1): "I8", ("u", 2): "U16", ("i", 2): "I16",
            ("f", 2): "F16", ("u", 4): "U32", ("i", 4): "I32", ("f", 4): "F32",
            ("u", 8): "U64", ("i", 8): "I64", ("f", 8): "F64", ("c", 8): "C64"}


def _widen(code: str, raw):
    """Stored bits -> a NumPy array: BF16/F8 become float32, everything else native order."""
    if code == "BF16":  # bfloat16 is the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if code == "F8_E5M2":  # e5m2 is the top byte of a float16
        return (raw.astype(np.uint16) << 8).view(np.float16).astype(np.float32)
    if code == "F8_E4M3":  # 1 sign, 4 exponent (bias 7), 3 mantissa bits; x.1111.111 is NaN
        b = np.arange(256)  # decode all 256 codes once, then look each byte up
        e, m = (b >> 3) & 15, (b & 7) / 8
        mag = np.where(e == 0, m * 2.0 ** -6, (1 + m) * 2.0 ** (e - 7))
        mag[(b & 127) == 127] = np.nan
        return np.where(b >= 128, -mag, mag).astype(np.float32)[raw]
    if code == "BOOL":
        return raw.view(np.bool_)
    if not raw.dtype.isnative:  # only on big-endian hosts
        return raw.astype(raw.dtype.newbyteorder("="))
    return raw


# ----------------------------------------------------------------------------- header checks

# first bytes of formats people hand us by mistake; pickle protocols 2-5 open with 0x80 <proto>
_FOREIGN = [(b"\x80" + bytes([p]), "a Python pickle (PyTorch .bin/.pt)") for p in (2, 3, 4, 5)] + [
    (b"PK\x03\x04", "a zip archive (torch.save .pt/.bin, or NumPy .npz)"),
    (b"\x93NUMPY", "a NumPy .npy array"), (b"\x89HDF", "an HDF5 file"), (b"GGUF", "a GGUF file")]


def _header_fail(where, head: bytes, msg: str):
    """A header that is not safetensors; says which other format it is when we can tell."""
    # sniffed only after parsing failed: a valid header of length 0x0280.. also starts with 0x80
    kind = next((k for magic, k in _FOREIGN if head.startswith(magic)), None)
    if kind:
        _fail(where, f"this is {kind}, not safetensors; tinylora reads tensors only from "
                     "safetensors files and never unpickles (that can run arbitrary code) — "
                     "convert it to .safetensors with a tool you trust")
    _fail(where, f"{msg} — expected safetensors (8-byte header length, JSON header, data)")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _strict_json(text: str):
    def no_constants(name):  # Python's json accepts NaN/Infinity; JSON does not
        raise ValueError(f"{name} is not valid JSON")
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=no_constants)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(where, name, info, buffer_len):
    """One header entry -> (code, shape tuple, begin, end), or FormatError."""
    t = f"tensor {name!r}"
    if not isinstance(info, dict):
        _fail(where, f"{t}: header entry must be an object with dtype/shape/data_offsets, "
                     f"got {type(info).__name__}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        _fail(where, f"{t}: header entry has no {missing[0]!r}")
    code, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in _DTYPES:
        _fail(where, f"{t}: unknown dtype {code!r} (known: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        _fail(where, f"{t}: shape must be a list of non-negative ints, got {shape!r:.80}")
    if len(shape) > _MAX_NDIM:
        _fail(where, f"{t}: shape has {len(shape)} dims, more than the {_MAX_NDIM} supported")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
        _fail(where, f"{t}: data_offsets must be [begin, end] ints, got {offs!r:.80}")
    begin, end = offs
    if not 0 <= begin <= end:
        _fail(where, f"{t}: data_offsets [{begin}, {end}] must satisfy 0 <= begin <= end")
    itemsize = _DTYPES[code][1]
    need = math.prod(shape) * itemsize
    if math.prod(d for d in shape if d) * itemsize > _MAX_NBYTES:
        _fail(where, f"{t}: shape {shape} {code} is impossibly large")
    if end - begin != need:
        _fail(where, f"{t}: data_offsets [{begin}, {end}] span {end - begin} bytes but shape "
                     f"{shape} {code} needs {need}")
    if end > buffer_len:
        _fail(where, f"{t} needs {need} bytes (shape {shape} {code}) but the file holds "
                     f"{max(0, buffer_len - begin)} — the file is truncated or corrupt")
    return code, tuple(shape), begin, end


def _parse_header(where, raw: bytes, buffer_len: int, head: bytes):
    """The JSON header bytes -> ({name: (code, shape, begin, end)}, metadata), fully checked."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _header_fail(where, head, f"header is not UTF-8 (byte {raw[e.start]:#04x} at offset "
                                  f"{8 + e.start})")
    try:
        obj = _strict_json(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        _header_fail(where, head, f"header is not valid JSON ({str(e)[:200]})")
    if not isinstance(obj, dict):
        _header_fail(where, head, f"header must be a JSON object, got {type(obj).__name__}")
    meta = {} if (m := obj.pop("__metadata__", None)) is None else m  # null means none
    if not isinstance(meta, dict):
        _fail(where, f"__metadata__ must be an object of strings, got {type(meta).__name__}")
    bad = next((k for k, v in meta.items() if not isinstance(v, str)), None)
    if bad is not None:
        _fail(where, f"__metadata__[{bad!r}] must be a string, got {type(meta[bad]).__name__}")
    entries = {name: _check_entry(where, name, info, buffer_len) for name, info in obj.items()}
    # the spans must tile the buffer exactly: no overlap (aliasing), no gaps, no trailing bytes
    pos, prev = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin < pos:
            _fail(where, f"tensor {name!r} (bytes {begin}..{end}) overlaps tensor {prev!r} "
                         f"(ends at {pos})")
        if begin > pos:
            _fail(where, f"bytes {pos}..{begin} of the data belong to no tensor (gap before "
                         f"{name!r}) — corrupt header")
        pos, prev = end, name
    if pos != buffer_len:
        _fail(where, f"the data has {buffer_len - pos} bytes after the last tensor ends at "
                     f"{pos} — extra bytes, or a tensor missing from the header")
    return entries, dict(meta)


def _open_for_read(path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(2, f"no such file: {os.fspath(path)!r}") from None


def _read_header(f, where):
    """(entries, metadata, data_start) for an open safetensors file; FormatError on any flaw."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        _fail(where, f"file is {size} bytes, too short for a safetensors file (needs at least "
                     "8 bytes of header length)")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES or n > size - 8:
        room = "the limit is 100 MB" if n > MAX_HEADER_BYTES else f"only {size - 8} follow"
        f.seek(0)
        _header_fail(where, f.read(16), f"header length field says {n} bytes, but {room}")
    raw = f.read(n)
    if len(raw) != n:
        _fail(where, "the file shrank while being read")
    entries, meta = _parse_header(where, raw, size - 8 - n, head + raw[:8])
    return entries, meta, 8 + n


def read_safetensors_header(path):
    """Names, dtypes, shapes and offsets of a safetensors file, without reading tensor data.

    Returns ``({name: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}}, metadata)``
    after the same checks ``load_safetensors`` makes (sizes against the file included).
    """
    with _open_for_read(path) as f:
        entries, meta, _ = _read_header(f, os.fspath(path))
    return ({name: {"dtype": c, "shape": list(s), "data_offsets": [b, e]}
             for name, (c, s, b, e) in entries.items()}, meta)


def load_safetensors(path, *, keys=None, mmap: bool = False):
    """``(tensors, metadata)``: a safetensors file as host NumPy arrays and its metadata dict.

    keys: names to load (default all); a name the file lacks raises KeyError.
    mmap: read-only views into the memory-mapped file (no copy at all; pages load on first
    touch); otherwise each tensor is read straight into its own writable array.
    BF16 and F8 tensors come back as float32 (a copy either way).
    """
    where = os.fspath(path)
    with _open_for_read(path) as f:
        entries, meta, start = _read_header(f, where)
        names = list(entries) if keys is None else [keys] if isinstance(keys, str) else list(keys)
        missing = [k for k in names if k not in entries]
        if missing:
            some = ", ".join(list(entries)[:8]) + (", ..." if len(entries) > 8 else "")
            raise KeyError(f"{where}: no tensor named {', '.join(map(repr, missing))} "
                           f"(the file has {len(entries)}: {some})")
        names.sort(key=lambda k: entries[k][2])  # file order: one forward pass
        mapped = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ) if mmap else None
        out = {}
        for name in names:
            code, shape, begin, end = entries[name]
            storage = np.dtype(_DTYPES[code][0])
            if mapped is not None:
                raw = np.frombuffer(mapped, storage, math.prod(shape), start + begin)
                raw = raw.reshape(shape)
            else:  # read straight into the array; a buffered readinto stops short only at EOF
                raw = np.empty(shape, storage)
                f.seek(start + begin)
                if f.readinto(memoryview(raw.reshape(-1).view(np.uint8))) != end - begin:
                    _fail(where, f"tensor {name!r}: the file ended early (changed while read)")
                if code == "BOOL":  # any nonzero byte is True; store canonical 0/1 in place
                    np.not_equal(raw, 0, out=raw.view(np.bool_))
            out[name] = _widen(code, raw)
    return out, meta


# ----------------------------------------------------------------------------- writing

def save_safetensors(path, tensors, metadata=None) -> None:
    """Write ``{name: array}`` (host or device arrays) and ``{str: str}`` metadata atomically.

    Dtypes are kept as they are (float32 stays F32). Tensors are laid out largest itemsize
    first, so every tensor starts aligned to its element size.
    """
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError("safetensors metadata must be a dict of str -> str "
                        "(json.dumps anything else into a string first)")
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise TypeError(f"tensor name {name!r} must be a str other than '__metadata__'")
        a = to_numpy(value)
        code = _CODE_OF.get((a.dtype.kind, a.dtype.itemsize))
        if code is None:
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors "
                            f"(supported: {', '.join(sorted(set(_CODE_OF.values())))})")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        a = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
        arrays[name] = (code, a)
    header, pos = {}, 0
    order = sorted(arrays, key=lambda k: (-arrays[k][1].dtype.itemsize, k))
    for name in order:
        code, a = arrays[name]
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data buffer starts 8-byte aligned
    with atomic_write(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            a = arrays[name][1]
            if a.size:
                f.write(memoryview(a.reshape(-1).view(np.uint8)))


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically.

    The temp file is flushed and fsynced before ``os.replace`` and the folder is fsynced
    after it, so after a crash the path holds the old or the new content, whole. On an
    exception inside the block the temp file is removed and ``path`` is untouched.
    A missing output folder is created. mode: "wb" (bytes) or "w" (UTF-8 text).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp = os.path.join(folder, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(tmp, flags, 0o666)
    except OSError as e:
        # OSError(errno, msg) becomes the matching subclass (PermissionError, ...)
        raise OSError(e.errno, f"cannot write into folder {folder!r} ({e.strerror}) — choose "
                               "an output folder you can write to, or fix its permissions") from e
    try:
        with contextlib.suppress(OSError, TypeError, NotImplementedError):
            os.chmod(fd, stat.S_IMODE(os.stat(path).st_mode))  # keep an old file's permissions
        text = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable
        with contextlib.suppress(OSError):
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _folder_error(errno_, strerror, path, what) -> OSError:
    return OSError(errno_, f"cannot create the {what} {path!r} ({strerror}) — choose a "
                           "folder you can write to, or fix its permissions")


def make_folder(path, what: str = "output folder") -> str:
    """``os.makedirs(path, exist_ok=True)``, failing with one line that names the folder and
    the fix (a path under a regular file, a read-only disk, missing permissions)."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise _folder_error(e.errno, e.strerror, path, what) from None
    return path


def check_folder(path, what: str = "output folder") -> str:
    """The error ``make_folder`` would raise, found without creating anything: the folder (or
    its nearest existing ancestor) must be a writable directory."""
    import errno
    path = os.fspath(path)
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise _folder_error(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path, what)
    if not os.access(probe, os.W_OK):
        raise _folder_error(errno.EACCES, os.strerror(errno.EACCES), path, what)
    return path


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- JSON

def _jsonable(obj, where: str):
    """A copy of obj made of plain JSON types; TypeError/ValueError naming the bad spot."""
    if obj is None or isinstance(obj, (bool, str)) or _is_int(obj):
        return obj
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return _jsonable(obj.item(), where)  # NumPy scalars (a loss) -> Python numbers
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"value at {where} is {obj}; JSON has no NaN or Infinity — "
                             "store None or a string instead")
        return obj
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"key {bad[0]!r} at {where} is not a str (JSON keys are)")
        return {k: _jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    hint = " (use .tolist())" if hasattr(obj, "tolist") else ""
    raise TypeError(f"value at {where} is a {type(obj).__name__}, which JSON cannot hold{hint}")


def save_json(path, obj) -> None:
    """Write obj as JSON (sorted keys, indent 2, UTF-8) atomically; only JSON data is allowed."""
    try:
        clean = _jsonable(obj, "top level")
    except RecursionError:
        raise ValueError(f"{os.fspath(path)}: cannot save as JSON: the data contains itself "
                         "(a reference cycle) or is nested too deeply") from None
    except (TypeError, ValueError) as e:
        raise type(e)(f"{os.fspath(path)}: cannot save as JSON: {e}") from None
    text = json.dumps(clean, sort_keys=True, indent=2, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


def decode_utf8(raw: bytes, where: str, fix: str) -> str:
    """raw as UTF-8 text (a leading BOM, which some editors add, is dropped); otherwise a
    FormatError "<where> is not UTF-8 text (byte 0x.. at offset N, line L); <fix>"."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise FormatError(f"{where} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                          f"{e.start}, line {line}); {fix}") from None


def load_json(path):
    """Read a JSON file; FormatError naming the file and line when it is not UTF-8 JSON."""
    where = os.fspath(path)
    with _open_for_read(path) as f:
        raw = f.read()
    text = decode_utf8(raw, where, "JSON files must be UTF-8")
    try:
        return _strict_json(text)
    except json.JSONDecodeError as e:
        _fail(where, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")
    except (ValueError, RecursionError) as e:
        _fail(where, f"invalid JSON: {str(e)[:200]}")

