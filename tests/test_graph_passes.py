"""The passes that make gradient graphs cheap (HVP cost, issue #13 point 9), against the plain step list.

Each rewrite is checked as ``tests/test_fusion.py`` checks the training passes:
the same numbers as ``Autograd(xm, passes=(), fuse=False)`` on the shipped
models' HVP graphs and on small graphs built for the edge cases.
"""
from __future__ import annotations

import numpy as np
import pytest

from models.training import build_model
from symdiff import Autograd, XMan, f
from symdiff.autograd import Counters, Program
from symdiff.differential import HVP, JVP, wengert_for
from symdiff.graph import Step
from symdiff.passes import GRAPH_PASSES, sum_products

SMALL = dict(max_len=4, num_chars=7, num_hid=5, num_labels=3)


def _hvp_case(kind: str, seed: int = 0):
    m = build_model(kind, SMALL, seed=seed)
    xm = m.xm
    params = xm.params()
    values = xm.inputDict()
    rng = np.random.default_rng(seed)
    vectors = {p: rng.standard_normal(np.shape(values[p])) for p in params}
    return xm, params, values, vectors


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_hvp_with_the_graph_passes_matches_the_plain_step_list(kind):
    xm, params, values, vectors = _hvp_case(kind)
    h = HVP(xm, "loss", params)
    fast = h(vectors, values)
    feed = {**values, **{h.vector_names[p]: vectors[p] for p in params}}
    plain = Autograd(h.graph, passes=(), fuse=False).eval(h.wengert, feed)
    for p, r in zip(params, h.results):
        np.testing.assert_allclose(fast[p], plain[r], rtol=1e-10, atol=1e-12, err_msg=p)


def test_lstm_weight_gradients_become_one_product_per_weight():
    xm, params, values, vectors = _hvp_case("lstm")
    h = HVP(xm, "loss", params)
    ops = [s.op for s in h.program.steps]
    plain = [s.op for s in h.wengert]
    # every gate's W and U: Σ_t over the steps of the gradient and of its tangent, one product each
    assert sum(op.startswith("sum_mul_tn") for op in ops) >= 8
    assert ops.count("mul_tn") < plain.count("mul_tn") // 4


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_an_hvp_graph_sums_back_only_what_was_broadcast(kind, mode):
    """A ``sum_like`` (or ``broadcast_like``) whose input already has its output's shape does nothing
    but cost a step and cut a fused group (an LSTM HVP had 352 of 393): the HVP, built for the
    shapes it is called with, leaves those out and keeps the ones that really sum."""
    xm, params, values, vectors = _hvp_case(kind)
    h = HVP(xm, "loss", params, mode=mode)
    feed = {**values, **{h.vector_names[p]: vectors[p] for p in params}}
    plain = Autograd(h.graph, passes=(), fuse=False).eval(h.wengert, feed)
    shaping = [s for s in h.wengert if s.op in ("sum_like", "broadcast_like")]
    noop = [s for s in shaping if np.shape(plain[s.inputs[0]]) == np.shape(plain[s.output])]
    assert not noop, f"{len(noop)} of {len(shaping)} sum_like/broadcast_like steps change no shape: {noop[:3]}"
    assert any(s.op == "sum_like" for s in h.wengert)  # the biases' gradients are still summed over the batch


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_an_hvp_built_for_some_shapes_is_rebuilt_for_others(mode):
    """Built where nothing is broadcast (one row, ``c`` a row too), then called with four rows:
    ``c`` is broadcast there, so its Hessian must be summed over the rows (2·4 per element)."""
    xm = XMan()
    xm.a = f.input(name="a", default=np.ones((1, 3)))
    xm.c = f.param(name="c", default=np.ones((1, 3)))
    xm.loss = f.sum(f.square(f.add(xm.a, xm.c)))
    xm = xm.setup()
    h = HVP(xm, "loss", ["c"], mode=mode)
    one = h({"c": np.ones((1, 3))}, xm.inputDict())["c"]
    np.testing.assert_allclose(one, 2 * np.ones((1, 3)))
    four = h({"c": np.ones((1, 3))}, {"a": np.ones((4, 3)), "c": np.ones((1, 3))})["c"]
    np.testing.assert_allclose(four, 8 * np.ones((1, 3)))
    again = h({"c": np.ones((1, 3))}, xm.inputDict())["c"]  # the first shapes' graph, kept
    np.testing.assert_allclose(again, one)


def test_jvp_with_the_graph_passes_matches_the_plain_step_list():
    xm, params, values, vectors = _hvp_case("lstm", seed=1)
    j = JVP(xm, "loss", params)
    fast = j(vectors, values)
    feed = {**values, **{j.tangent_names[p]: vectors[p] for p in params}}
    plain = Autograd(j.graph, passes=(), fuse=False).eval(j.wengert, feed)
    np.testing.assert_allclose(fast, plain[j.result], rtol=1e-10, atol=1e-12)


def _sum_of_products(shapes_a, shapes_b, keep=()):
    """``total = Σ_k mul_tn(a_k, b_k)`` as ``grad`` writes it (a chain of adds), run both ways."""
    rng = np.random.default_rng(3)
    steps, values, total = [], {}, None
    for k, (sa, sb) in enumerate(zip(shapes_a, shapes_b)):
        values[f"a{k}"], values[f"b{k}"] = rng.standard_normal(sa), rng.standard_normal(sb)
        steps.append(Step(f"p{k}", "mul_tn", (f"a{k}", f"b{k}")))
        if total is not None:
            steps.append(Step(f"s{k}", "add", (total, f"p{k}")))
        total = f"s{k}" if total is not None else "p0"
    expected = sum(values[f"a{k}"].T @ values[f"b{k}"] for k in range(len(shapes_a)))
    rewritten = sum_products(steps, keep=keep)
    program = Program(rewritten, (), Counters())
    v = program.forward(values)
    return rewritten, v[program.slot[total]], expected


def test_a_sum_of_products_becomes_one_stacked_product():
    rewritten, got, expected = _sum_of_products([(6, 3)] * 4, [(6, 2)] * 4)
    assert [s.op for s in rewritten] == ["sum_mul_tn4"]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_products_that_only_broadcast_together_are_summed_one_by_one():
    # (1, 2) + (3, 2): the operands have different widths and cannot be stacked
    rewritten, got, expected = _sum_of_products([(6, 1), (5, 3)], [(6, 2), (5, 2)])
    assert [s.op for s in rewritten] == ["sum_mul_tn2"]
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_a_kept_partial_sum_is_not_merged_away():
    rewritten, got, expected = _sum_of_products([(6, 3)] * 3, [(6, 2)] * 3, keep=("s1",))
    assert "s1" in {o for s in rewritten for o in s.outputs}
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_the_stacked_product_differentiates_like_the_sum():
    from symdiff.ops import sum_products_op

    rng = np.random.default_rng(4)
    a, b = [rng.standard_normal((4, 3)) for _ in range(2)], [rng.standard_normal((4, 2)) for _ in range(2)]
    delta = rng.standard_normal((3, 2))
    op = sum_products_op(2)
    (out,) = op.forward(*a, *b)
    grads = op.backward((True,) * 4)(delta, out, *a, *b)
    expected = [b[0] @ delta.T, b[1] @ delta.T, a[0] @ delta, a[1] @ delta]
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, rtol=1e-12)


def test_graph_passes_extend_the_training_defaults():
    from symdiff.passes import DEFAULT_PASSES

    assert GRAPH_PASSES[:len(DEFAULT_PASSES)] == DEFAULT_PASSES and "sum_products" in GRAPH_PASSES


def test_a_blockmap_describes_its_runs_of_blocks():
    from symdiff.ops import BlockMap

    assert BlockMap(("sigmoid", "sigmoid", "sigmoid", "tanh")).describe() == (
        "sigmoid on blocks 0-2; tanh on block 3 of the stacked input, one call per run; "
        "gradients from each op's own kernel")


def test_a_blockmap_backward_with_vector_blocks_and_an_unreached_block_matches_numpy():
    # a fused LSTM step cuts one stacked pre-activation into gate blocks; a block that is one column of
    # a vector operand comes out 1-D, and a block no gradient reached arrives as the number 0
    from symdiff.ops import BlockMap

    rng = np.random.default_rng(0)
    bm = BlockMap(("sigmoid", "sigmoid", "tanh"))
    s = rng.normal(size=(3, 4))
    layout = np.array([[0, 1, 3, 4], [1, 0, 0, 0]])  # block 0: one column as a vector; 1: two; 2: one
    out = bm.forward(s, layout)
    blocks, whole = out[:3], out[3:]
    sig, th = 1 / (1 + np.exp(-s)), np.tanh(s)
    np.testing.assert_allclose(blocks[0], sig[:, 0])
    np.testing.assert_allclose(blocks[1], sig[:, 1:3])
    np.testing.assert_allclose(blocks[2], th[:, 3:4])
    d0, d1 = rng.normal(size=3), rng.normal(size=(3, 2))
    (grad,) = bm.backward((True,))(d0, d1, 0, *blocks, *whole, s, layout)
    want = np.column_stack([d0 * sig[:, 0] * (1 - sig[:, 0]), d1 * sig[:, 1:3] * (1 - sig[:, 1:3]),
                            np.zeros(3)])
    np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-15)


def test_block_ops_are_registered_once_per_name():
    # the fuse_blocks pass asks for its ops at every compile: the same arguments give the same op object
    # (its layout caches are shared), a redefined op a new one
    from symdiff.ops import block_op

    assert block_op("blockmap", ("tanh", "sigmoid")) is block_op("blockmap", ("tanh", "sigmoid"))
    assert block_op("blockwise", "add") is block_op("blockwise", "add")
    assert block_op("cat", 3) is block_op("cat", 3)


def test_a_sum_of_products_and_another_term_adds_the_term_to_the_stacked_product():
    rng = np.random.default_rng(5)
    values = {"a0": rng.standard_normal((4, 3)), "b0": rng.standard_normal((4, 2)),
              "a1": rng.standard_normal((5, 3)), "b1": rng.standard_normal((5, 2)), "c": rng.standard_normal((3, 2))}
    steps = [Step("p0", "mul_tn", ("a0", "b0")), Step("p1", "mul_tn", ("a1", "b1")),
             Step("s1", "add", ("p0", "p1")), Step("s2", "add", ("s1", "c"))]
    rewritten = sum_products(steps)
    assert [s.op for s in rewritten] == ["sum_mul_tn2", "add"]
    program = Program(rewritten, (), Counters())
    got = program.forward(values)[program.slot["s2"]]
    v = values
    np.testing.assert_allclose(got, v["a0"].T @ v["b0"] + v["a1"].T @ v["b1"] + v["c"], rtol=1e-12)


def _cut_and_squash(stack: str, cut: str, ops: list[str], tag: str) -> list[Step]:
    """``(m, layout) = stack(x0, x1, x2)``, its blocks cut again, then a unary op on each block."""
    from symdiff.ops import multi_op

    k = len(ops)
    for kind in (stack, cut):
        multi_op(kind, k)
    xs = tuple(f"x{tag}{j}" for j in range(k))
    ys = tuple(f"y{tag}{j}" for j in range(k))
    return [Step((f"m{tag}", f"lay{tag}"), f"{stack}{k}", xs), Step(ys, f"{cut}{k}", (f"m{tag}", f"lay{tag}")),
            *(Step(f"z{tag}{j}", op, (y,)) for j, (op, y) in enumerate(zip(ops, ys)))]


def _run_steps(steps, values):
    program = Program(steps, (), Counters())
    v = program.forward(values)
    return {name: v[slot] for name, slot in program.slot.items()}


NUMPY_UNARY = {"sigmoid": lambda x: 1 / (1 + np.exp(-x)), "tanh": np.tanh}


def test_fuse_blocks_fuses_a_later_cut_after_one_with_nothing_to_gain():
    from symdiff.passes import fuse_blocks

    rng = np.random.default_rng(6)
    nothing = ["sigmoid", "tanh", "sigmoid"]  # no two neighbouring blocks share an op
    gain = ["sigmoid", "sigmoid", "tanh"]
    steps = _cut_and_squash("hconcat", "split", nothing, "a") + _cut_and_squash("hconcat", "split", gain, "b")
    values = {f"x{t}{j}": rng.standard_normal((3, 2 + j)) for t in "ab" for j in range(3)}
    rewritten = fuse_blocks(steps)
    assert "blockmap[sigmoid*2,tanh]" in [s.op for s in rewritten]
    assert "blockmap[sigmoid,tanh,sigmoid]" not in [s.op for s in rewritten]
    got = _run_steps(rewritten, values)
    for t, ops in (("a", nothing), ("b", gain)):
        for j, op in enumerate(ops):
            np.testing.assert_allclose(got[f"z{t}{j}"], NUMPY_UNARY[op](values[f"x{t}{j}"]), rtol=1e-13)


def test_fuse_blocks_leaves_row_cuts_and_steps_that_are_no_cut_alone():
    # fuse_blocks lifts work over column blocks (split{k}); a row cut (rsplit{k}) is not one, and neither
    # is an ordinary step (here with one-letter registers, which iterate like a tuple of names)
    from symdiff.passes import fuse_blocks

    rng = np.random.default_rng(7)
    rows = _cut_and_squash("vconcat", "rsplit", ["sigmoid", "sigmoid", "tanh"], "r")
    plain = [Step("q", "hadamard", ("x", "y")), Step("w", "add", ("q", "b"))]
    values = {**{f"xr{j}": rng.standard_normal((1 + j, 4)) for j in range(3)},
              "x": rng.standard_normal((3, 2)), "y": rng.standard_normal((3, 2)), "b": rng.standard_normal((3, 2))}
    assert fuse_blocks(rows + plain) == rows + plain
    got = _run_steps(fuse_blocks(rows + plain), values)
    for j, op in enumerate(["sigmoid", "sigmoid", "tanh"]):
        np.testing.assert_allclose(got[f"zr{j}"], NUMPY_UNARY[op](values[f"xr{j}"]), rtol=1e-13)
    np.testing.assert_allclose(got["w"], values["x"] * values["y"] + values["b"], rtol=1e-13)


def test_cat_hands_each_part_its_block_of_the_gradient_after_intermediates_are_released():
    # cat{k} joins the biases of a fused LSTM's gates; its backward cuts the gradient by the layout it made,
    # so that layout must survive the release of intermediates (forward with keep=) and one delta comes in
    from symdiff.ops import block_op

    rng = np.random.default_rng(8)
    widths = (2, 1, 3, 2, 4)
    cat = block_op("cat", len(widths))
    parts = tuple(f"p{j}" for j in range(len(widths)))
    steps = [Step(("c", "lay"), cat.name, parts), Step("y", "hadamard", ("c", "w"))]
    values = {**{p: rng.standard_normal(n) for p, n in zip(parts, widths)}, "w": rng.standard_normal((3, sum(widths)))}
    program = Program(steps, parts, Counters())
    v = program.forward(values, keep=("y",))
    np.testing.assert_allclose(v[program.slot["y"]], np.concatenate([values[p] for p in parts]) * values["w"])
    delta = rng.standard_normal((3, sum(widths)))
    g = program.backward(v, {"y": delta})
    full = (delta * values["w"]).sum(axis=0)
    offsets = np.cumsum((0, *widths))
    for j, p in enumerate(parts):
        np.testing.assert_allclose(g[program.slot[p]], full[offsets[j]:offsets[j + 1]], rtol=1e-13)

