"""Runs that survive preemption: SIGTERM is handled like Ctrl-C (exit 143), and ``--checkpoint``
resumes a stopped run so that it ends with the same numbers, bit for bit, as a run never stopped.

Stops are real where it matters: SIGTERM delivered to the process (in-process and to a CLI
subprocess), ``kill -9`` of a subprocess in the middle of an epoch and in the middle of writing the
checkpoint. In-process "kills" raise out of the loop, which writes nothing more than a real kill.
Everything runs on the shipped demo set with small models (a few seconds in all).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import training as T

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4


class Killed(Exception):
    """Raised by the test reporter to stop the run dead, as kill -9 would (no outputs are written)."""


class Stopper(T.PlainReporter):
    """Does something at one batch: ``kill`` (raise Killed) or ``term`` (a real SIGTERM to ourselves)."""

    def __init__(self, at: tuple[int, int] | None = None, action: str = "kill") -> None:
        super().__init__(stream=io.StringIO())
        self.at, self.action = at, action

    def batch(self, epoch: int, k: int, loss: float) -> None:
        if (epoch, k) == self.at:
            self.at = None
            if self.action == "kill":
                raise Killed
            os.kill(os.getpid(), signal.SIGTERM)


def params(tmp: Path, name: str, **extra: Any) -> dict[str, Any]:
    base = dict(dataset="demo", epochs=EPOCHS, num_hid=16, max_len=8, batch_size=64, seed=3,
                output_file=str(tmp / f"{name}.npy"), metrics_file=str(tmp / f"{name}.json"),
                checkpoint=str(tmp / f"{name}.ckpt.npz"))
    return {**base, **extra}


def arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if not k.startswith("meta/")}


def assert_same_run(tmp: Path, a: str, b: str) -> None:
    """Final checkpoint arrays (parameters, best parameters, optimizer and schedule state) and
    predictions equal bit for bit; the metrics' per-epoch losses equal too."""
    x, y = arrays(tmp / f"{a}.ckpt.npz"), arrays(tmp / f"{b}.ckpt.npz")
    assert sorted(x) == sorted(y)
    assert any(k.startswith("optimizer/") for k in x)
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k
    assert (tmp / f"{a}.npy").read_bytes() == (tmp / f"{b}.npy").read_bytes()
    ma, mb = (json.loads((tmp / f"{n}.json").read_text()) for n in (a, b))
    assert [e["valid_loss"] for e in ma["epochs"]] == [e["valid_loss"] for e in mb["epochs"]]
    assert len(ma["epochs"]) == EPOCHS and ma["stopped"] is None and mb["stopped"] is None


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("optimizer", "average"), [("sgd", None), ("adam", None), ("adam", 0.9)])
def test_resume_after_kill_and_sigterm_is_bit_identical(tmp_path: Path, dtype: str, optimizer: str,
                                                        average: float | None) -> None:
    """Also with --average: the weights' moving average is part of the optimizer state saved."""
    kw = dict(dtype=dtype, optimizer=optimizer, init_lr=0.01 if optimizer == "adam" else 0.2,
              schedule="plateau" if optimizer == "adam" else "cosine", average=average)
    assert T.run("mlp", params(tmp_path, "ref", **kw), Stopper()) == 0

    # killed mid-epoch 2, then resumed (from the end of epoch 1) to the end
    with pytest.raises(Killed):
        T.run("mlp", params(tmp_path, "k", **kw), Stopper(at=(2, 3)))
    assert not (tmp_path / "k.npy").exists()
    assert T.run("mlp", params(tmp_path, "k", **kw), Stopper()) == 0
    assert_same_run(tmp_path, "ref", "k")

    # SIGTERM mid-epoch 3: outputs of the best epoch so far, exit 143; resumed to the end
    assert T.run("mlp", params(tmp_path, "t", **kw), Stopper(at=(3, 2), action="term")) == 143
    stopped = json.loads((tmp_path / "t.json").read_text())
    assert stopped["stopped"] == "terminated" and len(stopped["epochs"]) == 2
    assert np.load(tmp_path / "t.npy").shape == (150, 5)
    assert T.run("mlp", params(tmp_path, "t", **kw), Stopper()) == 0
    assert_same_run(tmp_path, "ref", "t")


def test_a_planted_fault_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: resuming without the optimizer's state gives other numbers."""
    kw = dict(optimizer="adam", init_lr=0.01)
    T.run("mlp", params(tmp_path, "ref", **kw), Stopper())
    with pytest.raises(Killed):
        T.run("mlp", params(tmp_path, "k", **kw), Stopper(at=(2, 1)))
    from symdiff import optim

    monkeypatch.setattr(optim.Optimizer, "load_state_dict", lambda self, state: None)
    T.run("mlp", params(tmp_path, "k", **kw), Stopper())
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path, "ref", "k")


def test_checkpoint_of_another_configuration_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    T.run("mlp", params(tmp_path, "a", epochs=1), Stopper())
    ckpt = params(tmp_path, "a")["checkpoint"]
    before = Path(ckpt).read_bytes()
    for kind, change, word in (("mlp", {"num_hid": 17}, "num_hid=16"), ("mlp", {"optimizer": "adam"}, "optimizer"),
                               ("lstm", {}, "model='mlp'"), ("mlp", {"dataset": str(REPO / "data" / "demo")}, None)):
        p = params(tmp_path, "b", epochs=1, checkpoint=ckpt, **change)
        if word is None:  # the same data under another spelling of its path is the same data
            assert T.run(kind, p, Stopper()) == 0
            continue
        assert T.run_main(kind, p, Stopper()) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and word in err and "--checkpoint" in err, err
        assert not (tmp_path / "b.npy").exists()
    assert Path(ckpt).read_bytes() == before
    Path(ckpt).write_bytes(b"not an archive")
    assert T.run_main("mlp", params(tmp_path, "b", epochs=1, checkpoint=ckpt), Stopper()) == 2
    assert "not a symdiff checkpoint" in capsys.readouterr().err


# ---- real processes ---------------------------------------------------------------------------
def cli(tmp: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli", "lstm", "--dataset", "demo", "--num_hid", "8", "--max_len", "6",
            "--optimizer", "adam", "--init_lr", "0.01", "--dtype", "float32", "--seed", "1",
            "--output_file", str(tmp / f"{name}.npy"), "--metrics_file", str(tmp / f"{name}.json"),
            "--checkpoint", str(tmp / f"{name}.ckpt.npz"), *extra]


ENV = {**os.environ, "PYTHONPATH": str(REPO)}

# Runs the CLI in a child process that SIGKILLs itself at a chosen point: in the middle of an epoch
# (at a batch), or in the middle of writing the checkpoint (the temporary file written and flushed,
# not yet renamed over the old one).
KILLER = textwrap.dedent("""
    import os, signal, sys
    import cli
    from models import storage, training
    where, epoch, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if where == "batch":
        real_batch = training.PlainReporter.batch
        def batch_hook(self, e, k, loss):
            if (e, k) == (epoch, batch):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_batch(self, e, k, loss)
        training.PlainReporter.batch = batch_hook
    else:
        real_fsync, writes = os.fsync, []
        def fsync_hook(fd):
            real_fsync(fd)
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and ".ckpt.npz." in os.readlink(f"/proc/self/fd/{fd}"):
                writes.append(fd)
                if len(writes) == epoch:
                    os.kill(os.getpid(), signal.SIGKILL)
        storage.os.fsync = fsync_hook
    sys.exit(cli.main(sys.argv[4:]))
""")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLI run never stopped (shared by the kill -9 tests)."""
    folder = tmp_path_factory.mktemp("ref")
    ref = subprocess.run(cli(folder, "ref", "--epochs", str(EPOCHS)), cwd=folder, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    return folder


@pytest.mark.subprocess
@pytest.mark.parametrize("where", ["batch", "write"])
def test_kill_9_then_resume_is_bit_identical(tmp_path: Path, where: str, uninterrupted: Path) -> None:
    for f in uninterrupted.glob("ref.*"):
        shutil.copy(f, tmp_path / f.name)
    argv = cli(tmp_path, "k", "--epochs", str(EPOCHS))
    killed = subprocess.run([sys.executable, "-c", KILLER, where, "3", "2", *argv[3:]], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "k.npy").exists()
    if where == "write":  # killed while writing epoch 3's checkpoint: epoch 2's is intact, a .tmp is left
        assert list(tmp_path.glob(".k.ckpt.npz.*.tmp"))
    with np.load(tmp_path / "k.ckpt.npz") as z:
        assert json.loads(str(z["meta/checkpoint"]))["epoch"] == 2
    resumed = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert_same_run(tmp_path, "ref", "k")


@pytest.mark.subprocess
def test_sigterm_to_the_cli_writes_the_best_epoch_and_exits_143(tmp_path: Path) -> None:
    """The issue's scenario: a scheduler sends SIGTERM to a long run after a few epochs."""
    proc = subprocess.Popen(cli(tmp_path, "s", "--epochs", "400"), cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch   2"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    metrics = json.loads((tmp_path / "s.json").read_text())
    assert metrics["stopped"] == "terminated" and 2 <= len(metrics["epochs"]) < 400
    assert np.load(tmp_path / "s.npy").shape == (150, 5)
    assert "SIGTERM" in err and "exit code 143" in err


def test_a_finished_checkpoint_goes_with_what_a_killed_writer_left(tmp_path: Path) -> None:
    """A worker killed by SIGKILL while writing its checkpoint leaves `.NAME.*.tmp` beside it (the
    PostgreSQL tune test caught one): when the run is over, both go; other files stay."""
    from models.storage import remove_output

    ck = tmp_path / "run[1].npz"  # glob characters in the name are taken literally
    ck.write_bytes(b"x")
    strays = [tmp_path / ".run[1].npz.ab12cd.tmp", tmp_path / ".run[1].npz.zz99.tmp"]
    others = [tmp_path / ".run1.npz.ab12cd.tmp", tmp_path / ".other.npz.ab12cd.tmp", tmp_path / "run[1].npz.bak"]
    for p in strays + others:
        p.write_bytes(b"half")
    remove_output(ck)
    assert not ck.exists() and not any(p.exists() for p in strays)
    assert all(p.exists() for p in others)
    remove_output(ck)  # nothing left to remove: no error
