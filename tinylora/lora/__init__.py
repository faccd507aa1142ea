"""tinylora.lora: LoRA / DoRA adapters as layers, in PEFT's names and file format.

    cfg = lora.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"])
    lora.inject(model, cfg)                     # freezes the base, adds adapter "default"
    lora.trainable_summary(model)
    lora.save_adapter(model, "out/adapter")     # adapter_model.safetensors + adapter_config.json
    lora.load_adapter(other, "out/adapter", adapter_name="b")
    lora.load_adapter_weights(model, "ckpt")    # into its existing adapter (resuming a fine-tune)
    lora.set_adapter(model, ["default", "b"])   # both active: their updates add up
    model(idx, adapter_names=["default", "__base__", "b"])   # one adapter per batch row
    lora.merge(model); lora.unmerge(model); lora.merge_and_unload(model)

    layer = lora.LoRALinear(nn.Linear(64, 32), r=8, lora_alpha=16)   # one layer on its own

Files: config.py (LoraConfig), layers.py (LoRALinear, LoRAEmbedding: the math),
layer_base.py (adapters by name, mixed batches, merge plan, fingerprint), dora.py,
modules_to_save.py, targets.py (matching rules), inject.py, merge.py, multi.py,
adapters.py (files), protocol.py (what a base layer must offer), registry.py.
See docs/lora.md for the math, shapes and file layout.
"""
from .adapters import (AdapterLoadError, BaseModelMismatchError, adapter_state_dict,
                       base_fingerprint, load_adapter, load_adapter_weights, save_adapter)
from .config import LoraConfig
from .inject import inject, mark_only_lora_as_trainable, trainable_parameters, trainable_summary
from .layers import LoraLayer, LoRAEmbedding, LoRALinear
from .merge import merge, merge_and_unload, unload, unmerge
from .modules_to_save import ModulesToSaveWrapper
from .multi import (active_adapters, add_weighted_adapter, delete_adapter, disable_adapter,
                    list_adapters, set_adapter)

__all__ = [
    "LoraConfig", "LoraLayer", "LoRALinear", "LoRAEmbedding", "ModulesToSaveWrapper",
    "inject", "trainable_parameters", "mark_only_lora_as_trainable", "trainable_summary",
    "merge", "unmerge", "merge_and_unload", "unload",
    "set_adapter", "active_adapters", "list_adapters", "disable_adapter", "delete_adapter",
    "add_weighted_adapter",
    "save_adapter", "load_adapter", "load_adapter_weights", "adapter_state_dict", "base_fingerprint",
    "AdapterLoadError", "BaseModelMismatchError",
]
