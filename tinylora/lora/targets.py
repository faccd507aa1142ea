"""Which modules an adapter goes into: PEFT's matching rules, and errors that show the model.

A module path matches a list of names when it equals one of them or ends with "." + name
("c_attn" matches "transformer.h.0.attn.c_attn", "attn.c_attn" too; "_attn" does not).
A string is a regular expression that must match the whole path (``re.fullmatch``).

"all-linear" selects every linear layer except the output head. The head is a linear layer
whose weight is the same tensor as an embedding's (a tied LM head, like GPT-2's lm_head),
or whose own name is one of HEAD_NAMES: such a layer maps to the output vocabulary or the
classes, where an adapter would fight the task head (PEFT likewise skips the output layer).
"""
from __future__ import annotations

import re

from .config import ALL_LINEAR, LoraConfig
from .layers import LoraLayer, LoRAEmbedding, LoRALinear
from .modules_to_save import ModulesToSaveWrapper
from .protocol import is_embedding_like, is_linear_like

__all__ = ["HEAD_NAMES", "matches", "candidate_modules", "find_targets", "find_modules_to_save",
           "resolve_target_modules", "describe_modules", "is_output_head"]

HEAD_NAMES = ("lm_head", "classifier", "score")
_WRAPPERS = (LoraLayer, ModulesToSaveWrapper)


def matches(path: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def candidate_modules(model):
    """(path, module) of every submodule, a wrapper standing for everything inside it."""
    skip = []
    for path, m in model.named_modules():
        if not path or any(path.startswith(s + ".") for s in skip):
            continue
        if isinstance(m, _WRAPPERS):
            skip.append(path)
        yield path, m


def _tied_ids(model) -> set:
    """ids of the weights that embeddings own (a linear layer sharing one is a tied head)."""
    out = set()
    for _, m in model.named_modules():
        if isinstance(m, LoRAEmbedding):
            m = m.base_layer
        if is_embedding_like(m):
            out.add(id(m.weight))
    return out


def is_output_head(path: str, module, tied: set) -> bool:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    w = getattr(base, "weight", None)
    return path.rsplit(".", 1)[-1] in HEAD_NAMES or (w is not None and id(w) in tied)


def find_targets(model, config: LoraConfig) -> list:
    """(path, module) of the modules the config's target_modules selects, checked: each must
    be a linear layer, an embedding, or a LoRA wrapper of one; at least one must match."""
    tm = config.target_modules
    if tm is None:
        raise ValueError("LoraConfig.target_modules is not set: name the layers to adapt, e.g. "
                         "target_modules=['c_attn'] or target_modules='all-linear'")
    if isinstance(tm, str) and tm != ALL_LINEAR:
        try:
            re.compile(tm)
        except re.error as e:
            raise ValueError(f"target_modules {tm!r} is not a valid regular expression ({e}); "
                             "use a list of names for plain matching") from None
    found = []
    if tm == ALL_LINEAR:
        tied = _tied_ids(model)
        for path, m in candidate_modules(model):
            if (isinstance(m, LoRALinear) or is_linear_like(m)) and not is_output_head(path, m, tied):
                found.append((path, m))
    else:
        for path, m in candidate_modules(model):
            if matches(path, tm):
                ok = isinstance(m, LoraLayer) or is_linear_like(m) or is_embedding_like(m)
                if not ok:
                    raise ValueError(
                        f"target_modules {tm!r} matches {path!r} ({type(m).__name__}), which LoRA "
                        "cannot wrap: only Linear, 4-bit Linear and Embedding layers; name the "
                        "layers inside it instead")
                found.append((path, m))
    if not found:
        raise ValueError(f"target_modules {tm!r} matches no layer of this "
                         f"{type(model).__name__}; its layers are: {describe_modules(model)}")
    return found


def find_modules_to_save(model, config: LoraConfig, targets=()) -> list:
    """(path, module) for config.modules_to_save (same matching rule as a name list)."""
    names = config.modules_to_save
    if not names:
        return []
    found = [(p, m) for p, m in candidate_modules(model)
             if matches(p, names) and not isinstance(m, LoraLayer)]
    for name in names:
        if not any(matches(p, [name]) for p, _ in found):
            raise ValueError(f"modules_to_save entry {name!r} matches no module of this "
                             f"{type(model).__name__}; its layers are: {describe_modules(model)}")
    for tp, _ in targets:
        for sp, _ in found:
            if tp == sp or tp.startswith(sp + "."):
                raise ValueError(f"{tp!r} is both a LoRA target and inside modules_to_save "
                                 f"entry {sp!r}; a module is either adapted or trained in full")
    return found


def resolve_target_modules(model, config: LoraConfig, targets) -> list | str:
    """What to record as target_modules in the file: "all-linear" becomes the names it chose,
    as short last-name components when those select exactly the same layers, else full paths."""
    if config.target_modules != ALL_LINEAR:
        return config.target_modules
    paths = {p for p, _ in targets}
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    chosen = {p for p, _ in candidate_modules(model) if matches(p, short)}
    return short if chosen == paths else sorted(paths)


def describe_modules(model, limit: int = 24) -> str:
    """The wrappable layers, with layer numbers folded: 'transformer.h.*.attn.c_attn (Linear)'."""
    seen = {}
    others = 0
    for path, m in candidate_modules(model):
        kind = type(m).__name__
        if isinstance(m, (LoraLayer,)) or is_linear_like(m) or is_embedding_like(m):
            seen.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", path), kind)
        else:
            others += 1
    items = [f"{p} ({k})" for p, k in seen.items()]
    text = ", ".join(items[:limit]) if items else "(no Linear or Embedding layers)"
    if len(items) > limit:
        text += f", ... and {len(items) - limit} more"
    return text
