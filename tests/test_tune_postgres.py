"""`symdiff tune` on a real PostgreSQL: a throwaway cluster on the loopback address, two workers,
one of them killed with kill -9 in the middle of a trial; its trial is failed once its heartbeat is
stale, retried by the other worker, and continues from the dead worker's checkpoint.

The cluster runs as the `postgres` user when the tests run as root (initdb and postgres refuse
root). Without PostgreSQL (Debian's `postgresql` package; .ci/run installs it) the test is skipped,
and the reason is printed in pytest's summary.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

optuna = pytest.importorskip("optuna", reason="Optuna (the `tune` extra) is not installed: pip install -e '.[tune]'")
pytest.importorskip("psycopg", reason="psycopg (in the `tune` extra) is not installed: pip install -e '.[tune]'")

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
PASSWORD = "s3cret-pw"  # trust authentication ignores it; it is here to prove it is never shown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not bins:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); "
                    "install Debian's postgresql package (.ci/run does) to run this test")
    bindir = Path(bins[-1]).parent
    run_as: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="symdiff-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = folder / "data"
    init = subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                          capture_output=True, text=True)
    if init.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed, PostgreSQL cannot be had here: {init.stderr.strip()[-300:]}")
    ctl = [*run_as, str(bindir / "pg_ctl"), "-D", str(data)]
    start = subprocess.run([*ctl, "-o", f"-k {folder} -c listen_addresses=127.0.0.1 -p {port}",
                            "-l", str(folder / "log"), "-w", "start"], capture_output=True, text=True)
    if start.returncode != 0:
        log = (folder / "log").read_text(errors="replace")[-300:] if (folder / "log").exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-200:]} {log}")
    try:
        yield f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.subprocess
def test_a_killed_workers_trial_is_retried_from_its_checkpoint(tmp_path: Path, postgres_url: str) -> None:
    ck = tmp_path / "ck"
    storage = optuna.storages.RDBStorage(postgres_url)
    # the study made beforehand with two small trials queued, one per worker (quick to build, so the
    # test stays fast); workers joining an existing study is what a second machine does
    study = optuna.create_study(study_name="pg", storage=storage)
    study.set_user_attr("model", "lstm")
    for hid in (32, 64):
        study.enqueue_trial({"optimizer": "adam", "init_lr": 0.01, "weight_decay": 0.0, "num_hid": hid,
                             "max_len": 10, "batch_size": 32, "schedule": "constant"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "tune", "lstm", "--storage", postgres_url, "--study", "pg", "--workers", "2",
         "--trials", "2", "--epochs", "6", "--dataset", "demo", "--checkpoints", str(ck), "--heartbeat", "1"],
        cwd=tmp_path, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = None
    deadline = time.monotonic() + 120
    try:
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            try:
                study = optuna.load_study(study_name="pg", storage=storage)
            except KeyError:
                continue
            for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                pid = t.user_attrs.get("pid")
                if pid is None or not (ck / f"pg-trial{t.number}.npz").exists():
                    continue
                os.kill(pid, signal.SIGSTOP)  # freeze it, then make sure it is still mid-trial
                again = optuna.load_study(study_name="pg", storage=storage).trials[t.number]
                if again.state.name == "RUNNING" and (ck / f"pg-trial{t.number}.npz").exists():
                    os.kill(pid, signal.SIGKILL)
                    victim = t.number
                    break
                os.kill(pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert victim is not None, "no trial was caught mid-trial with a checkpoint"
    assert proc.returncode == 0, err
    assert "killed by signal 9" in err + out
    assert PASSWORD not in out + err and "postgres:***@127.0.0.1" in out
    trials = optuna.load_study(study_name="pg", storage=storage).get_trials()
    assert trials[victim].state.name == "FAIL"
    retries = [t for t in trials if t.user_attrs.get("retry_of") == victim]
    assert len(retries) == 1, [(t.number, t.state, t.user_attrs) for t in trials]
    retry = retries[0]
    assert retry.state.name in ("COMPLETE", "PRUNED")
    assert retry.user_attrs["resumed_from_epoch"] >= 1
    assert retry.params == trials[victim].params
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert not list(ck.iterdir())
