"""Ops with static arguments: NumPy's values, gradients against central differences, errors.

Gradients are checked with hypothesis over random shapes, axes (negative ones too),
keepdims, reshapes, permutations, concatenations (empty parts too) and indices
(steps, empty slices, None, ..., repeated integer indices).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from symdiff import Autograd, SymdiffError, XMan, f, grad_check
from symdiff import array_ops as A
from symdiff.gradcheck import check_op

TOL = 1e-6
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)


def _values(draw, shape):
    """Distinct values at least 0.3 apart in a drawn order: no ties, and no kink of max within eps."""
    n = int(np.prod(shape))
    order = np.array(draw(st.permutations(range(n))), dtype=np.float64)
    return (0.3 * order - 0.15 * n + draw(st.floats(-1, 1))).reshape(shape)


@st.composite
def reduction_case(draw):
    shape = draw(shapes)
    x = _values(draw, shape)  # distinct values: no ties, so max is differentiable everywhere
    nd = len(shape)
    axis = draw(st.one_of(st.none(), st.integers(-nd, nd - 1),
                          st.lists(st.integers(0, nd - 1), unique=True, max_size=nd).map(tuple)))
    return x, axis, draw(st.booleans())


def _check(op, *xs, tol=TOL):
    err = check_op(op, rng=np.random.default_rng(0), inputs=xs)
    assert err < tol, f"{op.name}: max relative error {err:.2e} at shapes {[np.shape(x) for x in xs]}"


@SETTINGS
@given(case=reduction_case(), which=st.sampled_from(["sum", "mean", "max", "logsumexp"]))
def test_reductions_match_numpy_and_central_differences(case, which):
    x, axis, keepdims = case
    op = {"sum": A.sum_op, "mean": A.mean_op, "max": A.max_op, "logsumexp": A.logsumexp_op}[which](axis, keepdims)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        got = op.forward(x)
    want = {"sum": np.sum, "mean": np.mean, "max": np.max}.get(which)
    if want is not None:
        np.testing.assert_allclose(got, want(x, axis=axis, keepdims=keepdims), rtol=1e-12, atol=1e-12)
    else:
        from scipy.special import logsumexp

        np.testing.assert_allclose(got, logsumexp(x, axis=axis, keepdims=keepdims), rtol=1e-12)
    _check(op, x)


@SETTINGS
@given(shape=shapes, data=st.data(), which=st.sampled_from(["softMax", "log_softmax"]))
def test_softmax_and_log_softmax_along_any_axis(shape, data, which):
    x = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-30, 30, width=64)))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    op = (A.softmax_op if which == "softMax" else A.log_softmax_op)(axis)
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    p = z / z.sum(axis=axis, keepdims=True)
    np.testing.assert_allclose(op.forward(x), p if which == "softMax" else np.log(p), rtol=1e-9, atol=1e-12)
    # inputs up to ±30 make some probabilities tiny: central differences (eps 1e-6) then reach only
    # ~1e-6 relative error (hypothesis once found 1.25e-6); a wrong derivative is off by O(1)
    _check(op, x, tol=1e-5)


def test_softmax_default_is_the_seed_op_row_wise_and_log_softmax_is_stable():
    x = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    xm = XMan()
    xm.x = f.input(name="x", default=x)
    xm.p = f.softMax(xm.x)
    xm.q = f.log_softmax(xm.x)
    xm = xm.setup()
    assert xm.p.op.name == "softMax" and xm.q.op.name == "log_softmax"
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        v = Autograd(xm).eval(xm.operationSequence(xm.q), xm.inputDict())
    np.testing.assert_allclose(v["q"][0], [0.0, -1000.0, -2000.0])
    assert f.softMax(xm.x, axis=0).op.name == "softMax[axis=0]"


@SETTINGS
@given(shape=shapes, data=st.data())
def test_reshape_and_transpose(shape, data):
    x = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-2, 2, width=64)))
    target = data.draw(st.permutations(list(shape)).map(tuple))
    if data.draw(st.booleans()):
        k = data.draw(st.integers(0, len(target) - 1))
        target = target[:k] + (-1,) + target[k + 1:]
    op = A.reshape_op(target)
    np.testing.assert_array_equal(op.forward(x), x.reshape(target))
    _check(op, x)
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    perm = tuple(p - len(shape) if data.draw(st.booleans()) else p for p in perm)  # negative axes too
    op = A.transpose_op(perm)
    np.testing.assert_array_equal(op.forward(x), np.transpose(x, perm))
    _check(op, x)


@SETTINGS
@given(shape=shapes, data=st.data())
def test_concat_and_stack(shape, data):
    nd = len(shape)
    axis = data.draw(st.integers(-nd, nd - 1))
    k = data.draw(st.integers(1, 3))
    parts = []
    for _ in range(k):
        s = list(shape)
        s[axis] = data.draw(st.integers(0, 3))  # empty parts too
        parts.append(np.random.default_rng(len(parts)).uniform(-2, 2, s))
    op = A.concat_op(k, axis)
    np.testing.assert_array_equal(op.forward(*parts), np.concatenate(parts, axis=axis))
    _check(op, *parts)
    same = [np.random.default_rng(j).uniform(-2, 2, shape) for j in range(k)]
    new_axis = data.draw(st.integers(-nd - 1, nd))
    op = A.stack_op(k, new_axis)
    np.testing.assert_array_equal(op.forward(*same), np.stack(same, axis=new_axis))
    _check(op, *same)


@st.composite
def index_case(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5))
    items: list = []
    dims = list(shape)
    arrays = 0
    while dims:
        n = dims.pop(0)
        kind = draw(st.sampled_from(["int", "slice", "array", "none", "full"]))
        if kind == "int":
            items.append(draw(st.integers(-n, n - 1)))
        elif kind == "slice":
            step = draw(st.sampled_from([None, 1, 2, -1, -2]))
            items.append(slice(draw(st.one_of(st.none(), st.integers(-n - 1, n + 1))),
                               draw(st.one_of(st.none(), st.integers(-n - 1, n + 1))), step))  # may be empty
        elif kind == "array" and arrays == 0:  # one integer array: repeated indices allowed
            arrays += 1
            items.append(np.array(draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=6))))
        elif kind == "none":
            items.append(None)
            dims.insert(0, n)
        else:
            items.append(slice(None))
    if draw(st.booleans()) and len(items) > 1:
        k = draw(st.integers(0, len(items) - 1))  # an Ellipsis standing for trailing full slices
        if all(isinstance(i, slice) and i == slice(None) for i in items[k:]):
            items = items[:k] + [Ellipsis]
    return shape, tuple(items)


@SETTINGS
@given(case=index_case())
def test_indexing_is_numpy_gather_with_scatter_add_gradient(case):
    shape, index = case
    x = np.random.default_rng(1).uniform(-2, 2, shape)
    op = A.getitem_op(index)
    np.testing.assert_array_equal(op.forward(x), x[index])
    _check(op, x)
    # the scatter op's gradient is the gather again (the pair used by gradients of gradients)
    d = np.random.default_rng(2).normal(size=np.shape(x[index]))
    _check(A.scatter_op(index), d, x)


def test_repeated_indices_add_up_in_the_gradient():
    xm = XMan()
    xm.x = f.param(name="x", default=np.array([1.0, 2.0, 3.0, 4.0]))
    xm.loss = f.sum(xm.x[[0, 0, 2, 0]])
    xm = xm.setup()
    w = xm.operationSequence(xm.loss)
    ad = Autograd(xm)
    g = ad.bprop(w, ad.eval(w, xm.inputDict()), loss=np.float64(1.0))["x"]
    np.testing.assert_array_equal(g, [3.0, 0.0, 1.0, 0.0])


def test_max_splits_the_gradient_equally_between_ties():
    op = A.max_op(axis=1)
    x = np.array([[1.0, 3.0, 3.0], [5.0, 0.0, 1.0]])
    g = op.backward[0](np.array([1.0, 2.0]), op.forward(x), x)
    np.testing.assert_array_equal(g, [[0.0, 0.5, 0.5], [2.0, 0.0, 0.0]])


def test_max_in_a_compiled_program_sends_the_gradient_to_the_maxima_it_found():
    """The backward reuses the forward's maximum (``backward_reads``): in a compiled program, where
    a value that no backward declares it reads is dropped after its last forward use (here the max
    feeds only a sum), ties along an inner axis still share equally, the rest get nothing, and a
    float32 stack stays float32."""
    x = np.array([[[1, 4], [3, 4], [3, -1]],
                  [[0, 0], [-2, 0], [5, 0]]], np.float32) / 4  # (2, 3, 2): max over axis 1
    xm = XMan()
    xm.x = f.param(name="x", default=x)
    xm.loss = f.sum(f.max(f.tanh(xm.x), axis=1))
    xm = xm.setup()
    program = Autograd(xm).compile(xm.operationSequence(xm.loss))
    v = program.forward(xm.inputDict(), keep=("loss",))
    g = program.backward(v, {"loss": np.float32(1.0)}, params_only=True)[program.slot["x"]]
    weights = np.array([[[0, 1 / 2], [1 / 2, 1 / 2], [1 / 2, 0]],
                        [[0, 1 / 3], [0, 1 / 3], [1, 1 / 3]]])
    assert g.dtype == np.float32
    np.testing.assert_allclose(g, weights * (1 - np.tanh(x.astype(np.float64)) ** 2), rtol=1e-5)


def test_logsumexp_is_stable_at_the_extremes():
    op = A.logsumexp_op(axis=-1)
    x = np.array([[1000.0, 1000.0], [-np.inf, -np.inf], [-1000.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = op.forward(x)
    np.testing.assert_allclose(out[[0, 2]], [1000.0 + np.log(2.0), np.log1p(np.exp(-1000.0))])
    assert out[1] == -np.inf


def test_where_takes_no_gradient_to_its_mask_and_broadcasts():
    rng = np.random.default_rng(3)
    mask = rng.random((4, 1)) < 0.5
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(3,))
    _check(symdiff_op("where"), mask, a, b)
    xm = XMan()
    xm.m = f.input(name="m", default=mask)
    xm.a = f.param(name="a", default=a)
    xm.b = f.param(name="b", default=b)
    xm.loss = f.sum(f.square(f.where(xm.m, xm.a, xm.b)))
    xm = xm.setup()
    assert grad_check(xm, xm.operationSequence(xm.loss), max_elements=None).ok


def symdiff_op(name):
    import symdiff

    return symdiff.OPS[name]


def test_a_model_with_every_structural_op_passes_grad_check_fused_and_unfused():
    rng = np.random.default_rng(4)
    xm = XMan()
    xm.x = f.param(name="x", default=rng.normal(size=(2, 3, 4)))
    xm.m = f.input(name="m", default=rng.random((2, 3, 4)) < 0.5)
    h = f.hadamard
    parts = [f.sum(xm.x, axis=1), f.max(xm.x, axis=(0, 2), keepdims=True), f.logsumexp(xm.x, axis=-1),
             h(f.log_softmax(xm.x, axis=0), f.softMax(xm.x, axis=1)), f.reshape(xm.x, (4, -1)),
             f.tanh(f.transpose(xm.x, (2, 0, 1))), f.concat([xm.x, 2 * xm.x], axis=1),
             f.stack([xm.x, xm.x ** 2], axis=-1), f.square(xm.x[1, ::-2, None, [0, 0, 3]]), xm.x[..., 1:2],
             f.where(xm.m, xm.x, 1 - xm.x), f.mean(xm.x, axis=-1, keepdims=True)]
    total = f.sum(parts[0])
    for p in parts[1:]:
        total = total + f.sum(p)
    xm.loss = total
    xm = xm.setup()
    w = xm.operationSequence(xm.loss)
    assert grad_check(xm, w, max_elements=None).ok
    assert grad_check(xm, w, max_elements=None, fuse=False).ok


# --------------------------------------------------------------------------------------
# errors: static arguments when the graph is built, shapes when the step runs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, message", [
    (lambda x: f.sum(x, axis=1.0), r"f.sum: axis must be an int, a tuple of ints or None, got 1.0 \(float\)"),
    (lambda x: f.sum(x, axis=True), "axis must be"),
    (lambda x: f.mean(x, axis=(0, 0)), "repeats an axis"),
    (lambda x: f.max(x, keepdims=1), "keepdims must be True or False"),
    (lambda x: f.softMax(x, axis=(0, 1)), r"f.softMax: axis must be an int, got \(0, 1\)"),
    (lambda x: f.reshape(x, x), "not a register"),
    (lambda x: f.reshape(x, (2, -1, -1)), "at most one -1"),
    (lambda x: f.reshape(x, (2.5, 2)), "must be an int, got 2.5"),
    (lambda x: f.transpose(x, 1), "axes must be a tuple of ints"),
    (lambda x: x[1.5], "indices are ints, slices"),
    (lambda x: x[x], "is a register"),
    (lambda x: x[np.array([True, False])], "use f.where"),
    (lambda x: x[..., 0, ...], "only one"),
    (lambda x: x[::0], "step cannot be zero"),
    (lambda x: f.concat(x), "non-empty list of registers"),
    (lambda x: f.stack([x, 3]), "item 1 of the list is a int"),
])
def test_bad_static_arguments_fail_when_the_graph_is_built(build, message):
    x = f.input(name="x")
    with pytest.raises((TypeError, ValueError), match=message):
        build(x)


@pytest.mark.parametrize("build, value, message", [
    (lambda x: f.sum(x, axis=2), np.ones((2, 3)), r"sum\[axis=2, keepdims=False\].*axis 2 is out of range.*\(2, 3\)"),
    (lambda x: f.reshape(x, (4, 2)), np.ones((2, 3)), r"cannot reshape an input of shape \(2, 3\).*shape=\(4, 2\)"),
    (lambda x: x[5], np.ones((2, 3)), "index 5 is out of bounds"),
    (lambda x: f.concat([x, f.transpose(x)], axis=0), np.ones((2, 3)), "concat"),
    (lambda x: f.transpose(x, (0, 2, 1)), np.ones((2, 3)), r"not a permutation of the 2 axes.*\(2, 3\)"),
    (lambda x: f.where(x, x, x), np.ones((2, 3)), "mask must be a boolean array"),
])
def test_errors_at_run_time_name_the_step_the_op_and_the_shapes(build, value, message):
    xm = XMan()
    xm.x = f.input(name="x", default=value)
    xm.y = build(xm.x)
    xm = xm.setup()
    with pytest.raises(SymdiffError, match=r"computing register 'y' failed for inputs x\(2, 3\).*" + message):
        Autograd(xm).eval(xm.operationSequence(xm.y), xm.inputDict())


def test_where_mask_of_the_wrong_shape_names_the_shapes():
    xm = XMan()
    xm.m = f.input(name="m", default=np.ones((4,), bool))
    xm.a = f.input(name="a", default=np.ones((2, 3)))
    xm.y = f.where(xm.m, xm.a, xm.a)
    xm = xm.setup()
    with pytest.raises(SymdiffError, match=r"'where'.*m\(4,\), a\(2, 3\).*broadcast"):
        Autograd(xm).eval(xm.operationSequence(xm.y), xm.inputDict())


def test_the_same_static_arguments_make_the_same_op():
    x = f.input(name="x")
    assert f.sum(x, axis=1).op is f.sum(x, axis=(1,) if False else 1).op
    assert f.sum(x).op.name == "sum" and f.mean(x).op.name == "mean" and f.transpose(x).op.name == "transpose"
    assert x[[0, 1]].op is x[np.array([0, 1])].op
    assert x[1:3].op is not x[1:4].op


@pytest.mark.parametrize("make", [
    lambda: A.sum_op(1), lambda: A.mean_op((0, 1), True), lambda: A.max_op(-1), lambda: A.logsumexp_op(0),
    lambda: A.softmax_op(0), lambda: A.log_softmax_op(), lambda: A.reshape_op((-1,)), lambda: A.transpose_op((1, 0)),
    lambda: A.getitem_op((slice(None, None, -1), [0, 0])), lambda: A.concat_op(1, 1), lambda: A.stack_op(1, -1),
])
def test_float32_stays_float32_forward_and_backward(make):
    op = make()
    x = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    out = op.forward(x)
    g = op.backward[0](np.ones_like(out), out, x)
    assert out.dtype == np.float32 and g.dtype == np.float32 and g.shape == x.shape
