"""Hardening: what the command line does with bad data, bad flags, bad model files, diverging or
interrupted training, and a kill -9 in the middle of writing a result.

Every refusal must be: a non-zero exit, ONE line on stderr that names the file or flag and says
what to do, no Python traceback, and no output file created or overwritten. All data rows here
are invented.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import storage
from models import training as T

REPO = Path(__file__).resolve().parents[1]
KEEP = b"previous results, must survive\n"

TRAIN = ("Zorb_Fen\tPlace\nKl%C3%BCpfel_Moor\tPerson\nAlbo_Tusk\tWork\nQuill_%26_Sons\tOrganisation\n"
         "Ficus_quaxii\tSpecies\nVarn_River\tPlace\nOtto_Blemm\tPerson\nThe_Grey_Lantern\tWork\n")
VALID = "Nix_Varp\tPerson\nOrt_Ley\tPlace\nBlue_Oxen_Ltd\tOrganisation\n"
TEST = "Grob_Quen\tWork\nYelp_Dax\tPerson\nCarex_zembla\tSpecies\nHolm_Vik\tPlace\n"


def symdiff(cwd: Path, *args: str, module: str = "cli", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def refused(proc: subprocess.CompletedProcess[str], *names: str, code: int = 2) -> str:
    """Exit ``code``, no traceback, exactly one stderr line mentioning every one of ``names``."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def write_dataset(folder: Path, name: str = "toy", train: str | bytes | None = TRAIN,
                  valid: str | bytes | None = VALID, test: str | bytes | None = TEST) -> str:
    for split, content in (("train", train), ("valid", valid), ("test", test)):
        if content is not None:
            (folder / f"{name}.{split}").write_bytes(content.encode() if isinstance(content, str) else content)
    return name


def train_args(dataset: str, *extra: str) -> list[str]:
    return ["mlp", "--dataset", dataset, "--epochs", "1", "--num_hid", "8", "--output_file", "p.npy",
            "--metrics_file", "m.json", *extra]


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """An existing output file that a refused run must leave exactly as it was."""
    out = tmp_path / "p.npy"
    out.write_bytes(KEEP)
    return out


def untouched(tmp_path: Path) -> None:
    assert (tmp_path / "p.npy").read_bytes() == KEEP
    assert not (tmp_path / "m.json").exists()
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"


# ---- data files -----------------------------------------------------------------------------
BAD_DATA = {
    # case: (dataset overrides, what the one line must contain)
    "missing file": (dict(test=None), ["toy.test", "missing"]),
    "empty file": (dict(train=b""), ["toy.train", "no data rows"]),
    "no tab": (dict(valid=VALID + "Nix_Varp Person\n"), ["toy.valid:4", "no tab", "one tab"]),
    "two tabs": (dict(test="Grob\tWork\tPerson\n"), ["toy.test:1", "2 tabs", "one tab"]),
    "empty title": (dict(train=TRAIN + "\tPerson\n"), ["toy.train:9", "empty title"]),
    "undecodable bytes": (dict(train=TRAIN.encode() + b"Bad\xff\xfe\tPlace\n"), ["toy.train:9", "UTF-8"]),
    "broken percent-escape": (dict(train=TRAIN + "Caf%E2%82\tPlace\n"), ["toy.train:9", "%E2%82", "escape"]),
    "valid label not in train": (dict(valid=VALID + "Rex\tAnimal\n"), ["toy.valid:4", "'Animal'", "toy.train"]),
}


@pytest.mark.subprocess
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_file_is_refused_in_one_line(tmp_path: Path, previous: Path, case: str) -> None:
    overrides, names = BAD_DATA[case]
    name = write_dataset(tmp_path, **overrides)
    line = refused(symdiff(tmp_path, *train_args(name)), *names)
    assert " — " in line  # "<where>: <what is wrong> — <what to do>"
    untouched(tmp_path)


@pytest.mark.subprocess
def test_whole_dataset_missing(tmp_path: Path, previous: Path) -> None:
    line = refused(symdiff(tmp_path, *train_args("nowhere")), "nowhere", "not found")
    assert "prefix" in line
    untouched(tmp_path)


@pytest.mark.subprocess
def test_test_label_not_in_train_is_warned_and_still_predicted(tmp_path: Path) -> None:
    name = write_dataset(tmp_path, test=TEST + "Rex_the_Dog\tAnimal\n")
    proc = symdiff(tmp_path, *train_args(name))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "toy.test:5" in proc.stderr and "'Animal'" in proc.stderr
    probs = np.load(tmp_path / "p.npy")
    assert probs.shape == (5, 5)  # every row, the unknown-label one included
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    metrics = json.loads((tmp_path / "m.json").read_text())
    y = [4, 1, 3, 2]  # Work, Person, Species, Place in sorted label order; the 5th row is left out
    assert metrics["test_loss"] == pytest.approx(float(-np.log(probs[np.arange(4), y]).mean()), abs=1e-9)


def _variant(text: str, kind: str) -> bytes:
    if kind == "lf":
        return text.encode()
    if kind == "crlf":
        return text.replace("\n", "\r\n").encode()
    if kind == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if kind == "blank lines":
        return ("\n\r\n" + text.replace("\n", "\n  \n") + "\n\n").encode()
    if kind == "no final newline":
        return text.rstrip("\n").encode()
    raise AssertionError(kind)


def _predict_toy(folder: Path, train: bytes, valid: bytes, test: bytes) -> bytes:
    write_dataset(folder, "toy", train, valid, test)
    proc = symdiff(folder, "mlp", "--dataset", "toy", "--epochs", "1", "--num_hid", "8", "--output_file", "p.npy")
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert np.load(folder / "p.npy").shape == (4, 5)
    return (folder / "p.npy").read_bytes()


@pytest.fixture(scope="module")
def plain_predictions(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _predict_toy(tmp_path_factory.mktemp("plain"), *(_variant(t, "lf") for t in (TRAIN, VALID, TEST)))


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", ["crlf", "bom", "blank lines", "no final newline"])
def test_harmless_format_variants_give_identical_results(tmp_path: Path, kind: str, plain_predictions: bytes) -> None:
    assert _predict_toy(tmp_path, *(_variant(t, kind) for t in (TRAIN, VALID, TEST))) == plain_predictions


# ---- flags ----------------------------------------------------------------------------------
BAD_FLAGS = [(flag, value) for flag in ("--max_len", "--num_hid", "--batch_size", "--epochs")
             for value in ("0", "-3", "1.5", "abc")]
BAD_FLAGS += [("--init_lr", value) for value in ("0", "-0.1", "nan", "inf", "abc")]
BAD_FLAGS += [("--seed", "-1"), ("--momentum", "1.5"), ("--momentum", "nan"), ("--weight_decay", "-1"),
              ("--clip", "0"), ("--patience", "0"), ("--dtype", "float16")]


@pytest.mark.subprocess
@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_bad_flag_value_is_refused_in_one_line(tmp_path: Path, previous: Path, flag: str, value: str) -> None:
    refused(symdiff(tmp_path, *train_args("demo", flag, value)), flag, value, "--help")
    untouched(tmp_path)


@pytest.mark.subprocess
def test_bad_flag_value_python_m_models(tmp_path: Path, previous: Path) -> None:
    proc = symdiff(tmp_path, "--epochs", "0", "--output_file", "p.npy", module="models.lstm")
    refused(proc, "--epochs", "at least 1")
    untouched(tmp_path)


@pytest.mark.subprocess
def test_flag_combination_the_optimizer_rejects(tmp_path: Path, previous: Path) -> None:
    refused(symdiff(tmp_path, *train_args("demo", "--optimizer", "nesterov", "--momentum", "0")),
            "--optimizer nesterov", "--momentum")
    untouched(tmp_path)


@pytest.mark.subprocess
@pytest.mark.parametrize("flag", ["--output_file", "--metrics_file", "--save_model"])
def test_output_in_a_missing_folder(tmp_path: Path, previous: Path, flag: str) -> None:
    args = [a for a in train_args("demo") if a not in ("--metrics_file", "m.json")]
    line = refused(symdiff(tmp_path, *args, flag, "no/such/dir/out.bin"), flag, "no/such/dir", "mkdir")
    assert "does not exist" in line
    untouched(tmp_path)
    assert not (tmp_path / "no").exists()


@pytest.mark.subprocess
def test_output_file_that_is_a_directory(tmp_path: Path, previous: Path) -> None:
    (tmp_path / "results").mkdir()
    args = [a if a != "p.npy" else "results" for a in train_args("demo")]
    refused(symdiff(tmp_path, *args), "--output_file", "results", "is a directory", "file name")
    assert not (tmp_path / "m.json").exists() and list((tmp_path / "results").iterdir()) == []


# ---- saved models ---------------------------------------------------------------------------
class _Trap:
    """Unpickling this creates a folder: proof that a loader ran pickle on the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    folder = tmp_path_factory.mktemp("model")
    proc = symdiff(folder, "mlp", "--epochs", "1", "--num_hid", "8", "--output_file", "p.npy",
                   "--save_model", "m.npz")
    assert proc.returncode == 0, proc.stderr
    with np.load(folder / "m.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.subprocess
def test_predict_missing_model_file(tmp_path: Path) -> None:
    refused(symdiff(tmp_path, "predict", "--model", "gone.npz", "Foo"), "gone.npz", "--save_model")


@pytest.mark.subprocess
@pytest.mark.parametrize("content", [b"not a model\n", b"PK\x03\x04 truncated zip", b""])
def test_predict_file_that_is_not_an_npz(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "m.npz").write_bytes(content)
    refused(symdiff(tmp_path, "predict", "--model", "m.npz", "Foo"), "m.npz", "not an .npz", "--save_model")


@pytest.mark.subprocess
def test_predict_truncated_model_file(tmp_path: Path, saved_model: dict[str, np.ndarray]) -> None:
    np.savez(tmp_path / "full.npz", **saved_model)
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "m.npz").write_bytes(data[: len(data) * 2 // 3])
    refused(symdiff(tmp_path, "predict", "--model", "m.npz", "Foo"), "m.npz", "--save_model")


@pytest.mark.subprocess
def test_predict_refuses_to_unpickle(tmp_path: Path, saved_model: dict[str, np.ndarray]) -> None:
    trap = tmp_path / "unpickled"
    arrays = dict(saved_model)
    arrays["param/b2"] = np.array([_Trap(str(trap))], dtype=object)
    np.savez(tmp_path / "m.npz", **arrays)  # numpy pickles object arrays into the archive
    refused(symdiff(tmp_path, "predict", "--model", "m.npz", "Foo"), "m.npz", "pickle")
    assert not trap.exists(), "the model file was unpickled"


@pytest.mark.subprocess
def test_predict_param_of_the_wrong_shape(tmp_path: Path, saved_model: dict[str, np.ndarray]) -> None:
    arrays = dict(saved_model)
    arrays["param/W2"] = np.zeros((3, 3))
    np.savez(tmp_path / "m.npz", **arrays)
    refused(symdiff(tmp_path, "predict", "--model", "m.npz", "Foo"), "m.npz", "'param/W2'", "(3, 3)", "(8, 5)")


@pytest.mark.subprocess
@pytest.mark.parametrize("field,value", [("dtype", "int64"), ("num_hid", -3)])
def test_predict_bad_model_config(tmp_path: Path, saved_model: dict[str, np.ndarray], field: str,
                                  value: Any) -> None:
    arrays = dict(saved_model)
    meta = json.loads(str(arrays["meta/config"]))
    meta[field] = value
    arrays["meta/config"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "m.npz", **arrays)
    refused(symdiff(tmp_path, "predict", "--model", "m.npz", "Foo"), "m.npz", "meta/config", field)


# ---- faults during training -----------------------------------------------------------------
@pytest.mark.subprocess
def test_divergence_in_the_first_epoch_writes_nothing(tmp_path: Path, previous: Path) -> None:
    # The first update at lr 1e300 sends the weights to ~1e300: the next forward pass overflows.
    proc = symdiff(tmp_path, *train_args("demo", "--epochs", "3", "--init_lr", "1e300"))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "RuntimeWarning" not in proc.stderr, proc.stderr
    assert "epoch 1, batch 2 of 8" in proc.stderr and "diverged" in proc.stderr
    assert "--init_lr" in proc.stderr and "nothing was written" in proc.stderr
    assert "epoch   1" not in proc.stdout
    untouched(tmp_path)


class Poisoner:
    """A reporter that sets every parameter to NaN right after the given event, e.g.
    ``("epoch", 1)`` (after epoch 1 is scored) or ``("batch", 2, 8)`` (after batch 8 of epoch 2).
    No flag makes a run diverge only later, so this stands in for one that does."""

    def __init__(self, built: list[T.CharModel], *when: int | str) -> None:
        self.built, self.when = built, when
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def _poison(self, *event: int | str) -> None:
        if event == self.when:
            for a in self.built[-1].params.values():
                a[...] = np.nan

    def start(self, *a: Any) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...
    def info(self, text: str) -> None: self.infos.append(text)
    def warn(self, text: str) -> None: self.warnings.append(text)
    def batch(self, epoch: int, k: int, loss: float) -> None: self._poison("batch", epoch, k)
    def epoch(self, r: T.EpochResult) -> None: self._poison("epoch", r.epoch)


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[T.CharModel]:
    """Every model that ``training.run`` builds, so a :class:`Poisoner` can reach its parameters."""
    models: list[T.CharModel] = []
    real_build = T.build_model
    monkeypatch.setattr(T, "build_model", lambda *a, **k: models.append(real_build(*a, **k)) or models[-1])
    return models


COMMON = {"epochs": 1, "num_hid": 8, "dataset": "demo"}


def _one_clean_epoch(tmp_path: Path) -> bytes:
    assert T.run("mlp", {**COMMON, "output_file": str(tmp_path / "clean.npy")}, Poisoner([])) == T.EXIT_OK
    return (tmp_path / "clean.npy").read_bytes()


def _strict_json(path: Path) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_divergence_after_an_epoch_keeps_the_best_epoch(tmp_path: Path, built: list[T.CharModel]) -> None:
    rep = Poisoner(built, "epoch", 1)
    code = T.run("mlp", {**COMMON, "epochs": 4, "output_file": str(tmp_path / "p.npy"),
                         "metrics_file": str(tmp_path / "m.json")}, rep)
    assert code == T.EXIT_OK
    assert any("epoch 2, batch 1" in w and "diverged" in w for w in rep.warnings), rep.warnings
    assert any("best epoch so far (1)" in i for i in rep.infos), rep.infos
    metrics = _strict_json(tmp_path / "m.json")
    assert metrics["stopped"] == "diverged" and metrics["best_epoch"] == 1 and len(metrics["epochs"]) == 1
    # The predictions are exactly those of a clean one-epoch run with the same seed.
    assert (tmp_path / "p.npy").read_bytes() == _one_clean_epoch(tmp_path)


def test_validation_loss_turning_nan_after_a_good_epoch(tmp_path: Path, built: list[T.CharModel]) -> None:
    rep = Poisoner(built, "batch", 2, 8)  # the demo set has 8 batches of 64
    code = T.run("mlp", {**COMMON, "epochs": 4, "output_file": str(tmp_path / "p.npy"),
                         "metrics_file": str(tmp_path / "m.json")}, rep)
    assert code == T.EXIT_OK
    assert any("validation loss became nan after epoch 2" in w for w in rep.warnings), rep.warnings
    metrics = _strict_json(tmp_path / "m.json")  # NaN is written as null, not as the non-JSON NaN
    assert [e["valid_loss"] is None for e in metrics["epochs"]] == [False, True]
    assert metrics["stopped"] == "diverged" and metrics["best_epoch"] == 1
    assert (tmp_path / "p.npy").read_bytes() == _one_clean_epoch(tmp_path)


def test_no_epoch_with_a_finite_validation_loss_writes_nothing(tmp_path: Path, built: list[T.CharModel],
                                                                previous: Path) -> None:
    rep = Poisoner(built, "batch", 1, 8)
    code = T.run("mlp", {**COMMON, "epochs": 4, "output_file": str(tmp_path / "p.npy"),
                         "metrics_file": str(tmp_path / "m.json")}, rep)
    assert code == T.EXIT_FAILED
    assert any("no epoch reached a finite validation loss" in w and "nothing was written" in w
               for w in rep.warnings), rep.warnings
    untouched(tmp_path)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.subprocess
def test_ctrl_c_result_is_exactly_the_best_epoch_of_a_clean_run(tmp_path: Path) -> None:
    """The real thing: SIGINT to a CLI process; what it writes is what a clean run of the best epoch writes."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["lstm", "--epochs", "50", "--num_hid", "8", "--batch_size", "16", "--init_lr", "0.1"]
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args, "--output_file", "p.npy", "--metrics_file",
                             "m.json", "--save_model", "m.npz"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = []
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if line.startswith("epoch"):
                break
        assert proc.poll() is None, f"the run ended before it could be interrupted: {seen}"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert "interrupted" in err and "Ctrl-C" in err and "best epoch" in err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["stopped"] == "interrupted"
    assert 1 <= len(metrics["epochs"]) < 50 and metrics["best_epoch"] in [e["epoch"] for e in metrics["epochs"]]
    clean = tmp_path / "clean"
    clean.mkdir()
    done = subprocess.run([sys.executable, "-m", "cli", *args, "--epochs", str(metrics["best_epoch"]),
                           "--output_file", "p.npy", "--save_model", "m.npz"], cwd=clean, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p.npy").read_bytes() == (clean / "p.npy").read_bytes()
    saved, want = _read_npz(tmp_path / "m.npz"), _read_npz(clean / "m.npz")
    assert saved.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(saved[name], want[name], err_msg=name)


class CtrlC(Poisoner):
    """A reporter that presses Ctrl-C ``times`` times during batch ``batch`` of epoch ``epoch``.

    A real SIGINT to this process, handled by the run's own handler: ``signal.raise_signal``
    runs the Python handler before it returns, so two presses are two separate events.
    """

    def __init__(self, epoch: int, batch: int, times: int = 1) -> None:
        super().__init__([])
        self.at, self.times = (epoch, batch), times
        self.batches: list[tuple[int, int]] = []

    def batch(self, epoch: int, k: int, loss: float) -> None:
        self.batches.append((epoch, k))
        if (epoch, k) == self.at:
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)


@pytest.fixture
def main_thread() -> None:
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT handlers can only be installed from the main thread")


def _outputs(tmp_path: Path) -> dict[str, str]:
    return {"output_file": str(tmp_path / "p.npy"), "metrics_file": str(tmp_path / "m.json"),
            "save_model": str(tmp_path / "m.npz")}


def test_ctrl_c_before_any_epoch_finished_writes_nothing(tmp_path: Path, previous: Path, main_thread: None) -> None:
    rep = CtrlC(1, 2)
    assert T.run("mlp", {**COMMON, "epochs": 3, **_outputs(tmp_path)}, rep) == T.EXIT_INTERRUPTED
    assert rep.batches == [(1, 1), (1, 2)]  # training stopped after the batch Ctrl-C came in
    assert any("interrupted during epoch 1" in w for w in rep.warnings), rep.warnings
    assert any("no epoch completed" in w and "nothing was written" in w for w in rep.warnings), rep.warnings
    untouched(tmp_path)
    assert not (tmp_path / "m.npz").exists()


def test_ctrl_c_during_a_later_epoch_writes_the_best_epoch_and_its_model(tmp_path: Path, main_thread: None) -> None:
    rep = CtrlC(3, 2)
    assert T.run("mlp", {**COMMON, "epochs": 6, **_outputs(tmp_path)}, rep) == T.EXIT_INTERRUPTED
    assert rep.batches[-1] == (3, 2)
    assert any("stopped by Ctrl-C" in w and "exit code 130" in w for w in rep.warnings), rep.warnings
    metrics = _strict_json(tmp_path / "m.json")
    assert metrics["stopped"] == "interrupted" and [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    best = metrics["best_epoch"]
    assert best in (1, 2)
    clean = tmp_path / "clean"
    clean.mkdir()
    assert T.run("mlp", {**COMMON, "epochs": best, **_outputs(clean)}, Poisoner([])) == T.EXIT_OK
    assert (tmp_path / "p.npy").read_bytes() == (clean / "p.npy").read_bytes()
    saved, want = _read_npz(tmp_path / "m.npz"), _read_npz(clean / "m.npz")
    assert saved.keys() == want.keys() and {"param/W1", "param/b1", "param/W2", "param/b2"} <= saved.keys()
    for name in want:
        np.testing.assert_array_equal(saved[name], want[name], err_msg=name)
    assert metrics["test_loss"] == _strict_json(clean / "m.json")["test_loss"]


@pytest.mark.parametrize("entry", ["symdiff mlp", "python -m models.mlp"])
def test_a_second_ctrl_c_stops_at_once_and_writes_nothing(tmp_path: Path, previous: Path, main_thread: None,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], entry: str) -> None:
    """Epoch 1 finished, so one Ctrl-C would write its results (above); a second one stops there and then."""
    rep = CtrlC(2, 3, times=2)
    if entry == "symdiff mlp":
        import cli

        monkeypatch.setattr(T.PlainReporter, "batch", lambda self, epoch, k, loss: rep.batch(epoch, k, loss))
        code = cli.main(["mlp", "--dataset", "demo", "--epochs", "4", "--num_hid", "8", "--output_file",
                         str(tmp_path / "p.npy"), "--metrics_file", str(tmp_path / "m.json"),
                         "--save_model", str(tmp_path / "m.npz")])
    else:
        code = T.run_main("mlp", {**COMMON, "epochs": 4, **_outputs(tmp_path)}, rep)
    assert code == T.EXIT_INTERRUPTED
    assert rep.batches[-1] == (2, 3)
    err = capsys.readouterr().err
    assert "interrupted: stopped at once" in err and "Traceback" not in err, err
    untouched(tmp_path)
    assert not (tmp_path / "m.npz").exists()


WRITER = """
import sys
import numpy as np
from models.storage import save_npy
path, first = sys.argv[1], int(sys.argv[2])
a = np.empty(1_000_000)
print("ready", flush=True)
k = first
while True:
    a.fill(k)
    save_npy(path, a)
    k += 1
"""


@pytest.mark.subprocess
def test_kill_9_during_writes_never_leaves_a_truncated_file(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    dest = tmp_path / "big.npy"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(1234)
    previous: float | None = None
    for round_ in range(6):
        first = (round_ + 1) * 1_000_000
        proc = subprocess.Popen([sys.executable, str(script), str(dest), str(first)], env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        if not dest.exists():
            assert previous is None, "a kill -9 removed the previous result"
            continue
        arr = np.load(dest, allow_pickle=False)  # raises if truncated
        assert arr.shape == (1_000_000,) and arr.dtype == np.float64
        value = float(arr[0])
        assert (arr == value).all(), "a file mixes two writes"
        assert value == previous or value >= first, (value, previous, first)
        previous = value
    assert previous is not None, "no write finished in any round: the test proved nothing"
    # at worst a stray temporary is left: beside the destination, named .big.npy.*.tmp; nothing else
    strays = {p.name for p in tmp_path.iterdir()} - {script.name, dest.name}
    assert all(re.fullmatch(r"\.big\.npy\..+\.tmp", name) for name in strays), strays


def test_every_write_goes_through_a_hidden_temporary_beside_the_destination(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What a kill -9 can leave behind is named by the temporary: `.NAME.*.tmp`, in the same folder (so the
    rename is atomic, on one file system), never a name a reader could take for a result."""
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def recorded(src: str, dst: str) -> None:
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recorded)
    writers = {"p.npy": lambda p: storage.save_npy(p, np.zeros(3)), "m.json": lambda p: storage.save_json(p, {}),
               "m.npz": lambda p: storage.save_npz(p, {"a": np.zeros(2)}), "raw": lambda p: storage.save_bytes(p, b"x")}
    for name, write in writers.items():
        write(tmp_path / name)
    assert [dst for _, dst in renames] == [tmp_path / name for name in writers]
    for src, dst in renames:
        assert src.parent == dst.parent and re.fullmatch(rf"\.{re.escape(dst.name)}\..+\.tmp", src.name), src
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "p.npy"
    dest.write_bytes(KEEP)
    with pytest.raises(ValueError):
        storage.save_npy(dest, np.array([object()], dtype=object))  # allow_pickle=False refuses
    assert dest.read_bytes() == KEEP
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npy"]


def test_written_files_get_ordinary_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        storage.save_json(tmp_path / "new.json", {"a": 1})
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
        (tmp_path / "old.npy").write_bytes(KEEP)
        (tmp_path / "old.npy").chmod(0o640)
        storage.save_npy(tmp_path / "old.npy", np.zeros(3))
        assert (tmp_path / "old.npy").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
