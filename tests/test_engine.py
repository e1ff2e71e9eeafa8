"""The engine end to end: graphs, Wengert lists, eval/bprop, passes, OneHot, dtypes, grad_check, errors."""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import symdiff
from symdiff import (Autograd, MissingInputError, OneHot, Op, ShapeError, XMan, defop, f, grad_check)
from symdiff.registry import register


def test_public_api_example():
    import numpy as np, sympy as sp  # noqa: E401
    from symdiff import XMan, f, Autograd, defop, grad_check
    x, y = sp.symbols("x y")
    softplus = defop("softplus", sp.log(1 + sp.exp(x)), args=[x])
    gate = defop("gate", x * sp.tanh(y), args=[x, y])     # gate(r1, r2) and f.gate(r1, r2) build the same op
    xm = XMan()
    xm.a = f.input(name="a", default=np.random.rand(3, 4))
    xm.t = f.input(name="t", default=np.eye(4)[[0, 2, 3]])
    xm.W = f.param(name="W", default=np.random.rand(4, 4))
    xm.b = f.param(name="b", default=np.random.rand(4))
    xm.h = f.softplus(f.gate(xm.a * xm.W + xm.b, xm.b))
    xm.outputs = f.softMax(xm.h)
    xm.loss = f.mean(f.crossEnt(xm.outputs, xm.t))
    xm = xm.setup()
    wengert = xm.operationSequence(xm.loss)
    ad = Autograd(xm)
    values = ad.eval(wengert, xm.inputDict())
    grads = ad.bprop(wengert, values, loss=np.float64(1.0))
    assert grads["W"].shape == (4, 4) and grads["b"].shape == (4,)
    print(ad.forward_steps, ad.backward_steps)
    report = grad_check(xm, wengert)
    assert report.ok
    # beyond the example: the op objects build the same registers as f.<name>
    r1, r2 = f.input(name="r1"), f.input(name="r2")
    assert gate(r1, r2).op is f.gate(r1, r2).op is symdiff.OPS["gate"]
    assert softplus(r1).op is f.softplus(r1).op
    assert ad.forward_steps == len(ad.compile(wengert, whole=True).steps)  # one per (possibly fused) step run


# --------------------------------------------------------------------------------------
# Wengert lists
# --------------------------------------------------------------------------------------
def _counting_op(name: str, calls: list[int]) -> Op:
    """An identity-like op that counts its forward calls (hand-written, registered under a unique name)."""
    def forward(a):
        calls.append(1)
        return 2.0 * a

    return register(Op(name, 1, forward, (lambda d, o, a: 2.0 * d,), elementwise=True), replace=True)


def _check_topological(wengert, leaves):
    available = set(leaves)
    outputs = [s.output for s in wengert]
    assert len(outputs) == len(set(outputs)), f"a register is computed twice: {outputs}"
    for step in wengert:
        assert all(i in available for i in step.inputs), f"{step} uses a register before it is computed"
        available.add(step.output)


def test_diamond_graph_computes_shared_register_once():
    calls: list[int] = []
    shared_op = _counting_op("engine_counted", calls)
    xm = XMan()
    xm.a = f.input(name="a", default=np.array([1.0, -2.0, 3.0]))
    xm.s = shared_op(xm.a)                    # used by both sides of the diamond
    xm.left = f.tanh(xm.s)
    xm.right = f.square(xm.s)
    xm.top = f.hadamard(xm.left, xm.right) + xm.s
    xm.setup()
    wengert = xm.operationSequence(xm.top)
    _check_topological(wengert, {"a"})
    assert [s.output for s in wengert].count("s") == 1
    assert sorted(s.op for s in wengert) == sorted(["engine_counted", "tanh", "square", "hadamard", "add"])
    s = 2.0 * np.array([1.0, -2.0, 3.0])
    for fuse in (False, True):
        calls.clear()
        ad = Autograd(xm, fuse=fuse)
        values = ad.eval(wengert, xm.inputDict())
        assert len(calls) == 1
        np.testing.assert_allclose(values["top"], np.tanh(s) * s**2 + s, rtol=1e-15)
        assert ad.forward_steps == (5 if not fuse else len(ad.compile(wengert, whole=True).steps))


def test_operation_sequence_of_an_intermediate_register():
    xm = XMan()
    xm.a = f.input(name="a", default=np.arange(6.0).reshape(2, 3))
    xm.W = f.param(name="W", default=np.ones((3, 2)))
    xm.h = f.relu(xm.a * xm.W)
    xm.loss = f.mean(f.square(xm.h))
    xm.setup()
    full = xm.operationSequence(xm.loss)
    part = xm.operationSequence(xm.h)
    assert [s.output for s in part] == [s.output for s in full][:2] and part[-1].output == "h"
    _check_topological(part, {"a", "W"})
    values = Autograd(xm).eval(part, xm.inputDict())
    np.testing.assert_allclose(values["h"], np.maximum(np.arange(6.0).reshape(2, 3) @ np.ones((3, 2)), 0))
    assert "loss" not in values


def test_wengert_list_of_a_deep_chain_is_ordered():
    xm = XMan()
    xm.a = f.input(name="a", default=np.array([0.5]))
    h = xm.a
    for _ in range(3000):  # deep: the walk must not recurse
        h = f.tanh(h)
    xm.out = h
    xm.setup()
    wengert = xm.operationSequence(xm.out)
    assert len(wengert) == 3000
    _check_topological(wengert, {"a"})


def test_setup_names_intermediates_without_clashing():
    xm = XMan()
    xm.z1 = f.input()            # an attribute that looks like an automatic name
    xm.out = f.relu(f.tanh(xm.z1))
    xm.setup()
    names = [s.output for s in xm.operationSequence(xm.out)]
    assert "z1" not in names and names[-1] == "out" and len(set(names)) == 2


# --------------------------------------------------------------------------------------
# bprop: what gets a gradient, counters
# --------------------------------------------------------------------------------------
def _mixed_graph():
    rng = np.random.default_rng(1)
    xm = XMan()
    xm.x = f.input(name="x", default=rng.normal(size=(4, 3)))
    xm.x2 = f.input(name="x2", default=rng.normal(size=(4, 2)))
    xm.t = f.input(name="t", default=np.eye(2)[[0, 1, 1, 0]])
    xm.W = f.param(name="W", default=rng.normal(size=(3, 2)))
    xm.b = f.param(name="b", default=rng.normal(size=2))
    xm.h = f.relu(xm.x * xm.W + xm.b)
    xm.g = f.tanh(xm.x2)                       # data only: no gradient should be computed for it
    xm.o = f.hadamard(xm.h, xm.g)
    xm.outputs = f.softMax(xm.o)
    xm.loss = f.mean(f.crossEnt(xm.outputs, xm.t))
    return xm.setup()


def _expected_backward_steps(params, steps, seed="loss"):
    """One derivative per (step, input) where the input depends on a param and the step leads to the seed.

    Computed from the (possibly rewritten) step list alone, independently of the compiler. Inputs a
    multi-output step declares non-differentiable (the offsets of a split) carry no gradient.
    """
    outs = [s.output if isinstance(s.output, tuple) else (s.output,) for s in steps]
    frozen = [getattr(symdiff.registry.MULTI_OPS.get(s.op), "nondifferentiable", ()) for s in steps]
    depends = set(params)
    for s, o in zip(steps, outs):
        if depends & set(s.inputs):
            depends.update(o)
    live = {seed}
    for s, o in zip(reversed(steps), reversed(outs)):
        if live & set(o):
            live.update(s.inputs)
    return sum(i in depends and j not in fz
               for s, o, fz in zip(steps, outs, frozen) if live & set(o) for j, i in enumerate(s.inputs))


def test_bprop_skips_data_inputs_and_counts_one_step_per_needed_derivative():
    xm = _mixed_graph()
    wengert = xm.operationSequence(xm.loss)
    ad = Autograd(xm, passes=(), fuse=False)     # the seed's step list, one derivative per kernel call
    values = ad.eval(wengert, xm.inputDict())
    grads = ad.bprop(wengert, values, loss=np.float64(1.0))
    # by hand: mean 1, crossEnt 1 (not t), softMax 1, hadamard 1 (not g), relu 1, add 2, mul 1 (not x)
    assert ad.backward_steps == 8 == _expected_backward_steps(["W", "b"], wengert)
    assert ad.forward_steps == len(wengert) == 8
    assert not {"x", "x2", "t", "g"} & set(grads)
    assert {"W", "b", "h", "o", "outputs", "loss"} <= set(grads)


@pytest.mark.parametrize("passes, fuse", [(("crossent_softmax",), False), (("crossent_softmax",), True),
                                          ((), True), (symdiff.autograd.DEFAULT_PASSES, True)])
def test_bprop_counts_after_rewrites(passes, fuse):
    xm = _mixed_graph()
    wengert = xm.operationSequence(xm.loss)
    ad = Autograd(xm, passes=passes, fuse=fuse)
    grads = ad.bprop(wengert, ad.eval(wengert, xm.inputDict()), loss=np.float64(1.0))
    steps = ad.compile(wengert, whole=True).steps
    assert ad.forward_steps == len(steps)
    assert ad.backward_steps == _expected_backward_steps(["W", "b"], steps)
    if passes == ("crossent_softmax",) and not fuse:
        # bprop keeps the named `outputs`' whole gradient, so the rewrite leaves it alone; a training
        # loop's compile (no such boundary) makes crossEnt(softMax(o), t) one step: no softMax derivative
        assert "crossEnt-softMax" not in [s.op for s in steps]
        program = ad.compile(wengert)
        ad.reset_counts()
        program.backward(program.forward(xm.inputDict()), {"loss": np.float64(1.0)})
        assert ad.backward_steps == 7
    assert not {"x", "x2", "t", "g"} & set(grads)
    np.testing.assert_allclose(grads["W"], _reference_grads(xm)["W"], rtol=1e-12)


def _reference_grads(xm):
    w = xm.operationSequence(xm.loss)
    ad = Autograd(xm, passes=(), fuse=False)
    return ad.bprop(w, ad.eval(w, xm.inputDict()), loss=np.float64(1.0))


@pytest.mark.parametrize("fuse", [False, True])
def test_counters_are_cumulative_and_reset(fuse):
    xm = _mixed_graph()
    wengert = xm.operationSequence(xm.loss)
    ad = Autograd(xm, fuse=fuse)
    n_steps = len(ad.compile(wengert, whole=True).steps)
    per_bprop = _expected_backward_steps(["W", "b"], ad.compile(wengert, whole=True).steps)
    for k in (1, 2, 3):
        values = ad.eval(wengert, xm.inputDict())
        ad.bprop(wengert, values, loss=np.float64(1.0))
        assert (ad.forward_steps, ad.backward_steps) == (k * n_steps, k * per_bprop)
    ad.reset_counts()
    assert (ad.forward_steps, ad.backward_steps) == (0, 0)
    ad.eval(wengert, xm.inputDict())
    assert (ad.forward_steps, ad.backward_steps) == (n_steps, 0)


def test_bprop_with_no_param_below_the_seed_computes_nothing():
    xm = XMan()
    xm.a = f.input(name="a", default=np.ones(3))
    xm.out = f.mean(f.tanh(xm.a))
    xm.setup()
    w = xm.operationSequence(xm.out)
    ad = Autograd(xm)
    grads = ad.bprop(w, ad.eval(w, xm.inputDict()), out=np.float64(1.0))
    assert ad.backward_steps == 0 and set(grads) <= {"out"}


# --------------------------------------------------------------------------------------
# crossEnt-softMax pass
# --------------------------------------------------------------------------------------
def _classifier(logit_scale=1.0, seed=2):
    rng = np.random.default_rng(seed)
    xm = XMan()
    xm.x = f.input(name="x", default=rng.normal(size=(6, 4)))
    xm.t = f.input(name="t", default=np.eye(3)[rng.integers(0, 3, 6)])
    xm.W = f.param(name="W", default=logit_scale * rng.normal(size=(4, 3)))
    xm.b = f.param(name="b", default=rng.normal(size=3))
    xm.outputs = f.softMax(xm.x * xm.W + xm.b)
    xm.loss = f.mean(f.crossEnt(xm.outputs, xm.t))
    return xm.setup()


def test_fused_pass_matches_the_unfused_path():
    xm = _classifier()
    w = xm.operationSequence(xm.loss)
    fused, plain = Autograd(xm), Autograd(xm, passes=())
    assert [s.op for s in fused.compile(w).steps].count("crossEnt-softMax") == 1
    assert "crossEnt-softMax" not in [s.op for s in plain.compile(w).steps]
    vf, vp = fused.eval(w, xm.inputDict()), plain.eval(w, xm.inputDict())
    np.testing.assert_allclose(vf["loss"], vp["loss"], rtol=1e-12)
    np.testing.assert_allclose(vf["outputs"], vp["outputs"], rtol=1e-12)  # probabilities still computed
    gf, gp = fused.bprop(w, vf, loss=np.float64(1.0)), plain.bprop(w, vp, loss=np.float64(1.0))
    for name in ("W", "b"):
        np.testing.assert_allclose(gf[name], gp[name], rtol=1e-12, atol=1e-15)


def test_fused_pass_is_stable_where_the_unfused_path_takes_log_zero():
    xm = XMan()
    xm.o = f.param(name="o", default=np.array([[800.0, -800.0, 0.0], [0.0, 900.0, -900.0]]))
    xm.t = f.input(name="t", default=np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    xm.loss = f.mean(f.crossEnt(f.softMax(xm.o), xm.t))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        plain = Autograd(xm, passes=()).eval(w, xm.inputDict())
    assert np.isinf(plain["loss"])  # p underflows to 0 for the target class: log(0)
    ad = Autograd(xm)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        values = ad.eval(w, xm.inputDict())
        grads = ad.bprop(w, values, loss=np.float64(1.0))
    np.testing.assert_allclose(values["loss"], (1600.0 + 1800.0) / 2, rtol=1e-15)
    p = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(grads["o"], (p - xm.t.default) / 2, atol=1e-300)


def test_fused_pass_keeps_gradient_of_probabilities_used_elsewhere():
    """If softMax's output is also used by another loss term, its gradient still flows."""
    rng = np.random.default_rng(3)
    xm = XMan()
    xm.o = f.param(name="o", default=rng.normal(size=(3, 4)))
    xm.t = f.input(name="t", default=np.eye(4)[[0, 3, 1]])
    xm.p = f.softMax(xm.o)
    xm.loss = f.mean(f.crossEnt(xm.p, xm.t)) + f.mean(f.square(xm.p))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    ga = [Autograd(xm, passes=ps) for ps in ((), ("crossent_softmax",))]
    g = [a.bprop(w, a.eval(w, xm.inputDict()), loss=np.float64(1.0))["o"] for a in ga]
    np.testing.assert_allclose(g[0], g[1], rtol=1e-12, atol=1e-15)
    assert grad_check(xm, w).ok


# --------------------------------------------------------------------------------------
# Operators, accumulation, aliasing
# --------------------------------------------------------------------------------------
def test_operator_overloading_builds_add_subtract_mul():
    a, b = f.input(name="a"), f.input(name="b")
    assert (a + b).op.name == "add" and (a + b).inputs == (a, b)
    assert (a - b).op.name == "subtract" and (a - b).inputs == (a, b)
    assert (a * b).op.name == "mul" and (a @ b).op.name == "mul" and (a @ b).inputs == (a, b)
    xm = XMan()
    A, B = np.arange(6.0).reshape(2, 3), np.arange(12.0).reshape(3, 4) - 5
    C = np.ones((2, 4)) * 0.5
    xm.a = f.input(name="a", default=A)
    xm.b = f.input(name="b", default=B)
    xm.c = f.input(name="c", default=C)
    xm.out = xm.a @ xm.b - xm.c + xm.a * xm.b
    xm.setup()
    v = Autograd(xm).eval(xm.operationSequence(xm.out), xm.inputDict())
    np.testing.assert_array_equal(v["out"], A @ B - C + A @ B)


@pytest.mark.parametrize("build, grad", [
    (lambda a: f.hadamard(a, a), lambda a: 2 * a),   # d(a*a)/da = 2a
    (lambda a: a + a, lambda a: 2 * np.ones_like(a)),
    (lambda a: a - a, lambda a: np.zeros_like(a)),
    (lambda a: f.hadamard(a + a, a), lambda a: 4 * a),
])
def test_gradients_accumulate_when_a_register_is_used_twice(build, grad):
    a0 = np.array([[1.0, -2.0], [0.5, 3.0]])
    xm = XMan()
    xm.a = f.param(name="a", default=a0)
    xm.loss = f.mean(build(xm.a))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    ad = Autograd(xm)
    g = ad.bprop(w, ad.eval(w, xm.inputDict()), loss=np.float64(1.0))
    np.testing.assert_allclose(g["a"], grad(a0) / a0.size, rtol=1e-15, atol=0)


@pytest.mark.parametrize("fuse", [False, True])
def test_third_and_later_gradient_terms_add_into_a_sum_of_their_own(fuse):
    """From its third term on, a gradient is added in place into the array its second term made;
    never into the first term, which may be another register's gradient (add hands delta back
    unchanged to both inputs)."""
    a0, b0 = np.array([[1.0, -2.0], [0.5, 3.0]]), np.array([[2.0, 1.0], [-1.0, 0.25]])
    xm = XMan()
    xm.a = f.param(name="a", default=a0)
    xm.b = f.param(name="b", default=b0)
    # walking back, a's first gradient term is the delta that add(a, b) hands unchanged to a and b
    xm.loss = f.mean(f.tanh(xm.a) + f.hadamard(xm.a, xm.a) + (xm.a + xm.b))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    ad = Autograd(xm, fuse=fuse)
    g = ad.bprop(w, ad.eval(w, xm.inputDict()), loss=np.float64(1.0))
    n = a0.size
    np.testing.assert_array_equal(g["b"], np.full((2, 2), 1 / n))      # b's gradient: that delta, untouched
    np.testing.assert_allclose(g["a"], (1 - np.tanh(a0) ** 2 + 2 * a0 + 1) / n, rtol=1e-14, atol=0)


def test_param_gradients_are_distinct_arrays():
    xm = XMan()
    xm.a = f.param(name="a", default=np.ones((2, 3)))
    xm.b = f.param(name="b", default=np.full((2, 3), 2.0))
    xm.c = xm.a + xm.b                          # add hands delta back unchanged to both inputs
    xm.loss = f.mean(xm.c)
    xm.setup()
    w = xm.operationSequence(xm.loss)
    ad = Autograd(xm)
    g = ad.bprop(w, ad.eval(w, xm.inputDict()), loss=np.float64(1.0))
    assert g["a"] is not g["b"] and not np.shares_memory(g["a"], g["b"])
    g["a"] *= 10.0                              # e.g. in-place gradient clipping
    np.testing.assert_allclose(g["b"], np.full((2, 3), 1 / 6))

    # seeding c itself: both param gradients would be the seed array
    seed = np.ones((2, 3))
    wc = xm.operationSequence(xm.c)
    gc = ad.bprop(wc, ad.eval(wc, xm.inputDict()), c=seed)
    assert not np.shares_memory(gc["a"], gc["b"])
    assert not np.shares_memory(gc["a"], seed) and not np.shares_memory(gc["b"], seed)
    gc["a"] *= 0.0
    gc["b"] *= 0.0
    np.testing.assert_array_equal(seed, np.ones((2, 3)))  # the caller's seed is untouched


@pytest.mark.parametrize("fuse", [False, True])
def test_param_gradients_do_not_share_memory_through_views(fuse):
    """transpose's derivative is a view of delta: in-place clipping must still scale each gradient once."""
    xm = XMan()
    xm.W = f.param(name="W", default=np.ones((3, 3)))
    xm.V = f.param(name="V", default=np.ones((3, 3)))
    xm.loss = f.mean(xm.W + f.transpose(xm.V))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    ad = Autograd(xm, fuse=fuse)
    g = ad.bprop(w, ad.eval(w, xm.inputDict()), loss=np.float64(1.0))
    assert not np.shares_memory(g["W"], g["V"])
    for name in ("W", "V"):
        g[name] *= 0.5
    np.testing.assert_allclose(g["W"], np.full((3, 3), 0.5 / 9), rtol=1e-15)
    np.testing.assert_allclose(g["V"], np.full((3, 3), 0.5 / 9), rtol=1e-15)


# --------------------------------------------------------------------------------------
# Graph rewrites (fusion of elementwise groups, merged matrix products) change nothing numerically
# --------------------------------------------------------------------------------------
_RANDOM_OPS = ["tanh", "sigmoid", "relu", "negate", "square_tanh", "exp_tanh", "logsigmoid",
               "add", "subtract", "hadamard", "mulW", "mulU", "mulV", "onehotV", "onehotO"]


def _random_model(recipe, named):
    """A random DAG over (4, 3) registers: elementwise ops, products with params, shared registers."""
    rng = np.random.default_rng(len(recipe))
    xm = XMan()
    xm.x = f.input(name="x", default=rng.normal(size=(4, 3)))
    xm.p = f.param(name="p", default=rng.normal(size=(4, 3)))
    xm.q = f.param(name="q", default=rng.normal(size=3))           # broadcasts against (4, 3)
    xm.W = f.param(name="W", default=rng.normal(size=(3, 3)) / 2)
    xm.U = f.param(name="U", default=rng.normal(size=(3, 3)) / 2)
    xm.V = f.param(name="V", default=rng.normal(size=(3, 5)) / 2)            # a different width
    xm.O = f.param(name="O", default=rng.normal(size=(6, 3)) / 2)
    xm.X = f.input(name="X", default=_dense(np.array([[0, 5], [2, -1], [-1, -1], [3, 1]]), 6))  # multi-hot
    nodes = [xm.x, xm.p, f.tanh(xm.q) + xm.x]
    for k, (op, i, j) in enumerate(recipe):
        a, b = nodes[i % len(nodes)], nodes[j % len(nodes)]
        r = {"tanh": lambda: f.tanh(a), "sigmoid": lambda: f.sigmoid(a), "relu": lambda: f.relu(a),
             "negate": lambda: f.negate(a), "square_tanh": lambda: f.square(f.tanh(a)),
             "exp_tanh": lambda: f.exp(f.tanh(a)), "logsigmoid": lambda: f.log(f.sigmoid(a)),
             "add": lambda: a + b, "subtract": lambda: a - b, "hadamard": lambda: f.hadamard(a, b),
             "mulW": lambda: a * xm.W, "mulU": lambda: a * xm.U,
             "mulV": lambda: f.tanh(a * xm.V) * f.transpose(xm.V),      # (4, 5) back to (4, 3)
             "onehotV": lambda: f.tanh(xm.X * xm.O) * xm.V * f.transpose(xm.V),
             "onehotO": lambda: f.hadamard(xm.X * xm.O, a)}[op]()
        if k in named:
            setattr(xm, f"n{k}", r)
        nodes.append(r)
    total = nodes[-1]
    for r in nodes[3:-1:2]:
        total = total + r
    xm.loss = f.mean(f.crossEnt(f.softMax(total), f.input(name="t", default=np.eye(3)[[0, 1, 2, 1]])))
    return xm.setup()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=st.lists(st.tuples(st.sampled_from(_RANDOM_OPS), st.integers(0, 20), st.integers(0, 20)),
                       min_size=1, max_size=7),
       named=st.sets(st.integers(0, 6)), dtype=st.sampled_from([np.float64, np.float32]))
def test_rewritten_programs_match_the_seed_step_list(recipe, named, dtype):
    xm = _random_model(recipe, named)
    w = xm.operationSequence(xm.loss)
    inputs = {k: np.asarray(v, dtype) for k, v in xm.inputDict().items()}
    ref = Autograd(xm, passes=(), fuse=False)
    v_ref = ref.eval(w, inputs)                 # the seed's step list, dense one-hot input
    g_ref = ref.bprop(w, v_ref, loss=np.float64(1.0))
    params = ["p", "q", "W", "U", "V", "O"]
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    sparse = {**inputs, "X": OneHot(np.array([[0, 5], [2, -1], [-1, -1], [3, 1]]), 6, dtype)}
    for ad, feed in ((Autograd(xm), inputs), (Autograd(xm), sparse), (Autograd(xm, passes=(), fuse=True), sparse),
                     (Autograd(xm, fuse=False), inputs)):
        values = ad.eval(w, feed)
        grads = ad.bprop(w, values, loss=np.float64(1.0))
        for name in xm.named() & set(v_ref):  # every attribute register stays visible, with its value
            np.testing.assert_allclose(values[name], v_ref[name], **tol, err_msg=name)
            assert np.asarray(values[name]).dtype == dtype, name
        for name in params:
            assert (name in grads) == (name in g_ref)
            if name in grads:
                assert grads[name].dtype == dtype and grads[name].shape == inputs[name].shape
                np.testing.assert_allclose(grads[name], g_ref[name], **tol, err_msg=name)
        assert ad.backward_steps == _expected_backward_steps(params, ad.compile(w, whole=True).steps)


def test_fused_kernels_follow_an_op_redefined_with_replace():
    x, y = sp.symbols("x y")

    def loss_and_grad(fuse):
        xm = XMan()
        xm.a = f.param(name="a", default=np.linspace(-1, 1, 6).reshape(2, 3))
        xm.b = f.param(name="b", default=np.linspace(0.2, 0.7, 3))
        xm.loss = f.mean(f.square(f.engine_gate2(f.tanh(xm.a), xm.b)))
        xm.setup()
        w = xm.operationSequence(xm.loss)
        ad = Autograd(xm, fuse=fuse)
        v = ad.eval(w, xm.inputDict())
        return float(v["loss"]), ad.bprop(w, v, loss=np.float64(1.0))["a"]

    defop("engine_gate2", x * sp.tanh(y), args=[x, y])
    first = loss_and_grad(True)
    np.testing.assert_allclose(first[1], loss_and_grad(False)[1], rtol=1e-12)
    defop("engine_gate2", x * sp.exp(y), args=[x, y], replace=True)
    fused, plain = loss_and_grad(True), loss_and_grad(False)
    assert fused[0] != pytest.approx(first[0])
    assert fused[0] == pytest.approx(plain[0], rel=1e-12)
    np.testing.assert_allclose(fused[1], plain[1], rtol=1e-12)


def test_products_with_one_left_operand_and_different_widths():
    """x*W1 and x*W2 share x but not a shape: the default passes must still compute them."""
    rng = np.random.default_rng(8)
    xm = XMan()
    xm.x = f.input(name="x", default=rng.normal(size=(2, 4)))
    xm.W1 = f.param(name="W1", default=rng.normal(size=(4, 3)))
    xm.W2 = f.param(name="W2", default=rng.normal(size=(4, 5)))
    xm.W3 = f.param(name="W3", default=rng.normal(size=(4, 3)))
    xm.loss = f.mean(f.tanh(xm.x * xm.W1)) + f.mean(f.tanh(xm.x * xm.W2)) + f.mean(f.sigmoid(xm.x * xm.W3))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    ref = _reference_grads(xm)
    ad = Autograd(xm)
    grads = ad.bprop(w, ad.eval(w, xm.inputDict()), loss=np.float64(1.0))
    for name in ("W1", "W2", "W3"):
        np.testing.assert_allclose(grads[name], ref[name], rtol=1e-12, atol=1e-15)
    assert grad_check(xm, w).ok


# --------------------------------------------------------------------------------------
# OneHot
# --------------------------------------------------------------------------------------
def _dense(indices, depth, dtype=np.float64):
    idx = np.asarray(indices)
    idx = idx[:, None] if idx.ndim == 1 else idx
    d = np.zeros((len(idx), depth), dtype)
    for r, row in enumerate(idx):
        for c in row:
            if c >= 0:
                d[r, c] = 1
    return d


def _onehot_model(X, dtype, seed=4):
    rng = np.random.default_rng(seed)
    depth = X.shape[1]
    xm = XMan()
    xm.X = f.input(name="X")
    xm.t = f.input(name="t", default=np.eye(3, dtype=dtype)[rng.integers(0, 3, X.shape[0])])
    xm.W = f.param(name="W", default=rng.normal(size=(depth, 5)).astype(dtype))
    xm.W2 = f.param(name="W2", default=rng.normal(size=(5, 3)).astype(dtype))
    xm.b = f.param(name="b", default=rng.normal(size=5).astype(dtype))
    xm.h = f.tanh(xm.X * xm.W + xm.b)
    xm.outputs = f.softMax(xm.h * xm.W2)
    xm.loss = f.mean(f.crossEnt(xm.outputs, xm.t))
    return xm.setup()


def test_per_position_one_hots_are_the_columns_checked_once():
    codes = np.array([[0, 5, -1], [2, -1, -1], [4, 1, 3]], dtype=np.int32)
    parts = OneHot.per_position(codes, 6, np.float32)
    assert len(parts) == 3
    for t, x in enumerate(parts):
        assert x.shape == (3, 6) and x.dtype == np.float32 and x.indices.flags.c_contiguous
        np.testing.assert_array_equal(np.asarray(x), _dense(codes[:, t], 6, np.float32))
    with pytest.raises(symdiff.SymdiffError, match=r"codes must lie in \[-1, 5\], got \[0, 6\]"):
        OneHot.per_position(np.array([[0, 6]]), 6)
    with pytest.raises(symdiff.SymdiffError, match="integer array of shape"):
        OneHot.per_position(np.array([0.0, 1.0]), 6)


def test_all_positions_stacked_in_order_are_a_view_of_the_codes():
    codes = np.array([[0, 5, -1], [2, -1, -1], [4, 1, 3]], dtype=np.int32)
    parts = OneHot.per_position(codes, 6, np.float32)
    stacked = OneHot.vstack(parts)  # x0 rows, then x1 rows, ...: the position-major codes themselves
    want = np.concatenate([np.asarray(x) for x in parts])
    np.testing.assert_array_equal(np.asarray(stacked), want)
    assert stacked.dtype == np.float32 and stacked.indices.shape == (9, 1)
    assert np.shares_memory(stacked.indices, parts[0].indices)
    for others in (parts[::-1], parts[:2], [parts[0], parts[1], OneHot(codes[:, 2], 6, np.float32)]):
        again = OneHot.vstack(others)  # any other stack is a copy, in the order given
        np.testing.assert_array_equal(np.asarray(again), np.concatenate([np.asarray(x) for x in others]))
        assert not np.shares_memory(again.indices, parts[0].indices)


def test_vconcat_of_one_hots_stays_one_hot_only_for_one_depth_and_views_only_one_call():
    from symdiff.ops import Stack
    codes = np.array([[0, 5, -1], [2, -1, -1], [4, 1, 3]], dtype=np.int32)
    parts = OneHot.per_position(codes, 6, np.float32)
    vconcat = Stack(3, 0)
    stacked, layout = vconcat.forward(*parts)
    assert isinstance(stacked, OneHot) and np.shares_memory(stacked.indices, parts[0].indices)
    assert layout[0].tolist() == [0, 3, 6, 9]
    # the same position from another call (other codes): a copy in the order given, not the first call's view
    other = OneHot.per_position(codes[::-1].copy(), 6, np.float32)
    mixed = [parts[0], other[1], parts[2]]
    again, _ = vconcat.forward(*mixed)
    np.testing.assert_array_equal(np.asarray(again), np.concatenate([np.asarray(x) for x in mixed]))
    assert not np.shares_memory(again.indices, parts[0].indices)
    # a plain array among them, or a one-hot of another depth: the dense join (or its error), never a OneHot
    dense = np.ones((3, 6), np.float32)
    joined, _ = vconcat.forward(parts[0], dense, parts[2])
    assert type(joined) is np.ndarray
    np.testing.assert_array_equal(joined, np.concatenate([np.asarray(parts[0]), dense, np.asarray(parts[2])]))
    with pytest.raises(ValueError, match="agree along axis"):
        vconcat.forward(parts[0], OneHot(codes[:, 1], 7, np.float32), parts[2])


@pytest.mark.parametrize("indices", [
    np.array([0, 3, 5, 1, 3]),                                     # one-hot rows
    np.array([0, -1, 5, -1, 2]),                                   # with padding rows (all zero)
    np.array([[0, 2, -1], [5, -1, -1], [1, 3, 4], [-1, -1, -1], [2, 0, 5]]),   # multi-hot + padding
])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_onehot_matches_dense_through_mul(indices, dtype):
    dense = _dense(indices, 6, dtype)
    xm = _onehot_model(dense, dtype)
    w = xm.operationSequence(xm.loss)
    results = []
    for X in (OneHot(indices, 6, dtype), dense):
        ad = Autograd(xm)
        values = ad.eval(w, xm.inputDict(X=X))
        grads = ad.bprop(w, values, loss=np.float64(1.0))
        results.append((values, grads))
    (vs, gs), (vd, gd) = results
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    for name in ("h", "outputs", "loss"):
        np.testing.assert_allclose(vs[name], vd[name], **tol)
    for name in ("W", "W2", "b"):
        assert gs[name].dtype == dtype
        np.testing.assert_allclose(gs[name], gd[name], **tol)
    assert "X" not in gs
    # rows of W that no example selects get exactly zero gradient
    unused = sorted(set(range(6)) - set(np.asarray(indices).ravel().tolist()))
    assert not gs["W"][unused].any()
    assert grad_check(xm, w, xm.inputDict(X=OneHot(indices, 6, dtype))).ok


def test_onehot_used_outside_mul_behaves_as_its_dense_matrix():
    idx = np.array([2, 0, -1, 1])
    dense = _dense(idx, 3)
    rng = np.random.default_rng(5)
    xm = XMan()
    xm.X = f.input(name="X")
    xm.T = f.input(name="T")
    xm.W = f.param(name="W", default=rng.normal(size=(3, 3)))
    xm.z = f.hadamard(xm.X * xm.W, xm.X) + xm.X     # X both as mul operand and elementwise
    xm.loss = f.mean(f.crossEnt(f.softMax(xm.z), xm.T))  # OneHot targets too
    xm.setup()
    w = xm.operationSequence(xm.loss)
    out = []
    for X, T in ((OneHot(idx, 3), OneHot(np.array([0, 1, 2, 2]), 3)), (dense, np.eye(3)[[0, 1, 2, 2]])):
        for passes in ((), ("crossent_softmax",)):
            ad = Autograd(xm, passes=passes)
            v = ad.eval(w, {"X": X, "T": T, "W": xm.W.default})
            out.append((v["loss"], ad.bprop(w, v, loss=np.float64(1.0))["W"]))
    for loss, gW in out[1:]:
        np.testing.assert_allclose(loss, out[0][0], rtol=1e-12)
        np.testing.assert_allclose(gW, out[0][1], rtol=1e-12, atol=1e-15)


def test_onehot_shape_mismatch_is_a_shape_error():
    xm = XMan()
    xm.X = f.input(name="X")
    xm.W = f.param(name="W", default=np.ones((4, 2)))
    xm.h = xm.X * xm.W
    xm.setup()
    with pytest.raises(ShapeError, match=r"'mul'.*'h'"):
        Autograd(xm).eval(xm.operationSequence(xm.h), xm.inputDict(X=OneHot(np.array([0, 1]), 3)))


# --------------------------------------------------------------------------------------
# float32
# --------------------------------------------------------------------------------------
def _float32_model(dtype):
    rng = np.random.default_rng(6)
    x = sp.Symbol("x")
    swish = defop("engine_swish", x / (1 + sp.exp(-x)), args=[x], replace=True)
    leaky = defop("engine_leaky", sp.Max(x, x / 10), args=[x], replace=True)     # derivative: select()
    step = defop("engine_step", sp.Piecewise((1, x > 0), (0, True)), args=[x], replace=True)  # integer choices
    xm = XMan()
    xm.a = f.input(name="a", default=rng.normal(size=(5, 4)).astype(dtype))
    xm.t = f.input(name="t", default=np.eye(3, dtype=dtype)[rng.integers(0, 3, 5)])
    xm.W = f.param(name="W", default=rng.normal(size=(4, 3)).astype(dtype))
    xm.b = f.param(name="b", default=rng.normal(size=3).astype(dtype))
    xm.h = swish(f.sigmoid(xm.a * xm.W + xm.b)) - f.relu(f.negate(f.exp(f.tanh(xm.b))))
    xm.h2 = leaky(xm.h) + step(xm.h)
    xm.outputs = f.softMax(f.hadamard(f.square(xm.h2), f.log(f.sigmoid(xm.h))))
    xm.loss = f.mean(f.crossEnt(xm.outputs, xm.t))
    return xm.setup()


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("passes", [(), ("crossent_softmax",)])
@pytest.mark.parametrize("seed", [np.float64(1.0), 1.0, np.float32(1.0)])
def test_float32_stays_float32_through_forward_and_backward(passes, seed, fuse):
    xm = _float32_model(np.float32)
    w = xm.operationSequence(xm.loss)
    ad = Autograd(xm, passes=passes, fuse=fuse)
    values = ad.eval(w, xm.inputDict())
    grads = ad.bprop(w, values, loss=seed)
    assert {k: np.asarray(v).dtype for k, v in values.items() if np.asarray(v).dtype != np.float32} == {}
    assert {k: np.asarray(g).dtype for k, g in grads.items() if np.asarray(g).dtype != np.float32} == {}
    # and float32 agrees with the same model in float64
    xm64 = _float32_model(np.float64)
    ad64 = Autograd(xm64, passes=passes, fuse=fuse)
    v64 = ad64.eval(w, xm64.inputDict(**{k: np.asarray(v, np.float64) for k, v in xm.inputDict().items()}))
    g64 = ad64.bprop(w, v64, loss=np.float64(1.0))
    for name in ("W", "b"):
        np.testing.assert_allclose(grads[name], g64[name], rtol=2e-4, atol=1e-6)


# --------------------------------------------------------------------------------------
# grad_check
# --------------------------------------------------------------------------------------
def test_grad_check_report_fields():
    xm = _classifier()
    report = grad_check(xm, xm.operationSequence(xm.loss), max_elements=None)
    assert report.ok
    by_name = {p.name: p for p in report.params}
    assert set(by_name) == {"W", "b"}
    assert by_name["W"].shape == (4, 3) and by_name["W"].checked == 12
    assert by_name["b"].shape == (3,) and by_name["b"].checked == 3
    for p in report.params:
        assert p.ok and 0 <= p.max_abs < 1e-7 and 0 <= p.max_rel < 1e-5
    assert "W" in str(report) and "yes" in str(report)


def test_grad_check_fails_on_a_wrong_hand_made_backward():
    # forward x**2 but backward claims d/dx = x instead of 2x
    wrong = Op("engine_wrong_square", 1, np.square, (lambda delta, out, x: delta * x,), elementwise=True)
    register(wrong, replace=True)
    rng = np.random.default_rng(7)
    xm = XMan()
    xm.W = f.param(name="W", default=rng.uniform(0.5, 1.5, size=(3, 2)))
    xm.ok_param = f.param(name="ok_param", default=rng.normal(size=(3, 2)))
    xm.loss = f.mean(f.engine_wrong_square(xm.W) + f.tanh(xm.ok_param))
    xm.setup()
    report = grad_check(xm, xm.operationSequence(xm.loss))
    assert not report.ok
    by_name = {p.name: p for p in report.params}
    assert not by_name["W"].ok and by_name["W"].max_rel == pytest.approx(0.5, rel=1e-4)
    assert by_name["ok_param"].ok
    assert "NO" in str(report)


# --------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------
def test_shape_mismatch_names_op_register_and_shapes():
    xm = XMan()
    xm.a = f.input(name="a", default=np.ones((3, 4)))
    xm.W = f.param(name="W", default=np.ones((5, 2)))
    xm.h = xm.a * xm.W
    xm.setup()
    with pytest.raises(ShapeError) as info:
        Autograd(xm).eval(xm.operationSequence(xm.h), xm.inputDict())
    msg = str(info.value)
    assert "'mul'" in msg and "'h'" in msg and "a(3, 4)" in msg and "W(5, 2)" in msg


def test_broadcast_mismatch_in_an_elementwise_op_is_a_shape_error():
    xm = XMan()
    xm.a = f.input(name="a", default=np.ones((3, 4)))
    xm.b = f.param(name="b", default=np.ones(5))
    xm.s = xm.a + xm.b
    xm.setup()
    with pytest.raises(ShapeError, match=r"'add'.*'s'.*a\(3, 4\).*b\(5,\)"):
        Autograd(xm).eval(xm.operationSequence(xm.s), xm.inputDict())


def test_shape_mismatch_inside_a_fused_group_names_the_op_and_shapes():
    xm = XMan()
    xm.a = f.input(name="a", default=np.ones((3, 4)))
    xm.b = f.param(name="b", default=np.ones(5))
    xm.s = xm.a + xm.b
    xm.h = f.tanh(f.sigmoid(xm.s))
    xm.setup()
    ad = Autograd(xm)
    w = xm.operationSequence(xm.h)
    assert any(isinstance(s.output, tuple) for s in ad.compile(w).steps)  # add, sigmoid, tanh fused
    with pytest.raises(ShapeError) as info:
        ad.eval(w, xm.inputDict())
    msg = str(info.value)
    assert "add" in msg and "'s" in msg and "a(3, 4)" in msg and "b(5,)" in msg


def test_missing_input_names_the_register():
    xm = XMan()
    xm.data = f.input(name="data")            # no default
    xm.W = f.param(name="W", default=np.ones((2, 2)))
    xm.h = xm.data * xm.W
    xm.setup()
    with pytest.raises(MissingInputError, match="'data'") as info:
        Autograd(xm).eval(xm.operationSequence(xm.h), xm.inputDict())
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_unknown_op_is_a_value_error_with_a_hint():
    with pytest.raises(ValueError, match="unknown op 'nosuchop'.*defop"):
        f.nosuchop
    with pytest.raises(ValueError, match="Did you mean sigmoid"):
        f.sigmoi


def test_defop_symbol_not_in_args():
    x, z = sp.symbols("x z")
    with pytest.raises(ValueError, match=r"\bz\b.*not in args"):
        defop("engine_stray", x + z, args=[x])
    assert "engine_stray" not in symdiff.OPS


def test_defop_string_expression():
    x = sp.Symbol("x")
    with pytest.raises(TypeError, match="string"):
        defop("engine_text", "x + 1", args=[x])


def test_defop_undefined_function():
    x = sp.Symbol("x")
    with pytest.raises(ValueError, match=r"undefined function\(s\) g\b"):
        defop("engine_undefined", sp.Function("g")(x) + x, args=[x])


@pytest.mark.parametrize("make, why", [
    (lambda x: sp.zeta(x), r"cannot differentiate zeta\(x\) \(the derivative wrt x stays Derivative\(zeta\(x\), x\)\)"),
    (lambda x: sp.li(x), r"forward expression uses li \(in li\(x\)\), which neither numpy nor scipy.special can evaluate"),
    (lambda x: sp.elliptic_k(x), "forward expression uses elliptic_k"),
])
def test_defop_function_nothing_can_evaluate_fails_at_declaration(make, why):
    x = sp.Symbol("x")
    with pytest.raises(TypeError, match="engine_unprintable.*" + why):
        defop("engine_unprintable", make(x), args=[x])
    assert "engine_unprintable" not in symdiff.OPS


def test_redefining_an_op_needs_replace():
    x = sp.Symbol("x")
    first = defop("engine_twice", x + 1, args=[x])
    with pytest.raises(ValueError, match="'engine_twice' already exists.*replace=True"):
        defop("engine_twice", x + 2, args=[x])
    assert symdiff.OPS["engine_twice"] is first
    with pytest.raises(ValueError, match="already exists"):
        defop("relu", sp.Max(x, 0), args=[x])       # built-ins are protected the same way
    second = defop("engine_twice", x + 2, args=[x], replace=True)
    assert symdiff.OPS["engine_twice"] is second
    np.testing.assert_array_equal(second.forward(np.zeros(2)), [2.0, 2.0])


def test_arity_mismatch_and_non_register_arguments():
    a, b = f.input(name="a"), f.input(name="b")
    with pytest.raises(TypeError, match="'relu' takes 1 register"):
        f.relu(a, b)
    with pytest.raises(TypeError, match="input 0 of op 'relu' is a int, not a register"):
        f.relu(3)
    with pytest.raises(TypeError, match="cannot combine register a with an array.*wrap arrays with f.input"):
        a + np.ones(3)


def test_two_registers_with_the_same_name_fail_at_setup():
    xm = XMan()
    xm.a = f.input(name="w")
    xm.b = f.param(name="w")
    xm.c = xm.a + xm.b
    with pytest.raises(ValueError, match="'w'"):
        xm.setup()


def test_a_wengert_list_rebuilt_every_step_is_compiled_once():
    """Seed-style loops call operationSequence inside the loop: the program is found by content."""
    rng = np.random.default_rng(3)
    xm = XMan()
    xm.x = f.input(name="x", default=rng.normal(size=(2, 3)))
    xm.W = f.param(name="W", default=rng.normal(size=(3, 3)))
    xm.loss = f.mean(f.tanh(xm.x * xm.W))
    xm.setup()
    ad = Autograd(xm)
    first = ad.compile(xm.operationSequence(xm.loss))
    for _ in range(5):
        w = xm.operationSequence(xm.loss)
        assert ad.compile(w) is first
        ad.bprop(w, ad.eval(w, xm.inputDict()), loss=np.float64(1.0))
    assert ad.forward_steps == 5 * len(first.steps)


# ---- messages the sampled mutants changed unnoticed (docs/testing.md) ----------------------------------
def test_bprop_without_a_seed_says_how_to_give_one():
    xm = XMan()
    xm.a = f.input(name="a", default=np.ones(3))
    xm.loss = f.mean(f.tanh(xm.a))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    ad = Autograd(xm)
    with pytest.raises(symdiff.GraphError,
                       match=r"^bprop needs the output to differentiate, e\.g\. bprop\(w, values, loss=np\.float64\(1\.0\)\)$"):
        ad.bprop(w, ad.eval(w, xm.inputDict()))


def test_a_failing_backward_kernel_is_named_with_its_phase():
    def broken(delta, out, x):
        raise ValueError("planted failure")

    register(Op("engine_broken_backward", 1, np.tanh, (broken,)))
    xm = XMan()
    xm.W = f.param(name="W", default=np.ones(3))
    xm.loss = f.mean(f.engine_broken_backward(xm.W))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    ad = Autograd(xm, fuse=False)
    values = ad.eval(w, xm.inputDict())
    with pytest.raises(symdiff.SymdiffError, match=r"^backward of op 'engine_broken_backward' computing register "
                                                   r".*failed for inputs W\(3,\): planted failure"):
        ad.bprop(w, values, loss=np.float64(1.0))


def test_a_program_without_an_xman_lists_its_inputs_for_an_unknown_name():
    from symdiff.autograd import Counters, Program
    from symdiff.graph import Step

    program = Program([Step("h", "tanh", ("a",))], (), Counters(), False)
    with pytest.raises(symdiff.UnknownNameError, match=r"^unknown input 'zzz': .* Known inputs: a\.$"):
        program.forward({"zzz": np.ones(2)})


def test_vector_dot_vector_gradients_are_the_other_vector():
    av, bv = np.array([0.5, 2.0, 3.0]), np.array([4.0, -1.0, 0.25])
    xm = XMan()
    xm.a = f.param(name="a", default=av.copy())
    xm.b = f.param(name="b", default=bv.copy())
    xm.loss = xm.a @ xm.b
    xm.setup()
    w = xm.operationSequence(xm.loss)
    ad = Autograd(xm, passes=(), fuse=False)
    grads = ad.bprop(w, ad.eval(w, xm.inputDict()), loss=np.float64(1.0))
    np.testing.assert_allclose(grads["a"], bv, rtol=1e-15)
    np.testing.assert_allclose(grads["b"], av, rtol=1e-15)
