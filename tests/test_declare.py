"""What a declared op shows and says (symdiff/declare.py): its expressions as text, its refusals.

Written to kill mutants that survived the mutation sample (docs/testing.md): ``symdiff ops`` prints
``display()``, but only in a subprocess, which mutation testing does not follow.
"""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from symdiff import defop
from symdiff.declare import declaration_error

a, b = sp.symbols("a b")


def test_display_shows_forward_and_each_derivative_in_the_users_symbols():
    op = defop("declare_display", a * sp.exp(b) + sp.sin(a), args=[a, b])
    fwd, backward = op.symbolic.display()
    assert op.symbolic.arg_names == ("a", "b")
    assert sp.sympify(fwd) == a * sp.exp(b) + sp.sin(a)
    delta = sp.Symbol("delta")
    assert [sp.simplify(sp.sympify(e) - delta * sp.diff(a * sp.exp(b) + sp.sin(a), v)) for e, v in
            zip(backward, (a, b))] == [0, 0]
    assert all(isinstance(e, str) and "_Dummy" not in e for e in backward)


def test_a_nondiff_inputs_backward_refuses_with_the_reason():
    op = defop("declare_nondiff", a * b, args=[a, b], nondiff=[b])
    ones = np.ones(2)
    with pytest.raises(TypeError, match=r"^this input is declared nondiff: it has no gradient$"):
        op.backward[1](ones, ones, ones, ones)
    np.testing.assert_array_equal(op.backward[0](ones, ones, ones, 3 * ones), 3 * ones)


def test_declaration_error_quotes_the_first_line_of_the_cause():
    err = declaration_error("myop", "forward expression", sp.Symbol("x"), ValueError("first line\nsecond"))
    assert "could not be evaluated with numpy or SciPy (ValueError: first line);" in str(err)
    assert "second" not in str(err)
    bare = declaration_error("myop", "forward expression", sp.Symbol("x"), None)
    assert "SciPy; " in str(bare) and "Error" not in str(bare)


def test_a_declared_tanh_has_exact_derivatives_in_the_tails_and_keeps_the_inputs_dtype():
    # tanh' comes from the saved output where that is exact and from the input in the tails (|u| > ~3.1),
    # as 4·e/(1 + e)² with e = exp(-2|u|): checked against 1/cosh² there, and in float32 (input form only)
    op = defop("declare_tail_tanh", sp.tanh(a), args=[a])
    u = np.array([-9.0, -4.0, -0.3, 0.0, 2.0, 3.5, 12.0])
    (bw,) = op.backward
    want = 1 / np.cosh(u) ** 2
    np.testing.assert_allclose(bw(np.ones_like(u), np.tanh(u), u), want, rtol=1e-13)
    u32 = u.astype(np.float32)
    np.testing.assert_allclose(bw(np.ones_like(u32), np.tanh(u32), u32), want, rtol=1e-5)
    # a gradient broadcast over rows sums back to the float64 input's shape and dtype, even from float32
    delta = np.arange(14, dtype=np.float32).reshape(2, 7)
    g = bw(delta, np.tanh(u), u)
    assert g.shape == u.shape and g.dtype == np.float64
    np.testing.assert_allclose(g, delta.sum(axis=0) * want, rtol=1e-6)


def test_a_condition_joined_with_or_becomes_logical_or():
    # Piecewise conditions are printed for numpy: | as numpy.logical_or of both sides
    x = np.array([-2.0, -0.5, 0.5, 2.0])
    op = defop("declare_or", sp.Piecewise((a ** 2, (a < -1) | (a > 1)), (a, True)), args=[a])
    np.testing.assert_allclose(op.forward(x), np.where(np.abs(x) > 1, x ** 2, x))
    np.testing.assert_allclose(op.backward[0](np.ones_like(x), op.forward(x), x),
                               np.where(np.abs(x) > 1, 2 * x, 1.0))
