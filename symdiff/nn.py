"""Small building blocks made of engine ops: registers in, registers out.

Nothing here has kernels of its own; every function only composes registered
primitives, so the engine differentiates the result like any other graph.

>>> import numpy as np
>>> from symdiff import XMan, f
>>> from symdiff.nn import attention
>>> xm = XMan()
>>> xm.Q = f.param(name="Q", default=np.random.rand(3, 4))   # M queries of size n
>>> xm.D = f.param(name="D", default=np.random.rand(5, 4))   # N document vectors of size n
>>> xm.A = attention(xm.Q, xm.D)                             # (3, 5), each row sums to 1
"""
from __future__ import annotations

from . import ops as _ops  # noqa: F401  (the built-in primitives must be registered before use)
from .graph import Register, f

__all__ = ["attention", "attention_scores", "attend"]


def attention_scores(Q: Register, D: Register) -> Register:
    """``S = Q Dᵀ``: ``S[i, j] = q_iᵀ d_j`` for every query ``i`` and document vector ``j``."""
    return f.mul(Q, f.transpose(D))


def attention(Q: Register, D: Register) -> Register:
    """Soft attention distributions for all queries at once: ``A = softMax(Q Dᵀ)`` row-wise.

    ``Q`` is ``M × n`` (one query per row), ``D`` is ``N × n`` (one document
    vector per row); row ``i`` of the ``M × N`` result is
    ``α_i = softmax_j(q_iᵀ d_j)``. Two matrix ops and one row-wise softmax, no
    loop over queries.
    """
    return f.softMax(attention_scores(Q, D))


def attend(Q: Register, D: Register, V: Register | None = None) -> tuple[Register, Register]:
    """``(A, A V)``: the attention distributions and the attended vectors (``V`` defaults to ``D``).

    Row ``i`` of ``A V`` is ``Σ_j α_ij v_j``, the expected document vector under ``α_i``.
    """
    A = attention(Q, D)
    return A, f.mul(A, D if V is None else V)
