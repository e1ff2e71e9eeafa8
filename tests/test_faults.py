"""Real write faults, no mocks of ``open``: a full disk (a small tmpfs, filled), a folder made
read-only during training (the tmpfs remounted ``ro``: root ignores permission bits, not a
read-only mount), a folder deleted during training, and a kernel cache on a full or
read-only disk.

Every output that fails is one line (the file, the OS's reason, whether the previous file is
unchanged), no temporary file is left, the other outputs are still written, exit code 1.
Mounting needs root on Linux; those tests skip, saying so, where ``mount`` is refused.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from models import storage
from models import training as T

REPO = Path(__file__).resolve().parents[1]
OLD_PREDICTIONS = b"previous predictions, must survive\n"
OLD_MODEL = b"previous model, must survive\n"
COMMON = {"epochs": 2, "num_hid": 8, "dataset": "demo"}


# ---- real faults ----------------------------------------------------------------------------
class Mount:
    """A tmpfs of ``size`` mounted at ``path`` for one test."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fill(self, leave: int = 0) -> None:
        """Take every free byte but ``leave``: the next file written here gets ENOSPC (after
        ``leave`` bytes of it are written, if any: a short write)."""
        with open(self.path / "filler", "wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
            fh.truncate(max(fh.tell() - leave, 0))

    def read_only(self) -> None:
        _mount("-o", "remount,ro", str(self.path))

    def stray_files(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name.endswith(".tmp"))


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(done.stderr.strip() or f"mount exited {done.returncode}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Mount]]:
    """``tmpfs("64k")`` mounts a fresh tmpfs of that size; all are unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str) -> Mount:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        try:
            _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where))
        except OSError as exc:
            pytest.skip(f"cannot mount a tmpfs here (needs root on Linux): {exc}")
        mounted.append(where)
        return Mount(where)

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


class FaultAfterEpoch:
    """A reporter that runs ``fault()`` once the first epoch is scored: a fault during training."""

    def __init__(self, fault: Callable[[], None], at: int = 1) -> None:
        self.fault, self.at = fault, at
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.infos: list[str] = []
        self.summary: dict[str, Any] = {}

    def start(self, *a: Any) -> None: ...
    def batch(self, *a: Any) -> None: ...
    def info(self, text: str) -> None: self.infos.append(text)
    def warn(self, text: str) -> None: self.warnings.append(text)
    def error(self, text: str) -> None: self.errors.append(text)
    def finish(self, summary: dict[str, Any]) -> None: self.summary = summary

    def epoch(self, r: T.EpochResult) -> None:
        if r.epoch == self.at:
            self.fault()


def one_line(text: str) -> str:
    assert text and "\n" not in text.strip(), text
    return text


def symdiff(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# ---- training outputs -----------------------------------------------------------------------
@pytest.mark.subprocess
def test_a_full_disk_is_one_line_per_output_and_the_metrics_are_still_written(tmp_path: Path, tmpfs) -> None:
    disk = tmpfs("64k")
    (disk.path / "out.npy").write_bytes(OLD_PREDICTIONS)
    (disk.path / "m.npz").write_bytes(OLD_MODEL)
    disk.fill()
    proc = symdiff(tmp_path, "mlp", "--epochs", "1", "--num_hid", "8", "--output_file", str(disk.path / "out.npy"),
                   "--save_model", str(disk.path / "m.npz"), "--metrics_file", "m.json")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and len(proc.stderr.splitlines()) == 2, proc.stderr
    pred, model = errors
    assert pred.startswith(f"error: predictions (--output_file) not written: {disk.path / 'out.npy'}: "
                           "No space left on device (ENOSPC); the previous out.npy is unchanged"), pred
    assert pred.endswith("; the metrics went to m.json"), pred
    assert model.startswith(f"error: model (--save_model) not written: {disk.path / 'm.npz'}: No space left on "
                            "device (ENOSPC); the previous m.npz is unchanged"), model
    assert (disk.path / "out.npy").read_bytes() == OLD_PREDICTIONS
    assert (disk.path / "m.npz").read_bytes() == OLD_MODEL
    assert disk.stray_files() == []
    metrics = (tmp_path / "m.json").read_text()
    assert '"best_epoch": 1' in metrics
    assert "metrics: m.json" in proc.stdout and "predictions:" not in proc.stdout


@pytest.mark.subprocess
def test_a_folder_made_read_only_during_training(tmp_path: Path, tmpfs) -> None:
    disk = tmpfs("1m")
    (disk.path / "p.npy").write_bytes(OLD_PREDICTIONS)
    (disk.path / "m.npz").write_bytes(OLD_MODEL)
    rep = FaultAfterEpoch(disk.read_only)
    code = T.run("mlp", {**COMMON, "output_file": str(disk.path / "p.npy"), "save_model": str(disk.path / "m.npz"),
                         "metrics_file": str(tmp_path / "m.json")}, rep)
    assert code == T.EXIT_FAILED
    assert len(rep.errors) == 2, rep.errors
    for line, name in zip(rep.errors, ("p.npy", "m.npz")):
        assert f"{disk.path / name}: Read-only file system (EROFS); the previous {name} is unchanged" in one_line(line)
    assert f"the metrics went to {tmp_path / 'm.json'}" in rep.errors[0]
    assert (disk.path / "p.npy").read_bytes() == OLD_PREDICTIONS
    assert (disk.path / "m.npz").read_bytes() == OLD_MODEL
    assert disk.stray_files() == []
    assert rep.summary["metrics"] == str(tmp_path / "m.json") and (tmp_path / "m.json").is_file()
    assert "predictions" not in rep.summary and "model" not in rep.summary


def test_a_folder_deleted_during_training(tmp_path: Path) -> None:
    gone, kept = tmp_path / "gone", tmp_path / "kept"
    gone.mkdir(), kept.mkdir()
    (gone / "p.npy").write_bytes(OLD_PREDICTIONS)

    def delete() -> None:
        (gone / "p.npy").unlink()
        gone.rmdir()

    rep = FaultAfterEpoch(delete)
    code = T.run("mlp", {**COMMON, "output_file": str(gone / "p.npy"), "save_model": str(kept / "m.npz"),
                         "metrics_file": str(kept / "m.json")}, rep)
    assert code == T.EXIT_FAILED
    [line] = rep.errors
    assert one_line(line) == (f"predictions (--output_file) not written: {gone / 'p.npy'}: No such file or "
                              f"directory (ENOENT); the folder {gone} no longer exists; the metrics went "
                              f"to {kept / 'm.json'} and the model to {kept / 'm.npz'}"), line
    assert not gone.exists()
    model, _ = T.load_model(kept / "m.npz")  # the model is complete and usable
    assert sorted(p.name for p in kept.iterdir()) == ["m.json", "m.npz"]


def test_a_checkpoint_on_a_full_disk_is_one_line_training_goes_on_and_the_last_good_one_is_kept(
        tmp_path: Path, tmpfs) -> None:
    disk = tmpfs("1m")
    ckpt = disk.path / "run.npz"
    rep = FaultAfterEpoch(disk.fill, at=2)  # epoch 1's checkpoint is written, epochs 2 and 3 find the disk full
    code = T.run("mlp", {**COMMON, "epochs": 3, "checkpoint": str(ckpt), "output_file": str(tmp_path / "p.npy"),
                         "metrics_file": str(tmp_path / "m.json")}, rep)
    assert code == T.EXIT_FAILED
    first, last = rep.errors
    assert one_line(first).startswith(f"checkpoint (--checkpoint) not written after epoch 2: {ckpt}: No space left "
                                      "on device (ENOSPC); the previous run.npz is unchanged"), first
    assert one_line(last) == f"checkpoint (--checkpoint): 2 epoch(s) could not be saved; {ckpt} holds epoch 1", last
    assert disk.stray_files() == []
    assert np.load(tmp_path / "p.npy").shape[1] == 5 and (tmp_path / "m.json").is_file()  # the results are kept
    epochs = json.loads((tmp_path / "m.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]  # training went on after the first failure
    with np.load(ckpt) as files:  # the file on disk is epoch 1's complete checkpoint
        assert json.loads(str(files["meta/checkpoint"]))["epoch"] == 1


def test_nothing_fails_nothing_is_said(tmp_path: Path) -> None:
    rep = FaultAfterEpoch(lambda: None)
    code = T.run("mlp", {**COMMON, "output_file": str(tmp_path / "p.npy"), "save_model": str(tmp_path / "m.npz")}, rep)
    assert code == T.EXIT_OK and rep.errors == []
    assert rep.summary["predictions"] == str(tmp_path / "p.npy") and rep.summary["model"] == str(tmp_path / "m.npz")


# ---- the atomic writer itself ---------------------------------------------------------------
@pytest.mark.subprocess
@pytest.mark.parametrize("save,name,leave", [
    (lambda p: storage.save_npy(p, np.zeros(100_000)), "a.npy", 0),
    # room for part of it: numpy's own tofile() would fail with "1500 requested and 496 written",
    # no reason given (what the issue saw); the OS's ENOSPC must come through instead
    (lambda p: storage.save_npy(p, np.zeros(1500)), "a.npy", 8192),
    (lambda p: storage.save_npz(p, {"a": np.zeros(100_000)}), "a.npz", 8192),
    (lambda p: storage.save_json(p, {"a": list(range(30_000))}), "a.json", 8192),
    (lambda p: storage.save_bytes(p, b"x" * 800_000), "a.bin", 0),
])
def test_every_writer_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmpfs, save, name, leave) -> None:
    disk = tmpfs("256k")
    (disk.path / name).write_bytes(b"old")
    disk.fill(leave)
    with pytest.raises(storage.OutputWriteError) as caught:
        save(disk.path / name)
    assert caught.value.errno == errno.ENOSPC  # still an OSError, with the OS's errno
    assert one_line(str(caught.value)) == (f"{disk.path / name}: No space left on device (ENOSPC); "
                                           f"the previous {name} is unchanged")
    assert (disk.path / name).read_bytes() == b"old"
    assert disk.stray_files() == []


@pytest.mark.subprocess
def test_a_new_file_that_cannot_be_written_says_no_file_was_written(tmpfs) -> None:
    disk = tmpfs("64k")
    disk.read_only()
    with pytest.raises(storage.OutputWriteError) as caught:
        storage.save_npy(disk.path / "new.npy", np.zeros(3))
    assert str(caught.value) == f"{disk.path / 'new.npy'}: Read-only file system (EROFS); no file was written"
    assert list(disk.path.iterdir()) == []


# ---- the kernel cache -----------------------------------------------------------------------
def _cache_with_dispatcher_only(tmpfs) -> tuple[Mount, dict[str, str]]:
    """A cache that holds the compiled dispatcher but has no room (or no right) for any kernel."""
    from symdiff import native

    if not native.enabled():
        pytest.skip(f"native kernels unavailable here: {native.status()}")
    disk = tmpfs("2m")
    env = {"SYMDIFF_CACHE": str(disk.path / "cache")}
    done = subprocess.run([sys.executable, "-c", "from symdiff import native; print(native.status())"],
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True)
    assert done.stdout.startswith("on"), done
    return disk, env


@pytest.mark.subprocess
@pytest.mark.parametrize("fault,reason", [("fill", "No space left on device"),
                                          ("read_only", "Read-only file system")])
def test_kernels_that_cannot_be_cached_are_not_claimed(tmp_path: Path, tmpfs, fault: str, reason: str) -> None:
    disk, env = _cache_with_dispatcher_only(tmpfs)
    getattr(disk, fault)()
    # default sizes: the first training batch is big enough to build the kernels, before the engine line
    proc = symdiff(tmp_path, "lstm", "--epochs", "1", "--output_file", "o.npy", env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    [engine] = [line for line in proc.stdout.splitlines() if line.startswith("engine:")]
    assert engine.startswith("engine: fused, numpy kernels, compiled kernels could not be built: cannot write to "
                             f"the kernel cache {disk.path / 'cache'}: {reason} (passes:"), engine
    assert "compiled C kernels" not in engine
    assert sorted(p.name for p in (disk.path / "cache").iterdir())[0].startswith("dispatch-")
    assert len(list((disk.path / "cache").iterdir())) == 1  # no half-built kernel or temporary folder


@pytest.mark.subprocess
def test_a_kernel_that_falls_back_after_the_engine_line_says_so_then(tmp_path: Path, tmpfs) -> None:
    # batch size 1 and 3 validation rows: every array before the test split is too small to be worth
    # compiling, so the first kernel build (and its failure) happens at the test predictions
    disk, env = _cache_with_dispatcher_only(tmpfs)
    disk.fill()
    demo = REPO / "data" / "demo"
    for split, rows in (("train", None), ("valid", 3), ("test", None)):
        lines = Path(f"{demo}.{split}").read_text().splitlines(keepends=True)
        (tmp_path / f"d.{split}").write_text("".join(lines[:rows]))
    proc = symdiff(tmp_path, "lstm", "--epochs", "1", "--num_hid", "8", "--batch_size", "1", "--dataset", "d",
                   "--output_file", "o.npy", env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "engine: fused, compiled C kernels" in proc.stdout  # true then: nothing had been built yet
    warnings = [line for line in proc.stderr.splitlines() if "compiled kernel" in line]
    assert warnings == [f"warning: a compiled kernel could not be built (cannot write to the kernel cache "
                        f"{disk.path / 'cache'}: No space left on device); it runs with numpy kernels from now on "
                        f"(same results, slower)"], proc.stderr
    assert (tmp_path / "o.npy").is_file()


# ---- experiment outputs ---------------------------------------------------------------------
@pytest.mark.subprocess
def test_experiment_files_on_a_full_disk_one_line_each_the_rest_written(tmp_path: Path, tmpfs) -> None:
    from models import experiments as X

    disk = tmpfs("128k")
    (disk.path / "init.json").write_bytes(b"previous init results\n")
    disk.fill(leave=8192)  # room for the small CSV, not for the JSON (17 KB) or the figure (49 KB)
    proc = symdiff(tmp_path, "experiment", "init", "--draws", "200", "--out", str(disk.path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = proc.stderr.splitlines()
    expected = [f"symdiff experiment: error: not written: {disk.path / 'init.json'}: No space left on device "
                "(ENOSPC); the previous init.json is unchanged"]
    if X.plots_available():
        expected.append(f"symdiff experiment: error: not written: {disk.path / 'init_preactivation.png'}: No space "
                        "left on device (ENOSPC); no file was written")
    assert errors == expected, proc.stderr
    assert f"init: data written to {disk.path / 'init.csv'} (" in proc.stdout
    assert (disk.path / "init.json").read_bytes() == b"previous init results\n"
    assert (disk.path / "init.csv").read_text().startswith("case,")
    assert disk.stray_files() == []


@pytest.mark.subprocess
def test_the_report_is_written_when_its_figures_cannot_be(tmp_path: Path, tmpfs) -> None:
    from models import experiments as X

    if not X.plots_available():
        pytest.skip("matplotlib is not installed (pip install -e '.[plots]'): no figures to fail")
    disk = tmpfs("1m")
    data = X.run("init", draws=200)
    X.save("init", data, disk.path)
    old = {p.name: p.read_bytes() for p in disk.path.iterdir()}
    disk.read_only()
    with pytest.raises(X.OutputsNotWritten) as caught:
        X.write_report(disk.path, tmp_path / "report.md")
    assert caught.value.written == [tmp_path / "report.md"] and (tmp_path / "report.md").is_file()
    assert caught.value.lines == [f"not written: {disk.path / 'init_preactivation.png'}: Read-only file system "
                                  "(EROFS); no file was written"]
    assert {p.name: p.read_bytes() for p in disk.path.iterdir()} == old  # nothing changed, no temporary


# ---- evaluate and plot: one file each -------------------------------------------------------
@pytest.mark.subprocess
def test_evaluate_and_plot_on_a_full_disk_one_line_exit_1(tmp_path: Path, tmpfs) -> None:
    trained = symdiff(tmp_path, "mlp", "--epochs", "1", "--num_hid", "8", "--save_model", "m.npz",
                      "--metrics_file", "m.json", "--output_file", "o.npy")
    assert trained.returncode == 0, trained.stderr
    disk = tmpfs("128k")
    (disk.path / "ev.json").write_bytes(b"previous scores\n")
    (disk.path / "c.png").write_bytes(b"previous figure\n")
    disk.fill()
    commands = [(("evaluate", "--model", "m.npz", "--dataset", "demo", "--metrics_file", str(disk.path / "ev.json")),
                 f"symdiff evaluate: error: metrics (--metrics_file) not written: {disk.path / 'ev.json'}: No space "
                 "left on device (ENOSPC); the previous ev.json is unchanged")]
    if _has_matplotlib():
        commands.append((("plot", "m.json", "--out", str(disk.path / "c.png")),
                         f"symdiff plot: error: figure (--out) not written: {disk.path / 'c.png'}: No space left on "
                         "device (ENOSPC); the previous c.png is unchanged"))
    for args, line in commands:
        proc = symdiff(tmp_path, *args)
        assert proc.returncode == 1 and proc.stderr.splitlines() == [line], proc.stderr
    assert (disk.path / "ev.json").read_bytes() == b"previous scores\n"
    assert (disk.path / "c.png").read_bytes() == b"previous figure\n"
    assert disk.stray_files() == []


def _has_matplotlib() -> bool:
    from models import experiments as X

    return X.plots_available()


def test_tune_figures_on_a_full_disk_are_one_line_each_and_exit_1(tmpfs) -> None:
    optuna = pytest.importorskip("optuna", reason="symdiff tune's figures need the tune extra")
    pytest.importorskip("matplotlib", reason="the figures need the plots extra")
    from models import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s")
    study.optimize(lambda t: (t.suggest_float("lr", 1e-3, 1.0, log=True) - 0.1) ** 2 + t.suggest_int("h", 1, 9),
                   n_trials=4)
    disk = tmpfs("64k")
    (disk.path / "s-history.png").write_bytes(OLD_MODEL)
    disk.fill()
    written, notes, failures = tune.write_figures(study, disk.path)
    assert written == [] and notes == []
    assert len(failures) == 2, failures
    assert one_line(failures[0]).startswith(f"history figure (--out) not written: {disk.path / 's-history.png'}: "
                                            "No space left on device (ENOSPC); the previous s-history.png is unchanged")
    assert "importances figure (--out) not written" in one_line(failures[1])
    assert (disk.path / "s-history.png").read_bytes() == OLD_MODEL and disk.stray_files() == []
