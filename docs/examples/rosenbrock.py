"""The Rosenbrock function and its gradient, written with slicing, sums and numbers.

    f(x) = sum_i 100 (x[i+1] - x[i]^2)^2 + (1 - x[i])^2

Checked against ``scipy.optimize.rosen`` and ``rosen_der`` (needs SciPy: ``pip install
'symdiff[special]'``), then minimised with Adam from the classic start (-1.2, 1, ...).

    python docs/examples/rosenbrock.py
"""
from __future__ import annotations

import numpy as np

from symdiff import Autograd, XMan, f
from symdiff.optim import Adam


def rosenbrock(x):
    """The function of a register holding a vector: every operation is a graph op."""
    return f.sum(100 * f.square(x[1:] - f.square(x[:-1])) + f.square(1 - x[:-1]))


def build(n: int) -> XMan:
    xm = XMan()
    xm.x = f.param(name="x", default=np.tile([-1.2, 1.0], n // 2 + 1)[:n])
    xm.loss = rosenbrock(xm.x)
    return xm.setup()


def value_and_gradient(xm: XMan, x: np.ndarray) -> tuple[float, np.ndarray]:
    wengert = xm.operationSequence(xm.loss)
    ad = Autograd(xm)
    values = ad.eval(wengert, xm.inputDict(x=x))
    return float(values["loss"]), ad.bprop(wengert, values, loss=np.float64(1.0))["x"]


def main() -> None:
    from scipy.optimize import rosen, rosen_der

    rng = np.random.default_rng(0)
    for n in (2, 3, 10):
        xm = build(n)
        print(f"n = {n}: Wengert list of {len(xm.operationSequence(xm.loss))} steps")
        for x in (xm.inputDict()["x"], rng.uniform(-2, 2, n)):
            value, grad = value_and_gradient(xm, x)
            assert np.isclose(value, rosen(x), rtol=1e-13), (value, rosen(x))
            assert np.allclose(grad, rosen_der(x), rtol=1e-12, atol=1e-12), (grad, rosen_der(x))
            print(f"  f = {value:.6g} (scipy {rosen(x):.6g}); |grad - rosen_der| = "
                  f"{np.max(np.abs(grad - rosen_der(x))):.1e}")
    xm = build(2)
    wengert = xm.operationSequence(xm.loss)
    ad = Autograd(xm)
    params = {"x": xm.inputDict()["x"]}
    opt = Adam(params, lr=0.02)
    for _ in range(3000):
        values = ad.eval(wengert, params)
        opt.step(ad.bprop(wengert, values, loss=np.float64(1.0)))
    print(f"Adam from (-1.2, 1): x = {np.round(params['x'], 4)}, f = {float(values['loss']):.2e} (minimum at (1, 1))")
    assert np.allclose(params["x"], 1.0, atol=1e-2)


if __name__ == "__main__":
    main()
