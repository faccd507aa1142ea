"""tinylora.nn: modules with PyTorch's names and layouts."""
from .layers import (GELU, Dropout, Embedding, Identity, LayerNorm, Linear, ModuleDict,
                     ModuleList, ReLU, Sequential)
from .routing import BASE, adapter_routing, current_routing
from .recompute import checkpoint
from .module import IncompatibleKeys, Module, Parameter, ShapeError, StateDictError

__all__ = ["Module", "Parameter", "ShapeError", "StateDictError", "IncompatibleKeys", "Linear", "Embedding",
           "LayerNorm", "Dropout", "GELU", "ReLU", "Identity", "ModuleList", "ModuleDict",
           "Sequential", "adapter_routing", "current_routing", "BASE", "checkpoint"]
from .attention import CausalSelfAttention, KVCache  # noqa: E402
from .transformer import MLP, Block  # noqa: E402
