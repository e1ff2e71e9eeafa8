"""Elementwise fusion and product merging: same numbers as the seed's step list, fewer steps.

The rewrites are checked against ``Autograd(xm, passes=(), fuse=False)`` (the
plain Wengert list) on both models as built and on random graphs; every fused
kernel the models produce is checked against central differences on its own.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings, strategies as st

from models.training import build_model
from symdiff import Autograd, MULTI_OPS, XMan, f, grad_check, native
from symdiff.fusion import FusedKernel

DIMS = dict(max_len=4, num_chars=7, num_hid=5, num_labels=3)


def _run(ad, xm, inputs):
    w = xm.operationSequence(xm.register("loss"))
    values = ad.eval(w, inputs)
    grads = ad.bprop(w, values, loss=np.float64(1.0))
    return values, grads, ad.compile(w)


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
@pytest.mark.parametrize("dense", [False, True])
def test_models_agree_with_the_plain_step_list(kind, dense):
    model = build_model(kind, DIMS, seed=3)
    xm = model.xm
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, DIMS["num_chars"], size=(6, DIMS["max_len"]))
    inputs = {**model.params, **model.feed(codes, dense), "y": np.eye(3)[rng.integers(0, 3, 6)]}
    v0, g0, plain = _run(Autograd(xm, passes=(), fuse=False), xm, inputs)
    v1, g1, fast = _run(Autograd(xm), xm, inputs)
    assert len(fast.steps) < len(plain.steps)
    assert any(s.op.startswith("fused") for s in fast.steps)
    for name in ("loss", "outputs", "rowloss"):
        np.testing.assert_allclose(v1[name], v0[name], rtol=1e-10, atol=1e-12)
    for name in model.params:
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-10, atol=1e-12, err_msg=name)


NATIVE = [False, pytest.param(True, marks=pytest.mark.skipif(not native.enabled(),
                                                             reason=f"native kernels: {native.status()}"))]


@contextlib.contextmanager
def running_compiled() -> Iterator[dict[str, int]]:
    """Fused calls run as C however small their arrays; yields the number of calls that really did.

    The engine compiles a kernel only for arrays of 256 elements or more (native.MIN_ELEMENTS), and these tests' arrays
    are smaller: without this a "compiled" test runs numpy, unless an earlier test happened to build
    the same kernel (so what it tests would depend on the order the tests run in).
    """
    dispatch = native.dispatcher()
    calls = {"forward": 0, "backward": 0}
    real = {name: getattr(dispatch, name) for name in calls}

    def counting(name: str):  # type: ignore[no-untyped-def]
        def call(*args):  # type: ignore[no-untyped-def]
            out = real[name](*args)
            calls[name] += out is not None  # None: the arrays did not fit, numpy ran instead
            return out
        return call

    old_min = native.MIN_ELEMENTS
    native.MIN_ELEMENTS = 0
    try:
        for name in calls:
            setattr(dispatch, name, counting(name))
        yield calls
    finally:
        native.MIN_ELEMENTS = old_min
        for name, fn in real.items():
            setattr(dispatch, name, fn)


@pytest.mark.parametrize("compiled", NATIVE)
def test_lstm_cell_derives_once_and_every_step_uses_it(compiled):
    model = build_model("lstm", {**DIMS, "max_len": 6}, seed=0)
    program = Autograd(model.xm, native=compiled).compile(model.xm.operationSequence(model.xm.register("loss")))
    cells = [s.op for s in program.steps if s.op.startswith("fused") and "hadamard" in s.op]
    assert len(cells) == 6 and len(set(cells)) == 1


@pytest.mark.parametrize("compiled", NATIVE)
def test_every_gradient_bprop_returns_under_fusion_is_the_whole_gradient(compiled):
    """The LSTM names every C_t and H_t: bprop gives each its whole gradient under fusion too
    (C_t, also used under tanh(C_t), would otherwise get only the part from outside its group)."""
    model = build_model("lstm", DIMS, seed=3)
    xm = model.xm
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, DIMS["num_chars"], size=(6, DIMS["max_len"]))
    inputs = {**model.params, **model.feed(codes, False), "y": np.eye(3)[rng.integers(0, 3, 6)]}
    _, g0, _ = _run(Autograd(xm, passes=(), fuse=False), xm, inputs)
    with running_compiled() if compiled else contextlib.nullcontext() as calls:
        _, g1, _ = _run(Autograd(xm, native=compiled), xm, inputs)
    if compiled:
        assert calls["forward"] > 0 and calls["backward"] > 0, calls
    assert {"c2", "h2", "outputs", "O"} <= g0.keys()
    assert {n for n in xm.named() if not xm.isInput(n)} <= g1.keys()  # every named register but the data
    for name in g1:
        if name in g0:
            np.testing.assert_allclose(g1[name], g0[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_lstm_products_are_merged_into_one_gather_and_one_product_per_step():
    M = 5
    model = build_model("lstm", {**DIMS, "max_len": M}, seed=0)
    program = Autograd(model.xm).compile(model.xm.operationSequence(model.xm.register("loss")))
    muls = [s for s in program.steps if s.op == "mul"]
    # one stacked gather for all characters, one h·U product per step, the output layer
    assert len(muls) == 1 + M + 1
    assert sum(s.op.startswith("vconcat") for s in program.steps) == 1


def _fused_kernels_of_models() -> list[str]:
    names = []
    for kind in ("mlp", "lstm"):
        model = build_model(kind, DIMS, seed=0)
        program = Autograd(model.xm).compile(model.xm.operationSequence(model.xm.register("loss")))
        # the kernels themselves (fold_cuts hands an LSTM cell its gate products whole: same kernel inside)
        names += [getattr(MULTI_OPS[s.op], "inner", MULTI_OPS[s.op]).name for s in program.steps
                  if s.op.startswith("fused")]
    return sorted(set(names))


@pytest.mark.parametrize("name", _fused_kernels_of_models())
def test_every_fused_kernel_passes_central_differences(name):
    kernel: FusedKernel = MULTI_OPS[name]
    rng = np.random.default_rng(1)
    n = kernel.n_inputs
    xs = [rng.uniform(-2, 2, size=(4, 3)) for _ in range(n)]
    results = kernel.forward(*xs)
    deltas = [rng.standard_normal((4, 3)) for _ in range(kernel.n_deltas)]
    grads = kernel.backward((True,) * n)(*deltas, *results, *xs)

    def scalar(*args):
        out = kernel.forward(*args)
        return sum(float(np.sum(d * o)) for d, o in zip(deltas, out[:kernel.n_deltas]))

    eps = 1e-6
    for j in range(n):
        num = np.zeros_like(xs[j])
        for i in range(xs[j].size):
            orig = xs[j].flat[i]
            xs[j].flat[i] = orig + eps
            up = scalar(*xs)
            xs[j].flat[i] = orig - eps
            down = scalar(*xs)
            xs[j].flat[i] = orig
            num.flat[i] = (up - down) / (2 * eps)
        g = np.broadcast_to(grads[j], num.shape)
        assert np.max(np.abs(g - num) / np.maximum(np.abs(num), 1e-3)) < 1e-6, f"{name}: input {j}"


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_grad_check_passes_fused_and_unfused(kind):
    model = build_model(kind, DIMS, seed=0)
    w = model.xm.operationSequence(model.xm.register("loss"))
    assert grad_check(model.xm, w).ok
    assert grad_check(model.xm, w, passes=(), fuse=False).ok


UNARY = ["relu", "sigmoid", "tanh", "square", "negate"]
BINARY = ["add", "subtract", "hadamard"]


@st.composite
def elementwise_graphs(draw):
    """A random graph of registered elementwise ops over two params and one input, with a mean loss."""
    n_ops = draw(st.integers(2, 8))
    choices = [draw(st.tuples(st.sampled_from(UNARY + BINARY), st.integers(0, 100), st.integers(0, 100)))
               for _ in range(n_ops)]
    keep_mid = draw(st.booleans())
    return choices, keep_mid


@pytest.mark.parametrize("compiled", NATIVE)
@settings(max_examples=40, deadline=None)
@given(elementwise_graphs())
def test_random_elementwise_graphs_agree_fused_and_unfused(compiled, graph):
    if not compiled:
        _random_graph_agrees(graph, compiled)
        return
    # every group is offered to C, however small; some shapes legitimately fall back to numpy (a
    # saved intermediate of a row-broadcast shape, e.g. tanh(b · W)), so no count is required here:
    # the fixed graphs (_agree) and tests/test_native.py require C to have run
    with running_compiled():
        _random_graph_agrees(graph, compiled)


def _random_graph_agrees(graph, compiled):
    choices, keep_mid = graph
    rng = np.random.default_rng(len(choices))
    xm = XMan()
    regs = [f.input(name="x", default=rng.uniform(-1, 1, (4, 3))),
            f.param(name="p", default=rng.uniform(-1, 1, (4, 3))),
            f.param(name="b", default=rng.uniform(-1, 1, (3,)))]
    for k, (op, i, j) in enumerate(choices):
        a, b = regs[i % len(regs)], regs[j % len(regs)]
        regs.append(getattr(f, op)(a) if op in UNARY else getattr(f, op)(a, b))
        if keep_mid and k == len(choices) // 2:
            xm.mid = regs[-1]  # a named register in the middle must stay visible
    # a matrix product in the middle of the chain splits it into two groups
    xm.W = f.param(name="W", default=rng.uniform(-1, 1, (3, 3)))
    xm.loss = f.mean(f.tanh(regs[-1] * xm.W) + regs[-2])
    xm.setup()
    w = xm.operationSequence(xm.loss)
    plain, fast = Autograd(xm, passes=(), fuse=False), Autograd(xm, native=compiled)
    v0, v1 = plain.eval(w, xm.inputDict()), fast.eval(w, xm.inputDict())
    np.testing.assert_allclose(v1["loss"], v0["loss"], rtol=1e-10, atol=1e-12)
    if keep_mid and "mid" in v0:  # (it may not lead to the loss)
        np.testing.assert_allclose(v1["mid"], v0["mid"], rtol=1e-10, atol=1e-12)
    g0 = plain.bprop(w, v0, loss=np.float64(1.0))
    g1 = fast.bprop(w, v1, loss=np.float64(1.0))
    for name in ("p", "b", "W"):
        if name in g0:
            np.testing.assert_allclose(g1[name], g0[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_outputs_of_different_shapes_sum_each_gradient_term_back_on_its_own():
    """relu(b) feeds both x + relu(b) (broadcast to (4, 3)) and relu(relu(b)) ((3,)), in one group."""
    rng = np.random.default_rng(7)
    xm = XMan()
    x = f.input(name="x", default=rng.uniform(-1, 1, (4, 3)))
    b = f.param(name="b", default=np.array([-0.5, 0.3, 0.7]))
    rb = f.relu(b)
    xm.W = f.param(name="W", default=rng.uniform(-1, 1, (3, 3)))
    xm.loss = f.mean(f.tanh(f.add(x, rb) * xm.W) + f.relu(rb))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    plain, fast = Autograd(xm, passes=(), fuse=False), Autograd(xm)
    assert any(isinstance(s.output, tuple) and len(s.output) == 2 and s.op.startswith("fused")
               for s in fast.compile(w).steps)
    g0 = plain.bprop(w, plain.eval(w, xm.inputDict()), loss=np.float64(1.0))
    g1 = fast.bprop(w, fast.eval(w, xm.inputDict()), loss=np.float64(1.0))
    np.testing.assert_allclose(g1["b"], g0["b"], rtol=1e-12, atol=1e-15)


def test_a_user_op_fuses_and_its_gradient_is_derived_through_the_group():
    x, y = sp.symbols("x y")
    from symdiff import defop

    defop("fusion_test_softplus", sp.log(1 + sp.exp(x)), args=[x])  # removed again by conftest's fixture
    rng = np.random.default_rng(2)
    xm = XMan()
    xm.a = f.param(name="a", default=rng.normal(size=(3, 4)))
    xm.b = f.param(name="b", default=rng.normal(size=(4,)))
    xm.loss = f.mean(f.fusion_test_softplus(f.hadamard(xm.a, xm.a) + xm.b))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    program = Autograd(xm).compile(w)
    assert any(s.op.startswith("fused") and "fusion_test_softplus" in s.op for s in program.steps)
    assert grad_check(xm, w, max_elements=None).ok


# ---- merge_matmuls edge cases ----------------------------------------------------------------
def _param_grads(xm, inputs, **kw):
    w = xm.operationSequence(xm.loss)
    program = Autograd(xm, **kw).compile(w)
    values = program.forward(inputs)
    g = program.backward(values, {"loss": np.float64(1.0)})
    return {n: g[program.slot[n]] for n in program.params}


def test_row_sparse_gradient_through_a_split_is_not_dropped():
    """X·(P·Q1) + X·(P·Q2) with one-hot X: the merged product's gradient blocks are row-sparse."""
    from symdiff import OneHot

    rng = np.random.default_rng(0)
    xm = XMan()
    xm.X = f.input(name="X")
    xm.P = f.param(name="P", default=rng.normal(size=(6, 3)))
    xm.Q1 = f.param(name="Q1", default=rng.normal(size=(3, 4)))
    xm.Q2 = f.param(name="Q2", default=rng.normal(size=(3, 4)))
    xm.loss = f.mean(f.square(xm.X * (xm.P * xm.Q1) + xm.X * (xm.P * xm.Q2)))
    xm.setup()
    inputs = {**xm.inputDict(), "X": OneHot(rng.integers(-1, 6, size=(5, 1)), 6)}
    plain = _param_grads(xm, inputs, passes=(), fuse=False)
    fast = _param_grads(xm, inputs)
    for name in plain:
        assert np.abs(np.asarray(plain[name])).sum() > 0
        np.testing.assert_allclose(np.asarray(fast[name]), np.asarray(plain[name]), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fuse", [True, False])
def test_row_sparse_param_gradients_do_not_share_memory(fuse):
    """X·(W1 + W2): add hands the same row-sparse delta to both params; clipping must scale each once."""
    from symdiff import OneHot
    from symdiff.optim import clip_grad_norm

    rng = np.random.default_rng(1)
    xm = XMan()
    xm.X = f.input(name="X")
    xm.W1 = f.param(name="W1", default=rng.normal(size=(6, 3)))
    xm.W2 = f.param(name="W2", default=rng.normal(size=(6, 3)))
    xm.loss = f.mean(f.square(xm.X * (xm.W1 + xm.W2)))
    xm.setup()
    grads = _param_grads(xm, {**xm.inputDict(), "X": OneHot(rng.integers(0, 6, size=(5, 1)), 6)}, fuse=fuse)
    assert clip_grad_norm(grads, 0.1) > 0.1
    total = np.sqrt(sum(float(np.sum(np.asarray(g) ** 2)) for g in grads.values()))
    assert total == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("case", ["matrix-vector", "vector-matrix", "vectors-stacked"])
def test_products_with_vector_operands_merge_and_differentiate(case):
    rng = np.random.default_rng(2)
    xm = XMan()
    if case == "matrix-vector":      # A·v1 + A·v2: merged by columns, each product a vector
        xm.A = f.input(name="A", default=rng.normal(size=(4, 3)))
        xm.v1 = f.param(name="v1", default=rng.normal(size=3))
        xm.v2 = f.param(name="v2", default=rng.normal(size=3))
        xm.loss = f.mean(f.square(xm.A * xm.v1 + xm.A * xm.v2))
    elif case == "vector-matrix":    # u·B1 + u·B2
        xm.u = f.input(name="u", default=rng.normal(size=3))
        xm.B1 = f.param(name="B1", default=rng.normal(size=(3, 4)))
        xm.B2 = f.param(name="B2", default=rng.normal(size=(3, 4)))
        xm.loss = f.mean(f.square(xm.u * xm.B1 + xm.u * xm.B2))
    else:                            # u1·B + u2·B: merged by rows
        xm.u1 = f.param(name="u1", default=rng.normal(size=3))
        xm.u2 = f.param(name="u2", default=rng.normal(size=3))
        xm.B = f.param(name="B", default=rng.normal(size=(3, 4)))
        xm.loss = f.mean(f.square(xm.u1 * xm.B + xm.u2 * xm.B))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    # merged: one stacked operand (its cut may be folded into the fused square that reads it: fold_cuts)
    assert any(s.op.startswith(("hconcat", "vconcat")) for s in Autograd(xm).compile(w).steps)
    plain = _param_grads(xm, xm.inputDict(), passes=(), fuse=False)
    fast = _param_grads(xm, xm.inputDict())
    for name in plain:
        np.testing.assert_allclose(fast[name], plain[name], rtol=1e-12, atol=1e-14)
    assert grad_check(xm, w, max_elements=None).ok
    assert grad_check(xm, w, passes=(), fuse=False, max_elements=None).ok


# ---- fuse_blocks (horizontal fusion) ----------------------------------------------------------
def _gates_graph(widths_w, widths_u, unary, *, bias=True, vector_w=False, dtype=np.float64, seed=0,
                 name_first=False):
    """k "gates" u_j(x·W_j + h·U_j [+ b_j]), their means added up: the LSTM's shape, any widths and ops.

    Widths that differ between ``W_j`` and ``U_j`` broadcast per gate (width 1 against H), so the two
    merged products are cut differently and ``blockwise`` must fall back to one block at a time.
    """
    rng = np.random.default_rng(seed)
    xm = XMan()
    x = f.input(name="x", default=rng.normal(size=(4, 3)).astype(dtype))
    h = f.input(name="h", default=rng.normal(size=(4, 2)).astype(dtype))
    gates = []
    for j, (ww, wu, op) in enumerate(zip(widths_w, widths_u, unary)):
        # vector_w: matrix-vector products, whose merged layout marks vector blocks
        W = f.param(name=f"W{j}", default=rng.normal(size=(3,) if vector_w else (3, ww)).astype(dtype))
        U = f.param(name=f"U{j}", default=rng.normal(size=(2,) if vector_w else (2, wu)).astype(dtype))
        z = x * W + h * U
        if bias:
            z = z + f.param(name=f"b{j}", default=rng.normal(size=(max(ww, wu),)).astype(dtype))
        if name_first and j == 0:
            xm.pre0 = z  # the user looks at a pre-activation: it must stay visible
        gates.append(getattr(f, op)(z))
    out = f.mean(gates[0])
    for g in gates[1:]:  # gates may differ in width: combine their means
        out = out + f.mean(f.hadamard(g, g))
    xm.loss = out
    xm.setup()
    return xm


def _agree(xm, dtype=np.float64, c_runs=True):
    """Plain list vs the numpy fusion (block ops: its ops are returned) and the compiled one.

    ``c_runs``: the compiled engine must really run C kernels (False: layouts the C loop does not
    take, such as columns that broadcast, where it may fall back to numpy entirely).
    """
    w = xm.operationSequence(xm.loss)
    plain = Autograd(xm, passes=(), fuse=False)
    v0 = plain.eval(w, xm.inputDict())
    g0 = plain.bprop(w, v0, loss=np.ones((), dtype))

    def check(fast: Autograd) -> None:
        v1 = fast.eval(w, xm.inputDict())
        assert v1["loss"].dtype == dtype
        np.testing.assert_allclose(v1["loss"], v0["loss"], rtol=1e-10, atol=1e-12)
        g1 = fast.bprop(w, v1, loss=np.ones((), dtype))
        assert set(g1) >= set(xm.params())
        for name in xm.params():
            assert g1[name].dtype == dtype and g1[name].shape == g0[name].shape, name
            np.testing.assert_allclose(g1[name], g0[name], rtol=1e-10 if dtype == np.float64 else 1e-4,
                                       atol=1e-12 if dtype == np.float64 else 1e-6, err_msg=name)

    numpy_engine = Autograd(xm, native=False)
    check(numpy_engine)
    if native.enabled():
        with running_compiled() as calls:
            check(Autograd(xm, native=True))
        if c_runs:
            assert calls["forward"] > 0 and calls["backward"] > 0, f"the compiled engine ran no C kernel: {calls}"
    return [s.op for s in numpy_engine.compile(w).steps]


def test_lstm_gates_become_two_adds_and_one_blockmap_per_step():
    model = build_model("lstm", DIMS, seed=0)
    program = Autograd(model.xm, native=False).compile(model.xm.operationSequence(model.xm.register("loss")))
    ops = [s.op for s in program.steps]
    M = DIMS["max_len"]
    assert ops.count("blockwise[add]") == 2 * M
    assert ops.count("blockmap[tanh,sigmoid*3]") == M
    assert ops.count("cat4") == 1  # the four biases are joined once, not per step
    assert not any(op.startswith("split") for op in ops)  # every gate block comes out of a blockmap


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_aligned_gates_run_on_whole_arrays_and_agree(dtype):
    ops = _agree(_gates_graph([3, 3, 3], [3, 3, 3], ["tanh", "sigmoid", "sigmoid"], dtype=dtype), dtype)
    assert ops.count("blockwise[add]") == 2 and "blockmap[tanh,sigmoid*2]" in ops


def test_gates_cut_differently_fall_back_block_by_block():
    # W1 is one column and U1 three (broadcast per gate), so the layouts differ at run time
    ops = _agree(_gates_graph([3, 1], [3, 3], ["sigmoid", "sigmoid"]))
    assert "blockwise[add]" in ops and "blockmap[sigmoid*2]" in ops


def test_gates_with_biases_of_another_shape_fall_back():
    xm = _gates_graph([2, 2], [2, 2], ["relu", "relu"], bias=False)
    _agree(xm)
    # a (1, H) bias next to an (H,) one cannot be joined into one vector: cat keeps them as blocks
    rng = np.random.default_rng(4)
    xm = XMan()
    x = f.input(name="x", default=rng.normal(size=(4, 3)))
    W1 = f.param(name="W1", default=rng.normal(size=(3, 2)))
    W2 = f.param(name="W2", default=rng.normal(size=(3, 2)))
    b1 = f.param(name="b1", default=rng.normal(size=(2,)))
    b2 = f.param(name="b2", default=rng.normal(size=(1, 2)))
    xm.loss = f.mean(f.hadamard(f.tanh(x * W1 + b1), f.tanh(x * W2 + b2)))
    xm.setup()
    ops = _agree(xm)
    assert "cat2" in ops and "blockmap[tanh*2]" in ops


def test_matrix_vector_products_fall_back_and_agree():
    ops = _agree(_gates_graph([1, 1, 1], [1, 1, 1], ["tanh", "tanh", "sigmoid"], bias=False, vector_w=True),
                 c_runs=False)
    assert "blockwise[add]" in ops and "blockmap[tanh*2,sigmoid]" in ops


def test_a_named_gate_register_keeps_its_block():
    xm = _gates_graph([2, 2], [2, 2], ["sigmoid", "sigmoid"], bias=False, name_first=True)
    ops = _agree(xm)
    assert not any(op.startswith("blockmap") for op in ops)  # pre0's block is not folded away
    w = xm.operationSequence(xm.loss)
    np.testing.assert_allclose(Autograd(xm).eval(w, xm.inputDict())["pre0"],
                               Autograd(xm, passes=(), fuse=False).eval(w, xm.inputDict())["pre0"])


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4).flatmap(lambda k: st.tuples(
    st.lists(st.sampled_from([1, 2, 3]), min_size=k, max_size=k),
    st.lists(st.sampled_from([1, 2, 3]), min_size=k, max_size=k),
    st.lists(st.sampled_from(["tanh", "sigmoid", "relu", "square"]), min_size=k, max_size=k),
    st.booleans())))
def test_random_gate_graphs_agree_fused_and_unfused(case):
    widths_w, widths_u, unary, bias = case
    # per gate the two widths must broadcast (equal, or one of them 1)
    widths_u = [wu if wu == ww or 1 in (wu, ww) else ww for ww, wu in zip(widths_w, widths_u)]
    _agree(_gates_graph(widths_w, widths_u, unary, bias=bias), c_runs=False)  # some widths broadcast columns


# ---- training mode: release values and gradients early ----------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "lstm"])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("dense", [False, True])
def test_training_mode_gives_the_same_gradients_as_keeping_everything(kind, fuse, dense):
    model = build_model(kind, DIMS, seed=5)
    rng = np.random.default_rng(1)
    codes = rng.integers(-1, DIMS["num_chars"], size=(6, DIMS["max_len"]))
    inputs = {**model.params, **model.feed(codes, dense), "y": np.eye(3)[rng.integers(0, 3, 6)]}
    program = Autograd(model.xm, fuse=fuse).compile(model.xm.operationSequence(model.xm.register("loss")))
    full = program.forward(inputs)
    g_full = program.backward(full, {"loss": np.float64(1.0)})
    lean = program.forward(inputs, keep=("loss",))
    assert lean[program.slot["loss"]] == full[program.slot["loss"]]
    released = [k for k, (a, b) in enumerate(zip(lean, full)) if a is not b]
    assert released  # something was let go early ...
    g_lean = program.backward(lean, {"loss": np.float64(1.0)}, params_only=True)
    for name in program.params:  # ... and the parameter gradients are bit-for-bit the same
        np.testing.assert_array_equal(np.asarray(g_lean[program.slot[name]]),
                                      np.asarray(g_full[program.slot[name]]), err_msg=name)
    assert all(g is None for k, g in enumerate(g_lean) if program.names[k] not in program.params)
    # forward only (evaluation): everything but what is kept goes
    probs = program.forward(inputs, keep=("outputs",), backward=False)
    np.testing.assert_array_equal(probs[program.slot["outputs"]], full[program.slot["outputs"]])
    leaves = {k for _, k in program.leaves}
    assert all(x is None for k, x in enumerate(probs) if k not in leaves and program.names[k] != "outputs")


def test_training_mode_runs_only_the_steps_the_kept_registers_need():
    """After the crossEnt-softMax rewrite the loss no longer reads softMax's `outputs`: a training
    forward (keep the loss) skips that step, an evaluation (keep the outputs) runs it; backward from
    a register the forward did not compute says so."""
    from symdiff import SymdiffError

    model = build_model("mlp", DIMS, seed=5)
    rng = np.random.default_rng(2)
    inputs = {**model.params, **model.feed(rng.integers(-1, DIMS["num_chars"], size=(6, DIMS["max_len"]))),
              "y": np.eye(3)[rng.integers(0, 3, 6)]}
    ad = Autograd(model.xm)
    program = ad.compile(model.xm.operationSequence(model.xm.register("loss")))
    assert "softMax" in [s.op for s in program.steps]
    ad.reset_counts()
    lean = program.forward(inputs, keep=("loss",))
    assert lean[program.slot["outputs"]] is None and ad.forward_steps == len(program.steps) - 1
    full = program.forward(inputs)
    assert lean[program.slot["loss"]] == full[program.slot["loss"]]
    probs = program.forward(inputs, keep=("outputs",), backward=False)
    np.testing.assert_array_equal(probs[program.slot["outputs"]], full[program.slot["outputs"]])
    with pytest.raises(SymdiffError, match="cannot backpropagate from 'outputs': forward.keep=.... did not compute"):
        program.backward(lean, {"outputs": np.ones((6, 3))})


@pytest.mark.parametrize("case", [dict(widths_w=[3, 1], widths_u=[3, 3], unary=["sigmoid", "tanh"]),
                                  dict(widths_w=[2, 2, 2], widths_u=[2, 2, 2], unary=["tanh", "relu", "relu"]),
                                  dict(widths_w=[1, 1], widths_u=[1, 1], unary=["square", "square"],
                                       bias=False, vector_w=True)])
def test_training_mode_through_block_ops_and_their_fallback(case):
    xm = _gates_graph(**case)
    program = Autograd(xm, native=False).compile(xm.operationSequence(xm.loss))
    inputs = xm.inputDict()
    g_full = program.backward(program.forward(inputs), {"loss": np.float64(1.0)})
    g_lean = program.backward(program.forward(inputs, keep=("loss",)), {"loss": np.float64(1.0)},
                              params_only=True)
    for name in program.params:
        np.testing.assert_array_equal(np.asarray(g_lean[program.slot[name]]),
                                      np.asarray(g_full[program.slot[name]]), err_msg=name)


def test_a_wrong_bias_inside_fused_gate_blocks_is_a_shape_error_naming_the_registers():
    from symdiff.autograd import ShapeError

    xm = _gates_graph([3, 1], [3, 3], ["sigmoid", "sigmoid"])
    w = xm.operationSequence(xm.loss)
    inputs = {**xm.inputDict(), "b1": np.ones(5)}  # gate 1 is 3 wide
    with pytest.raises(ShapeError, match=r"blockwise\[add\].*b1.*\(5,\).*fuse=False"):
        Autograd(xm, native=False).eval(w, inputs)
    if native.enabled():  # compiled: one fused kernel; the arrays do not fit it, so numpy says why
        with pytest.raises(ShapeError, match=r"fused\d+\[.*b1\(5,\).*fuse=False"):
            Autograd(xm, native=True).eval(w, inputs)
    with pytest.raises(ShapeError, match=r"'add'.*b1\(5,\)"):
        Autograd(xm, passes=(), fuse=False).eval(w, inputs)


def test_fusion_never_joins_two_groups_that_feed_each_other_through_a_third():
    """A = {tanh(q), +x, (+ tanh x)}, B = {tanh x, + z3, + tanh x, + ...}: A feeds B through a matrix
    product and B feeds A directly (tanh(x) into A's add). Each merge looked safe between its two
    groups; the condensed graph had a cycle (found by hypothesis in the random-graph test)."""
    rng = np.random.default_rng(0)
    xm = XMan()
    xm.x = f.input(name="x", default=rng.normal(size=(4, 3)))
    xm.t = f.input(name="t", default=np.eye(3)[[0, 1, 2, 1]])
    xm.q = f.param(name="q", default=rng.normal(size=(4, 3)))
    xm.W = f.param(name="W", default=rng.normal(size=(3, 3)))
    z2 = f.tanh(xm.q) + xm.x
    z4 = f.tanh(xm.x)
    z9 = ((z2 * xm.W + z4) + f.tanh(xm.x)) + (z2 + z4)
    xm.loss = f.mean(f.crossEnt(f.softMax(z9), xm.t))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    ref = Autograd(xm, passes=(), fuse=False)
    g0 = ref.bprop(w, ref.eval(w, xm.inputDict()), loss=np.float64(1.0))
    for native in (False, True):
        ad = Autograd(xm, native=native)
        g1 = ad.bprop(w, ad.eval(w, xm.inputDict()), loss=np.float64(1.0))
        for name in ("q", "W"):
            np.testing.assert_allclose(g1[name], g0[name], rtol=1e-10, atol=1e-12)


def test_fusion_never_merges_two_groups_that_a_third_group_connects():
    # the shape of a Hessian-vector product through logsumexp: the groups {z7, z8} and {z20, z22, ...}
    # are joined only through other fused groups and structural steps; merging them made a cycle
    from symdiff.graph import Step
    from symdiff.passes import fuse_elementwise

    e = "expand[axis=(1,2), keepdims=False, mean=False]"
    from symdiff.array_ops import expand_op, sum_op
    from symdiff.scalar_ops import scalar_op

    expand_op((1, 2), False), sum_op((1, 2), False), scalar_op("mul", 2)  # the ops, made by name
    s = "sum[axis=(1,2), keepdims=False]"
    steps = [Step(*t) for t in [
        ("z1", "times_2", ("x",)), ("z2", "logsumexp", ("z1",)), ("z6", e, ("z2", "z1")),
        ("z7", "subtract", ("z1", "z6")), ("z8", "exp", ("z7",)), ("z9", "times_2", ("v",)),
        ("z10", "hadamard", ("z8", "z9")), ("z11", s, ("z10",)), ("z12", "times_2", ("z11",)),
        ("z3", "square", ("z2",)), ("loss", "sum", ("z3",)), ("gl", "exp", ("loss",)),
        ("g3", "reshape_like", ("gl", "z3")), ("z4", "times_2", ("z2",)), ("z13", "hadamard", ("g3", "z4")),
        ("z14", "hadamard", ("z12", "z13")), ("z15", e, ("z14", "z1")), ("g2", "hadamard", ("g3", "z4")),
        ("z5", e, ("g2", "z1")), ("z16", "hadamard", ("z5", "z8")), ("z17", "hadamard", ("z15", "z16")),
        ("z18", e, ("z11", "z1")), ("z19", "negate", ("z18",)), ("z20", "add", ("z9", "z19")),
        ("z21", "reshape_like", ("z20", "z7")), ("z22", "hadamard", ("z21", "z8")),
        ("z23", "hadamard", ("z5", "z8")), ("z24", "hadamard", ("z22", "z23")), ("z25", "add", ("z17", "z24")),
        ("out", "times_2", ("z25",))]]
    fused = fuse_elementwise(steps, keep={"out"})
    made: set[str] = {"x", "v"}
    for step in fused:  # a valid order: every input computed before its use
        assert all(i in made for i in step.inputs), step
        made.update(step.outputs)


def test_a_new_groups_outputs_of_different_shapes_get_their_own_gradient_terms():
    """As above, but through an op declared here, so the group's kernel (and its per-output gradient
    terms, used only when outputs differ in shape) is derived in this test, not found in the cache."""
    from symdiff import defop

    x = sp.Symbol("x")
    defop("fusion_test_signed_square", x * sp.Abs(x), args=[x])  # derivative 2|x|
    rng = np.random.default_rng(8)
    xm = XMan()
    data = f.input(name="data", default=rng.uniform(-1, 1, (4, 3)))
    b = f.param(name="b", default=np.array([-0.5, 0.3, 0.7]))
    sb = f.fusion_test_signed_square(b)
    xm.W = f.param(name="W", default=rng.uniform(-1, 1, (3, 3)))
    xm.loss = f.mean(f.tanh(f.add(data, sb) * xm.W) + f.fusion_test_signed_square(sb))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    plain, fast = Autograd(xm, passes=(), fuse=False), Autograd(xm, native=False)
    assert any(isinstance(s.output, tuple) and len(s.output) == 2 and s.op.startswith("fused")
               for s in fast.compile(w).steps)
    g0 = plain.bprop(w, plain.eval(w, xm.inputDict()), loss=np.float64(1.0))
    g1 = fast.bprop(w, fast.eval(w, xm.inputDict()), loss=np.float64(1.0))
    np.testing.assert_allclose(g1["b"], g0["b"], rtol=1e-12, atol=1e-15)
    # and by hand: d/db of mean(s(s(b))) with s(u) = u|u|, s' = 2|u|, plus the tanh branch's share
    bv = np.array([-0.5, 0.3, 0.7])
    s = bv * np.abs(bv)
    z = xm.inputDict()["data"] + s
    t = np.tanh(z @ xm.inputDict()["W"])
    n = t.size
    d_s = ((1 - t ** 2) / n @ xm.inputDict()["W"].T).sum(axis=0) + len(t) * 2 * np.abs(s) / n  # s(s) in every row
    np.testing.assert_allclose(g0["b"], d_s * 2 * np.abs(bv), rtol=1e-12)


def _fused_kernels(xm, w, **kw):
    program = Autograd(xm, **kw).compile(w)
    return [MULTI_OPS[s.op] for s in program.steps if s.op.startswith("fused")]


def test_a_kernel_with_a_function_c99_lacks_says_so_and_runs_with_numpy():
    pytest.importorskip("scipy", reason="the Bessel function runs with SciPy (the 'special' extra)")
    from symdiff import defop

    x = sp.Symbol("x")
    defop("fusion_test_bessel", sp.besselj(0, x), args=[x])
    xm = XMan()
    xm.a = f.param(name="a", default=np.linspace(0.1, 2.0, 6))
    xm.loss = f.mean(f.tanh(f.fusion_test_bessel(xm.a)))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    (kernel,) = _fused_kernels(xm, w)
    assert kernel.runs_as() == "C99 has no besselj: runs with numpy/SciPy"
    from scipy.special import j0, j1
    a = np.linspace(0.1, 2.0, 6)
    g = Autograd(xm).bprop(w, Autograd(xm).eval(w, xm.inputDict()), loss=np.float64(1.0))
    np.testing.assert_allclose(g["a"], (1 - np.tanh(j0(a)) ** 2) * -j1(a) / 6, rtol=1e-12)


def test_a_kernel_shows_one_block_per_set_of_inputs_needing_gradients():
    # symdiff ops --fused prints display(): with two backward kernels, each under a header naming its inputs
    xm = XMan()
    xm.a = f.param(name="a", default=np.array([0.5, -1.0]))
    xm.b = f.param(name="b", default=np.array([2.0, 0.25]))
    xm.loss = f.mean(f.tanh(f.add(xm.a, f.hadamard(xm.b, xm.b))))
    xm.setup()
    (kernel,) = _fused_kernels(xm, xm.operationSequence(xm.loss))
    assert kernel.n_inputs == 2
    kernel.backward((True, False))
    kernel.backward((False, True))
    _, bwd = kernel.display()
    assert [line for line in bwd if not line.startswith("dL/d")] == ["backward kernel for in0:",
                                                                      "backward kernel for in1:"]
    assert [line.split(" = ")[0] for line in bwd if line.startswith("dL/d")] == ["dL/d in0", "dL/d in1"]


def test_bprop_leaves_out_an_unnamed_register_whose_group_also_uses_it_inside():
    # t = a + x feeds tanh(t) in its own fused group and a product outside: the group's backward sees only
    # the outside part of dL/dt, so bprop must not hand that out as t's gradient; every gradient it does
    # return is the whole one (the plain list's)
    rng = np.random.default_rng(9)
    xm = XMan()
    xm.a = f.param(name="a", default=rng.normal(size=(4, 3)))
    x = f.input(name="x", default=rng.normal(size=(4, 3)))
    xm.W = f.param(name="W", default=rng.normal(size=(3, 3)))
    t = f.add(xm.a, x)
    xm.loss = f.mean(f.hadamard(f.tanh(t), t * xm.W))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    plain, fast = Autograd(xm, passes=(), fuse=False), Autograd(xm)
    assert any(getattr(MULTI_OPS.get(s.op), "internally_used", lambda _: ())(s.outputs)
               for s in fast.compile(w, whole=True).steps)
    g0 = plain.bprop(w, plain.eval(w, xm.inputDict()), loss=np.float64(1.0))
    g1 = fast.bprop(w, fast.eval(w, xm.inputDict()), loss=np.float64(1.0))
    assert "a" in g1 and "W" in g1
    for name in g1:
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-12, atol=1e-15, err_msg=name)


@pytest.mark.skipif(not native.enabled(), reason=f"native kernels: {native.status()}")
def test_a_native_kernel_is_built_for_the_first_arrays_at_the_size_threshold():
    from symdiff.fusion import _Native

    x = sp.Dummy("x", real=True)
    kernel = _Native("fusion_test_threshold", (x,), (sp.sin(x) * x + 3,))
    assert kernel.ready([np.ones(native.MIN_ELEMENTS - 1)]) is None and kernel.error is None  # too small: numpy
    assert kernel.ready([np.ones(native.MIN_ELEMENTS)]) is not None and kernel.error is None


def test_a_fused_group_composes_its_ops_over_real_inputs():
    # the group's SymPy composite is built over real symbols, so log(exp(a)) is a itself: exact where the
    # op-by-op list rounds exp(a) to 1 first (and loses a tiny a entirely)
    a = np.array([1e-17, -2e-16, 5e-17])
    xm = XMan()
    xm.a = f.param(name="a", default=a)
    xm.loss = f.mean(f.log(f.exp(xm.a)))
    xm.setup()
    w = xm.operationSequence(xm.loss)
    fast = Autograd(xm, native=False)
    assert [s.op.startswith("fused") for s in fast.compile(w).steps] == [True, False]
    values = fast.eval(w, xm.inputDict())
    assert values["loss"] == np.mean(a)
    np.testing.assert_allclose(fast.bprop(w, values, loss=np.float64(1.0))["a"], np.full(3, 1 / 3), rtol=1e-15)
