"""Optimizers (SGD, AdamW), gradient clipping and the warmup + cosine learning-rate schedule.

An optimizer holds ``param_groups``: a list of dicts, each with ``"params"`` (a list of
Parameters) and that group's hyperparameters, exactly like PyTorch's. ``step()`` updates
``p.data`` in place for every parameter that requires grad and has a ``.grad``; frozen
parameters (LoRA's base weights) and parameters without a gradient are skipped and get no
state. Updates keep the parameter's dtype: every scalar is cast to it first, so float32
weights are never upcast to float64.

Default weight decay: given a plain list of parameters (or a model through
``AdamW.from_model``), only parameters with two or more dimensions (matrices, embedding
tables) decay; biases and LayerNorm gains do not, as in GPT-2 / nanoGPT practice. Pass
explicit param groups to choose otherwise.

``state_dict()`` is ``{"tensors": {name: array}, "meta": {JSON-able}}``: the moments by
parameter index (``"state.3.exp_avg"``) and the hyperparameters and step counts as JSON,
so ``save_optimizer`` stores it as one safetensors file, never a pickle.
"""
from __future__ import annotations

import json
import math

from . import backend, dispatch
from .backend import xp
from .nn.module import zero_grad_
from .tensor import Tensor, no_grad

__all__ = ["Optimizer", "SGD", "AdamW", "param_groups", "clip_grad_norm_", "grad_norm",
           "cosine_lr", "WarmupCosineLR", "save_optimizer", "load_optimizer"]


def param_groups(params, weight_decay: float) -> list:
    """Split parameters into a decayed group (ndim >= 2) and an undecayed one (biases, norms).

    params: a Module (its trainable parameters are used) or an iterable of Parameters.
    Empty groups are left out.
    """
    if hasattr(params, "named_parameters"):
        params = [p for p in params.parameters() if p.requires_grad]
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Optimizer:
    """Base class: param groups, per-parameter state, zero_grad and (de)serialisation."""

    _state_keys: tuple = ()        # names of the per-parameter arrays in the state

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        if isinstance(params, Tensor):
            raise TypeError(f"{type(self).__name__} takes an iterable of parameters or param "
                            "groups, got a single Tensor; wrap it in a list")
        if hasattr(params, "named_parameters"):  # a Module
            params = param_groups(params, defaults.get("weight_decay", 0.0))
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got no parameters to optimize "
                             "(is every parameter frozen?)")
        if not isinstance(params[0], dict):
            params = param_groups(params, defaults.get("weight_decay", 0.0))
        self.param_groups = []
        seen = set()
        for g in params:
            group = {**self.defaults, **g, "params": list(g["params"])}
            unknown = set(group) - set(self.defaults) - {"params"}
            if unknown:
                raise ValueError(f"{type(self).__name__}: unknown option(s) {sorted(unknown)} in a "
                                 f"param group; known: {sorted(self.defaults)}")
            for p in group["params"]:
                if not isinstance(p, Tensor):
                    raise TypeError(f"{type(self).__name__}: param groups must hold Tensors, "
                                    f"got {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError(f"{type(self).__name__}: a parameter of shape {p.shape} "
                                     "appears in more than one param group")
                seen.add(id(p))
            self.param_groups.append(group)
        self.state: dict = {}    # id(param) -> {"step": int, name: array}

    @classmethod
    def from_model(cls, model, **kwargs):
        """An optimizer over ``model``'s trainable parameters, decaying only ndim >= 2 ones."""
        wd = kwargs.pop("weight_decay", cls._default_weight_decay)
        return cls(param_groups(model, wd), weight_decay=wd, **kwargs)

    _default_weight_decay = 0.0

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _active(self, group):
        """(param, grad array) for the params this step updates."""
        for p in group["params"]:
            if p.requires_grad and p.grad is not None:
                g = p.grad.data
                if g.shape != p.data.shape:
                    raise ValueError(f"{type(self).__name__}: grad of shape {g.shape} for a "
                                     f"parameter of shape {p.data.shape}")
                yield p, g

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grad_(self._params(), set_to_none)

    def step(self) -> None:
        with no_grad():
            for group in self.param_groups:
                for p, g in self._active(group):
                    st = self.state.get(id(p))
                    if st is None:
                        st = self.state[id(p)] = self._init_state(p)
                    st["step"] += 1
                    self._update(p.data, g, st, group)
                    p._version += 1  # the weight changed in place: stale graphs must notice

    def _init_state(self, p) -> dict:
        raise NotImplementedError

    def _update(self, P, g, st, group) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """``{"tensors": {"state.<i>.<name>": array}, "meta": {...JSON...}}``, i = param index
        counted across groups in order (PyTorch's numbering)."""
        tensors, per_param, groups, i = {}, {}, [], 0
        for group in self.param_groups:
            idx = []
            for p in group["params"]:
                st = self.state.get(id(p))
                if st is not None:
                    per_param[str(i)] = {"step": st["step"]}
                    for k in self._state_keys:
                        if st.get(k) is not None:
                            tensors[f"state.{i}.{k}"] = st[k]
                idx.append(i)
                i += 1
            hyper = {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in group.items() if k != "params"}
            groups.append({**hyper, "params": idx})
        meta = {"type": type(self).__name__, "param_groups": groups, "state": per_param}
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore moments, steps and hyperparameters; everything is checked before any change."""
        name = type(self).__name__
        meta, tensors = state_dict["meta"], state_dict["tensors"]
        if meta.get("type") != name:
            raise ValueError(f"optimizer state is for {meta.get('type')}, not {name}")
        groups = meta["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(f"{name}.load_state_dict: the saved state has param groups of sizes "
                             f"{[len(g['params']) for g in groups]}, this optimizer "
                             f"{[len(g['params']) for g in self.param_groups]}; build the "
                             "optimizer over the same parameters (same freezing) as when saved")
        params = self._params()
        new_state = {}
        for key, info in meta["state"].items():
            p = params[int(key)]
            st = {"step": int(info["step"])}
            for k in self._state_keys:
                arr = tensors.get(f"state.{key}.{k}")
                if arr is None:
                    continue
                if tuple(arr.shape) != tuple(p.shape):
                    raise ValueError(f"{name}.load_state_dict: state.{key}.{k} has shape "
                                     f"{tuple(arr.shape)} but parameter {key} has {tuple(p.shape)}")
                st[k] = xp.asarray(arr, dtype=p.dtype).copy()
            new_state[id(p)] = st
        self.state = new_state
        for group, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k != "params":
                    group[k] = tuple(v) if isinstance(v, list) else v


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and Nesterov, PyTorch's update rule:

    g ← g + wd·p;  b ← μ·b + g (b = g on the first step);  g ← g + μ·b (Nesterov) or b;
    p ← p − lr·g
    """

    _state_keys = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr, momentum and weight_decay must be >= 0, got "
                             f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov))

    def _init_state(self, p):
        return {"step": 0, "momentum_buffer": None}

    def _update(self, P, g, st, group):
        dt = P.dtype.type
        mu, wd = group["momentum"], group["weight_decay"]
        if wd:
            g = g + dt(wd) * P
        if mu:
            buf = st["momentum_buffer"]
            if buf is None:
                buf = st["momentum_buffer"] = g.copy()
            else:
                buf *= dt(mu)
                buf += g
            g = g + dt(mu) * buf if group["nesterov"] else buf
        P -= dt(group["lr"]) * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch's AdamW:

    p ← p·(1 − lr·wd);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²
    p ← p − lr · (m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _default_weight_decay = 0.01

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        b1, b2 = betas
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"AdamW: need lr, eps, weight_decay >= 0 and betas in [0, 1), got "
                             f"lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=(float(b1), float(b2)), eps=eps,
                                      weight_decay=weight_decay))

    def _init_state(self, p):
        return {"step": 0, "exp_avg": xp.zeros_like(p.data), "exp_avg_sq": xp.zeros_like(p.data)}

    def _update(self, P, g, st, group):
        adamw_update(P, g, st["exp_avg"], st["exp_avg_sq"], step=st["step"], lr=group["lr"],
                     betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])


# p ← p·(1 − lr·wd);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  p ← p − lr · m̂ / (√v̂ + ε),
# with the bias corrections m̂ = m / (1−β₁ᵗ), v̂ = v / (1−β₂ᵗ)
@dispatch.op("adamw")
def adamw_update(p, g, m, v, *, step: int, lr: float, betas, eps: float, weight_decay: float):
    """One AdamW step on arrays: p, m and v are updated in place (every scalar in p's dtype).

    The fast version (kernels/adamw.py) makes the same passes block by block, in cache."""
    dt, (b1, b2) = p.dtype.type, betas
    if weight_decay:
        p *= dt(1.0 - lr * weight_decay)
    m[...] = dt(b1) * m + dt(1.0 - b1) * g
    v[...] = dt(b2) * v + dt(1.0 - b2) * g * g
    m_hat = m / dt(1.0 - b1 ** step)
    v_hat = v / dt(1.0 - b2 ** step)
    p -= dt(lr) * m_hat / (xp.sqrt(v_hat) + dt(eps))


# ----------------------------------------------------------------------------- clipping

def grad_norm(params):
    """The global L2 norm of the parameters' gradients, as a 0-d device array (no sync)."""
    sq = [xp.vdot(g, g) for g in (p.grad.data.reshape(-1) for p in params
                                  if p.grad is not None)]
    if not sq:
        return xp.zeros((), dtype=backend.get_default_dtype())
    return xp.sqrt(xp.stack(sq).sum())


def clip_grad_norm_(params, max_norm: float, *, sync: bool = True):
    """Scale all gradients together so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping: a Python float (one host sync), or with ``sync=False``
    a 0-d device array, the scaling then also done on the device (no sync: the training loop
    reads the norm only when it logs). A non-finite norm (NaN/Inf gradient) leaves the
    gradients untouched, so the caller can see it and skip or stop. Both give the same
    numbers: the coefficient is max_norm / (norm + 1e-6), applied only above max_norm.
    """
    params = [p for p in (params.parameters() if hasattr(params, "parameters") else params)
              if p.grad is not None]
    norm = grad_norm(params)
    if not sync:
        if max_norm > 0 and params:
            n64 = norm.astype(xp.float64)
            coef = xp.where(xp.isfinite(n64) & (n64 > max_norm), max_norm / (n64 + 1e-6), 1.0)
            for p in params:
                g = p.grad.data
                g *= coef.astype(g.dtype)
        return norm
    total = float(norm)
    if math.isfinite(total) and max_norm > 0 and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for p in params:
            g = p.grad.data
            g *= g.dtype.type(coef)
    return total


# ----------------------------------------------------------------------------- schedule

def cosine_lr(step: int, warmup: int, max_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at
    ``max_steps``, and ``min_lr`` after (nanoGPT's schedule; step counts from 0)."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup) / max(1, max_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


class WarmupCosineLR:
    """Sets each group's lr from ``cosine_lr`` relative to its base lr; call ``step()`` once
    per optimizer step. ``state_dict()`` is JSON-able."""

    def __init__(self, optimizer: Optimizer, warmup: int, max_steps: int, min_lr_ratio: float = 0.1):
        self.optimizer = optimizer
        self.warmup, self.max_steps, self.min_lr_ratio = warmup, max_steps, min_lr_ratio
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def _apply(self):
        f = cosine_lr(self.last_step, self.warmup, self.max_steps, 1.0, self.min_lr_ratio)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.base_lrs = int(state["last_step"]), list(state["base_lrs"])
        self._apply()


# ----------------------------------------------------------------------------- files

_META_KEY = "tinylora.optimizer"


def save_optimizer(path, optimizer: Optimizer) -> None:
    """The optimizer's state as one safetensors file (JSON part in the metadata), atomically."""
    from .io import save_safetensors
    sd = optimizer.state_dict()
    save_safetensors(path, sd["tensors"], {_META_KEY: json.dumps(sd["meta"])})


def load_optimizer(path, optimizer: Optimizer) -> None:
    """Restore ``optimizer`` from ``save_optimizer``'s file. A file that is not one, or whose
    state does not fit this optimizer, is a FormatError naming the file; nothing changes."""
    from .io import FormatError, load_safetensors
    tensors, meta = load_safetensors(path)
    if _META_KEY not in (meta or {}):
        raise FormatError(f"{path}: not a tinylora optimizer file (no {_META_KEY!r} metadata)")
    try:
        state = json.loads(meta[_META_KEY])
        _check_state(state, tensors, optimizer)
        optimizer.load_state_dict({"tensors": tensors, "meta": state})
    except ValueError as e:   # json's errors included
        raise FormatError(f"{path}: {e}") from None


def _check_state(meta, tensors, optimizer: Optimizer) -> None:
    """ValueError unless ``meta`` (and the moments) is a state this optimizer can take, so
    that load_state_dict never meets a value of the wrong kind half-way through."""
    def kind(v):
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return type(v)
        if isinstance(v, (int, float)):
            return float
        if isinstance(v, (list, tuple)):
            return ("seq", len(v), tuple(kind(x) for x in v))
        return type(v)

    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) \
            or not isinstance(meta.get("state"), dict):
        raise ValueError("the optimizer state must be an object with 'type', 'param_groups' "
                         "and 'state'")
    if meta.get("type") != type(optimizer).__name__:
        kind = str(meta.get("type"))[:40]
        raise ValueError(f"optimizer state is for {kind if kind.isprintable() else repr(kind)}, not "
                         f"{type(optimizer).__name__}")
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list)
               for g in meta["param_groups"]):
        raise ValueError("each saved param group must be an object with a 'params' list")
    sizes = [len(g["params"]) for g in meta["param_groups"]]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(f"the saved state has param groups of sizes {sizes}, this optimizer "
                         f"{[len(g['params']) for g in optimizer.param_groups]}; build the "
                         "optimizer over the same parameters (same freezing) as when saved")
    for saved, group in zip(meta["param_groups"], optimizer.param_groups):
        ours = {k: kind(v) for k, v in group.items() if k != "params"}
        theirs = {k: kind(v) for k, v in saved.items() if k != "params"}
        if ours != theirs:
            raise ValueError(f"a saved param group has settings {sorted(theirs)} of other kinds "
                             f"than this optimizer's {sorted(ours)}")
    params = optimizer._params()
    fresh = None
    for key, info in meta["state"].items():
        if not (key.isdigit() and int(key) < len(params)) or not isinstance(info, dict) \
                or isinstance(info.get("step"), bool) or not isinstance(info.get("step"), int) \
                or info["step"] < 0:
            raise ValueError(f"state entry {key!r} must name a parameter index below "
                             f"{len(params)} and hold an integer 'step' >= 0")
        if fresh is None:   # which moments a state entry holds (AdamW: exp_avg, exp_avg_sq)
            fresh = [k for k, v in optimizer._init_state(params[int(key)]).items()
                     if k in optimizer._state_keys and v is not None]
        for k in fresh:
            a = tensors.get(f"state.{key}.{k}")
            if a is None or a.dtype.kind != "f":
                raise ValueError(f"state.{key}.{k} is missing or not a float tensor")


from .kernels import adamw as _adamw_kernel  # noqa: E402,F401  (registers the fast update)
