"""End-to-end tests of training: the real CLI in a subprocess on the shipped demo set, plus
in-process checks of the training loop (dense vs gather path, dead ReLUs) where a subprocess
would only add start-up time.

The real DBPedia files are read by path only (skipped if absent); no row of them is copied here.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import data as D
from models import training as T
from models.flags import DEFAULT_LR

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LN5 = math.log(5)
N_TEST, N_LABELS = 150, 5  # rows of data/demo.test, labels of the demo set

# The metrics JSON, as documented in README.md (table of flags, --metrics_file).
METRIC_KEYS = {"model", "config", "dataset", "epochs", "best_epoch", "stopped", "test_loss", "test_accuracy"}
EPOCH_KEYS = {"epoch", "train_loss", "valid_loss", "valid_accuracy", "train_seconds"}
SMALL = ["--num_hid", "8"]


def symdiff(cwd: Path, *args: str, module: str = "cli", timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cli ARGS`` (or another module) in ``cwd`` with the checkout on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def check_probs(path: Path, rows: int = N_TEST, dtype: Any = np.float64, tol: float = 1e-9) -> np.ndarray:
    probs = np.load(path, allow_pickle=False)
    assert probs.shape == (rows, N_LABELS)
    assert probs.dtype == dtype
    assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=tol)
    return probs


@pytest.fixture(scope="module")
def demo() -> D.Dataset:
    return D.load_dataset(D.resolve_dataset("demo"))


class Recorder:
    """A reporter that keeps every event (for in-process runs)."""

    def __init__(self) -> None:
        self.epochs: list[T.EpochResult] = []
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def start(self, kind: str, epochs: int, batches: int) -> None:
        pass

    def batch(self, epoch: int, k: int, loss: float) -> None:
        pass

    def epoch(self, r: T.EpochResult) -> None:
        self.epochs.append(r)

    def info(self, text: str) -> None:
        self.infos.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def finish(self, summary: dict[str, Any]) -> None:
        self.summary = summary


def train_in_process(kind: str, ds: D.Dataset, **cfg: Any) -> tuple[T.Trainer, T.TrainResult]:
    config = T.TrainConfig(**{"num_hid": 8, "epochs": 2, "init_lr": DEFAULT_LR[kind], **cfg})
    dims = dict(max_len=config.max_len, num_chars=ds.vocab.num_chars, num_hid=config.num_hid,
                num_labels=ds.vocab.num_labels)
    model = T.build_model(kind, dims, seed=config.seed, dtype=config.dtype)
    trainer = T.Trainer(model, ds, config)
    return trainer, trainer.train(Recorder(), T.StopFlag())


# ---- end to end on the demo set -------------------------------------------------------------
@pytest.mark.subprocess
@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_train_writes_predictions_and_documented_metrics(tmp_path: Path, kind: str, demo: D.Dataset) -> None:
    proc = ok(symdiff(tmp_path, kind, "--epochs", "2", *SMALL, "--output_file", "p.npy",
                      "--metrics_file", "m.json"))
    probs = check_probs(tmp_path / "p.npy")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == METRIC_KEYS
    assert metrics["model"] == kind and metrics["stopped"] is None
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for e in metrics["epochs"]:
        assert set(e) == EPOCH_KEYS
        assert all(math.isfinite(e[k]) for k in EPOCH_KEYS)
        assert e["train_seconds"] >= 0 and 0 <= e["valid_accuracy"] <= 1
    assert metrics["best_epoch"] in (1, 2)
    # The reported test loss and accuracy are those of the written probabilities.
    y = demo.test.label_ids
    assert metrics["test_loss"] == pytest.approx(float(-np.log(probs[np.arange(len(y)), y]).mean()), abs=1e-9)
    assert metrics["test_accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()), abs=1e-12)
    assert len(re.findall(r"^epoch +\d+ ", proc.stdout, flags=re.M)) == 2


@pytest.mark.subprocess
def test_same_seed_is_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        ok(symdiff(tmp_path, "mlp", "--epochs", "1", *SMALL, "--seed", seed, "--output_file", f"{name}.npy"))
    a, b, c = ((tmp_path / f"{n}.npy").read_bytes() for n in "abc")
    assert a == b
    assert a != c


@pytest.mark.subprocess
def test_python_m_models_mlp_matches_the_cli(tmp_path: Path) -> None:
    ok(symdiff(tmp_path, "--epochs", "1", *SMALL, "--output_file", "mod.npy", module="models.mlp"))
    ok(symdiff(tmp_path, "mlp", "--epochs", "1", *SMALL, "--output_file", "cli.npy"))
    check_probs(tmp_path / "mod.npy")
    assert (tmp_path / "mod.npy").read_bytes() == (tmp_path / "cli.npy").read_bytes()


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_float32_writes_float32_probabilities(tmp_path: Path, kind: str) -> None:
    ok(symdiff(tmp_path, kind, "--epochs", "1", *SMALL, "--dtype", "float32", "--output_file", "p.npy"))
    check_probs(tmp_path / "p.npy", dtype=np.float32, tol=1e-5)


@pytest.mark.subprocess
def test_predictions_come_from_the_best_validation_epoch(tmp_path: Path) -> None:
    # A high learning rate makes the validation loss go up and down, so the best epoch is not the last.
    flags = ["--num_hid", "8", "--init_lr", "1.0"]
    ok(symdiff(tmp_path, "mlp", "--epochs", "6", *flags, "--output_file", "p.npy", "--metrics_file", "m.json"))
    metrics = json.loads((tmp_path / "m.json").read_text())
    valid = [e["valid_loss"] for e in metrics["epochs"]]
    assert len(valid) == 6
    best = metrics["best_epoch"]
    assert best == int(np.argmin(valid)) + 1
    assert best < 6, f"this configuration no longer has a best epoch before the last: {valid}"
    # Training stops being random once seeded: a run of exactly `best` epochs ends with the same
    # parameters, so its predictions must be exactly the ones written by the longer run.
    ok(symdiff(tmp_path, "mlp", "--epochs", str(best), *flags, "--output_file", "q.npy", "--metrics_file", "n.json"))
    assert (tmp_path / "p.npy").read_bytes() == (tmp_path / "q.npy").read_bytes()
    assert json.loads((tmp_path / "n.json").read_text())["test_loss"] == metrics["test_loss"]


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_dense_path_gives_the_same_losses(kind: str, demo: D.Dataset) -> None:
    gather_trainer, gather = train_in_process(kind, demo, dense=False)
    dense_trainer, dense = train_in_process(kind, demo, dense=True)
    assert len(gather.epochs) == len(dense.epochs) == 2
    for g, d in zip(gather.epochs, dense.epochs):
        assert abs(g.train_loss - d.train_loss) < 1e-9
        assert abs(g.valid_loss - d.valid_loss) < 1e-9
        assert g.valid_accuracy == d.valid_accuracy
    for name, value in gather_trainer.model.params.items():
        np.testing.assert_allclose(dense_trainer.model.params[name], value, rtol=0, atol=1e-9, err_msg=name)


@pytest.mark.subprocess
@pytest.mark.skipif(not (REAL_DATA / "tiny.train").exists(), reason=f"real DBPedia data not found at {REAL_DATA}")
def test_mlp_learns_on_tiny(tmp_path: Path) -> None:
    ok(symdiff(tmp_path, "mlp", "--dataset", str(REAL_DATA / "tiny"), "--epochs", "8", "--init_lr", "0.2",
               "--output_file", "p.npy", "--metrics_file", "m.json"))
    n_test = len(D.read_split(REAL_DATA / "tiny.test"))
    check_probs(tmp_path / "p.npy", rows=n_test)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["test_loss"] < 1.5 < LN5, metrics["epochs"]


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_gradcheck_of_the_built_models_passes(tmp_path: Path, kind: str) -> None:
    proc = ok(symdiff(tmp_path, "gradcheck", kind))
    assert "yes" in proc.stdout and "NO" not in proc.stdout


@pytest.mark.subprocess
def test_saved_model_predicts_like_the_run_and_from_the_command_line(tmp_path: Path, demo: D.Dataset) -> None:
    ok(symdiff(tmp_path, "mlp", "--epochs", "2", *SMALL, "--output_file", "p.npy", "--save_model", "m.npz"))
    model, vocab = T.load_model(tmp_path / "m.npz")
    assert vocab.labels == demo.vocab.labels
    # The saved parameters are the ones that produced the written test predictions.
    probs = T.predict_titles(model, vocab, demo.test.titles)
    np.testing.assert_allclose(probs, np.load(tmp_path / "p.npy"), rtol=0, atol=1e-12)

    titles = ["Zanzibar_Quoll", "[/]_Records"]  # the second is also rich markup: must print as is
    proc = ok(symdiff(tmp_path, "predict", "--model", "m.npz", *titles))  # not a terminal: TSV
    expected = T.predict_titles(model, vocab, titles)
    header, *rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert header == ["title", "label", *vocab.labels]
    for (title, label, *shown), want, row in zip(rows, titles, expected):
        assert title == want and label == vocab.labels[int(row.argmax())]
        np.testing.assert_allclose([float(x) for x in shown], row, atol=5e-7 + 1e-12)


def test_predict_reads_titles_as_the_data_files_write_them(demo: D.Dataset) -> None:
    model = T.build_model("lstm", dict(max_len=10, num_chars=demo.vocab.num_chars, num_hid=8,
                                       num_labels=demo.vocab.num_labels), seed=0)
    accented = next(t for t in demo.train.titles if any(ord(c) > 127 for c in t))
    encoded = urllib.parse.quote(accented)
    assert encoded != accented
    probs = T.predict_titles(model, demo.vocab, [accented, encoded, "100%_Pure", "100%25_Pure"])
    np.testing.assert_array_equal(probs[1], probs[0])  # Mikl%C3%B3s is Miklós, as in training
    np.testing.assert_array_equal(probs[3], probs[2])  # a % that starts no escape stays a %


@pytest.mark.subprocess
def test_ops_fused_shows_every_rewritten_op_by_its_full_name(tmp_path: Path) -> None:
    # numpy kernels: the gates are stacked by fuse_blocks, the cell fused
    out = ok(symdiff(tmp_path, "ops", "--fused", "lstm", env={"SYMDIFF_NATIVE": "0"})).stdout
    # op names carry brackets, which rich would otherwise swallow as markup
    for name in ("blockwise[add]", "blockmap[tanh,sigmoid*3]", "fused1[hadamard+add+tanh]", "cat4"):
        assert name in out, name
    assert "tanh on block 0; sigmoid on blocks 1-3" in out
    assert "dL/d in0 = in2*(delta2 + delta4*in3*(1 - r3**2))" in out  # factored, CSE-able gradient
    assert "native kernels: off (SYMDIFF_NATIVE=0" in out


@pytest.mark.subprocess
def test_ops_order_shows_every_derivative_as_derived_and_stabilised(tmp_path: Path) -> None:
    out = ok(symdiff(tmp_path, "ops", "--order", "3")).stdout
    assert "Sigmoid(-x)*Sigmoid(x)" in out  # sigmoid', not out*(1 - out), which is 0 at x = 40
    assert "-tanh(x/2)*Sigmoid(-x)*Sigmoid(x)" in out  # sigmoid'', accurate at x = 1e-8
    assert "4*Sigmoid(-2*x)*Sigmoid(2*x)" in out  # tanh', not 1 - tanh(x)**2
    assert "d3/dx dx dx" in out and "d2/dx dy" in out
    bad = symdiff(tmp_path, "ops", "--order", "0")
    assert bad.returncode == 2 and "--order must be a whole number from 1 to 6, got 0" in bad.stderr


@pytest.mark.subprocess
@pytest.mark.parametrize("flags,env,expected", [
    ((), {}, "engine: fused, compiled C kernels (passes: crossent_softmax, merge_matmuls, fuse_elementwise, fold_cuts)"),
    (("--no-native",), {}, "engine: fused, numpy kernels, --no-native (passes: crossent_softmax, merge_matmuls, "
                           "fuse_blocks, fuse_elementwise)"),
    ((), {"SYMDIFF_NATIVE": "0"}, "engine: fused, numpy kernels, native code off (SYMDIFF_NATIVE=0"),
    (("--no-fuse",), {}, "engine: unfused, numpy kernels (passes: crossent_softmax, merge_matmuls)"),
])
def test_a_run_says_how_its_engine_runs(tmp_path: Path, flags, env, expected) -> None:
    from symdiff import native

    if not env and "--no-fuse" not in flags and not native.enabled():
        expected = "engine: fused, numpy kernels, native code off"  # no compiler here: said so instead
    out = ok(symdiff(tmp_path, "lstm", "--epochs", "1", "--output_file", "o.npy", *flags, env=env)).stdout
    assert expected in out


@pytest.mark.subprocess
def test_ops_fused_with_native_kernels_shows_one_kernel_per_lstm_step(tmp_path: Path) -> None:
    from symdiff import native

    if not native.enabled():
        pytest.skip(f"native kernels unavailable here: {native.status()}")
    out = ok(symdiff(tmp_path, "ops", "--fused", "lstm")).stdout
    assert "native kernels: on" in out
    # max_len 3: one per step, reading its gate products whole (fold_cuts: no split4 step left)
    assert out.count("= fused1[add+sigmoid+hadamard+tanh]{cuts:0,1,2,3;4,5,6,7}(") == 3
    assert "= split4(" not in out
    assert "blockwise" not in out


# ---- dead ReLUs -----------------------------------------------------------------------------
def _kill_output_relus(model: T.CharModel) -> T.CharModel:
    params = model.params
    params["W2"][...] = 0.0
    params["b2"][...] = -50.0   # relu(O W2 + b2) = relu(-50) = 0 for every example
    return model


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_dead_relus_stop_training_with_advice(kind: str, demo: D.Dataset) -> None:
    dims = dict(max_len=10, num_chars=demo.vocab.num_chars, num_hid=8, num_labels=demo.vocab.num_labels)
    model = _kill_output_relus(T.build_model(kind, dims, seed=0))
    trainer = T.Trainer(model, demo, T.TrainConfig(num_hid=8, epochs=3))
    result = trainer.train(Recorder(), T.StopFlag())
    assert result.stopped == "dead-relu"
    assert result.epochs == [] and result.best_params is None
    assert "ln 5 = 1.609" in result.message
    for advice in ("--seed", "--init_lr", "--optimizer"):
        assert advice in result.message


def test_dead_relus_at_start_write_nothing_and_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = T.build_model
    monkeypatch.setattr(T, "build_model", lambda *a, **k: _kill_output_relus(real_build(*a, **k)))
    reporter = Recorder()
    code = T.run("mlp", {"epochs": 3, "num_hid": 8, "output_file": str(tmp_path / "p.npy"),
                         "metrics_file": str(tmp_path / "m.json")}, reporter)
    assert code == T.EXIT_FAILED
    assert any("ReLU is dead" in w and "ln 5" in w for w in reporter.warnings), reporter.warnings
    assert not (tmp_path / "p.npy").exists() and not (tmp_path / "m.json").exists()


@pytest.mark.subprocess
def test_relus_killed_by_a_huge_learning_rate_are_reported(tmp_path: Path) -> None:
    # One epoch at lr 1000 drives every output pre-activation negative: the run stops after that
    # epoch, explains why, and still writes what that (only) epoch produced.
    proc = ok(symdiff(tmp_path, "mlp", "--epochs", "3", *SMALL, "--init_lr", "1000", "--output_file", "p.npy",
                      "--metrics_file", "m.json"))
    assert "ReLU is dead" in proc.stderr and "ln 5" in proc.stderr and "--init_lr" in proc.stderr
    assert "after epoch 1" in proc.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["stopped"] == "dead-relu" and len(metrics["epochs"]) == 1
    probs = check_probs(tmp_path / "p.npy")
    np.testing.assert_allclose(probs, 0.2, atol=1e-12)   # all logits 0: uniform


# ---- early stopping (--patience) ------------------------------------------------------------
def stop_epoch(valid: list[float], patience: int) -> int | None:
    """The rule, stated apart from the loop's counter: training stops after the first epoch e at which
    none of the last ``patience`` epochs improved on the best validation loss before them."""
    for e in range(patience + 1, len(valid) + 1):
        if min(valid[e - patience:e]) >= min(valid[:e - patience]):
            return e
    return None


def test_patience_stops_at_the_first_epoch_the_rule_allows_and_keeps_the_best(tmp_path: Path) -> None:
    # lr 0.5 makes the validation loss on the demo set go up once (and recover), then up twice in a row
    flags = {"dataset": "demo", "num_hid": 32, "init_lr": 0.5, "epochs": 30}
    rep = Recorder()
    code = T.run("mlp", {**flags, "patience": 2, "output_file": str(tmp_path / "p.npy"),
                         "metrics_file": str(tmp_path / "m.json")}, rep)
    assert code == T.EXIT_OK
    metrics = json.loads((tmp_path / "m.json").read_text())
    valid = [e["valid_loss"] for e in metrics["epochs"]]
    improved = [v < min(valid[:k], default=math.inf) for k, v in enumerate(valid)]
    assert not all(improved[:-2]), f"no setback before the stop: the counter's reset goes untested ({valid})"
    assert metrics["stopped"] == "early-stop"
    assert len(valid) == stop_epoch(valid, 2) < 30
    assert any(f"early stop after epoch {len(valid)}" in i and "2 epoch(s)" in i for i in rep.infos), rep.infos
    assert not rep.warnings  # stopping early is the plan, not a problem
    best = metrics["best_epoch"]
    assert best == int(np.argmin(valid)) + 1 < len(valid)
    # the predictions are those of the best epoch: a run of exactly that many epochs writes the same bytes
    assert T.run("mlp", {**flags, "epochs": best, "output_file": str(tmp_path / "q.npy")}, Recorder()) == T.EXIT_OK
    assert (tmp_path / "p.npy").read_bytes() == (tmp_path / "q.npy").read_bytes()


def test_without_patience_training_runs_every_epoch(demo: D.Dataset) -> None:
    _, result = train_in_process("mlp", demo, num_hid=32, init_lr=0.5, epochs=12)
    valid = [e.valid_loss for e in result.epochs]
    stop = stop_epoch(valid, 2)
    assert stop is not None and stop < len(valid)  # patience 2 would have stopped it ...
    assert result.stopped is None and len(valid) == 12    # ... but none was given


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_both_best_presets_stop_early_on_the_demo_set(kind: str, tmp_path: Path) -> None:
    """`--preset best` relies on early stopping (patience 2, up to 30 / 20 epochs): on the demo set it
    really ends that way, at the epoch the rule names."""
    from models.loader import load_source

    table = load_source(kind).presets["best"]  # PRESETS in models/<kind>.py
    assert table["patience"] is not None
    code = T.run(kind, {"preset": "best", "dataset": "demo", "metrics_file": str(tmp_path / "m.json")}, Recorder())
    assert code == T.EXIT_OK
    metrics = json.loads((tmp_path / "m.json").read_text())
    valid = [e["valid_loss"] for e in metrics["epochs"]]
    assert metrics["config"]["patience"] == table["patience"] and metrics["stopped"] == "early-stop"
    assert len(valid) == stop_epoch(valid, table["patience"]) < table["epochs"]


@pytest.mark.parametrize("cfg,expected", [
    ({}, "fused, compiled C kernels (passes: crossent_softmax, merge_matmuls, fuse_elementwise, fold_cuts)"),
    ({"native": False}, "fused, numpy kernels, --no-native (passes: crossent_softmax, merge_matmuls, fuse_blocks, "
                        "fuse_elementwise)"),
    ({"fuse": False}, "unfused, numpy kernels (passes: crossent_softmax, merge_matmuls)"),
])
def test_trainer_says_how_its_engine_runs(cfg: dict[str, Any], expected: str, demo: D.Dataset) -> None:
    """In process, what the subprocess test above reads from a run's `engine:` line."""
    from symdiff import native

    if not cfg and not native.enabled():
        expected = f"fused, numpy kernels, native code {native.status()} (passes: crossent_softmax, merge_matmuls, " \
                   f"fuse_blocks, fuse_elementwise)"
    config = T.TrainConfig(num_hid=8, epochs=1, **cfg)
    dims = dict(max_len=config.max_len, num_chars=demo.vocab.num_chars, num_hid=8, num_labels=demo.vocab.num_labels)
    assert T.Trainer(T.build_model("lstm", dims, seed=0), demo, config).engine() == expected


def test_trainer_says_native_code_is_off_when_it_is_switched_off(demo: D.Dataset) -> None:
    from symdiff import native

    dims = dict(max_len=10, num_chars=demo.vocab.num_chars, num_hid=8, num_labels=demo.vocab.num_labels)
    native.set_enabled(False)  # what SYMDIFF_NATIVE=0 does
    try:
        line = T.Trainer(T.build_model("mlp", dims, seed=0), demo, T.TrainConfig(num_hid=8)).engine()
    finally:
        native.set_enabled(None)
    assert line.startswith("fused, numpy kernels, native code off (SYMDIFF_NATIVE=0"), line


def test_average_evaluates_and_keeps_the_weights_moving_average(demo: D.Dataset) -> None:
    """--average: the validation loss and the kept best parameters are the average's, not the last step's."""
    trainer, result = train_in_process("mlp", demo, epochs=1, average=0.9)
    live = {n: a.copy() for n, a in trainer.model.params.items()}
    assert any(not np.array_equal(live[n], result.best_params[n]) for n in live)
    trainer.model.set_params(result.best_params)
    assert trainer.evaluate("valid").loss == result.epochs[0].valid_loss
    plain_trainer, plain = train_in_process("mlp", demo, epochs=1)
    assert all(np.array_equal(a, plain.best_params[n]) for n, a in plain_trainer.model.params.items())


def test_an_epochs_train_loss_is_the_row_weighted_mean_of_its_batch_losses(demo: D.Dataset) -> None:
    class Batches(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.losses: list[float] = []

        def batch(self, epoch: int, k: int, loss: float) -> None:
            self.losses.append(loss)

    config = T.TrainConfig(num_hid=8, epochs=1, init_lr=DEFAULT_LR["mlp"], batch_size=64)
    dims = dict(max_len=config.max_len, num_chars=demo.vocab.num_chars, num_hid=8, num_labels=demo.vocab.num_labels)
    rec = Batches()
    result = T.Trainer(T.build_model("mlp", dims, seed=config.seed), demo, config).train(rec, T.StopFlag())
    n = len(demo.train)
    sizes = [64] * (n // 64) + ([n % 64] if n % 64 else [])
    assert len(rec.losses) == len(sizes) > 1 and sizes[-1] != 64  # a short last batch: weights matter
    np.testing.assert_allclose(result.epochs[0].train_loss, np.dot(rec.losses, sizes) / n, rtol=1e-12)


def test_resuming_a_run_that_stopped_early_reports_the_same_stop_without_training(tmp_path: Path) -> None:
    # the checkpoint of an early-stopped run records why it stopped: resuming it trains nothing more
    # and ends with the same reason, message, epochs and predictions
    flags = {"dataset": "demo", "num_hid": 16, "init_lr": 0.5, "epochs": 30, "patience": 1,
             "checkpoint": str(tmp_path / "c.npz"), "metrics_file": str(tmp_path / "m.json")}
    assert T.run("mlp", {**flags, "output_file": str(tmp_path / "a.npy")}, Recorder()) == T.EXIT_OK
    first = json.loads((tmp_path / "m.json").read_text())
    assert first["stopped"] == "early-stop" and len(first["epochs"]) < 30
    rep = Recorder()
    assert T.run("mlp", {**flags, "output_file": str(tmp_path / "b.npy")}, rep) == T.EXIT_OK
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["stopped"] == "early-stop" and again["epochs"] == first["epochs"]
    assert any("resuming from" in i for i in rep.infos) and any("early stop" in i for i in rep.infos), rep.infos
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


def test_an_epoch_reports_its_cpu_time_apart_from_its_wall_time(demo: D.Dataset) -> None:
    """The benchmark's ``--clock cpu`` reads ``train_cpu_seconds``: time spent waiting (here a reporter
    that sleeps, on a shared machine other processes' time slices) counts in wall time only."""
    import time

    class Sleepy(Recorder):
        def batch(self, epoch: int, k: int, loss: float) -> None:
            time.sleep(0.02)

    config = T.TrainConfig(num_hid=8, epochs=1, init_lr=DEFAULT_LR["mlp"])
    dims = dict(max_len=config.max_len, num_chars=demo.vocab.num_chars, num_hid=8, num_labels=demo.vocab.num_labels)
    trainer = T.Trainer(T.build_model("mlp", dims, seed=0), demo, config)
    epoch = trainer.train(Sleepy(), T.StopFlag()).epochs[0]
    batches = math.ceil(len(demo.train.label_ids) / config.batch_size)
    assert epoch.train_seconds >= 0.02 * batches
    assert 0 < epoch.train_cpu_seconds < epoch.train_seconds - 0.015 * batches


def test_the_benchmark_times_by_the_clock_it_is_given() -> None:
    import time

    from benchmarks import bench

    chosen = bench.clock
    try:
        bench.clock = "cpu"
        assert bench._timed(time.sleep, 0.1) < 0.05
        bench.clock = "wall"
        assert bench._timed(time.sleep, 0.1) >= 0.1
    finally:
        bench.clock = chosen
