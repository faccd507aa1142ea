"""Device "guard": NumPy behind CuPy's rules, so GPU-only bugs fail on machines without a GPU.

Under ``TINYLORA_DEVICE=guard`` (tests only) ``xp`` is NumPy restricted to the names CuPy
also has, and every array it makes is a ``GuardArray``: a NumPy array that refuses what a
CuPy array refuses. What it catches, each a bug that would otherwise surface only on a GPU:

1. NumPy-only names: ``xp.frompyfunc``, ``a.ctypes``, ``a.resize`` -> AttributeError.
2. Implicit device -> host conversion: ``np.asarray(a)``, ``np.array(a)``, ``np.testing``
   on a device array, a host NumPy function CuPy lacks -> TypeError (CuPy's ``__array__``).
3. Host arrays mixed into device work: ``a + host``, ``xp.where(m, host, a)``,
   ``a[...] = host`` -> TypeError. CuPy copies host data to the device only in
   ``xp.asarray`` / ``xp.array`` (and for index arrays), never implicitly.
4. Scalars: reductions and element access give 0-d arrays, as CuPy's do (never NumPy
   scalars); ``float(a)`` / ``int(a)`` on an array with ndim > 0 -> TypeError.
5. Host syncs: ``item``, ``tolist``, ``get``, ``float``/``int``/``bool`` of an array, ``repr``,
   boolean-mask indexing and ``nonzero`` (whose result size lives on the device) are
   counted, and refused inside ``backend.no_host_sync()``.

Only ``backend`` imports this module (for ``HostSyncError``) and builds its namespace. It
sits below backend and imports nothing from tinylora; it is NumPy itself, restricted, and gets
NumPy from backend (``bind``), the one module that imports it. CuPy's names come from
``cupy_namespace.json`` next to this file (made from a pinned CuPy by
``tests/fixtures/make_cupy_namespace.py``), so the guard needs no CuPy installed.
"""
from __future__ import annotations

import contextlib
import json
import os

__all__ = ["GuardArray", "namespace", "wrap", "scatter_add", "no_host_sync", "sync_count",
           "op_count"]

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
             "construct a NumPy array explicitly. [device guard: CuPy raises this; use "
             "backend.to_numpy(a) or Tensor.numpy()]")
np = None                 # NumPy, bound by backend before any use (see ``bind``)
_SCALARS: tuple = ()      # the scalar types an operand may be
_SCATTER_DTYPES: tuple = ()


def bind(numpy) -> None:
    """Give the guard NumPy (backend calls this at import: only backend imports numpy)."""
    global np, _SCALARS, _SCATTER_DTYPES
    np = numpy
    _SCALARS = (bool, int, float, complex, np.generic)
    _SCATTER_DTYPES = tuple(np.dtype(t) for t in ("int32", "float16", "float32", "float64",
                                                  "uint32", "uint64"))

# --------------------------------------------------------------------------- host syncs

class HostSyncError(RuntimeError):
    """A device value was copied to the host inside ``no_host_sync()`` (``backend`` re-exports
    it: on device "cuda" CuPy's detector raises it too)."""


_forbid = 0
_syncs = 0
_ops = 0
# calls that make views or empty buffers, not a GPU kernel each: left out of op_count()
_NO_KERNEL = frozenset({"reshape", "view", "transpose", "swapaxes", "squeeze", "ravel",
                        "expand_dims", "broadcast_to", "broadcast_arrays", "empty", "empty_like",
                        "asarray", "asanyarray", "moveaxis", "atleast_1d", "atleast_2d",
                        "split", "array_split", "diagonal", "real", "imag"})


def sync_count() -> int:
    """Device -> host syncs seen so far (item, float, get, ...), for tests."""
    return _syncs


def op_count() -> int:
    """Array operations run so far, views and empty buffers left out: an estimate of the
    kernels CuPy would launch for the same code (benchmarks count them per step)."""
    return _ops


@contextlib.contextmanager
def no_host_sync():
    """Inside this block any device -> host sync raises HostSyncError."""
    global _forbid
    _forbid += 1
    try:
        yield
    finally:
        _forbid -= 1


def _sync(what: str) -> None:
    global _syncs
    _syncs += 1
    if _forbid:
        raise HostSyncError(f"{what} copies a device value to the host (a GPU sync) inside "
                            "backend.no_host_sync(); keep it on the device, or read it only "
                            "at log/save time")


# --------------------------------------------------------------------------- (un)wrapping

def wrap(x):
    """Arrays and NumPy scalars as GuardArrays (CuPy has no scalars: 0-d arrays instead);
    tuples and lists element-wise; anything else as is."""
    if isinstance(x, np.ndarray):
        return GuardArray(x)
    if isinstance(x, np.generic):
        return GuardArray(np.asarray(x))
    if isinstance(x, (tuple, list)) and any(isinstance(e, (np.ndarray, np.generic)) for e in x):
        items = [wrap(e) for e in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)  # namedtuples too
    return x


def _host_error(where: str, x) -> TypeError:
    what = f"a host numpy.ndarray of shape {x.shape}" if isinstance(x, np.ndarray) else \
        f"a {type(x).__name__}"
    return TypeError(f"{where}: got {what} among device arrays. CuPy refuses this "
                     "(Unsupported type): copy it to the device first with xp.asarray(...)")


def _arg(x, where: str, host_ok: bool = False):
    """One argument of a device function: GuardArrays unwrapped; host arrays refused."""
    if type(x) is GuardArray:
        return x._a
    if isinstance(x, np.ndarray):
        if host_ok:
            return x
        raise _host_error(where, x)
    if isinstance(x, (list, tuple)):
        return type(x)(_arg(e, where, host_ok) for e in x) if type(x) in (list, tuple) else x
    return x


def _call(fn, args, kwargs, where: str, host_ok: bool = False):
    global _ops
    if where.rpartition(".")[2] not in _NO_KERNEL:
        _ops += 1
    res = fn(*[_arg(a, where, host_ok) for a in args],
             **{k: _arg(v, where, host_ok) for k, v in kwargs.items()})
    out = kwargs.get("out")
    if out is not None:          # the caller's own GuardArray(s), not fresh wrappers
        return out[0] if isinstance(out, tuple) and len(out) == 1 else out
    return wrap(res)


def _index(idx, where: str):
    """An index: device arrays unwrapped; host arrays and lists allowed (CuPy copies them);
    a boolean mask counts as a sync (CuPy reads the number of True values on the host)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    out, basic = [], True
    for i in items:
        if type(i) is GuardArray:
            i = i._a
        if isinstance(i, (np.ndarray, list)):
            basic = False
            if getattr(i, "dtype", None) == np.bool_:
                _sync(f"{where} with a boolean mask")
        out.append(i)
    return (tuple(out) if isinstance(idx, tuple) else out[0]), basic


# --------------------------------------------------------------------------- the array

_SYNC_METHODS = {"item", "tolist", "tobytes", "tofile", "dump", "dumps", "nonzero"}
_NO_EMULATION = {"data", "cstruct", "mdspan", "reduced_view", "scatter_add", "scatter_max",
                 "scatter_min", "toDlpack", "device", "flat"}


class GuardArray:
    """A NumPy array with CuPy's manners (see the module docstring). Made only by ``xp``."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100.0     # CuPy's: a Tensor (1000) gets the reflected operator
    __hash__ = None

    def __init__(self, a):
        self._a = a

    # ---------------------------------------------------------------- NumPy protocols
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        g = _UFUNCS.get(ufunc.__name__)
        if g is None:                  # CuPy lacks this ufunc: NumPy then raises TypeError
            return NotImplemented
        return getattr(g, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        sub = (func.__module__ or "").rpartition(".")[2]
        ns = _NAMESPACE.get(sub) if sub in ("linalg", "fft", "random") else None
        fn = getattr(ns, func.__name__, None) if ns is not None else _NAMESPACE.get(func.__name__)
        if fn is None:                 # a NumPy function CuPy lacks: TypeError from NumPy
            return NotImplemented
        return fn(*args, **kwargs)

    # ---------------------------------------------------------------- attributes
    shape = property(lambda s: s._a.shape)
    dtype = property(lambda s: s._a.dtype)
    ndim = property(lambda s: s._a.ndim)
    size = property(lambda s: s._a.size)
    nbytes = property(lambda s: s._a.nbytes)
    itemsize = property(lambda s: s._a.itemsize)
    strides = property(lambda s: s._a.strides)
    flags = property(lambda s: s._a.flags)
    T = property(lambda s: GuardArray(s._a.T))
    mT = property(lambda s: GuardArray(s._a.mT))
    real = property(lambda s: GuardArray(s._a.real))
    imag = property(lambda s: GuardArray(s._a.imag))

    @shape.setter
    def shape(self, value):
        self._a.shape = value

    @property
    def base(self):
        b = self._a.base
        return None if b is None else GuardArray(b) if isinstance(b, np.ndarray) else b

    def __getattr__(self, name):
        if name.startswith("__") or name not in _METHODS:
            lack = "NumPy-only" if hasattr(np.ndarray, name) else "unknown"
            raise AttributeError(f"cupy.ndarray has no attribute {name!r} ({lack}; the device "
                                 "path must not use it)")
        if name in _NO_EMULATION:
            raise AttributeError(f"ndarray.{name} differs between NumPy and CuPy and the device "
                                 "guard does not emulate it; the device path must not use it")
        attr = getattr(self._a, name)
        if not callable(attr):
            return wrap(attr)
        where = f"ndarray.{name}"
        if name in _SYNC_METHODS:
            def method(*args, **kwargs):
                _sync(where)
                return _call(attr, args, kwargs, where)
        else:
            def method(*args, **kwargs):
                return _call(attr, args, kwargs, where)
        return method

    def get(self, stream=None, order="C", out=None):
        """A host copy (CuPy's explicit transfer)."""
        _sync("ndarray.get()")
        a = np.array(self._a, order=order, copy=True)
        if out is not None:
            out[...] = a
            return out
        return a

    def set(self, arr, stream=None):
        """Copy a host array of the same shape and dtype into this array."""
        if not isinstance(arr, np.ndarray) or arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError("ndarray.set needs a host numpy.ndarray of the same shape and dtype")
        self._a[...] = arr

    def fill(self, value):
        if isinstance(value, np.ndarray) and value.ndim:
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        self._a.fill(value._a if type(value) is GuardArray else value)

    # ---------------------------------------------------------------- conversions (syncs)
    def _scalar(self, kind, what):
        if self._a.ndim:
            raise TypeError(f"only 0-dimensional arrays can be converted to Python scalars "
                            f"(got shape {self.shape}; CuPy refuses {what} of it)")
        _sync(what)
        return kind(self._a)

    def __float__(self):
        return self._scalar(float, "float(array)")

    def __int__(self):
        return self._scalar(int, "int(array)")

    def __complex__(self):
        return self._scalar(complex, "complex(array)")

    def __bool__(self):
        _sync("bool(array) (an `if` or `and` on a device value)")
        return bool(self._a)

    def __repr__(self):
        _sync("repr(array)")
        return repr(self._a)

    def __str__(self):
        _sync("str(array)")
        return str(self._a)

    def __format__(self, spec):
        _sync("format(array)")
        return format(self._a if self._a.ndim else self._a.item(), spec)

    def __copy__(self):
        return GuardArray(self._a.copy())

    def __deepcopy__(self, memo):
        return GuardArray(self._a.copy())

    # ---------------------------------------------------------------- containers
    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (GuardArray(self._a[i, ...]) for i in range(self._a.shape[0]))

    def __getitem__(self, idx):
        global _ops
        i, basic = _index(idx, "a[mask]")
        _ops += not basic                        # a gather kernel; basic indexing is a view
        return wrap(self._a[i])

    def __setitem__(self, idx, value):
        global _ops
        i, basic = _index(idx, "a[mask] = v")
        _ops += 1
        if isinstance(value, np.ndarray) and basic and value.ndim:
            raise TypeError(f"a[...] = value: value is a host numpy.ndarray of shape "
                            f"{value.shape}; CuPy refuses it (non-scalar numpy.ndarray cannot "
                            "be used for fill): copy it to the device with xp.asarray first")
        self._a[i] = value._a if type(value) is GuardArray else value


def _operand(x, op):
    """The other operand of ``a op x``: NotImplemented hands over to a higher-priority type."""
    if type(x) is GuardArray:
        return x._a
    if isinstance(x, _SCALARS):
        return x
    if getattr(x, "__array_priority__", 0.0) > GuardArray.__array_priority__ \
            and not isinstance(x, np.ndarray):
        return NotImplemented
    raise _host_error(f"array {op} operand", x)


def _binary(name, op, inplace: bool = False):
    def method(self, other):
        global _ops
        o = _operand(other, op)
        if o is NotImplemented:
            return NotImplemented
        _ops += 1
        out = getattr(self._a, name)(o)
        return self if inplace else wrap(out)     # a += b changes self._a and returns self
    method.__name__ = name
    return method


def _compare(name, op):
    def method(self, other):
        global _ops
        if not (type(other) is GuardArray or isinstance(other, (_SCALARS, np.ndarray))):
            return NotImplemented
        _ops += 1
        return wrap(getattr(self._a, name)(_operand(other, op)))
    method.__name__ = name
    return method


for _n, _op in (("add", "+"), ("sub", "-"), ("mul", "*"), ("truediv", "/"), ("floordiv", "//"),
                ("mod", "%"), ("pow", "**"), ("matmul", "@"), ("and", "&"), ("or", "|"),
                ("xor", "^"), ("lshift", "<<"), ("rshift", ">>")):
    setattr(GuardArray, f"__{_n}__", _binary(f"__{_n}__", _op))
    setattr(GuardArray, f"__r{_n}__", _binary(f"__r{_n}__", _op))
    setattr(GuardArray, f"__i{_n}__", _binary(f"__i{_n}__", _op + "=", inplace=True))
for _n, _op in (("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">="), ("eq", "=="), ("ne", "!=")):
    setattr(GuardArray, f"__{_n}__", _compare(f"__{_n}__", _op))
def _unary(name):
    def method(self):
        global _ops
        _ops += 1
        return wrap(getattr(self._a, name)())
    method.__name__ = name
    return method


for _n in ("neg", "pos", "abs", "invert"):
    setattr(GuardArray, f"__{_n}__", _unary(f"__{_n}__"))
GuardArray.__divmod__ = _binary("__divmod__", "divmod")


# --------------------------------------------------------------------------- the namespace

_HOST_OK = {"asarray", "array", "asanyarray"}            # CuPy's explicit host -> device copies
_SYNCING = {"nonzero", "argwhere", "flatnonzero", "unique", "extract", "compress"}
_METHODS: frozenset = frozenset()
_UFUNCS: dict = {}
_NAMESPACE: dict = {}


class _Ufunc:
    """A NumPy ufunc that takes device arrays and scalars only, like CuPy's."""

    def __init__(self, uf, methods):
        self._uf, self._methods, self.__name__ = uf, methods, uf.__name__

    def _check(self, inputs):
        for x in inputs:
            if not (type(x) is GuardArray or isinstance(x, _SCALARS)):
                raise _host_error(f"xp.{self.__name__}", x)

    def __call__(self, *inputs, **kwargs):
        self._check(inputs)
        return _call(self._uf, inputs, kwargs, f"xp.{self.__name__}")

    def __getattr__(self, name):
        if name in ("reduce", "accumulate", "reduceat", "outer", "at"):
            if name not in self._methods:
                raise AttributeError(f"CuPy's ufunc {self.__name__} has no method {name!r}")
            fn = getattr(self._uf, name)
            if name == "at":          # at(a, indices, b): indices may come from the host
                def method(a, indices, b=None):
                    self._check((a,) if b is None else (a, b))
                    i, _ = _index(indices, f"xp.{self.__name__}.at")
                    fn(a._a, i, *(() if b is None else (_arg(b, "at"),)))
                return method

            def method(*args, **kwargs):
                self._check(args[:2] if name == "outer" else args[:1])
                return _call(fn, args, kwargs, f"xp.{self.__name__}.{name}")
            return method
        return getattr(self._uf, name)

    def __repr__(self):
        return f"<guard ufunc {self.__name__}>"


def _function(name, fn):
    where = f"xp.{name}"
    host_ok = name in _HOST_OK
    syncs = name in _SYNCING

    def f(*args, **kwargs):
        if syncs:
            _sync(f"{where} (its result size is read on the host)")
        res = _call(fn, args, kwargs, where, host_ok)
        if host_ok and args and isinstance(args[0], np.ndarray) and type(res) is GuardArray \
                and np.may_share_memory(res._a, args[0]):
            res = GuardArray(res._a.copy())    # a copy to the device, never a shared buffer
        return res
    f.__name__ = name
    f.__wrapped__ = fn
    return f


class _Module:
    """A guarded submodule (linalg, random, fft): only CuPy's names."""

    def __init__(self, label, names):
        self.__name__ = label
        self.__dict__.update(names)

    def __getattr__(self, name):
        raise AttributeError(f"array module {self.__name__} has no attribute {name!r} "
                             "(CuPy lacks it: the device path must not use it)")


def _guard_value(name, v):
    if isinstance(v, np.ufunc):
        return v                        # replaced by _Ufunc below, once CuPy's methods are known
    if v is np.ndarray:
        return GuardArray
    if isinstance(v, type) or not callable(v):
        return v                        # dtypes, finfo, constants: shared with NumPy, as CuPy does
    return _function(name, v)


NAMESPACE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cupy_namespace.json")
_UFUNC_METHODS = ("reduce", "accumulate", "reduceat", "outer", "at")
_SUBMODULES = ("linalg", "random", "fft")


def describe_cupy(cupy) -> dict:
    """The names of CuPy that the guard follows, as JSON: public top-level names, the ufunc
    methods each one has, ``ndarray``'s attributes and the submodules' names."""
    top = sorted(k for k in dir(cupy) if not k.startswith("_"))
    return {
        "cupy_version": cupy.__version__,
        "names": top,
        "ufunc_methods": {k: [m for m in _UFUNC_METHODS if hasattr(getattr(cupy, k), m)]
                          for k in top if any(hasattr(getattr(cupy, k), m) for m in _UFUNC_METHODS)},
        "ndarray": sorted(n for n in dir(cupy.ndarray) if not n.startswith("_")),
        **{sub: sorted(k for k in dir(getattr(cupy, sub)) if not k.startswith("_"))
           for sub in _SUBMODULES},
    }


def stored_cupy_names() -> dict:
    """``describe_cupy`` of the pinned CuPy, as stored in ``cupy_namespace.json``."""
    with open(NAMESPACE_FILE, encoding="utf-8") as f:
        return json.load(f)


def namespace(cupy_names: dict | None = None) -> dict:
    """NumPy's names that CuPy also has, guarded; submodules linalg, random, fft too.
    cupy_names: ``describe_cupy(cupy)``; default the stored one (``stored_cupy_names``)."""
    global _METHODS, _NAMESPACE
    spec = cupy_names if cupy_names is not None else stored_cupy_names()
    _METHODS = frozenset(spec["ndarray"])
    top = {}
    for k in spec["names"]:
        if not hasattr(np, k):
            continue
        v = getattr(np, k)
        if isinstance(v, np.ufunc):
            methods = set(spec["ufunc_methods"].get(k, ()))
            top[k] = _UFUNCS[v.__name__] = _Ufunc(v, methods)
        else:
            top[k] = _guard_value(k, v)
    for sub in _SUBMODULES:
        np_mod = getattr(np, sub)
        names = {k: _guard_value(k, getattr(np_mod, k)) for k in spec[sub] if hasattr(np_mod, k)}
        top[sub] = _Module(f"guard.{sub}", names)
    _NAMESPACE = top
    return top


def scatter_add(target: GuardArray, indices, values, host_scatter_add) -> None:
    """``cupyx.scatter_add``: target[indices] += values, repeated indices adding up; CuPy's
    atomicAdd takes only these dtypes. ``host_scatter_add`` (backend's) does the adding on
    the unwrapped arrays, so the sums come out in the CPU's own order."""
    if target.dtype not in _SCATTER_DTYPES:
        raise TypeError(f"scatter_add only supports int32, float16, float32, float64, uint32, "
                        f"uint64 as data type (CuPy), got {target.dtype}")
    i, _ = _index(indices, "scatter_add")
    v = values._a if type(values) is GuardArray else values
    host_scatter_add(target._a, i, v)    # the host's own summation order: CPU-identical sums

