"""Tests for the hand-written numpy reference models (benchmarks/reference.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import reference as ref  # noqa: E402

V, M, H, C, N = 7, 4, 5, 3, 6
EPS = 1e-6
RTOL = 1e-6
KINDS = ("mlp", "lstm")


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tiny batch with some padding, including one all-padding row."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, size=(N, M)).astype(np.int32)
    x[0, 2:] = -1
    x[3, 3] = -1
    x[4, :] = -1
    y = np.eye(C)[rng.integers(0, C, size=N)]
    return x, y


def _init(kind: str, seed: int = 0, dtype: type = np.float64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        return ref.init_mlp(V, M, H, C, rng, dtype)
    return ref.init_lstm(V, H, C, rng, dtype)


def _loss_fn(kind: str):
    return ref.mlp_loss_and_grads if kind == "mlp" else ref.lstm_loss_and_grads


def _predict_fn(kind: str):
    return ref.mlp_predict if kind == "mlp" else ref.lstm_predict


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# --------------------------------------------------------------------------- #
# Independent, literal (per-sample, row lookup instead of one-hot) forward passes
# --------------------------------------------------------------------------- #
def _mlp_logits_literal(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    Vv = p["W1"].shape[0] // x.shape[1]
    out = []
    for row in x:
        a1 = p["b1"].astype(np.float64).copy()
        for m, ch in enumerate(row):
            if ch >= 0:
                a1 += p["W1"][m * Vv + ch]
        o1 = np.maximum(a1, 0.0)
        out.append(np.maximum(o1 @ p["W2"] + p["b2"], 0.0))
    return np.array(out)


def _lstm_logits_literal(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    Hh = p["Ui"].shape[0]
    out = []
    for row in x:
        h = np.zeros(Hh)
        c = np.zeros(Hh)
        for ch in row[::-1]:  # last character first
            z = {g: p["b" + g] + h @ p["U" + g] for g in "ifoc"}
            if ch >= 0:
                z = {g: z[g] + p["W" + g][ch] for g in "ifoc"}
            i = np.array([_sig(v) for v in z["i"]])
            f = np.array([_sig(v) for v in z["f"]])
            o = np.array([_sig(v) for v in z["o"]])
            c = f * c + i * np.tanh(z["c"])
            h = o * np.tanh(c)
        out.append(np.maximum(h @ p["W2"] + p["b2"], 0.0))
    return np.array(out)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- #
# one-hot
# --------------------------------------------------------------------------- #
def test_one_hot_layout_and_padding() -> None:
    x, _ = _batch()
    X = ref.one_hot(x, V, np.float32)
    assert X.shape == (N, M, V) and X.dtype == np.float32
    for n in range(N):
        for m in range(M):
            expected = np.zeros(V, dtype=np.float32)
            if x[n, m] >= 0:
                expected[x[n, m]] = 1
            np.testing.assert_array_equal(X[n, m], expected)
    flat = X.reshape(N, M * V)
    n, m = 1, 2
    assert flat[n, m * V + x[n, m]] == 1 and flat[n].sum() == (x[n] >= 0).sum()


@pytest.mark.parametrize("bad", [-2, V])
def test_one_hot_rejects_out_of_range(bad: int) -> None:
    x, _ = _batch()
    x[2, 1] = bad
    with pytest.raises(ValueError):
        ref.one_hot(x, V, np.float64)


# --------------------------------------------------------------------------- #
# forward passes vs. literal implementations of the spec
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_literal_spec(kind: str) -> None:
    p = _init(kind, seed=3)
    p["W2"] *= 3  # make logits non-trivial
    x, y = _batch(seed=3)
    literal = _mlp_logits_literal if kind == "mlp" else _lstm_logits_literal
    logits = literal(p, x)
    assert (logits > 0).any(), "test is vacuous: all logits are zero"
    P_expected = _softmax(logits)
    np.testing.assert_allclose(_predict_fn(kind)(p, x), P_expected, rtol=1e-12, atol=1e-14)
    loss, _ = _loss_fn(kind)(p, x, y)
    assert loss == pytest.approx(-np.mean(np.log((P_expected * y).sum(axis=1))), rel=1e-12)


def test_lstm_order_matters() -> None:
    """Feeding order is observable (guards the literal test against symmetric setups)."""
    p = _init("lstm", seed=1)
    p["W2"] *= 3
    x = np.array([[0, 1, 2, 3]], dtype=np.int32)
    assert not np.allclose(ref.lstm_predict(p, x), ref.lstm_predict(p, x[:, ::-1].copy()))


# --------------------------------------------------------------------------- #
# gradients vs. central finite differences
# --------------------------------------------------------------------------- #
def _preacts_away_from_kinks(kind: str, p: dict[str, np.ndarray], x: np.ndarray) -> float:
    """Smallest |pre-activation| of any relu (FD is invalid right at a kink)."""
    if kind == "mlp":
        fw = ref._mlp_forward(p, x)
        return float(min(np.abs(fw["a1"]).min(), np.abs(fw["a2"]).min()))
    _, _, a = ref._lstm_forward(p, x)
    return float(np.abs(a).min())


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_finite_differences(kind: str) -> None:
    p = _init(kind, seed=0)
    x, y = _batch(seed=0)
    assert _preacts_away_from_kinks(kind, p, x) > 1e-3
    f = _loss_fn(kind)
    _, grads = f(p, x, y)
    assert set(grads) == set(p)
    for name, w in p.items():
        g = grads[name]
        assert g.shape == w.shape and g.dtype == w.dtype
        fd = np.zeros_like(w)
        for ix in np.ndindex(w.shape):  # every element
            old = w[ix]
            w[ix] = old + EPS
            lp, _ = f(p, x, y)
            w[ix] = old - EPS
            lm, _ = f(p, x, y)
            w[ix] = old
            fd[ix] = (lp - lm) / (2 * EPS)
        scale = max(np.abs(fd).max(), np.abs(g).max())
        assert scale > 1e-4, f"{name}: gradient is (nearly) zero, test would be vacuous"
        # each element's error, relative to the parameter's gradient scale
        # (FD round-off is ~1e-10 absolute, so tiny entries cannot be checked
        # element-relative to 1e-6)
        rel = np.abs(g - fd).max() / scale
        assert rel < RTOL, f"{name}: relative error {rel:.2e}"


# --------------------------------------------------------------------------- #
# softmax / loss properties
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_probabilities_sum_to_one(kind: str, dtype: type) -> None:
    p = _init(kind, seed=2, dtype=dtype)
    p["W2"] *= 5
    x, _ = _batch(seed=2)
    P = _predict_fn(kind)(p, x)
    assert P.shape == (N, C) and P.dtype == dtype
    assert (P >= 0).all()
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=0, atol=10 * np.finfo(dtype).eps)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_logits_give_ln_C(kind: str) -> None:
    p = _init(kind)
    p["W2"][:] = 0
    p["b2"][:] = 0
    x, y = _batch()
    loss, grads = _loss_fn(kind)(p, x, y)
    assert loss == pytest.approx(math.log(C), rel=1e-12)
    np.testing.assert_allclose(_predict_fn(kind)(p, x), 1.0 / C, rtol=1e-12)
    # the output relu sits exactly at its kink and relu'(0) = 0: nothing flows back
    for k, g in grads.items():
        assert not g.any(), k


def test_mlp_hidden_relu_derivative_at_zero() -> None:
    """All-padding rows with b1 = 0 put every hidden pre-activation at exactly 0."""
    p = _init("mlp", seed=1)
    p["b1"][:] = 0
    p["W2"] *= 3
    x = np.full((3, M), -1, dtype=np.int32)
    y = np.eye(C)[[0, 1, 2]]
    _, grads = ref.mlp_loss_and_grads(p, x, y)
    assert not grads["b1"].any() and not grads["W1"].any() and not grads["W2"].any()


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_stable_for_huge_logits(kind: str) -> None:
    p = _init(kind)
    p["W2"] *= 1e4
    p["b2"] *= 1e4
    x, y = _batch()
    loss, grads = _loss_fn(kind)(p, x, y)
    assert math.isfinite(loss) and loss > 1.0
    assert all(np.isfinite(g).all() for g in grads.values())


# --------------------------------------------------------------------------- #
# float32
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", KINDS)
def test_float32_params_give_float32_grads(kind: str) -> None:
    p64 = _init(kind, seed=4)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    x, y = _batch(seed=4)  # y stays float64: must not upcast
    loss32, g32 = _loss_fn(kind)(p32, x, y)
    loss64, g64 = _loss_fn(kind)(p64, x, y)
    assert isinstance(loss32, float)
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for k in p32:
        assert g32[k].dtype == np.float32, k
        np.testing.assert_allclose(g32[k], g64[k], rtol=1e-3, atol=1e-5)
    ref.train_epoch(kind, p32, x, y, batch_size=4, lr=0.1, rng=np.random.default_rng(0))
    assert all(v.dtype == np.float32 for v in p32.values())


def test_init_shapes_dtype_and_ranges() -> None:
    rng = np.random.default_rng(0)
    mlp = ref.init_mlp(V, M, H, C, rng, np.float32)
    assert tuple(mlp) == ref.MLP_PARAMS
    assert {k: v.shape for k, v in mlp.items()} == {
        "W1": (M * V, H), "b1": (H,), "W2": (H, C), "b2": (C,)}
    lstm = ref.init_lstm(V, H, C, rng, np.float32)
    assert tuple(lstm) == ref.LSTM_PARAMS
    for k, v in lstm.items():
        assert v.dtype == np.float32
        expected = {"W": (V, H), "U": (H, H), "b": (H,)}[k[0]] if k[-1] in "ifoc" else None
        if expected is not None:
            assert v.shape == expected, k
    assert lstm["W2"].shape == (H, C) and lstm["b2"].shape == (C,)
    assert np.abs(mlp["W1"]).max() <= math.sqrt(6 / (M * V + H))
    assert np.abs(lstm["Uc"]).max() <= math.sqrt(6 / (2 * H))
    assert np.abs(lstm["bf"]).max() <= 0.1


# --------------------------------------------------------------------------- #
# SGD / training loop
# --------------------------------------------------------------------------- #
def test_sgd_step_in_place() -> None:
    p = _init("mlp")
    before = {k: v.copy() for k, v in p.items()}
    ids = {k: id(v) for k, v in p.items()}
    g = {k: np.full_like(v, 2.0) for k, v in p.items()}
    ref.sgd_step(p, g, 0.25)
    for k in p:
        assert id(p[k]) == ids[k]
        np.testing.assert_allclose(p[k], before[k] - 0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_train_epoch_batching(kind: str) -> None:
    """Same result as a manual loop over rng.permutation with a short last batch."""
    n, bs, lr = 10, 4, 0.3
    rng = np.random.default_rng(7)
    x = rng.integers(-1, V, size=(n, M)).astype(np.int32)
    y = np.eye(C)[rng.integers(0, C, size=n)]
    p_auto = _init(kind, seed=5)
    p_manual = {k: v.copy() for k, v in p_auto.items()}
    mean_loss = ref.train_epoch(kind, p_auto, x, y, bs, lr, np.random.default_rng(11))
    perm = np.random.default_rng(11).permutation(n)
    losses = []
    for batch in (perm[0:4], perm[4:8], perm[8:10]):
        loss, g = _loss_fn(kind)(p_manual, x[batch], y[batch])
        ref.sgd_step(p_manual, g, lr)
        losses.append(loss)
    assert mean_loss == pytest.approx(np.mean(losses), rel=1e-12)
    for k in p_auto:
        np.testing.assert_allclose(p_auto[k], p_manual[k], rtol=1e-12, atol=1e-15)


def test_train_epoch_rejects_unknown_kind() -> None:
    x, y = _batch()
    with pytest.raises(ValueError):
        ref.train_epoch("gru", _init("mlp"), x, y, 4, 0.1, np.random.default_rng(0))


@pytest.mark.parametrize("kind,lr", [("mlp", 0.2), ("lstm", 0.5)])
def test_train_epoch_decreases_loss(kind: str, lr: float) -> None:
    """Separable problem: the label is determined by the first character."""
    rng = np.random.default_rng(0)
    n, Hh = 240, 16
    x = rng.integers(0, V, size=(n, M)).astype(np.int32)
    x[:, 0] = rng.integers(0, 2 * C, size=n)
    lengths = rng.integers(1, M + 1, size=n)
    x[np.arange(M)[None, :] >= lengths[:, None]] = -1
    y = np.eye(C)[x[:, 0] % C]
    init_rng = np.random.default_rng(1)
    p = (ref.init_mlp(V, M, Hh, C, init_rng) if kind == "mlp"
         else ref.init_lstm(V, Hh, C, init_rng))
    train_rng = np.random.default_rng(2)
    losses = [ref.train_epoch(kind, p, x, y, 16, lr, train_rng) for _ in range(8)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    acc = (_predict_fn(kind)(p, x).argmax(axis=1) == y.argmax(axis=1)).mean()
    assert acc > 0.9, (acc, losses)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_hand_fused_lstm_matches_the_reference(dtype: type) -> None:
    from benchmarks import handfused

    rng = np.random.default_rng(3)
    V, H, C = 9, 4, 3
    params = ref.init_lstm(V, H, C, rng, dtype)
    x = rng.integers(-1, V, size=(7, 5))
    x[0] = -1  # an all-padding row
    y = np.eye(C, dtype=dtype)[rng.integers(0, C, 7)]
    want_loss, want = ref.lstm_loss_and_grads(params, x, y)
    loss, got = handfused.lstm_loss_and_grads(params, x, y)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert loss == pytest.approx(want_loss, rel=tol)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == dtype, name
        np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol, err_msg=name)
    p1 = {k: v.copy() for k, v in params.items()}
    p2 = {k: v.copy() for k, v in params.items()}
    codes = rng.integers(-1, V, size=(20, 5))
    labels = np.eye(C)[rng.integers(0, C, 20)]
    l1 = ref.train_epoch("lstm", p1, codes, labels, 6, 0.5, np.random.default_rng(0))
    l2 = handfused.train_epoch(p2, codes, labels, 6, 0.5, np.random.default_rng(0))
    assert l2 == pytest.approx(l1, rel=tol)
    for name in p1:
        np.testing.assert_allclose(p2[name], p1[name], rtol=tol, atol=tol, err_msg=name)


@pytest.mark.subprocess
def test_benchmark_runs_and_reports_ratios_as_json() -> None:
    import json
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--dataset", "demo", "--repeats", "1",
                          "--models", "lstm", "--skip_processes", "--json"],
                         capture_output=True, text=True, cwd=repo, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    impls = {r["impl"] for r in report["rows"] if r["dtype"] == "float64"}
    from symdiff import native

    # the LSTM also times its fused kernels with exact σ'/tanh' (README, "One trade"; symdiff.fusion.FUSED_DERIVATIVES)
    assert impls == {"engine", "engine --dense", "engine --no-fuse", "reference", "hand-fused numpy",
                     "engine, exact σ'/tanh'", *(["engine --no-native"] if native.enabled() else [])}
    for r in report["rows"]:
        assert r["median_s"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert math.isclose(r["ratio_to_reference"] * next(
            q["median_s"] for q in report["rows"] if q["impl"] == "reference" and q["dtype"] == r["dtype"]),
            r["median_s"], rel_tol=1e-9)
    assert report["agreement"]["lstm"] < 1e-12  # engine and reference end one epoch with the same params


# --------------------------------------------------------------------------- #
# the engine's models against this reference: one epoch of SGD, same start and batch order
# --------------------------------------------------------------------------- #
ENGINES = {"default": {}, "--no-native": {"native": False}, "--no-fuse": {"fuse": False}, "--dense": {"dense": True}}


class _Quiet:
    def start(self, *a: object) -> None: ...
    def batch(self, *a: object) -> None: ...
    def epoch(self, *a: object) -> None: ...
    def info(self, *a: object) -> None: ...
    def warn(self, *a: object) -> None: ...
    def finish(self, *a: object) -> None: ...


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", KINDS)
def test_engine_training_ends_with_the_references_parameters(kind: str, engine: str) -> None:
    """The README's claim for both models: the engine (every way it can run) and this hand-written
    reference, started from the same parameters and shuffled alike, end one epoch of SGD on the demo
    set with the same parameters, and score the validation split alike."""
    from models import data as D
    from models.training import DEFAULT_LR, StopFlag, TrainConfig, Trainer, build_model

    ds = D.load_dataset(D.resolve_dataset("demo"))
    cfg = TrainConfig(epochs=1, init_lr=DEFAULT_LR[kind], **ENGINES[engine])
    dims = dict(max_len=cfg.max_len, num_chars=ds.vocab.num_chars, num_hid=cfg.num_hid,
                num_labels=ds.vocab.num_labels)
    trainer = Trainer(build_model(kind, dims, seed=cfg.seed), ds, cfg)
    params = {n: a.copy() for n, a in trainer.model.params.items()}
    assert set(params) == set(ref.MLP_PARAMS if kind == "mlp" else ref.LSTM_PARAMS)
    y = np.eye(ds.vocab.num_labels)[ds.train.label_ids]
    result = trainer.train(_Quiet(), StopFlag())
    ref.train_epoch(kind, params, trainer.codes["train"], y, cfg.batch_size, cfg.init_lr,
                    np.random.default_rng(cfg.seed))
    for name, want in params.items():
        got = trainer.model.params[name]
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13, err_msg=name)
    known = ds.valid.label_ids >= 0
    valid_loss, _ = _loss_fn(kind)(params, trainer.codes["valid"][known],
                                   np.eye(ds.vocab.num_labels)[ds.valid.label_ids[known]])
    assert result.epochs[0].valid_loss == pytest.approx(valid_loss, rel=1e-12)
