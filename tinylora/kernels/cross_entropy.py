"""Fast cross_entropy for ``functional.cross_entropy``: no full-size softmax kept between the
passes. With a large vocabulary the logits dominate memory (a Llama's 4 × 256 tokens × 49,152
classes are 200 MB of float32): the reference keeps e = exp(z - m) from the forward for the
backward and allocates z - m on the way. Here the forward makes its passes block by block of
rows, in cache, keeping only each row's max m and sum s; the backward recomputes
exp(z - m) / s block by block straight into the gradient it returns. The same operations on
the same values: the results equal the reference's bit for bit.
"""
from __future__ import annotations

from .. import dispatch
from ..backend import xp
from ..functional.softmax import check_cross_entropy, nll_loss_from_lse, softmax_to_grad_
from ..tensor import Tensor, make_result
from .blocking import CACHE_VALUES, blocks, parallel

_BUDGET = 4 * CACHE_VALUES   # values per block of rows (a row of a large vocabulary is ~200 kB)


# loss_i = logsumexp(z_i) - z_i[t_i]  ->  dz_i = (softmax(z_i) - onehot(t_i)) · dloss_i
def cross_entropy(logits: Tensor, targets, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    Z2, T, valid, tv = check_cross_entropy(logits, targets, ignore_index, reduction)
    N, C = Z2.shape
    m = xp.empty((N, 1), dtype=Z2.dtype)
    s = xp.empty((N, 1), dtype=Z2.dtype)

    def stats(part):
        for r in part:
            z = Z2[r]
            m[r] = z.max(axis=1, keepdims=True)
            s[r] = xp.exp(z - m[r]).sum(axis=1, keepdims=True)
    parallel(stats, blocks(N, C, _BUDGET))
    lse = (xp.log(s) + m)[:, 0]
    loss, n_valid = nll_loss_from_lse(Z2, lse, T, valid, tv, reduction, label_smoothing)

    def backward(g):
        d = xp.empty_like(Z2)

        def probs(part):                              # softmax(z) = exp(z - m) / s, recomputed
            for r in part:
                xp.subtract(Z2[r], m[r], out=d[r])
                xp.exp(d[r], out=d[r])
                d[r] /= s[r]
        parallel(probs, blocks(N, C, _BUDGET))
        d = softmax_to_grad_(d, g, valid, tv, n_valid, reduction, label_smoothing)
        return (d.reshape(logits.shape),)
    return make_result(loss, (logits,), backward, "cross_entropy", (logits,))


dispatch.register("cross_entropy", cross_entropy)
