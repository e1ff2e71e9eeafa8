"""The loss head in one compiled call (symdiff.numpy_loops, the dispatcher's crossent_softmax,
crossent_softmax_grad, mean_of, mean_grad): numpy's bits, or numpy itself where it does not fit."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from symdiff import Autograd, XMan, f, native, numpy_loops, ops


@pytest.fixture
def head():
    d = ops._head()
    if d is None:
        pytest.skip(f"the compiled head is unavailable here (native kernels {native.status()})")
    return d


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,c", [(64, 5), (64, 14), (3, 16), (10, 129), (1, 1)])
def test_head_equals_numpy_to_the_bit(head, dtype, n, c):
    rng = np.random.default_rng(n * c)
    o = (rng.standard_normal((n, c)) * rng.exponential(5, (n, 1))).astype(dtype)
    t = np.eye(c, dtype=dtype)[rng.integers(0, c, n)]
    d = rng.standard_normal(n).astype(dtype)
    loss = head.crossent_softmax(o, t)
    want = ops._crossent_softmax_numpy(o, t)
    assert loss.dtype == want.dtype and np.array_equal(loss, want)
    grad, want_grad = head.crossent_softmax_grad(d, o, t), ops._crossent_softmax_do_numpy(d, None, o, t)
    assert grad.dtype == want_grad.dtype and np.array_equal(grad, want_grad)
    mean, want_mean = head.mean_of(loss), ops._mean_numpy(loss)
    assert mean.shape == () and mean.dtype == want_mean.dtype and np.array_equal(mean, want_mean)
    seed = np.asarray(1.5, dtype)
    back, want_back = head.mean_grad(seed, loss), ops._mean_back_numpy(seed, None, loss)
    assert back.dtype == want_back.dtype and np.array_equal(back, want_back)


def test_head_declines_what_it_does_not_do(head):
    o = np.random.default_rng(0).standard_normal((8, 6))
    t = np.eye(6)[np.arange(8) % 6]
    assert head.crossent_softmax(o[:, ::2], t[:, :3]) is None  # not contiguous
    assert head.crossent_softmax(o.astype(np.float32), t) is None  # dtypes differ
    assert head.crossent_softmax(o.astype(np.float16), t.astype(np.float16)) is None
    assert head.mean_of(np.ones(10_000)) is None  # numpy may cut a longer sum into buffers
    bad = o.copy()
    bad[2, 1] = np.inf  # numpy's path, with its warning
    assert head.crossent_softmax(bad, t) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = ops._crossent_softmax(bad, t)
    assert np.isnan(loss[2]) and caught


def test_the_check_refuses_loops_that_are_not_numpys(head):
    try:
        head.set_head_loops(np.log, np.exp, np.add)  # exp and log swapped
        assert not numpy_loops._agrees(head, ops._head_reference)
        head.set_head_loops(np.exp, np.log, np.subtract)  # sums that are not sums
        assert not numpy_loops._agrees(head, ops._head_reference)
    finally:
        head.set_head_loops(np.exp, np.log, np.add)
    assert numpy_loops._agrees(head, ops._head_reference)


def test_a_classifier_head_trains_the_same_with_and_without_it(head, monkeypatch):
    def grads(compiled):
        monkeypatch.setattr(ops, "_head", (lambda: head) if compiled else (lambda: None))
        xm = XMan()
        xm.x = f.input(name="x", default=np.zeros((16, 7), np.float32))
        xm.W = f.param(name="W", default=np.zeros((7, 5), np.float32))
        xm.y = f.input(name="y", default=np.zeros((16, 5), np.float32))
        xm.loss = f.mean(f.crossEnt(f.softMax(xm.x @ xm.W), xm.y))
        xm = xm.setup()
        rng = np.random.default_rng(3)
        ad = Autograd(xm)
        w = xm.operationSequence(xm.loss)
        vals = ad.eval(w, {"x": rng.standard_normal((16, 7)).astype(np.float32),
                           "W": rng.standard_normal((7, 5)).astype(np.float32),
                           "y": np.eye(5, dtype=np.float32)[rng.integers(0, 5, 16)]})
        return vals["loss"], ad.bprop(w, vals, loss=np.float32(1.0))["W"]

    (l1, g1), (l0, g0) = grads(True), grads(False)
    assert l1.dtype == np.float32 and np.array_equal(l1, l0) and np.array_equal(g1, g0)
