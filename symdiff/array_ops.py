"""Ops with static arguments: axis reductions, reshaping, concatenation, indexing, ``where``.

``f.sum(x, axis=1, keepdims=True)``, ``x[1:, [0, 0, 2]]``, ``f.concat([a, b], axis=0)``:
the static arguments (axes, shapes, indices) are part of the op, not graph inputs.
They are checked when the graph is built (a float axis, a register as a shape, a
boolean index fail there) and each distinct set of them makes one op on demand,
named by its arguments (``sum[axis=1, keepdims=True]``, ``getitem[1:, [0, 0, 2]]``)
and found by name like any op (:data:`symdiff.registry.INSTANCES`). The default
forms keep their plain names (``sum``, ``mean``, ``softMax``, ``transpose``).
What can only be checked against values (an axis out of range, a reshape to the
wrong size, an index out of bounds) fails when the step runs, and the compiler names
the step, the op and the input shapes.

Semantics are NumPy's. Gradients: a reduction's is its cotangent broadcast back;
``max`` splits it equally between tied maxima; indexing's is a scatter-add that
counts repeated indices; ``where`` sends none to its mask.

Every op here also has a graph pullback and forward rule (:data:`PULLBACKS`,
:data:`PUSHFORWARDS`, keyed by family) built only from ops that have them in
turn (``sum``'s pullback is ``expand``, whose pullback is ``sum``; ``getitem``'s
is ``scatter``, whose pullback is ``getitem``), for gradients as graphs
(:mod:`symdiff.differential`). Numpy only: no SymPy here.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import numpy as np

from .errors import GraphError
from .registry import FAMILIES, OPS, Op, instance, register, sum_to_shape


# --------------------------------------------------------------------------------------
# static arguments: checked when the graph is built
# --------------------------------------------------------------------------------------
def _is_register(value: Any) -> bool:
    return type(value).__name__ == "Register"


def _int(value: Any, what: str) -> int:
    if _is_register(value):
        raise GraphError(f"{what} must be a number known when the graph is built, not a register ({value!r})")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise GraphError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _axis(value: Any, what: str, *, tuples: bool = True, none: bool = True) -> int | tuple[int, ...] | None:
    """A checked axis argument: an int, (if ``tuples``) a tuple of distinct ints, (if ``none``) None."""
    if value is None and none:
        return None
    if tuples and isinstance(value, (tuple, list)):
        axes = tuple(_int(a, f"{what}: each axis") for a in value)
        if len(set(axes)) != len(axes):
            raise GraphError(f"{what}: axis={value!r} repeats an axis")
        return axes
    kinds = "an int" + (", a tuple of ints" if tuples else "") + (" or None" if none else "")
    if _is_register(value) or isinstance(value, (bool, np.bool_)) \
            or not isinstance(value, (numbers.Integral, np.integer)):
        raise GraphError(f"{what}: axis must be {kinds}, got {value!r} ({type(value).__name__})")
    return int(value)


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise GraphError(f"{what} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def _registers(parts: Any, what: str) -> list[Any]:
    if _is_register(parts) or not isinstance(parts, (list, tuple)) or not parts:
        raise GraphError(f"{what} takes a non-empty list of registers, e.g. {what}([a, b], axis=0)")
    for k, p in enumerate(parts):
        if not _is_register(p):
            raise GraphError(f"{what}: item {k} of the list is a {type(p).__name__}, not a register")
    return list(parts)


def _text(value: Any) -> str:
    """A static argument as it reads in an op name (arrays short, with a digest when long)."""
    if isinstance(value, np.ndarray):
        if value.size <= 8:
            return str(value.tolist()).replace(" ", "")
        import zlib

        return f"int{list(value.shape)}#{zlib.crc32(value.tobytes()) & 0xffffff:06x}"
    if isinstance(value, slice):
        parts = ["" if v is None else str(v) for v in (value.start, value.stop, value.step)]
        return ":".join(parts[:2]) + (f":{parts[2]}" if value.step is not None else "")
    if value is Ellipsis:
        return "..."
    if value is None:
        return "None"
    return str(value).replace(" ", "")


def _name(family: str, static: Sequence[tuple[str, Any]]) -> str:
    return f"{family}[{', '.join(f'{k}={_text(v)}' for k, v in static)}]"


def _made(family: str, static: Sequence[tuple[str, Any]], build: Callable[[str], Op], default: bool = False) -> Op:
    """The op for ``family`` with these static arguments, made once. With ``default`` (the
    arguments are the family's defaults) it is the primitive registered under the family's own
    name (``f.sum(x)`` is ``sum``, ``f.mean(x)`` the seed's ``mean``), registered on first use."""
    if default:
        op = OPS.get(family)
        return op if op is not None else register(build(family))
    name = _name(family, static)
    return instance(name, lambda: build(name))


# --------------------------------------------------------------------------------------
# helpers for kernels
# --------------------------------------------------------------------------------------
def _axes(axis: Any, ndim: int, what: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``axis`` (None, an int or a tuple) as non-negative axes of an ``ndim``-dimensional input."""
    if axis is None:
        return tuple(range(ndim))
    out = []
    for a in (axis if isinstance(axis, tuple) else (axis,)):
        if not -ndim <= a < ndim:
            raise ValueError(f"{what}: axis {a} is out of range for an input of shape {shape} "
                             f"({ndim} dimension{'s' if ndim != 1 else ''})")
        out.append(a % ndim)
    return tuple(out)


def _kept(value: Any, shape: tuple[int, ...], axis: Any, keepdims: bool, what: str) -> np.ndarray:
    """A reduction's result (or cotangent) with the reduced axes back as size 1: broadcasts to ``shape``."""
    value = np.asarray(value)
    if keepdims:
        return value
    return np.expand_dims(value, _axes(axis, len(shape), what, shape))


def _full(value: np.ndarray, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``value`` broadcast to ``shape``, as a writable array of its own (gradients may be updated in place)."""
    return np.broadcast_to(value, shape).astype(dtype, copy=True)


def _count(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


# --------------------------------------------------------------------------------------
# reductions: sum, mean, max, logsumexp; expand (their adjoint)
# --------------------------------------------------------------------------------------
def _reduction_statics(family: str, axis: Any, keepdims: Any) -> tuple[tuple[str, Any], ...]:
    return (("axis", _axis(axis, f"f.{family}")), ("keepdims", _bool(keepdims, f"f.{family}: keepdims")))


def sum_op(axis: Any = None, keepdims: bool = False) -> Op:
    """``sum`` over ``axis`` (None: every axis), NumPy's ``np.sum``."""
    static = _reduction_statics("sum", axis, keepdims)
    axis, keepdims = static[0][1], static[1][1]
    what = _name("sum", static)

    def build(name: str) -> Op:
        def forward(a: Any) -> np.ndarray:
            _axes(axis, np.ndim(a), what, np.shape(a))
            return np.asarray(np.sum(a, axis=axis, keepdims=keepdims))

        def backward(delta: Any, out: Any, a: Any) -> np.ndarray:
            shape = np.shape(a)
            return _full(_kept(delta, shape, axis, keepdims, what), shape, np.result_type(a, delta))

        return Op(name, 1, forward, (backward,), formula=f"np.sum(a, axis={axis}, keepdims={keepdims})",
                  derivative_formulas=("delta broadcast back over the summed axes",),
                  backward_reads=((False,), (False,)), doc="sum over axes (NumPy's np.sum)",
                  family="sum", static=static)

    return _made("sum", static, build, (axis, keepdims) == (None, False))


def mean_op(axis: Any = None, keepdims: bool = False) -> Op:
    """``mean`` over ``axis``; ``f.mean(x)`` is the seed's op of that name."""
    static = _reduction_statics("mean", axis, keepdims)
    axis, keepdims = static[0][1], static[1][1]
    what = _name("mean", static)

    def build(name: str) -> Op:
        def forward(a: Any) -> np.ndarray:
            shape = np.shape(a)
            if _count(shape, _axes(axis, len(shape), what, shape)) == 0:
                raise ValueError(f"{what}: the mean of no elements (input shape {shape}) is undefined")
            return np.asarray(np.mean(a, axis=axis, keepdims=keepdims))

        def backward(delta: Any, out: Any, a: Any) -> np.ndarray:
            shape = np.shape(a)
            n = _count(shape, _axes(axis, len(shape), what, shape))
            return _full(_kept(delta, shape, axis, keepdims, what) / n, shape, np.result_type(a, delta))

        return Op(name, 1, forward, (backward,), formula=f"np.mean(a, axis={axis}, keepdims={keepdims})",
                  derivative_formulas=("delta / count, broadcast back over the averaged axes",),
                  backward_reads=((False,), (False,)), doc="mean over axes (NumPy's np.mean)",
                  family="mean", static=static)

    return _made("mean", static, build, (axis, keepdims) == (None, False))


def max_op(axis: Any = None, keepdims: bool = False) -> Op:
    """``max`` over ``axis``. On ties, the maxima share the gradient equally."""
    static = _reduction_statics("max", axis, keepdims)
    axis, keepdims = static[0][1], static[1][1]
    what = _name("max", static)

    def build(name: str) -> Op:
        def forward(a: Any) -> np.ndarray:
            shape = np.shape(a)
            if _count(shape, _axes(axis, len(shape), what, shape)) == 0:
                raise ValueError(f"{what}: the max of no elements (input shape {shape}) is undefined")
            return np.asarray(np.max(a, axis=axis, keepdims=keepdims))

        def backward(delta: Any, out: Any, a: Any) -> np.ndarray:
            # the maximum is the forward's output: reused, not searched for again (an LSTM-max's
            # 64 x 30 x 112 stack made that search most of this backward's time)
            shape = np.shape(a)
            w = max_weights(a, axis, what, peak=_kept(out, shape, axis, keepdims, what))
            return (w * _kept(delta, shape, axis, keepdims, what)).astype(np.result_type(a, delta), copy=False)

        return Op(name, 1, forward, (backward,), formula=f"np.max(a, axis={axis}, keepdims={keepdims})",
                  derivative_formulas=("delta where a is the maximum, split equally between ties",),
                  backward_reads=((True,), (True,)), doc="max over axes; tied maxima share the gradient equally",
                  family="max", static=static)

    return _made("max", static, build, (axis, keepdims) == (None, False))


def max_weights(a: Any, axis: Any, what: str = "max", peak: Any = None) -> np.ndarray:
    """1/(number of ties) where ``a`` is the maximum along ``axis``, 0 elsewhere (max's derivative).

    ``peak``: the maximum along ``axis`` with that axis kept (max's forward output), if known.
    Counted in floats and divided only where maxima tie: a bool sum along an inner axis and a
    division everywhere cost more than the rest together, and 1/1 is exact, so the weights are
    the same as dividing everywhere. A NaN maximum matches nothing: its weights are 0."""
    a = np.asarray(a)
    hit = a == (np.max(a, axis=axis, keepdims=True) if peak is None else peak)
    w = hit.astype(np.result_type(a, 1.0))
    ties = w.sum(axis=axis, keepdims=True)  # small whole numbers: exact in any float
    shared = ties > 1
    if shared.any():
        np.divide(w, ties, out=w, where=shared)
    return w


def max_weights_op(axis: Any) -> Op:
    """``max_weights[axis]``: where the maxima are (ties share); constant almost everywhere."""
    static = (("axis", _axis(axis, "max_weights")),)
    axis = static[0][1]

    def build(name: str) -> Op:
        def backward(delta: Any, out: Any, a: Any) -> np.ndarray:
            return np.zeros(np.shape(a), np.result_type(a, 1.0))

        return Op(name, 1, lambda a: max_weights(a, axis, name), (backward,),
                  formula="(a == max) / number of ties", derivative_formulas=("0 (piecewise constant)",),
                  backward_reads=((False,), (False,)), nondifferentiable=(0,),
                  doc="the weights max's gradient uses", family="max_weights", static=static)

    return _made("max_weights", static, build)


def logsumexp(a: Any, axis: Any, keepdims: bool, what: str = "logsumexp") -> np.ndarray:
    """log(sum(exp(a))) over ``axis``, shifted by the maximum: no overflow, exact -inf for all -inf."""
    a = np.asarray(a)
    shape = a.shape
    _axes(axis, a.ndim, what, shape)
    if a.size == 0:
        with np.errstate(divide="ignore"):
            return np.log(np.sum(np.exp(a), axis=axis, keepdims=keepdims))
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=_axes(axis, a.ndim, what, shape))


def logsumexp_op(axis: Any = None, keepdims: bool = False) -> Op:
    """``logsumexp`` over ``axis``, stable for any input."""
    static = _reduction_statics("logsumexp", axis, keepdims)
    axis, keepdims = static[0][1], static[1][1]
    what = _name("logsumexp", static)

    def build(name: str) -> Op:
        def backward(delta: Any, out: Any, a: Any) -> np.ndarray:
            shape = np.shape(a)
            with np.errstate(invalid="ignore"):
                w = np.exp(a - _kept(out, shape, axis, keepdims, what))
            return (w * _kept(delta, shape, axis, keepdims, what)).astype(np.result_type(a, delta), copy=False)

        return Op(name, 1, lambda a: np.asarray(logsumexp(a, axis, keepdims, what)), (backward,),
                  formula=f"log(sum(exp(a - m), axis={axis})) + m, m the maximum",
                  derivative_formulas=("delta * exp(a - out): the softmax over the axes",),
                  backward_reads=((True,), (True,)), doc="stable log-sum-exp over axes",
                  family="logsumexp", static=static)

    return _made("logsumexp", static, build,
                 (axis, keepdims) == (None, False))


def expand_op(axis: Any, keepdims: bool, mean: bool = False) -> Op:
    """``expand[...]``(d, ref): a reduction's cotangent ``d`` broadcast back to ``ref``'s shape
    (divided by the count for a mean): the adjoint of ``sum``/``mean``, and theirs of it."""
    static = (("axis", _axis(axis, "expand")), ("keepdims", _bool(keepdims, "expand: keepdims")),
              ("mean", _bool(mean, "expand: mean")))
    axis, keepdims, mean = (v for _, v in static)

    def build(name: str) -> Op:
        def forward(d: Any, ref: Any) -> np.ndarray:
            shape = np.shape(ref)
            d = _kept(d, shape, axis, keepdims, name)
            if mean:
                d = d / max(_count(shape, _axes(axis, len(shape), name, shape)), 1)
            return _full(d, shape, np.result_type(d, 1.0))

        def backward_d(delta: Any, out: Any, d: Any, ref: Any) -> np.ndarray:
            reduce = mean_op if mean else sum_op
            return np.asarray(reduce(axis, keepdims).forward(delta)).reshape(np.shape(d))

        def backward_ref(delta: Any, out: Any, d: Any, ref: Any) -> np.ndarray:
            return np.zeros(np.shape(ref), np.result_type(getattr(ref, "dtype", np.float64), 1.0))

        return Op(name, 2, forward, (backward_d, backward_ref), formula="d broadcast to ref's shape over the axes",
                  derivative_formulas=(f"{'mean' if mean else 'sum'} of delta over the axes", "0 (ref lends its shape)"),
                  backward_reads=((False,), (True, False)), nondifferentiable=(1,),
                  doc="a reduction's cotangent broadcast back", family="expand", static=static)

    return _made("expand", static, build)


# --------------------------------------------------------------------------------------
# softmax and log-softmax along one axis
# --------------------------------------------------------------------------------------
def softmax(a: Any, axis: int) -> np.ndarray:
    z = a - np.max(a, axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def softmax_op(axis: Any = -1) -> Op:
    """``softMax`` along ``axis`` (default the last: row-wise for a matrix, the seed's op)."""
    static = (("axis", _axis(axis, "f.softMax", tuples=False, none=False)),)
    axis = static[0][1]

    def build(name: str) -> Op:
        def forward(a: Any) -> np.ndarray:
            _axes(axis, np.ndim(a), name, np.shape(a))
            return softmax(np.asarray(a), axis)

        def backward(delta: Any, p: Any, a: Any) -> np.ndarray:
            return p * (delta - (delta * p).sum(axis=axis, keepdims=True))

        return Op(name, 1, forward, (backward,), formula=f"exp(a - max a) / sum exp(a - max a), along axis {axis}",
                  derivative_formulas=(f"out * (delta - sum(delta * out, axis={axis}))",),
                  backward_reads=((True,), (False,)), doc="softmax along an axis", family="softMax", static=static)

    return _made("softMax", static, build, axis == -1)


def log_softmax_op(axis: Any = -1) -> Op:
    """``log_softmax`` along ``axis``: ``a - logsumexp(a)``, stable."""
    static = (("axis", _axis(axis, "f.log_softmax", tuples=False, none=False)),)
    axis = static[0][1]

    def build(name: str) -> Op:
        def forward(a: Any) -> np.ndarray:
            return a - logsumexp(a, axis, True, name)

        def backward(delta: Any, out: Any, a: Any) -> np.ndarray:
            return delta - np.exp(out) * np.sum(delta, axis=axis, keepdims=True)

        return Op(name, 1, forward, (backward,), formula=f"a - logsumexp(a, axis={axis})",
                  derivative_formulas=(f"delta - exp(out) * sum(delta, axis={axis})",),
                  backward_reads=((True,), (False,)), doc="stable log-softmax along an axis",
                  family="log_softmax", static=static)

    return _made("log_softmax", static, build, axis == -1)


# --------------------------------------------------------------------------------------
# shapes: reshape, reshape_like, transpose
# --------------------------------------------------------------------------------------
def reshape_op(shape: Any) -> Op:
    """``reshape`` to a static shape (one entry may be -1), NumPy's ``np.reshape``."""
    if _is_register(shape):
        raise GraphError("f.reshape: shape must be a tuple of ints known when the graph is built, not a register")
    dims = (shape,) if isinstance(shape, (numbers.Integral, np.integer)) and not isinstance(shape, bool) else shape
    if not isinstance(dims, (tuple, list)):
        raise GraphError(f"f.reshape: shape must be an int or a tuple of ints, got {shape!r} ({type(shape).__name__})")
    dims = tuple(_int(n, "f.reshape: each entry of shape") for n in dims)
    if any(n < -1 for n in dims) or dims.count(-1) > 1:
        raise GraphError(f"f.reshape: shape={dims} may hold sizes >= 0 and at most one -1")
    static = (("shape", dims),)

    def build(name: str) -> Op:
        def forward(a: Any) -> np.ndarray:
            a = np.asarray(a)
            try:
                return a.reshape(dims)
            except ValueError:
                raise ValueError(f"{name}: cannot reshape an input of shape {a.shape} ({a.size} elements) "
                                 f"to shape={dims}") from None

        def backward(delta: Any, out: Any, a: Any) -> np.ndarray:
            return np.reshape(delta, np.shape(a))

        return Op(name, 1, forward, (backward,), formula=f"a.reshape({dims})",
                  derivative_formulas=("delta reshaped to a's shape",), backward_reads=((False,), (False,)),
                  doc="reshape (NumPy's rules, one -1 allowed)", family="reshape", static=static)

    return _made("reshape", static, build)


def _reshape_like(d: Any, ref: Any) -> np.ndarray:
    return np.reshape(d, np.shape(ref))


def _zero_for_ref(delta: Any, out: Any, d: Any, ref: Any) -> np.ndarray:
    return np.zeros(np.shape(ref), np.result_type(getattr(ref, "dtype", np.float64), 1.0))


def transpose_op(axes: Any = None) -> Op:
    """``transpose`` with a permutation of the axes (None: reversed, the seed's 2-D op)."""
    if axes is None:
        return OPS["transpose"]
    if _is_register(axes) or not isinstance(axes, (tuple, list)):
        raise GraphError(f"f.transpose: axes must be a tuple of ints or None, got {axes!r}")
    perm = tuple(_int(a, "f.transpose: each entry of axes") for a in axes)
    static = (("axes", perm),)

    def check(a: Any, name: str) -> tuple[int, ...]:
        n = np.ndim(a)
        if len(perm) != n or sorted(p % n if -n <= p < n else p for p in perm) != list(range(n)):
            raise ValueError(f"{name}: axes={perm} is not a permutation of the {n} axes of an input of shape "
                             f"{np.shape(a)}")
        return tuple(p % n for p in perm)

    def build(name: str) -> Op:
        def backward(delta: Any, out: Any, a: Any) -> np.ndarray:
            return np.transpose(delta, np.argsort(check(a, name)))

        return Op(name, 1, lambda a: np.transpose(a, check(a, name)), (backward,), formula=f"np.transpose(a, {perm})",
                  derivative_formulas=("delta transposed back (the inverse permutation)",),
                  backward_reads=((False,), (False,)), doc="permute axes", family="transpose", static=static)

    return _made("transpose", static, build)


# --------------------------------------------------------------------------------------
# concat, stack
# --------------------------------------------------------------------------------------
def concat_op(k: int, axis: Any = 0) -> Op:
    """``concat`` of ``k`` registers along ``axis``, NumPy's ``np.concatenate``."""
    static = (("k", k), ("axis", _axis(axis, "f.concat", tuples=False, none=False)))
    axis = static[1][1]

    def build(name: str) -> Op:
        def forward(*parts: Any) -> np.ndarray:
            parts = [np.asarray(p) for p in parts]
            nd = parts[0].ndim
            if nd == 0 or any(p.ndim != nd for p in parts):
                raise ValueError(f"{name}: inputs must have the same number (>= 1) of dimensions, got shapes "
                                 f"{[p.shape for p in parts]}")
            return np.concatenate(parts, axis=axis)

        def part(j: int) -> Callable[..., np.ndarray]:
            def backward(delta: Any, out: Any, *parts: Any) -> np.ndarray:
                return concat_piece(delta, axis, j, [np.shape(p) for p in parts])

            return backward

        return Op(name, k, forward, tuple(part(j) for j in range(k)),
                  formula=f"np.concatenate(parts, axis={axis})",
                  derivative_formulas=tuple(f"delta's slice of part {j}" for j in range(k)),
                  backward_reads=((False,), (False,) * k), doc="join along an existing axis",
                  family="concat", static=static)

    return _made("concat", static, build)


def concat_piece(delta: Any, axis: int, j: int, shapes: Sequence[tuple[int, ...]]) -> np.ndarray:
    """Part ``j``'s block of a concatenation's ``delta`` (a view)."""
    delta = np.asarray(delta)
    ax = axis % delta.ndim
    start = sum(s[ax] for s in shapes[:j])
    index = [slice(None)] * delta.ndim
    index[ax] = slice(start, start + shapes[j][ax])
    return delta[tuple(index)]


def concat_part_op(k: int, axis: int, j: int) -> Op:
    """``concat_part[...]``(d, *parts): part j's block of d (a concat's pullback; its own is a concat)."""
    static = (("k", k), ("axis", axis), ("j", j))

    def build(name: str) -> Op:
        def forward(d: Any, *parts: Any) -> np.ndarray:
            return concat_piece(d, axis, j, [np.shape(p) for p in parts])

        def backward_d(delta: Any, out: Any, d: Any, *parts: Any) -> np.ndarray:
            g = np.zeros(np.shape(d), np.result_type(delta, 1.0))
            concat_piece(g, axis, j, [np.shape(p) for p in parts])[...] = delta
            return g

        zeros = tuple(_zero_ref(i) for i in range(k))
        return Op(name, 1 + k, forward, (backward_d, *zeros), formula=f"block {j} of d along axis {axis}",
                  derivative_formulas=("delta placed in block j of zeros",) + ("0 (lends its shape)",) * k,
                  backward_reads=((False,), (False,) * (1 + k)), nondifferentiable=tuple(range(1, k + 1)),
                  doc="one part's block of a concatenation", family="concat_part", static=static)

    return _made("concat_part", static, build)


def _zero_ref(i: int) -> Callable[..., np.ndarray]:
    def backward(delta: Any, out: Any, *xs: Any) -> np.ndarray:
        x = xs[i + 1]
        return np.zeros(np.shape(x), np.result_type(getattr(x, "dtype", np.float64), 1.0))

    return backward


def stack_op(k: int, axis: Any = 0) -> Op:
    """``stack`` of ``k`` same-shaped registers along a new ``axis``, NumPy's ``np.stack``."""
    static = (("k", k), ("axis", _axis(axis, "f.stack", tuples=False, none=False)))
    axis = static[1][1]

    def build(name: str) -> Op:
        def part(j: int) -> Callable[..., np.ndarray]:
            def backward(delta: Any, out: Any, *parts: Any) -> np.ndarray:
                return np.take(delta, j, axis=axis)

            return backward

        return Op(name, k, lambda *parts: np.stack(parts, axis=axis), tuple(part(j) for j in range(k)),
                  formula=f"np.stack(parts, axis={axis})",
                  derivative_formulas=tuple(f"delta taken at {j} along axis {axis}" for j in range(k)),
                  backward_reads=((False,), (False,) * k), doc="join along a new axis",
                  family="stack", static=static)

    return _made("stack", static, build)


def _unstack_index(axis: int, j: int) -> tuple[Any, ...]:
    """The index taking entry ``j`` along ``axis`` of a stack's output (negative axes count from the end)."""
    return (slice(None),) * axis + (j,) if axis >= 0 else (Ellipsis, j) + (slice(None),) * (-axis - 1)


# --------------------------------------------------------------------------------------
# indexing: gather, and its adjoint scatter-add
# --------------------------------------------------------------------------------------
def _index(index: Any) -> tuple[Any, ...]:
    """A checked static index: ints, slices of ints, None, one Ellipsis, integer arrays (read-only copies)."""
    items = index if isinstance(index, tuple) else (index,)
    out: list[Any] = []
    for k, item in enumerate(items):
        where = f"indexing: item {k} of the index ({item!r})"
        if _is_register(item):
            raise GraphError(f"{where} is a register; indices are fixed when the graph is built (ints, slices, "
                            f"None, ..., integer arrays)")
        if item is None or item is Ellipsis:
            out.append(item)
        elif isinstance(item, slice):
            for part in (item.start, item.stop, item.step):
                if part is not None:
                    _int(part, f"{where}: a slice's start, stop and step")
            if item.step == 0:
                raise GraphError(f"{where}: a slice step cannot be zero")
            out.append(slice(*(None if p is None else int(p) for p in (item.start, item.stop, item.step))))
        elif isinstance(item, (bool, np.bool_)):
            raise GraphError(f"{where}: a boolean is not an index; for a mask use f.where(mask, a, b)")
        elif isinstance(item, (numbers.Integral, np.integer)):
            out.append(int(item))
        elif isinstance(item, (list, np.ndarray)):
            arr = np.asarray(item)
            if arr.dtype == bool:
                raise GraphError(f"{where}: boolean masks select a number of elements known only at run time; "
                                f"use f.where(mask, a, b), or integer indices")
            if arr.size and arr.dtype.kind not in "iu":
                raise GraphError(f"{where}: index arrays must hold integers, got dtype {arr.dtype}")
            arr = arr.astype(np.intp)
            arr.flags.writeable = False
            out.append(arr)
        else:
            raise GraphError(f"{where}: indices are ints, slices, None, ... (Ellipsis) or integer arrays, "
                            f"not {type(item).__name__}")
    if sum(i is Ellipsis for i in out) > 1:
        raise GraphError("indexing: an index can hold only one ... (Ellipsis)")
    return tuple(out)


def _index_text(index: tuple[Any, ...]) -> str:
    return ", ".join(_text(i) for i in index)


def getitem_op(index: Any) -> Op:
    """``x[index]``: a gather with NumPy's rules; its gradient a scatter-add counting repeats."""
    index = _index(index)
    gathers = any(isinstance(i, np.ndarray) for i in index)

    def build(name: str) -> Op:
        def backward(delta: Any, out: Any, a: Any) -> np.ndarray:
            return scatter(delta, np.shape(a), index, gathers, np.result_type(a, delta))

        return Op(name, 1, lambda a: np.asarray(a)[index], (backward,), formula=f"a[{_index_text(index)}]",
                  derivative_formulas=("delta scatter-added into zeros of a's shape (repeats add up)",),
                  backward_reads=((False,), (False,)), doc="indexing: ints, slices, None, ..., integer arrays",
                  family="getitem", static=(("index", index),))

    return instance(f"getitem[{_index_text(index)}]", lambda: build(f"getitem[{_index_text(index)}]"))


def scatter(delta: Any, shape: tuple[int, ...], index: tuple[Any, ...], gathers: bool, dtype: Any) -> np.ndarray:
    """Zeros of ``shape`` with ``delta`` added at ``index`` (an element indexed twice gets both)."""
    g = np.zeros(shape, dtype)
    if gathers:
        np.add.at(g, index, delta)
    else:  # basic indexing never repeats an element
        g[index] = delta
    return g


def scatter_op(index: Any) -> Op:
    """``scatter[index]``(d, ref): d added into zeros of ref's shape at ``index`` (getitem's pullback)."""
    index = _index(index)
    gathers = any(isinstance(i, np.ndarray) for i in index)
    text = _index_text(index)

    def build(name: str) -> Op:
        def forward(d: Any, ref: Any) -> np.ndarray:
            return scatter(d, np.shape(ref), index, gathers, np.result_type(d, 1.0))

        def backward_d(delta: Any, out: Any, d: Any, ref: Any) -> np.ndarray:
            return np.asarray(delta)[index]

        return Op(name, 2, forward, (backward_d, _zero_for_ref), formula=f"zeros like ref, d added at [{text}]",
                  derivative_formulas=(f"delta[{text}]", "0 (ref lends its shape)"),
                  backward_reads=((False,), (False, False)), nondifferentiable=(1,),
                  doc="scatter-add (indexing's adjoint)", family="scatter", static=(("index", index),))

    return instance(f"scatter[{text}]", lambda: build(f"scatter[{text}]"))


# --------------------------------------------------------------------------------------
# where, zeros_of, reshape_like: fixed ops
# --------------------------------------------------------------------------------------
def _where(mask: Any, a: Any, b: Any) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"where: the mask must be a boolean array, got dtype {mask.dtype} (shape {mask.shape}); "
                        f"feed e.g. x > 0 computed with numpy")
    return np.where(mask, a, b)


def _where_da(delta: Any, out: Any, mask: Any, a: Any, b: Any) -> np.ndarray:
    return sum_to_shape(np.where(mask, delta, 0), np.shape(a), np.result_type(a, delta))


def _where_db(delta: Any, out: Any, mask: Any, a: Any, b: Any) -> np.ndarray:
    return sum_to_shape(np.where(mask, 0, delta), np.shape(b), np.result_type(b, delta))


def _no_gradient(delta: Any, out: Any, *xs: Any) -> Any:
    raise TypeError("the mask of where gets no gradient")


def _zeros_like(ref: Any) -> np.ndarray:
    return np.zeros(np.shape(ref), np.result_type(getattr(ref, "dtype", np.float64), 1.0))


FIXED = (
    Op("where", 3, _where, (_no_gradient, _where_da, _where_db), formula="np.where(mask, a, b)",
       derivative_formulas=("none (the mask is not differentiated)", "delta where mask, summed to a's shape",
                            "delta where not mask, summed to b's shape"),
       backward_reads=((False,), (True, False, False)), nondifferentiable=(0,),
       doc="a where the boolean mask is true, else b (broadcasting)", family="where"),
    Op("reshape_like", 2, _reshape_like, (lambda d, o, x, ref: np.reshape(d, np.shape(x)), _zero_for_ref),
       formula="d reshaped to ref's shape", derivative_formulas=("delta reshaped to d's shape", "0 (lends its shape)"),
       backward_reads=((False,), (False, False)), nondifferentiable=(1,), doc="reshape to another register's shape",
       family="reshape_like"),
    Op("zeros_of", 1, _zeros_like, (lambda d, o, ref: np.zeros(np.shape(ref), np.result_type(ref, 1.0)),),
       formula="zeros of ref's shape", derivative_formulas=("0",), backward_reads=((False,), (False,)),
       nondifferentiable=(0,), doc="zeros in a register's shape", family="zeros_of"),
)
for _op in FIXED:
    if _op.name not in OPS:
        register(_op)


# --------------------------------------------------------------------------------------
# f.<family>(...): what model code calls
# --------------------------------------------------------------------------------------
def _sum(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """Sum over ``axis`` (None: all), like ``np.sum``."""
    return sum_op(axis, keepdims)(x)


def _mean(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """Mean over ``axis`` (None: all, a scalar: the seed's ``f.mean(x)``), like ``np.mean``."""
    return mean_op(axis, keepdims)(x)


def _max(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """Maximum over ``axis``, like ``np.max``; tied maxima share the gradient equally."""
    return max_op(axis, keepdims)(x)


def _logsumexp(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """``log(sum(exp(x)))`` over ``axis``, computed stably (shifted by the maximum)."""
    return logsumexp_op(axis, keepdims)(x)


def _softmax(x: Any, axis: int = -1) -> Any:
    """Softmax along ``axis`` (default the last: row-wise for a matrix)."""
    return softmax_op(axis)(x)


def _log_softmax(x: Any, axis: int = -1) -> Any:
    """``x - logsumexp(x, axis, keepdims=True)``, stable."""
    return log_softmax_op(axis)(x)


def _reshape(x: Any, shape: Any) -> Any:
    """Reshape to a static ``shape`` (one entry may be -1)."""
    return reshape_op(shape)(x)


def _transpose(x: Any, axes: Any = None) -> Any:
    """Permute the axes (None: reverse them; a matrix's transpose)."""
    return transpose_op(axes)(x)


def _concat(parts: Any, axis: int = 0) -> Any:
    """Join registers along an existing ``axis``, like ``np.concatenate``."""
    parts = _registers(parts, "f.concat")
    return concat_op(len(parts), axis)(*parts)


def _stack(parts: Any, axis: int = 0) -> Any:
    """Join same-shaped registers along a new ``axis``, like ``np.stack``."""
    parts = _registers(parts, "f.stack")
    return stack_op(len(parts), axis)(*parts)


def _getitem(x: Any, index: Any) -> Any:
    """``x[index]`` (what ``Register.__getitem__`` calls)."""
    return getitem_op(index)(x)


FAMILIES.update({"sum": _sum, "mean": _mean, "max": _max, "logsumexp": _logsumexp, "softMax": _softmax,
                 "log_softmax": _log_softmax, "reshape": _reshape, "transpose": _transpose, "concat": _concat,
                 "stack": _stack, "getitem": _getitem})

#: the families' arguments, for ``symdiff ops``
SIGNATURES = {
    "sum": "f.sum(x, axis=None, keepdims=False)", "mean": "f.mean(x, axis=None, keepdims=False)",
    "max": "f.max(x, axis=None, keepdims=False)", "logsumexp": "f.logsumexp(x, axis=None, keepdims=False)",
    "softMax": "f.softMax(x, axis=-1)", "log_softmax": "f.log_softmax(x, axis=-1)",
    "reshape": "f.reshape(x, shape)", "transpose": "f.transpose(x, axes=None)",
    "concat": "f.concat([a, b, ...], axis=0)", "stack": "f.stack([a, b, ...], axis=0)",
    "getitem": "x[i, 1:3, None, ..., [0, 0, 2]]", "where": "f.where(mask, a, b)",
}

# the default forms are primitives of their own (f.sum(x) is `sum`), verified like every registered op
sum_op(), max_op(), logsumexp_op(), log_softmax_op()


# --------------------------------------------------------------------------------------
# graph rules (symdiff.differential): pullbacks (b, delta, out, inputs, needed) -> one register
# (or None) per input, forward rules (b, out, inputs, tangents) -> a register or None; keyed by
# family, every op they build has rules here or among the built-ins in turn
# --------------------------------------------------------------------------------------
def _static(out: Any) -> dict[str, Any]:
    return dict(out.op.static)


def _zeros(b: Any, like: Any) -> Any:
    return b(OPS["zeros_of"], like)


def _tangents(b: Any, ins: Sequence[Any], dots: Sequence[Any]) -> list[Any]:
    """Each input's tangent, zeros in its shape where it has none."""
    return [d if d is not None else _zeros(b, x) for x, d in zip(ins, dots)]


def _pull_reduce(reduce: Callable[..., Op], mean: bool) -> Callable[..., list[Any]]:
    def pull(b: Any, d: Any, out: Any, ins: Sequence[Any], need: Sequence[bool]) -> list[Any]:
        s = _static(out)
        return [b(expand_op(s["axis"], s["keepdims"], mean), d, ins[0])]

    return pull


def _push_reduce(reduce: Callable[..., Op]) -> Callable[..., Any]:
    def push(b: Any, out: Any, ins: Sequence[Any], dots: Sequence[Any]) -> Any:
        s = _static(out)
        return None if dots[0] is None else b(reduce(s["axis"], s["keepdims"]), dots[0])

    return push


def _weighted(b: Any, out: Any, a: Any) -> Any:
    """Where a reduction's gradient goes, per element of its input: max's tie weights, logsumexp's softmax."""
    s = _static(out)
    if out.op.family == "max":
        return b(max_weights_op(s["axis"]), a)
    return b("exp", b("subtract", a, b(expand_op(s["axis"], s["keepdims"]), out, a)))


def _pull_weighted(b: Any, d: Any, out: Any, ins: Sequence[Any], need: Sequence[bool]) -> list[Any]:
    s = _static(out)
    return [b("hadamard", b(expand_op(s["axis"], s["keepdims"]), d, ins[0]), _weighted(b, out, ins[0]))]


def _push_weighted(b: Any, out: Any, ins: Sequence[Any], dots: Sequence[Any]) -> Any:
    s = _static(out)
    if dots[0] is None:
        return None
    return b(sum_op(s["axis"], s["keepdims"]), b("hadamard", _weighted(b, out, ins[0]), dots[0]))


def _pull_expand(b: Any, d: Any, out: Any, ins: Sequence[Any], need: Sequence[bool]) -> list[Any]:
    s = _static(out)
    reduce = mean_op if s["mean"] else sum_op
    return [need[0] and b(reduce(s["axis"], s["keepdims"]), d), None]


def _axis_sum(b: Any, out: Any, x: Any) -> Any:
    return b(sum_op(_static(out).get("axis", -1), True), x)


def _pull_softmax(b: Any, d: Any, out: Any, ins: Sequence[Any], need: Sequence[bool]) -> list[Any]:
    return [b("hadamard", out, b("subtract", d, _axis_sum(b, out, b("hadamard", d, out))))]


def _push_softmax(b: Any, out: Any, ins: Sequence[Any], dots: Sequence[Any]) -> Any:
    if dots[0] is None:
        return None
    return b("hadamard", out, b("subtract", dots[0], _axis_sum(b, out, b("hadamard", out, dots[0]))))


def _softmax_of(b: Any, out: Any, a: Any) -> Any:
    return b(softmax_op(_static(out)["axis"]), a)


def _pull_log_softmax(b: Any, d: Any, out: Any, ins: Sequence[Any], need: Sequence[bool]) -> list[Any]:
    return [b("subtract", d, b("hadamard", _softmax_of(b, out, ins[0]), _axis_sum(b, out, d)))]


def _push_log_softmax(b: Any, out: Any, ins: Sequence[Any], dots: Sequence[Any]) -> Any:
    if dots[0] is None:
        return None
    return b("subtract", dots[0], _axis_sum(b, out, b("hadamard", _softmax_of(b, out, ins[0]), dots[0])))


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    n = len(perm)
    return tuple(int(k) for k in np.argsort([p % n for p in perm]))


def _pull_concat(b: Any, d: Any, out: Any, ins: Sequence[Any], need: Sequence[bool]) -> list[Any]:
    s = _static(out)
    return [need[j] and b(concat_part_op(s["k"], s["axis"], j), d, *ins) for j in range(len(ins))]


def _pull_concat_part(b: Any, d: Any, out: Any, ins: Sequence[Any], need: Sequence[bool]) -> list[Any]:
    s = _static(out)
    parts = [d if i == s["j"] else _zeros(b, p) for i, p in enumerate(ins[1:])]
    return [need[0] and b(concat_op(s["k"], s["axis"]), *parts)] + [None] * s["k"]


def _pull_where(b: Any, d: Any, out: Any, ins: Sequence[Any], need: Sequence[bool]) -> list[Any]:
    mask, a, c = ins
    zero = _zeros(b, d)
    return [None, need[1] and b("sum_like", b(OPS["where"], mask, d, zero), a),
            need[2] and b("sum_like", b(OPS["where"], mask, zero, d), c)]


def _push_where(b: Any, out: Any, ins: Sequence[Any], dots: Sequence[Any]) -> Any:
    if dots[1] is None and dots[2] is None:
        return None
    a, c = _tangents(b, ins[1:], dots[1:])
    return b("broadcast_like", b(OPS["where"], ins[0], a, c), out)


PULLBACKS: dict[str, Callable[..., list[Any]]] = {
    "sum": _pull_reduce(sum_op, False),
    "mean": _pull_reduce(mean_op, True),
    "max": _pull_weighted,
    "logsumexp": _pull_weighted,
    "max_weights": lambda b, d, out, ins, need: [None],
    "expand": _pull_expand,
    "softMax": _pull_softmax,
    "log_softmax": _pull_log_softmax,
    "reshape": lambda b, d, out, ins, need: [b(OPS["reshape_like"], d, ins[0])],
    "reshape_like": lambda b, d, out, ins, need: [need[0] and b(OPS["reshape_like"], d, ins[0]), None],
    "transpose": lambda b, d, out, ins, need: [b(transpose_op(_inverse(_static(out)["axes"])), d)],
    "concat": _pull_concat,
    "concat_part": _pull_concat_part,
    "stack": lambda b, d, out, ins, need: [
        need[j] and b(getitem_op(_unstack_index(_static(out)["axis"], j)), d) for j in range(len(ins))],
    "getitem": lambda b, d, out, ins, need: [b(scatter_op(_static(out)["index"]), d, ins[0])],
    "scatter": lambda b, d, out, ins, need: [need[0] and b(getitem_op(_static(out)["index"]), d), None],
    "where": _pull_where,
    "zeros_of": lambda b, d, out, ins, need: [None],
}

PUSHFORWARDS: dict[str, Callable[..., Any]] = {
    "sum": _push_reduce(sum_op),
    "mean": _push_reduce(mean_op),
    "max": _push_weighted,
    "logsumexp": _push_weighted,
    "max_weights": lambda b, out, ins, dots: None,
    "expand": lambda b, out, ins, dots: None if dots[0] is None else b(out.op, dots[0], ins[1]),
    "softMax": _push_softmax,
    "log_softmax": _push_log_softmax,
    "reshape": lambda b, out, ins, dots: None if dots[0] is None else b(out.op, dots[0]),
    "reshape_like": lambda b, out, ins, dots: None if dots[0] is None else b(out.op, dots[0], ins[1]),
    "transpose": lambda b, out, ins, dots: None if dots[0] is None else b(out.op, dots[0]),
    "concat": lambda b, out, ins, dots: b(out.op, *_tangents(b, ins, dots)),
    "concat_part": lambda b, out, ins, dots: None if dots[0] is None else b(out.op, dots[0], *ins[1:]),
    "stack": lambda b, out, ins, dots: b(out.op, *_tangents(b, ins, dots)),
    "getitem": lambda b, out, ins, dots: None if dots[0] is None else b(out.op, dots[0]),
    "scatter": lambda b, out, ins, dots: None if dots[0] is None else b(out.op, dots[0], ins[1]),
    "where": _push_where,
    "zeros_of": lambda b, out, ins, dots: None,
}
