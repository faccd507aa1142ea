"""The BLAS under NumPy: its thread count, and GEMM with accumulation.

Threads. NumPy's OpenBLAS uses every core by default, and its idle threads spin-wait between
calls. On a quiet machine more threads make the large GEMMs faster; on a busy one a spinning
thread fights other processes for its core and a step can get much slower, so there one
thread wins. ``set_num_threads`` (or the environment
variable ``TINYLORA_NUM_THREADS``, or the commands' ``--threads``) picks the count; tinylora
leaves the library's default (all cores) unless told otherwise.

GEMM. ``gemm(a, b, out, beta=1.0)`` computes ``out = a @ b + beta·out`` in one BLAS call:
NumPy's ``@`` cannot accumulate, so ``out += a @ b`` writes a temporary and reads it back.
LoRA's thin products (``y += h Bᵀ`` with h of rank r) are memory-bound, and the temporary
doubles their memory traffic. On the CPU the call goes straight to the cblas_sgemm/dgemm of
NumPy's own OpenBLAS (found through threadpoolctl); anywhere else, or for layouts BLAS cannot
take, it falls back to NumPy.
"""
from __future__ import annotations

import ctypes
import os

from . import backend
from .backend import np

__all__ = ["set_num_threads", "get_num_threads", "limit_threads", "gemm", "blas_info"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _openblas():
    """(library path, symbol prefix, int type) of NumPy's OpenBLAS, or None."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    for d in threadpool_info():
        if d.get("internal_api") == "openblas" and d.get("user_api") == "blas":
            return d["filepath"]
    return None


def _load():
    path = _openblas()
    if path is None:
        return None, {}
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None, {}
    funcs = {}
    # NumPy >= 2 bundles scipy-openblas with 64-bit integers and a "scipy_" prefix; older
    # wheels export plain names. Try the 64-bit-integer names first.
    for names, int_t in ((("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_"), ctypes.c_int64),
                         (("cblas_sgemm64_", "cblas_dgemm64_"), ctypes.c_int64),
                         (("cblas_sgemm", "cblas_dgemm"), ctypes.c_int)):
        try:
            fs, fd = (getattr(lib, n) for n in names)
        except AttributeError:
            continue
        for f, real, dt in ((fs, ctypes.c_float, "float32"), (fd, ctypes.c_double, "float64")):
            f.restype = None
            f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, int_t, int_t, int_t, real,
                          ctypes.c_void_p, int_t, ctypes.c_void_p, int_t, real,
                          ctypes.c_void_p, int_t]
            funcs[np.dtype(dt)] = f
        break
    return lib, funcs


_lib, _GEMM = _load()


def _layout(m):
    """(transpose flag, leading dimension) of a 2-D array BLAS can read as is, else None."""
    s0, s1 = m.strides
    it = m.itemsize
    if s1 == it and s0 >= max(1, m.shape[1]) * it and s0 % it == 0:
        return _NO_TRANS, s0 // it
    if s0 == it and s1 >= max(1, m.shape[0]) * it and s1 % it == 0:
        return _TRANS, s1 // it
    return None


def gemm(a, b, out, beta: float = 1.0, alpha: float = 1.0):
    """out = alpha·(a @ b) + beta·out, in place, for 2-D arrays of one float dtype."""
    f = _GEMM.get(out.dtype) if type(out) is np.ndarray and backend.get_device() == "cpu" else None
    if f is not None and type(a) is np.ndarray and type(b) is np.ndarray \
            and a.dtype == b.dtype == out.dtype and a.ndim == b.ndim == out.ndim == 2:
        la, lb, lc = _layout(a), _layout(b), _layout(out)
        M, K = a.shape
        N = b.shape[1]
        if la and lb and lc and lc[0] == _NO_TRANS and b.shape[0] == K and out.shape == (M, N):
            if M and N:
                f(_ROW_MAJOR, la[0], lb[0], M, N, K, alpha, a.ctypes.data, la[1],
                  b.ctypes.data, lb[1], beta, out.ctypes.data, lc[1])
            return out
    prod = a @ b
    if alpha != 1.0:
        prod *= alpha
    if beta == 0.0:
        out[...] = prod
    else:
        if beta != 1.0:
            out *= beta
        out += prod
    return out


# ----------------------------------------------------------------------------- threads

def set_num_threads(n: int) -> None:
    """Use ``n`` BLAS threads from now on (all BLAS libraries NumPy loaded)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads: need at least 1 thread, got {n}")
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=n, user_api="blas")


def limit_threads(n: int | None):
    """A context that caps BLAS threads at ``n`` inside it (None or 0: leave them as they are)."""
    if not n:
        import contextlib
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=int(n), user_api="blas")


def get_num_threads() -> int | None:
    info = blas_info()
    return info[0]["num_threads"] if info else None


# NumPy's OpenBLAS answers its own thread count in a C call, cheap enough to ask before each
# small GEMM (threadpoolctl's inventory is not)
_THREADS = next((getattr(_lib, n) for n in ("scipy_openblas_get_num_threads64_",
                                            "openblas_get_num_threads64_", "openblas_get_num_threads")
                 if _lib is not None and hasattr(_lib, n)), None)


def openblas_threads() -> int | None:
    """How many threads NumPy's OpenBLAS uses now (None without OpenBLAS)."""
    return None if _THREADS is None else int(_THREADS())


def blas_info() -> list:
    """[{internal_api, version, num_threads, filepath}] of the BLAS libraries loaded (now)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "filepath")}
            for d in threadpool_info() if d.get("user_api") == "blas"]


def _from_environment() -> None:
    value = os.environ.get("TINYLORA_NUM_THREADS")
    if value:
        try:
            set_num_threads(int(value))
        except ValueError:
            raise ValueError(f"TINYLORA_NUM_THREADS={value!r}: expected a whole number >= 1") from None


_from_environment()
