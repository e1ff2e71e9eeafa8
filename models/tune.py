"""Hyperparameter search with Optuna: the study logic behind ``symdiff tune`` (cli.py only presents).

* One search space per model, declared in :data:`SEARCH_SPACES`; the model's ``--preset best``
  is enqueued as the study's first trial, once (by the process that creates the study).
* The objective is the best validation loss of a training run (``models.training.Trainer``);
  each epoch's validation loss is reported, so the pruner can stop a hopeless trial early.
  The test split is never evaluated.
* Storage: a journal file by default (Optuna's ``JournalFileBackend``: no server, safe for
  several processes on one machine), or any SQLAlchemy URL for many machines. With a database,
  workers send heartbeats, and a trial whose worker died is failed and retried, from that
  trial's checkpoint when the checkpoints folder is shared (``--checkpoints``). A journal has
  no heartbeats (Optuna 5's ``JournalStorage`` is no ``BaseHeartbeat``): there every command
  fails the running trials whose worker process on this machine is gone
  (:func:`fail_trials_of_dead_workers`) when it starts and when its workers end, and enqueues
  them again the same way.
* ``--workers K`` starts K worker processes (spawn); worker ``i`` samples with seed ``base + i``.

A database URL's password is never printed, logged or stored: every message shows
:func:`mask_url`'s form of it.
"""
from __future__ import annotations

import math
import os
import re
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .flags import TUNE_PRUNERS as PRUNERS  # noqa: F401  (the --pruner names)

DEFAULT_JOURNAL = Path("runs") / "tune.journal"
DEFAULT_CHECKPOINTS = Path("runs") / "checkpoints"
TUNE_HINT = "pip install 'symdiff[tune]'"

# ---- the search spaces: one place per model ---------------------------------------------------
# ("log", lo, hi): log-uniform float; ("float", lo, hi): uniform; ("int", lo, hi, step); ("cat", choices).
# Each model's --preset best lies inside its space (it is enqueued as the first trial).
SEARCH_SPACES: dict[str, dict[str, tuple[Any, ...]]] = {
    "mlp": {
        "optimizer": ("cat", ("momentum", "adam", "adamw")),
        "init_lr": ("log", 1e-3, 5e-2),
        "weight_decay": ("cat", (0.0, 0.01, 0.1, 0.3)),
        "num_hid": ("int", 32, 192, 32),
        "max_len": ("int", 10, 35, 5),
        "batch_size": ("cat", (32, 64, 128)),
        "schedule": ("cat", ("constant", "plateau", "cosine")),
    },
    "lstm": {
        "optimizer": ("cat", ("momentum", "adam", "adamw")),
        "init_lr": ("log", 1e-3, 5e-2),
        "weight_decay": ("cat", (0.0, 0.01, 0.1, 0.3)),
        "num_hid": ("int", 32, 128, 32),
        "max_len": ("int", 10, 35, 5),
        "batch_size": ("cat", (32, 64, 128)),
        "schedule": ("cat", ("constant", "plateau", "cosine")),
    },
}
# The recurrent models of issue #15 search the LSTM's space (same knobs, same cost per hidden unit order).
SEARCH_SPACES.update({kind: dict(SEARCH_SPACES["lstm"]) for kind in ("gru", "bilstm", "attention")})
# lstm_max's preset averages the weights (--average): the study searches with and without
SEARCH_SPACES["lstm_max"] = {**SEARCH_SPACES["lstm"], "average": ("cat", (None, 0.998))}
# Hyperparameters every trial shares (not searched): early stopping bounds a bad trial's cost.
FIXED = {"dtype": "float32", "patience": 2, "momentum": 0.9, "clip": None}


def suggest(trial: Any, kind: str) -> dict[str, Any]:
    """The trial's hyperparameters, drawn from ``SEARCH_SPACES[kind]``."""
    out: dict[str, Any] = {}
    for name, spec in SEARCH_SPACES[kind].items():
        if spec[0] == "log":
            out[name] = trial.suggest_float(name, spec[1], spec[2], log=True)
        elif spec[0] == "float":
            out[name] = trial.suggest_float(name, spec[1], spec[2])
        elif spec[0] == "int":
            out[name] = trial.suggest_int(name, spec[1], spec[2], step=spec[3])
        else:
            out[name] = trial.suggest_categorical(name, list(spec[1]))
    return out


def baseline(kind: str) -> dict[str, Any]:
    """``--preset best`` restricted to the searched hyperparameters: the study's first trial."""
    from .loader import load_source  # the preset lives in the model file (models/<kind>.py)
    from .training import TrainConfig

    best = load_source(kind).presets["best"]
    defaults = TrainConfig()  # a key the preset leaves out keeps the flags' default, as --preset does
    return {k: best.get(k, getattr(defaults, k)) for k in SEARCH_SPACES[kind]}


# ---- errors and the optional extra -------------------------------------------------------------
class TuneError(ValueError):
    """Bad storage, study or flags: one line, exit code 2."""


class MissingExtra(TuneError):
    """Optuna (the ``tune`` extra) is not installed."""


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MissingExtra(f"symdiff tune needs Optuna, which is not installed; install the extra: {TUNE_HINT}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ---- storage ------------------------------------------------------------------------------------
_PASSWORD = re.compile(r"(://[^:/@]*:)([^@]*)(@)")


def mask_url(text: str) -> str:
    """``text`` with the password of any URL in it replaced by ``***``."""
    return _PASSWORD.sub(r"\1***\3", text)


@dataclass
class StorageSpec:
    """Where the study lives: a journal file path or a database URL (kept in memory only)."""

    target: str
    heartbeat: int = 10

    @property
    def is_url(self) -> bool:
        return "://" in self.target

    def shown(self) -> str:
        """What may be printed: the path, or the URL with its password masked."""
        return mask_url(self.target)

    def open(self) -> Any:
        """An Optuna storage object; :class:`TuneError` (one line, password masked) if it cannot be had."""
        optuna = require_optuna()
        if not self.is_url:
            path = Path(self.target)
            if path.is_dir():
                raise TuneError(f"--storage {path}: is a directory; give a journal file such as {path / 'tune.journal'}")
            if not path.parent.is_dir():
                raise TuneError(f"--storage {path}: folder {path.parent} does not exist; create it first")
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, SQLAlchemyError

        try:
            make_url(self.target)
        except (ArgumentError, ValueError) as exc:
            raise TuneError(f"--storage {self.shown()}: not a database URL ({mask_url(str(exc))}); give a file "
                            f"path for a journal, or a URL such as postgresql+psycopg://USER:PASSWORD@HOST/DB") from None
        try:
            return optuna.storages.RDBStorage(
                self.target, heartbeat_interval=self.heartbeat, grace_period=3 * self.heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
                engine_kwargs={"pool_pre_ping": True})
        except (SQLAlchemyError, ImportError, OSError, ValueError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise TuneError(f"--storage {self.shown()}: cannot open the database ({mask_url(reason)[:200]}); "
                            f"check the URL, that the server is up, and that its driver is installed "
                            f"({TUNE_HINT})") from None


# ---- journal: trials of dead workers ---------------------------------------------------------------
def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``; None where there is no
    ``/proc``): recorded on each trial beside the pid, so that a pid reused by another process
    is not taken for the trial's worker."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else None


def worker_alive(pid: int, started: int | None) -> bool:
    """Whether the process that ran a trial still runs on this machine (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to judge
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): the pid exists, which is all we can tell
    if stat[stat.rindex(")") + 2:].split()[0] == "Z":
        return False
    return started is None or process_start(pid) == started


MAX_RETRIES = 3


def fail_trials_of_dead_workers(study: Any) -> dict[int, int]:
    """Fail each running trial whose worker on this machine is gone, and enqueue it again.

    Journal storage has no heartbeats (Optuna 5: ``JournalStorage`` is no ``BaseHeartbeat``, and
    ``fail_stale_trials`` does nothing for it), so a killed worker's trial would stay RUNNING for
    ever. A journal serves one machine, and each trial records its worker's host, pid and start
    time: a trial of this host whose process no longer runs (or whose pid now belongs to another
    process) is failed. Its parameters are enqueued again with ``retry_of`` the first trial of its
    chain (at most :data:`MAX_RETRIES` times), so the retry resumes that trial's checkpoint
    (``--checkpoints``), as after Ctrl-C. Trials of other hosts, and a trial whose worker has not
    yet recorded its pid (the moment between Optuna creating it and the objective starting), are
    left alone. Returns the trials failed: number -> their worker's pid.
    """
    from optuna.trial import TrialState

    host = socket.gethostname()
    failed: dict[int, int] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or worker_alive(pid, t.user_attrs.get("pid_start")):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # another command failed it just now
            continue
        failed[t.number] = pid
        root = int(t.user_attrs.get("retry_of", t.number))
        chain = sum(1 for u in study.get_trials(deepcopy=False) if u.user_attrs.get("retry_of") == root)
        if t.params and chain < MAX_RETRIES:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": root, "retried_because": (
                f"the worker of trial {t.number} (pid {pid}) died")})
    return failed


# ---- one study ------------------------------------------------------------------------------------
@dataclass
class TuneSpec:
    """Everything a worker needs (sent to spawned processes; holds the URL, never written anywhere)."""

    kind: str
    storage: StorageSpec
    study: str
    dataset: str
    epochs: int
    trials: int
    workers: int = 1
    seed: int = 0
    timeout: float | None = None
    checkpoints: str | None = None
    pruner: str = "median"


def make_pruner(optuna: Any, name: str = "median") -> Any:
    """``median`` (the default): prune a trial whose validation loss at an epoch is worse than the
    median of the finished trials at that epoch, once 5 trials have finished (Optuna's defaults);
    ``halving``: asynchronous successive halving; ``none``. docs/tuning.md has the measurement
    behind the default (the pruners replayed on a study's recorded curves)."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def open_study(spec: TuneSpec, *, create: bool, sampler: Any = None) -> Any:
    """Load the study (or create it, with the baseline enqueued once); refuse one for another model."""
    optuna = require_optuna()
    if not create and not spec.storage.is_url and not Path(spec.storage.target).exists():
        raise TuneError(f"--storage {spec.storage.target}: no such journal file; run symdiff tune without --show first")
    storage = spec.storage.open()
    try:
        study = optuna.load_study(study_name=spec.study, storage=storage, pruner=make_pruner(optuna, spec.pruner), sampler=sampler)
    except KeyError:
        if not create:
            raise TuneError(f"no study {spec.study!r} in {spec.storage.shown()}; run symdiff tune without --show first") from None
        try:
            study = optuna.create_study(study_name=spec.study, storage=storage, direction="minimize",
                                        pruner=make_pruner(optuna, spec.pruner))
        except optuna.exceptions.DuplicatedStudyError:  # another process created it just now
            return open_study(spec, create=False, sampler=sampler)
        study.set_user_attr("model", spec.kind)
        study.set_user_attr("dataset", spec.dataset)
        study.set_user_attr("epochs", spec.epochs)
        study.enqueue_trial(baseline(spec.kind), user_attrs={"baseline": True})
        return study
    other = study.user_attrs.get("model")
    if other is not None and other != spec.kind:
        raise TuneError(f"--study {spec.study}: this study in {spec.storage.shown()} tunes the {other} model, "
                        f"not {spec.kind}; give another --study name")
    return study


class TrainingFailed(RuntimeError):
    """A trial whose training produced no finite validation loss (diverged, dead ReLUs)."""


class WorkerStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM reached a worker: it stops after the current batch and ends its trial."""


def retry_root(optuna: Any, trial: Any) -> int:
    """The number of the first trial in a chain of retries (whose checkpoint a retry resumes):
    a retry enqueued by a stopped worker names it (``retry_of``), one made by the heartbeat
    callback has Optuna's retry history."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    if "retry_of" in frozen.user_attrs:
        return int(frozen.user_attrs["retry_of"])
    history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(frozen)
    return history[0] if history else trial.number


def worker_main(spec: TuneSpec, index: int) -> None:
    """One worker process: run its share of the trials, then any trial retried after a worker died."""
    import numpy as np

    from . import data as D
    from .checkpoint import Checkpoint, CheckpointError, data_fingerprint, identity
    from .flags import default_lr
    from .training import QuietReporter, StopFlag, Trainer, TrainConfig, build_model, stop_on_signals

    optuna = require_optuna()
    # a worker's failed trials are counted in the live view and listed by --show; Optuna's own
    # warning with a traceback for each (and for a trial ended by Ctrl-C/SIGTERM) would bury it
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = open_study(spec, create=False, sampler=optuna.samplers.TPESampler(seed=spec.seed + index))
    ds = D.load_dataset(D.resolve_dataset(spec.dataset))
    fingerprint = data_fingerprint([(ds.train.titles, ds.train.label_ids), (ds.valid.titles, ds.valid.label_ids)])
    ckdir = Path(spec.checkpoints) if spec.checkpoints else None
    flag = StopFlag()

    class TrialReporter(QuietReporter):
        def __init__(self, trial: Any) -> None:
            self.trial = trial

        def epoch(self, r: Any) -> None:
            if math.isfinite(r.valid_loss):
                self.trial.report(r.valid_loss, r.epoch)
            if self.trial.should_prune():
                self.trial.set_user_attr("epochs_run", r.epoch)
                raise optuna.TrialPruned(f"pruned after epoch {r.epoch}")

    def objective(trial: Any) -> float:
        hp = suggest(trial, spec.kind)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        started = process_start(os.getpid())
        if started is not None:
            trial.set_user_attr("pid_start", started)
        trial.set_user_attr("worker", index)
        trial.set_user_attr("sampler_seed", spec.seed + index)
        cfg = TrainConfig.from_params({"init_lr": default_lr(spec.kind), **FIXED, **hp, "epochs": spec.epochs,
                                       "seed": 0})
        dims = dict(max_len=cfg.max_len, num_chars=ds.vocab.num_chars, num_hid=cfg.num_hid,
                    num_labels=ds.vocab.num_labels)
        model = build_model(spec.kind, dims, seed=cfg.seed, dtype=cfg.dtype)
        trainer = Trainer(model, ds, cfg)
        checkpoint = None
        if ckdir is not None:
            root = retry_root(optuna, trial)
            try:
                checkpoint = Checkpoint(ckdir / f"{spec.study}-trial{root}.npz",
                                        identity(spec.kind, asdict(cfg), model.dims, fingerprint),
                                        {n: a.shape for n, a in model.params.items()}, flag="--checkpoints")
            except CheckpointError as exc:
                trial.set_user_attr("error", str(exc))
                raise TrainingFailed(str(exc)) from None
            if checkpoint.resume is not None:
                trial.set_user_attr("resumed_from_epoch", checkpoint.resume.epoch)
                trial.set_user_attr("retry_of", root)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            result = trainer.train(TrialReporter(trial), flag, checkpoint)
        if result.stopped in ("interrupted", "terminated"):
            # this trial ends as failed; the same trial goes back to the queue, so that the next
            # `symdiff tune` on this study continues it from its checkpoint
            if checkpoint is not None:
                trial.study.enqueue_trial(hp, user_attrs={"retry_of": retry_root(optuna, trial)})
            trial.set_user_attr("error", f"worker {result.stopped} (Ctrl-C or SIGTERM)")
            raise WorkerStopped(result.stopped)
        if checkpoint is not None:
            checkpoint.discard()
        trial.set_user_attr("epochs_run", len(result.epochs))
        trial.set_user_attr("stopped", result.stopped)
        losses = [e.valid_loss for e in result.epochs if math.isfinite(e.valid_loss)]
        if not losses:
            trial.set_user_attr("error", result.message or "no finite validation loss")
            raise TrainingFailed(trial.user_attrs["error"])
        return min(losses)

    share = spec.trials // spec.workers + (index < spec.trials % spec.workers)
    with stop_on_signals(flag):
        try:
            if share:
                study.optimize(objective, n_trials=share, timeout=spec.timeout, catch=(TrainingFailed,))
            if spec.storage.is_url:  # heartbeats: wait for trials of dead workers, run their retries
                drain(optuna, study, objective, spec.storage.heartbeat)
        except WorkerStopped:
            sys.exit(143 if flag.reason == "terminated" else 130)
        except Exception as exc:  # noqa: BLE001 - one line (password masked), not a traceback with a URL in it
            first = (str(exc).strip().splitlines() or [""])[0]
            print(f"symdiff tune: worker {index}: error: {type(exc).__name__}: {mask_url(first)[:300]}",
                  file=sys.stderr, flush=True)
            sys.exit(1)


def drain(optuna: Any, study: Any, objective: Callable[[Any], float], heartbeat: int) -> None:
    """Until no trial is running: fail the stale ones (their retries are enqueued) and run those."""
    from optuna.trial import TrialState

    while True:
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting:
            study.optimize(objective, n_trials=1, catch=(TrainingFailed,))
            continue
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        optuna.storages.fail_stale_trials(study)
        time.sleep(heartbeat)


# ---- the parent: start workers, watch the study -------------------------------------------------
@dataclass
class Snapshot:
    """The study as the live view shows it."""

    counts: dict[str, int]
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_number: int | None = None
    workers_alive: int = 0


def snapshot(study: Any, alive: int = 0) -> Snapshot:
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    done = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    snap = Snapshot(counts, workers_alive=alive)
    if done:
        best = min(done, key=lambda t: t.value)
        snap.best_value, snap.best_params, snap.best_number = best.value, dict(best.params), best.number
    return snap


def train_command(kind: str, dataset: str, epochs: int, params: dict[str, Any]) -> str:
    """The command line that trains with a trial's hyperparameters."""
    flags = {**FIXED, **params, "epochs": epochs}
    command = kind if kind in ("mlp", "lstm") else f"train {kind}"  # only these two have commands of their own
    parts = [f"symdiff {command} --dataset {dataset}"]
    for k, v in flags.items():
        if v is None:
            continue
        parts.append(f"--{k} {v:.4g}" if isinstance(v, float) and k == "init_lr" else f"--{k} {v}")
    return " ".join(parts)


def run_study(spec: TuneSpec, on_update: Callable[[Snapshot], None], poll: float = 1.0) -> tuple[int, Snapshot, list[str]]:
    """Open or create the study, start the workers, report snapshots until they end.

    Returns the exit code, the final snapshot and warnings (workers that died).
    """
    import multiprocessing

    study = open_study(spec, create=True)
    journal = not spec.storage.is_url
    revived = sorted(fail_trials_of_dead_workers(study)) if journal else []
    if spec.checkpoints:
        Path(spec.checkpoints).mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker_main, args=(spec, i), name=f"symdiff-tune-{i}") for i in range(spec.workers)]
    stop: dict[str, int] = {}

    def forward(signum: int, frame: Any) -> None:  # Ctrl-C or SIGTERM: every worker ends its trial and stops
        stop["code"] = 143 if signum == signal.SIGTERM else 130
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            on_update(snapshot(study, sum(p.is_alive() for p in procs)))
            for p in procs:
                p.join(timeout=poll / len(procs))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    warnings = []
    if revived:
        warnings.append(f"trial{'s' if len(revived) > 1 else ''} {', '.join(map(str, revived))} of a worker that "
                        f"had died (journal: no heartbeats) failed and enqueued again")
    failed_now = fail_trials_of_dead_workers(study) if journal else {}
    for i, p in enumerate(procs):
        if p.exitcode not in (0, None) and "code" not in stop:
            mine = sorted(n for n, pid in failed_now.items() if pid == p.pid)
            how = f"was killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exited with code {p.exitcode}"
            warnings.append(f"worker {i} (pid {p.pid}) {how}; "
                            + ("its trial is retried by a live worker once its heartbeat is stale"
                               if not journal else
                               f"its trial {', '.join(map(str, mine))} failed and enqueued again (journal: no "
                               f"heartbeats); the next symdiff tune on this study runs it"
                               if mine else "it had no trial running"))
    final = snapshot(study)
    on_update(final)
    return stop.get("code", 0), final, warnings


# ---- --show -------------------------------------------------------------------------------------------
def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial, for the table ``symdiff tune --show`` prints."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                     "epochs": t.user_attrs.get("epochs_run", len(t.intermediate_values)), "seconds": seconds,
                     "pid": t.user_attrs.get("pid"), "params": dict(t.params),
                     "note": "; ".join(
                         (["baseline"] if t.user_attrs.get("baseline") else [])
                         + ([f"retry of {t.user_attrs['retry_of']} from epoch {t.user_attrs['resumed_from_epoch']}"]
                            if "resumed_from_epoch" in t.user_attrs else [])
                         + ([str(t.user_attrs["error"])[:120]] if "error" in t.user_attrs else []))})
    return rows


def write_figures(study: Any, out: Path) -> tuple[list[Path], list[str], list[str]]:
    """Optimisation history and parameter importances as PNG.

    Returns the files written, notes on figures that could not be drawn, and one line per figure
    that could not be *written* (a full disk, a read-only folder): the caller exits 1 for those.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ["figures skipped: matplotlib is not installed; pip install 'symdiff[plots]'"], []
    import warnings as _w

    from optuna.visualization import matplotlib as ov

    from .storage import OutputWriteError, os_reason, save_bytes

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return [], [], [f"figures (--out) not written: cannot create the folder {out}: {os_reason(exc)}"]
    written, notes, failures = [], [], []
    for name, plot in (("history", ov.plot_optimization_history), ("importances", ov.plot_param_importances)):
        try:
            with _w.catch_warnings():
                _w.simplefilter("ignore")
                ax = plot(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            import io

            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            plt.close(fig)
            path = out / f"{study.study_name}-{name}.png"
            save_bytes(path, buf.getvalue())
            written.append(path)
        except OutputWriteError as exc:
            failures.append(f"{name} figure (--out) not written: {exc}")
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            notes.append(f"{name} figure skipped: {exc}")
    return written, notes, failures
