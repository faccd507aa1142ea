"""Fast attention for ``functional.scaled_dot_product_attention`` and ``self_attention``.

Same math as the reference (see functional/attention.py), made fast and small three ways:
- the batch is walked in chunks whose (heads, T, S) score block fits in cache, so the
  softmax's passes over the scores run from cache rather than memory (``blocking``);
- the (B, heads, T, S) probabilities are not kept for backward (T/hs times the size of q:
  4× at T = 256, hs = 64): the forward keeps each row's max and 1/sum, and the backward
  recomputes each chunk's probabilities with the same operations, bit for bit the forward's
  (unless they all fit in one chunk, 1 MiB: then they are kept, and read);
- ``self_attention`` folds the head split and merge into the op: q, k, v are strided views of
  qkv (BLAS takes them as they are), the output is written straight in (B, T, C) order, and
  the backward writes dq, dk, dv straight into one dqkv, so no split, transpose or
  zero-filled gradient arrays appear in the graph.
Dropout masks are drawn chunk by chunk, in order, from the same stream, and kept for the
backward as bool arrays (redrawing them would need the stream's state saved per chunk).
"""
from __future__ import annotations

import math

from .. import backend, dispatch
from ..backend import xp
from ..functional.attention import (causal_bias, check_attention, check_self_attention,
                                    mask_array, masked_value)
from ..ops import unbroadcast
from ..tensor import Tensor, make_result
from .blocking import CACHE_VALUES, blocks, parallel

SCORE_BUDGET = 4 * CACHE_VALUES  # score entries per chunk (1 MiB of float32): stays in L2


def _mT(a):
    return xp.swapaxes(a, -1, -2)


def _rows(a, r, batch):
    """Rows r of the leading axis of a mask/array that may broadcast over it (size 1)."""
    if a is None or a.ndim < 4 or a.shape[0] != batch:
        return a
    return a[r]


def _keep(mask, r, B, T, S, is_causal):
    """The boolean may-attend mask of chunk r (None when only the causal bias applies)."""
    m = _rows(mask, r, B)
    if m is None or m.dtype != bool:
        return None
    return m & xp.tri(T, S, S - T, dtype=bool) if is_causal else m


def _chunks(batch: int, per_row: int):
    return blocks(batch, per_row, SCORE_BUDGET)


# Per batch chunk: S = (c·Q) Kᵀ + M,  P = softmax(S),  O = (P ⊙ m) V;  backward as the reference's.
# P (batch, heads, T, S) is not kept: the forward keeps each row's max and 1/sum, and the
# backward recomputes P chunk by chunk with the same operations on the same values (bit for
# bit the forward's P), in a cache-sized scratch block; likewise c·Q.
def _scores(qs, K, r, mask, bias, is_causal, out, B, T, S):
    """The masked scores S of batch chunk r (qs: its c·Q), written into ``out``; and the
    chunk's boolean may-attend mask (None when the mask is additive or absent)."""
    p = xp.matmul(qs, _mT(K[r]), out=out)
    keep = None
    if bias is not None:
        p += bias
    if mask is not None and mask.dtype == bool:  # masked scores become one constant, so a
        keep = _keep(mask, r, B, T, S, is_causal)    # fully masked row is uniform
        xp.copyto(p, p.dtype.type(masked_value(p.dtype)), where=~keep)
    elif mask is not None:
        p += _rows(mask, r, B).astype(p.dtype, copy=False)
    return p, keep


def _forward(Q, K, V, O, mask, dropout_p, is_causal, c):
    """Fill O (batch, heads, T, dv) in place; return what the backward needs."""
    B, T, S = Q.shape[0], Q.shape[-2], K.shape[-2]
    boolean = mask is not None and mask.dtype == bool
    bias = causal_bias(T, S, Q.dtype) if is_causal and not boolean else None
    stats = xp.empty((2,) + Q.shape[:-1] + (1,), dtype=Q.dtype)   # per row: max, 1/sum
    # dropout keeps a bool mask (a quarter of a float one) and multiplies by 1/(1-p) apart:
    # (p·scale)·keep is exactly p·(keep·scale), the reference's value
    drop = xp.empty(Q.shape[:-1] + (S,), dtype=bool) if dropout_p > 0 else None
    scale = Q.dtype.type(1.0 / (1.0 - dropout_p)) if dropout_p > 0 else None
    chunks = list(_chunks(B, math.prod(Q.shape[1:-1]) * S))
    if drop is not None:   # drawn first, in chunk order: the same stream values as one by one
        for r in chunks:
            drop[r] = backend.dropout_keep(drop[r].shape, dropout_p)
    # probabilities that fit in one chunk are kept: they are no memory worth a second QKᵀ
    P = xp.empty(Q.shape[:-1] + (S,), dtype=Q.dtype) if len(chunks) == 1 else None

    def run(part):         # one scratch block per thread for its chunks' scores: in cache
        buf = None if P is not None else xp.empty(
            (part[0].stop - part[0].start,) + Q.shape[1:-1] + (S,), dtype=Q.dtype)
        for r in part:
            qs = Q[r] * c                              # c·Q per chunk: cheaper than S, not kept
            out = buf[:r.stop - r.start] if P is None else P[r]
            p, _ = _scores(qs, K, r, mask, bias, is_causal, out, B, T, S)
            mx = stats[0, r]
            p.max(axis=-1, keepdims=True, out=mx)
            p -= mx
            xp.exp(p, out=p)
            inv = stats[1, r]
            inv[...] = 1 / p.sum(axis=-1, keepdims=True)
            p *= inv
            if drop is not None:
                xp.matmul(p * scale * drop[r], V[r], out=O[r])
            else:
                xp.matmul(p, V[r], out=O[r])
    parallel(run, chunks, gemms=True)
    return stats, bias, drop, scale, P


def _backward(G, Q, K, V, O, saved, c, dQ, dK, dV, mask=None, is_causal=False):
    """Write dQ, dK, dV (any of them may be None) for output gradient G (B, nh, T, dv)."""
    B, T, S = Q.shape[0], Q.shape[-2], K.shape[-2]
    row, bias, drop, scale, P = saved

    def run(part):         # one scratch block per thread for its chunks' scores: in cache
        buf = None if P is not None else xp.empty(
            (part[0].stop - part[0].start,) + Q.shape[1:-1] + (S,), dtype=Q.dtype)
        for r in part:
            qs = Q[r] * c
            if P is not None:                          # kept (one chunk): read, not recomputed
                p = P[r]
                keep = _keep(mask, r, B, T, S, is_causal) if mask is not None else None
            else:
                p, keep = _scores(qs, K, r, mask, bias, is_causal, buf[:r.stop - r.start],
                                  B, T, S)
                p -= row[0, r]                         # P = exp(S - max) · (1/sum), as forward
                xp.exp(p, out=p)
                p *= row[1, r]
            g = G[r]
            pd = p if drop is None else p * scale * drop[r]
            if dV is not None:
                xp.matmul(_mT(pd), g, out=dV[r])
            if dQ is None and dK is None:
                continue
            ds = g @ _mT(V[r])                         # dPd
            if drop is not None:
                ds *= scale
                ds *= drop[r]
            ds -= (g * O[r]).sum(axis=-1, keepdims=True)   # - D
            ds *= p                                    # dS / c is folded into dQ and c·Q
            if keep is not None:   # a masked score is a constant: no gradient (masked rows)
                xp.copyto(ds, ds.dtype.type(0), where=~keep)
            if dQ is not None:
                xp.matmul(ds, K[r], out=dQ[r])
                dQ[r] *= c
            if dK is not None:
                xp.matmul(_mT(ds), qs, out=dK[r])
    parallel(run, list(_chunks(B, math.prod(Q.shape[1:-1]) * S)), gemms=True)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None) -> Tensor:
    Qa, Ka, Va = q.data, k.data, v.data
    check_attention(Qa, Ka, Va)
    c = Qa.dtype.type(scale if scale is not None else 1.0 / math.sqrt(Qa.shape[-1]))
    lead = xp.broadcast_shapes(Qa.shape[:-2], Ka.shape[:-2], Va.shape[:-2])
    T, S = Qa.shape[-2], Ka.shape[-2]
    mask = mask_array(attn_mask)
    # one batch axis and a unit head axis: (N, 1, T, d); an input broadcast over batch axes is
    # materialised (rare), and its gradient summed back by unbroadcast below
    Q4, K4, V4 = (xp.broadcast_to(a, lead + a.shape[-2:]).reshape((-1, 1) + a.shape[-2:])
                  for a in (Qa, Ka, Va))
    M4 = None
    if mask is not None:
        M4 = xp.broadcast_to(mask, lead + (T, S)).reshape((-1, 1, T, S))
    N = Q4.shape[0]
    O4 = xp.empty((N, 1, T, Va.shape[-1]), dtype=Qa.dtype)
    saved = _forward(Q4, K4, V4, O4, M4, dropout_p, is_causal, c)
    out_shape = lead + (T, Va.shape[-1])

    def backward(g):
        G4 = xp.ascontiguousarray(g).reshape(O4.shape)
        dQ = xp.empty(Q4.shape, Qa.dtype) if q.requires_grad else None
        dK = xp.empty(K4.shape, Qa.dtype) if k.requires_grad else None
        dV = xp.empty(V4.shape, Qa.dtype) if v.requires_grad else None
        _backward(G4, Q4, K4, V4, O4, saved, c, dQ, dK, dV, M4, is_causal)
        return (None if dQ is None else unbroadcast(dQ.reshape(lead + Qa.shape[-2:]), Qa.shape),
                None if dK is None else unbroadcast(dK.reshape(lead + Ka.shape[-2:]), Ka.shape),
                None if dV is None else unbroadcast(dV.reshape(lead + Va.shape[-2:]), Va.shape))
    return make_result(O4.reshape(out_shape), (q, k, v), backward, "attention", (q, k, v))


def self_attention(qkv: Tensor, n_head: int, attn_mask=None, dropout_p: float = 0.0,
                   is_causal: bool = True) -> Tensor:
    X = qkv.data
    check_self_attention(X, n_head)
    B, T, C3 = X.shape
    C, hs = C3 // 3, C3 // 3 // n_head
    X5 = X.reshape(B, T, 3, n_head, hs)
    Q, K, V = (X5[:, :, i].transpose(0, 2, 1, 3) for i in range(3))   # (B, nh, T, hs) views
    c = X.dtype.type(1.0 / math.sqrt(hs))
    Y = xp.empty((B, T, n_head, hs), dtype=X.dtype)
    O = Y.transpose(0, 2, 1, 3)                       # write heads straight into (B, T, C) order
    mask = mask_array(attn_mask)
    saved = _forward(Q, K, V, O, mask, dropout_p, is_causal, c)

    def backward(g):
        G = g.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
        dX = xp.empty((B, T, 3, n_head, hs), dtype=X.dtype)
        dQ, dK, dV = (dX[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        _backward(G, Q, K, V, O, saved, c, dQ, dK, dV, mask, is_causal)
        return (dX.reshape(B, T, C3),)
    return make_result(Y.reshape(B, T, C), (qkv,), backward, "self_attention")


dispatch.register("scaled_dot_product_attention", scaled_dot_product_attention)
dispatch.register("self_attention", self_attention)
