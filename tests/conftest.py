"""Device markers: the suite runs on TINYLORA_DEVICE=cpu (default), guard, or cuda.

``@pytest.mark.cpu_only("why")``: CPU-only by nature (bit-exact resume, fork, BLAS threads);
skipped on "cuda", run on "cpu" and "guard" (NumPy underneath).
``@pytest.mark.host_checks``: expects a value check that reads array data (an out-of-range id
raising IndexError); the device path skips such checks, since each would be a GPU sync, so
the test is skipped on "cuda" and "guard".
"""
import pytest

from tinylora import backend


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only(reason): skipped on the GPU (TINYLORA_DEVICE=cuda)")
    config.addinivalue_line("markers", "host_checks: skipped where arrays live on a device (cuda, guard)")


def pytest_report_header(config):
    return f"tinylora device: {backend.get_device()} (TINYLORA_DEVICE)"


def pytest_runtest_setup(item):
    m = item.get_closest_marker("cpu_only")
    if m is not None and backend.is_cuda():
        pytest.skip(f"CPU only: {m.args[0] if m.args else 'see the test'}")
    if item.get_closest_marker("host_checks") is not None and backend.on_device():
        pytest.skip("a host-side value check: the device path skips it (it would sync the GPU)")
