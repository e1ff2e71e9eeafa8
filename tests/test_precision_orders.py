"""Derivatives of order 1-3 of every built-in elementwise op (and some user ops) against mpmath.

Issue #13, point 5: on a grid with 0, ±1e-8, ±1, ±20, ±37.5, ±40 and ±700 (where
the function is defined), each derivative evaluated by the engine -- through
gradient graphs of gradient graphs, with numpy kernels and with compiled fused
kernels -- has relative error ≤ 1e-10 wherever the true value is a normal
float64, and is never 0, NaN or ±inf there. The truth is SymPy's derivative of
the *declared* (unstabilised) expression, evaluated by mpmath with 400 digits:
the raw forms cancel badly at ±700, where 50 digits would not be enough.
"""
from __future__ import annotations

import itertools

import mpmath
import numpy as np
import pytest
import sympy as sp

import symdiff
from symdiff import Autograd, XMan, defop, f
from symdiff import native
from symdiff.differential import grad, wengert_for

GRID = np.array([0.0, 1e-8, -1e-8, 1.0, -1.0, 20.0, -20.0, 37.5, -37.5, 40.0, -40.0, 700.0, -700.0])
TINY = np.finfo(np.float64).tiny
BUILTIN_ELEMENTWISE = ["add", "subtract", "hadamard", "relu", "sigmoid", "tanh", "exp", "log", "square", "negate"]
x_, y_ = sp.symbols("x y")
USER_OPS = {  # declared naively, as a user would: the engine must make them stable
    "prec_softplus": sp.log(1 + sp.exp(x_)),
    "prec_log_sigmoid": sp.log(1 / (1 + sp.exp(-x_))),
    "prec_swish": x_ / (1 + sp.exp(-x_)),
}


def _domain(name: str, x: np.ndarray) -> np.ndarray:
    return x[x > 0] if name == "log" else x


def _points(op_name: str, arity: int) -> list[np.ndarray]:
    """Each argument's values: the grid for x, and for y the grid reversed (so every pair differs)."""
    x = _domain(op_name, GRID)
    return [x] if arity == 1 else [x, x[::-1].copy()]


def _engine_derivatives(op, points: list[np.ndarray], order: int, *, tile: int = 1,
                        native_on: bool = False) -> dict[tuple[int, ...], np.ndarray]:
    """Every derivative of ``op`` up to ``order`` (by sorted argument index), through nested ``grad`` graphs."""
    names = [f"a{j}" for j in range(op.arity)]
    xm = XMan()
    args = [f.param(name=n, default=np.tile(p, tile)) for n, p in zip(names, points)]
    xm.s0 = f.sum(op(*args))
    xm.setup()
    results: dict[tuple[int, ...], np.ndarray] = {}
    frontier = {(): (xm, "s0")}  # derivative index -> (graph, scalar whose gradient gives the next order)
    for k in range(1, order + 1):
        nxt = {}
        for index, (gm, of) in frontier.items():
            prefix = f"d{k}_{''.join(map(str, index))}_"
            gx = grad(gm, of, names, prefix=prefix)
            values = Autograd(gx, native=native_on).eval(wengert_for(gx, [prefix + n for n in names]), gx.inputDict())
            for j, n in enumerate(names):
                new = tuple(sorted(index + (j,)))
                if new in results:
                    continue
                results[new] = np.asarray(values[prefix + n])[:len(points[0])]
                if k < order:
                    setattr(gx, f"s_{prefix}{n}", f.sum(gx.register(prefix + n)))
                    gx.setup()
                    nxt[new] = (gx, f"s_{prefix}{n}")
        frontier = nxt
    return results


def _truth(op, index: tuple[int, ...], point: tuple[float, ...]) -> mpmath.mpf | None:
    """The exact derivative at ``point`` (None where it is not defined)."""
    sym = op.symbolic
    if op.name == "relu":
        x = point[0]
        if x == 0:
            return None  # a kink: no derivative; the engine's convention is tested on its own
        return mpmath.mpf(1 if x > 0 else 0) if len(index) == 1 else mpmath.mpf(0)
    expr = sym.declared
    for j in index:
        expr = sp.diff(expr, sym.args[j])
    fn = sp.lambdify(sym.args, expr, "mpmath")
    with mpmath.workdps(400):
        value = fn(*[mpmath.mpf(float(p)) for p in point])
        return mpmath.mpf(value) if mpmath.isfinite(value) else None


def _check(op, got: dict[tuple[int, ...], np.ndarray], points: list[np.ndarray]) -> list[str]:
    bad = []
    for index, values in got.items():
        for i in range(len(points[0])):
            point = tuple(float(p[i]) for p in points)
            truth = _truth(op, index, point)
            if truth is None:
                continue
            t = float(truth)
            v = float(values[i])
            label = f"{op.name} d{len(index)}/{'·'.join('d' + 'xy'[j] for j in index)} at {point}"
            if np.isfinite(t) and abs(t) >= TINY:
                if not np.isfinite(v) or v == 0:
                    bad.append(f"{label}: engine {v!r}, truth {t!r}")
                elif abs(v - t) > 1e-10 * abs(t):
                    bad.append(f"{label}: engine {v!r}, truth {t!r}, rel err {abs(v - t) / abs(t):.1e}")
            elif np.isnan(v):
                bad.append(f"{label}: engine NaN, truth {t!r}")
    return bad


def _op(name: str):
    if name in USER_OPS:
        return defop(name, USER_OPS[name], args=[x_])
    return symdiff.OPS[name]


@pytest.mark.parametrize("name", BUILTIN_ELEMENTWISE + sorted(USER_OPS))
def test_derivatives_to_order_three_match_mpmath(name):
    op = _op(name)
    points = _points(name, op.arity)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # and without a numpy warning on the way
        got = _engine_derivatives(op, points, 3)
    assert len(got) == sum(1 for k in (1, 2, 3) for _ in itertools.combinations_with_replacement(range(op.arity), k))
    bad = _check(op, got, points)
    assert not bad, "\n".join(bad[:20])


@pytest.mark.skipif(not native.enabled(), reason=f"compiled kernels unavailable here ({native.status()})")
@pytest.mark.parametrize("name", ["sigmoid", "tanh", "exp", "log", "prec_softplus", "prec_swish"])
def test_compiled_fused_derivatives_match_mpmath_too(name):
    op = _op(name)
    points = _points(name, op.arity)
    tile = -(-2048 // len(points[0]))  # big enough for the compiled kernels to run
    got = _engine_derivatives(op, points, 3, tile=tile, native_on=True)
    bad = _check(op, got, points)
    assert not bad, "\n".join(bad[:20])


def test_the_checker_fails_on_the_cancelling_sigmoid_form():
    """The old first-order form out*(1 - out) is 0 at x = 40: the check must reject it."""
    op = symdiff.OPS["sigmoid"]
    s = 1 / (1 + np.exp(-GRID))
    bad = _check(op, {(0,): s * (1 - s)}, [GRID])
    assert any("at (40.0,)" in b and "engine 0.0" in b for b in bad)


def test_relu_derivative_at_zero_is_zero():
    got = _engine_derivatives(symdiff.OPS["relu"], [np.array([0.0, -0.0])], 3)
    for values in got.values():
        np.testing.assert_array_equal(values, 0.0)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "prec_swish", "prec_softplus"])
def test_the_plain_step_lists_first_derivative_matches_mpmath(name):
    """``bprop`` over the plain op list (``--no-fuse``) runs each op's own backward kernel: σ' and tanh'
    there come from the saved output, with the tails recomputed from the input; on the grid and on a
    dense sweep across where the two forms meet, they must be as precise as the graph derivatives."""
    op = _op(name)
    x = np.concatenate([GRID, np.linspace(-12.0, 12.0, 193)])
    xm = XMan()
    xm.a0 = f.param(name="a0", default=x)
    xm.s0 = f.sum(op(xm.a0))
    xm.setup()
    ad = Autograd(xm, passes=(), fuse=False, native=False)
    w = xm.operationSequence(xm.s0)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        g = ad.bprop(w, ad.eval(w, {"a0": x}), s0=np.float64(1.0))["a0"]
    bad = _check(op, {(0,): g}, [x])
    assert not bad, "\n".join(bad[:20])
