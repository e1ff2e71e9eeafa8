"""Runs of steps in one native call (symdiff.autograd's _Run, the dispatcher's run_forward/run_backward).

A run computes products with numpy's own gemm and fused kernels with their compiled loops,
so every value and gradient must be numpy's to the bit: each check compares a program with
runs against the same program run one Python call a step (SYMDIFF_RUNS=0), np.array_equal.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from symdiff import Autograd, ShapeError, XMan, f, native

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def runs(monkeypatch):
    """The dispatcher, when runs can happen here (a compiler and numpy's gemm found); else skip."""
    if native.runs() is None:
        pytest.skip(f"runs of native steps unavailable (native kernels {native.status()}, or no BLAS gemm found)")
    monkeypatch.setattr(native, "MIN_ELEMENTS", 0)
    return native.runs()


class Counting:
    """Stands in for the dispatcher on one program: counts the steps its runs really did."""

    def __init__(self, dispatch):
        self.d, self.done, self.offered = dispatch, 0, 0

    def run_forward(self, steps, *args):
        n = self.d.run_forward(steps, *args)
        self.done, self.offered = self.done + n, self.offered + len(steps)
        return n

    def run_backward(self, steps, *args):
        n = self.d.run_backward(steps, *args)
        self.done, self.offered = self.done + n, self.offered + len(steps)
        return n


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_gives_numpys_bits_and_refuses_what_numpy_does_not_give_gemm(runs, dtype):
    rng = np.random.default_rng(3)
    for m, n, p in ((2, 2, 2), (64, 50, 200), (31, 7, 129)):
        a, b = rng.standard_normal((m, n)).astype(dtype), rng.standard_normal((n, p)).astype(dtype)
        wide = rng.standard_normal((m + 2, n + 5)).astype(dtype)[1:m + 1, 2:n + 2]  # a sliced view
        for x, y in ((a, b), (np.asfortranarray(a), b), (a, np.ascontiguousarray(b.T).T), (wide, b),
                     (a, np.asfortranarray(b))):
            got = runs.gemm(x, y)
            assert got is not None and got.dtype == dtype and got.flags.c_contiguous
            assert np.array_equal(got, x @ y)
    a = rng.standard_normal((5, 4)).astype(dtype)
    assert runs.gemm(a, a.T) is None                                   # numpy: syrk
    assert runs.gemm(a[:1], a.T) is None and runs.gemm(a, a.T[:, :1]) is None  # numpy: gemv
    assert runs.gemm(a, a.T.astype(np.float16)) is None                # other dtypes
    assert runs.gemm(a, np.broadcast_to(a[:1].T, (4, 3))) is None      # zero strides: numpy copies first
    assert runs.gemm(a, a[:3]) is None                                 # shapes that do not chain


def _graph(dtype):
    """Products with plain, transposed and sliced operands between fused elementwise steps."""
    rng = np.random.default_rng(0)
    xm = XMan()
    xm.x = f.input(name="x", default=rng.standard_normal((16, 9)).astype(dtype))
    xm.t = f.input(name="t", default=np.eye(5, dtype=dtype)[rng.integers(0, 5, 16)])
    for name, shape in (("W", (9, 12)), ("V", (20, 12)), ("U", (20, 23)), ("b", (12,)), ("c", (20,)),
                        ("P", (20, 5)), ("S", (16, 16))):
        setattr(xm, name, f.param(name=name, default=(0.3 * rng.standard_normal(shape)).astype(dtype)))
    h1 = f.tanh(xm.x @ xm.W + xm.b)
    h2 = f.sigmoid(h1 @ f.transpose(xm.V) + xm.c)            # a transposed right operand
    h3 = f.relu(f.hadamard(h2, h2 @ xm.U[:, 3:]) + xm.c)    # a sliced one
    h4 = f.tanh(f.hadamard(h3 @ f.transpose(h3), xm.S)) @ h3  # A·Aᵀ: numpy's syrk; a run stops there
    xm.outputs = f.softMax(h4 @ xm.P)
    xm.loss = f.mean(f.crossEnt(xm.outputs, xm.t))
    return xm.setup()


def _eval_and_grads(xm, monkeypatch, on: bool, calls: int = 2):
    monkeypatch.setenv("SYMDIFF_RUNS", "1" if on else "0")
    ad = Autograd(xm)
    w = xm.operationSequence(xm.loss)
    program = ad.compile(w, whole=True)
    counting = None
    if on:
        assert program.runs is not None
        counting = program.runs = Counting(program.runs)
    else:
        assert program.runs is None
    out = []
    for _ in range(calls):  # the first call builds the kernels (a run stops there), later ones run whole
        values = ad.eval(w, xm.inputDict())
        grads = ad.bprop(w, values, loss=np.ones((), xm.inputDict()["x"].dtype))
        out.append((dict(values), grads, ad.forward_steps, ad.backward_steps))
    return out, counting


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_runs_give_the_step_by_step_values_and_gradients_bit_for_bit(runs, monkeypatch, dtype):
    xm = _graph(dtype)
    with_runs, counting = _eval_and_grads(xm, monkeypatch, True)
    without, _ = _eval_and_grads(xm, monkeypatch, False)
    assert 0 < counting.done < counting.offered  # ran natively, and also stopped (syrk; kernels not built yet)
    for (v1, g1, f1, b1), (v0, g0, f0, b0) in zip(with_runs, without):
        assert v1.keys() == v0.keys() and g1.keys() == g0.keys()
        for name in v0:
            assert np.array_equal(np.asarray(v1[name]), np.asarray(v0[name])), name
        for name in g0:
            assert g1[name].dtype == g0[name].dtype and np.array_equal(g1[name], g0[name]), name
        assert (f1, b1) == (f0, b0)  # the counters count steps, however they ran


def test_a_failing_step_inside_a_run_is_named_as_without_runs(runs, monkeypatch):
    xm = _graph(np.float64)
    w = xm.operationSequence(xm.loss)
    messages = []
    for on in ("1", "0"):
        monkeypatch.setenv("SYMDIFF_RUNS", on)
        ad = Autograd(xm)
        ad.eval(w, xm.inputDict())  # kernels built
        with pytest.raises(ShapeError) as err:
            ad.eval(w, xm.inputDict(x=np.ones((16, 8))))
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "mul" in messages[0]


@pytest.mark.skipif(not (DATA / "tiny.train").exists(), reason=f"the real data is not at {DATA}")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_an_lstm_epoch_ends_with_the_same_params_with_runs_on_and_off(runs, monkeypatch, dtype):
    from models import data as D
    from models.training import QuietReporter, StopFlag, Trainer, TrainConfig, build_model

    ds = D.load_dataset(str(DATA / "tiny"))
    params = []
    for on in ("1", "0"):
        monkeypatch.setenv("SYMDIFF_RUNS", on)
        cfg = TrainConfig(epochs=1, dtype=dtype)
        dims = dict(max_len=cfg.max_len, num_chars=ds.vocab.num_chars, num_hid=cfg.num_hid,
                    num_labels=ds.vocab.num_labels)
        trainer = Trainer(build_model("lstm", dims, seed=cfg.seed, dtype=dtype), ds, cfg)
        assert (trainer.program.runs is not None) == (on == "1")
        trainer.train(QuietReporter(), StopFlag())
        params.append({n: a.copy() for n, a in trainer.model.params.items()})
    assert all(np.array_equal(params[0][n], params[1][n]) for n in params[1])


def test_a_gemm_that_is_not_numpys_is_not_used():
    from symdiff import blas

    class Fake:
        def __init__(self, product):
            self.gemm = product

    assert blas._agrees(Fake(lambda a, b: a @ b))
    assert not blas._agrees(Fake(lambda a, b: None))  # refuses what numpy gives gemm
    assert not blas._agrees(Fake(lambda a, b: (a.astype(np.float64) @ b).astype(a.dtype)))  # other bits (float32)
    assert not blas._agrees(Fake(lambda a, b: np.einsum("ij,jk->ik", a, b, optimize=False)))


def test_runs_are_off_without_native_code_and_with_the_switch(runs, monkeypatch):
    xm = _graph(np.float64)
    w = xm.operationSequence(xm.loss)
    assert Autograd(xm).compile(w).runs is not None
    assert Autograd(xm, native=False).compile(w).runs is None
    monkeypatch.setenv("SYMDIFF_RUNS", "0")
    assert Autograd(xm).compile(w).runs is None


@pytest.mark.parametrize("backward", [True, False])
def test_release_plans_run_the_same_with_runs(runs, monkeypatch, backward):
    xm = _graph(np.float32)
    w = xm.operationSequence(xm.loss)
    out = []
    for on in ("1", "0"):
        monkeypatch.setenv("SYMDIFF_RUNS", on)
        program = Autograd(xm).compile(w)
        for _ in range(2):
            v = program.forward(xm.inputDict(), keep=("loss",), backward=backward)
        kept = [None if x is None else (np.shape(x), np.asarray(x).strides == (0,) * np.ndim(x)) for x in v]
        grads = None
        if backward:
            g = program.backward(v, {"loss": np.ones((), np.float32)}, params_only=True)
            grads = {n: g[program.slot[n]] for n in program.params}
        out.append((v[program.slot["loss"]], kept, grads))
    (l1, k1, g1), (l0, k0, g0) = out
    assert np.array_equal(l1, l0) and k1 == k0  # the same values released, to the same stand-ins
    if backward:
        assert all(np.array_equal(g1[n], g0[n]) for n in g0)
