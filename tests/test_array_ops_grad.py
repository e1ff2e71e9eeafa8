"""Gradients of gradients through the ops with static arguments (gradients as graphs).

Each op's graph pullback and forward rule (:data:`symdiff.array_ops.PULLBACKS`,
``PUSHFORWARDS``) are checked to third order against central differences with
``check_grads``, and Hessian-vector products against differences of gradients.
"""
from __future__ import annotations

import numpy as np
import pytest

differential = pytest.importorskip("symdiff.differential", reason="gradients as graphs (symdiff.grad) not here")

from symdiff import XMan, f  # noqa: E402
from symdiff.gradcheck import check_grads  # noqa: E402

rng = np.random.default_rng(7)
X = rng.uniform(-1, 1, (2, 3, 4)) + np.arange(24).reshape(2, 3, 4) * 0.05  # distinct: no ties for max
MASK = rng.random((2, 3, 4)) < 0.5

CASES = {
    "sum axis": lambda x: f.sum(f.tanh(x), axis=1),
    "sum axes keepdims": lambda x: f.sum(f.tanh(x), axis=(0, -1), keepdims=True),
    "mean axis": lambda x: f.mean(f.square(x), axis=-1),
    "max axis": lambda x: f.max(f.sigmoid(x), axis=0, keepdims=True),
    "max all": lambda x: f.max(f.square(x)),
    "logsumexp": lambda x: f.logsumexp(x * 2, axis=(1, 2)),
    "logsumexp all": lambda x: f.logsumexp(x),
    "softMax axis 0": lambda x: f.softMax(x, axis=0),
    "log_softmax axis 1": lambda x: f.log_softmax(x, axis=1),
    "log_softmax default": lambda x: f.log_softmax(x),
    "reshape": lambda x: f.tanh(f.reshape(x, (4, -1))),
    "transpose axes": lambda x: f.sigmoid(f.transpose(x, (2, 0, 1))),
    "concat": lambda x: f.tanh(f.concat([x, f.square(x), x[:, :1]], axis=1)),
    "stack": lambda x: f.square(f.stack([x, f.tanh(x)], axis=-1)),
    "getitem basic": lambda x: f.square(x[1, ::-2, None, 1:]),
    "getitem repeated": lambda x: f.tanh(x[:, [0, 0, 2], ...]),
    "getitem ellipsis": lambda x: f.sigmoid(x[..., -1]),
    "where": lambda x: f.where(f.input(name="mask", default=MASK), f.square(x), f.tanh(x)),
    "numbers": lambda x: 1 - 2 * x ** 3 / 3 + 0.5 ** x,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_third_order_gradients_through_ops_with_static_arguments(name):
    xm = XMan()
    xm.x = f.param(name="x", default=X.copy())
    out = CASES[name](xm.x)
    probe = XMan()
    probe.out = out
    probe.setup()
    from symdiff import Autograd

    shape = np.shape(Autograd(probe).eval(probe.operationSequence(out), probe.inputDict())["out"])
    xm.w = f.input(name="w", default=rng.standard_normal(shape))
    xm.loss = f.sum(f.hadamard(out, xm.w))
    xm.setup()
    for check in check_grads(xm, "loss", ["x"], order=3, rtol=2e-5, atol=1e-7):
        assert check.ok, f"{name}: order {check.order}: max relative error {check.max_rel:.2e}"


@pytest.mark.parametrize("name", ["logsumexp", "getitem repeated", "concat", "where", "max axis"])
def test_hvp_through_ops_with_static_arguments_matches_differences_of_gradients(name):
    from symdiff import Autograd

    xm = XMan()
    xm.x = f.param(name="x", default=X.copy())
    xm.loss = f.sum(f.square(CASES[name](xm.x)))
    xm.setup()
    v = rng.standard_normal(X.shape)
    hv = differential.hvp(xm, "loss", ["x"], {"x": v})["x"]
    gx = differential.grad(xm, "loss", ["x"])
    ad = Autograd(gx)
    wl = differential.wengert_for(gx, ["grad_x"])
    eps = 1e-5

    def g(sign):
        vals = xm.inputDict(x=X + sign * eps * v)
        return ad.eval(wl, vals)["grad_x"]

    np.testing.assert_allclose(hv, (g(1) - g(-1)) / (2 * eps), rtol=1e-5, atol=1e-6)


def test_jvp_through_indexing_and_reductions():
    xm = XMan()
    xm.x = f.param(name="x", default=X.copy())
    xm.y = f.logsumexp(xm.x[:, [2, 0, 2]], axis=-1)
    xm.setup()
    t = rng.standard_normal(X.shape)
    got = differential.jvp(xm, "y", {"x": t})
    from symdiff import Autograd

    ad = Autograd(xm)
    wl = xm.operationSequence(xm.y)
    eps = 1e-6
    num = (ad.eval(wl, xm.inputDict(x=X + eps * t))["y"] - ad.eval(wl, xm.inputDict(x=X - eps * t))["y"]) / (2 * eps)
    np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-8)


def test_second_order_gradients_through_a_special_function_with_a_nondiff_order():
    import sympy as sp

    from symdiff import defop

    nu, x = sp.symbols("nu x")
    defop("grad_jv", sp.besselj(nu, x), args=[nu, x], nondiff=[nu])  # its partials keep nu nondiff
    xm = XMan()
    xm.nu = f.input(name="nu", default=np.array([[0.0], [1.0], [2.5]]))
    xm.x = f.param(name="x", default=np.linspace(0.5, 6, 4))
    xm.loss = f.sum(f.square(f.grad_jv(xm.nu, xm.x)))
    xm.setup()
    for check in check_grads(xm, "loss", ["x"], order=3, rtol=2e-5, atol=1e-7):
        assert check.ok, f"order {check.order}: max relative error {check.max_rel:.2e}"
