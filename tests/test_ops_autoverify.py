"""Every registered primitive's derivatives, checked against central differences.

The registry (``symdiff.OPS``) is walked at *collection* time, so every op that
exists by then -- the built-ins and any op a module declared on import -- gets
its own test, with no list of names to keep up to date here. Ops registered
later still are swept up by ``test_ops_registered_after_collection``.

Elementwise ops need at most an input domain (``DOMAINS``/``KINKS``); they are
checked at random points and with broadcasting input shapes. Structural ops
need an input generator in ``INPUTS``; a structural op without one FAILS, so
nothing escapes verification.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import symdiff
from symdiff import Op, defop
from symdiff.gradcheck import check_op
from symdiff.registry import register

#: max relative error of an analytic derivative against central differences (float64)
TOL = 1e-6
#: elementwise ops whose inputs must stay in a sub-domain of the default [-2, 2]
DOMAINS: dict[str, tuple[float, float]] = {"log": (0.1, 3.0), "divide": (0.5, 2.0)}
#: elementwise ops with a kink at 0: inputs are kept at least this far from it
KINKS: dict[str, float] = {"relu": 1e-3}
UNARY_SHAPES = [((5, 3),), ((4,),)]
BINARY_SHAPES = [((5, 3), (3,)), ((5, 3), (5, 1)), ((4,), (4,))]
N_POINTS = 3  # random points per shape combination


def _uniform(rng: np.random.Generator, shape, low: float = -2.0, high: float = 2.0, kink: float | None = None):
    x = rng.uniform(low, high, size=shape)
    if kink is not None:
        while (bad := np.abs(x) < kink).any():
            x[bad] = rng.uniform(low, high, size=int(bad.sum()))
    return x


def _probabilities(rng, n, k):
    z = rng.standard_normal((n, k))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _one_hot_targets(rng, n, k):
    return np.eye(k)[rng.integers(0, k, size=n)]


def _soft_targets(rng, n, k):
    return _probabilities(rng, n, k)


#: structural ops: a list of input tuples per op (values matter: crossEnt needs probabilities and targets)
INPUTS = {
    "mul": lambda rng: [(_uniform(rng, (4, 3)), _uniform(rng, (3, 5))),
                        (_uniform(rng, (1, 3)), _uniform(rng, (3, 1)))],
    "softMax": lambda rng: [(rng.normal(0, 3, (4, 5)),), (rng.normal(0, 3, (1, 3)),)],
    "crossEnt": lambda rng: [(_probabilities(rng, 4, 5), _one_hot_targets(rng, 4, 5)),
                             (_probabilities(rng, 3, 4), _soft_targets(rng, 3, 4))],
    "crossEnt-softMax": lambda rng: [(rng.normal(0, 3, (4, 5)), _one_hot_targets(rng, 4, 5)),
                                     (rng.normal(0, 3, (3, 4)), _soft_targets(rng, 3, 4))],
    "mean": lambda rng: [(_uniform(rng, (4, 3)),), (_uniform(rng, (7,)),)],
    "transpose": lambda rng: [(_uniform(rng, (4, 3)),), (_uniform(rng, (2, 5)),)],
    # ops with static arguments, in their default forms (other arguments: tests/test_array_ops.py)
    "sum": lambda rng: [(_uniform(rng, (4, 3)),), (_uniform(rng, (2, 3, 2)),)],
    "max": lambda rng: [(_uniform(rng, (4, 3)),), (_uniform(rng, (5,)),)],
    "logsumexp": lambda rng: [(rng.normal(0, 3, (4, 3)),), (_uniform(rng, (2, 3, 2)),)],
    "log_softmax": lambda rng: [(rng.normal(0, 3, (4, 5)),), (_uniform(rng, (2, 3, 2)),)],
    "where": lambda rng: [(rng.random((4, 3)) < 0.5, _uniform(rng, (4, 3)), _uniform(rng, (3,))),
                          (rng.random((4, 1)) < 0.5, _uniform(rng, (4, 3)), _uniform(rng, (4, 3)))],
    "reshape_like": lambda rng: [(_uniform(rng, (4, 3)), _uniform(rng, (2, 6))), (_uniform(rng, (6,)), _uniform(rng, (3, 2)))],
    "zeros_of": lambda rng: [(_uniform(rng, (4, 3)),)],
    # the ops gradient graphs are built from (symdiff/shape_ops.py); a reference input lends only its shape
    "rowsum": lambda rng: [(_uniform(rng, (4, 3)),), (_uniform(rng, (2, 1)),)],
    "sum_like": lambda rng: [(_uniform(rng, (4, 3)), _uniform(rng, (3,))), (_uniform(rng, (4, 3)), _uniform(rng, (4, 1))),
                             (_uniform(rng, (2, 3)), _uniform(rng, (2, 3)))],
    "broadcast_like": lambda rng: [(_uniform(rng, (3,)), _uniform(rng, (4, 3))), (_uniform(rng, (4, 1)), _uniform(rng, (4, 3)))],
    "mul_nt": lambda rng: [(_uniform(rng, (4, 3)), _uniform(rng, (5, 3))), (_uniform(rng, (1, 2)), _uniform(rng, (1, 2)))],
    "mul_tn": lambda rng: [(_uniform(rng, (3, 4)), _uniform(rng, (3, 5))), (_uniform(rng, (2, 1)), _uniform(rng, (2, 1)))],
    "column": lambda rng: [(_uniform(rng, (4,)),)],
    "uncolumn": lambda rng: [(_uniform(rng, (4, 1)),)],
    "spread": lambda rng: [(_uniform(rng, ()), _uniform(rng, (4, 3))), (_uniform(rng, ()), _uniform(rng, (5,)))],
}


def input_cases(name: str, op: Op, rng: np.random.Generator) -> list[tuple[np.ndarray, ...]]:
    """Input tuples to check ``op`` at: from ``INPUTS``, or random points for an elementwise op."""
    if name in INPUTS:
        return [tuple(xs) for _ in range(N_POINTS) for xs in INPUTS[name](rng)]
    if not op.elementwise:
        pytest.fail(f"op {name!r} is registered but is not elementwise and has no entry in INPUTS: "
                    f"add an input generator for it to tests/test_ops_autoverify.py")
    low, high = DOMAINS.get(name, (-2.0, 2.0))
    if op.arity == 1:
        shape_sets = UNARY_SHAPES
    elif op.arity == 2:
        shape_sets = BINARY_SHAPES
    else:
        shape_sets = [((5, 3), (3,)) + ((5, 1),) * (op.arity - 2), ((4,),) * op.arity]
    return [tuple(_uniform(rng, s, low, high, KINKS.get(name)) for s in shapes)
            for shapes in shape_sets for _ in range(N_POINTS)]


def verify_op(name: str) -> None:
    """Check every backward kernel of the registered op ``name`` against central differences."""
    op = symdiff.OPS[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for xs in input_cases(name, op, rng):
        if op.elementwise:
            out = op.forward(*xs)
            expected = np.broadcast_shapes(*(x.shape for x in xs))
            assert np.shape(out) == expected, f"{name}: output shape {np.shape(out)}, inputs broadcast to {expected}"
        err = check_op(op, rng=rng, inputs=xs)
        assert err < TOL, (f"{name}: backward disagrees with central differences at inputs of shapes "
                           f"{[x.shape for x in xs]}: max relative error {err:.3e}")
        check_backward_reads(op, xs, rng)


def _stand_in(a, read: bool):
    """What a training loop leaves of a value backward does not read: its shape and dtype only."""
    a = np.asarray(a)
    return a if read else np.broadcast_to(np.zeros((), a.dtype), a.shape)


def check_backward_reads(op: Op, xs, rng) -> None:
    """``op.backward_reads`` must name every value the backward kernels read: training releases the rest."""
    if op.backward_reads is None:  # reads everything: nothing is released
        return
    (reads_out,), reads_in = op.backward_reads
    out = np.asarray(op.forward(*xs))
    delta = rng.normal(size=out.shape)
    for j, bp in enumerate(op.backward):
        if j in op.nondifferentiable:
            continue
        want = bp(delta, out, *xs)
        got = bp(delta, _stand_in(out, reads_out), *[_stand_in(x, r) for x, r in zip(xs, reads_in)])
        np.testing.assert_array_equal(got, want, err_msg=f"{op.name}: backward_reads {op.backward_reads} "
                                                         f"leaves out a value derivative {j} reads")


COLLECTED = sorted(symdiff.OPS)


@pytest.mark.parametrize("name", COLLECTED)
def test_derivatives_match_central_differences(name):
    verify_op(name)


def test_builtin_ops_are_all_collected():
    builtin = {"add", "subtract", "hadamard", "relu", "sigmoid", "tanh", "exp", "log", "square", "negate",
               "mul", "softMax", "crossEnt", "crossEnt-softMax", "mean", "transpose",
               "sum", "rowsum", "sum_like", "broadcast_like", "mul_nt", "mul_tn", "column", "uncolumn", "spread"}
    assert builtin <= set(COLLECTED)


def ops_not_collected() -> list[str]:
    """Registered ops the parametrized test was not generated for.

    Every module of the project is imported first, so an op that any of them declares on import
    (or later than this file's collection) is in the registry by now.
    """
    import importlib
    import pkgutil

    for package in ("symdiff", "models"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
            importlib.import_module(info.name)
    return sorted(set(symdiff.OPS) - set(COLLECTED))


def test_ops_registered_after_collection_are_verified_too():
    for name in ops_not_collected():
        verify_op(name)


def test_an_op_registered_after_collection_is_found_and_checked():
    """The sweep above is empty while every op is declared before collection; this shows it would
    catch one that is not (the registry fixture in conftest.py removes it again afterwards)."""
    late = Op("autoverify_late_wrong", 1, np.sin, (lambda delta, out, x: delta * np.sin(x),), elementwise=True)
    register(late)
    assert "autoverify_late_wrong" in ops_not_collected()
    with pytest.raises(AssertionError, match="autoverify_late_wrong"):
        test_ops_registered_after_collection_are_verified_too()


def test_an_op_declared_in_a_test_is_picked_up_by_the_same_checker():
    x, y = sp.symbols("x y")
    op = defop("autoverify_fresh_op", sp.atan(x) * y + sp.exp(-x**2) * sp.cos(y), args=[x, y])
    assert symdiff.OPS["autoverify_fresh_op"] is op
    verify_op("autoverify_fresh_op")  # broadcast shapes, random points, exactly as the parametrized test


def test_a_declared_op_with_a_compound_condition_broadcasts():
    x, y = sp.symbols("x y")
    defop("autoverify_both_positive", sp.Piecewise((x * y, (x > 0) & (y > 0)), (0, True)), args=[x, y])
    verify_op("autoverify_both_positive")  # (5, 3) with (3,) and (5, 1): the condition must broadcast too


def test_checker_fails_on_a_wrong_derivative():
    wrong = Op("autoverify_wrong_square", 1, np.square, (lambda delta, out, x: delta * x,), elementwise=True)
    register(wrong, replace=True)
    with pytest.raises(AssertionError, match="autoverify_wrong_square"):
        verify_op("autoverify_wrong_square")


def test_checker_fails_on_a_wrong_broadcast_reduction():
    # right derivative, but the gradient of the broadcast input is not summed back to its shape
    wrong = Op("autoverify_wrong_add", 2, np.add, (lambda d, o, a, b: d, lambda d, o, a, b: d), elementwise=True)
    register(wrong, replace=True)
    with pytest.raises(AssertionError, match="shape"):
        verify_op("autoverify_wrong_add")


def test_checker_fails_on_backward_reads_that_leave_out_a_value():
    from dataclasses import replace

    square = symdiff.OPS["square"]  # 2*delta*x reads x
    assert square.backward_reads == ((False,), (True,))
    lying = replace(square, backward_reads=((False,), (False,)))
    rng = np.random.default_rng(0)
    with pytest.raises(AssertionError, match="leaves out a value"):
        check_backward_reads(lying, (rng.uniform(1, 2, (3, 2)),), rng)


def test_structural_op_without_an_input_generator_fails():
    lonely = Op("autoverify_rowsum", 1, lambda a: a.sum(axis=1), (lambda d, o, a: np.repeat(d[:, None], a.shape[1], 1),))
    register(lonely, replace=True)
    with pytest.raises(pytest.fail.Exception, match="add an input generator"):
        verify_op("autoverify_rowsum")


# --------------------------------------------------------------------------------------
# Properties of SymPy-derived kernels: shapes and dtypes
# --------------------------------------------------------------------------------------
x, y = sp.symbols("x y")
UNARY_PARTS = [
    lambda u: u, sp.tanh, sp.sin, lambda u: u**2, lambda u: 3 * u, sp.Abs,
    lambda u: sp.Max(u, 0), lambda u: sp.Max(u, u / 10),                # relu, leaky relu
    lambda u: 1 / (1 + sp.exp(-u)), lambda u: sp.log(1 + sp.exp(u)),  # rewritten to sigmoid, softplus
    lambda u: sp.exp(-u**2), lambda u: sp.Piecewise((1, u > 0), (0, True)),  # a step: integer choices
    lambda u: sp.Integer(2),                                            # a constant
]
COMBINE = [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b,
           lambda a, b: a, lambda a, b: b]  # the last two ignore one argument
_declared: dict[tuple, Op] = {}


def _op_for(arity: int, outer: int, left: int, right: int, comb: int) -> Op:
    key = (arity, outer, left, right, comb)
    if key not in _declared:
        if arity == 1:
            expr, args = UNARY_PARTS[outer](UNARY_PARTS[left](x)), [x]
        else:
            expr = UNARY_PARTS[outer](COMBINE[comb](UNARY_PARTS[left](x), UNARY_PARTS[right](y)))
            args = [x, y]
        _declared[key] = defop("hyp_op_" + "_".join(map(str, key)), expr, args=args, replace=True)
    return _declared[key]


part = st.integers(0, len(UNARY_PARTS) - 1)
dtypes = st.sampled_from([np.float64, np.float32])


def _check_kernels(op: Op, xs: list[np.ndarray], dtype) -> None:
    out = op.forward(*xs)
    shape = np.broadcast_shapes(*(x.shape for x in xs))
    assert np.shape(out) == shape, f"{op.doc}: forward shape {np.shape(out)} for inputs {[x.shape for x in xs]}"
    assert out.dtype == dtype, f"{op.doc}: forward dtype {out.dtype} for {np.dtype(dtype)} inputs"
    delta = np.ones(shape, dtype)
    for j, xj in enumerate(xs):
        g = op.backward[j](delta, out, *xs)
        assert isinstance(g, (np.ndarray, np.generic)), f"{op.doc}: d/d input {j} is a {type(g).__name__}"
        assert g.shape == xj.shape, f"{op.doc}: d/d input {j} has shape {g.shape}, input {xj.shape}"
        assert g.dtype == dtype, f"{op.doc}: d/d input {j} has dtype {g.dtype}, input {np.dtype(dtype)}"


_PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_PROPERTY
@given(outer=part, inner=part, shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), dtype=dtypes,
       seed=st.integers(0, 2**32 - 1))
def test_unary_kernels_keep_shape_and_dtype(outer, inner, shape, dtype, seed):
    op = _op_for(1, outer, inner, 0, 0)
    xs = [np.asarray(np.random.default_rng(seed).uniform(-2, 2, size=shape), dtype=dtype)]
    _check_kernels(op, xs, dtype)


@_PROPERTY
@given(outer=part, left=part, right=part, comb=st.integers(0, len(COMBINE) - 1),
       shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4),
       dtype=dtypes, seed=st.integers(0, 2**32 - 1))
def test_binary_kernels_keep_shape_and_dtype(outer, left, right, comb, shapes, dtype, seed):
    op = _op_for(2, outer, left, right, comb)
    rng = np.random.default_rng(seed)
    xs = [np.asarray(rng.uniform(-2, 2, size=s), dtype=dtype) for s in shapes.input_shapes]
    _check_kernels(op, xs, dtype)


@_PROPERTY
@given(name=st.sampled_from(sorted(n for n in COLLECTED if symdiff.OPS[n].elementwise)),
       shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4),
       dtype=dtypes, seed=st.integers(0, 2**32 - 1))
def test_registered_elementwise_kernels_keep_shape_and_dtype(name, shapes, dtype, seed):
    op = symdiff.OPS[name]
    low, high = DOMAINS.get(name, (-2.0, 2.0))
    rng = np.random.default_rng(seed)
    xs = [np.asarray(rng.uniform(low, high, size=s), dtype=dtype) for s in shapes.input_shapes[:op.arity]]
    _check_kernels(op, xs, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shapes", [((5, 3), (3,)), ((5, 3), (5, 1)), ((4,), (4,)), ((3,), (2, 3)), ((), (2, 2)),
                                    ((2, 2), ()), ((), ())])
@pytest.mark.parametrize("which", ["add", "subtract", "three_x", "three_x_ignoring_y", "constant"])
def test_constant_derivatives_still_return_full_arrays(which, shapes, dtype):
    if which in ("add", "subtract"):
        op = symdiff.OPS[which]
    else:
        expr = {"three_x": 3 * x, "three_x_ignoring_y": 3 * x, "constant": sp.Integer(7)}[which]
        args = [x] if which == "three_x" else [x, y]
        op = defop(f"autoverify_{which}", expr, args=args)
    rng = np.random.default_rng(0)
    xs = [np.asarray(rng.uniform(-2, 2, size=s), dtype=dtype) for s in shapes[:op.arity]]
    _check_kernels(op, xs, dtype)
    out = op.forward(*xs)
    delta = np.asarray(rng.standard_normal(np.shape(out)), dtype=dtype)
    expected = {"add": (1, 1), "subtract": (1, -1), "three_x": (3,), "three_x_ignoring_y": (3, 0), "constant": (0, 0)}
    for j, (xj, c) in enumerate(zip(xs, expected[which])):
        g = op.backward[j](delta, out, *xs)
        # the derivative is the constant c: the gradient is c * delta summed over xj's broadcast axes
        lead = delta.ndim - xj.ndim
        want = (c * delta).sum(axis=tuple(range(lead))) if lead else c * delta
        want = want.sum(axis=tuple(i for i, n in enumerate(xj.shape) if n == 1), keepdims=True) if xj.ndim else want
        np.testing.assert_allclose(g, np.broadcast_to(want, xj.shape), rtol=1e-6, atol=1e-6)
        assert not any(np.shares_memory(g, xi) for xi in xs), "a gradient must not alias an input"


@pytest.mark.parametrize("k", range(len(UNARY_PARTS)))
def test_every_part_of_the_property_grammar_declares(k):
    assert _op_for(1, k, 0, 0, 0).arity == 1 and _op_for(2, 0, k, k, 2).arity == 2
