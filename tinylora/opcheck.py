"""The table of op cases that ``tinylora gradcheck`` and the test suite check.

Each case: an op name, a label for its shapes, the inputs' shapes and a function of the
inputs. Cases cover broadcasting (scalars, size-1 axes, prepended axes), negative and
repeated indices, and masks. Everything runs in float64 with a fixed seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import backend
from . import functional as F
from . import ops
from .backend import np, xp
from .gradcheck import gradcheck
from .tensor import Tensor


@dataclass
class OpCase:
    op: str
    shapes: tuple            # one shape per float input
    fn: Callable
    positive: bool = False   # inputs drawn in (0.5, 2) (log, sqrt, pow, div denominators)

    @property
    def label(self) -> str:
        return " ".join("x".join(map(str, s)) if s else "()" for s in self.shapes)


def _ids(*values):
    return xp.asarray(np.array(values, dtype=np.int64))


def _mask(shape, seed=3):
    return xp.asarray(np.random.default_rng(seed).random(shape) > 0.4)


def _binary(name, fn):
    pairs = [((3, 4), (3, 4)), ((3, 4), ()), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((1,), (2, 3))]
    return [OpCase(name, s, fn, positive=name in ("div", "pow")) for s in pairs]


def all_cases() -> list[OpCase]:
    c: list[OpCase] = []
    c += _binary("add", lambda a, b: a + b)
    c += _binary("sub", lambda a, b: a - b)
    c += _binary("mul", lambda a, b: a * b)
    c += _binary("div", lambda a, b: a / b)
    c += _binary("pow", lambda a, b: a ** b)
    c += [OpCase("pow", ((3, 4),), lambda a: a ** 3), OpCase("pow", ((5,),), lambda a: a ** -1.5, True)]
    c += [OpCase("neg", ((3, 4),), lambda a: -a)]
    for sa, sb in [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)),
                   ((2, 1, 3, 4), (5, 4, 2)), ((4,), (4, 3)), ((2, 3, 4), (4,)), ((4,), (4,))]:
        c.append(OpCase("matmul", (sa, sb), lambda a, b: a @ b))
    c += [OpCase("linear", ((2, 3, 4), (5, 4), (5,)), lambda x, w, b: F.linear(x, w, b)),
          OpCase("linear", ((6, 4), (3, 4)), lambda x, w: F.linear(x, w))]
    for dims in [None, 0, -1, (0, 2)]:
        for keep in (False, True):
            c.append(OpCase("sum", ((2, 3, 4),), lambda a, d=dims, k=keep: a.sum(d, k)))
            c.append(OpCase("mean", ((2, 3, 4),), lambda a, d=dims, k=keep: a.mean(d, k)))
            c.append(OpCase("max", ((2, 3, 4),), lambda a, d=dims, k=keep: a.max(d, k)))
            c.append(OpCase("var", ((2, 3, 4),), lambda a, d=dims, k=keep: a.var(d, k)))
    c += [OpCase("reshape", ((2, 3, 4),), lambda a: a.reshape(4, -1) * 2),
          OpCase("transpose", ((2, 3, 4),), lambda a: a.transpose(0, 2) * 2),
          OpCase("permute", ((2, 3, 4),), lambda a: a.permute(2, 0, 1) * 2),
          OpCase("expand", ((3, 1),), lambda a: a.expand(2, 3, 4) * 2),
          OpCase("expand", ((1,),), lambda a: a.expand(5) * xp.arange(5.0))]
    c += [OpCase("getitem", ((5, 4),), lambda a: a[1:4, ::2] * 2),
          OpCase("getitem", ((5, 4),), lambda a: a[-1] * 2),
          OpCase("getitem", ((5, 4),), lambda a: a[_ids(0, -1, 2, 2, 0)] * 2),
          OpCase("getitem", ((5, 4),), lambda a: a[_ids(1, 1, -2), _ids(0, 0, 3)] * 2),
          OpCase("getitem", ((5, 4),), lambda a: a[_mask((5, 4))] * 2),
          OpCase("getitem", ((3, 5, 4),), lambda a: a[:, _ids(4, 0, 4)] * 2)]
    c += [OpCase("concat", ((2, 3), (4, 3)), lambda a, b: ops.cat([a, b, a], 0) * 2),
          OpCase("concat", ((2, 3), (2, 1)), lambda a, b: ops.cat([a, b], -1) * 2),
          OpCase("stack", ((2, 3), (2, 3)), lambda a, b: ops.stack([a, b, a], 1) * 2),
          OpCase("split", ((7, 3),), lambda a: _join(ops.split(a, 3, 0))),
          OpCase("split", ((2, 6),), lambda a: _join(ops.split(a, [1, 2, 3], 1)))]
    for name, fn, pos in [("exp", ops.exp, False), ("log", ops.log, True), ("sqrt", ops.sqrt, True),
                          ("tanh", ops.tanh, False), ("sigmoid", ops.sigmoid, False),
                          ("relu", ops.relu, False), ("abs", ops.abs, False),
                          ("gelu(erf)", lambda a: F.gelu(a), False),
                          ("gelu(tanh)", lambda a: F.gelu(a, approximate="tanh"), False)]:
        c += [OpCase(name, ((3, 4),), fn, pos), OpCase(name, ((2, 3, 5),), fn, pos)]
    c += [OpCase("where", ((3, 4), (3, 4)), lambda a, b: ops.where(_mask((3, 4)), a, b)),
          OpCase("where", ((3, 4), (4,)), lambda a, b: ops.where(_mask((3, 4)), a, b)),
          OpCase("masked_fill", ((3, 4),), lambda a: ops.masked_fill(a, _mask((3, 4)), -2.0) * a),
          OpCase("masked_fill", ((2, 3, 4),), lambda a: ops.masked_fill(a, _mask((3, 1)), 0.0) * a)]
    for dim in (-1, 0):
        c += [OpCase("softmax", ((3, 5),), lambda a, d=dim: F.softmax(a, d)),
              OpCase("log_softmax", ((3, 5),), lambda a, d=dim: F.log_softmax(a, d))]
    c += [OpCase("softmax", ((2, 3, 4),), lambda a: F.softmax(a, 1))]
    c += [OpCase("cross_entropy", ((6, 5),), lambda z: F.cross_entropy(z, _ids(0, 4, 2, -100, 1, 1))),
          OpCase("cross_entropy", ((2, 3, 5),), lambda z: F.cross_entropy(z, _ids(0, 4, 2, 3, 1, 1).reshape(2, 3))),
          OpCase("cross_entropy", ((4, 5),), lambda z: F.cross_entropy(z, _ids(0, 4, 2, 3), reduction="sum")),
          OpCase("cross_entropy", ((4, 5),), lambda z: F.cross_entropy(z, _ids(0, 4, 2, 3), reduction="none")),
          OpCase("cross_entropy", ((4, 5),), lambda z: F.cross_entropy(z, _ids(0, 4, 2, 3), label_smoothing=0.1))]
    c += [OpCase("lora_linear", ((2, 3, 5), (4, 5), (4,), (2, 5), (4, 2)),
                 lambda x, w, b, a, bb: F.lora_linear(x, w, b, a, bb, 0.7)),
          OpCase("lora_linear", ((6, 5), (4, 5), (2, 5), (4, 2), (6, 5)),
                 lambda x, w, a, bb, xd: F.lora_linear(x, w, None, a, bb, 2.0, xd))]
    c += [OpCase("layer_norm", ((4, 6), (6,), (6,)), lambda x, w, b: F.layer_norm(x, 6, w, b)),
          OpCase("layer_norm", ((2, 3, 6), (6,), (6,)), lambda x, w, b: F.layer_norm(x, (6,), w, b, 1e-12)),
          OpCase("layer_norm", ((2, 3, 4),), lambda x: F.layer_norm(x, (3, 4)))]
    c += [OpCase("embedding", ((6, 3),), lambda w: F.embedding(_ids(1, 5, 1, 0, 5, 5).reshape(2, 3), w))]
    c += [OpCase("dropout(eval)", ((3, 4),), lambda a: F.dropout(a, 0.5, training=False) * 2),
          OpCase("dropout(train)", ((3, 4),), _seeded_dropout)]
    c += [OpCase("attention", ((2, 2, 5, 4), (2, 2, 5, 4), (2, 2, 5, 3)),
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
          OpCase("attention", ((2, 1, 3, 4), (2, 1, 5, 4), (2, 1, 5, 4)),
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_mask((2, 1, 1, 5), 7))),
          OpCase("attention", ((2, 3, 4), (2, 6, 4), (2, 6, 2)),
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
          OpCase("attention", ((2, 1, 3, 4), (1, 2, 5, 4), (2, 2, 5, 4)),
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3)),
          OpCase("self_attention", ((2, 5, 12),), lambda x: F.self_attention(x, 2)),
          OpCase("self_attention", ((3, 4, 6),),
                 lambda x: F.self_attention(x, 1, attn_mask=_mask((3, 1, 1, 4), 5))),
          OpCase("self_attention", ((2, 5, 12),), _seeded_attention_dropout),
          OpCase("self_attention", ((1, 130, 6),), lambda x: F.self_attention(x, 1)),  # causal tiles
          OpCase("attention", ((1, 1, 130, 2), (1, 1, 140, 2), (1, 1, 140, 2)),
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))]
    c += _llama_cases()
    return c


def _rope(positions, head_dim, scaling=None):
    return F.rope_tables(positions, head_dim, 500.0, scaling, dtype="float64")


_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _llama_cases() -> list[OpCase]:
    """The Llama-family ops: SiLU, SwiGLU, RMSNorm, RoPE, grouped-query attention."""
    cos, sin = _rope(range(5), 6)
    cos3, sin3 = _rope(range(3, 7), 8, _LLAMA3)
    return [
        OpCase("silu", ((3, 4),), ops.silu), OpCase("silu", ((2, 3, 5),), ops.silu),
        OpCase("swiglu", ((2, 3, 4), (6, 4), (6, 4), (4, 6)),      # down(silu(gate x) ⊙ up x)
               lambda x, wg, wu, wd: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)),
        OpCase("rms_norm", ((4, 6), (6,)), lambda x, w: F.rms_norm(x, 6, w)),
        OpCase("rms_norm", ((2, 3, 5), (5,)), lambda x, w: F.rms_norm(x, (5,), w, 1e-3)),
        OpCase("rms_norm", ((2, 3, 4),), lambda x: F.rms_norm(x, 4)),
        OpCase("apply_rotary", ((2, 3, 5, 6),), lambda x: F.apply_rotary(x, cos, sin)),
        OpCase("apply_rotary", ((1, 2, 4, 8),), lambda x: F.apply_rotary(x, cos3, sin3)),
        OpCase("repeat_kv", ((2, 2, 3, 4),), lambda x: F.repeat_kv(x, 3)),
        OpCase("grouped_query_attention", ((2, 4, 5, 6), (2, 2, 5, 6), (2, 2, 5, 6)),
               lambda q, k, v: F.grouped_query_attention(q, k, v)),
        OpCase("grouped_query_attention", ((1, 6, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4)),
               lambda q, k, v: F.grouped_query_attention(
                   F.apply_rotary(q, *_rope(range(2, 5), 4)), F.apply_rotary(k, *_rope(range(5), 4)), v)),
    ]


def _seeded_dropout(a):
    backend.manual_seed(11)  # the same mask on every call, so finite differences apply
    return F.dropout(a, 0.3, training=True)


def _seeded_attention_dropout(x):
    backend.manual_seed(13)
    return F.self_attention(x, 2, dropout_p=0.25)


def _join(parts):
    """Use every piece of a split differently, so each piece's gradient is distinct."""
    out = None
    for i, p in enumerate(parts):
        term = (p * (i + 1)).sum()
        out = term if out is None else out + term
    return out


def make_inputs(case: OpCase, seed: int = 0) -> list[Tensor]:
    rng = np.random.default_rng(seed)
    out = []
    for s in case.shapes:
        a = rng.uniform(0.5, 2.0, s) if case.positive else rng.standard_normal(s)
        out.append(Tensor(xp.asarray(a.astype(np.float64)), requires_grad=True))
    return out


def run_case(case: OpCase, seed: int = 0):
    """The gradcheck report of one case (float64, not raising)."""
    with backend.default_dtype("float64"):
        inputs = make_inputs(case, seed)
        return gradcheck(case.fn, inputs, raise_on_failure=False)
