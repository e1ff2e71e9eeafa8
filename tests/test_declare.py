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
