"""LoraConfig: the hyper-parameters of one adapter, with PEFT's field names and file form.

``to_peft_dict`` / ``from_peft_dict`` convert to and from ``adapter_config.json`` as PEFT
writes it (``peft_type: "LORA"`` plus the fields below). PEFT adds fields with almost every
release; on reading, fields we do not model are accepted when they hold their "off" value
(null, false, {} or []) and refused otherwise, since each one changes what the adapter does.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..configs import ConfigError

__all__ = ["LoraConfig", "ALL_LINEAR", "BIAS_MODES"]

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")

# Fields of PEFT's file that only describe where the file came from.
_INFORMATIONAL = {"peft_type", "peft_version", "auto_mapping", "revision", "inference_mode",
                  "megatron_core", "qalora_group_size"}


@dataclass
class LoraConfig:
    """One adapter's settings (PEFT's ``LoraConfig`` names and meanings).

    r: rank of the update ΔW = B·A (B (out, r), A (r, in)).
    lora_alpha: the update is scaled by lora_alpha / r (lora_alpha / √r with use_rslora).
    lora_dropout: dropout on the adapter's input only (Linear targets; PEFT ignores it for
        embeddings and so do we).
    target_modules: which layers get an adapter: a list of names, each matching a module
        path equal to it or ending in "." + name (PEFT's rule: "c_attn" matches
        "transformer.h.0.attn.c_attn"); a string, used as a regular expression that must
        match the whole path; or "all-linear" (every Linear except the output head).
    bias: "none" (all biases frozen), "all" (every bias trainable and saved with the
        adapter) or "lora_only" (the biases of the adapted layers).
    use_rslora: rank-stabilised scaling lora_alpha / √r (Kalajdzievski, 2023).
    use_dora: weight-decomposed LoRA (Liu et al., 2024), Linear targets only.
    init_lora_weights: True (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, (1/r)²),
        B zero) or False (B random as well, so the adapter starts non-zero; for tests).
    modules_to_save: names (same matching rule) of modules trained in full and saved with
        the adapter, e.g. a classification head.
    fan_in_fan_out: PEFT's flag for base weights stored (in, out) (GPT-2's Conv1D). Our
        layers always store (out, in), so this only travels in the file, for PEFT.
    task_type, base_model_name_or_path: recorded in the file for PEFT; unused here.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig: r must be a positive int (the adapter's rank), "
                             f"got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig: lora_alpha must be a positive number, "
                             f"got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig: bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError("LoraConfig: init_lora_weights must be True, False or 'gaussian', "
                             f"got {self.init_lora_weights!r}")
        self.target_modules = _names_or_regex(self.target_modules, "target_modules")
        mts = _names_or_regex(self.modules_to_save, "modules_to_save")
        if isinstance(mts, str):
            raise ValueError("LoraConfig: modules_to_save must be a list of module names, "
                             f"got the string {mts!r} (write [{mts!r}])")
        self.modules_to_save = mts

    @property
    def scaling(self) -> float:
        """The factor on B·A: lora_alpha / r, or lora_alpha / √r with use_rslora."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def replace(self, **changes) -> "LoraConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ PEFT's JSON
    def to_peft_dict(self) -> dict:
        """The adapter_config.json content, in the fields every PEFT >= 0.9 reads."""
        tm = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "inference_mode": True,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": list(tm) if isinstance(tm, (list, tuple)) else tm,
            "bias": self.bias,
            "fan_in_fan_out": self.fan_in_fan_out,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "modules_to_save": None if self.modules_to_save is None else list(self.modules_to_save),
            "init_lora_weights": self.init_lora_weights,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    @classmethod
    def from_peft_dict(cls, d, source: str = "adapter_config.json") -> "LoraConfig":
        """Read PEFT's adapter_config.json content; ConfigError naming what we cannot honour."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: must hold a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"{source}: peft_type is {d.get('peft_type')!r}; tinylora reads "
                              "LoRA adapters only (peft_type 'LORA')")
        if "r" not in d or "target_modules" not in d:
            missing = [k for k in ("r", "target_modules") if k not in d]
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k in known or k in _INFORMATIONAL or v in (None, False, {}, []):
                continue
            name = k if str(k).isprintable() else repr(k)   # a key from the file, shown on one line
            raise ConfigError(f"{source}: sets {name}={v!r:.80}, a PEFT feature tinylora does not "
                              "implement; re-save the adapter without it")
        init = d.get("init_lora_weights", True)
        if isinstance(init, str) and init != "gaussian":
            # PiSSA, OLoRA, LoftQ, EVA, CorDA... rewrite the base weights at init time, so the
            # adapter is only valid on that modified base.
            raise ConfigError(f"{source}: init_lora_weights={init!r} changes the base weights "
                              "when PEFT creates the adapter; tinylora loads only adapters made "
                              "with True, False or 'gaussian'")
        kwargs = {k: d[k] for k in known if k in d}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None


def _names_or_regex(value, what: str):
    """None, a string, or a list of non-empty strings (tuples and sets become sorted lists)."""
    if value is None or isinstance(value, str):
        if isinstance(value, str) and not value:
            raise ValueError(f"LoraConfig: {what} is an empty string")
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"LoraConfig: {what} must be a list of module names or a regex string, "
                         f"got {value!r:.80}")
    if not value:
        raise ValueError(f"LoraConfig: {what} is an empty list")
    return list(value)

