"""Tests for symdiff.optim.

The reference values for the first updates are written out by hand as scalar
arithmetic on the toy problem  f(a, b) = a**2 + 2*b**2  (so da = 2a, db = 4b),
starting from a = 1.0, b = -0.5, i.e. first gradients da = 2, db = -2.
"""

from __future__ import annotations

import io
import math
import types

import numpy as np
import pytest

from symdiff.optim import (
    OPTIMIZERS,
    SCHEDULES,
    SGD,
    Adam,
    AdamW,
    Constant,
    Cosine,
    HalveOnPlateau,
    Optimizer,
    StepDecay,
    clip_grad_norm,
    make_optimizer,
    make_schedule,
)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def toy_params(dtype=np.float64) -> dict[str, np.ndarray]:
    return {"a": np.array([1.0], dtype=dtype), "b": np.array([-0.5], dtype=dtype)}


def toy_grads(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"a": 2.0 * params["a"], "b": 4.0 * params["b"]}


def run_toy(opt: Optimizer, steps: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(steps):
        opt.step(toy_grads(opt.params))
        out.append((float(opt.params["a"][0]), float(opt.params["b"][0])))
    return out


def assert_traj(got, expected, rtol=1e-12, atol=1e-12):
    assert len(got) == len(expected)
    for (ga, gb), (ea, eb) in zip(got, expected):
        assert ga == pytest.approx(ea, rel=rtol, abs=atol)
        assert gb == pytest.approx(eb, rel=rtol, abs=atol)


# --------------------------------------------------------------------------
# hand-computed updates
# --------------------------------------------------------------------------

def test_sgd_plain_hand_values():
    opt = SGD(toy_params(), lr=0.1)
    # step 1: g = (2, -2)         a = 1 - 0.1*2 = 0.8        b = -0.5 + 0.1*2 = -0.3
    # step 2: g = (1.6, -1.2)     a = 0.8 - 0.16 = 0.64      b = -0.3 + 0.12 = -0.18
    # step 3: g = (1.28, -0.72)   a = 0.64 - 0.128 = 0.512   b = -0.18 + 0.072 = -0.108
    assert_traj(run_toy(opt, 3), [(0.8, -0.3), (0.64, -0.18), (0.512, -0.108)])


def test_sgd_momentum_hand_values():
    opt = SGD(toy_params(), lr=0.1, momentum=0.9)
    # step 1: v_a = 2                      a = 1 - 0.1*2 = 0.8
    #         v_b = -2                     b = -0.5 + 0.2 = -0.3
    # step 2: g_a = 1.6, v_a = 1.8 + 1.6 = 3.4     a = 0.8 - 0.34 = 0.46
    #         g_b = -1.2, v_b = -1.8 - 1.2 = -3.0  b = -0.3 + 0.3 = 0.0
    # step 3: g_a = 0.92, v_a = 3.06 + 0.92 = 3.98 a = 0.46 - 0.398 = 0.062
    #         g_b = 0.0, v_b = -2.7               b = 0.0 + 0.27 = 0.27
    assert_traj(run_toy(opt, 3), [(0.8, -0.3), (0.46, 0.0), (0.062, 0.27)])


def test_sgd_nesterov_hand_values():
    opt = SGD(toy_params(), lr=0.1, momentum=0.9, nesterov=True)
    # step 1: v_a = 2;   a = 1 - 0.1*(2 + 0.9*2) = 1 - 0.38 = 0.62
    #         v_b = -2;  b = -0.5 - 0.1*(-2 - 1.8) = -0.5 + 0.38 = -0.12
    # step 2: g_a = 1.24,  v_a = 1.8 + 1.24 = 3.04
    #         a = 0.62 - 0.1*(1.24 + 2.736) = 0.62 - 0.3976 = 0.2224
    #         g_b = -0.48, v_b = -1.8 - 0.48 = -2.28
    #         b = -0.12 - 0.1*(-0.48 - 2.052) = -0.12 + 0.2532 = 0.1332
    assert_traj(run_toy(opt, 2), [(0.62, -0.12), (0.2224, 0.1332)])


def test_sgd_weight_decay_hand_values():
    opt = SGD(toy_params(), lr=0.1, weight_decay=0.1)
    # step 1: g_a = 2 + 0.1*1 = 2.1         a = 1 - 0.21 = 0.79
    #         g_b = -2 + 0.1*(-0.5) = -2.05 b = -0.5 + 0.205 = -0.295
    # step 2: g_a = 1.58 + 0.079 = 1.659    a = 0.79 - 0.1659 = 0.6241
    #         g_b = -1.18 - 0.0295 = -1.2095 b = -0.295 + 0.12095 = -0.17405
    assert_traj(run_toy(opt, 2), [(0.79, -0.295), (0.6241, -0.17405)])


def test_momentum_with_weight_decay_hand_values():
    opt = SGD(toy_params(), lr=0.1, momentum=0.5, weight_decay=0.1)
    # step 1: g_a = 2.1, v_a = 2.1, a = 1 - 0.21 = 0.79
    # step 2: g_a = 1.58 + 0.079 = 1.659, v_a = 1.05 + 1.659 = 2.709, a = 0.79 - 0.2709 = 0.5191
    got = run_toy(opt, 2)
    assert got[0][0] == pytest.approx(0.79, rel=1e-12)
    assert got[1][0] == pytest.approx(0.5191, rel=1e-12)


def test_adam_hand_values():
    opt = Adam(toy_params(), lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    # step 1, a: g = 2, m = 0.1*2 = 0.2, v = 0.001*4 = 0.004
    #   m_hat = 0.2/(1-0.9) = 2, v_hat = 0.004/(1-0.999) = 4
    a1 = 1.0 - 0.1 * 2.0 / (math.sqrt(4.0) + 1e-8)          # ~0.9
    #         b: g = -2, m = -0.2, v = 0.004  -> same magnitude, opposite sign
    b1 = -0.5 + 0.1 * 2.0 / (math.sqrt(4.0) + 1e-8)         # ~-0.4
    # step 2, a: g = 2*a1 (~1.8)
    ga = 2.0 * a1
    m = 0.9 * 0.2 + 0.1 * ga                                 # ~0.36
    v = 0.999 * 0.004 + 0.001 * ga * ga                      # ~0.007236
    m_hat = m / (1.0 - 0.9**2)                               # / 0.19
    v_hat = v / (1.0 - 0.999**2)                             # / 0.001999
    a2 = a1 - 0.1 * m_hat / (math.sqrt(v_hat) + 1e-8)        # ~0.800412
    #         b: g = 4*b1 (~-1.6)
    gb = 4.0 * b1
    m = 0.9 * (-0.2) + 0.1 * gb                              # ~-0.34
    v = 0.999 * 0.004 + 0.001 * gb * gb                      # ~0.006556
    b2 = b1 - 0.1 * (m / 0.19) / (math.sqrt(v / 0.001999) + 1e-8)
    assert a2 == pytest.approx(0.800412, abs=1e-6)  # sanity of the hand arithmetic
    assert_traj(run_toy(opt, 2), [(a1, b1), (a2, b2)])


def test_adam_l2_weight_decay_hand_values():
    opt = Adam(toy_params(), lr=0.1, weight_decay=0.5)
    # step 1, a: g = 2 + 0.5*1 = 2.5 ; m_hat = 2.5, v_hat = 6.25
    a1 = 1.0 - 0.1 * 2.5 / (2.5 + 1e-8)
    # step 2, a: g = 2*a1 + 0.5*a1 = 2.5*a1
    g = 2.5 * a1
    m = 0.9 * 0.1 * 2.5 + 0.1 * g
    v = 0.999 * 0.001 * 2.5**2 + 0.001 * g * g
    a2 = a1 - 0.1 * (m / 0.19) / (math.sqrt(v / 0.001999) + 1e-8)
    got = run_toy(opt, 2)
    assert got[0][0] == pytest.approx(a1, rel=1e-12)
    assert got[1][0] == pytest.approx(a2, rel=1e-12)


def test_adamw_hand_values():
    opt = AdamW(toy_params(), lr=0.1, weight_decay=0.1)
    # decoupled decay first: w *= 1 - lr*wd = 0.99; gradient taken at the old w.
    # step 1, a: g = 2 -> Adam step 0.1*2/(2+eps)
    a1 = 1.0 * 0.99 - 0.1 * 2.0 / (2.0 + 1e-8)              # ~0.89
    b1 = -0.5 * 0.99 + 0.1 * 2.0 / (2.0 + 1e-8)             # ~-0.395
    # step 2, a: g = 2*a1
    ga = 2.0 * a1
    m = 0.9 * 0.2 + 0.1 * ga
    v = 0.999 * 0.004 + 0.001 * ga * ga
    a2 = a1 * 0.99 - 0.1 * (m / 0.19) / (math.sqrt(v / 0.001999) + 1e-8)
    gb = 4.0 * b1
    m = 0.9 * (-0.2) + 0.1 * gb
    v = 0.999 * 0.004 + 0.001 * gb * gb
    b2 = b1 * 0.99 - 0.1 * (m / 0.19) / (math.sqrt(v / 0.001999) + 1e-8)
    assert_traj(run_toy(opt, 2), [(a1, b1), (a2, b2)])


def test_adamw_default_weight_decay_and_differs_from_adam_l2():
    assert AdamW(toy_params()).weight_decay == 0.01
    assert Adam(toy_params()).weight_decay == 0.0
    l2 = run_toy(Adam(toy_params(), lr=0.1, weight_decay=0.5), 2)
    dec = run_toy(AdamW(toy_params(), lr=0.1, weight_decay=0.5), 2)
    assert l2[1][0] != pytest.approx(dec[1][0], rel=1e-6)


def test_adam_per_parameter_step_count():
    # "b" gets no gradient on the first step; its first update must still be
    # the bias-corrected lr*sign(g) step, not a step with t=2 correction.
    opt = Adam(toy_params(), lr=0.1)
    opt.step({"a": np.array([2.0])})
    assert opt.params["b"][0] == -0.5
    opt.step({"b": np.array([-2.0])})
    assert opt.params["b"][0] == pytest.approx(-0.5 + 0.1 * 2.0 / (2.0 + 1e-8), rel=1e-12)


# --------------------------------------------------------------------------
# bit-identity, in-place, dtype, name handling
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,wd", [("adam", 0.0), ("adam", 0.05), ("adamw", 0.05)])
def test_adam_on_its_flat_buffers_gives_the_per_parameter_bits(dtype, kind, wd):
    """Adam steps all parameters on one flat buffer when it can: the same bits as one at a time,
    also across a step where a parameter has no gradient (steps then one at a time), row-sparse
    gradients included; the state dict is the same either way and loads into the other."""
    from symdiff.onehot import RowSparse

    rng = np.random.default_rng(3)
    start = {"W": rng.standard_normal((6, 3)).astype(dtype), "U": rng.standard_normal((3, 3)).astype(dtype),
             "b": rng.standard_normal(3).astype(dtype)}
    runs = []
    for flat in (True, False):
        params = {k: v.copy() for k, v in start.items()}
        opt = make_optimizer(kind, params, 0.01, weight_decay=wd)
        assert opt._flat is not None
        if not flat:
            opt._flat = None  # one parameter at a time
        g_rng = np.random.default_rng(4)
        for k in range(6):
            grads = {n: g_rng.standard_normal(p.shape).astype(dtype) for n, p in params.items()}
            grads["W"] = RowSparse(np.array([1, 4]), grads["W"][:2], (6, 3))
            if k == 2:
                del grads["b"]
            opt.step(grads)
        runs.append((params, opt.state_dict()))
    (p1, s1), (p0, s0) = runs
    for n in start:
        assert np.array_equal(p1[n], p0[n]), n
        assert not np.array_equal(p1[n], start[n]), n
    assert s1.keys() == s0.keys() and all(np.array_equal(s1[k], s0[k]) for k in s1)
    again = make_optimizer(kind, {k: v.copy() for k, v in start.items()}, 0.01, weight_decay=wd)
    again.load_state_dict(s0)
    assert all(np.array_equal(again.state_dict()[k], s0[k]) for k in s0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plain_sgd_bit_identical_to_seed_update(dtype):
    rng = np.random.default_rng(0)
    params = {"W": rng.standard_normal((4, 3)).astype(dtype),
              "c": rng.standard_normal(3).astype(dtype)}
    ref = {k: v.copy() for k, v in params.items()}
    lr = 0.0371
    opt = make_optimizer("sgd", params, lr)
    for _ in range(5):
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
        opt.step(grads)
        for k in ref:
            ref[k] = ref[k] - lr * grads[k]
    for k in ref:
        assert params[k].dtype == dtype
        assert np.array_equal(params[k], ref[k])  # bit-identical, not approx


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_updates_in_place(name):
    params = toy_params()
    arrays = dict(params)
    opt = make_optimizer(name, params, 0.1)
    grads = toy_grads(params)
    grads_before = {k: v.copy() for k, v in grads.items()}
    opt.step(grads)
    assert opt.params is params
    assert set(params) == {"a", "b"}
    for k in arrays:
        assert params[k] is arrays[k]
    assert params["a"][0] != 1.0
    for k in grads:  # gradients are never modified by step()
        assert np.array_equal(grads[k], grads_before[k])


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("grad_dtype", [np.float32, np.float64])
def test_float32_preserved(name, grad_dtype):
    params = toy_params(np.float32)
    opt = make_optimizer(name, params, 0.1, weight_decay=0.01)
    for _ in range(3):
        opt.step({k: v.astype(grad_dtype) for k, v in toy_grads(params).items()})
    for k, v in params.items():
        assert v.dtype == np.float32, k
    for key, value in opt.state_dict().items():
        if isinstance(value, np.ndarray):
            assert value.dtype == np.float32, key


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_non_param_grads_ignored(name):
    params = toy_params()
    opt = make_optimizer(name, params, 0.1)
    grads = toy_grads(params)
    grads["x"] = np.ones((7, 7))
    grads["input"] = np.ones(3)
    opt.step(grads)
    assert set(params) == {"a", "b"}
    assert not any("x" == k.split("/", 1)[-1] for k in opt.state_dict())


def test_grads_may_be_any_mapping():
    params = toy_params()
    opt = SGD(params, lr=0.1)
    opt.step(types.MappingProxyType({"a": np.array([2.0])}))
    assert params["a"][0] == pytest.approx(0.8)
    assert params["b"][0] == -0.5


def test_grad_shape_mismatch_raises():
    opt = SGD(toy_params(), lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        opt.step({"a": np.ones((2, 2))})


def test_lr_setter_changes_next_step_and_validates():
    params = toy_params()
    opt = SGD(params, lr=0.1)
    opt.lr = 0.25
    opt.step({"a": np.array([2.0])})
    assert params["a"][0] == pytest.approx(1.0 - 0.25 * 2.0)
    opt.lr = 0.0  # annealing schedules may end at 0
    opt.step({"a": np.array([2.0])})
    assert params["a"][0] == pytest.approx(0.5)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr"):
            opt.lr = bad


# --------------------------------------------------------------------------
# state_dict
# --------------------------------------------------------------------------

def _npz_round_trip(state):
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_continues_identically(name):
    rng = np.random.default_rng(1)
    params = {"W": rng.standard_normal((3, 2)).astype(np.float32),
              "b.bias": rng.standard_normal(2).astype(np.float32)}
    opt = make_optimizer(name, params, 0.05, weight_decay=0.01)
    grad_seq = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
                for _ in range(5)]
    for g in grad_seq[:2]:
        opt.step(g)
    opt.lr = 0.02
    state = opt.state_dict()
    for v in state.values():
        assert isinstance(v, (np.ndarray, float, int))
    loaded = _npz_round_trip(state)

    params2 = {k: v.copy() for k, v in params.items()}
    opt2 = make_optimizer(name, params2, 0.05, weight_decay=0.01)
    opt2.load_state_dict(loaded)
    assert opt2.lr == 0.02
    for g in grad_seq[2:]:
        opt.step(g)
        opt2.step(g)
    for k in params:
        assert params2[k].dtype == np.float32
        assert np.array_equal(params[k], params2[k])


def test_state_dict_is_a_snapshot():
    opt = SGD(toy_params(), lr=0.1, momentum=0.9)
    opt.step(toy_grads(opt.params))
    state = opt.state_dict()
    saved = state["momentum/a"].copy()
    opt.step(toy_grads(opt.params))
    assert np.array_equal(state["momentum/a"], saved)


def test_load_state_dict_rejects_foreign_state():
    adam = Adam(toy_params(), lr=0.1)
    sgd = SGD(toy_params(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="missing keys"):
        sgd.load_state_dict(adam.state_dict())
    bad = sgd.state_dict()
    bad["momentum/a"] = np.zeros(5)
    with pytest.raises(ValueError, match="shape"):
        sgd.load_state_dict(bad)


# --------------------------------------------------------------------------
# clip_grad_norm
# --------------------------------------------------------------------------

def test_clip_grad_norm_scales_in_place():
    a = np.array([3.0, 0.0])
    b = np.array([[4.0]])
    grads = {"a": a, "b": b}
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(5.0, rel=1e-15)
    scale = 1.0 / (5.0 + 1e-6)
    assert grads["a"] is a and grads["b"] is b
    np.testing.assert_allclose(a, [3.0 * scale, 0.0], rtol=1e-15)
    np.testing.assert_allclose(b, [[4.0 * scale]], rtol=1e-15)
    assert math.sqrt(float(a @ a) + float(b[0, 0] ** 2)) < 1.0


def test_clip_grad_norm_no_op_below_threshold():
    grads = {"a": np.array([3.0, 0.0], dtype=np.float32), "b": np.array([4.0], dtype=np.float32)}
    before = {k: v.copy() for k, v in grads.items()}
    norm = clip_grad_norm(grads, 5.0)  # norm == 5 exactly is not > max_norm
    assert norm == 5.0
    assert clip_grad_norm(grads, 100.0) == 5.0
    for k in grads:
        assert np.array_equal(grads[k], before[k])
    assert clip_grad_norm({}, 1.0) == 0.0


def test_clip_grad_norm_float32_preserved_and_no_overflow():
    grads = {"a": np.full(4, 1e20, dtype=np.float32)}  # squares overflow float32
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(2e20, rel=1e-6)
    assert grads["a"].dtype == np.float32
    np.testing.assert_allclose(grads["a"], 0.5, rtol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_clip_grad_norm_non_finite_leaves_arrays(bad):
    grads = {"a": np.array([1.0, bad]), "b": np.array([100.0])}
    before = {k: v.copy() for k, v in grads.items()}
    norm = clip_grad_norm(grads, 1.0)
    assert not math.isfinite(norm)
    for k in grads:
        np.testing.assert_array_equal(grads[k], before[k])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_clip_grad_norm_bad_max_norm(bad):
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm({"a": np.ones(2)}, bad)


# --------------------------------------------------------------------------
# factories and validation
# --------------------------------------------------------------------------

def test_make_optimizer_kinds():
    assert OPTIMIZERS == ("sgd", "momentum", "nesterov", "adam", "adamw")
    sgd = make_optimizer("sgd", toy_params(), 0.1, momentum=0.5)
    assert type(sgd) is SGD and sgd.momentum == 0.0 and not sgd.nesterov
    mom = make_optimizer("momentum", toy_params(), 0.1, momentum=0.5)
    assert type(mom) is SGD and mom.momentum == 0.5 and not mom.nesterov
    nes = make_optimizer("nesterov", toy_params(), 0.1)
    assert type(nes) is SGD and nes.momentum == 0.9 and nes.nesterov
    adam = make_optimizer("adam", toy_params(), 0.1, weight_decay=0.1)
    assert type(adam) is Adam and adam.weight_decay == 0.1
    adamw = make_optimizer("AdamW", toy_params(), 0.1, weight_decay=0.1)
    assert type(adamw) is AdamW and adamw.weight_decay == 0.1


def test_make_optimizer_bad_name_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        make_optimizer("rmsprop", toy_params(), 0.1)
    msg = str(exc.value)
    assert "rmsprop" in msg
    for n in OPTIMIZERS:
        assert n in msg


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: SGD(toy_params(), lr=0.0), "lr"),
        (lambda: SGD(toy_params(), lr=-0.1), "lr"),
        (lambda: SGD(toy_params(), lr=float("nan")), "lr"),
        (lambda: SGD(toy_params(), lr=float("inf")), "lr"),
        (lambda: SGD(toy_params(), lr="0.1"), "lr"),
        (lambda: SGD(toy_params(), lr=0.1, momentum=1.0), "momentum"),
        (lambda: SGD(toy_params(), lr=0.1, momentum=-0.1), "momentum"),
        (lambda: SGD(toy_params(), lr=0.1, nesterov=True), "nesterov"),
        (lambda: SGD(toy_params(), lr=0.1, weight_decay=-1e-4), "weight_decay"),
        (lambda: Adam(toy_params(), betas=(1.0, 0.999)), r"betas\[0\]"),
        (lambda: Adam(toy_params(), betas=(0.9, -0.1)), r"betas\[1\]"),
        (lambda: Adam(toy_params(), betas=(0.9,)), "betas"),
        (lambda: Adam(toy_params(), eps=0.0), "eps"),
        (lambda: AdamW(toy_params(), weight_decay=float("nan")), "weight_decay"),
        (lambda: SGD({}, lr=0.1), "params"),
        (lambda: SGD({"a": [1.0, 2.0]}, lr=0.1), "params"),
        (lambda: SGD({"a": np.array([1, 2])}, lr=0.1), "floating"),
        (lambda: make_optimizer("nesterov", toy_params(), 0.1, momentum=0.0), "nesterov"),
    ],
)
def test_optimizer_argument_validation(build, arg):
    with pytest.raises(ValueError, match=arg):
        build()


def test_validation_message_shows_bad_value_and_allowed_range():
    with pytest.raises(ValueError) as exc:
        SGD(toy_params(), lr=0.1, momentum=1.5)
    msg = str(exc.value)
    assert "momentum" in msg and "1.5" in msg and "[0, 1)" in msg


# --------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------

def lr_sequence(sched, losses):
    return [sched.after_epoch(epoch, loss) for epoch, loss in enumerate(losses, start=1)]


def approx_list(expected):
    return pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_constant_schedule():
    sched = Constant(0.1)
    assert lr_sequence(sched, [5, 4, 4, 4, 4, 4, 4, 4]) == [0.1] * 8


def test_step_decay_schedule():
    # lr after epoch e = 0.8 * 0.5 ** (e // 3); e//3 = 0,0,1,1,1,2,2,2
    sched = StepDecay(0.8, step_size=3, gamma=0.5)
    assert lr_sequence(sched, [1.0] * 8) == approx_list([0.8, 0.8, 0.4, 0.4, 0.4, 0.2, 0.2, 0.2])


def test_step_decay_defaults():
    # step_size=5, gamma=0.5: e//5 = 0,0,0,0,1,1,1,1
    sched = StepDecay(1.0)
    assert lr_sequence(sched, [1.0] * 8) == approx_list([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5])


def test_cosine_schedule():
    sched = Cosine(1.0, total_epochs=4)
    # (1 + cos(pi/4))/2 = 0.853553..., (1+cos(pi/2))/2 = 0.5, (1+cos(3pi/4))/2 = 0.146446...
    expected = [0.8535533905932737, 0.5, 0.14644660940672624, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert lr_sequence(sched, [1.0] * 8) == approx_list(expected)


def test_cosine_schedule_with_min_lr():
    sched = Cosine(1.1, total_epochs=4, min_lr=0.1)
    # 0.1 + 1.0 * (same cosine factors), clamped at 0.1 from epoch 4 on
    expected = [0.9535533905932737, 0.6, 0.24644660940672624, 0.1, 0.1, 0.1, 0.1, 0.1]
    assert lr_sequence(sched, [1.0] * 8) == approx_list(expected)


def test_plateau_patience_two():
    sched = HalveOnPlateau(1.0, patience=2)
    losses = [5.0, 4.0, 4.0, 4.5, 3.0, 3.0, 3.0, 3.0]
    # e1 best=5 | e2 best=4 | e3 4 not < 4: bad=1 | e4 bad=2 -> cut to 0.5, reset
    # e5 best=3 | e6 bad=1 | e7 bad=2 -> cut to 0.25, reset | e8 bad=1
    assert lr_sequence(sched, losses) == approx_list([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25])


def test_plateau_default_patience_one_and_min_lr():
    sched = HalveOnPlateau(1.0, min_lr=0.3)
    losses = [1.0, 2.0, 2.0, 2.0, 0.5, 0.4, 0.4, 0.3]
    # e2 cut 0.5 | e3 cut max(0.25, 0.3)=0.3 | e4 stays at floor | e5,e6 improve | e7 cut (floor) | e8 improve
    assert lr_sequence(sched, losses) == approx_list([1, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3])


def test_plateau_counter_resets_on_improvement():
    sched = HalveOnPlateau(1.0, patience=2)
    losses = [3.0, 4.0, 2.0, 4.0, 5.0, 1.0, 1.0, 1.0]
    # e2 bad=1 | e3 improves -> bad=0 | e4 bad=1 | e5 bad=2 -> cut | e6 improves | e7 bad=1 | e8 bad=2 -> cut
    # (without the reset on improvement the first cut would happen at e4)
    assert lr_sequence(sched, losses) == approx_list([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25])


def test_plateau_nan_loss_is_not_an_improvement():
    sched = HalveOnPlateau(1.0, patience=1, factor=0.1)
    assert lr_sequence(sched, [1.0, float("nan"), 0.5]) == approx_list([1.0, 0.1, 0.1])


def test_plateau_state_round_trip():
    sched = HalveOnPlateau(1.0, patience=2)
    lr_sequence(sched, [5.0, 4.0, 4.0])  # bad=1, best=4
    sched2 = HalveOnPlateau(1.0, patience=2)
    sched2.load_state_dict(_npz_round_trip(sched.state_dict()))
    assert sched2.after_epoch(4, 4.5) == 0.5
    assert sched.after_epoch(4, 4.5) == 0.5


def test_schedule_drives_optimizer_lr():
    opt = SGD(toy_params(), lr=0.8)
    sched = make_schedule("step", 0.8, 10, step_size=2)
    lrs = []
    for epoch in range(1, 6):
        lrs.append(opt.lr)
        opt.lr = sched.after_epoch(epoch, 1.0)
    assert lrs == approx_list([0.8, 0.8, 0.4, 0.4, 0.2])


def test_make_schedule_kinds():
    assert SCHEDULES == ("constant", "step", "plateau", "cosine")
    assert type(make_schedule("constant", 0.1, 8)) is Constant
    s = make_schedule("step", 0.1, 8, step_size=2, gamma=0.1)
    assert type(s) is StepDecay and s.step_size == 2 and s.gamma == 0.1
    p = make_schedule("plateau", 0.1, 8, patience=3)
    assert type(p) is HalveOnPlateau and p.patience == 3
    c = make_schedule("cosine", 0.1, 8, min_lr=0.01)
    assert type(c) is Cosine and c.total_epochs == 8 and c.min_lr == 0.01


def test_make_schedule_bad_name_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        make_schedule("linear", 0.1, 8)
    msg = str(exc.value)
    assert "linear" in msg
    for n in SCHEDULES:
        assert n in msg


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: Constant(0.0), "base_lr"),
        (lambda: Constant(float("nan")), "base_lr"),
        (lambda: StepDecay(0.1, step_size=0), "step_size"),
        (lambda: StepDecay(0.1, step_size=2.5), "step_size"),
        (lambda: StepDecay(0.1, gamma=0.0), "gamma"),
        (lambda: StepDecay(0.1, gamma=1.5), "gamma"),
        (lambda: HalveOnPlateau(0.1, patience=0), "patience"),
        (lambda: HalveOnPlateau(0.1, factor=1.0), "factor"),
        (lambda: HalveOnPlateau(0.1, min_lr=0.2), "min_lr"),
        (lambda: Cosine(0.1, total_epochs=0), "total_epochs"),
        (lambda: Cosine(0.1, total_epochs=5, min_lr=-0.1), "min_lr"),
        (lambda: make_schedule("constant", 0.1, 0), "total_epochs"),
        (lambda: Constant(0.1).after_epoch(0, 1.0), "epoch"),
    ],
)
def test_schedule_argument_validation(build, arg):
    with pytest.raises(ValueError, match=arg):
        build()


# --------------------------------------------------------------------------
# convergence sanity
# --------------------------------------------------------------------------

def _least_squares_problem():
    rng = np.random.default_rng(42)
    A = rng.standard_normal((8, 2))
    b = rng.standard_normal(8)
    w_star = np.linalg.lstsq(A, b, rcond=None)[0]
    return A, b, w_star


def _minimise(opt: Optimizer, A: np.ndarray, b: np.ndarray, steps: int) -> None:
    w = opt.params["w"]
    for _ in range(steps):
        opt.step({"w": 2.0 * A.T @ (A @ w - b)})  # grad of ||Aw - b||^2


@pytest.mark.parametrize("kind", ["momentum", "nesterov"])
def test_momentum_methods_converge_to_least_squares(kind):
    A, b, w_star = _least_squares_problem()
    lam_max = np.linalg.eigvalsh(A.T @ A).max()
    params = {"w": np.zeros(2)}
    opt = make_optimizer(kind, params, 0.5 / (2.0 * lam_max), momentum=0.9)
    _minimise(opt, A, b, 500)
    np.testing.assert_allclose(params["w"], w_star, atol=1e-6)


def test_adam_converges_to_least_squares():
    A, b, w_star = _least_squares_problem()
    params = {"w": np.zeros(2)}
    opt = make_optimizer("adam", params, 0.05)
    _minimise(opt, A, b, 3000)
    np.testing.assert_allclose(params["w"], w_star, atol=1e-6)


# ---- Averaged: the weights' moving average ----------------------------------------------------
def test_averaged_keeps_the_moving_average_and_swaps_it_in_and_out() -> None:
    from symdiff.optim import SGD, Averaged

    rng = np.random.default_rng(0)
    p = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
    opt = Averaged(SGD(p, lr=0.1), decay=0.5)
    expected = p["w"].astype(np.float64)
    for t in range(1, 8):
        opt.step({"w": rng.normal(size=(3, 2)).astype(np.float32)})
        b = min(0.5, (1 + t) / (10 + t))  # warm-up first, then the decay caps it
        expected = b * expected + (1 - b) * p["w"]
    assert opt.average["w"].dtype == np.float32 and opt.steps == 7
    np.testing.assert_allclose(opt.average["w"], expected, rtol=1e-6)
    raw = p["w"].copy()
    assert not np.allclose(raw, expected)
    with opt.swapped():
        np.testing.assert_array_equal(p["w"], opt.average["w"])
    np.testing.assert_array_equal(p["w"], raw)  # the raw weights go on training
    opt.lr = 0.05
    assert opt.optimizer.lr == 0.05


def test_averaged_state_round_trips_and_a_foreign_state_is_refused() -> None:
    from symdiff.errors import SymdiffError
    from symdiff.optim import Adam, Averaged

    rng = np.random.default_rng(1)
    p = {"w": rng.normal(size=(2, 2))}
    opt = Averaged(Adam(p, lr=0.01), decay=0.9)
    for _ in range(3):
        opt.step({"w": rng.normal(size=(2, 2))})
    state = opt.state_dict()
    assert state["average_steps"] == 3 and "average/w" in state and "step/w" in state
    other = Averaged(Adam({"w": p["w"].copy()}, lr=0.01), decay=0.9)
    other.load_state_dict(state)
    assert other.steps == 3 and np.array_equal(other.average["w"], opt.average["w"])
    assert all(np.array_equal(np.asarray(v), np.asarray(other.state_dict()[k])) for k, v in state.items())
    fresh = Averaged(Adam({"w": p["w"].copy()}, lr=0.01), decay=0.9)
    start = fresh.average["w"].copy()
    with pytest.raises(SymdiffError, match="state does not match Averaged"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "average_steps"})
    with pytest.raises(SymdiffError, match="state does not match Adam"):  # inner keys checked before any change
        fresh.load_state_dict({k: v for k, v in state.items() if k != "step/w"})
    assert fresh.steps == 0 and np.array_equal(fresh.average["w"], start)  # a refused state changes nothing
    with pytest.raises(SymdiffError, match="decay must be in"):
        Averaged(Adam({"w": np.zeros(2)}), decay=1.0)
