"""Numbers with registers, and special functions in defop (SciPy, nondiff arguments, C99 or not)."""
from __future__ import annotations

import mpmath
import numpy as np
import pytest
import sympy as sp

import symdiff
from symdiff import Autograd, XMan, defop, f, grad_check
from symdiff import declare as D
from symdiff.gradcheck import check_op


# --------------------------------------------------------------------------------------
# numbers with registers
# --------------------------------------------------------------------------------------
def _run(build, w0, a0=None):
    xm = XMan()
    xm.w = f.param(name="w", default=np.array(w0, dtype=np.float64))
    xm.a = f.input(name="a", default=np.array([1.0, 2.0, 4.0] if a0 is None else a0))
    xm.y = build(xm.w, xm.a)
    xm.loss = f.sum(xm.y)
    xm = xm.setup()
    w = xm.operationSequence(xm.loss)
    ad = Autograd(xm)
    v = ad.eval(w, xm.inputDict())
    g = ad.bprop(w, v, loss=np.float64(1.0))
    return xm, w, v, g


CASES = [  # register expression, numpy expression, its derivative in w
    (lambda w, a: 2 * w, lambda w: 2 * w, lambda w: 2 + 0 * w),
    (lambda w, a: w * 0.5, lambda w: w * 0.5, lambda w: 0.5 + 0 * w),
    (lambda w, a: w / 3, lambda w: w / 3, lambda w: 1 / 3 + 0 * w),
    (lambda w, a: 1 - w, lambda w: 1 - w, lambda w: -1 + 0 * w),
    (lambda w, a: w + 1, lambda w: w + 1, lambda w: 1 + 0 * w),
    (lambda w, a: 1 + w, lambda w: 1 + w, lambda w: 1 + 0 * w),
    (lambda w, a: w - 0.25, lambda w: w - 0.25, lambda w: 1 + 0 * w),
    (lambda w, a: w ** 2, lambda w: w ** 2, lambda w: 2 * w),
    (lambda w, a: w ** 0.5, lambda w: w ** 0.5, lambda w: 0.5 / np.sqrt(w)),
    (lambda w, a: w ** -1.5, lambda w: w ** -1.5, lambda w: -1.5 * w ** -2.5),
    (lambda w, a: 2 ** w, lambda w: 2 ** w, lambda w: np.log(2) * 2 ** w),
    (lambda w, a: 3 / w, lambda w: 3 / w, lambda w: -3 / w ** 2),
    (lambda w, a: -w, lambda w: -w, lambda w: -1 + 0 * w),
    (lambda w, a: np.float64(2.5) * w, lambda w: 2.5 * w, lambda w: 2.5 + 0 * w),
    (lambda w, a: w * np.int64(3), lambda w: 3 * w, lambda w: 3 + 0 * w),
    (lambda w, a: a / w, lambda w: np.array([1.0, 2.0, 4.0]) / w, lambda w: -np.array([1.0, 2.0, 4.0]) / w ** 2),
    (lambda w, a: 0.1 * w, lambda w: 0.1 * w, lambda w: 0.1 + 0 * w),
]


@pytest.mark.parametrize("build, value, derivative", CASES)
def test_numbers_with_registers_are_elementwise_constants(build, value, derivative):
    w0 = np.array([0.5, 1.5, 2.0])
    xm, w, v, g = _run(build, w0)
    np.testing.assert_allclose(v["y"], value(w0), rtol=1e-15)
    np.testing.assert_allclose(g["w"], derivative(w0), rtol=1e-14)
    program = Autograd(xm).compile(w)
    assert {n for n, _ in program.leaves} <= {"w", "a"}  # nothing to feed for a number
    assert set(g) <= {"w", "y", "loss"}                   # and no gradient for it


def test_a_number_is_exact_in_the_op():
    xm, w, v, g = _run(lambda w, a: 0.1 * w, [3.0])
    assert v["y"][0] == 0.1 * 3.0
    assert xm.y.op.name == "times_0p1" and "times_0p1" not in symdiff.OPS  # made on demand, not a primitive


def test_register_times_register_stays_the_matrix_product_and_slash_divides():
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(2, 3)), rng.normal(size=(3, 2))
    xm = XMan()
    xm.a = f.input(name="a", default=A)
    xm.b = f.input(name="b", default=B)
    xm.c = f.input(name="c", default=A + 3)
    xm.p, xm.q, xm.r, xm.h = xm.a * xm.b, xm.a @ xm.b, xm.a / xm.c, f.hadamard(xm.a, xm.c)
    xm = xm.setup()
    v = Autograd(xm).eval(xm.operationSequence(xm.p), xm.inputDict())
    for name in ("q", "r", "h"):
        v.update(Autograd(xm).eval(xm.operationSequence(xm.register(name)), xm.inputDict()))
    np.testing.assert_allclose(v["p"], A @ B)
    np.testing.assert_allclose(v["q"], A @ B)
    np.testing.assert_allclose(v["r"], A / (A + 3))
    np.testing.assert_allclose(v["h"], A * (A + 3))


@pytest.mark.parametrize("bad, message", [
    (lambda r: r + np.ones(3), "with an array"),
    (lambda r: True * r, "with a bool"),
    (lambda r: r * float("inf"), "not finite"),
    (lambda r: r ** r, "power of a register"),
    (lambda r: 2 @ r, "unsupported operand|matrix product"),
    (lambda r: r @ 2, "matrix product of two registers"),
    (lambda r: r + "1", "with a str"),
])
def test_what_cannot_combine_with_a_register_fails_with_one_line(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        bad(f.input(name="r"))


def test_a_gru_update_without_an_input_of_ones_passes_grad_check_fused_and_compiled():
    rng = np.random.default_rng(1)
    xm = XMan()
    xm.h = f.param(name="h", default=rng.normal(size=(4, 5)))
    xm.z = f.param(name="z", default=rng.normal(size=(4, 5)))
    xm.n = f.param(name="n", default=rng.normal(size=(4, 5)))
    z = f.sigmoid(xm.z)
    xm.out = f.hadamard(1 - z, f.tanh(xm.n)) + f.hadamard(z, xm.h)
    xm.loss = f.mean(f.square(xm.out) * 0.5)
    xm = xm.setup()
    w = xm.operationSequence(xm.loss)
    assert grad_check(xm, w, max_elements=None).ok
    assert grad_check(xm, w, max_elements=None, fuse=False).ok


# --------------------------------------------------------------------------------------
# special functions
# --------------------------------------------------------------------------------------
x, y, nu, n, s = sp.symbols("x y nu n s")


def test_gelu_via_erf_declares_trains_and_matches_the_closed_form():
    gelu = defop("gelu", 0.5 * x * (1 + sp.erf(x / sp.sqrt(2))), args=[x])
    from scipy.special import erfc

    u = np.linspace(-6, 6, 25)
    # the closed form without its cancellation: 1 + erf(v) is erfc(-v) (the naive one is 6e-10 off at -6);
    # erfc's condition number (~v² = 18 at -6) turns the argument's last-bit rounding into ~1e-14
    np.testing.assert_allclose(gelu.forward(u), 0.5 * u * erfc(-u / np.sqrt(2)), rtol=1e-13)
    assert check_op(gelu, [(5, 3)], rng=np.random.default_rng(0)) < 1e-7
    rng = np.random.default_rng(2)
    xm = XMan()
    xm.x = f.input(name="x", default=rng.normal(size=(6, 4)))
    xm.W = f.param(name="W", default=rng.normal(size=(4, 70)))
    xm.loss = f.mean(f.gelu(xm.x * xm.W))  # (6, 70): big enough for the compiled kernel
    xm = xm.setup()
    assert grad_check(xm, xm.operationSequence(xm.loss)).ok


def test_nondiff_arguments_get_no_gradient_and_the_rest_is_right():
    jv = defop("voc_jv", sp.besselj(nu, x), args=[nu, x], nondiff=[nu])
    assert jv.nondifferentiable == (0,)
    from scipy.special import jv as scipy_jv, jvp

    orders, points = np.array([[0.0], [1.0], [2.5]]), np.linspace(0.5, 8, 6)
    np.testing.assert_allclose(jv.forward(orders, points), scipy_jv(orders, points), rtol=1e-14)
    g = jv.backward[1](np.ones((3, 6)), jv.forward(orders, points), orders, points)
    np.testing.assert_allclose(g, jvp(orders, points).sum(axis=0), rtol=1e-12)
    xm = XMan()
    xm.nu = f.input(name="nu", default=orders)
    xm.x = f.param(name="x", default=points)
    xm.loss = f.sum(f.voc_jv(xm.nu, xm.x))
    xm = xm.setup()
    assert grad_check(xm, xm.operationSequence(xm.loss), max_elements=None).ok


def test_a_derivative_nothing_can_evaluate_fails_at_declaration_naming_it():
    with pytest.raises(symdiff.DefopError, match=r"voc_bad.*cannot differentiate besselj\(nu, x\) \(the derivative wrt nu "
                                                 r"stays Derivative\(besselj\(nu, x\), nu\)\); if nu needs no gradient.*"
                                                 r"declare it nondiff=\[nu\]"):
        defop("voc_bad", sp.besselj(nu, x), args=[nu, x])
    assert "voc_bad" not in symdiff.OPS
    with pytest.raises(symdiff.DefopError, match="nondiff argument y is not one of args"):
        defop("voc_bad", sp.besselj(nu, x), args=[nu, x], nondiff=[y])


def test_without_scipy_one_line_names_the_function_and_the_extra(monkeypatch):
    monkeypatch.setattr(D, "_scipy_special", lambda: None)
    with pytest.raises(symdiff.DefopError, match=r"^defop\('voc_gelu'\): erf is computed by scipy.special.erf, and SciPy is "
                                          r"not installed: pip install 'symdiff\[special\]'$"):
        defop("voc_gelu", 0.5 * x * (1 + sp.erf(x / sp.sqrt(2))), args=[x])
    defop("voc_plain", sp.tanh(x) * sp.exp(-x ** 2), args=[x])  # numpy alone still does the rest


def test_a_fused_kernel_with_a_function_c99_lacks_runs_numpy_and_says_so():
    defop("voc_digamma", sp.digamma(x), args=[x])
    rng = np.random.default_rng(3)
    xm = XMan()
    xm.a = f.param(name="a", default=rng.uniform(0.5, 3, size=(8, 40)))
    xm.loss = f.mean(f.tanh(f.voc_digamma(f.exp(xm.a))))  # exp, digamma, tanh fuse into one kernel
    xm = xm.setup()
    w = xm.operationSequence(xm.loss)
    ad = Autograd(xm)
    program = ad.compile(w)
    fused = [symdiff.MULTI_OPS[s.op] for s in program.steps if s.op.startswith("fused")]
    assert len(fused) == 1
    g = ad.bprop(w, ad.eval(w, xm.inputDict()), loss=np.float64(1.0))
    assert "C99 has no polygamma: runs with numpy/SciPy" == fused[0].runs_as()
    assert grad_check(xm, w).ok
    assert np.isfinite(g["a"]).all()


def test_erf_compiles_to_c_where_c99_has_it():
    from symdiff import native
    from symdiff.cprint import c_missing

    assert c_missing([sp.erf(x) + sp.erfc(x) + sp.gamma(x) + sp.loggamma(x)]) == ()
    assert set(c_missing([sp.tanh(sp.besselj(nu, x)) + sp.polygamma(1, x)])) == {"besselj", "polygamma"}
    if not native.enabled():
        pytest.skip(f"native kernels {native.status()}")


# special functions against mpmath (values and first derivatives, where SciPy computes them)
MP_CASES = [
    ("erf", sp.erf(x), [x], [], lambda x: mpmath.erf(x), [-3.0, -0.3, 0.0, 1e-8, 0.7, 2.5]),
    ("erfc", sp.erfc(x), [x], [], lambda x: mpmath.erfc(x), [-2.0, 0.1, 1.0, 5.0, 20.0]),
    ("erfinv", sp.erfinv(x), [x], [], lambda x: mpmath.erfinv(x), [-0.9, -0.1, 0.3, 0.99]),
    ("gamma", sp.gamma(x), [x], [], lambda x: mpmath.gamma(x), [0.3, 1.5, 4.0, 10.5]),
    ("loggamma", sp.loggamma(x), [x], [], lambda x: mpmath.loggamma(x), [0.3, 1.5, 4.0, 100.5]),
    ("digamma", sp.digamma(x), [x], [], lambda x: mpmath.digamma(x), [0.3, 1.5, 4.0, 50.0]),
    ("polygamma", sp.polygamma(n, x), [n, x], [n], lambda n, x: mpmath.polygamma(int(n), x), [(1, 0.5), (2, 3.0)]),
    ("besselj", sp.besselj(nu, x), [nu, x], [nu], mpmath.besselj, [(0, 1.0), (1.5, 4.0), (3, 10.0)]),
    ("bessely", sp.bessely(nu, x), [nu, x], [nu], mpmath.bessely, [(0, 1.0), (1.5, 4.0)]),
    ("besseli", sp.besseli(nu, x), [nu, x], [nu], mpmath.besseli, [(0, 1.0), (2, 3.0)]),
    ("besselk", sp.besselk(nu, x), [nu, x], [nu], mpmath.besselk, [(0, 1.0), (2, 3.0)]),
    ("Ei", sp.Ei(x), [x], [], mpmath.ei, [-2.0, 0.5, 3.0]),
    ("expint", sp.expint(n, x), [n, x], [n], lambda n, x: mpmath.expint(int(n), x), [(1, 0.5), (2, 3.0)]),
    ("zeta", sp.zeta(s, x), [s, x], [s], mpmath.zeta, [(2, 1.0), (3.5, 2.0)]),
]


@pytest.mark.filterwarnings("ignore:floating point number truncated to an integer")  # expn's float orders
@pytest.mark.parametrize("name, expr, args, nondiff, reference, points", MP_CASES, ids=[c[0] for c in MP_CASES])
def test_special_functions_and_their_derivatives_agree_with_mpmath(name, expr, args, nondiff, reference, points):
    op = defop(f"voc_{name}", expr, args=args, nondiff=nondiff)
    mpmath.mp.dps = 40
    for p in points:
        p = p if isinstance(p, tuple) else (p,)
        arrays = [np.array([v], dtype=np.float64) for v in p]
        value = float(op.forward(*arrays)[0])
        want = float(reference(*[mpmath.mpf(v) for v in p]))
        assert value == pytest.approx(want, rel=1e-12, abs=1e-300), f"{name}{p}: {value} vs mpmath {want}"
        j = len(args) - 1  # the differentiated argument is the last one
        g = float(op.backward[j](np.ones(1), op.forward(*arrays), *arrays)[0])
        dwant = float(mpmath.diff(lambda t: reference(*[mpmath.mpf(v) for v in p[:-1]], t), mpmath.mpf(p[-1])))
        assert g == pytest.approx(dwant, rel=1e-10, abs=1e-300), f"d{name}/dx at {p}: {g} vs mpmath {dwant}"


def test_symdiff_ops_lists_the_new_ops_with_their_arguments(capsys, monkeypatch):
    import cli

    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(["ops"]) == 0
    out = capsys.readouterr().out
    for call in ("f.sum(x, axis=None, keepdims=False)", "f.logsumexp(x, axis=None, keepdims=False)",
                 "f.log_softmax(x, axis=-1)", "f.softMax(x, axis=-1)", "f.reshape(x, shape)",
                 "f.transpose(x, axes=None)", "f.concat([a, b, ...], axis=0)", "f.stack([a, b, ...], axis=0)",
                 "x[i, 1:3, None, ..., [0, 0, 2]]", "f.where(mask, a, b)", "c - r", "r ** c", "divide",
                 "tied maxima share it equally"):
        assert call in out, call


# the per-op auto-verification, for special functions: central differences with broadcasting shapes in
# each function's domain, and values and derivatives at the domain's extremes without numpy warnings
SPECIAL_OPS = [  # expression, args, nondiff, domain of the differentiated argument, extremes
    (0.5 * x * (1 + sp.erf(x / sp.sqrt(2))), [x], [], (-3, 3), [-1e3, -40.0, 40.0, 1e3]),
    (sp.erfc(x), [x], [], (-3, 3), [-1e3, 30.0, 1e3]),
    (sp.erfinv(x), [x], [], (-0.9, 0.9), [-0.999999, 0.999999]),
    (sp.loggamma(x), [x], [], (0.2, 5), [1e-300, 1e300]),
    (sp.digamma(x), [x], [], (0.2, 5), [1e-5, 1e100]),
    (sp.polygamma(n, x), [n, x], [n], (0.2, 5), [1e-3, 1e100]),
    (sp.besselj(nu, x), [nu, x], [nu], (0.2, 8), [1e-3, 1e5]),
    (sp.besselk(nu, x), [nu, x], [nu], (0.2, 8), [1e-3, 700.0]),
    (sp.Ei(x), [x], [], (0.2, 3), [-700.0, 1e-8, 700.0]),
]


@pytest.mark.parametrize("k", range(len(SPECIAL_OPS)))
def test_special_ops_pass_the_auto_verification(k):
    expr, args, nondiff, (low, high), extremes = SPECIAL_OPS[k]
    op = defop(f"voc_special_{k}", expr, args=args, nondiff=nondiff)
    rng = np.random.default_rng(k)
    shape_sets = [[(5, 3)], [(4,)]] if op.arity == 1 else [[(5, 1), (5, 3)], [(3,), (5, 3)], [(4,), (4,)]]
    for shapes in shape_sets:
        xs = [rng.integers(0, 3, s).astype(float) if j in op.nondifferentiable else rng.uniform(low, high, s)
              for j, s in enumerate(shapes)]
        assert np.shape(op.forward(*xs)) == np.broadcast_shapes(*shapes)
        err = check_op(op, rng=rng, inputs=xs)
        assert err < 1e-6, f"{expr}: relative error {err:.1e} at shapes {shapes}"
    import warnings

    with np.errstate(over="raise", invalid="raise", divide="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        u = np.array(extremes)
        xs = [np.ones_like(u)] * (op.arity - 1) + [u]
        out = op.forward(*xs)
        grad = op.backward[-1](np.ones_like(u), out, *xs)
    assert not np.isnan(out).any() and not np.isnan(grad).any(), (out, grad)


@pytest.mark.parametrize("first", ["symdiff.shape_ops", "symdiff.differential", "symdiff.array_ops", "symdiff"])
def test_sum_is_one_op_whichever_module_is_imported_first(first):
    """``f.sum(x)``, the name ``sum`` and the reverse HVP's inner product are one op, the default of
    the ``f.sum(x, axis=, keepdims=)`` family: shape_ops once registered its own ``sum`` when it
    was imported before array_ops (``import symdiff.differential`` first), with other kernels and rules."""
    import subprocess
    import sys

    code = (f"import {first}\n"
            "from symdiff import f, XMan\n"
            "from symdiff.registry import OPS\n"
            "from symdiff.array_ops import sum_op\n"
            "xm = XMan(); xm.x = f.input(name='x'); xm.s = f.sum(xm.x); xm.setup()\n"
            "print(OPS['sum'] is sum_op() is xm.s.op, OPS['sum'].family, OPS['sum'].static)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["True", "sum"], out
