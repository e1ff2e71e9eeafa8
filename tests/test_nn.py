"""Soft attention (symdiff.nn): values against a per-row numpy loop, gradients against central differences."""
from __future__ import annotations

import numpy as np
import pytest

from symdiff import Autograd, XMan, f, grad_check
from symdiff.nn import attend, attention

M, N, n = 3, 5, 4   # queries, document vectors, vector size


def _per_row_attention(Q: np.ndarray, D: np.ndarray) -> np.ndarray:
    """α_i = softmax_j(q_iᵀ d_j), one query at a time, written out by hand."""
    A = np.empty((Q.shape[0], D.shape[0]))
    for i, q in enumerate(Q):
        scores = np.array([q @ d for d in D])
        e = np.exp(scores - scores.max())
        A[i] = e / e.sum()
    return A


def _graph(seed: int = 0, context: bool = False) -> XMan:
    rng = np.random.default_rng(seed)
    xm = XMan()
    xm.Q = f.param(name="Q", default=rng.normal(size=(M, n)))
    xm.D = f.param(name="D", default=rng.normal(size=(N, n)))
    xm.T = f.input(name="T", default=np.eye(N)[rng.integers(0, N, size=M)])
    if context:
        # D feeds both the scores and the attended vectors: its gradient has two paths to add up
        xm.A, xm.C = attend(xm.Q, xm.D)
        xm.loss = f.mean(f.square(xm.C))
    else:
        xm.A = attention(xm.Q, xm.D)
        xm.loss = f.mean(f.crossEnt(xm.A, xm.T))
    return xm.setup()


def test_attention_matches_a_per_row_loop():
    xm = _graph(seed=1)
    w = xm.operationSequence(xm.register("A"))
    values = Autograd(xm).eval(w, xm.inputDict())
    Q, D = xm.register("Q").default, xm.register("D").default
    A = values["A"]
    assert A.shape == (M, N)
    np.testing.assert_allclose(A, _per_row_attention(Q, D), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(A.sum(axis=1), 1.0, rtol=1e-12)


def test_attention_is_built_from_engine_ops():
    xm = _graph()
    ops = [s.op for s in xm.operationSequence(xm.register("A"))]
    assert ops == ["transpose", "mul", "softMax"]


def test_attention_is_stable_for_large_scores():
    xm = XMan()
    xm.Q = f.input(name="Q", default=np.full((2, 3), 100.0))
    xm.D = f.input(name="D", default=np.array([[10.0, 0, 0], [0, 0, 0]]))
    xm.A = attention(xm.Q, xm.D)
    xm.setup()
    A = Autograd(xm).eval(xm.operationSequence(xm.A), xm.inputDict())["A"]
    assert np.isfinite(A).all()
    np.testing.assert_allclose(A, [[1.0, 0.0], [1.0, 0.0]], atol=1e-12)


@pytest.mark.parametrize("passes", [None, ()], ids=["default-passes", "unfused"])
def test_attention_gradients_cross_entropy(passes):
    xm = _graph(seed=2)
    report = grad_check(xm, xm.operationSequence(xm.register("loss")), max_elements=None, passes=passes)
    assert {p.name for p in report.params} == {"Q", "D"}
    assert report.ok, str(report)
    assert {p.name: p.checked for p in report.params} == {"Q": M * n, "D": N * n}


def test_attention_gradients_through_context_vectors():
    xm = _graph(seed=3, context=True)
    report = grad_check(xm, xm.operationSequence(xm.register("loss")), max_elements=None, passes=())
    assert report.ok, str(report)


def test_gradient_is_not_trivially_zero():
    """A grad check of an all-zero gradient against a flat loss would pass vacuously."""
    xm = _graph(seed=2)
    w = xm.operationSequence(xm.register("loss"))
    ad = Autograd(xm, passes=())
    g = ad.bprop(w, ad.eval(w, xm.inputDict()), loss=np.float64(1.0))
    assert np.abs(g["Q"]).max() > 1e-3 and np.abs(g["D"]).max() > 1e-3
