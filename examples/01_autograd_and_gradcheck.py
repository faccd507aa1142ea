"""Autograd from first principles, and how tinylora checks every backward.

    python examples/01_autograd_and_gradcheck.py            # about 5 seconds
    python examples/01_autograd_and_gradcheck.py --quick    # a few ops only

1. A small graph: loss = sum(relu(x @ w)); its gradient by the engine and by hand.
2. A value used twice gets the sum of both gradients (the multivariable chain rule).
3. The LoRA layer's math, y = x Wᵀ + s·(x Aᵀ) Bᵀ, checked against finite differences.
4. A deliberately wrong backward, and the gradcheck report that catches it.
5. Every op of the engine through the same check (what `tinylora gradcheck` prints).
"""
import argparse
import time

import numpy as np

import tinylora as tl
from tinylora import functional as F
from tinylora.tensor import make_result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="check a few ops instead of all")
    args = ap.parse_args(argv)
    tl.manual_seed(0)

    # 1. the engine records each op; backward() walks the graph from the loss
    x = tl.tensor([[1.0, -2.0, 3.0], [0.5, 1.0, -1.0]])                    # (2, 3)
    w = tl.tensor([[0.2, -0.1], [0.4, 0.3], [-0.5, 0.1]], requires_grad=True)  # (3, 2)
    h = x @ w                                                              # (2, 2)
    loss = h.relu().sum()
    loss.backward()
    # by hand: dL/dh = [h > 0], and for h = x w, dL/dw = xᵀ dL/dh
    by_hand = x.numpy().T @ (h.numpy() > 0)
    print("1. dL/dw by the engine:", w.grad.tolist(), "  by hand:", by_hand.tolist())
    assert np.allclose(w.grad.numpy(), by_hand)

    # 2. a value used twice: y = a·a, so dy/da = 2a (the two uses' gradients add up)
    a = tl.tensor([3.0], requires_grad=True)
    (a * a).sum().backward()
    print(f"2. d(a·a)/da at a = 3: {a.grad.item():g} (= 2a)")

    # 3. gradcheck needs float64: finite differences in float32 are too coarse
    with tl.default_dtype(tl.float64):
        x = tl.randn(4, 8)
        W = tl.randn(6, 8)                        # frozen: no gradient is asked for
        A = tl.randn(2, 8, requires_grad=True)    # LoRA: r = 2
        B = tl.randn(6, 2, requires_grad=True)

        def lora_layer(x, W, A, B):
            y = F.linear(x, W) + F.linear(F.linear(x, A) * 2.0, B)   # s = alpha / r = 2
            return (y * y).mean()

        report = tl.gradcheck(lora_layer, [x, W, A, B])
        print("3. the LoRA layer's gradients for A and B against finite differences:")
        print(report)

        # 4. a square whose backward forgot the factor 2: gradcheck names the input
        def square_wrong(t):
            return make_result(t.data * t.data, (t,), lambda g: (g * t.data,), "square_wrong", (t,))

        v = tl.randn(5, requires_grad=True)
        bad = tl.gradcheck(lambda t: square_wrong(t).sum(), [v], raise_on_failure=False)
        print("4. a wrong backward (d(x²)/dx written as x):")
        print(bad)
        assert not bad.ok

    # 5. every op, several shapes each (broadcasting, repeated indices, masks)
    from tinylora.opcheck import all_cases, run_case
    cases = all_cases()
    if args.quick:
        wanted = {"matmul", "softmax", "cross_entropy", "layer_norm", "lora_linear"}
        cases = [c for c in cases if c.op in wanted]
    t0 = time.perf_counter()
    results = [(c, run_case(c)) for c in cases]
    failed = [c.op for c, r in results if not r.ok]
    worst = max(r.max_rel_err for _, r in results)
    print(f"5. {len(results) - len(failed)}/{len(results)} op cases pass "
          f"(largest relative error {worst:.1e}, {time.perf_counter() - t0:.1f} s)")
    assert not failed, failed


if __name__ == "__main__":
    main()
