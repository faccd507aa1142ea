"""Fast GELU (both forms) for ``ops.gelu``: the reference's passes, block by block in place.

Each block of the flattened array stays in cache through all of its passes, into buffers
allocated once: about twice as fast as whole-array passes through memory. For backward
only the input is kept (alive anyway: the linear before made it); tanh(u) or Φ(x), as
large as the input, is recomputed block by block with the forward's operations. Under no_grad,
float32 on the CPU (BERT's inference, whose FFN activation is its largest tensor), the erf
form takes a shorter route that keeps nothing for a backward:
  gelu(x) = x Φ(x) = relu(x) - ½|x| erfc(|x|/√2),
  erfc(z) ≈ t (a1 + a2 t + .. + a5 t⁴) e^(-z²),  t = 1/(1 + p z)   (Abramowitz & Stegun
  7.1.26, |error| ≤ 1.5e-7: the float32 erf of backend.erf)
"""
from __future__ import annotations

import math

from .. import backend, dispatch
from ..backend import np, xp
from ..ops.arith import _INV_SQRT_2, _INV_SQRT_2PI, _SQRT_2_OVER_PI
from ..tensor import Tensor, is_grad_enabled, make_result
from . import blocking
from .blocking import block_rows, blocks, parallel


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    if approximate == "tanh":
        return _gelu_tanh(x)
    if approximate != "none":
        return dispatch.reference_of("gelu")(x, approximate)     # its error message
    if not is_grad_enabled() and x.dtype == np.float32 and not backend.is_cuda():
        return Tensor._wrap(_gelu_erf_inference(x.data))         # CuPy's erf is one kernel already
    return _gelu_erf(x)


# y = x Φ(x), Φ(x) = (1 + erf(x/√2)) / 2  ->  dx = dy * (Φ(x) + x φ(x)), φ(x) = e^(-x²/2)/√(2π)
def _gelu_erf(x: Tensor) -> Tensor:
    X = xp.ascontiguousarray(x.data)
    Xf, dt = X.reshape(-1), X.dtype.type
    y = xp.empty_like(Xf)

    def phi(b, buf):                                 # Φ(x) of block b, into buf
        c = buf[:b.stop - b.start]
        c[...] = backend.erf(Xf[b] * dt(_INV_SQRT_2))
        c += 1
        c *= 0.5
        return c
    step = block_rows(Xf.size)
    kept = xp.empty_like(Xf) if Xf.size <= blocking.KEEP_VALUES else None   # small: kept

    def forward(part):                               # each thread: its blocks, its own buffer
        cdf = xp.empty(step, dtype=Xf.dtype)
        for b in part:
            xp.multiply(Xf[b], phi(b, cdf if kept is None else kept[b]), out=y[b])
    parallel(forward, blocks(Xf.size))

    def backward(g):                                 # Φ(x) recomputed from x, unless kept
        gf = xp.ascontiguousarray(g).reshape(-1)
        dx = xp.empty_like(Xf)

        def run(part):
            cdf = xp.empty(step, dtype=Xf.dtype)
            for b in part:
                xs, d = Xf[b], dx[b]
                xp.multiply(xs, xs, out=d)
                d *= -0.5
                xp.exp(d, out=d)
                d *= dt(_INV_SQRT_2PI)
                d *= xs
                d += phi(b, cdf) if kept is None else kept[b]
                d *= gf[b]
        parallel(run, blocks(Xf.size))
        return (dx.reshape(X.shape),)
    return make_result(y.reshape(X.shape), (x,), backward, "gelu", (x,))


# y = x (1 + tanh(u)) / 2, u = √(2/π)(x + 0.044715 x³)
#   ->  dx = dy * [(1 + t)/2 + x (1 - t²) √(2/π)(1 + 3·0.044715 x²) / 2],  t = tanh(u)
def _gelu_tanh(x: Tensor) -> Tensor:
    X = xp.ascontiguousarray(x.data)
    Xf = X.reshape(-1)
    c = X.dtype.type(_SQRT_2_OVER_PI)
    k = X.dtype.type(0.044715)
    y = xp.empty_like(Xf)

    def tanh_u(b, buf, x2=None):                     # t = tanh(u) of block b, into buf
        xs, ts = Xf[b], buf[:b.stop - b.start]
        if x2 is None:
            xp.multiply(xs, xs, out=ts)              # u = c·x·(1 + k x²), then t = tanh(u)
            ts *= k
        else:                                        # x² given: the same values, one pass less
            xp.multiply(x2, k, out=ts)
        ts += 1
        ts *= xs
        ts *= c
        xp.tanh(ts, out=ts)
        return ts
    step = block_rows(Xf.size)
    kept = xp.empty_like(Xf) if Xf.size <= blocking.KEEP_VALUES else None   # small: kept

    def forward(part):                               # each thread: its blocks, its own buffer
        t = xp.empty(step, dtype=Xf.dtype)
        for b in part:
            xs, ts, ys = Xf[b], tanh_u(b, t if kept is None else kept[b]), y[b]
            xp.add(ts, 1, out=ys)                    # y = x (1 + t) / 2
            ys *= xs
            ys *= 0.5
    parallel(forward, blocks(Xf.size))

    def backward(g):                                 # t recomputed from x, unless kept
        gf = xp.ascontiguousarray(g).reshape(-1)
        dx = xp.empty_like(Xf)

        def run(part):
            t, tmp = (xp.empty(step, dtype=Xf.dtype) for _ in range(2))
            for b in part:
                xs, d = Xf[b], dx[b]
                s = tmp[:d.size]
                xp.multiply(xs, xs, out=s)           # s = c (1 + 3k x²) x
                ts = tanh_u(b, t, s) if kept is None else kept[b]
                s *= 3 * k
                s += 1
                s *= c
                s *= xs
                xp.multiply(ts, ts, out=d)           # d = (1 - t²) s + 1 + t
                xp.subtract(1, d, out=d)
                d *= s
                d += ts
                d += 1
                d *= 0.5
                d *= gf[b]
        parallel(run, blocks(Xf.size))
        return (dx.reshape(X.shape),)
    return make_result(y.reshape(X.shape), (x,), backward, "gelu_tanh", (x,))


_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _gelu_erf_inference(h):
    """GELU (erf) of a float32 array into a new array, via relu(x) - ½|x| erfc(|x|/√2)."""
    flat = xp.ascontiguousarray(h).reshape(-1)
    y = xp.empty_like(flat)
    f32 = np.float32
    p, half = f32(_AS_P / math.sqrt(2.0)), [f32(0.5 * a) for a in _AS_A]  # z = |x|/√2 folded in
    step = block_rows(flat.size)

    def run(part):                                   # each thread: its blocks, its own buffers
        a_buf, t_buf = (xp.empty(step, dtype=flat.dtype) for _ in range(2))
        for b in part:
            x, acc = flat[b], y[b]
            k = x.size
            a, t = a_buf[:k], t_buf[:k]
            xp.abs(x, out=a)                                             # |x|
            xp.multiply(a, p, out=t)
            t += 1
            xp.reciprocal(t, out=t)                                      # t = 1/(1 + p|x|/√2)
            xp.multiply(t, half[4], out=acc)                             # Horner: ½ Σ a_i t^i
            for c in half[3::-1]:
                acc += c
                acc *= t
            xp.multiply(a, a, out=t)
            t *= f32(-0.5)
            xp.exp(t, out=t)                                             # e^(-x²/2)
            acc *= t
            acc *= a                                                     # ½|x| erfc(|x|/√2)
            xp.maximum(x, 0, out=a)
            xp.subtract(a, acc, out=acc)                                 # relu(x) - ½|x| erfc
    parallel(run, blocks(flat.size))
    return y.reshape(h.shape)


dispatch.register("gelu", gelu)
