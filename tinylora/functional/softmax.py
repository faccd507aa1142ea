"""softmax, log_softmax and cross_entropy: fused, each with one hand-derived backward.

Fused because the composed graph (exp, sum, div, log) both costs more passes over memory
and overflows for large logits; subtracting the row maximum keeps ±1e4 logits finite.
"""
from __future__ import annotations

from .. import backend, dispatch
from ..backend import xp
from ..tensor import Tensor, make_result


# y = e^x / Σ e^x  ->  dx = y ⊙ (dy - Σ(dy ⊙ y))      (the Jacobian diag(y) - y yᵀ applied to dy)
def softmax(x: Tensor, dim: int = -1) -> Tensor:
    X = x.data
    e = xp.exp(X - X.max(axis=dim, keepdims=True))   # the row maximum keeps exp finite
    y = e / e.sum(axis=dim, keepdims=True)

    def backward(g):
        gy = g * y
        return (gy - y * gy.sum(axis=dim, keepdims=True),)
    return make_result(y, (x,), backward, "softmax")


# y = x - m - log Σ e^(x-m)  ->  dx = dy - softmax(x) ⊙ Σ dy
def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    X = x.data
    shifted = X - X.max(axis=dim, keepdims=True)
    y = shifted - xp.log(xp.exp(shifted).sum(axis=dim, keepdims=True))

    def backward(g):
        return (g - xp.exp(y) * g.sum(axis=dim, keepdims=True),)
    return make_result(y, (x,), backward, "log_softmax")


def check_cross_entropy(logits: Tensor, targets, ignore_index: int, reduction: str):
    """The checks both versions of cross_entropy make: (Z (N, C), T, valid (N,), tv (N,)),
    tv the targets with ignored ones replaced by 0."""
    T = targets.data if isinstance(targets, Tensor) else xp.asarray(targets)
    Z = logits.data
    C = Z.shape[-1]
    if T.shape != Z.shape[:-1]:
        raise ValueError(f"cross_entropy: logits {Z.shape} need targets of shape {Z.shape[:-1]}, "
                         f"got {T.shape}")
    if T.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer class ids, got dtype {T.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    t = T.reshape(-1)
    valid = t != ignore_index
    tv = xp.where(valid, t, 0)
    if T.size and not backend.on_device() and (int(tv.min()) < 0 or int(tv.max()) >= C):
        # checked on the host only: on the GPU this would cost a sync every step
        raise IndexError(f"cross_entropy: target ids must lie in [0, {C}) or equal "
                         f"ignore_index={ignore_index}; got min {int(tv.min())}, max {int(tv.max())}")
    return Z.reshape(-1, C), T, valid, tv


def nll_loss_from_lse(Z2, lse, T, valid, tv, reduction, label_smoothing):
    """(loss, n_valid) from the rows' logsumexp: nll_i = lse_i - z_i[t_i], then reduced."""
    nll = lse - Z2[xp.arange(Z2.shape[0]), tv]
    if label_smoothing:
        eps = label_smoothing
        nll = (1 - eps) * nll + eps * (lse - Z2.mean(axis=1))
    nll = xp.where(valid, nll, Z2.dtype.type(0))
    n_valid = xp.maximum(valid.sum(), 1).astype(Z2.dtype)  # stays on the device: no sync
    if reduction == "mean":
        loss = nll.sum() / n_valid  # all targets ignored -> 0 (torch gives nan)
    elif reduction == "sum":
        loss = nll.sum()
    else:
        loss = nll.reshape(T.shape)
    return xp.asarray(loss, dtype=Z2.dtype), n_valid


def softmax_to_grad_(d, g, valid, tv, n_valid, reduction, label_smoothing):
    """d = softmax(z) (N, C), in place -> (d - target distribution) · dloss per row."""
    C = d.shape[1]
    rows = xp.arange(d.shape[0])
    if label_smoothing:
        d -= label_smoothing / C
        d[rows, tv] -= 1 - label_smoothing
    else:
        d[rows, tv] -= 1
    if reduction == "none":
        w = g.reshape(-1) * valid
    else:
        w = valid * (g / n_valid if reduction == "mean" else g)
    d *= w.astype(d.dtype, copy=False)[:, None]
    return d


# loss_i = logsumexp(z_i) - z_i[t_i];  mean over rows whose target != ignore_index
#   ->  dz_i = (softmax(z_i) - onehot(t_i)) · dloss_i        (zero for ignored rows)
@dispatch.op("cross_entropy")
def cross_entropy(logits: Tensor, targets, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy. logits (..., C), targets (...) of class ids.

    Classes are on the last axis (so (B, T, C) logits need no transpose); for (N, C) this is
    exactly ``torch.nn.functional.cross_entropy``. reduction: "mean" (over non-ignored
    targets), "sum" or "none". label_smoothing mixes the target with the uniform distribution.
    """
    Z2, T, valid, tv = check_cross_entropy(logits, targets, ignore_index, reduction)
    m = Z2.max(axis=1, keepdims=True)
    e = xp.exp(Z2 - m)                               # softmax(z) = e / s
    s = e.sum(axis=1, keepdims=True)
    lse = (xp.log(s) + m)[:, 0]
    loss, n_valid = nll_loss_from_lse(Z2, lse, T, valid, tv, reduction, label_smoothing)

    def backward(g):
        d = softmax_to_grad_(e / s, g, valid, tv, n_valid, reduction, label_smoothing)
        return (d.reshape(logits.shape),)
    return make_result(loss, (logits,), backward, "cross_entropy")
