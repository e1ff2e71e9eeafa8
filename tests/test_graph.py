"""The graph layer's seed vocabulary and how it prints (symdiff/graph.py).

Written to kill mutants no in-process test reached (docs/testing.md): the CLI's
``symdiff ops --wengert`` prints these, but only in a subprocess.
"""
from __future__ import annotations

import numpy as np

from symdiff import XMan, f
from symdiff.graph import Step, WengertList


def _tiny() -> XMan:
    xm = XMan()
    xm.a = f.input(name="a", default=np.ones((2, 3)))
    xm.W = f.param(name="W", default=np.ones((3, 3)))
    xm.h = f.tanh(xm.a * xm.W)
    xm.loss = f.mean(xm.h)
    return xm.setup()


def test_roles_of_registers_and_by_name():
    xm = _tiny()
    a, W, h = xm.register("a"), xm.register("W"), xm.register("h")
    assert (a.isInput(), a.isParam(), a.isOperationOutput()) == (True, False, False)
    assert (W.isInput(), W.isParam(), W.isOperationOutput()) == (False, True, False)
    assert (h.isInput(), h.isParam(), h.isOperationOutput()) == (False, False, True)
    assert xm.isInput("a") and not xm.isInput("W") and not xm.isInput("h")
    assert xm.isParam("W") and not xm.isParam("a") and not xm.isParam("h")
    regs = xm.registers()
    assert set(regs) == {"a", "W", "h", "loss", "z1"} and regs["h"] is h
    regs.clear()  # a copy: the XMan keeps its own
    assert "h" in xm.registers()


def test_registers_print_their_name_and_what_makes_them():
    xm = _tiny()
    assert repr(xm.register("h")) == "<Register h: tanh>"
    assert repr(xm.register("a")) == "<Register a: input>"
    assert repr(xm.register("W")) == "<Register W: param>"
    assert repr(f.tanh(xm.h)) == "<Register ?: tanh>"  # not named by setup()


def test_a_wengert_list_prints_one_numbered_step_a_line():
    w = _tiny().operationSequence(_tiny().register("loss"))
    assert isinstance(w, WengertList)
    assert str(w).splitlines() == ["1  z1 = mul(a, W)", "2  h = tanh(z1)", "3  loss = mean(h)"]
    long = WengertList([Step(f"r{k}", "negate", ("x",)) for k in range(10)])
    assert str(long).splitlines()[0] == " 1  r0 = negate(x)" and str(long).splitlines()[9] == "10  r9 = negate(x)"


def test_multi_output_steps_print_all_outputs_and_mark_fused_ones():
    assert str(Step(("c", "h"), "fused1[add+tanh]", ("x", "y"))) == "c, h = fused1[add+tanh](x, y)   [fused]"
    assert str(Step(("a", "b"), "split2", ("x",))) == "a, b = split2(x)"


def test_f_lists_the_leaf_makers_and_every_op():
    import symdiff

    names = dir(f)
    assert {"input", "param", *symdiff.OPS} <= set(names)
    assert {"sum", "mean", "max", "reshape", "concat", "where"} <= set(names)  # the families too


def test_f_lists_each_name_once_and_each_answers():
    names = dir(f)
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not twice, f"dir(f) lists {twice} twice (a family and the op of its defaults share the name)"
    for n in names:
        assert callable(getattr(f, n)), n


def test_input_dict_hands_out_copies_of_the_defaults():
    xm = _tiny()
    values = xm.inputDict()
    assert set(values) == {"a", "W"}
    values["W"][0, 0] = 42.0
    assert xm.register("W").default[0, 0] == 1.0  # the graph's default is untouched
    assert xm.inputDict(a=np.zeros(1))["a"].shape == (1,)


def test_input_dict_passes_a_default_without_copy_as_it_is():
    xm = XMan()
    xm.s = f.input(name="s", default=2.5)  # a plain float has no .copy()
    xm.loss = f.mean(f.square(xm.s))
    xm.setup()
    assert xm.inputDict() == {"s": 2.5}


def test_register_arithmetic_computes_what_numpy_does():
    """``-a``, ``a + 1.5``, ``a - 2``, ``a - b``, ``a / b``, ``a / 2``, ``a ** 3``: values and the op each makes."""
    from symdiff import Autograd

    rng = np.random.default_rng(0)
    av, bv = rng.uniform(0.5, 2.0, (2, 3)), rng.uniform(0.5, 2.0, (2, 3))
    xm = XMan()
    xm.a = f.input(name="a", default=av)
    xm.b = f.input(name="b", default=bv)
    xm.neg = -xm.a
    xm.minus_number = xm.a - 2.5
    xm.minus_register = xm.a - xm.b
    xm.over_register = xm.a / xm.b
    xm.over_number = xm.a / 4.0
    xm.cube = xm.a ** 3
    xm.plus_number = xm.a + 1.5
    xm.loss = f.mean(xm.plus_number + xm.neg + xm.minus_number + xm.minus_register + xm.over_register + xm.over_number + xm.cube)
    xm.setup()
    assert xm.register("neg").op.name == "negate"
    assert xm.register("minus_register").op.name == "subtract"
    assert xm.register("over_register").op.name == "divide"
    values = Autograd(xm).eval(xm.operationSequence(xm.loss), xm.inputDict())
    np.testing.assert_allclose(values["neg"], -av, rtol=1e-15)
    np.testing.assert_allclose(values["minus_number"], av - 2.5, rtol=1e-15)
    np.testing.assert_allclose(values["minus_register"], av - bv, rtol=1e-15)
    np.testing.assert_allclose(values["over_register"], av / bv, rtol=1e-15)
    np.testing.assert_allclose(values["over_number"], av / 4.0, rtol=1e-15)
    np.testing.assert_allclose(values["cube"], av ** 3, rtol=1e-13)
    np.testing.assert_allclose(values["plus_number"], av + 1.5, rtol=1e-15)


def test_a_register_refuses_to_combine_with_what_is_not_a_number():
    import pytest

    from symdiff import GraphError

    xm = XMan()
    xm.a = f.input(name="a", default=np.ones(2))
    with pytest.raises(GraphError, match=r"^cannot combine register a with a str \(add\): only numbers and registers"):
        xm.a + "1"
    with pytest.raises(GraphError, match=r"^cannot combine register a with an array \(mul\)"):
        xm.a * np.ones(2)


def test_f_gives_families_with_static_arguments_before_ops_of_the_same_name():
    from symdiff import Autograd

    xm = XMan()
    xm.a = f.input(name="a", default=np.arange(6.0).reshape(2, 3))
    xm.s = f.sum(xm.a, axis=1)  # the family takes axis=; a plain op would not
    xm.setup()
    values = Autograd(xm).eval(xm.operationSequence(xm.s), xm.inputDict())
    np.testing.assert_array_equal(values["s"], [3.0, 12.0])
