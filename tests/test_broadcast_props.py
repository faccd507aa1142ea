"""Property tests: random broadcastable shapes into binary ops and reductions."""
import hypothesis.strategies as st
from hypothesis import given, settings

import tinylora as tl
from tinylora.backend import np


@st.composite
def broadcast_pair(draw):
    """Two shapes that broadcast: size-1 axes, scalars and prepended axes included."""
    out = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    def shrink(shape):
        keep = draw(st.integers(0, len(shape)))
        tail = shape[len(shape) - keep:]
        return tuple(1 if draw(st.booleans()) else n for n in tail)
    return shrink(out), shrink(out)


OPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "where": lambda a, b: tl.where(a > b, a, b),
}


@settings(max_examples=60, deadline=None)
@given(shapes=broadcast_pair(), op=st.sampled_from(sorted(OPS)), seed=st.integers(0, 2**16))
def test_binary_ops_gradcheck_on_random_broadcast_shapes(shapes, op, seed):
    rng = np.random.default_rng(seed)
    sa, sb = shapes
    a = tl.tensor(rng.uniform(0.5, 2.0, sa), requires_grad=True)
    b = tl.tensor(rng.uniform(0.5, 2.0, sb), requires_grad=True)
    report = tl.gradcheck(OPS[op], [a, b])
    assert report.ok
    assert a.grad is None or a.grad.shape == a.shape   # gradcheck resets; shapes checked below
    (OPS[op](a, b)).sum().backward()
    assert a.grad.shape == sa and b.grad.shape == sb


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_reductions_keep_the_input_shape_in_gradients(shape, data):
    ndim = len(shape)
    dims = data.draw(st.one_of(st.none(), st.integers(-ndim, ndim - 1),
                               st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True)))
    keep = data.draw(st.booleans())
    op = data.draw(st.sampled_from(["sum", "mean", "max", "var"]))
    rng = np.random.default_rng(len(shape))
    x = tl.tensor(rng.standard_normal(shape), requires_grad=True)
    dim = tuple(dims) if isinstance(dims, list) else dims
    n_reduced = np.prod([shape[d] for d in (range(ndim) if dim is None else
                                            ((dim,) if isinstance(dim, int) else dim))])
    if op == "var" and n_reduced < 2:
        return
    y = getattr(x, op)(dim, keep)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert tl.gradcheck(lambda t: getattr(t, op)(dim, keep), [x]).ok
