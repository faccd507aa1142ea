"""The graph: accumulation, freeing, no_grad, hooks, versions, errors, and gradcheck itself."""
import math

import pytest

import tinylora as tl
from tinylora import backend
from tinylora import functional as F
from tinylora.backend import np
from tinylora.tensor import make_result


def t64(*shape, seed=0):
    rng = np.random.default_rng(seed)
    return tl.tensor(rng.standard_normal(shape), requires_grad=True)


def test_value_used_twice_gets_sum_of_gradients():
    x = tl.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x * x + x * 3.0          # x feeds three uses
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * np.array([1, 2, 3]) + 3)


def test_shared_gradient_arrays_are_not_aliased():
    # add() hands the same gradient array to both inputs; each leaf must own its .grad
    a = tl.tensor([1.0, 2.0], requires_grad=True)
    b = tl.tensor([3.0, 4.0], requires_grad=True)
    (a + b).sum().backward()
    a.grad.data[0] = 100.0
    assert b.grad.numpy().tolist() == [1.0, 1.0]
    # a reshape view of the incoming gradient, summed twice
    x = tl.tensor(np.ones((2, 3)), requires_grad=True)
    y = x.reshape(6)
    (y + y).sum().backward()
    assert np.all(x.grad.numpy() == 2.0)


def test_long_chain_has_no_recursion_error():
    x = tl.tensor([1.0], requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [1.0001 ** 10_000], rtol=1e-3)


def test_no_grad_builds_no_graph():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    with tl.no_grad():
        y = (x * 2).exp().sum()
    assert not y.requires_grad and y.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_inputs_without_grad_build_no_graph():
    x = tl.tensor([1.0, 2.0])
    y = (x * 2).sum()
    assert y.grad_fn is None and not y.requires_grad


def test_graph_is_freed_after_backward():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()
    node = y._node
    assert node.parents == () and node.backward is None


def test_retain_graph_allows_a_second_backward_that_accumulates():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * 2 * np.array([1.0, 2.0]))


def test_in_place_change_of_a_saved_value_is_an_error():
    w = tl.tensor([1.0, 2.0], requires_grad=True)
    x = tl.tensor([3.0, 4.0])
    y = (w * x).sum()            # mul saves x for dw
    x.copy_([0.0, 0.0])
    with pytest.raises(RuntimeError, match="modified in place"):
        y.backward()


def test_in_place_on_a_tensor_that_requires_grad_is_refused_in_grad_mode():
    w = tl.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="in-place"):
        w.fill_(0.0)
    with tl.no_grad():
        w.fill_(0.0)
    assert w._version == 1


def test_hooks_see_and_may_replace_the_gradient():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    y = x * 3
    seen = []
    y.register_hook(lambda g: seen.append(g.numpy().copy()))
    x.register_hook(lambda g: g * 10)
    y.sum().backward()
    np.testing.assert_allclose(seen[0], [1.0, 1.0])
    np.testing.assert_allclose(x.grad.numpy(), [30.0, 30.0])


def test_retain_grad_keeps_an_intermediate_gradient():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    y.retain_grad()
    (y * y).sum().backward()
    np.testing.assert_allclose(y.grad.numpy(), [4.0, 8.0])


def test_backward_on_non_scalar_needs_a_gradient():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"non-scalar tensor of shape \(2,\)"):
        (x * 2).backward()
    (x * 2).backward(tl.tensor([1.0, 0.5]))
    np.testing.assert_allclose(x.grad.numpy(), [2.0, 1.0])


def test_matmul_shape_error_names_both_shapes():
    a, b = tl.randn(3, 4), tl.randn(5, 6)
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(5, 6\)"):
        a @ b


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_family_is_finite_for_huge_logits(dtype):
    z = tl.tensor(np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype=dtype), requires_grad=True)
    for out in (F.softmax(z), F.log_softmax(z)):
        assert np.all(np.isfinite(out.numpy()))
    loss = F.cross_entropy(z, tl.tensor(np.array([1, 2])))
    loss.backward()
    assert np.isfinite(loss.item()) and np.all(np.isfinite(z.grad.numpy()))
    assert loss.dtype == np.dtype(dtype) and z.grad.dtype == np.dtype(dtype)
    # row 0 picks class 1, which is 2e4 below the max: the loss is ~2e4 / 2 rows
    assert abs(loss.item() - (2e4 + math.log(3)) / 2) < 1e-2


def test_cross_entropy_ignores_ignore_index_and_matches_formula():
    z = np.random.default_rng(1).standard_normal((4, 5))
    t = np.array([1, -100, 4, 0])
    loss = F.cross_entropy(tl.tensor(z), tl.tensor(t)).item()
    lse = np.log(np.exp(z).sum(1))
    keep = t != -100
    expected = np.mean(lse[keep] - z[keep, t[keep]])
    assert abs(loss - expected) < 1e-12


def test_getitem_repeated_and_negative_indices_scatter_add():
    x = tl.tensor(np.arange(5.0), requires_grad=True)
    x[tl.tensor(np.array([0, -1, 0, 4]))].sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [2, 0, 0, 0, 2])


@pytest.mark.host_checks
def test_embedding_out_of_range_id_is_a_clear_error():
    w = tl.randn(4, 3, requires_grad=True)
    with pytest.raises(IndexError, match=r"token id 7 .* 4 rows"):
        F.embedding(tl.tensor(np.array([1, 7])), w)


def test_float_python_data_takes_default_dtype():
    assert tl.tensor([1.0, 2.0]).dtype == np.float32
    with tl.default_dtype(tl.float64):
        assert tl.tensor([1.0]).dtype == np.float64
        assert tl.randn(2).dtype == np.float64
    assert tl.tensor(np.zeros(2)).dtype == np.float64   # arrays keep their dtype
    assert (tl.tensor([1.0]) * 2.5).dtype == np.float32


def test_tensor_basics():
    x = tl.tensor([[1.0, 2.0]], requires_grad=True)
    assert x.shape == (1, 2) and x.ndim == 2 and x.numel() == 2
    assert x.sum().item() == 3.0
    assert x.detach().requires_grad is False
    assert x.tolist() == [[1.0, 2.0]]
    assert "requires_grad=True" in repr(x)
    with pytest.raises(ValueError, match="one element"):
        x.item()
    with pytest.raises(TypeError, match="only float tensors"):
        tl.tensor([1, 2], requires_grad=True)


# ---------------------------------------------------------------------------- gradcheck itself

def _wrong_square(x):
    """x² with a deliberately wrong backward (3x instead of 2x)."""
    return make_result(x.data * x.data, (x,), lambda g: (g * 3 * x.data,), "bad_square", (x,))


def test_gradcheck_catches_a_wrong_backward():
    x = t64(3, 2)
    with pytest.raises(tl.GradcheckError) as err:
        tl.gradcheck(_wrong_square, [x])
    assert "NO" in str(err.value)
    report = tl.gradcheck(_wrong_square, [x], raise_on_failure=False)
    assert not report.ok and report.max_rel_err > 0.1


def test_gradcheck_catches_a_wrong_backward_in_every_mode():
    big = t64(80, 80)  # 6,400 elements: random directions
    rep = tl.gradcheck(lambda x: _wrong_square(x).sum(), [big], raise_on_failure=False)
    assert rep.inputs[0].mode == "directions" and not rep.ok
    mid = t64(30, 30)  # 900 elements into 900 outputs: element-wise vᵀJ
    rep = tl.gradcheck(_wrong_square, [mid], raise_on_failure=False)
    assert rep.inputs[0].mode == "elements" and not rep.ok
    good = tl.gradcheck(lambda x: (x * x).tanh(), [big])
    assert good.ok and good.inputs[0].mode == "directions"


def test_gradcheck_refuses_float32():
    x = tl.tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    with pytest.raises(TypeError, match="float64"):
        tl.gradcheck(lambda x: x * 2, [x])


# ---------------------------------------------------------------------------- backend

def test_erf_matches_math_erf():
    xs = np.linspace(-6, 6, 2001)
    ref = np.array([math.erf(v) for v in xs])
    assert np.abs(backend.erf(xs) - ref).max() < 1e-15
    assert np.abs(backend.erf(xs.astype(np.float32)) - ref).max() < 1e-6


def test_unknown_device_is_a_clear_error():
    before = tl.get_device()
    with pytest.raises(tl.DeviceError, match="unknown device 'tpu'"):
        tl.set_device("tpu")
    assert tl.get_device() == before


def test_cuda_without_cupy_or_gpu_is_a_clear_error():
    try:
        import cupy  # noqa: F401
        has_gpu = cupy.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        pytest.skip("a GPU is present")
    before = tl.get_device()
    with pytest.raises(tl.DeviceError, match="CuPy"):
        tl.set_device("cuda")
    assert tl.get_device() == before


def test_seeded_rng_is_repeatable_and_state_round_trips():
    tl.manual_seed(5)
    a = tl.randn(3).numpy().copy()
    state = backend.get_rng_state()
    b = tl.randn(3).numpy().copy()
    backend.set_rng_state(state)
    c = tl.randn(3).numpy().copy()
    tl.manual_seed(5)
    assert np.array_equal(a, tl.randn(3).numpy()) and np.array_equal(b, c)


def test_topological_order_with_a_value_reached_at_different_depths():
    # a feeds the residual sum directly and through a deeper chain: its gradient must be
    # complete (both paths summed) before it is passed on to x
    x = tl.tensor([0.3, -0.7], requires_grad=True)
    a = x * 2.0
    h = (a * 3.0).tanh() * 0.5
    y = (a + h).sum()
    y.backward()
    av = 2 * np.array([0.3, -0.7])
    expected = 2.0 * (1 + 0.5 * 3.0 * (1 - np.tanh(3.0 * av) ** 2))
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6)
