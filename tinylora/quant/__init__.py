"""Quantization for QLoRA: NF4/FP4 blockwise 4-bit weights with double-quantized scales.

Array level (this package today): ``nf4_quantize`` / ``nf4_dequantize`` and ``QuantState``,
byte-compatible with bitsandbytes' ``quantize_4bit`` and its serialized quant state.
"""
from .dynamic_map import (DYNAMIC_MAP, create_dynamic_map, dequantize_blockwise_8bit,
                          double_dequantize, double_quantize, quantize_blockwise_8bit,
                          torch_float32_sum)
from .fp4 import FP4_LEVELS
from .int4 import int4_dequantize, int4_quantize, quantization_error
from .levels import NF4_LEVELS, QUANT_TYPES, code_table
from .nf4 import (dequantize_4bit, nf4_dequantize, nf4_quantize, pack_4bit, quantize_4bit,
                  unpack_4bit)
from .state import QuantState
from .linear4bit import Linear4bit, QuantizationWarning, Weight4bit, linear_4bit
from .convert import (QuantReport, apply_quantization_config, load_quantized, quantization_config,
                      quantize_model, save_quantized)

__all__ = [
    "NF4_LEVELS", "FP4_LEVELS", "DYNAMIC_MAP", "QUANT_TYPES", "QuantState", "code_table",
    "nf4_quantize", "nf4_dequantize", "quantize_4bit", "dequantize_4bit",
    "pack_4bit", "unpack_4bit",
    "create_dynamic_map", "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
    "double_quantize", "double_dequantize", "torch_float32_sum",
    "int4_quantize", "int4_dequantize", "quantization_error",
    "Linear4bit", "linear_4bit", "Weight4bit", "QuantizationWarning",
    "quantize_model", "QuantReport",
    "quantization_config", "apply_quantization_config", "save_quantized", "load_quantized",
]
