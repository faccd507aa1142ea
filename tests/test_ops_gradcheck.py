"""Every op of the engine against finite differences in float64, and in float32 for dtypes.

Coverage is derived from ``tinylora.ops.__all__`` and ``tinylora.functional.__all__``: a public
op without a case (and without an exemption that proves it has no gradient) fails here.
"""
import pytest

import tinylora as tl
from tinylora import backend, dispatch, opcheck
from tinylora.backend import np
from tinylora.tensor import Tensor

CASES = opcheck.all_cases()
IDS = [f"{c.op}[{c.label}]-{i}" for i, c in enumerate(CASES)]
# the cases that reach an op declared with @dispatch.op: checked again on its reference
REFERENCE = [(c, i) for c, i in zip(CASES, IDS) if opcheck.dispatched_ops(c)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_op_gradcheck_float64(case):
    report = opcheck.run_case(case)
    assert report.ok, str(report)
    assert report.max_rel_err <= 1e-6, str(report)


@pytest.mark.parametrize("case", [c for c, _ in REFERENCE], ids=[i for _, i in REFERENCE])
def test_op_gradcheck_float64_reference_definition(case):
    """The definition a reader studies (tl.kernels_mode("reference")) passes the same check."""
    report = opcheck.run_case(case, kernels="reference")
    assert report.ok, str(report)
    assert report.max_rel_err <= 1e-6, str(report)


def test_every_public_op_has_a_case():
    missing = opcheck.uncovered(CASES)
    assert not missing, (f"public ops without a gradient-check case: {missing}; add cases to "
                         "tinylora/opcheck.py all_cases() (or, for an op with no gradient, to EXEMPT)")
    unknown = opcheck.unknown_names(CASES)
    assert not unknown, f"cases name ops that are not in ops.__all__ or functional.__all__: {unknown}"


def test_a_new_op_without_a_case_is_named(monkeypatch):
    """The coverage check is not vacuous: a public op with no case shows up by name."""
    monkeypatch.setattr(tl.functional, "__all__", tl.functional.__all__ + ["softplus_new"])
    monkeypatch.setattr(tl.functional, "softplus_new", lambda x: x, raising=False)
    assert opcheck.uncovered(CASES) == ["softplus_new"]
    assert opcheck.uncovered([c for c in CASES if c.name != "mse_loss"]) == ["mse_loss", "softplus_new"]


@pytest.mark.parametrize("name", sorted(opcheck.EXEMPT))
def test_exemptions_name_real_ops_without_a_gradient(name):
    reason, probe = opcheck.EXEMPT[name]
    public = opcheck.public_ops()
    assert name in public, f"EXEMPT names {name!r}, which is not in ops.__all__ or functional.__all__"
    assert reason and not any(c.name == name for c in CASES), f"{name} is exempt and has cases"
    with backend.default_dtype("float64"):
        x = tl.randn(4, 5, requires_grad=True)
        out = probe(x)
    assert not (isinstance(out, Tensor) and out.requires_grad), \
        f"{name} returned a tensor that requires grad: it is differentiable, give it a case"


def test_every_dispatched_op_is_reached_by_a_case():
    reached = set().union(*(opcheck.dispatched_ops(c) for c in CASES))
    missing = sorted(set(dispatch.registered()) - reached - set(opcheck.NOT_GRAPH_OPS))
    assert not missing, f"ops declared with @dispatch.op that no gradient-check case calls: {missing}"


def test_reference_check_runs_the_reference_not_the_kernel(monkeypatch):
    """A case reaching a dispatched op is found, and kernels="reference" bypasses a wrong kernel."""
    monkeypatch.setattr(dispatch, "_reference", dict(dispatch._reference))
    monkeypatch.setattr(dispatch, "_fast", dict(dispatch._fast))

    @dispatch.op("opcheck_square")
    def square(x):
        return x * x

    def wrong_square(x):        # right values, wrong gradient (d(x²)/dx written as x)
        return (x * x.detach()) * 1.0
    dispatch.register("opcheck_square", wrong_square)
    case = opcheck.OpCase("opcheck_square", ((3, 4),), lambda a: square(a) * 2)
    assert opcheck.dispatched_ops(case) == {"opcheck_square"}
    assert dispatch.kernel_of("opcheck_square") is wrong_square      # put back after the probe
    assert not opcheck.run_case(case, kernels="fast").ok
    assert opcheck.run_case(case, kernels="reference").ok


def test_clamp_at_the_boundary_passes_the_gradient():
    """At x == lo or x == hi (no derivative there) the gradient passes, as in PyTorch."""
    x = tl.tensor([-1.0, -0.5, 0.0, 0.7, 1.0], requires_grad=True)
    x.clamp(-0.5, 0.7).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_op_float32_stays_float32(case):
    """float32 inputs give float32 outputs and gradients: no silent upcast to float64."""
    inputs = [tl.Tensor(x.data.astype(np.float32), requires_grad=True)
              for x in opcheck.make_inputs(case)]
    out = case.fn(*inputs)
    assert out.dtype == np.float32, f"{case.op} returned {out.dtype}"
    out.backward(tl.Tensor(backend.xp.ones(out.shape, dtype=np.float32)))
    for x in inputs:
        assert x.grad is not None and x.grad.dtype == np.float32, case.op
        assert x.grad.shape == x.shape
