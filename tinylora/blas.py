"""The BLAS under NumPy: its thread count, and GEMM with accumulation.

Threads. NumPy's OpenBLAS uses every core by default, and its idle threads spin-wait between
calls. On a quiet machine more threads make the large GEMMs faster; on a busy one a spinning
thread fights another process for its core and every step slows down, so there fewer
threads win. While it trains, the Trainer uses the cores free now (``FreeCores``: the
cores this process may use minus those other processes keep busy, from /proc/stat, at least
1), re-checked every few seconds and around evaluation. An explicit count always wins and is
never changed: ``set_num_threads``, ``limit_threads``, the environment variable
``TINYLORA_NUM_THREADS`` (or the library's own OPENBLAS_NUM_THREADS / OMP_NUM_THREADS), the
commands' ``--threads``. Importing tinylora changes nothing; outside training the library's
default (all cores) stands.

GEMM. ``gemm(a, b, out, beta=1.0)`` computes ``out = a @ b + beta·out`` in one BLAS call:
NumPy's ``@`` cannot accumulate, so ``out += a @ b`` writes a temporary and reads it back.
LoRA's thin products (``y += h Bᵀ`` with h of rank r) are memory-bound, and the temporary
doubles their memory traffic. On the CPU the call goes straight to the cblas_sgemm/dgemm of
NumPy's own OpenBLAS (found through threadpoolctl); anywhere else, or for layouts BLAS cannot
take, it falls back to NumPy.
"""
from __future__ import annotations

import ctypes
import math
import os
import time

from . import backend
from .backend import np

__all__ = ["set_num_threads", "get_num_threads", "limit_threads", "explicit_choice",
           "free_core_threads", "FreeCores", "training_threads", "gemm", "blas_info"]

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
        return None, {}, None, None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None, {}, None, None
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
    get = set_ = None   # OpenBLAS's own thread-count calls: a C call, no library scan
    for prefix, suffix, int_t in (("scipy_", "64_", ctypes.c_int64), ("", "64_", ctypes.c_int64),
                                  ("", "", ctypes.c_int)):
        names = (f"{prefix}openblas_{verb}_num_threads{suffix}" for verb in ("get", "set"))
        g, s = next(names), next(names)
        if hasattr(lib, g) and hasattr(lib, s):
            get, set_ = getattr(lib, g), getattr(lib, s)
            get.restype, set_.restype, set_.argtypes = ctypes.c_int, None, [int_t]
            break
    return lib, funcs, get, set_


_lib, _GEMM, _THREADS, _SET_THREADS = _load()


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

# The BLAS libraries' own variables: when one is set, its count is the user's choice.
_LIBRARY_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS",
                      "MKL_NUM_THREADS")
_chosen: int | None = None   # set by set_num_threads (TINYLORA_NUM_THREADS, --threads)
_pinned = 0                  # limit_threads contexts open now


def _positive(n, what: str) -> int:
    n = int(n)
    if n < 1:
        raise ValueError(f"{what}: need at least 1 thread, got {n}")
    return n


def _apply(n: int) -> None:
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=n, user_api="blas")   # stays in effect (no context)


def set_num_threads(n: int) -> None:
    """Use ``n`` BLAS threads from now on (all BLAS libraries NumPy loaded). An explicit
    choice: the trainer's free-cores rule (``FreeCores``) never changes it afterwards."""
    global _chosen
    n = _positive(n, "set_num_threads")
    _apply(n)
    _chosen = n


class limit_threads:
    """``with limit_threads(n):`` caps BLAS threads at ``n`` inside it (None or 0: leave
    them as they are). Inside it the count is an explicit choice, which the trainer's
    free-cores rule leaves alone; on exit the previous count comes back."""

    def __init__(self, n: int | None):
        self.n = _positive(n, "limit_threads") if n else None
        self._limits = None

    def __enter__(self):
        global _pinned
        if self.n:
            from threadpoolctl import threadpool_limits
            self._limits = threadpool_limits(limits=self.n, user_api="blas")
            _pinned += 1
        return self

    def __exit__(self, *exc):
        global _pinned
        if self._limits is not None:
            _pinned -= 1
            self._limits.restore_original_limits()
            self._limits = None
        return False


def explicit_choice() -> str | None:
    """What fixed the BLAS thread count (a short description), or None when nothing did
    and the trainer's free-cores rule may choose it."""
    if _pinned:
        return "limit_threads"
    if _chosen is not None:
        return f"set_num_threads({_chosen})"
    for name in _LIBRARY_VARIABLES:
        if os.environ.get(name, "").strip():
            return name
    return None


def num_threads_now() -> int:
    """OpenBLAS's thread count, asked directly (a fraction of a microsecond, unlike
    threadpoolctl's scan); the blocked kernels use as many threads. 1 without OpenBLAS."""
    return max(1, _THREADS()) if _THREADS is not None else 1


class one_thread:
    """A context in which OpenBLAS runs on the calling thread only, for code that runs small
    GEMMs on several Python threads at once (``kernels.blocking.parallel``); the count is
    put back on exit. Costs a C call each way (threadpoolctl's limits scan the libraries)."""

    def __enter__(self):
        self.n = num_threads_now()
        if _SET_THREADS is not None and self.n > 1:
            _SET_THREADS(1)
        return self

    def __exit__(self, *exc):
        if _SET_THREADS is not None and self.n > 1:
            _SET_THREADS(self.n)


def get_num_threads() -> int | None:
    info = blas_info()
    return info[0]["num_threads"] if info else None


def blas_info() -> list:
    """[{internal_api, version, num_threads, filepath}] of the BLAS libraries loaded (now)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "filepath")}
            for d in threadpool_info() if d.get("user_api") == "blas"]


# ------------------------------------------------------------------ the free-cores rule

def free_core_threads(usable: int, busy_s: float, own_s: float, wall_s: float) -> int:
    """BLAS threads for a window of ``wall_s`` seconds: the cores free now.

    usable: the cores this process may run on (its affinity set, else os.cpu_count()).
    busy_s: the CPU-seconds those cores were busy in the window, all processes together.
    own_s:  this process's CPU-seconds in the window (all its threads, OpenBLAS's too).

    Other processes kept ``(busy_s - own_s) / wall_s`` cores busy; a core counts as busy
    once they used more than half of it (rounded half up), and the rest are free:
    threads = usable - round(others), at least 1.
    """
    others = max(0.0, busy_s - own_s) / wall_s if wall_s > 0 else 0.0
    return max(1, usable - math.floor(others + 0.5))


def usable_cpus() -> set:
    """The CPU ids this process may run on: its affinity set where the OS has one."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def busy_seconds(stat: str, cpus, ticks_per_s: int = 100) -> float:
    """CPU-seconds the CPUs ``cpus`` (ids) were busy since boot, from the text of /proc/stat:
    user + nice + system + irq + softirq of each ``cpuN`` line. Idle, iowait and steal
    (time the hypervisor gave to another machine) are not busy; guest time is inside user."""
    ticks = 0
    for line in stat.splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *fields = line.split()
            if int(name[3:]) in cpus:
                user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
                ticks += user + nice + system + irq + softirq
    return ticks / ticks_per_s


def read_sample():
    """(monotonic time, busy CPU-seconds of the usable CPUs, this process's CPU-seconds,
    usable CPU count) now, or None where /proc/stat is missing (macOS, Windows)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return None
    cpus = usable_cpus()
    return time.monotonic(), busy_seconds(stat, cpus, _TICKS), time.process_time(), len(cpus)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class FreeCores:
    """The BLAS thread count while training: ``free_core_threads`` over the window since
    the previous sample, applied unless the count was chosen explicitly (``explicit_choice``:
    set_num_threads, limit_threads, TINYLORA_NUM_THREADS, ``--threads``, or the library's own
    OPENBLAS_NUM_THREADS / OMP_NUM_THREADS ...), and never above the count found at start.

    The Trainer calls ``start()`` when training starts (a check; it remembers the count),
    ``tick()`` after every step (a check at most every ``interval`` seconds, otherwise one
    clock read), ``check()`` before and after each evaluation, and ``stop()`` at the end
    (the count found at start comes back; the next window starts there). The count changes
    only when the answer does.

    A check reads /proc/stat and this process's CPU time (microseconds) and never sleeps,
    except when there is no usable window: no sample yet, or at start one older than
    ``max_age`` seconds (an average over a long pause says little about now); then it samples
    for ``window`` seconds first. During training the window is the time since the previous
    check, however long the steps are. A window shorter than ``window`` keeps the previous
    answer (it is too coarse for /proc/stat's 10 ms ticks) and goes on growing. Without
    /proc/stat (macOS, Windows) the rule is off and the library's default (all cores) stands.
    """

    def __init__(self, sample=read_sample, *, interval: float = 5.0, window: float = 0.2,
                 max_age: float = 10.0, sleep=time.sleep):
        self.sample, self.interval, self.window, self.max_age = sample, interval, window, max_age
        self._sleep = sleep
        self.threads = None         # the last answer
        self._base = None           # the sample the current window starts at
        self._last_check = -math.inf
        self._active = False        # between start() and stop()
        self._before = self._set = None   # the count at start(); the count this rule set

    def start(self) -> None:
        self._active, self._set = True, None
        self._before = get_num_threads() if explicit_choice() is None else None
        self.check(max_age=self.max_age)

    def tick(self) -> None:
        if time.monotonic() - self._last_check >= self.interval:
            self.check()

    def check(self, max_age: float = math.inf) -> int | None:
        """Apply the rule now; returns the count it set, or None when it left it alone."""
        self._last_check = time.monotonic()
        if not self._active or explicit_choice() is not None or self._before is None:
            return None
        n = self.answer(max_age)
        current = get_num_threads()
        if n is None or current is None or (self._set is not None and current != self._set):
            return None             # no /proc/stat, no BLAS, or changed behind our back
        n = min(n, self._before)
        if n != current:
            _apply(n)
            current = get_num_threads()   # the library may clamp it
        self._set = current
        return current

    def stop(self) -> None:
        if (self._active and self._set is not None and self._set != self._before
                and explicit_choice() is None and get_num_threads() == self._set):
            _apply(self._before)
        s = self.sample() if self._active and self._before is not None else None
        if s is not None:
            self._base = s          # the next start's window: the time between trainings
        self._active, self._set = False, None

    def answer(self, max_age: float = math.inf) -> int | None:
        """The rule's count for the window since the previous sample (None without
        /proc/stat); a fresh ``window`` when there is none or it is older than ``max_age``."""
        s = self.sample()
        if s is None:
            return None
        if self._base is None or s[0] - self._base[0] > max_age:
            self._base = s          # no usable window: make one
        if s[0] - self._base[0] < self.window:
            if self.threads is not None and s is not self._base:
                return self.threads
            self._sleep(self.window - (s[0] - self._base[0]))
            s = self.sample()
        (t0, busy0, own0, _), (t1, busy1, own1, usable) = self._base, s
        self.threads = free_core_threads(usable, busy1 - busy0, own1 - own0, t1 - t0)
        self._base = s
        return self.threads


training_threads = FreeCores()   # the one the Trainer uses: its window spans trainings


def _from_environment() -> None:
    value = os.environ.get("TINYLORA_NUM_THREADS")
    if value:
        try:
            set_num_threads(int(value))
        except ValueError:
            raise ValueError(f"TINYLORA_NUM_THREADS={value!r}: expected a whole number >= 1") from None


_from_environment()
