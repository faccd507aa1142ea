"""The table of op cases that ``tinylora gradcheck`` and the test suite check.

Each case: an op name, the inputs' shapes and a function of the inputs; everything runs in
float64 with a fixed seed, against central finite differences (``tinylora.gradcheck``).
Cases cover broadcasting (scalars, size-1 axes, prepended axes), negative and repeated
indices, masks, ties in max/min, and every reduction of the losses.

Coverage is derived, not listed: every name in ``tinylora.ops.__all__`` and
``tinylora.functional.__all__`` must have a case, or sit in ``EXEMPT`` with the reason it
has no gradient to check (``uncovered()`` names the ones that have neither, and
tests/test_ops_gradcheck.py fails on them). Names bound to the same function (``cat`` and
``concat``, ``functional.gelu`` and ``ops.gelu``) count as one op.

Adding an op? Add its cases to ``all_cases()``:

    c += [OpCase("rms_norm", ((2, 3, 6), (6,)), lambda x, w: F.rms_norm(x, (6,), w)),
          OpCase("rms_norm(eps)", ((4, 6), (6,)), lambda x, w: F.rms_norm(x, (6,), w, 1e-3))]

``op`` is the public name, optionally with a variant in parentheses ("gelu(tanh)"); one float64
input is drawn per shape (requires_grad=True); ``fn`` returns one Tensor. Optional fields:
``positive`` (inputs in (0.5, 2): logs, roots, denominators), ``draw`` (your own inputs, e.g.
values kept away from a kink such as clamp's bounds, or ties), ``eps`` (the finite-difference
step). The suite also runs each case on float32 inputs and requires float32 outputs and
gradients, so ``fn`` must keep its input's dtype. Ops declared with ``@dispatch.op`` are also
checked with ``tl.kernels_mode("reference")``, so the definition a reader studies is the one
the finite differences prove. ``tinylora gradcheck --op NAME`` runs one op's cases, variants included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import backend, dispatch
from . import functional as F
from . import ops
from .backend import np, xp
from .gradcheck import gradcheck
from .tensor import Tensor


@dataclass
class OpCase:
    op: str                  # the public name, optionally "name(variant)"
    shapes: tuple            # one shape per float input
    fn: Callable
    positive: bool = False   # inputs drawn in (0.5, 2) (log, sqrt, pow, div denominators)
    draw: Callable | None = None   # (rng, shape) -> float64 array, instead of N(0, 1)
    eps: float = 1e-6        # the finite-difference step

    @property
    def name(self) -> str:
        """The public op this case checks: ``op`` without its variant."""
        return self.op.split("(", 1)[0]

    @property
    def label(self) -> str:
        return " ".join("x".join(map(str, s)) if s else "()" for s in self.shapes)


# Public names with no gradient to check; each probe shows it (the result is no Tensor that
# requires grad, for an input that does). tests/test_ops_gradcheck.py holds them to that.
EXEMPT = {
    "argmax": ("returns integer indices: piecewise constant, no gradient",
               lambda x: ops.argmax(x, -1)),
    "unbroadcast": ("a helper on arrays inside backward functions (sums a gradient back to an "
                    "input's shape), not an op on Tensors",
                    lambda x: ops.unbroadcast(x.data, (x.shape[-1],))),
    "causal_bias": ("returns a constant additive mask (an array) that attention adds to its scores",
                    lambda x: F.causal_bias(3, 5, x.dtype)),
    "rope_tables": ("returns the constant cos/sin tables (arrays) of the rotary embedding; "
                    "apply_rotary, which uses them, has the cases",
                    lambda x: F.rope_tables(range(x.shape[0]), 4, dtype=x.dtype)),
    "cached_self_attention": ("inference over a KV cache of arrays (generation): no graph; "
                              "self_attention, the same math, has the cases",
                              lambda x: F.cached_self_attention(
                                  x[None, :, :3], xp.zeros((1, 1, 4, 1), x.dtype),
                                  xp.zeros((1, 1, 4, 1), x.dtype), 0, 1)),
}

# ops declared through ``dispatch`` that are not graph ops, so no gradient check reaches them
# (tests/test_kernels.py still compares each one's kernel with its definition)
NOT_GRAPH_OPS = {
    "adamw": "AdamW's in-place update of parameter arrays (optim.adamw_update): no graph, no gradient",
    "cached_self_attention": "attention over a KV cache of arrays, for generation: no graph, "
                             "no gradient",
}


def public_ops() -> dict:
    """Every name in ``ops.__all__`` and ``functional.__all__`` -> the object it names."""
    out = {}
    for module in (ops, F):
        for name in module.__all__:
            out.setdefault(name, getattr(module, name))
    return out


def uncovered(cases=None) -> list[str]:
    """Public ops with neither a case nor an exemption (names of one function count as one)."""
    public = public_ops()
    cases = all_cases() if cases is None else cases
    done = {id(public[c.name]) for c in cases if c.name in public}
    done |= {id(public[n]) for n in EXEMPT if n in public}
    return sorted(n for n, obj in public.items() if id(obj) not in done)


def unknown_names(cases=None) -> list[str]:
    """Case names that are not public ops (a typo, or an op not exported)."""
    public = public_ops()
    cases = all_cases() if cases is None else cases
    return sorted({c.op for c in cases if c.name not in public})


def dispatched_ops(case: OpCase) -> set[str]:
    """The ``@dispatch.op`` names that one forward of the case calls.

    Each declared op gets a recording stand-in kernel (which runs the reference) for the
    duration of one call; the kernels that were registered are put back after.
    """
    hits: set[str] = set()
    saved = dispatch.registered()

    def spy(name, reference):
        def run(*args, **kwargs):
            hits.add(name)
            return reference(*args, **kwargs)
        return run
    try:
        for name, (reference, _) in saved.items():
            dispatch.register(name, spy(name, reference))
        with dispatch.kernels_mode("fast"), backend.default_dtype("float64"):
            case.fn(*make_inputs(case))
    finally:
        for name, (_, kernel) in saved.items():
            dispatch.register(name, kernel)
    return hits


# ------------------------------------------------------------------------ inputs

def _ids(*values):
    return xp.asarray(np.array(values, dtype=np.int64))


def _mask(shape, seed=3):
    return xp.asarray(np.random.default_rng(seed).random(shape) > 0.4)


def _const(shape, seed=5):
    """A float64 constant (no grad); ops lift it to their input's dtype."""
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _paired(rng, shape):
    """Each last-axis row holds its values twice: every max and min is a two-way tie.

    At a two-way tie the central difference is (ε - 0)/2ε = ½, the share each tied entry gets.
    """
    half = rng.standard_normal(tuple(shape[:-1]) + (shape[-1] // 2,))
    return rng.permuted(np.concatenate([half, half], axis=-1), axis=-1)


def _away_from(*bounds, gap=0.05):
    """N(0, 1) values at least ``gap`` from each bound: clamp's kink stays out of the FD region."""
    def draw(rng, shape):
        x = rng.standard_normal(shape)
        for b in bounds:
            near = np.abs(x - b) < gap
            x[near] = b + np.where(x[near] < b, -2 * gap, 2 * gap)
        return x
    return draw


def _dyadic(rng, shape):
    """Multiples of 1/64 of a few bits: exact in float32, and so is x ± 1/64 (the cast case)."""
    return np.round(rng.standard_normal(shape) * 64) / 64


def _binary(name, fn):
    pairs = [((3, 4), (3, 4)), ((3, 4), ()), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((1,), (2, 3))]
    return [OpCase(name, s, fn, positive=name in ("div", "pow")) for s in pairs]


# ------------------------------------------------------------------------ the cases

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
            c.append(OpCase("min", ((2, 3, 4),), lambda a, d=dims, k=keep: a.min(d, k)))
            c.append(OpCase("var", ((2, 3, 4),), lambda a, d=dims, k=keep: a.var(d, k)))
    for name in ("max", "min"):   # two-way ties share the gradient
        c += [OpCase(f"{name}(ties)", ((3, 4),), lambda a, n=name: getattr(a, n)(-1), draw=_paired),
              OpCase(f"{name}(ties)", ((3, 4),), lambda a, n=name: getattr(a, n)(), draw=_paired),
              OpCase(f"{name}(ties)", ((2, 3, 4),), lambda a, n=name: getattr(a, n)((0, 2), True),
                     draw=_paired)]
    c += [OpCase("reshape", ((2, 3, 4),), lambda a: a.reshape(4, -1) * 2),
          OpCase("flatten", ((2, 3, 4),), lambda a: a.flatten(1) * 2),
          OpCase("flatten", ((2, 3, 4),), lambda a: ops.flatten(a, 0, 1) * 2),
          OpCase("unsqueeze", ((3, 4),), lambda a: a.unsqueeze(1) * xp.arange(1.0, 4.0)[:, None]),
          OpCase("unsqueeze", ((3, 4),), lambda a: a.unsqueeze(-1) * 2),
          OpCase("squeeze", ((3, 1, 4),), lambda a: a.squeeze(1) * 2),
          OpCase("squeeze", ((1, 3, 1),), lambda a: a.squeeze() * 2),
          OpCase("squeeze", ((3, 4),), lambda a: a.squeeze(0) * 2),    # not size 1: unchanged
          OpCase("transpose", ((2, 3, 4),), lambda a: a.transpose(0, 2) * 2),
          OpCase("permute", ((2, 3, 4),), lambda a: a.permute(2, 0, 1) * 2),
          OpCase("expand", ((3, 1),), lambda a: a.expand(2, 3, 4) * 2),
          OpCase("expand", ((1,),), lambda a: a.expand(5) * xp.arange(5.0))]
    c += [OpCase("getitem", ((5, 4),), lambda a: a[1:4, ::2] * 2),
          OpCase("getitem", ((5, 4),), lambda a: a[-1] * 2),
          OpCase("getitem", ((5, 4),), lambda a: a[_ids(0, -1, 2, 2, 0)] * 2),
          OpCase("getitem", ((5, 4),), lambda a: a[_ids(1, 1, -2), _ids(0, 0, 3)] * 2),
          OpCase("getitem", ((5, 4),), lambda a: a[_mask((5, 4))] * 2),
          OpCase("getitem", ((3, 5, 4),), lambda a: a[:, _ids(4, 0, 4)] * 2),
          OpCase("narrow", ((3, 5),), lambda a: ops.narrow(a, 1, 1, 3) * 2),
          OpCase("narrow", ((4, 2, 3),), lambda a: ops.narrow(a, -3, 2, 2) * 2)]
    c += [OpCase("concat", ((2, 3), (4, 3)), lambda a, b: ops.cat([a, b, a], 0) * 2),
          OpCase("concat", ((2, 3), (2, 1)), lambda a, b: ops.cat([a, b], -1) * 2),
          OpCase("stack", ((2, 3), (2, 3)), lambda a, b: ops.stack([a, b, a], 1) * 2),
          OpCase("split", ((7, 3),), lambda a: _join(ops.split(a, 3, 0))),
          OpCase("split", ((2, 6),), lambda a: _join(ops.split(a, [1, 2, 3], 1))),
          OpCase("chunk", ((7, 3),), lambda a: _join(a.chunk(3, 0))),
          OpCase("chunk", ((2, 6),), lambda a: _join(ops.chunk(a, 2, -1)))]
    for name, fn, pos in [("exp", ops.exp, False), ("log", ops.log, True), ("sqrt", ops.sqrt, True),
                          ("tanh", ops.tanh, False), ("sigmoid", ops.sigmoid, False),
                          ("relu", ops.relu, False), ("abs", ops.abs, False),
                          ("gelu(erf)", lambda a: F.gelu(a), False),
                          ("gelu(tanh)", lambda a: F.gelu(a, approximate="tanh"), False)]:
        c += [OpCase(name, ((3, 4),), fn, pos), OpCase(name, ((2, 3, 5),), fn, pos)]
    c += [OpCase("clamp", ((3, 4),), lambda a: a.clamp(-0.5, 0.7), draw=_away_from(-0.5, 0.7)),
          OpCase("clamp(min)", ((2, 3, 5),), lambda a: ops.clamp(a, min=0.2), draw=_away_from(0.2)),
          OpCase("clamp(max)", ((2, 3, 5),), lambda a: ops.clamp(a, max=-0.1), draw=_away_from(-0.1))]
    c += [OpCase("to_dtype", ((3, 4),), lambda a: ops.to_dtype(ops.to_dtype(a, "float32") * 3, a.dtype),
                 draw=_dyadic, eps=2.0 ** -6),
          OpCase("to_dtype(float)", ((2, 3),), lambda a: (a.float() * a.float()).to(a.dtype),
                 draw=_dyadic, eps=2.0 ** -6),
          OpCase("to_dtype(double)", ((2, 3),), lambda a: (a.double() * 3).to(a.dtype))]
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
    for red in ("mean", "sum", "none"):
        c.append(OpCase(f"mse_loss({red})", ((3, 4), (3, 4)), lambda a, b, r=red: F.mse_loss(a, b, r)))
    c += [OpCase("mse_loss(const)", ((2, 3, 4),), lambda a: F.mse_loss(a, _const((2, 3, 4)))),
          OpCase("mse_loss(bcast)", ((2, 3, 4), (4,)), lambda a, b: F.mse_loss(a, b, "sum"))]
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
    sdpa = "scaled_dot_product_attention"
    c += [OpCase(sdpa, ((2, 2, 5, 4), (2, 2, 5, 4), (2, 2, 5, 3)),
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
          OpCase(sdpa, ((2, 1, 3, 4), (2, 1, 5, 4), (2, 1, 5, 4)),
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_mask((2, 1, 1, 5), 7))),
          OpCase(sdpa, ((2, 3, 4), (2, 6, 4), (2, 6, 2)),
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
          OpCase(sdpa, ((2, 1, 3, 4), (1, 2, 5, 4), (2, 2, 5, 4)),
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3)),
          OpCase("self_attention", ((2, 5, 12),), lambda x: F.self_attention(x, 2)),
          OpCase("self_attention", ((3, 4, 6),),
                 lambda x: F.self_attention(x, 1, attn_mask=_mask((3, 1, 1, 4), 5))),
          OpCase("self_attention(dropout)", ((2, 5, 12),), _seeded_attention_dropout),
          OpCase("self_attention", ((1, 130, 6),), lambda x: F.self_attention(x, 1)),  # causal tiles
          OpCase(sdpa, ((1, 1, 130, 2), (1, 1, 140, 2), (1, 1, 140, 2)),
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))]
    c += [OpCase("linear_cat", ((2, 3, 5), (4, 5), (2, 5), (4,), (2,)),   # functional/fused.py
                 lambda x, a, b, ba, bb: F.linear_cat(x, [a, b], [ba, bb])),
          # no key bias: it adds one constant to a query's scores, so its gradient is zero
          OpCase("linear_self_attention", ((2, 4, 6),) + ((6, 6),) * 3 + ((6,),) * 2,
                 lambda x, a, b, v, ba, bv: F.linear_self_attention(
                     x, [a, b, v], [ba, None, bv], 2, attn_mask=_mask((2, 1, 1, 4), 5))),
          OpCase("linear_gelu", ((2, 3, 5), (4, 5), (4,)), lambda x, w, b: F.linear_gelu(x, w, b)),
          OpCase("linear_add_layer_norm", ((2, 3, 5), (4, 5), (4,), (2, 3, 4), (4,), (4,)),
                 lambda h, w, b, r, g, be: F.linear_add_layer_norm(h, w, b, r, g, be))]
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
        OpCase("silu(swiglu)", ((2, 3, 4), (6, 4), (6, 4), (4, 6)),      # down(silu(gate x) ⊙ up x)
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


# ------------------------------------------------------------------------ running a case

def make_inputs(case: OpCase, seed: int = 0) -> list[Tensor]:
    rng = np.random.default_rng(seed)
    out = []
    for s in case.shapes:
        if case.draw is not None:
            a = np.asarray(case.draw(rng, s), dtype=np.float64)
        elif case.positive:
            a = rng.uniform(0.5, 2.0, s)
        else:
            a = rng.standard_normal(s)
        out.append(Tensor(xp.asarray(a.astype(np.float64)), requires_grad=True))
    return out


def run_case(case: OpCase, seed: int = 0, kernels: str | None = None):
    """The gradcheck report of one case (float64, not raising); ``kernels="reference"`` runs
    the reference definitions of dispatched ops instead of their fast kernels."""
    with backend.default_dtype("float64"), dispatch.kernels_mode(kernels or dispatch.get_kernels()):
        inputs = make_inputs(case, seed)
        return gradcheck(case.fn, inputs, eps=case.eps, raise_on_failure=False)
