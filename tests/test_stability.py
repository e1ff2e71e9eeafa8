"""Numerical stability of naively declared ops, and output-form backward expressions.

Every pattern of ``symdiff.stable.REWRITES`` is declared the naive way a user
would write it and evaluated over [-1000, 1000] (including exactly +-1000 and 0)
with numpy warnings turned into errors. Values and derivatives are compared with
the *naive* expression (and its SymPy derivative) evaluated by mpmath at 500
significant digits, where nothing overflows or cancels.

Underflow is the one floating-point event allowed: numpy does not warn about it
by default, and results such as softplus(-1000) = e^-1000 lie below the smallest
double, so rounding them to 0 (or a subnormal) *is* the correctly rounded answer.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

import mpmath
import numpy as np
import pytest
import sympy as sp

import symdiff
from symdiff import REWRITES, defop
from symdiff.stable import Sigmoid
from symdiff.declare import DELTA, OUT

x = sp.Symbol("x")
E = sp.exp
TINY = np.finfo(np.float64).tiny  # smallest normal double: below it relative precision is gone
EPS = np.finfo(np.float64).eps
RTOL = 1e-12


@contextlib.contextmanager
def strict_numpy():
    """Overflow, division by zero and invalid operations raise; numpy warnings are errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", divide="raise", invalid="raise", under="ignore"):
            yield


def _points() -> np.ndarray:
    rng = np.random.default_rng(20240601)
    special = [-1000.0, 1000.0, 0.0, -999.5, -745.0, -740.0, -709.0, -700.0, -50.0, -37.5, -20.0, -1.0, -1e-3,
               1e-3, 1.0, 20.0, 37.5, 50.0, 700.0, 709.0, 710.0, 745.0]
    return np.concatenate([special, rng.uniform(-1000, 1000, 60), rng.uniform(-60, 60, 60)])


POINTS = _points()

# Each REWRITES pattern -> naive declarations of it (name, expression, exact reference or None).
# With reference None, mpmath evaluates the naive expression and its SymPy derivative.
Ref = tuple[Callable[[Any], Any], Callable[[Any], Any]]  # (value(t), derivative(t)) on mpmath numbers
CASES: dict[str, list[tuple[str, sp.Expr, Ref | None]]] = {
    "log(1 + exp(u))": [("softplus", sp.log(1 + E(x)), None)],
    "log(1 + exp(-u))": [("softplus_of_minus", sp.log(1 + E(-x)), None)],
    "log(1/(1 + exp(-u)))  (log-sigmoid)": [("logsigmoid", sp.log(1 / (1 + E(-x))), None),
                                            ("logsigmoid_neg_softplus", -sp.log(1 + E(-x)), None)],
    "1/(1 + exp(-u))": [("sigmoid", 1 / (1 + E(-x)), None), ("swish", x / (1 + E(-x)), None)],
    "1/(1 + exp(u))": [("sigmoid_of_minus", 1 / (1 + E(x)), None)],
    "exp(u)/(1 + exp(u))": [("sigmoid_ratio", E(x) / (1 + E(x)), None)],
    "exp(u)/(1 + exp(u))**2 and exp(-u)/(1 + exp(-u))**2": [("dsigmoid", E(x) / (E(x) + 1) ** 2, None),
                                                             ("dsigmoid_minus", E(-x) / (1 + E(-x)) ** 2, None)],
    "exp(m*u)/(1 + exp(u))**n, 1 <= m <= n": [("sig2_sigm", E(2 * x) / (1 + E(x)) ** 3, None),
                                              ("sig_sigm2", E(x) / (1 + E(x)) ** 3, None)],
    "Max(u, 0)": [("relu_max", sp.Max(x, 0), (lambda t: max(t, 0), lambda t: 1 if t > 0 else 0))],
    "Min(u, 0)": [("min0", sp.Min(x, 0), (lambda t: min(t, 0), lambda t: 1 if t < 0 else 0))],
    "Heaviside(u, 0)": [("step", sp.Heaviside(x, 0), (lambda t: 1 if t > 0 else 0, lambda t: 0))],
}
ALL_CASES = [(pattern, *case) for pattern, cases in CASES.items() for case in cases]


def test_every_rewrite_pattern_has_a_naive_declaration_here():
    assert set(CASES) == {pattern for pattern, _ in REWRITES}


def _reference(expr: sp.Expr, ref: Ref | None, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if ref is None:
        value = sp.lambdify(x, expr, modules="mpmath")
        deriv = sp.lambdify(x, sp.diff(expr, x), modules="mpmath")
    else:
        value, deriv = ref
    with mpmath.workdps(500):
        vals = [value(mpmath.mpf(float(t))) for t in points]
        ders = [deriv(mpmath.mpf(float(t))) for t in points]
        return np.array([float(v) for v in vals]), np.array([float(d) for d in ders])


def _assert_close(got: np.ndarray, want: np.ndarray, atol: float, what: str) -> None:
    err = np.abs(got - want)
    bad = err > RTOL * np.abs(want) + atol
    assert not bad.any(), (f"{what}: at x = {POINTS[bad][:5]} got {got[bad][:5]}, "
                           f"reference {want[bad][:5]}")


@pytest.mark.parametrize("pattern, name, expr, ref", ALL_CASES, ids=[c[1] for c in ALL_CASES])
def test_naive_declaration_is_finite_warning_free_and_accurate(pattern, name, expr, ref):
    op = defop(f"stability_{name}", expr, args=[x])
    delta = np.ones_like(POINTS)
    with strict_numpy():
        out = op.forward(POINTS.copy())
        grad = op.backward[0](delta, out, POINTS.copy())
    assert np.isfinite(out).all() and np.isfinite(grad).all()
    want_out, want_grad = _reference(expr, ref, POINTS)
    _assert_close(out, want_out, TINY, f"{pattern}: {name} value")
    # A backward written in terms of `out` (sigmoid' = out*(1-out)) computes 1 - out with an absolute
    # error of ~eps when out ~ 1, so its tiny tail values are only right to that absolute accuracy.
    atol = EPS if op.symbolic.output_form[0] else TINY
    _assert_close(grad, want_grad, atol, f"{pattern}: {name} derivative")


@pytest.mark.parametrize("name, expr", [(n, e) for _, n, e, _ in ALL_CASES])
def test_naive_declaration_in_a_graph_trains_at_extremes(name, expr):
    """Through the engine, alone and inside a fused elementwise group: exactly -1000, 0, 1000."""
    op = defop(f"stability_graph_{name}", expr, args=[x])
    f = symdiff.f
    xm = symdiff.XMan()
    xm.w = f.param(name="w", default=np.array([-1000.0, 0.0, 1000.0]))
    xm.alone = f.mean(op(xm.w))
    xm.loss = xm.alone + f.mean(f.hadamard(op(f.negate(f.negate(xm.w))), f.sigmoid(xm.w)))
    xm.setup()
    wengert = xm.operationSequence(xm.loss)
    results = []
    for fuse in (False, True):
        ad = symdiff.Autograd(xm, fuse=fuse)
        with strict_numpy():
            values = ad.eval(wengert, xm.inputDict())
            grads = ad.bprop(wengert, values, loss=np.float64(1.0))
        assert np.isfinite(values["loss"]) and np.isfinite(grads["w"]).all()
        results.append((values["loss"], grads["w"]))
    assert any(isinstance(s.output, tuple) for s in ad.compile(wengert).steps)  # the second term was fused
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-12, atol=TINY)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-12, atol=EPS)


def _high_precision(fn, points):
    with mpmath.workdps(500):
        return np.array([float(fn(mpmath.mpf(float(t)))) for t in points])


def test_builtin_sigmoid_is_accurate_in_both_tails():
    op = symdiff.OPS["sigmoid"]
    with strict_numpy():
        got = op.forward(POINTS.copy())
    want = _high_precision(lambda t: 1 / (1 + mpmath.exp(-t)), POINTS)
    _assert_close(got, want, TINY, "sigmoid")
    assert got[POINTS == -50.0][0] > 0  # e^-50 is representable: it must not cancel to 0


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu"])
def test_builtin_unary_at_extremes_has_no_warnings(name):
    op = symdiff.OPS[name]
    xs = np.array([-1000.0, -1e-300, 0.0, 1e-300, 1000.0])
    with strict_numpy():
        out = op.forward(xs)
        grad = op.backward[0](np.ones_like(xs), out, xs)
    assert np.isfinite(out).all() and np.isfinite(grad).all()
    expected = {"sigmoid": [0.0, 0.5, 0.5, 0.5, 1.0], "tanh": [-1.0, -1e-300, 0.0, 1e-300, 1.0],
                "relu": [0.0, 0.0, 0.0, 1e-300, 1000.0]}[name]
    np.testing.assert_allclose(out, expected, rtol=1e-15, atol=0)


def test_softmax_and_fused_crossent_at_extremes_have_no_warnings():
    logits = np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, 1000.0], [1000.0, 1000.0, -1000.0]])
    targets = np.eye(3)[[1, 0, 0]]
    sm, fused = symdiff.OPS["softMax"], symdiff.OPS["crossEnt-softMax"]
    with strict_numpy():
        p = sm.forward(logits)
        dp = sm.backward[0](np.ones_like(p), p, logits)
        loss = fused.forward(logits, targets)
        do = fused.backward[0](np.ones(3), loss, logits, targets)
        dt = fused.backward[1](np.ones(3), loss, logits, targets)
    np.testing.assert_array_equal(p, [[1, 0, 0], [0, 0, 1], [0.5, 0.5, 0]])
    assert np.isfinite(dp).all()
    # -log softmax(o)_target, exactly: 2000, 2000, log 2
    np.testing.assert_allclose(loss, [2000.0, 2000.0, np.log(2.0)], rtol=1e-15)
    np.testing.assert_allclose(do, p - targets, rtol=0, atol=1e-15)
    assert np.isfinite(dt).all()


def test_relu_derivative_at_zero_is_exactly_zero():
    zero = np.zeros(3)
    for op in (symdiff.OPS["relu"], defop("stability_user_relu", sp.Max(x, 0), args=[x])):
        g = op.backward[0](np.ones(3), op.forward(zero), zero)
        assert (g == 0).all() and not np.signbit(g).any()
        g1 = op.backward[0](np.ones(3), op.forward(zero + 1e-300), zero + 1e-300)
        assert (g1 == 1).all()


# --------------------------------------------------------------------------------------
# Output form: backward expressions written in terms of the op's own output
# --------------------------------------------------------------------------------------
def _symbolic_equal(a: sp.Expr, b: sp.Expr) -> bool:
    return sp.simplify(a - b) == 0


def test_sigmoid_backward_is_out_times_sigmoid_minus_x():
    """Not out*(1 - out): 1 - σ(x) is 0 in float64 from x ≈ 37, where σ'(x) ≈ 1e-16 (JAX #40385).
    σ(x)σ(-x) and out·σ(-x) measure the same; the output form is cheaper (one sigmoid fewer)."""
    sym = symdiff.OPS["sigmoid"].symbolic
    (a,) = sym.args
    assert sym.output_form == (True,)
    assert sym.backward[0] == DELTA * OUT * Sigmoid(-a)
    assert sym.derivatives[0] == Sigmoid(a) * Sigmoid(-a)
    xs = np.array([37.5, 40.0, 700.0, -700.0])
    with strict_numpy():
        op = symdiff.OPS["sigmoid"]
        got = op.backward[0](np.ones(4), op.forward(xs), xs)
    np.testing.assert_allclose(got, np.exp(-np.abs(xs)) / (1 + np.exp(-np.abs(xs))) ** 2, rtol=1e-14)


def test_tanh_backward_keeps_its_digits_in_the_tails():
    """Not 1 - out**2, which is 0 from |x| ≈ 19: tanh' = 4σ(2x)σ(-2x), nonzero to |x| ≈ 350."""
    sym = symdiff.OPS["tanh"].symbolic
    (a,) = sym.args
    assert sym.output_form == (False,)
    assert sym.backward[0] == 4 * DELTA * Sigmoid(2 * a) * Sigmoid(-2 * a)
    with strict_numpy():
        got = symdiff.OPS["tanh"].backward[0](np.ones(3), None, np.array([20.0, -37.5, 300.0]))
    np.testing.assert_allclose(got, 4 * np.exp(-2 * np.abs([20.0, -37.5, 300.0])), rtol=1e-12)


def test_exp_backward_is_out():
    sym = symdiff.OPS["exp"].symbolic
    assert sym.output_form == (True,)
    assert _symbolic_equal(sym.backward[0], DELTA * OUT)


def test_hadamard_backward_is_not_in_output_form():
    sym = symdiff.OPS["hadamard"].symbolic
    assert sym.output_form == (False, False)
    assert all(OUT not in b.free_symbols for b in sym.backward)
    a, b = sym.args
    assert _symbolic_equal(sym.backward[0], DELTA * b) and _symbolic_equal(sym.backward[1], DELTA * a)


def test_output_form_kernels_use_the_out_they_are_given():
    """The exp kernel really reads `out`: hand it a different `out` and the result follows."""
    op = symdiff.OPS["exp"]
    xs = np.array([0.3, -1.2])
    fake_out = np.array([0.25, 0.5])
    np.testing.assert_allclose(op.backward[0](np.ones(2), fake_out, xs), fake_out, rtol=1e-15)


def test_equivalent_naive_spellings_agree():
    """Different spellings of one function stabilise to kernels that agree with each other: values and
    derivatives (each backward kernel given its own op's output, as training does)."""
    pairs = [(sp.log(1 + E(x)), sp.log(E(x) + 1)), (1 / (1 + E(-x)), E(x) / (1 + E(x))),
             (E(x) / (1 + E(x)) ** 2, E(-x) / (1 + E(-x)) ** 2), (sp.log(1 / (1 + E(-x))), -sp.log(1 + E(-x)))]
    delta = np.random.default_rng(5).uniform(0.5, 2.0, POINTS.shape)
    for k, (p, q) in enumerate(pairs):
        op_p = defop(f"stability_spelling_{k}_a", p, args=[x])
        op_q = defop(f"stability_spelling_{k}_b", q, args=[x])
        with strict_numpy():
            out_p, out_q = op_p.forward(POINTS), op_q.forward(POINTS)
            np.testing.assert_allclose(out_p, out_q, rtol=1e-14, atol=TINY, err_msg=f"{p} vs {q}: values")
            grad_p, grad_q = op_p.backward[0](delta, out_p, POINTS), op_q.backward[0](delta, out_q, POINTS)
            assert np.isfinite(grad_p).all() and np.isfinite(grad_q).all()
            np.testing.assert_allclose(grad_p, grad_q, rtol=1e-13, atol=TINY, err_msg=f"{p} vs {q}: derivatives")


def test_only_exactly_one_plus_exp_is_rewritten():
    """log(1 + exp(x) + exp(y)) is not a softplus, nor is 1/(1 + exp(x) + exp(y)) a sigmoid: the
    patterns need exactly two terms (mutation testing found nothing held this)."""
    y = sp.Symbol("y")
    pts = np.linspace(-3, 3, 7)
    xs, ys = np.meshgrid(pts, pts[::-1])
    cases = {"stability_not_softplus": (sp.log(1 + E(x) + E(y)), np.log(1 + np.exp(xs) + np.exp(ys))),
             "stability_not_sigmoid": (1 / (1 + E(x) + E(y)), 1 / (1 + np.exp(xs) + np.exp(ys)))}
    for name, (expr, want) in cases.items():
        op = defop(name, expr, args=[x, y])
        np.testing.assert_allclose(op.forward(xs, ys), want, rtol=1e-14, err_msg=name)


# ---- the building blocks by themselves (killing sampled mutants, docs/testing.md) --------------------
def test_derivatives_of_the_stable_functions_are_the_textbook_ones():
    from symdiff.stable import LogAddExp, Sech2

    a, b, u = sp.symbols("a b u", real=True)
    assert sp.diff(LogAddExp(a, b), a) == Sigmoid(a - b)
    assert sp.diff(LogAddExp(a, b), b) == Sigmoid(b - a)
    assert sp.diff(Sech2(u), u) == -2 * sp.tanh(u) * Sech2(u)


def test_xlogx_is_zero_at_zero_float_and_silent():
    from symdiff.stable import _xlogx

    u = np.array([0.0, 0.5, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = _xlogx(u)
    assert r.dtype == np.float64
    np.testing.assert_array_equal(r, [0.0, 0.5 * np.log(0.5), 2.0 * np.log(2.0)])


def test_rules_in_reads_the_rules_a_label_names():
    from symdiff.stable import RULES, rules_in

    assert [r.name for r in rules_in("rule:expm1|out")] == ["expm1"]
    assert {r.name for r in rules_in("rule:log1p|rule:expm1")} == {"expm1", "log1p"}
    assert rules_in("all rules") == RULES and rules_in("out") == ()


def test_taylor_fallback_keeps_every_term_and_refuses_what_is_no_polynomial():
    from symdiff.stable import Taylor, taylor_fallback

    u = sp.Symbol("u", real=True)
    t = taylor_fallback(sp.Integer(0), (sp.exp(u) - 1 - u) / u**2, u, 1e-3)
    assert isinstance(t, Taylor) and sp.Poly(sp.expand(t.args[2]), u).degree() > 8  # 18 terms, not SymPy's 6
    const = taylor_fallback(sp.Integer(0), sp.Integer(3) + 0 * u, u, 1e-3)
    assert isinstance(const, Taylor) and isinstance(const.args[2], sp.Float) and float(const.args[2]) == 3.0
    assert taylor_fallback(sp.sqrt(u), sp.sqrt(u), u, 1e-3) is None


def test_refine_rewrites_r_sigmoid_minus_r_and_keeps_the_other_terms():
    # r·σ(u) - r = -r·σ(-u): in float64 the left side is 0 for u ≳ 37, the right side every digit;
    # the sum's other terms stay (b² here, which factor_terms leaves beside σ(u) - 1 inside b·(...))
    from symdiff.declare import lambdify_numpy
    from symdiff.stable import Sigmoid, refine

    u, r = sp.symbols("u r", real=True)
    u_vals = np.array([-3.0, 0.5, 3.0, 40.0])
    lone, _ = lambdify_numpy((u, r), refine(r * Sigmoid(u) - r))
    np.testing.assert_allclose(lone(u_vals, 2.0), -2.0 / (1 + np.exp(u_vals)), rtol=1e-14)
    with_other, _ = lambdify_numpy((u, r), refine(r * Sigmoid(u) - r + r ** 2))
    np.testing.assert_allclose(with_other(u_vals, 0.5), 0.5 * (0.5 - 1 / (1 + np.exp(u_vals))), rtol=1e-14)
