"""Gradients as graphs: grad of grad, Hessian-vector products and forward mode (issue #13).

Checks that need no finite differences (symmetry, dot tests, known Hessians)
come first; then central differences of gradients on the shipped models, the
order recursion of ``check_grads`` over every registered op and random graphs,
broadcasting and size-1 axes, and the errors.
"""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import symdiff
from symdiff import Autograd, Op, XMan, defop, f
from symdiff.differential import HVP, GradientError, grad, hvp, jvp, wengert_for
from symdiff.gradcheck import check_grads
from symdiff.registry import register
from models.training import build_model

from test_ops_autoverify import DOMAINS, input_cases

SMALL = dict(max_len=3, num_chars=5, num_hid=4, num_labels=3)


def _eval(gx: XMan, names, values=None, **kw):
    return Autograd(gx, **kw).eval(wengert_for(gx, names), gx.inputDict() if values is None else values)


def _unit(rng, shapes: dict) -> dict:
    v = {k: rng.standard_normal(s) for k, s in shapes.items()}
    norm = np.sqrt(sum(float(np.sum(a * a)) for a in v.values()))
    return {k: a / norm for k, a in v.items()}


def _flat(d: dict, names) -> np.ndarray:
    return np.concatenate([np.ravel(d[n]) for n in names])


def _full_hessian(xm: XMan, of: str, wrt, values, mode="forward") -> np.ndarray:
    """The Hessian from basis HVPs: column i is H e_i."""
    h = HVP(xm, of, wrt, mode=mode)
    shapes = {w: np.shape(values[w]) for w in wrt}
    sizes = [int(np.prod(s)) for s in shapes.values()]
    n = sum(sizes)
    cols = []
    for i in range(n):
        e = np.zeros(n)
        e[i] = 1.0
        parts, at = {}, 0
        for w, size in zip(wrt, sizes):
            parts[w] = e[at:at + size].reshape(shapes[w])
            at += size
        cols.append(_flat(h(parts, values), wrt))
    return np.stack(cols, axis=1)


# --------------------------------------------------------------------------------------
# known answers
# --------------------------------------------------------------------------------------
def test_sum_of_squares_has_hessian_two_times_identity():
    xm = XMan()
    xm.x = f.param(name="x", default=np.array([0.3, -1.2, 2.0, 5.0]))
    xm.loss = f.sum(f.square(xm.x))
    xm.setup()
    for mode in ("forward", "reverse"):
        np.testing.assert_array_equal(_full_hessian(xm, "loss", ["x"], xm.inputDict(), mode), 2 * np.eye(4))


def test_third_derivative_of_x_cubed_is_six():
    xm = XMan()
    xm.x = f.param(name="x", default=np.array([-2.0, 0.0, 0.5, 3.0]))
    xm.loss = f.sum(f.hadamard(f.square(xm.x), xm.x))
    xm.setup()
    g1 = grad(xm, "loss", ["x"])
    g1.s1 = f.sum(g1.grad_x)
    g2 = grad(g1.setup(), "s1", ["x"], prefix="d2_")
    g2.s2 = f.sum(g2.d2_x)
    g3 = grad(g2.setup(), "s2", ["x"], prefix="d3_")
    v = _eval(g3, ["grad_x", "d2_x", "d3_x"])
    x = xm.inputDict()["x"]
    np.testing.assert_allclose(v["grad_x"], 3 * x**2, rtol=1e-15)
    np.testing.assert_allclose(v["d2_x"], 6 * x, rtol=1e-15)
    np.testing.assert_array_equal(v["d3_x"], 6.0)


def test_relu_second_derivative_is_zero_everywhere_including_zero():
    xm = XMan()
    x = np.array([-2.0, -1e-300, 0.0, -0.0, 1e-300, 3.0])
    xm.x = f.param(name="x", default=x)
    xm.loss = f.sum(f.relu(xm.x))
    xm.setup()
    g1 = grad(xm, "loss", ["x"])
    np.testing.assert_array_equal(_eval(g1, ["grad_x"])["grad_x"], [0, 0, 0, 0, 1, 1])  # relu'(0) = 0
    for mode in ("forward", "reverse"):
        h = hvp(xm, "loss", ["x"], {"x": np.ones(6)}) if mode == "forward" else \
            HVP(xm, "loss", ["x"], mode="reverse")({"x": np.ones(6)}, xm.inputDict())
        assert np.all(h["x"] == 0) and not np.isnan(h["x"]).any()


def test_grad_keeps_every_register_and_adds_one_per_name():
    m = build_model("mlp", SMALL, seed=0)
    xm = m.xm
    before = {n: (r.name, r.op) for n, r in xm.registers().items()}
    gx = grad(xm, "loss", ["W1", "b2"])
    assert set(xm.registers()) <= set(gx.registers())
    assert gx.grad_W1 is gx.register("grad_W1") and gx.grad_b2.name == "grad_b2"
    assert {n: (r.name, r.op) for n, r in xm.registers().items()} == before  # the original is untouched
    assert "grad_W1" not in xm.registers()
    # an extension of the gradient graph is an ordinary graph
    gx.gnorm = f.sum(f.square(gx.grad_W1))
    gx.setup()
    v = _eval(gx, ["gnorm", "grad_W1"])
    assert np.isclose(v["gnorm"], np.sum(v["grad_W1"] ** 2))


# --------------------------------------------------------------------------------------
# gradient graph against the engine's bprop, and against central differences
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "lstm"])
@pytest.mark.parametrize("fuse", [True, False])
def test_gradient_graph_agrees_with_bprop(kind, fuse):
    """Point 6: training keeps its own backward; the gradient graph must give the same numbers."""
    m = build_model(kind, SMALL, seed=3)
    xm = m.xm
    rng = np.random.default_rng(0)
    params = xm.params()
    values = xm.inputDict(**{p: rng.normal(0, 0.5, np.shape(v)) for p, v in m.params.items()})
    values.update(m.feed(rng.integers(-1, 5, size=(6, 3))))
    values["y"] = np.eye(3)[rng.integers(0, 3, 6)]
    ad = Autograd(xm, fuse=fuse)
    w = xm.operationSequence(xm.loss)
    g = ad.bprop(w, ad.eval(w, values), loss=np.float64(1.0))
    gx = grad(xm, "loss", params)
    v = Autograd(gx, fuse=fuse).eval(wengert_for(gx, [f"grad_{p}" for p in params]), values)
    for p in params:
        np.testing.assert_allclose(v[f"grad_{p}"], g[p], rtol=1e-12, atol=1e-12, err_msg=p)


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_hvp_matches_central_differences_of_gradients(kind, mode):
    m = build_model(kind, SMALL, seed=1)
    xm = m.xm
    params = xm.params()
    values = xm.inputDict()
    rng = np.random.default_rng(2)
    v = _unit(rng, {p: np.shape(values[p]) for p in params})
    hv = HVP(xm, "loss", params, mode=mode)(v, values)
    gx = grad(xm, "loss", params)
    ad = Autograd(gx)
    w = wengert_for(gx, [f"grad_{p}" for p in params])
    eps = 1e-5

    def g(sign):
        out = ad.eval(w, {**values, **{p: values[p] + sign * eps * v[p] for p in params}})
        return {p: out[f"grad_{p}"] for p in params}

    up, down = g(1), g(-1)
    num = (_flat(up, params) - _flat(down, params)) / (2 * eps)
    assert np.linalg.norm(_flat(hv, params) - num) <= 1e-6 * np.linalg.norm(num)


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_hvp_is_symmetric_and_both_modes_agree(kind):
    m = build_model(kind, SMALL, seed=2)
    xm = m.xm
    params = xm.params()
    values = xm.inputDict()
    rng = np.random.default_rng(5)
    shapes = {p: np.shape(values[p]) for p in params}
    v, w = _unit(rng, shapes), _unit(rng, shapes)
    hv, hw = hvp(xm, "loss", params, v, values), hvp(xm, "loss", params, w, values)
    assert abs(_flat(w, params) @ _flat(hv, params) - _flat(v, params) @ _flat(hw, params)) <= 1e-10
    hv_rr = HVP(xm, "loss", params, mode="reverse")(v, values)
    np.testing.assert_allclose(_flat(hv_rr, params), _flat(hv, params), rtol=1e-9, atol=1e-12)


def test_full_hessian_of_a_small_model_is_symmetric():
    m = build_model("mlp", dict(max_len=2, num_chars=3, num_hid=3, num_labels=3), seed=4)
    xm = m.xm
    params = xm.params()
    H = _full_hessian(xm, "loss", params, xm.inputDict())
    assert H.shape[0] == sum(np.size(m.params[p]) for p in params)
    assert np.max(np.abs(H - H.T)) <= 1e-12 * max(1.0, np.max(np.abs(H)))
    assert np.abs(H).max() > 0


# --------------------------------------------------------------------------------------
# forward mode
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_jvp_dot_test_against_bprop(kind):
    """⟨u, J v⟩ (jvp) = ⟨Jᵀ u, v⟩ (bprop seeded with u on the output)."""
    m = build_model(kind, SMALL, seed=6)
    xm = m.xm
    params = xm.params()
    values = xm.inputDict()
    rng = np.random.default_rng(7)
    v = _unit(rng, {p: np.shape(values[p]) for p in params})
    jv = jvp(xm, "outputs", v, values)
    ad = Autograd(xm)
    wl = xm.operationSequence(xm.outputs)
    vals = ad.eval(wl, values)
    u = rng.standard_normal(np.shape(vals["outputs"]))
    jtu = ad.bprop(wl, vals, outputs=u)
    assert abs(np.sum(u * jv) - _flat(jtu, params) @ _flat(v, params)) <= 1e-10


def test_jvp_matches_a_jacobian_column_from_central_differences():
    m = build_model("lstm", SMALL, seed=8)
    xm = m.xm
    values = xm.inputDict()
    i = 5
    e = np.zeros(np.size(values["Uf"]))
    e[i] = 1.0
    jv = jvp(xm, "outputs", {"Uf": e.reshape(np.shape(values["Uf"]))}, values)
    eps = 1e-6
    ad = Autograd(xm)
    wl = xm.operationSequence(xm.outputs)

    def out(sign):
        u = values["Uf"].copy()
        u.flat[i] += sign * eps
        return ad.eval(wl, {**values, "Uf": u})["outputs"]

    num = (out(1) - out(-1)) / (2 * eps)
    np.testing.assert_allclose(jv, num, rtol=1e-6, atol=1e-10)


def test_jvp_of_a_register_that_does_not_depend_on_the_tangent_is_zero():
    m = build_model("mlp", SMALL, seed=0)
    values = m.xm.inputDict()
    out = jvp(m.xm, "outputs", {"y": np.ones_like(values["y"])}, values)
    assert out.shape == np.shape(Autograd(m.xm).eval(m.xm.operationSequence(m.xm.outputs), values)["outputs"])
    assert not out.any()


# --------------------------------------------------------------------------------------
# broadcasting and size-1 axes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bshape", [(3,), (1, 3), (5, 1), (1, 1), ()])
def test_hessian_through_broadcasting_and_size_one_axes(bshape):
    rng = np.random.default_rng(9)
    xm = XMan()
    xm.a = f.param(name="a", default=rng.normal(size=(5, 3)))
    xm.b = f.param(name="b", default=rng.normal(size=bshape))
    xm.c = f.input(name="c", default=rng.normal(size=(5, 1)))
    xm.loss = f.sum(f.hadamard(f.tanh(f.hadamard(xm.a, xm.b) + xm.b), xm.c))
    xm.setup()
    values = xm.inputDict()
    H = _full_hessian(xm, "loss", ["a", "b"], values)
    gx = grad(xm, "loss", ["a", "b"])
    ad = Autograd(gx)
    wl = wengert_for(gx, ["grad_a", "grad_b"])
    eps, cols = 1e-6, []
    for name in ("a", "b"):
        for i in range(int(np.prod(bshape if name == "b" else (5, 3)))):
            def g(sign):
                x = np.array(values[name], dtype=float)
                x.flat[i] += sign * eps
                out = ad.eval(wl, {**values, name: x})
                return np.concatenate([np.ravel(out["grad_a"]), np.ravel(out["grad_b"])])
            cols.append((g(1) - g(-1)) / (2 * eps))
    np.testing.assert_allclose(H, np.stack(cols, axis=1), rtol=1e-6, atol=1e-8)
    assert np.max(np.abs(H - H.T)) <= 1e-12 * max(1.0, np.abs(H).max())
    assert H.shape == (15 + int(np.prod(bshape)),) * 2


# --------------------------------------------------------------------------------------
# check_grads(order=3) over every registered op, and over random graphs
# --------------------------------------------------------------------------------------
REFERENCE_INPUTS = {"sum_like": (1,), "broadcast_like": (1,), "spread": (1,)}  # lend only their shapes
OPS_AT_COLLECTION = sorted(symdiff.OPS)


@pytest.mark.parametrize("name", OPS_AT_COLLECTION)
def test_every_op_passes_check_grads_to_order_three(name):
    op = symdiff.OPS[name]
    rng = np.random.default_rng(11)
    xs = input_cases(name, op, rng)[0]
    if op.elementwise:  # keep clear of a kink, and inside the op's domain
        low, high = DOMAINS.get(name, (-2.0, 2.0))
        xs = tuple(np.where(np.abs(x) < 0.05, 0.5, x) if low < 0 else x for x in xs)
    xm = XMan()
    args = [f.input(name=f"p{j}", default=x) if j in op.nondifferentiable  # a mask stays boolean
            else f.param(name=f"p{j}", default=np.array(x, dtype=float)) for j, x in enumerate(xs)]
    out = op(*args)
    probe = XMan()
    probe.out = out
    probe.setup()
    shape = np.shape(_eval(probe, ["out"])["out"])
    xm.out = out
    xm.w = f.input(name="w", default=rng.standard_normal(shape))
    xm.loss = f.sum(f.hadamard(xm.out, xm.w))
    xm.setup()
    wrt = [f"p{j}" for j in range(op.arity) if j not in REFERENCE_INPUTS.get(name, ()) and j not in op.nondifferentiable]
    if not wrt:
        pytest.skip(f"op {name!r} has no differentiable input")
    for check in check_grads(xm, "loss", wrt, order=3, rtol=2e-5, atol=1e-7):
        assert check.ok, f"{name}: order {check.order}: max relative error {check.max_rel:.2e}"


_grammar = st.lists(st.tuples(st.sampled_from(["add", "subtract", "hadamard", "sigmoid", "tanh", "square", "negate",
                                                "mul", "softMax", "mean_row", "exp_small"]),
                              st.integers(0, 10), st.integers(0, 10)), min_size=2, max_size=6)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=_grammar, seed=st.integers(0, 2**31))
def test_random_graphs_pass_check_grads_to_order_three(program, seed):
    rng = np.random.default_rng(seed)
    xm = XMan()
    regs = [f.param(name="a", default=rng.uniform(-1, 1, (3, 3))), f.param(name="b", default=rng.uniform(-1, 1, (3,))),
            f.input(name="c", default=rng.uniform(-1, 1, (3, 3)))]
    for op, i, j in program:
        x, y = regs[i % len(regs)], regs[j % len(regs)]
        if op in ("add", "subtract", "hadamard"):
            regs.append(getattr(f, op)(x, y))
        elif op == "mul":
            regs.append(f.mul(f.broadcast_like(x, regs[0]), f.broadcast_like(y, regs[0])))
        elif op == "softMax":
            regs.append(f.softMax(f.broadcast_like(x, regs[0])))
        elif op == "mean_row":
            regs.append(f.rowsum(f.broadcast_like(x, regs[0])))
        elif op == "exp_small":
            regs.append(f.exp(f.tanh(x)))
        else:
            regs.append(getattr(f, op)(x))
    last = f.broadcast_like(regs[-1], regs[0]) + f.hadamard(regs[0], regs[1])  # a and b always reach the loss
    xm.loss = f.sum(f.hadamard(last, f.input(name="w", default=rng.normal(size=(3, 3)))))
    xm.setup()
    for check in check_grads(xm, "loss", ["a", "b"], order=3, rtol=2e-5, atol=1e-7, max_elements=6, seed=seed % 97):
        assert check.ok, f"{program}: order {check.order}: max relative error {check.max_rel:.2e}"


def test_check_grads_fails_on_a_wrong_second_derivative():
    """The order recursion must catch an op whose first derivative is right but whose partial is wrong."""
    x = sp.Symbol("x")
    op = defop("cg_wrong_cube", x**3, args=[x])
    from symdiff import derivative_ops

    real = op.symbolic.args[0]
    wrong = derivative_ops.expression_op(3 * real**2 + 0 * real, (real,), "cg_wrong_cube__dx")
    assert derivative_ops.partial(op, 0) is wrong  # (an op of that expression may exist already: x ** 3's)
    # plant: d/dx x^3 claimed as 3x^2 (right), but its own derivative claimed as 7x (wrong)
    bad = derivative_ops.expression_op(7 * real, (real,), "cg_wrong_7x")
    derivative_ops._PARTIALS[(id(wrong), 0)] = (wrong, bad)
    xm = XMan()
    xm.x = f.param(name="x", default=np.array([0.5, -1.0, 2.0]))
    xm.loss = f.sum(op(xm.x))
    xm.setup()
    checks = check_grads(xm, "loss", ["x"], order=2)
    assert checks[0].ok and not checks[1].ok
    derivative_ops._PARTIALS.pop((id(wrong), 0))


# --------------------------------------------------------------------------------------
# errors, before numerics
# --------------------------------------------------------------------------------------
def _mlp():
    return build_model("mlp", SMALL, seed=0).xm


def test_of_must_be_a_scalar():
    with pytest.raises(GradientError, match=r"'rowloss' has shape \(4,\), not a scalar"):
        grad(_mlp(), "rowloss", ["W1"])


def test_wrt_must_name_a_param_or_input():
    with pytest.raises(GradientError, match="'O1' is an operation output, not a param or input"):
        grad(_mlp(), "loss", ["O1"])
    with pytest.raises(GradientError, match="'W9' is no register.*W1"):
        grad(_mlp(), "loss", ["W9"])


def test_a_taken_gradient_name_asks_for_another_prefix():
    gx = grad(_mlp(), "loss", ["W1"])
    gx.s = f.sum(gx.grad_W1)
    gx.setup()
    with pytest.raises(GradientError, match="already has a register 'grad_W1'; pass another prefix="):
        grad(gx, "s", ["W1"])
    assert "d2_W1" in grad(gx, "s", ["W1"], prefix="d2_").registers()


def test_vector_and_tangent_shapes_are_checked_before_numerics():
    xm = _mlp()
    with pytest.raises(GradientError, match=r"vector for register 'W2' has shape \(3, 3\), but 'W2' has shape \(4, 3\)"):
        hvp(xm, "loss", ["W2"], {"W2": np.ones((3, 3))})
    with pytest.raises(GradientError, match=r"tangent for register 'b1' has shape \(5,\), but 'b1' has shape \(4,\)"):
        jvp(xm, "loss", {"b1": np.ones(5)})
    with pytest.raises(GradientError, match="no vector given for"):
        hvp(xm, "loss", ["W2", "b2"], {"W2": np.ones((4, 3))})


class _Wobble(sp.Function):
    """sin, printed for numpy, whose derivative is a function numpy has no name for."""

    def _numpycode(self, printer):
        return f"numpy.sin({printer._print(self.args[0])})"

    def fdiff(self, argindex=1):
        return _WobblePrime(self.args[0])


class _WobblePrime(sp.Function):
    def _numpycode(self, printer):
        return f"numpy.cos({printer._print(self.args[0])})"

    def fdiff(self, argindex=1):
        return _Unprintable(self.args[0])


class _Unprintable(sp.Function):
    pass


def test_a_derivative_numpy_cannot_evaluate_is_named():
    x = sp.Symbol("x")
    wobble = defop("wobble", _Wobble(x), args=[x])  # forward and first derivative evaluate
    xm = XMan()
    xm.x = f.param(name="x", default=np.array([1.0, -2.0]))
    xm.loss = f.sum(wobble(xm.x))
    xm.setup()
    with pytest.raises(symdiff.derivative_ops.DerivativeError,
                       match=r"derivative of op 'wobble' with respect to 'x', _WobblePrime\(x\).*_Unprintable"):
        grad(xm, "loss", ["x"])


def test_abs_is_differentiable_at_every_order():
    x = sp.Symbol("x")
    absval = defop("absval", sp.Abs(x), args=[x])  # |x|' = sign(x); sign' is 0 (as relu''), not DiracDelta
    xm = XMan()
    xm.x = f.param(name="x", default=np.array([1.5, -2.0, 0.0]))
    xm.loss = f.sum(f.hadamard(absval(xm.x), xm.x))  # x|x|: derivatives 2|x|, 2 sign(x), 0
    xm.setup()
    g = grad(xm, "loss", ["x"])
    g.s = f.sum(g.grad_x)
    g2 = grad(g.setup(), "s", ["x"], prefix="d2_")
    v = _eval(g2, ["grad_x", "d2_x"])
    np.testing.assert_array_equal(v["grad_x"], [3.0, 4.0, 0.0])
    np.testing.assert_array_equal(v["d2_x"], [2.0, -2.0, 0.0])


def test_an_op_without_a_pullback_is_named():
    register(Op("no_rule_rowmax", 1, lambda a: a.max(axis=1), (lambda d, o, a: d,)), replace=True)
    xm = XMan()
    xm.x = f.param(name="x", default=np.ones((2, 3)))
    xm.loss = f.mean(f.no_rule_rowmax(xm.x))
    xm.setup()
    with pytest.raises(GradientError, match="op 'no_rule_rowmax' has no graph pullback"):
        grad(xm, "loss", ["x"])
    with pytest.raises(GradientError, match="op 'no_rule_rowmax' has no forward rule"):
        jvp(xm, "loss", {"x": np.ones((2, 3))})
