"""Linear4bit: a frozen linear layer whose weight lives in 4-bit NF4 (or FP4) blocks.

    y = x Wᵀ + b,   W (out, in) = level[code] · absmax, rebuilt from the codes on each use

The layer holds no float copy of W. Each forward dequantizes W (in the compute dtype) into
a workspace shared by all 4-bit layers and runs one GEMM; the backward dequantizes it again
for dx = dy·W. Keeping the forward's W until the backward would hold a float copy of every
quantized layer between the two passes (4 bytes per parameter, 8x the codes): the memory
QLoRA exists to save. Dequantizing twice costs ~3% of a QLoRA step of the 6x384 GPT
(profiled) and ~13-19% of one 4096x4096 layer's forward + backward at 512 rows
(benchmarks/bench_qlora.py). W is dequantized whole: slicing the GEMM into row chunks of W,
to shrink the workspace, measured 12-30% slower on the CPU (BLAS already blocks for the cache).
With a LoRA adapter, the layer hands ``F.lora_linear`` a ``Weight4bit`` (its weight
provider), so QLoRA runs the same op, forward and backward, as LoRA on a float base.

State dict (bitsandbytes' Linear4bit layout, so its files and ours name the same things)::

    weight                                (ceil(n/2), 1) uint8  two codes per byte
    bias                                  (out,) float          [bias=True]
    weight.absmax                         (n_blocks,) uint8 codes (double quant) or float32
    weight.quant_map                      (16,) float32 code -> level
    weight.nested_absmax                  (ceil(n_blocks/256),) float32   [double quant]
    weight.nested_quant_map               (256,) float32                  [double quant]
    weight.quant_state.bitsandbytes__nf4  uint8 UTF-8 JSON metadata (shape, blocksize, offset)

The JSON is space-padded to a width fixed by the layer's shape and settings, so every
layer of one shape has the same state-dict shapes and ``load_state_dict`` between two such
layers works (JSON ignores the trailing spaces; bitsandbytes reads it the same way).
``Linear4bit.load_state_dict`` also takes the JSON at any other width, such as the unpadded
one in bitsandbytes' state dict: it is re-encoded at the layer's width (``fit_state_dict``;
for a whole model, ``quant.prequantized.fit_quant_states``).
The float arrays keep float32 under ``model.double()``: their dtype is part of the format.
"""
from __future__ import annotations

import json
import math
import warnings

from .. import backend
from ..backend import np, to_numpy, xp
from ..functional.lora import lora_linear
from ..nn.module import Module, Parameter, ShapeError
from ..tensor import Tensor, make_result
from .levels import code_table
from .nf4 import dequantize_4bit, quantize_4bit
from .state import QuantState, _dtype_from_name, _dtype_name

__all__ = ["Linear4bit", "linear_4bit", "Weight4bit", "QuantizationWarning", "StateBuffer",
           "clear_workspace"]

_META = "weight.quant_state.bitsandbytes__"
_FLOAT_WIDTH = 24           # the longest repr() of a float, e.g. -1.2345678901234567e-308


class QuantizationWarning(UserWarning):
    """A 4-bit weight was rounded again (a merge into a quantized base)."""


_SLOT = Tensor.data        # Tensor's own storage for .data


class StateBuffer(Tensor):
    """A buffer whose dtype belongs to a file format: an array of another dtype assigned to
    ``.data`` (``Module.to_dtype``, ``model.double()``) is cast back to the buffer's dtype."""

    __slots__ = ()

    @property
    def data(self):
        return _SLOT.__get__(self, Tensor)

    @data.setter
    def data(self, value):
        try:
            old = _SLOT.__get__(self, Tensor)
        except AttributeError:    # first assignment, from Tensor.__init__
            old = None
        if old is not None and value.dtype != old.dtype:
            value = value.astype(old.dtype)
        _SLOT.__set__(self, value)


# --------------------------------------------------------------------------- the op
# The dense W goes into one process-wide workspace per (device, dtype), grown to the
# largest layer seen. A fresh array per call would be as large, but on the CPU an array
# above glibc's mmap threshold (32 MiB) comes back from the kernel as untouched pages:
# their first-touch faults doubled the dequantize time of a 4096x4096 layer (measured).
# The workspace is one layer's W, held between calls; not thread-safe (like grad mode).
_workspace = {}


def _scratch(n: int, dtype):
    key = (backend.get_device(), np.dtype(dtype))
    buf = _workspace.get(key)
    if buf is None or buf.size < n:
        _workspace.pop(key, None)            # free the smaller one first
        buf = _workspace[key] = xp.empty(n, dtype=dtype)
    return buf[:n]


def clear_workspace() -> None:
    """Free the dequantization workspace (it is re-allocated on the next forward)."""
    _workspace.clear()


def _dequantize_to_workspace(P, state: QuantState, dtype):
    """W (out, in) in ``dtype``, written into the workspace: a view the next call overwrites."""
    return dequantize_4bit(P, state, dtype, out=_scratch(state.numel, dtype))


class Weight4bit:
    """A 4-bit layer's frozen W for ``F.lora_linear`` (a ``functional.lora.WeightProvider``):
    ``dense(dtype)`` dequantizes the codes into the workspace, in the forward and again in
    the backward. Holds the codes array and state of one forward; ``saved`` lets the
    backward check the codes were not re-quantized in between."""

    def __init__(self, packed: Tensor, state: QuantState, compute_dtype=None):
        self.codes, self.state, self.compute_dtype = packed.data, state, compute_dtype
        self.shape, self.saved = state.shape, (packed,)

    def dense(self, dtype):
        return _dequantize_to_workspace(self.codes, self.state, dtype)


# y = x Wᵀ + b, W = deq(codes)  ->  dx = dy · deq(codes),  db = Σ_rows dy,  no dW (frozen codes)
def linear_4bit(x: Tensor, packed: Tensor, state: QuantState, bias: Tensor | None = None,
                compute_dtype=None) -> Tensor:
    """F.linear with a 4-bit weight: x (..., in), packed codes of W (out, in), bias (out,).

    The product runs in ``compute_dtype`` (default: x's dtype) and the result comes back
    in x's dtype. ``packed`` is the layer's code buffer: the backward checks it was not
    re-quantized in between (its version counter).
    """
    n_out, n_in = state.shape
    cd = np.dtype(x.dtype if compute_dtype is None else compute_dtype)
    P = packed.data
    W = _dequantize_to_workspace(P, state, cd)                # (out, in), overwritten next call
    x2 = x.data.reshape(-1, n_in)
    y = x2.astype(cd, copy=False) @ W.T                       # (rows, out)
    if bias is not None:
        y += bias.data
    y = y.astype(x.dtype, copy=False).reshape(x.shape[:-1] + (n_out,))

    def backward(g):
        g2 = g.reshape(-1, n_out)
        dx = db = None
        if x.requires_grad:
            W = _dequantize_to_workspace(P, state, cd)        # rebuilt, not kept from forward
            dx = (g2.astype(cd, copy=False) @ W).astype(x.dtype, copy=False).reshape(x.shape)
        if bias is not None and bias.requires_grad:
            db = g2.sum(axis=0).astype(bias.dtype, copy=False)
        return (dx,) if bias is None else (dx, db)
    parents = (x,) if bias is None else (x, bias)
    return make_result(y, parents, backward, "linear4bit", (packed,))


# --------------------------------------------------------------------------- the layer

def _metadata(state: QuantState) -> dict:
    return {k: v for k, v in state.to_dict(packed=False).items() if not hasattr(v, "shape")}


def _encode_metadata(meta: dict):
    """Metadata as UTF-8 JSON bytes, space-padded to a width that does not depend on the
    offset's value (only on the shape and settings), as a (width,) uint8 host array."""
    text = json.dumps(meta)
    width = len(text)
    if "nested_offset" in meta:
        width = len(json.dumps({**meta, "nested_offset": 0.0})) - len("0.0") + _FLOAT_WIDTH
    raw = text.encode("utf-8").ljust(width, b" ")
    return np.frombuffer(raw, dtype=np.uint8).copy()


def _decode_metadata(arr) -> dict:
    return json.loads(bytes(to_numpy(arr).astype(np.uint8)).decode("utf-8"))


class Linear4bit(Module):
    """y = x Wᵀ + b with W (out_features, in_features) stored as 4-bit codes; frozen.

    Only the bias can train (a Parameter, frozen by default; LoRA's ``bias`` mode may
    unfreeze it). ``compute_dtype``: the dtype of the matrix product (None: the input's).
    The initial W is nn.Linear's (uniform ±1/√in), quantized; ``from_linear`` converts an
    existing layer. ``dtype`` is the dense weight's dtype (what ``dequantize()`` returns).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
                 compute_dtype=None, dtype=None):
        super().__init__()
        self._configure(in_features, out_features, blocksize, double_quant, quant_type, compute_dtype)
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        W = backend.uniform(-bound, bound, (out_features, in_features), dtype)
        b = backend.uniform(-bound, bound, (out_features,), dtype) if bias else None
        self.bias = None if b is None else Parameter(b, requires_grad=False)
        self._store(W, first=True)

    def _configure(self, in_features, out_features, blocksize, double_quant, quant_type, compute_dtype):
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Linear4bit: {name} must be a positive integer, got {v!r}")
        code_table(quant_type)   # raises for an unknown quant_type
        if compute_dtype is not None and np.dtype(compute_dtype).kind != "f":
            raise TypeError(f"Linear4bit: compute_dtype must be a float dtype or None, "
                            f"got {compute_dtype!r}")
        self.in_features, self.out_features = in_features, out_features
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        self.quant_type = quant_type
        self.compute_dtype = None if compute_dtype is None else np.dtype(compute_dtype)
        self._state_cache = None  # (buffer stamp, QuantState)

    @classmethod
    def from_linear(cls, linear, blocksize: int = 64, double_quant: bool = True,
                    quant_type: str = "nf4", compute_dtype=None) -> "Linear4bit":
        """Quantize an nn.Linear's weight; its bias Parameter is reused, frozen."""
        W = linear.weight.data
        if W.ndim != 2:
            raise ValueError(f"Linear4bit.from_linear needs a 2-d weight, got shape {tuple(W.shape)}")
        layer = cls.__new__(cls)
        Module.__init__(layer)
        layer._configure(int(W.shape[1]), int(W.shape[0]), blocksize, double_quant, quant_type,
                         compute_dtype)
        b = getattr(linear, "bias", None)
        if b is not None:
            b.requires_grad = False
        layer.bias = b
        layer._store(W, first=True)
        layer.train(linear.training)
        return layer

    # ------------------------------------------------------------------ storage
    @property
    def weight_shape(self) -> tuple:
        return (self.out_features, self.in_features)

    @property
    def dtype(self):
        """The dense weight's dtype (recorded in the quant state; ``dequantize()``'s default)."""
        return self.quant_state.dtype

    def _store(self, W, first: bool = False) -> None:
        """Quantize W (out, in) and write codes and state into the buffers (all or nothing)."""
        packed, state = quantize_4bit(W, blocksize=self.blocksize, double_quant=self.double_quant,
                                      quant_type=self.quant_type)
        new = {"weight": packed.reshape(-1, 1), "weight.absmax": state.absmax,
               "weight.quant_map": state.quant_map}
        if state.nested:
            new["weight.nested_absmax"] = state.nested_absmax
            new["weight.nested_quant_map"] = state.nested_quant_map
        new[_META + self.quant_type] = xp.asarray(_encode_metadata(_metadata(state)))
        if first:
            for name, arr in new.items():  # copies: the level tables are shared read-only arrays
                buf = Tensor(arr.copy()) if arr.dtype.kind != "f" else StateBuffer(arr.copy())
                self.register_buffer(name, buf)
        else:
            bufs = self._buffers
            if set(new) != {k for k in bufs if k == "weight" or k.startswith("weight.")}:
                raise RuntimeError("Linear4bit: the new quant state has other entries than the "
                                   "layer's buffers")  # cannot happen with fixed settings
            for name, arr in new.items():
                t = bufs[name]
                if t.data.shape == arr.shape:
                    t.data[...] = arr
                else:
                    t.data = arr.copy()
                t._version += 1
        self._state_cache = None

    def _stamp(self) -> tuple:
        return tuple((k, id(t.data), t._version) for k, t in self._buffers.items())

    @property
    def quant_state(self) -> QuantState:
        """The QuantState over the layer's buffers (no copies), rebuilt when a buffer changed
        (``load_state_dict``, ``requantize_``) since the metadata JSON holds the offset."""
        stamp = self._stamp()
        if self._state_cache is not None and self._state_cache[0] == stamp:
            return self._state_cache[1]
        b = self._buffers
        meta = _decode_metadata(b[_META + self.quant_type].data)
        nested = "weight.nested_absmax" in b
        state = QuantState(
            absmax=b["weight.absmax"].data, shape=tuple(meta["shape"]),
            dtype=_dtype_from_name(str(meta["dtype"])),
            blocksize=int(meta["blocksize"]), quant_type=meta["quant_type"],
            quant_map=b["weight.quant_map"].data,
            nested_absmax=b["weight.nested_absmax"].data if nested else None,
            nested_quant_map=b["weight.nested_quant_map"].data if nested else None,
            offset=float(np.float32(meta["nested_offset"])) if nested else None,
            nested_blocksize=int(meta.get("nested_blocksize", 256)))
        if state.shape != self.weight_shape:
            raise ValueError(f"Linear4bit: the quant state is for a {state.shape} weight, "
                             f"but the layer is {self.weight_shape}")
        self._state_cache = (stamp, state)
        return state

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the stored weight: codes, scales, tables and metadata (not the bias)."""
        return sum(int(t.data.nbytes) for k, t in self._buffers.items()
                   if k == "weight" or k.startswith("weight."))

    def dequantize(self, dtype=None):
        """The dense weight (out_features, in_features) as a new xp array (default: ``dtype``)."""
        return dequantize_4bit(self.weight.data, self.quant_state, dtype=dtype)

    def requantize_(self, W, warn: bool = True) -> "Linear4bit":
        """Replace the codes and state by those of a new dense weight W (out, in), in place.

        Used when LoRA merges into a 4-bit base: W + s·B·A is rounded to 4 bits again, so
        the merged model differs from the unmerged one by that rounding (warned once)."""
        W = W.data if isinstance(W, Tensor) else xp.asarray(W)
        if tuple(W.shape) != self.weight_shape:
            raise ShapeError(self, f"requantize_ needs a weight of shape {self.weight_shape}, "
                                   f"got {tuple(W.shape)}")
        if warn:
            warnings.warn("re-quantizing a merged weight into 4 bits rounds it again, so outputs "
                          "change by that error; lora.merge_and_unload(model, dequantize=True) "
                          "keeps the merged weight in float", QuantizationWarning, stacklevel=2)
        self._store(W.astype(self.dtype, copy=False))
        return self

    def fit_state_dict(self, state_dict, prefix: str = "") -> dict:
        """``state_dict`` with this layer's quant-state JSON (key ``prefix`` +
        ``weight.quant_state.bitsandbytes__<type>``) re-encoded at the layer's width.

        bitsandbytes writes the JSON unpadded (168 bytes where this layer keeps 173, say); the
        values stay, the padding changes. The JSON must describe a weight like this layer's
        (shape, block size, quant type, double quantization or not); a bfloat16 ``dtype``
        becomes float32 (NumPy has no bfloat16; tinylora dequantizes to float32).
        """
        key = prefix + _META + self.quant_type
        if key not in state_dict:
            return state_dict
        value = state_dict[key]
        try:
            theirs = _decode_metadata(value.data if isinstance(value, Tensor) else value)
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"Linear4bit: {key!r} is not UTF-8 JSON quant-state metadata") from None
        ours = _metadata(self.quant_state)
        for name in ("quant_type", "blocksize", "shape"):
            if theirs.get(name) != ours[name]:
                raise ValueError(f"Linear4bit: {key!r} has {name}={theirs.get(name)!r}, this layer "
                                 f"{name}={ours[name]!r}")
        if ("nested_offset" in theirs) != self.double_quant:
            raise ValueError(f"Linear4bit: {key!r} is {'' if 'nested_offset' in theirs else 'not '}"
                             f"double-quantized, this layer has double_quant={self.double_quant}")
        missing = [k for k in ours if k not in theirs]
        if missing:
            raise ValueError(f"Linear4bit: {key!r} lacks {missing}")
        meta = {k: theirs[k] for k in ours}
        meta["dtype"] = _dtype_name(_dtype_from_name(str(meta["dtype"])))
        arr = _encode_metadata(meta)
        width = self._buffers[_META + self.quant_type].data.shape
        if arr.shape != width:
            raise ValueError(f"Linear4bit: {key!r} re-encoded has {arr.size} bytes, this layer "
                             f"keeps {width[0]}")
        return {**state_dict, key: arr}

    def load_state_dict(self, state_dict, strict: bool = True):
        """As ``Module.load_state_dict``; the quant-state JSON may have any width, such as the
        unpadded one of bitsandbytes' ``Linear4bit`` state dict (see ``fit_state_dict``)."""
        return super().load_state_dict(self.fit_state_dict(state_dict), strict)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ShapeError(self, f"expected input of shape (..., {self.in_features}), "
                                   f"got {tuple(x.shape)}")
        return linear_4bit(x, self.weight, self.quant_state, self.bias, self.compute_dtype)

    def weight_provider(self) -> Weight4bit:
        """The frozen W as ``F.lora_linear`` takes it (dequantized on request)."""
        return Weight4bit(self.weight, self.quant_state, self.compute_dtype)

    def lora_forward(self, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                     x_dropped: Tensor | None = None) -> Tensor:
        """This layer's output plus one LoRA adapter's, s·(x_d Aᵀ) Bᵀ: ``F.lora_linear``."""
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ShapeError(self, f"expected input of shape (..., {self.in_features}), "
                                   f"got {tuple(x.shape)}")
        return lora_linear(x, self.weight_provider(), self.bias, lora_A, lora_B, scaling, x_dropped)

    def extra_repr(self):
        cd = "None" if self.compute_dtype is None else self.compute_dtype.name
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={cd}")
