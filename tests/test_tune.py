"""`symdiff tune` on Optuna with the real parts: worker processes sharing a journal file, pruning,
the errors (one line, exit code 2, nothing written), and --show.

Studies are tiny (the shipped demo set, a few trials of 2-3 epochs) so these stay fast.
The PostgreSQL tests are in test_tune_postgres.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="Optuna (the `tune` extra) is not installed: pip install -e '.[tune]'")

from models import tune as TU  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def tune(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "tune", *args], cwd=cwd, env=env or ENV, text=True,
                          capture_output=True, timeout=timeout)


def journal(path: Path) -> optuna.storages.JournalStorage:
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


@pytest.mark.subprocess
def test_two_workers_share_one_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = tune(tmp_path, "mlp", "--trials", "4", "--workers", "2", "--epochs", "2", "--dataset", "demo",
                "--storage", str(tmp_path / "j.journal"), "--study", "s", "--checkpoints", str(tmp_path / "ck"))
    assert proc.returncode == 0, proc.stderr
    trials = optuna.load_study(study_name="s", storage=journal(tmp_path / "j.journal")).get_trials()
    assert len(trials) == 4 and len({t.number for t in trials}) == 4
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)      # nothing left RUNNING
    pids = [t.user_attrs["pid"] for t in trials]
    assert len(set(pids)) == 2 and all(pids.count(p) == 2 for p in pids)     # k = 2 trials each
    assert os.getpid() not in pids                                           # real worker processes
    seeds = {t.user_attrs["pid"]: t.user_attrs["sampler_seed"] for t in trials}
    assert sorted(seeds.values()) == [0, 1]                                  # base + index, recorded
    baselines = [t for t in trials if t.user_attrs.get("baseline")]
    assert len(baselines) == 1 and baselines[0].params == TU.baseline("mlp")
    assert sum(t.params == TU.baseline("mlp") for t in trials) == 1
    assert "train with the best parameters" in proc.stdout and "symdiff mlp --dataset demo" in proc.stdout
    assert not list((tmp_path / "ck").iterdir())  # finished trials leave no checkpoint behind

    # a second command joins the study: the baseline is not enqueued again
    again = tune(tmp_path, "mlp", "--trials", "1", "--epochs", "2", "--dataset", "demo",
                 "--storage", str(tmp_path / "j.journal"), "--study", "s", "--checkpoints", str(tmp_path / "ck"))
    assert again.returncode == 0, again.stderr
    trials = optuna.load_study(study_name="s", storage=journal(tmp_path / "j.journal")).get_trials()
    assert len(trials) == 5 and sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1

    show = tune_here(capsys, "mlp", "--show", "--storage", str(tmp_path / "j.journal"), "--study", "s",
                     "--out", str(tmp_path / "fig"))
    assert show.returncode == 0, show.stderr
    assert "baseline" in show.stdout and "train with" in show.stdout
    for name in ("history", "importances"):
        assert (tmp_path / "fig" / f"s-{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_a_hopeless_trial_is_pruned_early_and_test_is_never_evaluated(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from models import training as T

    evaluate, splits = T.Trainer.evaluate, []

    def validation_only(self: T.Trainer, split: str):  # type: ignore[no-untyped-def]
        splits.append(split)
        assert split != "test", "a trial must not evaluate the test split"
        return evaluate(self, split)

    monkeypatch.setattr(T.Trainer, "evaluate", validation_only)
    storage = journal(tmp_path / "j.journal")
    study = optuna.create_study(study_name="p", storage=storage, direction="minimize")
    study.set_user_attr("model", "mlp")
    dists = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for k in range(5):  # finished trials (the median pruner waits for 5) that reached a low validation loss at every epoch
        study.add_trial(optuna.trial.create_trial(value=0.1, params={"x": 0.5}, distributions=dists,
                                                  intermediate_values={e: 0.1 for e in range(1, 6)}))
    hopeless = {**TU.baseline("mlp"), "optimizer": "momentum", "init_lr": 0.001}
    study.enqueue_trial(hopeless)
    spec = TU.TuneSpec(kind="mlp", storage=TU.StorageSpec(str(tmp_path / "j.journal")), study="p",
                       dataset="demo", epochs=5, trials=1)
    TU.worker_main(spec, 0)
    last = optuna.load_study(study_name="p", storage=storage).get_trials()[-1]
    assert last.params == hopeless
    assert last.state.name == "PRUNED"
    assert 1 <= len(last.intermediate_values) < 5
    assert splits and set(splits) == {"valid"}


def refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert err.count("\n") == 0, err
    for w in words:
        assert w in err, err
    return err


def tune_here(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """``symdiff tune ARGS`` in this process (no interpreter start-up), as a CompletedProcess."""
    import cli

    try:
        code = cli.main(["tune", *args])
    except SystemExit as exc:  # argparse's one-line errors
        code = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_errors_are_one_line_and_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    refused(tune_here(capsys, "mlp", "--workers", "0"), "--workers")
    bad = tune_here(capsys, "mlp", "--storage", "postgresql+psycopg://me:s3cret@127.0.0.1:notaport/db")
    assert "s3cret" not in bad.stderr + bad.stdout
    refused(bad, "--storage", "me:***@")
    down = tune_here(capsys, "mlp", "--storage", "postgresql+psycopg://me:s3cret@127.0.0.1:1/db")
    assert "s3cret" not in down.stderr + down.stdout
    refused(down, "cannot open the database", "me:***@127.0.0.1:1")
    refused(tune_here(capsys, "mlp", "--storage", str(tmp_path / "no" / "j.journal")), "does not exist")
    refused(tune_here(capsys, "mlp", "--dataset", str(tmp_path / "nothing")), "nothing")
    refused(tune_here(capsys, "mlp", "--show", "--storage", str(tmp_path / "j.journal")), "no such journal")
    assert sorted(os.listdir(tmp_path)) == []

    # a study name that exists for another model: refused before anything is added to it
    (tmp_path / "j").mkdir()
    storage = str(tmp_path / "j" / "j.journal")
    study = optuna.create_study(study_name="s", storage=journal(Path(storage)))
    study.set_user_attr("model", "mlp")
    before = Path(storage).read_bytes()
    refused(tune_here(capsys, "lstm", "--storage", storage, "--study", "s", "--trials", "1"), "mlp", "--study")
    assert Path(storage).read_bytes() == before
    assert "runs" not in os.listdir(tmp_path)


@pytest.mark.subprocess
def test_without_optuna_one_line_names_the_extra(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    (fake / "optuna").mkdir(parents=True)
    (fake / "optuna" / "__init__.py").write_text("raise ImportError('No module named optuna')\n")
    env = {**ENV, "PYTHONPATH": f"{fake}{os.pathsep}{REPO}"}
    refused(tune(tmp_path, "mlp", "--trials", "1", env=env), "symdiff[tune]")
    assert sorted(os.listdir(tmp_path)) == ["fake"]


def test_mask_url() -> None:
    assert TU.mask_url("postgresql+psycopg://u:p%40ss@h:5/d") == "postgresql+psycopg://u:***@h:5/d"
    assert TU.mask_url("error at sqlite:///x.db") == "error at sqlite:///x.db"


def test_sigterm_mid_trial_and_the_next_run_continues_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Preemption of a tuning worker: its trial ends, goes back to the queue, and the next run
    resumes it from the checkpoint it had written."""
    import signal

    from models import checkpoint as C

    spec = TU.TuneSpec(kind="lstm", storage=TU.StorageSpec(str(tmp_path / "j.journal")), study="t",
                       dataset="demo", epochs=4, trials=1, checkpoints=str(tmp_path / "ck"))
    study = optuna.create_study(study_name="t", storage=journal(tmp_path / "j.journal"))
    study.set_user_attr("model", "lstm")
    small = {**TU.baseline("lstm"), "num_hid": 32, "max_len": 10}  # the preset's max_len 30 takes longer to build
    study.enqueue_trial(small)
    (tmp_path / "ck").mkdir()
    save = C.Checkpoint.save

    def save_then_sigterm(self: C.Checkpoint, state: C.TrainState) -> None:
        save(self, state)
        if state.epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(C.Checkpoint, "save", save_then_sigterm)
    with pytest.raises(SystemExit) as stopped:
        TU.worker_main(spec, 0)
    assert stopped.value.code == 143
    monkeypatch.setattr(C.Checkpoint, "save", save)
    TU.worker_main(spec, 0)
    first, retry = optuna.load_study(study_name="t", storage=journal(tmp_path / "j.journal")).get_trials()
    assert first.state.name == "FAIL" and first.params == small
    assert retry.state.name == "COMPLETE" and retry.params == first.params
    assert retry.user_attrs["retry_of"] == 0 and retry.user_attrs["resumed_from_epoch"] == 1
    assert not list((tmp_path / "ck").iterdir())


@pytest.mark.subprocess
def test_a_killed_workers_trial_in_a_journal_is_failed_and_the_next_run_continues_it(tmp_path: Path) -> None:
    """A journal has no heartbeats: a worker killed with SIGKILL left its trial RUNNING for ever.
    The next `symdiff tune` on the study fails it (its worker's pid is gone) and runs it again
    from the checkpoint it had written."""
    j, ck = tmp_path / "j.journal", tmp_path / "ck"
    study = optuna.create_study(study_name="k", storage=journal(j))
    study.set_user_attr("model", "lstm")
    small = {**TU.baseline("lstm"), "num_hid": 32, "max_len": 10}
    study.enqueue_trial(small)
    ck.mkdir()
    killed = subprocess.run([sys.executable, "-c", f"""
import os, signal
from models import checkpoint as C, tune as TU
spec = TU.TuneSpec(kind="lstm", storage=TU.StorageSpec({str(j)!r}), study="k", dataset="demo", epochs=3,
                   trials=1, checkpoints={str(ck)!r})
save = C.Checkpoint.save
def save_then_die(self, state):
    save(self, state)
    if state.epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
C.Checkpoint.save = save_then_die
TU.worker_main(spec, 0)
"""], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert killed.returncode == -9, killed.stderr
    (stale,) = optuna.load_study(study_name="k", storage=journal(j)).get_trials()
    assert stale.state.name == "RUNNING" and stale.user_attrs["pid"] > 0  # what Optuna leaves behind

    proc = tune(tmp_path, "lstm", "--trials", "1", "--epochs", "3", "--dataset", "demo", "--storage", str(j),
                "--study", "k", "--checkpoints", str(ck))
    assert proc.returncode == 0, proc.stderr
    assert "trial 0 of a worker that had died" in proc.stdout + proc.stderr
    first, retry = optuna.load_study(study_name="k", storage=journal(j)).get_trials()
    assert first.state.name == "FAIL"
    assert retry.state.name == "COMPLETE" and retry.params == small
    assert retry.user_attrs["retry_of"] == 0 and retry.user_attrs["resumed_from_epoch"] == 1


def test_running_trials_of_live_workers_and_other_hosts_are_left_alone(tmp_path: Path) -> None:
    import socket

    study = optuna.create_study(study_name="a", storage=journal(tmp_path / "j.journal"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    here, there, _no_pid_yet = study.ask(), study.ask(), study.ask()
    here.set_user_attr("pid", os.getpid())                  # a live worker (this process)
    here.set_user_attr("host", socket.gethostname())
    here.set_user_attr("pid_start", TU.process_start(os.getpid()))
    there.set_user_attr("pid", dead_pid)                    # a worker on another machine
    there.set_user_attr("host", socket.gethostname() + "-elsewhere")
    # _no_pid_yet: its worker is between Optuna's ask and the objective (no pid recorded yet)
    assert TU.fail_trials_of_dead_workers(study) == {}
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"] * 3
    # the same pid started at another time is another process: the worker is gone
    here.set_user_attr("pid_start", (TU.process_start(os.getpid()) or 0) + 1)
    if TU.process_start(os.getpid()) is not None:
        assert TU.fail_trials_of_dead_workers(study) == {here.number: os.getpid()}
        assert [t.state.name for t in study.get_trials()][:3] == ["FAIL", "RUNNING", "RUNNING"]


@pytest.mark.parametrize("kind", ["lstm", "gru", "lstm_max"])
def test_the_printed_train_command_is_one_the_cli_accepts(kind: str) -> None:
    """`symdiff gru` is no command: models without one of their own are trained by `symdiff train`."""
    import shlex

    import cli
    from models import tune

    line = tune.train_command(kind, "demo", 3, {"init_lr": 0.01, "num_hid": 32, "average": 0.998})
    argv = shlex.split(line)[1:]
    args = vars(cli.build_parser().parse_args(argv))
    assert args["num_hid"] == 32 and args["epochs"] == 3 and args["average"] == 0.998
    assert args.get("model", kind) == kind
