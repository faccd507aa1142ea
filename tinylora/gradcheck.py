"""Gradient checking: every backward against central finite differences in float64.

For an output y = f(x₁..xₙ) the check draws a fixed random cotangent v (same shape as y)
and compares the backward's gradient of L = Σ v ⊙ y with

    ∂L/∂x[i] ≈ (L(x + ε eᵢ) - L(x - ε eᵢ)) / 2ε            (error O(ε²))

Small problems get the whole Jacobian (one backward per output element, one pair of
forwards per input element); medium ones every input element for one v; large ones
random directions u, comparing vᵀ J u with the backward's ⟨∂L/∂x, u⟩.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import backend
from .backend import np, xp
from .tensor import Tensor, no_grad

__all__ = ["gradcheck", "GradcheckError", "GradcheckReport", "InputReport"]


@dataclass
class InputReport:
    index: int
    shape: tuple
    mode: str            # "jacobian" | "elements" | "directions"
    max_abs_err: float   # max |analytic - numeric|
    rel_err: float       # max_abs_err / max(max |numeric|, max |analytic|, atol)
    ok: bool


@dataclass
class GradcheckReport:
    inputs: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.inputs)

    @property
    def max_rel_err(self) -> float:
        return max((r.rel_err for r in self.inputs), default=0.0)

    def __str__(self) -> str:
        lines = ["input  shape            mode        max_abs_err  rel_err   ok"]
        for r in self.inputs:
            lines.append(f"{r.index:<6} {str(r.shape):<16} {r.mode:<11} {r.max_abs_err:<12.3e} "
                         f"{r.rel_err:<9.2e} {'yes' if r.ok else 'NO'}")
        return "\n".join(lines)


class GradcheckError(AssertionError):
    """The analytic gradient disagrees with finite differences; ``.report`` says where."""

    def __init__(self, report: GradcheckReport):
        super().__init__("gradient check failed:\n" + str(report))
        self.report = report


def _loss(fn, inputs, v) -> float:
    with no_grad():
        out = fn(*inputs)
    return float(backend.to_numpy((out.data * v).sum()))


def _analytic(fn, inputs, targets, v):
    for t in targets:
        t.grad = None
    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(out).__name__}")
    if not out.requires_grad:
        raise RuntimeError("gradcheck: the output does not depend on any input that requires grad")
    out.backward(Tensor._wrap(v))
    return [np.zeros(t.shape) if t.grad is None else backend.to_numpy(t.grad.data).astype(np.float64)
            for t in targets]


def gradcheck(fn, inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-4, *,
              jacobian_limit: int = 20_000, element_limit: int = 4096, n_directions: int = 6,
              seed: int = 0, raise_on_failure: bool = True) -> GradcheckReport:
    """Check ``fn(*inputs)``'s backward for every input that requires grad.

    Inputs must be float64 (build them under ``tl.default_dtype(tl.float64)``). fn must be
    deterministic (no dropout). Passes where |analytic - numeric| <= atol + rtol·|numeric|
    elementwise. Returns the report; raises GradcheckError with it on a mismatch unless
    ``raise_on_failure=False``.
    """
    inputs = list(inputs)
    targets = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    if not targets:
        raise ValueError("gradcheck: no input has requires_grad=True")
    for i, t in enumerate(targets):
        if t.dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} is {t.dtype}; finite differences need float64 "
                            "(build inputs and models under tl.default_dtype(tl.float64))")
    rng = np.random.default_rng(seed)
    with no_grad():
        out = fn(*inputs)
    v_host = rng.standard_normal(out.shape)
    v = xp.asarray(v_host)
    n_out = int(np.prod(out.shape)) if out.shape else 1
    grads = _analytic(fn, inputs, targets, v)
    report = GradcheckReport()
    for i, (t, g) in enumerate(zip(targets, grads)):
        n = t.data.size
        if n * n_out <= jacobian_limit and n_out <= 256 and n <= element_limit:
            r = _check_jacobian(fn, inputs, t, i, eps, atol, rtol, n_out)
        elif n <= element_limit:
            r = _check_elements(fn, inputs, t, i, g, v, eps, atol, rtol)
        else:
            r = _check_directions(fn, inputs, t, i, g, v, eps, atol, rtol, n_directions, rng)
        report.inputs.append(r)
    if raise_on_failure and not report.ok:
        raise GradcheckError(report)
    return report


def _errors(index, shape, mode, analytic, numeric, atol, rtol) -> InputReport:
    diff = np.abs(analytic - numeric)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = max(float(np.abs(numeric).max(initial=0.0)), float(np.abs(analytic).max(initial=0.0)), atol)
    ok = bool(np.all(diff <= atol + rtol * np.abs(numeric)))
    return InputReport(index, tuple(shape), mode, max_abs, max_abs / scale, ok)


def _perturbed(fn, inputs, t, flat_index, step, v) -> float:
    flat = t.data.reshape(-1)            # a view: the input itself is nudged and restored
    old = flat[flat_index].copy()
    flat[flat_index] = old + step
    plus = _loss(fn, inputs, v)
    flat[flat_index] = old - step
    minus = _loss(fn, inputs, v)
    flat[flat_index] = old
    return (plus - minus) / (2 * step)


def _check_jacobian(fn, inputs, t, index, eps, atol, rtol, n_out) -> InputReport:
    """Every entry J[o, i] = ∂y_o/∂x_i: one backward per output, two forwards per input."""
    if not t.data.flags.c_contiguous:
        raise ValueError("gradcheck: inputs must be contiguous arrays")
    n = t.data.size
    with no_grad():
        out_shape = fn(*inputs).shape
    numeric = np.zeros((n_out, n))
    for i in range(n):
        flat = t.data.reshape(-1)
        old = flat[i].copy()
        with no_grad():
            flat[i] = old + eps
            plus = backend.to_numpy(fn(*inputs).data).reshape(-1)
            flat[i] = old - eps
            minus = backend.to_numpy(fn(*inputs).data).reshape(-1)
        flat[i] = old
        numeric[:, i] = (plus - minus) / (2 * eps)
    analytic = np.zeros((n_out, n))
    for o in range(n_out):
        e = np.zeros(n_out)
        e[o] = 1.0
        t.grad = None
        out = fn(*inputs)
        out.backward(Tensor._wrap(xp.asarray(e.reshape(out_shape))))
        if t.grad is not None:
            analytic[o] = backend.to_numpy(t.grad.data).reshape(-1)
    t.grad = None
    return _errors(index, t.shape, "jacobian", analytic, numeric, atol, rtol)


def _check_elements(fn, inputs, t, index, g, v, eps, atol, rtol) -> InputReport:
    """vᵀJ, entry by entry: the whole gradient of L = Σ v ⊙ y."""
    numeric = np.array([_perturbed(fn, inputs, t, i, eps, v) for i in range(t.data.size)])
    return _errors(index, t.shape, "elements", g.reshape(-1), numeric, atol, rtol)


def _check_directions(fn, inputs, t, index, g, v, eps, atol, rtol, k, rng) -> InputReport:
    """vᵀJu for k random unit directions u against ⟨∂L/∂x, u⟩."""
    numeric, analytic = [], []
    base = t.data.copy()
    for _ in range(k):
        u = rng.standard_normal(t.shape)
        u /= np.linalg.norm(u)
        ud = xp.asarray(u)
        t.data[...] = base + eps * ud
        plus = _loss(fn, inputs, v)
        t.data[...] = base - eps * ud
        minus = _loss(fn, inputs, v)
        t.data[...] = base
        numeric.append((plus - minus) / (2 * eps))
        analytic.append(float((g * u).sum()))
    return _errors(index, t.shape, "directions", np.array(analytic), np.array(numeric), atol, rtol)
