"""Structural ops that gradient graphs are built from, each differentiable in turn.

A gradient graph (:func:`symdiff.grad`) needs a few linear ops besides the
model's own: a row sum kept as a column, summing a gradient back to a
broadcast input's shape and its adjoint (a broadcast), the two transposed
matrix products of a product's backward, and the reshapes between a per-row
vector and a column. The sum of all elements is not here: it is ``sum``, the
default of the ``f.sum(x, axis=, keepdims=)`` family in :mod:`symdiff.array_ops`
(one op whichever module is imported first). Every op here has numpy kernels (so ``bprop`` and the
auto-verifier treat it like any op) and a graph pullback and pushforward in
:mod:`symdiff.differential` built from ops of this same closed set, so a
gradient can be differentiated again at any order.

Ops whose second input is a *reference* (``sum_like``, ``broadcast_like``,
``spread``) read only that input's shape: its gradient is zero.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .onehot import OneHot
from .registry import OPS, Op, register, sum_to_shape


def _dense(a: Any) -> np.ndarray:
    return np.asarray(a)


def _rowsum(a: np.ndarray) -> np.ndarray:
    return np.sum(a, axis=-1, keepdims=True)


def _rowsum_back(delta: np.ndarray, out: Any, a: np.ndarray) -> np.ndarray:
    return np.broadcast_to(delta, np.shape(a)).astype(np.result_type(a, delta), copy=True)


def _sum_like(g: np.ndarray, ref: Any) -> np.ndarray:
    shape = np.shape(ref)
    g = np.asarray(g)
    if g.shape == shape:
        return g
    if len(shape) > g.ndim or any(n not in (1, m) for n, m in zip(shape[::-1], g.shape[::-1])):
        raise ValueError(f"sum_like: a gradient of shape {g.shape} cannot be summed to shape {shape} "
                         f"(that shape does not broadcast to it)")
    return sum_to_shape(g, shape, g.dtype)


def _sum_like_dg(delta: np.ndarray, out: Any, g: np.ndarray, ref: Any) -> np.ndarray:
    return np.broadcast_to(delta, np.shape(g)).astype(np.result_type(g, delta), copy=True)


def _zero_for(delta: Any, out: Any, a: Any, ref: Any) -> np.ndarray:
    return np.zeros(np.shape(ref), dtype=np.result_type(getattr(ref, "dtype", np.float64), 1.0))


def _broadcast_like(a: np.ndarray, ref: Any) -> np.ndarray:
    shape = np.shape(ref)
    a = np.asarray(a)
    if a.shape == shape and a.dtype.kind == "f":  # the common case: nothing to do (values are never written)
        return a
    if np.broadcast_shapes(a.shape, shape) != shape:
        raise ValueError(f"broadcast_like: shape {a.shape} does not broadcast to {shape}")
    return np.broadcast_to(a, shape).astype(np.result_type(a, 1.0), copy=True)


def _broadcast_like_da(delta: np.ndarray, out: Any, a: np.ndarray, ref: Any) -> np.ndarray:
    return sum_to_shape(delta, np.shape(a), np.result_type(a, delta))


def _mul_nt(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a @ np.transpose(b)


def _mul_nt_da(delta: np.ndarray, out: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return delta @ b


def _mul_nt_db(delta: np.ndarray, out: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.transpose(delta) @ a


def _mul_tn(a: Any, b: np.ndarray) -> np.ndarray:
    if isinstance(a, OneHot):
        if b.ndim != 2 or b.shape[0] != a.shape[0]:
            raise ValueError(f"matrix product of one-hot {a.shape}, transposed, with {b.shape}: inner dimensions differ")
        return np.asarray(a.rmatmul_grad(b))  # a scatter-add; dense, as any register value
    return np.transpose(a) @ b


def _mul_tn_da(delta: np.ndarray, out: Any, a: Any, b: np.ndarray) -> np.ndarray:
    return b @ np.transpose(delta)


def _mul_tn_db(delta: np.ndarray, out: Any, a: Any, b: np.ndarray) -> np.ndarray:
    return a.matmul(delta) if isinstance(a, OneHot) else a @ delta


def _column(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v)
    if v.ndim != 1:
        raise ValueError(f"column needs a vector (one value per row), got shape {v.shape}")
    return v[:, None]


def _column_back(delta: np.ndarray, out: Any, v: np.ndarray) -> np.ndarray:
    return np.asarray(delta)[:, 0]


def _uncolumn(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m)
    if m.ndim != 2 or m.shape[1] != 1:
        raise ValueError(f"uncolumn needs an (n, 1) column, got shape {m.shape}")
    return m[:, 0]


def _uncolumn_back(delta: np.ndarray, out: Any, m: np.ndarray) -> np.ndarray:
    return np.asarray(delta)[:, None]


def _spread(d: Any, ref: Any) -> np.ndarray:
    d = np.asarray(d)
    if d.ndim != 0:
        raise ValueError(f"spread needs a scalar (the gradient of a mean), got shape {d.shape}")
    n = max(int(np.prod(np.shape(ref))), 1)
    return np.full(np.shape(ref), d / n, dtype=np.result_type(d, getattr(ref, "dtype", d.dtype), 1.0))


def _spread_dd(delta: np.ndarray, out: Any, d: Any, ref: Any) -> np.ndarray:
    return np.asarray(np.mean(delta), dtype=np.result_type(d, delta))


SHAPE_OPS = (
    Op("rowsum", 1, _rowsum, (_rowsum_back,), formula="sum over the last axis, kept as size 1",
       derivative_formulas=("delta, broadcast along the last axis",), backward_reads=((False,), (False,)),
       doc="row sums as an (n, 1) column (sum over the last axis, keepdims)"),
    Op("sum_like", 2, _sum_like, (_sum_like_dg, _zero_for), formula="g summed to ref's shape (numpy broadcasting undone)",
       derivative_formulas=("delta, broadcast to g's shape", "0 (ref lends its shape)"),
       backward_reads=((False,), (False, False)), doc="sum g back to the shape of ref, which broadcast to g"),
    Op("broadcast_like", 2, _broadcast_like, (_broadcast_like_da, _zero_for), formula="a broadcast to ref's shape",
       derivative_formulas=("delta summed to a's shape", "0 (ref lends its shape)"),
       backward_reads=((False,), (False, False)), doc="broadcast a to the shape of ref"),
    Op("mul_nt", 2, _mul_nt, (_mul_nt_da, _mul_nt_db), formula="a @ b.T",
       derivative_formulas=("delta @ b", "delta.T @ a"), backward_reads=((False,), (True, True)),
       doc="matrix product with the right operand transposed (a product's input gradient)"),
    Op("mul_tn", 2, _mul_tn, (_mul_tn_da, _mul_tn_db), onehot_inputs=(0,), formula="a.T @ b (scatter-add for one-hot a)",
       derivative_formulas=("b @ delta.T", "a @ delta (a gather for one-hot a)"), backward_reads=((False,), (True, True)),
       doc="matrix product with the left operand transposed (a product's weight gradient)"),
    Op("column", 1, _column, (_column_back,), formula="v[:, None]", derivative_formulas=("delta[:, 0]",),
       backward_reads=((False,), (False,)), doc="a per-row vector as an (n, 1) column"),
    Op("uncolumn", 1, _uncolumn, (_uncolumn_back,), formula="m[:, 0]", derivative_formulas=("delta[:, None]",),
       backward_reads=((False,), (False,)), doc="an (n, 1) column as a per-row vector"),
    Op("spread", 2, _spread, (_spread_dd, _zero_for), formula="d / size(ref), in ref's shape",
       derivative_formulas=("mean(delta)", "0 (ref lends its shape)"), backward_reads=((False,), (False, False)),
       doc="a scalar spread evenly over ref's shape (the gradient of a mean)"),
)
for _op in SHAPE_OPS:
    if _op.name not in OPS:
        register(_op)
