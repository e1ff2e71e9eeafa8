"""numpy's own exp, log and add loops, handed to the compiled dispatcher for the loss head.

Why: a training batch ends in ``crossEnt-softMax`` and ``mean`` on a (batch × labels) array; in
numpy that is a dozen calls whose cost is numpy's machinery (gone cold after the products), not
the arithmetic. The dispatcher's ``crossent_softmax``, ``crossent_softmax_grad``, ``mean_of`` and ``mean_grad``
do the same steps in one call each, calling numpy's registered inner loops for what numpy's bits
depend on (exp and log: numpy picks a SIMD variant for the CPU; sums: numpy's pairwise add loop
as its reductions call it). They are used only after a check that their results equal numpy's
bit for bit (:func:`install`); otherwise ``symdiff.ops`` keeps computing the head with numpy.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

#: ``reference(o, t, d) -> (loss, gradient, mean of loss, mean's gradient for seed d[-1])`` with numpy
Reference = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, ...]]

_found: dict[str, bool] = {}


def _agrees(dispatch: Any, reference: Reference) -> bool:
    """Whether the dispatcher's head equals numpy's to the bit (row lengths below, at and above
    numpy's 8-wide unrolling and its 128 block; large and tiny logits, ties, one-hot and soft targets)."""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for n, c in ((64, 5), (64, 14), (7, 8), (33, 9), (5, 130), (300, 3), (1, 1), (2, 200)):
            for scale in (1.0, 30.0, 1e-3):
                o = (rng.standard_normal((n, c)) * scale).astype(dtype)
                o[0, :] = o[0, 0]  # a row of ties
                t = np.eye(c, dtype=dtype)[rng.integers(0, c, n)]
                if n > 2:
                    t[1] = rng.random(c).astype(dtype)  # a soft target
                d = np.full(n, 1 / n, dtype)
                d[-1] = -3.0
                want = reference(o, t, d)
                got = (dispatch.crossent_softmax(o, t), dispatch.crossent_softmax_grad(d, o, t),
                       dispatch.mean_of(want[0]), dispatch.mean_grad(d[-1:].reshape(()), want[0]))
                for g, w in zip(got, want):
                    if g is None or g.dtype != w.dtype or g.shape != w.shape or not np.array_equal(g, w):
                        return False
    return True


def install(dispatch: Any, reference: Reference) -> bool:
    """Hand numpy's loops to the dispatcher (once); whether the head may run there: whether it
    agrees with ``reference``, the numpy code it stands for (``symdiff.ops``)."""
    if "ok" in _found:
        return _found["ok"]
    ok = False
    try:
        ok = bool(dispatch.set_head_loops(np.exp, np.log, np.add)) and _agrees(dispatch, reference)
    except Exception:  # noqa: BLE001 - anything odd: the head stays numpy's
        ok = False
    if not ok:
        try:
            dispatch.set_head_loops(None, None, None)
        except Exception:  # noqa: BLE001
            pass
    _found["ok"] = ok
    return ok
