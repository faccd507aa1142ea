"""The device path uses only what CuPy has: the engine's tests rerun under the guard module.

Device "guard" binds ``xp`` to NumPy restricted to CuPy's namespace, so a NumPy-only call
on the device path fails here, on machines without a GPU, instead of on the first GPU run.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUARDED = ["tests/test_engine.py", "tests/test_ops_gradcheck.py", "tests/test_nf4.py"]


def test_cupy_imports_without_a_gpu():
    cupy = pytest.importorskip("cupy")
    assert isinstance(cupy.is_available(), bool)


def test_guard_refuses_numpy_only_names():
    pytest.importorskip("cupy")
    from tinylora import backend
    before = backend.get_device()
    backend.set_device("guard")
    try:
        assert backend.xp.exp is backend.np.exp
        with pytest.raises(AttributeError, match="CuPy lacks it"):
            backend.xp.frompyfunc
    finally:
        backend.set_device(before)


def test_engine_suite_passes_under_the_guard():
    pytest.importorskip("cupy")
    env = dict(os.environ, TINYLORA_DEVICE="guard")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *GUARDED],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
