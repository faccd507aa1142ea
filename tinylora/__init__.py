"""tinylora: LoRA and QLoRA from scratch on a small reverse-mode autograd engine.

    import tinylora as tl
    x = tl.tensor([[1.0, 2.0]], requires_grad=True)
    (x @ x.T).sum().backward()
"""
from __future__ import annotations

from . import backend
from .backend import (DeviceError, default_dtype, get_default_dtype, get_device, manual_seed,
                      set_default_dtype, set_device)
from .tensor import Tensor, enable_grad, is_grad_enabled, no_grad, tensor
from .dispatch import get_kernels, kernels_mode, set_kernels
from . import ops  # noqa: E402  (attaches the operator methods to Tensor)
from . import functional  # noqa: E402
from . import kernels  # noqa: E402,F401  (registers the fast versions of the ops)
from .gradcheck import GradcheckError, gradcheck
from . import blas  # noqa: E402  (reads TINYLORA_NUM_THREADS)
from .blas import get_num_threads, set_num_threads
from .ops import cat, concat, stack, where

float16 = backend.np.dtype("float16")
float32 = backend.np.dtype("float32")
float64 = backend.np.dtype("float64")
int32 = backend.np.dtype("int32")
int64 = backend.np.dtype("int64")
uint8 = backend.np.dtype("uint8")
bool_ = backend.np.dtype("bool")

from .version import __version__  # noqa: E402,F401


def zeros(*shape, dtype=None, requires_grad: bool = False) -> Tensor:
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    dt = get_default_dtype() if dtype is None else dtype
    return Tensor(backend.xp.zeros(shape, dtype=dt), requires_grad=requires_grad)


def ones(*shape, dtype=None, requires_grad: bool = False) -> Tensor:
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    dt = get_default_dtype() if dtype is None else dtype
    return Tensor(backend.xp.ones(shape, dtype=dt), requires_grad=requires_grad)


def randn(*shape, dtype=None, requires_grad: bool = False) -> Tensor:
    """Standard normal values from the seeded host stream (``tl.manual_seed``)."""
    return Tensor(backend.randn(*shape, dtype=dtype), requires_grad=requires_grad)


def rand(*shape, dtype=None, requires_grad: bool = False) -> Tensor:
    return Tensor(backend.rand(*shape, dtype=dtype), requires_grad=requires_grad)


def arange(*args, dtype=None) -> Tensor:
    return Tensor(backend.xp.arange(*args, dtype=dtype))


# the layers above the engine, reachable as tl.nn, tl.optim, tl.lora, ... (after the helpers
# they use are defined)
from . import data, lora, models, nn, optim  # noqa: E402,F401
