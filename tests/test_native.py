"""Compiled fused kernels (symdiff.native): the same numbers as the numpy kernels, or numpy itself.

Every check compares the C kernel with the numpy kernel lambdified from the same
expressions (and, for the LSTM cell, with central differences); the fallbacks are
checked to hand back the numpy answer when the arrays do not fit the compiled loop.
Tests that need a working compiler skip, saying why, where there is none.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.training import build_model
from symdiff import Autograd, OneHot, XMan, f, native
from symdiff.registry import OPS, sum_to_shape
from symdiff.fusion import GroupSpec, fused_kernel

REPO = Path(__file__).resolve().parents[1]
needs_compiler = pytest.mark.skipif(not native.enabled(), reason=f"native kernels: {native.status()}")


@pytest.fixture
def compiled(monkeypatch):
    """Compile on first call whatever the array size (the default waits for 256 elements)."""
    if not native.enabled():
        pytest.skip(f"native kernels: {native.status()}")
    monkeypatch.setattr(native, "MIN_ELEMENTS", 0)
    yield
    native.set_enabled(None)  # as SYMDIFF_NATIVE says again, whatever the test switched


def _chain(op_name: str, then: str = "tanh"):
    """A fused kernel for ``then(op(in0, ..., in_k))``: the op inside a composite expression."""
    arity = OPS[op_name].arity
    steps = ((op_name, tuple(("in", k) for k in range(arity))), (then, (("step", 0),)))
    return fused_kernel(GroupSpec(steps, arity, (1,), (0,)))


def _numpy_grads(kernel, needed, deltas, results, inputs):
    grads = kernel.backward(needed)(*[0 if d is None else d for d in deltas], *results, *inputs)
    wanted = [x for x, need in zip(inputs, needed) if need]
    return [sum_to_shape(np.broadcast_to(g, np.broadcast_shapes(np.shape(g), x.shape)), x.shape, x.dtype)
            for g, x in zip(grads, wanted)]


def _check_kernel(kernel, inputs, deltas, rtol):
    atol = 1e-14 if rtol < 1e-9 else 1e-5  # float32: 1 - tanh² near saturation keeps few digits in both
    native_out = kernel.forward(*inputs)
    numpy_out = kernel.numpy_forward(*inputs)
    assert kernel.native_forward.fns is not None, kernel.native_forward.error
    assert kernel.native_forward.error is None
    for a, b in zip(native_out, numpy_out):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    needed = (True,) * kernel.n_inputs
    got = kernel.native_backward(needed)(deltas, list(native_out), list(inputs))
    assert got is not None
    want = _numpy_grads(kernel, needed, deltas, numpy_out, inputs)
    for j, (a, b) in enumerate(zip(got, want)):
        assert a.shape == inputs[j].shape and a.dtype == inputs[j].dtype, j
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"input {j}")


def _elementwise_ops() -> list[str]:
    return sorted(n for n, op in OPS.items() if op.elementwise and op.symbolic is not None)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("name", _elementwise_ops())
def test_every_primitive_compiles_and_matches_numpy_inside_a_chain(compiled, name, dtype, rtol):
    kernel = _chain(name)
    rng = np.random.default_rng(0)
    arity = OPS[name].arity
    # positive inputs keep log/sqrt-like user ops defined; a bias-shaped last input broadcasts by rows
    inputs = [rng.uniform(0.2, 1.5, size=(5, 9) if k < arity - 1 or arity == 1 else (9,)).astype(dtype)
              for k in range(arity)]
    deltas = [rng.standard_normal((5, 9)).astype(dtype)]
    _check_kernel(kernel, inputs, deltas, rtol)


def _lstm_cell_kernel():
    model = build_model("lstm", dict(max_len=2, num_chars=5, num_hid=4, num_labels=3), seed=0)
    program = Autograd(model.xm, native=True).compile(model.xm.operationSequence(model.xm.register("loss")))
    (name,) = {s.op for s in program.steps if s.op.startswith("fused") and "hadamard" in s.op}
    op = program.ops[[s.op for s in program.steps].index(name)]
    return getattr(op, "inner", op)  # the cell itself, without the gate cuts fold_cuts folded into it


def _cell_inputs(kernel, rng, dtype=np.float64, rows=6, width=7):
    """The cell's inputs as the engine hands them over: gate blocks are column views of one product."""
    stacked = {}
    inputs = []
    for k in range(kernel.n_inputs):
        if rng.random() < 0.3:
            inputs.append(rng.uniform(-2, 2, width).astype(dtype))  # a bias
        else:
            key = k // 4
            if key not in stacked:
                stacked[key] = rng.uniform(-2, 2, (rows, 4 * width)).astype(dtype)
            j = k % 4
            inputs.append(stacked[key][:, j * width:(j + 1) * width])
    return inputs


@needs_compiler
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_lstm_cell_compiled_matches_numpy_on_views_and_broadcast_biases(compiled, dtype, rtol):
    kernel = _lstm_cell_kernel()
    rng = np.random.default_rng(1)
    inputs = _cell_inputs(kernel, rng, dtype)
    deltas = [rng.standard_normal((6, 7)).astype(dtype) for _ in range(kernel.n_deltas)]
    _check_kernel(kernel, inputs, deltas, rtol)
    deltas[0] = None  # the last step's cell state: no gradient arrives
    out = kernel.forward(*inputs)
    got = kernel.native_backward((True,) * kernel.n_inputs)(deltas, list(out), inputs)
    want = _numpy_grads(kernel, (True,) * kernel.n_inputs, deltas, out, inputs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-14 if dtype == np.float64 else 1e-5)


def test_lstm_cell_compiled_gradient_passes_central_differences(compiled):
    kernel = _lstm_cell_kernel()
    rng = np.random.default_rng(2)
    xs = [rng.uniform(-2, 2, size=(3, 4)) for _ in range(kernel.n_inputs)]
    deltas = [rng.standard_normal((3, 4)) for _ in range(kernel.n_deltas)]
    results = kernel.forward(*xs)
    grads = kernel.native_backward((True,) * kernel.n_inputs)(deltas, list(results), xs)

    def scalar() -> float:
        return sum(float(np.sum(d * o)) for d, o in zip(deltas, kernel.forward(*xs)[:kernel.n_deltas]))

    eps = 1e-6
    for j in range(kernel.n_inputs):
        num = np.zeros_like(xs[j])
        for i in range(xs[j].size):
            orig = xs[j].flat[i]
            xs[j].flat[i] = orig + eps
            up = scalar()
            xs[j].flat[i] = orig - eps
            down = scalar()
            xs[j].flat[i] = orig
            num.flat[i] = (up - down) / (2 * eps)
        assert np.max(np.abs(grads[j] - num) / np.maximum(np.abs(num), 1e-3)) < 1e-6, f"input {j}"


def test_identical_gradients_share_one_block_and_cut_blocks_join_without_a_copy(compiled):
    from symdiff.ops import _join

    kernel = _lstm_cell_kernel()
    rng = np.random.default_rng(3)
    rows, width = 5, 8
    xw, hu = rng.standard_normal((rows, 4 * width)), rng.standard_normal((rows, 4 * width))
    blocks = [a[:, j * width:(j + 1) * width] for a in (xw, hu) for j in range(4)]
    extra = [rng.standard_normal(width) for _ in range(4)] + [rng.standard_normal((rows, width))]
    inputs = blocks + extra  # the fusion pass orders the cell's inputs: x blocks, h blocks, biases, c
    deltas = [rng.standard_normal((rows, width)) for _ in range(kernel.n_deltas)]
    out = kernel.forward(*inputs)
    grads = kernel.native_backward((True,) * kernel.n_inputs)(deltas, list(out), inputs)
    for j in range(4):  # d/d(x·W block j) == d/d(h·U block j): the same memory
        assert np.shares_memory(grads[j], grads[4 + j])
    layout = np.array([[0, width, 2 * width, 3 * width, 4 * width], [0, 0, 0, 0, 0]])
    joined = _join(list(grads[:4]), layout)
    assert joined.shape == (rows, 4 * width) and np.shares_memory(joined, grads[0])
    np.testing.assert_array_equal(joined, np.concatenate(grads[:4], axis=1))
    # out of order, or from two buffers: a real concatenation
    swapped = _join([grads[1], grads[0], grads[2], grads[3]], layout)
    assert not np.shares_memory(swapped, grads[0])
    np.testing.assert_array_equal(swapped, np.concatenate([grads[1], grads[0], grads[2], grads[3]], axis=1))


def test_side_by_side_parameters_join_to_the_same_view_every_batch():
    """hconcat of blocks stored side by side is a view, remembered by the parts' identity: two sets
    through one op alternately each get their own join, an in-place update shows through it, and
    other arrays (or the same ones with compiled helpers switched off) are joined afresh."""
    if not native.enabled():
        pytest.skip(f"native kernels: {native.status()}")
    from symdiff.ops import Stack

    hconcat = Stack(2, 1)
    W, U = np.arange(12.0).reshape(3, 4), -np.arange(6.0).reshape(3, 2)
    for _ in range(2):
        for buf in (W, U):
            half = buf.shape[1] // 2
            parts = (buf[:, :half], buf[:, half:])
            joined, layout = hconcat.forward(*parts)
            assert np.shares_memory(joined, buf)
            np.testing.assert_array_equal(joined, buf)
            np.testing.assert_array_equal(layout[0], [0, half, buf.shape[1]])
    parts = (W[:, :2], W[:, 2:])
    first = hconcat.forward(*parts)[0]
    assert hconcat.forward(*parts)[0] is first      # the same parts: the same view
    parts[0][1, 1] = 100.0                          # an optimizer's in-place step
    np.testing.assert_array_equal(hconcat.forward(*parts)[0], W)
    apart = (W[:, :2].copy(), W[:, 2:].copy())      # not side by side: a concatenation
    assert not np.shares_memory(hconcat.forward(*apart)[0], W)
    try:
        native.set_enabled(False)
        off = hconcat.forward(*parts)[0]
        assert not np.shares_memory(off, W)         # switched off: numpy's concatenation
        np.testing.assert_array_equal(off, W)
    finally:
        native.set_enabled(None)


@pytest.mark.parametrize("case", ["float16", "mixed dtypes", "3-D", "column broadcast", "strided columns",
                                  "a scalar", "a list"])
def test_arrays_that_do_not_fit_the_loop_get_the_numpy_answer(compiled, case):
    kernel = _chain("hadamard")
    rng = np.random.default_rng(4)
    a, b = rng.uniform(-1, 1, (4, 6)), rng.uniform(-1, 1, (4, 6))
    if case == "float16":
        a, b = a.astype(np.float16), b.astype(np.float16)
    elif case == "mixed dtypes":
        b = b.astype(np.float32)
    elif case == "3-D":
        a, b = rng.uniform(-1, 1, (2, 3, 6)), rng.uniform(-1, 1, (2, 3, 6))
    elif case == "column broadcast":
        b = rng.uniform(-1, 1, (4, 1))
    elif case == "strided columns":
        a = rng.uniform(-1, 1, (4, 12))[:, ::2]
    elif case == "a scalar":
        b = np.float64(0.5)
    else:
        b = b.tolist()
    out = kernel.forward(a, b)
    want = kernel.numpy_forward(a, b)
    for x, y in zip(out, want):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)  # it *is* the numpy kernel's answer
    if isinstance(b, np.ndarray) and b.ndim:
        assert kernel.native_backward((True, True))([np.ones_like(out[0])], list(out), [a, b]) is None


def test_extreme_values_match_numpy_without_warnings(compiled):
    values = np.array([[-1e308, -1000.0, -40.0, -1e-300, -0.0, 0.0, 1e-300, 40.0, 1000.0, 1e308,
                        np.inf, -np.inf, np.nan]])
    for name in ("sigmoid", "tanh", "relu", "exp", "square"):
        kernel = _chain(name, then="negate")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = kernel.forward(values)
            grads = kernel.native_backward((True,))([np.ones_like(values)], list(out), [values])
        with np.errstate(all="ignore"):
            want = kernel.numpy_forward(values)
            want_g = _numpy_grads(kernel, (True,), [np.ones_like(values)], want, [values])
        np.testing.assert_allclose(out[0], want[0], rtol=1e-12, equal_nan=True, err_msg=name)
        np.testing.assert_allclose(grads[0], want_g[0], rtol=1e-12, equal_nan=True, err_msg=name)
        assert np.signbit(out[0][0, 4]) == np.signbit(want[0][0, 4]), name  # -0.0 stays -0.0


def test_a_user_op_is_compiled_from_its_declaration(compiled):
    import sympy as sp

    from symdiff import defop

    x, y = sp.symbols("x y")
    defop("native_test_softclip", sp.log(1 + sp.exp(x)) - sp.log(1 + sp.exp(x - y)), args=[x, y])
    kernel = _chain("native_test_softclip")
    rng = np.random.default_rng(5)
    inputs = [rng.uniform(-30, 30, (4, 10)), rng.uniform(0, 5, (10,))]
    _check_kernel(kernel, inputs, [rng.standard_normal((4, 10))], 1e-12)


def test_max_and_min_keep_nan_like_numpy(compiled):
    import sympy as sp

    from symdiff import defop

    x, y, z = sp.symbols("x y z")
    defop("native_test_clamp", sp.Min(sp.Max(x, y), z + 1), args=[x, y, z])
    kernel = _chain("native_test_clamp", then="negate")
    a = np.array([[np.nan, 1.0, 2.0, -3.0, 0.5, 4.0]])
    b = np.array([[0.0, np.nan, 1.0, -1.0, 0.5, -4.0]])
    c = np.array([[1.0, 1.0, np.nan, 0.0, -0.5, 2.0]])
    np.testing.assert_array_equal(kernel.forward(a, b, c)[0], kernel.numpy_forward(a, b, c)[0])
    assert kernel.native_forward.fns is not None


def test_segment_sum_is_the_one_hot_weight_gradient():
    rng = np.random.default_rng(6)
    codes = rng.integers(-1, 9, size=(40, 3))
    x = OneHot(codes, 9)
    delta = rng.standard_normal((40, 5))
    want = np.asarray(x).T @ delta
    np.testing.assert_allclose(np.asarray(x.rmatmul_grad(delta)), want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(x.rmatmul_grad(delta[:, ::1].astype(np.float32))), want, rtol=1e-5,
                               atol=1e-5)
    if native.enabled():
        d = native.dispatcher()
        rows = np.array([0, 3, 39], dtype=np.intp)
        starts = np.array([0, 2], dtype=np.intp)
        np.testing.assert_allclose(d.segment_sum(delta, rows, starts),
                                   np.stack([delta[0] + delta[3], delta[39]]), rtol=1e-15)
        assert d.segment_sum(delta, np.array([0, 40], dtype=np.intp), starts) is None  # out of range
        assert d.segment_sum(delta, rows, np.array([2, 0], dtype=np.intp)) is None     # unsorted


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_compiled_one_hot_product_gradient_and_row_update_give_numpys_bits(compiled, dtype, index_dtype):
    """onehot_gather and rows_sub_scaled add and round in numpy's order (the same bits as its paths),
    onehot_scatter in segment_sum's, the compiled path it replaces (numpy's reduceat adds in its own order:
    equal to rounding); a column listed twice in a row counts twice; None for what they cannot take."""
    from symdiff.optim import SGD

    rng = np.random.default_rng(8)
    codes = rng.integers(-1, 9, size=(40, 3)).astype(index_dtype)
    codes[0] = [4, 4, -1]
    codes[1] = [-1, -1, -1]  # a row selecting nothing: zeros (the gather does not zero its output first)
    codes[2] = [6, -1, -1]
    x = OneHot(codes, 9, dtype)
    w = rng.standard_normal((9, 7)).astype(dtype)
    w[6, :3] = -0.0  # its first row is added to zeros: 0 + -0.0 is +0.0, as in numpy's sum
    delta = rng.standard_normal((40, 7)).astype(dtype)
    d = native.dispatcher()
    got, grad = x.matmul(w), x.rmatmul_grad(delta)
    native.set_enabled(False)  # the numpy paths (restored by the fixture)
    x_numpy = OneHot(codes, 9, dtype)
    want, want_grad = x.matmul(w), x_numpy.rmatmul_grad(delta)
    assert got.dtype == want.dtype == dtype and np.array_equal(got, want)
    assert np.array_equal(np.signbit(got), np.signbit(want)) and not np.signbit(got[2, :3]).any()
    rows, _, starts = x_numpy._segments
    assert np.array_equal(grad.rows, want_grad.rows)
    assert np.array_equal(grad.values, d.segment_sum(delta, rows.astype(np.intp), starts.astype(np.intp)))
    np.testing.assert_allclose(grad.values, want_grad.values, rtol=1e-5 if dtype == np.float32 else 1e-13)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(x).T @ delta, rtol=1e-5, atol=1e-5)
    p_numpy = w.copy()
    SGD({"w": p_numpy}, lr=0.3).step({"w": grad})
    native.set_enabled(None)
    p_native = w.copy()
    assert d.rows_sub_scaled(p_native, grad.rows, grad.values, 0.3) is True
    assert np.array_equal(p_native, p_numpy) and not np.array_equal(p_native, w)
    assert d.onehot_gather(codes, w[:8]) is None                                   # a column beyond w's rows
    assert d.onehot_gather(codes.astype(np.int16), w) is None                      # an index type it does not read
    assert d.onehot_scatter(codes, 9, delta[:39]) is None                          # rows differ
    assert d.rows_sub_scaled(p_native, grad.rows + 9, grad.values, 0.3) is None   # rows out of range
    assert d.rows_sub_scaled(p_native.astype(np.float16), grad.rows, grad.values, 0.3) is None


def _optimiser_case(dtype: Any, rng: np.random.Generator, seed: int, extra: dict[str, Any] | None = None) -> Any:
    """What the compiled optimiser steps are checked on: a fresh start each call (two column blocks of
    one array, a bias, a one-hot weight) and three steps' gradients (the weight's row-sparse) from rng."""
    from symdiff.init import side_by_side
    from symdiff.onehot import RowSparse

    def start() -> dict[str, np.ndarray]:
        r = np.random.default_rng(seed)
        return {**side_by_side({g: r.standard_normal((6, 5)).astype(dtype) for g in "ab"}),  # strided views
                "bias": r.standard_normal(5).astype(dtype), "w": r.standard_normal((9, 5)).astype(dtype)}

    steps = [{"a": rng.standard_normal((6, 5)).astype(dtype), "b": rng.standard_normal((6, 5)).astype(dtype),
              "bias": rng.standard_normal(5).astype(dtype), **(extra or {}),
              "w": RowSparse(np.array([7, 0, 3], dtype=np.intp), rng.standard_normal((3, 5)).astype(dtype), (9, 5))}
             for _ in range(3)]
    return start, steps


def _same_bits_on_and_off(monkeypatch: Any, d: Any, method: str, start: Any, steps: Any, make: Any) -> list[Any]:
    """Run the optimiser ``make(params)`` over ``steps`` with native code on, then off; check both end with
    the same bytes in every parameter and state entry, updated in place; what each compiled call returned."""
    calls: list[Any] = []
    monkeypatch.setattr(d, method, lambda *a, _f=getattr(d, method): calls.append(_f(*a)) or calls[-1])
    results = []
    for on in (None, False):
        native.set_enabled(on)
        params = start()
        base = params["a"].base
        opt = make(params)
        for grads in steps:
            opt.step(grads)
        assert params["a"].base is base  # in place: the model's views are still its parameters
        results.append((params, opt.state_dict()))
    native.set_enabled(None)
    monkeypatch.undo()
    (p1, s1), (p2, s2) = results
    for n in p1:
        assert p1[n].tobytes() == p2[n].tobytes(), n
    for k in s1:
        assert np.asarray(s1[k]).tobytes() == np.asarray(s2[k]).tobytes(), k
    return calls


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("settings", [{}, {"weight_decay": 0.01}, {"momentum": 0.9},
                                      {"momentum": 0.5, "nesterov": True, "weight_decay": 0.1}])
def test_compiled_sgd_step_gives_numpys_bits_for_every_parameter_or_changes_nothing(compiled, monkeypatch, dtype,
                                                                                     settings):
    """sgd_step does SGD's update (weight decay, momentum, Nesterov) for all parameters in one call, rounding
    as numpy does (scalars in p's dtype, a product before a sum), on column blocks of one array, 1-d biases and
    row-sparse gradients: after a few steps parameters and velocities are the bits of the numpy path; anything
    it cannot take (a dtype, a shape, a gradient overlapping its parameter) changes nothing."""
    from symdiff.optim import SGD

    rng = np.random.default_rng(3)
    start, steps = _optimiser_case(dtype, rng, 4, extra={"not a parameter": np.ones(3, dtype)})
    lr = 0.1  # not exact in binary: float32 rounds it, as numpy does
    d = native.dispatcher()
    calls = _same_bits_on_and_off(monkeypatch, d, "sgd_step", start, steps, lambda ps: SGD(ps, lr=lr, **settings))
    assert calls == [True] * 3  # one compiled call a step did them all (none with native code off)
    p = rng.standard_normal((4, 3)).astype(dtype)
    before = p.copy()
    q = np.ones((4, 3), dtype)
    plain = (lr, 0.0, False, 0.0, None)
    assert d.sgd_step([q, p], [np.ones((4, 3), dtype), np.ones((4, 3), np.float16)], *plain) is None  # a dtype
    assert d.sgd_step([q, p], [np.ones((4, 3), dtype), np.ones((3, 3), dtype)], *plain) is None  # a shape
    assert d.sgd_step([q, p], [np.ones((4, 3), dtype), p[::-1]], *plain) is None  # overlaps its parameter
    assert d.sgd_step([q, p], [np.ones((4, 3), dtype), (np.array([4], dtype=np.intp), p[:1])], *plain) is None
    assert d.sgd_step([q, p], [np.ones((4, 3), dtype), np.ones((4, 3), dtype)], lr, 0.9, False, 0.0,
                      [np.zeros((4, 3), dtype), p]) is None  # a velocity that is its parameter
    assert np.array_equal(p, before) and np.array_equal(q, np.ones((4, 3), dtype))  # checked before any write
    assert d.sgd_step([p], [p], *plain) is True and np.array_equal(p, before - np.asarray(lr, dtype) * before)



@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name, wd", [("adam", 0.0), ("adam", 0.01), ("adamw", 0.3)])
def test_compiled_adam_step_gives_the_numpy_flat_steps_bits(compiled, monkeypatch, dtype, name, wd):
    """adam_step (copy in, L2 or decoupled decay, the moments, the step, in one call) rounds every operation
    as Adam's numpy path does: after a few steps parameters and state are the same bits; and it takes
    nothing it cannot do (None, nothing written)."""
    from symdiff.optim import make_optimizer

    start, steps = _optimiser_case(dtype, np.random.default_rng(5), 6)
    d = native.dispatcher()
    calls = _same_bits_on_and_off(monkeypatch, d, "adam_step", start, steps,
                                  lambda ps: make_optimizer(name, ps, 0.01, weight_decay=wd))
    assert calls == [True] * 3  # compiled: one call a step (and none with native code off)
    p = np.ones((4, 3), dtype)
    flat = tuple(np.zeros(12, dtype) for _ in range(4))
    scalars = (0.9, 0.1, 0.999, 0.001, 0.03, 1e-8, 0.1, 0.0, 1.0)
    assert d.adam_step([p], [np.ones((4, 3), dtype)], flat, scalars, 0) is True
    before = [p.copy(), *(b.copy() for b in flat)]
    assert d.adam_step([p], [np.ones((4, 3), dtype)], flat[:3] + (np.zeros(11, dtype),), scalars, 0) is None
    assert d.adam_step([p], [np.ones((4, 2), dtype)], flat, scalars, 0) is None                 # a shape
    assert d.adam_step([p], [np.ones((4, 3), np.float16)], flat, scalars, 0) is None            # a dtype
    assert d.adam_step([p], [np.ones((4, 3), dtype)], (flat[0], flat[0], flat[2], flat[3]), scalars, 0) is None
    assert d.adam_step([p], [(np.array([4], dtype=np.intp), p[:1])], flat, scalars, 0) is None  # a row
    assert all(np.array_equal(x, y) for x, y in zip([p, *flat], before))  # checked before any write

def test_row_blocks_are_read_in_place_as_their_concatenation():
    """rsplit's backward hands the product's backward its blocks' gradients uncopied (ops.RowBlocks):
    the one-hot scatter-add reads them where they are, a dense product joins them; same numbers."""
    from symdiff.ops import RowBlocks, _mul_da, _mul_db

    rng = np.random.default_rng(7)
    parts = [rng.standard_normal((64, 30))[:, 5:25] for _ in range(4)]  # views with a row stride
    joined = np.concatenate(parts)
    x = OneHot(rng.integers(-1, 9, size=(256, 2)), 9)
    rows = RowBlocks(parts)
    assert rows.shape == joined.shape and np.array_equal(np.asarray(rows), joined)
    np.testing.assert_allclose(np.asarray(x.rmatmul_grad(rows)), np.asarray(x).T @ joined, rtol=1e-12, atol=1e-14)
    dense, b = rng.standard_normal((256, 9)), rng.standard_normal((9, 20))
    np.testing.assert_array_equal(_mul_db(rows, None, dense, b), dense.T @ joined)
    np.testing.assert_array_equal(_mul_da(rows, None, dense, b), _mul_da(joined, None, dense, b))
    if native.enabled():
        d = native.dispatcher()
        r, starts = np.array([0, 63, 64, 255], dtype=np.intp), np.array([0, 1], dtype=np.intp)
        np.testing.assert_array_equal(d.segment_sum(parts, r, starts),
                                      np.stack([joined[0], joined[63] + joined[64] + joined[255]]))
        assert d.segment_sum(parts, np.array([256], dtype=np.intp), starts[:1]) is None  # beyond the last block
        assert d.segment_sum([parts[0], parts[1][:10]], r[:1], starts[:1]) is None        # blocks of other heights
        assert d.segment_sum([parts[0], parts[1].astype(np.float32)], r[:1], starts[:1]) is None


def test_row_blocks_only_of_plain_matrices_of_one_shape_and_dtype():
    """RowBlocks.of stands for the join only where the join is a plain stack of equal blocks."""
    from symdiff.ops import RowBlocks, Stack

    parts = [np.full((4, 3), float(t)) for t in range(3)]
    _, layout = Stack(3, 0).forward(*parts)
    rows = RowBlocks.of(parts, layout)
    assert rows is not None and np.array_equal(np.asarray(rows), np.concatenate(parts))
    for odd in (parts[1].astype(np.float32), parts[1][:3], np.ones(3), np.ma.asarray(parts[1])):
        assert RowBlocks.of([parts[0], odd, parts[2]], layout) is None, odd
    _, with_vector = Stack(2, 0).forward(parts[0], np.ones(3))  # a vector block: no equal row blocks
    assert RowBlocks.of(parts[:2], with_vector) is None


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_training_steps_compiled_and_numpy_agree(compiled, monkeypatch, kind, dtype):
    from symdiff.optim import SGD

    calls = {"forward": 0, "backward": 0, "onehot_gather": 0, "onehot_scatter": 0, "sgd_step": 0}
    dispatch = native.dispatcher()
    for name in (*calls, "run_forward", "run_backward"):  # count what really ran compiled (a silent fallback
        def counted(*args, _f=getattr(dispatch, name), _n=name):  # would pass unnoticed); a run of steps
            out = _f(*args)  # in one call (tests/test_native_runs.py) counts as its kernels' calls
            calls[_n.removeprefix("run_")] += bool(out) if _n.startswith("run_") else out is not None
            return out
        monkeypatch.setattr(dispatch, name, counted)
    dims = dict(max_len=5, num_chars=11, num_hid=12, num_labels=4)
    results = []
    for use_native in (True, False):
        model = build_model(kind, dims, seed=1, dtype=dtype)
        program = Autograd(model.xm, native=use_native).compile(
            model.xm.operationSequence(model.xm.register("loss")))
        assert any(s.op.startswith("fused") for s in program.steps)
        opt = SGD(model.params, lr=0.5)
        rng = np.random.default_rng(0)
        losses = []
        for _ in range(4):
            codes = rng.integers(-1, dims["num_chars"], size=(16, dims["max_len"]))
            y = np.eye(4, dtype=dtype)[rng.integers(0, 4, 16)]
            v = program.forward({**model.params, **model.feed(codes, False), "y": y}, keep=("loss",))
            losses.append(float(v[program.slot["loss"]]))
            g = program.backward(v, {"loss": np.ones((), dtype)}, params_only=True)
            opt.step({n: g[program.slot[n]] for n in program.params})
        results.append((losses, {n: a.copy() for n, a in model.params.items()}))
        if use_native:
            assert all(calls.values()), calls  # fused forward and backward, one-hot product, its gradient, SGD
            native.set_enabled(False)  # the numpy run: no compiled helpers either (restored by the fixture)
    (l1, p1), (l0, p0) = results
    tol = 1e-10 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(l1, l0, rtol=tol)
    for n in p0:
        np.testing.assert_allclose(p1[n], p0[n], rtol=tol, atol=tol, err_msg=n)


# ---- no compiler, broken compiler, cache ------------------------------------------------------
def _python(code: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


TRAIN_A_LITTLE = """
import numpy as np
from symdiff import native, Autograd
from models.training import build_model
model = build_model("lstm", dict(max_len=4, num_chars=30, num_hid=40, num_labels=5), seed=0)
ad = Autograd(model.xm)
w = model.xm.operationSequence(model.xm.register("loss"))
codes = np.random.default_rng(0).integers(-1, 30, size=(64, 4))
inputs = {**model.params, **model.feed(codes), "y": np.eye(5)[np.arange(64) % 5]}
g = ad.bprop(w, ad.eval(w, inputs), loss=np.float64(1.0))
print(native.status())
print("native" if ad.native else "numpy", float(np.abs(g["Wc"]).sum()))
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("case", ["no compiler", "broken compiler", "switched off"])
def test_without_a_working_compiler_everything_runs_in_numpy(tmp_path, case):
    env = {"SYMDIFF_CACHE": str(tmp_path / "cache")}
    if case == "no compiler":
        env.update(PATH=str(tmp_path), CC="")  # no cc, gcc or clang to be found
    elif case == "broken compiler":
        env.update(CC="false")
    else:
        env.update(SYMDIFF_NATIVE="0")
    done = _python(TRAIN_A_LITTLE, env, tmp_path)
    assert done.returncode == 0, done.stderr
    status, result = done.stdout.strip().splitlines()
    assert status.startswith("off (")
    assert {"no compiler": "no C compiler", "broken compiler": "failed",
            "switched off": "SYMDIFF_NATIVE=0"}[case] in status
    assert result.startswith("numpy ") and float(result.split()[1]) > 0


@pytest.mark.subprocess
@needs_compiler
def test_builds_are_cached_on_disk_and_reused(tmp_path):
    env = {"SYMDIFF_CACHE": str(tmp_path / "cache")}
    first = _python(TRAIN_A_LITTLE, env, tmp_path)
    assert first.returncode == 0, first.stderr
    built = sorted(p.name for p in (tmp_path / "cache").glob("*.so"))
    assert any(n.startswith("dispatch-") for n in built) and any(n.startswith("fused") for n in built)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.so")}
    second = _python(TRAIN_A_LITTLE, env, tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout  # same gradients, from the same libraries
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.so")} == stamps
    assert not list((tmp_path / "cache").glob("tmp*"))  # nothing half-written left behind


def test_a_cache_folder_others_may_write_is_not_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could drop a library here: never load from it
    chosen = native._private_dir(shared)
    assert chosen != shared
    assert chosen.stat().st_uid == os.getuid() and not chosen.stat().st_mode & 0o022
    mine = tmp_path / "mine"
    assert native._private_dir(mine) == mine and (mine.stat().st_mode & 0o777) == 0o700


@pytest.mark.subprocess
@needs_compiler
def test_the_target_level_is_an_environment_variable_and_part_of_the_cache_key(tmp_path):
    """SYMDIFF_MARCH builds for another instruction-set level (e.g. AVX2 on an AVX-512 machine)
    into libraries of their own; a value that is no target name turns native code off, saying why."""
    if not native.flags()[1].startswith("-march=") or os.uname().machine != "x86_64":
        pytest.skip("x86-64 target names")
    cache = tmp_path / "cache"
    runs = {}
    for march in ("", "x86-64-v3"):
        done = _python(TRAIN_A_LITTLE, {"SYMDIFF_CACHE": str(cache), "SYMDIFF_MARCH": march}, tmp_path)
        assert done.returncode == 0, done.stderr
        runs[march] = (done.stdout.splitlines(), {p.name for p in cache.glob("*.so")})
    assert "-march=native" in runs[""][0][0] and "-march=x86-64-v3" in runs["x86-64-v3"][0][0]
    assert runs["x86-64-v3"][1] > runs[""][1]  # built again, beside the native builds
    np.testing.assert_allclose(float(runs[""][0][1].split()[1]), float(runs["x86-64-v3"][0][1].split()[1]),
                               rtol=1e-12)
    bad = _python(TRAIN_A_LITTLE, {"SYMDIFF_CACHE": str(cache), "SYMDIFF_MARCH": "native -O0"}, tmp_path)
    assert bad.returncode == 0, bad.stderr
    status, result = bad.stdout.splitlines()
    assert status.startswith("off (") and "SYMDIFF_MARCH" in status and result.startswith("numpy ")


@pytest.mark.subprocess
def test_the_suite_runs_in_a_clean_environment_with_its_own_kernel_cache(tmp_path):
    """conftest.py: no SYMDIFF_* or BLAS thread setting of the user's shell reaches the tests or their
    subprocesses, and compiled kernels go to a temporary folder of the session, not ~/.cache/symdiff."""
    import tempfile

    cache = Path(os.environ["SYMDIFF_CACHE"])
    assert cache.is_relative_to(tempfile.gettempdir()) and cache.name.startswith("symdiff-test-cache-")
    assert native.cache_dir() == cache
    assert not [k for k in os.environ if k.startswith("SYMDIFF_") and k not in ("SYMDIFF_CACHE",
                                                                                  "SYMDIFF_TEST_CACHE_OWNER")]
    assert "OPENBLAS_NUM_THREADS" not in os.environ or os.environ["OPENBLAS_NUM_THREADS"] == "1"  # models' own
    done = _python("from symdiff import native; print(native.cache_dir())", {}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(cache)


def _lstm_program(fold: bool, native_on: bool = True, max_len: int = 3):
    model = build_model("lstm", dict(max_len=max_len, num_chars=5, num_hid=4, num_labels=3), seed=0)
    ad = Autograd(model.xm, native=native_on)
    if not fold:
        ad.passes = tuple(p for p in ad.passes if p != "fold_cuts")
    return model, ad.compile(model.xm.operationSequence(model.xm.register("loss")))


def _batch_gradients(model, program, rows=6):
    rng = np.random.default_rng(7)
    inputs = {**model.params, **model.feed(rng.integers(-1, 5, size=(rows, 3))),
              "y": np.eye(3)[rng.integers(0, 3, rows)], "h0": np.zeros((rows, 4)), "c0": np.zeros((rows, 4))}
    v = program.forward(inputs, keep=("loss",))
    loss = float(v[program.slot["loss"]])
    g = program.backward(v, {"loss": np.float64(1.0)}, params_only=True)
    return loss, {p: np.asarray(g[program.slot[p]]) for p in program.params}


@pytest.mark.parametrize("min_elements", [0, 1 << 30], ids=["compiled", "numpy kernels"])
def test_fold_cuts_folds_each_lstm_steps_gate_cuts_into_its_cell_with_the_same_numbers(compiled, monkeypatch,
                                                                                          min_elements):
    monkeypatch.setattr(native, "MIN_ELEMENTS", min_elements)  # 1 << 30: the kernels' numpy fallback
    model, folded = _lstm_program(fold=True)
    _, plain = _lstm_program(fold=False)
    cuts = [s for s in plain.steps if s.op.startswith("split")]
    assert len(cuts) == 2 * 3  # x·W and h·U cut into gate blocks at each of the 3 steps
    assert not any(s.op.startswith("split") for s in folded.steps)
    assert len(folded.steps) == len(plain.steps) - len(cuts)
    assert len(folded.backward_plan(["loss"])[0]) == len(plain.backward_plan(["loss"])[0]) - len(cuts)
    loss_a, grads_a = _batch_gradients(model, folded)
    loss_b, grads_b = _batch_gradients(model, plain)
    assert loss_a == loss_b
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 14
    for name in grads_a:  # the same views and the same join: not merely close, equal
        np.testing.assert_array_equal(grads_a[name], grads_b[name], err_msg=name)


def test_fold_cuts_leaves_a_cut_whose_block_is_read_outside_the_fused_step():
    from symdiff.passes import PASSES

    rng = np.random.default_rng(2)
    xm = XMan()
    xm.x = f.input(name="x", default=rng.standard_normal((5, 3)))
    xm.W1 = f.param(name="W1", default=rng.standard_normal((3, 4)))
    xm.W2 = f.param(name="W2", default=rng.standard_normal((3, 4)))
    a, b = xm.x * xm.W1, xm.x * xm.W2  # merge_matmuls: one product by [W1 W2], then a split2
    xm.loss = f.mean(f.hadamard(f.tanh(a), f.sigmoid(b))) + f.mean(b)  # b also read by mean: not the cell's alone
    xm.setup()
    w = xm.operationSequence(xm.loss)
    steps = Autograd(xm, native=False).compile(w).steps  # numpy passes: fold_cuts not among them
    assert any(s.op == "split2" for s in steps) and any(s.op.startswith("fused") for s in steps)
    assert PASSES["fold_cuts"](steps) == steps
    # without the second reader the cut is folded, and the folded list computes the same loss and gradients
    xm2 = XMan()
    xm2.x, xm2.W1, xm2.W2 = xm.x, xm.W1, xm.W2
    xm2.loss = f.mean(f.hadamard(f.tanh(xm2.x * xm2.W1), f.sigmoid(xm2.x * xm2.W2)))
    xm2.setup()
    w2 = xm2.operationSequence(xm2.loss)
    ad = Autograd(xm2, native=False)
    steps2 = ad.compile(w2).steps
    folded = PASSES["fold_cuts"](steps2)
    assert any(s.op == "split2" for s in steps2) and not any(s.op == "split2" for s in folded)
    from symdiff.autograd import Program

    results = []
    for program in (Program(steps2, xm2.params(), ad.counters, native=False),
                    Program(folded, xm2.params(), ad.counters, native=False)):
        v = program.forward(xm2.inputDict())
        g = program.backward(v, {"loss": np.float64(1.0)})
        results.append((float(v[program.slot["loss"]]), [g[program.slot[p]] for p in ("W1", "W2")]))
    assert results[0][0] == results[1][0]
    for x, y in zip(results[0][1], results[1][1]):
        np.testing.assert_array_equal(x, y)


def test_apart_proves_only_what_is_true(compiled):
    """backward's ownership check trusts apart(a, b) before np.shares_memory: it must never call two
    arrays apart that share memory, and it does prove a joined gradient's column blocks apart."""
    d = native.dispatcher()
    joined = np.zeros((50, 800), np.float32)
    gates = [joined[:, c:c + 200] for c in range(0, 800, 200)]
    assert all(d.apart(a, b) for a in gates for b in gates if a is not b)
    assert not d.apart(gates[0], gates[0]) and not d.apart(joined[:, 150:250], gates[1])
    assert not d.apart(joined, joined.T) and d.apart(joined[:0], joined)
    rng = np.random.default_rng(4)
    claimed = 0
    for _ in range(4000):
        buf = np.zeros((int(rng.integers(1, 9)), int(rng.integers(1, 12))))

        def view():
            r0, r1 = sorted(rng.integers(0, buf.shape[0] + 1, 2))
            c0, c1 = sorted(rng.integers(0, buf.shape[1] + 1, 2))
            v = buf[r0:r1, c0:c1]
            return v[::-1] if rng.random() < 0.2 else v.T if rng.random() < 0.1 else v

        a, b = view(), view()
        if d.apart(a, b):
            claimed += 1
            assert not np.shares_memory(a, b), (a.shape, a.strides, b.shape, b.strides)
    assert claimed > 500  # (it does prove things)
