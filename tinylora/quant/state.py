"""QuantState: everything besides the packed bytes needed to dequantize a 4-bit tensor.

Serialized names follow bitsandbytes' quant state, so a tinylora checkpoint and a
bitsandbytes ``Linear4bit`` state dict hold the same entries. For a weight stored under
``weight`` (the packed bytes; bitsandbytes' tensor is (ceil(n/2), 1) uint8, tinylora's is
flat, same bytes), the state adds:

    weight.absmax              (n_blocks,) float32 scales, or uint8 codes when nested
    weight.quant_map           (16,) float32 code -> level (NF4 or FP4 table)
    weight.nested_absmax       (ceil(n_blocks/256),) float32   [double quantization only]
    weight.nested_quant_map    (256,) float32 8-bit dynamic map [double quantization only]
    weight.quant_state.bitsandbytes__nf4   (or __fp4) uint8: UTF-8 JSON of the metadata
        {"quant_type", "blocksize", "dtype", "shape",
         and when nested "nested_blocksize", "nested_dtype", "nested_offset"}

``to_dict(packed=True)`` produces exactly these (without the ``weight.`` prefix, which the
caller chooses), all host NumPy arrays ready for safetensors; ``packed=False`` gives the
metadata as plain values instead of the JSON tensor. ``from_dict`` reads either form, with
or without a prefix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..backend import np, to_numpy, xp
from .dynamic_map import double_dequantize
from .levels import code_table

__all__ = ["QuantState"]

_ARRAY_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_META_KEYS = ("quant_type", "blocksize", "dtype", "shape",
              "nested_blocksize", "nested_dtype", "nested_offset")
_PACKED_KEY = "quant_state.bitsandbytes__"


def _dtype_name(dt: np.dtype) -> str:
    return np.dtype(dt).name  # "float32", "float16", "float64": bitsandbytes' spelling


def _dtype_from_name(name: str) -> np.dtype:
    # NumPy has no bfloat16; such a checkpoint dequantizes to float32 (tinylora's compute dtype).
    return np.dtype(np.float32) if name == "bfloat16" else np.dtype(name)


@dataclass(eq=False)
class QuantState:
    """Scales and metadata of one blockwise 4-bit tensor (n = prod(shape) values).

    absmax:           (n_blocks,) float32 per-block absmax, or uint8 8-bit codes when nested
    shape, dtype:     the original tensor's shape and dtype (the default dequantize dtype)
    blocksize:        values per block (64)
    quant_type:       "nf4" or "fp4"
    quant_map:        (16,) float32 level of each 4-bit code
    nested_absmax:    (ceil(n_blocks/nested_blocksize),) float32, or None
    nested_quant_map: (256,) float32 8-bit map, or None
    offset:           mean of the absmax values (a float32 value held as a Python float), or None

    Arrays live on the device that made them (xp arrays). A layer keeps the packed bytes
    and this state, and calls ``dequantize_4bit`` each forward: the scales are rebuilt
    from the 8-bit codes each time (n/64 values, cheap) so double quantization saves
    memory at run time too.
    """

    absmax: Any
    shape: tuple
    dtype: Any = np.float32
    blocksize: int = 64
    quant_type: str = "nf4"
    quant_map: Any = None
    nested_absmax: Any = None
    nested_quant_map: Any = None
    offset: float | None = None
    nested_blocksize: int = 256
    _pairs: Any = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)
        self.dtype = np.dtype(self.dtype)
        self.blocksize = int(self.blocksize)
        if self.quant_map is None:
            self.quant_map = xp.asarray(code_table(self.quant_type))

    # ------------------------------------------------------------------ derived values

    @property
    def nested(self) -> bool:
        """True when the scales are double-quantized."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def absmax_float(self):
        """(n_blocks,) float32 scales used to dequantize (rebuilt from 8-bit codes if nested)."""
        if not self.nested:
            return xp.asarray(self.absmax, dtype=xp.float32)
        return double_dequantize(self.absmax, self.nested_quant_map, self.nested_absmax,
                                 self.offset, self.nested_blocksize)

    def quant_map_array(self):
        return xp.asarray(self.quant_map, dtype=xp.float32)

    def code_pairs(self):
        """(256,) uint64: for byte b, the float32 levels of its high and low nibble, in order.

        Viewing the output as uint64 lets one gather write both values of a byte.
        Cached per quant_map object.
        """
        if self._pairs is None or self._pairs[0] is not self.quant_map:
            q = self.quant_map_array()
            b = xp.arange(256)
            pairs = xp.ascontiguousarray(xp.stack([q[b >> 4], q[b & 0x0F]], axis=1))
            self._pairs = (self.quant_map, pairs.view(xp.uint64).reshape(256))
        return self._pairs[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the state's arrays (scales, maps) plus 4 for the float32 offset."""
        total = sum(int(getattr(self, k).nbytes) for k in _ARRAY_KEYS if getattr(self, k) is not None)
        return total + (4 if self.nested else 0)

    # ------------------------------------------------------------------ serialization

    def _metadata(self) -> dict:
        meta = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "dtype": _dtype_name(self.dtype), "shape": list(self.shape)}
        if self.nested:
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=float(self.offset))
        return meta

    def to_dict(self, packed: bool = True) -> dict:
        """Host NumPy arrays under bitsandbytes' names, plus the metadata.

        packed=True: the metadata is one uint8 array (UTF-8 JSON) under
        ``quant_state.bitsandbytes__<quant_type>``, so every value is an array (safetensors).
        packed=False: the metadata keys with plain JSON-able values.
        """
        out = {k: np.ascontiguousarray(to_numpy(getattr(self, k)))
               for k in _ARRAY_KEYS if getattr(self, k) is not None}
        meta = self._metadata()
        if packed:
            text = json.dumps(meta).encode("utf-8")
            out[_PACKED_KEY + self.quant_type] = np.frombuffer(text, dtype=np.uint8).copy()
        else:
            out.update(meta)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "QuantState":
        """Inverse of ``to_dict``, packed or not; keys may carry a prefix such as ``weight.``.

        ``d`` holds only the state's entries (not the packed weight bytes themselves), e.g.
        a bitsandbytes state dict's ``weight.absmax``, ``weight.quant_map``, ... entries.
        """
        items, meta = {}, {}
        for key, value in d.items():
            if _PACKED_KEY in key:
                meta.update(json.loads(bytes(to_numpy(value).astype(np.uint8)).decode("utf-8")))
                continue
            name = key.rsplit(".", 1)[-1]
            if name in _ARRAY_KEYS:
                items[name] = value
            elif name in _META_KEYS:
                meta[name] = value
            else:
                raise KeyError(f"unknown quant state entry {key!r}")
        missing = [k for k in ("absmax", "quant_map") if k not in items] + \
                  [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in meta]
        if missing:
            raise KeyError(f"quant state lacks {missing}")
        nested = "nested_absmax" in items
        if nested and ("nested_quant_map" not in items or "nested_offset" not in meta):
            raise KeyError("a nested quant state needs nested_quant_map and nested_offset")
        state = cls(
            absmax=xp.asarray(to_numpy(items["absmax"])),
            shape=tuple(meta["shape"]),
            dtype=_dtype_from_name(str(meta["dtype"])),
            blocksize=int(meta["blocksize"]),
            quant_type=str(meta["quant_type"]),
            quant_map=xp.asarray(to_numpy(items["quant_map"]), dtype=xp.float32),
            nested_absmax=xp.asarray(to_numpy(items["nested_absmax"]), dtype=xp.float32) if nested else None,
            nested_quant_map=xp.asarray(to_numpy(items["nested_quant_map"]), dtype=xp.float32) if nested else None,
            offset=float(np.float32(float(meta["nested_offset"]))) if nested else None,
            nested_blocksize=int(meta.get("nested_blocksize", 256)),
        )
        state.validate()
        return state

    def validate(self) -> None:
        """Raise ValueError when the arrays do not fit the metadata."""
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.blocksize < 2 or self.blocksize % 2:
            raise ValueError(f"blocksize must be even, got {self.blocksize}")
        if tuple(self.quant_map.shape) != (16,):
            raise ValueError(f"quant_map must have 16 levels, got shape {tuple(self.quant_map.shape)}")
        want = np.dtype(np.uint8) if self.nested else np.dtype(np.float32)
        if tuple(self.absmax.shape) != (self.n_blocks,) or np.dtype(self.absmax.dtype) != want:
            raise ValueError(f"absmax must be ({self.n_blocks},) {want} for shape {self.shape} "
                             f"in blocks of {self.blocksize}, got {tuple(self.absmax.shape)} {self.absmax.dtype}")
        if self.nested:
            n2 = -(-self.n_blocks // self.nested_blocksize)
            if tuple(self.nested_absmax.shape) != (n2,):
                raise ValueError(f"nested_absmax must have {n2} entries, got {tuple(self.nested_absmax.shape)}")
            if tuple(self.nested_quant_map.shape) != (256,):
                raise ValueError("nested_quant_map must have 256 levels")
