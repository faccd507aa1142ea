"""The array backend: the only module in tinylora that imports numpy or cupy.

Everything else writes ``xp.exp(...)``, ``xp.matmul(...)``. ``xp`` stands for the active
array module, NumPy on device "cpu" and CuPy on device "cuda", so one code path serves
both. Host-side work that is always NumPy (files, tokenization, the seeded RNG) uses
``np`` from here.

Device: ``TINYLORA_DEVICE`` (cpu | cuda) at import, or ``set_device(name)`` later.
Arrays made before a device switch stay on their old device. Device "guard" (tests only):
NumPy behind CuPy's rules, see ``tinylora.guard``.
"""
from __future__ import annotations

import contextlib
import os
import warnings
import sys

# OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) after each call before they sleep, so
# while training they never sleep, and on a few cores they take the cores from the threads
# of tinylora's blocked kernels (kernels/blocking.parallel). OpenBLAS reads how long to spin
# once, when NumPy loads it: if tinylora loads NumPy, it asks for 2^22 cycles (~2 ms) unless
# the environment already says. Shorter spins cost small models a wake-up per GEMM; with this
# one the GEMMs of a step still find their threads awake, while the kernels' longer passes
# get the cores. Whether idle threads sleep soon decides whether the kernels use threads.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "22")


def _blas_sleeps_soon() -> bool:
    try:
        return int(os.environ.get("OPENBLAS_THREAD_TIMEOUT", "")) <= 24
    except ValueError:
        return False


BLAS_SLEEPS_SOON = _blas_sleeps_soon()

import numpy as np  # noqa: E402

from . import guard as _guard_module   # below backend: NumPy behind CuPy's rules (tests)
from .guard import HostSyncError

_guard_module.bind(np)                  # the guard gets NumPy from here, the one place it is imported

__all__ = [
    "xp", "np", "DeviceError", "HostSyncError", "set_device", "get_device", "is_cuda", "on_device",
    "get_default_dtype", "set_default_dtype", "default_dtype",
    "asarray", "to_numpy", "is_array", "scatter_add", "erf",
    "manual_seed", "host_rng", "get_rng_state", "set_rng_state",
    "randn", "rand", "uniform", "normal", "dropout_mask", "no_host_sync", "tune_malloc",
]


class DeviceError(RuntimeError):
    """An unknown device, or CUDA asked for where CuPy or a GPU is missing."""


class _ArrayModule:
    """Stand-in for the active array module.

    ``set_device`` copies the chosen module's attributes into this object's ``__dict__``,
    so ``xp.exp`` costs one plain attribute lookup (it sits on every op's hot path) and
    modules that did ``from .backend import xp`` see a device switch.
    """

    __name__ = "numpy"

    def __repr__(self):
        return f"<tinylora array module: {self.__name__}>"

    def __getattr__(self, name):  # only reached for names the bound module lacks
        if startup_error is not None:   # TINYLORA_DEVICE named a device that cannot be used
            raise startup_error
        raise AttributeError(f"array module {self.__name__} has no attribute {name!r}"
                             + (" (CuPy lacks it: the device path must not use it)"
                                if _device == "guard" else ""))


xp = _ArrayModule()
_device = "cpu"
_cupy = None  # the cupy module once device "cuda" was bound
_guard = None  # the tinylora.guard module once device "guard" was bound
_array_types: tuple = (np.ndarray,)  # every array type made so far (host and device)


def _bind(namespace: dict, name: str, label: str) -> None:
    global _device
    xp.__dict__.clear()
    xp.__dict__.update({k: v for k, v in namespace.items() if not k.startswith("__")})
    xp.__name__ = label
    _device = name


def _guard_namespace() -> dict:
    """NumPy restricted to the names CuPy also has (top level, linalg, random, fft), whose
    arrays follow CuPy's rules (``tinylora.guard``).

    Tests run under device "guard" on machines without a GPU: a NumPy-only call, an implicit
    host conversion or a host array mixed into device work then fails here, not on a GPU.
    """
    global _guard, _array_types
    _guard = _guard_module            # CuPy's names come stored with it: no CuPy needed
    if _guard.GuardArray not in _array_types:
        _array_types += (_guard.GuardArray,)
    return _guard.namespace()


def set_device(name: str) -> None:
    """Choose where arrays live: "cpu" (NumPy) or "cuda" (CuPy on the current GPU).

    "guard" (for tests) is NumPy restricted to the names CuPy also has.
    """
    global _cupy, _array_types
    key = str(name).strip().lower()
    if key == "cpu":
        _bind(vars(np), "cpu", "numpy")
    elif key in ("cuda", "gpu"):
        try:
            import cupy
        except ImportError:
            raise DeviceError(
                "device 'cuda' needs CuPy, which is not installed: "
                "pip install 'tinylora[cuda]', or use TINYLORA_DEVICE=cpu") from None
        try:
            n_gpu = cupy.cuda.runtime.getDeviceCount()
        except Exception:  # CUDA driver or runtime missing: CuPy raises its own types
            n_gpu = 0
        if n_gpu < 1 or not cupy.is_available():
            raise DeviceError(
                "device 'cuda' was asked for, but CuPy finds no usable GPU "
                "(cupy.is_available() is False); use TINYLORA_DEVICE=cpu")
        _cupy = cupy
        if cupy.ndarray not in _array_types:
            _array_types += (cupy.ndarray,)
        _bind(vars(cupy), "cuda", "cupy")
    elif key == "guard":
        _bind(_guard_namespace(), "guard", "guard(numpy ∩ cupy)")
    else:
        raise DeviceError(f"unknown device {name!r}: use 'cpu' or 'cuda' (TINYLORA_DEVICE)")
    _sync_device_rng()


def get_device() -> str:
    return _device


def is_cuda() -> bool:
    return _device == "cuda"


def on_device() -> bool:
    """Whether arrays follow CuPy's rules: "cuda", or "guard" emulating it. Code that would
    sync with the host (value checks, per-step reads) takes its device branch on both."""
    return _device in ("cuda", "guard")


# ----------------------------------------------------------------------------- dtypes

_default_dtype = np.dtype(np.float32)
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def get_default_dtype() -> np.dtype:
    """The float dtype new tensors and parameters get (float32 unless changed)."""
    return _default_dtype


def set_default_dtype(dtype) -> None:
    global _default_dtype
    dt = np.dtype(dtype)
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"default dtype must be float16, float32 or float64, got {dt}")
    _default_dtype = dt


@contextlib.contextmanager
def default_dtype(dtype):
    """``with default_dtype(tl.float64):`` builds tensors and models in float64 (gradcheck)."""
    old = _default_dtype
    set_default_dtype(dtype)
    try:
        yield
    finally:
        set_default_dtype(old)


# ----------------------------------------------------------------------------- arrays

def asarray(data, dtype=None):
    """Data (list, scalar, NumPy or device array) as an array on the active device."""
    return xp.asarray(data, dtype=dtype)


def is_array(obj) -> bool:
    """A host or device array (NumPy, CuPy, or the guard's)."""
    return isinstance(obj, _array_types)


def to_numpy(a) -> np.ndarray:
    """A host NumPy array (copied from the GPU when the array lives there)."""
    if isinstance(a, np.ndarray):
        return a
    if isinstance(a, _array_types):  # a CuPy or guard array: the explicit copy
        return a.get()
    return np.asarray(a)


def scatter_add(target, indices, values) -> None:
    """``target[indices] += values`` in place, adding (not overwriting) at repeated indices."""
    if _cupy is not None and isinstance(target, _cupy.ndarray):
        import cupyx
        cupyx.scatter_add(target, indices, values)
    elif _guard is not None and isinstance(target, _guard.GuardArray):
        _guard.scatter_add(target, indices, values, scatter_add)
    elif (isinstance(indices, np.ndarray) and indices.ndim == 1 and indices.dtype.kind in "iu"
          and indices.size and values.shape == indices.shape + target.shape[1:]):
        # whole rows (embedding backward): sort the ids and sum each run of equal ids with one
        # reduceat, then add every distinct row once; ~5x faster than np.add.at here
        rows = np.where(indices < 0, indices + target.shape[0], indices)
        order = np.argsort(rows, kind="stable")
        s = rows[order]
        starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
        target[s[starts]] += np.add.reduceat(values[order], starts, axis=0)
    else:
        np.add.at(target, indices, values)


@contextlib.contextmanager
def no_host_sync():
    """Inside this block a device -> host copy (``.item()``, ``float(a)``, ``.get()``, ``if a``)
    raises HostSyncError: on "guard" through the guard's arrays (every copy); on "cuda"
    through CuPy's sync detector (best effort: the copies CuPy itself makes; gone from
    CuPy versions that dropped it); on "cpu" there is no device and nothing is checked."""
    if _device == "guard":
        with _guard.no_host_sync():
            yield
    elif _device == "cuda" and hasattr(_cupyx(), "allow_synchronize"):
        cupyx = _cupyx()
        with warnings.catch_warnings():   # CuPy marks its (best-effort) detector deprecated
            warnings.simplefilter("ignore")
            detector = cupyx.allow_synchronize(False)
            detector.__enter__()          # entered here: the warning filter ends before the body
        try:
            yield
        except cupyx.DeviceSynchronized as e:
            raise HostSyncError(f"a device -> host sync inside no_host_sync(): {e}") from e
        finally:
            detector.__exit__(None, None, None)
    else:
        yield


def _cupyx():
    import cupyx
    return cupyx


# ----------------------------------------------------------------------------- erf
# NumPy has no erf ufunc. float64: Hart & Cheney's rational approximations (#5667 and its
# small-argument companion), accurate to ~1e-16, so the exact-erf GELU passes float64
# gradient checks. float32: Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, below float32
# resolution) in far fewer passes over memory. CuPy has a native kernel.

_ERF_P1 = (0.804373630960840172832162e5, 0.740407142710151470082064e4,
           0.301782788536507577809226e4, 0.380140318123903008244444e2,
           0.143383842191748205576712e2, -0.288805137207594084924010e0,
           0.007547728033418631287834e0)
_ERF_Q1 = (0.804373630960840172826266e5, 0.342165257924628539769006e5,
           0.637960017324428279487120e4, 0.658070155459240506326937e3,
           0.380190713951939403753468e2, 1.0)
_ERFC_P2 = (0.18263348842295112592168999e4, 0.28980293292167655611275846e4,
            0.2320439590251635247384768711e4, 0.1143262070703886173606073338e4,
            0.3685196154710010637133875746e3, 0.7708161730368428609781633646e2,
            0.9675807882987265400604202961e1, 0.5641877825507397413087057563e0)
_ERFC_Q2 = (0.18263348842295112595576438e4, 0.495882756472114071495438422e4,
            0.60895424232724435504633068e4, 0.4429612803883682726711528526e4,
            0.2094384367789539593790281779e4, 0.6617361207107653469211984771e3,
            0.1371255960500622202878443578e3, 0.1714980943627607849376131193e2, 1.0)
_TWO_OVER_SQRT_PI = 1.1283791670955125738961589031
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _poly(coeffs, x):
    """sum_i coeffs[i] * x**i by Horner's rule."""
    acc = np.full_like(x, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc *= x
        acc += c
    return acc


def _erf_numpy(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    if x.dtype == np.float64:
        out = np.empty_like(x)
        small = a < 0.5
        s = x[small]
        s2 = s * s
        out[small] = _TWO_OVER_SQRT_PI * s * _poly(_ERF_P1, s2) / _poly(_ERF_Q1, s2)
        big = ~small
        b = np.minimum(a[big], 10.0)  # erf(10) == 1 in float64; keeps exp/poly finite
        erfc = np.exp(-b * b) * _poly(_ERFC_P2, b) / _poly(_ERFC_Q2, b)
        out[big] = np.copysign(1.0 - erfc, x[big])
        return out
    xf = x.astype(np.float32, copy=False)
    t = 1.0 / (1.0 + np.float32(_AS_P) * np.abs(xf))
    y = _poly(tuple(np.float32(c) for c in (0.0,) + _AS_A), t)  # a1 t + ... + a5 t^5
    y *= np.exp(-xf * xf)
    return np.copysign(1.0 - y, xf).astype(x.dtype, copy=False)


def erf(x):
    """The error function, elementwise, on the array's own device."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    if _guard is not None and isinstance(x, _guard.GuardArray):
        return _guard.wrap(_erf_numpy(x._a))
    return _erf_numpy(np.asarray(x))


# ----------------------------------------------------------------------------- RNG
# Two seeded streams. "host" draws weights and data batches on the host and copies them
# to the device, so CPU and GPU runs start from identical weights. "device" draws dropout
# masks where the activations live, so a training step has no host round trip. Moving
# between the host (cpu, guard) and CuPy restarts the device stream from the seed.

_seed = 0
_host = np.random.default_rng(0)
_dev = np.random.default_rng(1)


def manual_seed(seed: int) -> None:
    """Reseed both streams (like ``torch.manual_seed``)."""
    global _seed, _host, _dev
    _seed = int(seed)
    _host = np.random.default_rng(_seed)
    _dev = _make_device_rng(_seed)


def _make_device_rng(seed: int):
    # a separate stream, derived from the seed, so dropout draws do not shift weight draws
    if _device == "cuda":
        return _cupy.random.default_rng(seed + 0x5EED)
    return np.random.default_rng(seed + 0x5EED)


def _sync_device_rng() -> None:
    """After a device switch: a CuPy stream on "cuda", a NumPy one elsewhere."""
    global _dev
    if (_device == "cuda") != (not isinstance(_dev, np.random.Generator)):
        _dev = _make_device_rng(_seed)


def host_rng() -> np.random.Generator:
    return _host


def get_rng_state() -> dict:
    """Both streams' states as JSON-able data (exact resume on CPU)."""
    dev = _dev.bit_generator.state if isinstance(_dev, np.random.Generator) else None
    return {"seed": _seed, "host": _host.bit_generator.state, "device": dev}


def set_rng_state(state: dict) -> None:
    global _seed
    _seed = int(state["seed"])
    _host.bit_generator.state = state["host"]
    if state.get("device") is not None and isinstance(_dev, np.random.Generator):
        _dev.bit_generator.state = state["device"]


def _dt(dtype):
    return _default_dtype if dtype is None else np.dtype(dtype)


def randn(*shape, dtype=None):
    """Standard normal draws from the host stream, on the device."""
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return xp.asarray(_host.standard_normal(shape).astype(_dt(dtype)))


def rand(*shape, dtype=None):
    """Uniform [0, 1) draws from the host stream, on the device."""
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return xp.asarray(_host.random(shape).astype(_dt(dtype)))


def uniform(low: float, high: float, shape, dtype=None):
    return xp.asarray(_host.uniform(low, high, shape).astype(_dt(dtype)))


def normal(mean: float, std: float, shape, dtype=None):
    return xp.asarray(_host.normal(mean, std, shape).astype(_dt(dtype)))


_mask_tape = None   # (mode, list): masks recorded by, or replayed into, a recomputed forward


@contextlib.contextmanager
def dropout_tape(mode: str, masks: list):
    """"record": every dropout mask drawn inside is appended to ``masks``; "replay": masks
    are taken from ``masks`` in the same order instead of being drawn. Activation
    checkpointing uses this so that a recomputed forward drops exactly the same values."""
    global _mask_tape
    prev, _mask_tape = _mask_tape, (mode, masks)
    try:
        yield
    finally:
        _mask_tape = prev


def dropout_keep(shape, p: float):
    """Which values dropout keeps, drawn on the device: a bool array, False with probability p.
    (A bool mask is a quarter of a float32 one: what attention's kernel keeps for backward.)"""
    if _mask_tape is not None and _mask_tape[0] == "replay":
        return _mask_tape[1].pop(0)
    keep = xp.asarray(_dev.random(shape, dtype=np.float32)) >= p  # asarray: guard's arrays
    if _mask_tape is not None:
        _mask_tape[1].append(keep)
    return keep


def dropout_mask(shape, p: float, dtype=None):
    """Inverted-dropout multiplier drawn on the device: 0 with probability p, else 1/(1-p)."""
    dt = _dt(dtype)
    return dropout_keep(shape, p).astype(dt) * dt.type(1.0 / (1.0 - p))


# ----------------------------------------------------------------------------- host memory
# A training step frees and reallocates the same large activation and gradient arrays every
# step. glibc hands big blocks back to the kernel on free (mmap'd blocks, heap trimming), so
# each step would fault every page in again: measured here, 234k page faults and a third of
# the step in the kernel for the small GPT. Keeping freed memory in the heap (like PyTorch's
# caching allocator on the GPU) removes that. Resident memory then stays at its peak.
# It changes the whole process, so importing tinylora never does it: the Trainer calls
# tune_malloc() when training starts, and so does the command line. Opt out with
# TINYLORA_MALLOC_TUNING=0.

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
malloc_tuned = False   # whether tune_malloc() has set glibc's thresholds in this process


def tune_malloc() -> bool:
    """Keep freed memory in the process heap (glibc ``mallopt``); idempotent. Returns whether
    the thresholds are set: False off Linux/glibc or under TINYLORA_MALLOC_TUNING=0."""
    global malloc_tuned
    if malloc_tuned:
        return True
    if os.environ.get("TINYLORA_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)       # glibc's maximum
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1024 * 1024 * 1024)    # keep up to 1 GiB free
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    malloc_tuned = bool(ok)
    return malloc_tuned
startup_error: DeviceError | None = None
try:
    set_device(os.environ.get("TINYLORA_DEVICE", "cpu"))
except DeviceError as e:
    # Raised again at the first use of ``xp`` rather than here, so that ``import tinylora``
    # works and the command line can report it as one line.
    startup_error = e
manual_seed(0)
