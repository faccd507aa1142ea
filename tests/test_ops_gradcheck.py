"""Every op of the engine against finite differences in float64, and in float32 for dtypes."""
import pytest

import tinylora as tl
from tinylora import backend, opcheck
from tinylora.backend import np

CASES = opcheck.all_cases()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}[{c.label}]-{i}" for i, c in enumerate(CASES)])
def test_op_gradcheck_float64(case):
    report = opcheck.run_case(case)
    assert report.ok, str(report)
    assert report.max_rel_err <= 1e-6, str(report)


def test_every_listed_op_has_a_case():
    ops = {c.op for c in CASES}
    required = {"add", "sub", "mul", "div", "neg", "pow", "matmul", "linear", "sum", "mean", "max",
                "var", "reshape", "transpose", "permute", "expand", "getitem", "concat", "stack",
                "split", "exp", "log", "sqrt", "tanh", "sigmoid", "relu", "gelu(erf)", "gelu(tanh)",
                "where", "masked_fill", "softmax", "log_softmax", "cross_entropy", "layer_norm",
                "embedding", "dropout(eval)", "dropout(train)", "attention"}
    assert required <= ops, required - ops


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}[{c.label}]-{i}" for i, c in enumerate(CASES)])
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
