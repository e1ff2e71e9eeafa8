"""A stable log-sum-exp, and why it matters.

``log(sum(exp(x)))`` written out overflows as soon as an entry passes ~709 (float64):
``exp`` gives inf, and the gradient NaN. ``f.logsumexp`` shifts by the maximum first,
so it is exact at any scale, and its gradient is the softmax of ``x``. The same holds
for ``f.log_softmax`` against ``f.log(f.softMax(x))``, which is -inf where a
probability underflows.

    python docs/examples/logsumexp.py
"""
from __future__ import annotations

import warnings

import numpy as np

from symdiff import Autograd, XMan, f


def evaluate(build, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value of ``build(x)`` summed, and its gradient in ``x``."""
    xm = XMan()
    xm.x = f.param(name="x", default=x)
    xm.y = build(xm.x)
    xm.loss = f.sum(xm.y)
    xm = xm.setup()
    wengert = xm.operationSequence(xm.loss)
    ad = Autograd(xm)
    with np.errstate(all="ignore"):  # the naive version is expected to overflow
        values = ad.eval(wengert, xm.inputDict())
        grads = ad.bprop(wengert, values, loss=np.float64(1.0))
    return values["y"], grads["x"]


def main() -> None:
    x = np.array([[1000.0, 999.0, -5.0], [0.5, -0.5, 0.0], [-1000.0, -1001.0, -1e4]])
    naive, naive_grad = evaluate(lambda r: f.log(f.sum(f.exp(r), axis=1)), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stable version must not even warn
        stable, stable_grad = evaluate(lambda r: f.logsumexp(r, axis=1), x)
        log_softmax, _ = evaluate(lambda r: f.log_softmax(r, axis=1), x)
    m = x.max(axis=1, keepdims=True)
    exact = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
    softmax = np.exp(x - exact[:, None])
    print("row   naive log(sum(exp))   f.logsumexp        exact")
    for k in range(3):
        print(f"{k:>3}   {naive[k]:>19.6f}   {stable[k]:>14.6f}   {exact[k]:>12.6f}")
    print("gradient of f.logsumexp = softmax(x):", np.allclose(stable_grad, softmax, rtol=1e-14, atol=0))
    print("naive gradient finite in every row:", bool(np.isfinite(naive_grad).all()))
    assert np.allclose(stable, exact, rtol=1e-15) and np.allclose(stable_grad, softmax, rtol=1e-14, atol=0)
    assert not np.isfinite(naive[[0, 2]]).any()  # overflow to inf, underflow to log(0) = -inf
    assert np.allclose(log_softmax, x - exact[:, None], rtol=1e-15)


if __name__ == "__main__":
    main()
