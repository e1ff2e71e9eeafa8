"""The assignment's experiments, answered by the project itself and reproducibly.

* :func:`run_timing` — training seconds per epoch of the MLP and the LSTM against
  the batch size ``N`` and the title length ``M``, measured with the real
  :class:`~models.training.Trainer` (its ``train_seconds``: the training loop only).
* :func:`run_steps` — forward and backward steps of ONE update, read from the
  engine's counters (``Autograd.forward_steps/backward_steps``), for the default
  engine and for the plain, unfused Wengert list (see :func:`engines`).
* :func:`run_init` — question 5: the scale ``a`` of ``w_i ~ U[0, a]`` that keeps
  ``Σ x_i w_i`` in tanh's responsive range, derived in closed form and checked
  by sampling.
* :func:`write_report` — ``docs/report.md`` templated from the JSON the runs wrote.

Each ``run_*`` returns a JSON-able dict; :func:`save` writes it (JSON and CSV,
atomically) and :func:`save_plots` draws its figures when matplotlib is
installed (an optional extra; without it the data is still written). No
presentation here: the CLI (``symdiff experiment``) shows progress and tables.
"""
from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import math
import os
import platform
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from .storage import save_bytes

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASET = ROOT.parent / "shared" / "data" / "smaller"
DEFAULT_OUT = "docs/figures"
DEFAULT_REPORT = "docs/report.md"
BATCH_SIZES = (16, 32, 64)
MAX_LENS = (10, 15, 20)
BASE_BATCH, BASE_LEN, NUM_HID = 64, 10, 50
MODELS = ("mlp", "lstm")
EXPERIMENTS = ("timing", "steps", "init")
PLOTS_HINT = "pip install -e '.[plots]'"
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SATURATED = 0.99                             # |tanh(s)| above this counts as saturated
S_SATURATED = math.atanh(SATURATED)          # ≈ 2.647


class ExperimentError(ValueError):
    """Bad settings or missing inputs; the message is one line for the user."""


# ---- progress -------------------------------------------------------------------------------
class Progress(Protocol):
    def start(self, description: str, total: int) -> None: ...
    def advance(self, n: int = 1, status: str | None = None) -> None: ...
    def finish(self) -> None: ...


class NoProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int = 1, status: str | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


# ---- environment ----------------------------------------------------------------------------
def default_dataset() -> str:
    """``../shared/data/smaller`` (beside the checkout) when it exists, else the shipped ``demo``."""
    if Path(f"{SHARED_DATASET}.train").exists():
        return _display_path(SHARED_DATASET)
    return "demo"


def _display_path(path: Path) -> str:
    """A path as short as possible: relative to the working directory when that is shorter."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if len(rel) < len(str(path)) else str(path)


def machine_info() -> dict[str, Any]:
    """CPU model and cores (from /proc/cpuinfo), numpy and BLAS, Python, load average."""
    cpu_model, physical = None, set()
    try:
        phys_id = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and cpu_model is None:
                cpu_model = value
            elif key == "physical id":
                phys_id = value
            elif key == "core id":
                physical.add((phys_id, value))
    except OSError:
        pass
    blas = None
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{deps.get('name')} {deps.get('version')}".strip()
    except Exception:  # older numpy: no dict mode; not worth failing for
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    threads = {k: os.environ[k] for k in BLAS_THREAD_VARS if k in os.environ}
    from symdiff import native

    return {"native": native.status(), "cpu_model": cpu_model or platform.processor() or "unknown",
            "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "physical_cores": len(physical) or None,
            "numpy": np.__version__, "blas": blas, "blas_thread_env": threads,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average": load}


def code_version() -> dict[str, Any] | None:
    """The checkout's commit and which engine/model files differ from it (the code that was measured)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        status = git("status", "--porcelain", "--", "symdiff", "models").splitlines()
        changed = [line[3:] for line in status if line[3:] and line[3:] != "models/experiments.py"]
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "uncommitted": sorted(changed)}


def _meta(experiment: str, command: str, started: float, wall: float,
          code: dict[str, Any] | None = None) -> dict[str, Any]:
    info = machine_info()
    return {"experiment": experiment, "command": command,
            "date": datetime.fromtimestamp(started, timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds": round(wall, 2), "machine": info, "code": code or code_version()}


def _ints(values: Iterable[int]) -> str:
    return ",".join(str(v) for v in values)


def _command(experiment: str, **flags: Any) -> str:
    """The ``symdiff experiment`` command line that reproduces a run (flags with their values)."""
    # BLAS thread settings change the timings, so a reproducing command must carry any that
    # differ from the one thread models/__init__ sets by default
    parts = [f"{k}={os.environ[k]}" for k in BLAS_THREAD_VARS if os.environ.get(k, "1") != "1"]
    parts += ["symdiff", "experiment", experiment]
    for k, v in flags.items():
        if v is None:
            continue
        if isinstance(v, (tuple, list)):
            v = _ints(v)
        parts += [f"--{k}", str(v)]
    return " ".join(parts)


# ---- timing ---------------------------------------------------------------------------------
def timing_grid(batch_sizes: Sequence[int], max_lens: Sequence[int], base_batch: int = BASE_BATCH,
                base_len: int = BASE_LEN) -> list[tuple[int, int]]:
    """The distinct ``(N, M)`` settings: the N sweep at ``M = base_len``, the M sweep at ``N = base_batch``."""
    grid: list[tuple[int, int]] = []
    for nm in [(n, base_len) for n in batch_sizes] + [(base_batch, m) for m in max_lens]:
        if nm not in grid:
            grid.append(nm)
    return grid


class _SweepReporter:
    """A ``Trainer`` reporter that only feeds the sweep's progress bar.

    It is called inside the timed loop, so it costs an integer increment per
    batch and talks to the progress bar once every ``every`` batches.
    """

    def __init__(self, progress: Progress, status: str, every: int = 32) -> None:
        self.progress, self.status, self.every = progress, status, every
        self.pending = 0
        self.warnings: list[str] = []

    def start(self, kind: str, epochs: int, batches: int) -> None:
        self.progress.advance(0, self.status)

    def batch(self, epoch: int, k: int, loss: float) -> None:
        self.pending += 1
        if self.pending >= self.every:
            self.progress.advance(self.pending)
            self.pending = 0

    def epoch(self, result: Any) -> None:
        self.flush()

    def flush(self) -> None:
        if self.pending:
            self.progress.advance(self.pending)
            self.pending = 0

    def info(self, text: str) -> None:
        pass

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def run_timing(dataset: str | os.PathLike[str] | None = None, *, models: Sequence[str] = MODELS,
               batch_sizes: Sequence[int] = BATCH_SIZES, max_lens: Sequence[int] = MAX_LENS,
               epochs: int = 2, repeats: int = 3, seed: int = 0, num_hid: int = NUM_HID,
               base_batch: int = BASE_BATCH, base_len: int = BASE_LEN,
               progress: Progress | None = None) -> dict[str, Any]:
    """Train every model at every grid setting ``repeats`` times and record each epoch's ``train_seconds``.

    Repeats are the outer loop, so background load that comes and goes is spread
    over all settings instead of falling on one of them. Every run starts from
    the same seed (same initial parameters, same batch order): the repeats
    differ only in timing noise.
    """
    from . import data as D
    from .flags import DEFAULT_LR
    from .training import StopFlag, TrainConfig, Trainer, build_model

    _check_positive(epochs=epochs, repeats=repeats, num_hid=num_hid)
    _check_sizes(batch_sizes, "batch sizes")
    _check_sizes(max_lens, "max lengths")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ExperimentError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    dataset = str(dataset if dataset is not None else default_dataset())
    try:
        ds = D.load_dataset(D.resolve_dataset(dataset))
    except D.DataError as exc:
        raise ExperimentError(str(exc)) from None
    progress = progress or NoProgress()
    grid = timing_grid(batch_sizes, max_lens, base_batch, base_len)
    n_train = len(ds.train)
    per_run = {n: -(-n_train // n) for n, _ in grid}
    progress.start("timing", repeats * len(models) * sum(epochs * per_run[n] for n, _ in grid))
    started, t0 = time.time(), time.perf_counter()
    load_before = machine_info()["load_average"]
    code = code_version()  # the code as imported now, before any of it runs
    measurements: list[dict[str, Any]] = []
    warnings: list[str] = []
    for r in range(1, repeats + 1):
        for kind in models:
            for n, m in grid:
                cfg = TrainConfig(max_len=m, num_hid=num_hid, batch_size=n, epochs=epochs,
                                  init_lr=DEFAULT_LR[kind], seed=seed)
                dims = dict(max_len=m, num_chars=ds.vocab.num_chars, num_hid=num_hid,
                            num_labels=ds.vocab.num_labels)
                trainer = Trainer(build_model(kind, dims, seed=seed, dtype=cfg.dtype), ds, cfg)
                rep = _SweepReporter(progress, f"{kind} N={n} M={m} (repeat {r}/{repeats})")
                result = trainer.train(rep, StopFlag())
                rep.flush()
                for e in result.epochs:
                    measurements.append({"model": kind, "batch_size": n, "max_len": m, "repeat": r,
                                         "epoch": e.epoch, "train_seconds": e.train_seconds,
                                         "batches": per_run[n], "train_rows": n_train,
                                         "train_loss": e.train_loss})
                if result.stopped:
                    warnings.append(f"{kind} N={n} M={m} repeat {r}: {result.message}")
                    missing = epochs - len(result.epochs)
                    progress.advance(max(missing, 0) * per_run[n])
    wall = time.perf_counter() - t0
    progress.finish()
    settings = {"dataset": dataset, "rows": {s: len(getattr(ds, s)) for s in D.SPLITS},
                "num_chars": ds.vocab.num_chars, "num_labels": ds.vocab.num_labels,
                "models": list(models), "batch_sizes": list(batch_sizes), "max_lens": list(max_lens),
                "base_batch": base_batch, "base_len": base_len, "num_hid": num_hid,
                "init_lr": {k: DEFAULT_LR[k] for k in models}, "epochs": epochs, "repeats": repeats,
                "seed": seed, "dtype": "float64", "optimizer": "sgd",
                "fuse": getattr(TrainConfig(), "fuse", None)}
    command = _command("timing", dataset=dataset, epochs=epochs, repeats=repeats,
                       batch_sizes=batch_sizes, max_lens=max_lens, seed=seed)
    meta = _meta("timing", command, started, wall, code)
    meta["load_average_before"] = load_before
    return {"meta": meta, "settings": settings, "measurements": measurements,
            "summary": summarize_timing(measurements, settings), "warnings": warnings}


def summarize_timing(measurements: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model and sweep point: the median, min and max over repeats of the mean seconds per epoch."""
    rows = []
    for kind in settings["models"]:
        for sweep, values in (("batch_size", settings["batch_sizes"]), ("max_len", settings["max_lens"])):
            for v in values:
                n, m = (v, settings["base_len"]) if sweep == "batch_size" else (settings["base_batch"], v)
                mine = [x for x in measurements if x["model"] == kind and x["batch_size"] == n and x["max_len"] == m]
                if not mine:
                    continue
                by_repeat: dict[int, list[float]] = {}
                for x in mine:
                    by_repeat.setdefault(x["repeat"], []).append(x["train_seconds"])
                per_repeat = [statistics.fmean(t) for t in by_repeat.values()]
                med = statistics.median(per_repeat)
                batches = mine[0]["batches"]
                rows.append({"model": kind, "sweep": sweep, "value": v, "batch_size": n, "max_len": m,
                             "repeats": len(per_repeat), "median": med, "min": min(per_repeat),
                             "max": max(per_repeat), "batches": batches,
                             "median_ms_per_batch": 1000 * med / batches,
                             "per_repeat": per_repeat})
    return rows


# ---- steps ----------------------------------------------------------------------------------
CROSSENT_ONLY = "crossEnt-softMax only"


def engines() -> dict[str, dict[str, Any]]:
    """The engine configurations counted: ``Autograd`` keyword arguments by name.

    *default* is the engine as the trainer runs it (whatever passes it applies
    by default); *unfused* is the plain Wengert list, every op a step (the
    assignment's counts); *crossEnt-softMax only* is the plain list with only
    that rewrite, which isolates its effect. Since the engine grew an
    elementwise-fusion switch (``fuse``, on by default and not one of the
    ``passes``), ``passes=()`` alone no longer gives the plain list.
    """
    from symdiff import Autograd

    plain: dict[str, Any] = {"passes": ()}
    if "fuse" in inspect.signature(Autograd).parameters:
        plain["fuse"] = False
    return {"default": {}, CROSSENT_ONLY: {**plain, "passes": ("crossent_softmax",)}, "unfused": plain}


def engine_call(kwargs: dict[str, Any]) -> str:
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f"Autograd(xm{args})"


def engine_description(xm: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """How a configuration is built and the rewrites it really applies (read off an ``Autograd``)."""
    from symdiff import Autograd

    ad = Autograd(xm, **kwargs)
    return {"call": engine_call(kwargs), "passes": list(ad.passes)}


def count_update_steps(model: Any, codes: np.ndarray, targets: np.ndarray,
                       engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Forward and backward steps of one update (forward pass + backward pass), from the engine's counters.

    ``engine`` holds ``Autograd`` keyword arguments (see :func:`engines`).
    """
    from symdiff import Autograd

    xm = model.xm
    ad = Autograd(xm, **(engine or {}))
    wengert = xm.operationSequence(xm.register("loss"))
    inputs = {**model.params, **model.feed(codes), "y": targets}
    ad.reset_counts()
    values = ad.eval(wengert, inputs)
    grads = ad.bprop(wengert, values, loss=np.ones((), dtype=model.dtype))
    missing = [p for p in xm.params() if p not in grads]
    if missing:
        raise ExperimentError(f"the update computed no gradient for {missing}")
    program = ad.compile(wengert)
    ops: dict[str, int] = {}
    for step in program.steps:
        ops[step.op] = ops.get(step.op, 0) + 1
    return {"forward_steps": ad.forward_steps, "backward_steps": ad.backward_steps,
            "wengert_steps": len(wengert), "compiled_steps": len(program.steps), "op_counts": ops}


def run_steps(dataset: str | os.PathLike[str] | None = None, *, models: Sequence[str] = ("lstm", "mlp"),
              batch_sizes: Sequence[int] = BATCH_SIZES, max_lens: Sequence[int] = MAX_LENS,
              num_hid: int = NUM_HID, base_batch: int = BASE_BATCH, base_len: int = BASE_LEN,
              seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Count the steps of one update at every grid setting, for the default and the unfused engine.

    With a ``dataset`` the batch is the first ``N`` training titles (only the
    counts are kept); without one it is random character codes over 30
    characters and 5 labels. The counts do not depend on the values either way.
    """
    from . import data as D
    from .training import build_model

    _check_sizes(batch_sizes, "batch sizes")
    _check_sizes(max_lens, "max lengths")
    progress = progress or NoProgress()
    rng = np.random.default_rng(seed)
    ds = None
    if dataset is not None:
        try:
            ds = D.load_dataset(D.resolve_dataset(str(dataset)))
        except D.DataError as exc:
            raise ExperimentError(str(exc)) from None
        num_chars, num_labels = ds.vocab.num_chars, ds.vocab.num_labels
    else:
        num_chars, num_labels = 30, 5
    grid = timing_grid(batch_sizes, max_lens, base_batch, base_len)
    configs = engines()
    progress.start("steps", len(models) * len(grid) * len(configs))
    started, t0 = time.time(), time.perf_counter()
    rows = []
    for kind in models:
        for n, m in grid:
            model = build_model(kind, dict(max_len=m, num_chars=num_chars, num_hid=num_hid,
                                           num_labels=num_labels), seed=seed)
            if ds is not None and len(ds.train) >= n:
                codes = ds.vocab.encode_titles(ds.train.titles[:n], m)
                labels = ds.train.label_ids[:n]
            else:
                codes = rng.integers(-1, num_chars, size=(n, m)).astype(np.int32)
                labels = rng.integers(0, num_labels, size=n)
            targets = np.eye(num_labels)[labels]
            for engine, kwargs in configs.items():
                counts = count_update_steps(model, codes, targets, kwargs)
                rows.append({"model": kind, "engine": engine, "batch_size": n, "max_len": m, **counts})
                progress.advance(1, f"{kind} N={n} M={m} {engine}")
    progress.finish()
    settings = {"dataset": None if dataset is None else str(dataset), "models": list(models),
                "batch_sizes": list(batch_sizes), "max_lens": list(max_lens), "base_batch": base_batch,
                "base_len": base_len, "num_hid": num_hid, "num_chars": num_chars, "num_labels": num_labels,
                "engines": {k: engine_description(model.xm, v) for k, v in configs.items()}}
    command = _command("steps", dataset=dataset, batch_sizes=batch_sizes, max_lens=max_lens)
    return {"meta": _meta("steps", command, started, time.perf_counter() - t0), "settings": settings,
            "counts": rows, "summary": summarize_steps(rows, settings)}


def _op_kinds(counts: dict[str, int]) -> dict[str, int]:
    """Op counts by kind: a trailing arity (``vconcat10``, ``rsplit20``) is dropped, since it may follow M."""
    kinds: dict[str, int] = {}
    for name, k in counts.items():
        kind = re.sub(r"\d+$", "", name) or name
        kinds[kind] = kinds.get(kind, 0) + k
    return kinds


def summarize_steps(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model and engine: counts along the M sweep (with differences) and along the N sweep."""
    out = []
    for kind in settings["models"]:
        for engine in settings["engines"]:
            def at(n: int, m: int, key: str) -> Any:
                return next(r[key] for r in rows if r["model"] == kind and r["engine"] == engine
                            and r["batch_size"] == n and r["max_len"] == m)

            entry: dict[str, Any] = {"model": kind, "engine": engine}
            for key in ("forward_steps", "backward_steps"):
                along_m = [at(settings["base_batch"], m, key) for m in settings["max_lens"]]
                along_n = [at(n, settings["base_len"], key) for n in settings["batch_sizes"]]
                ms = settings["max_lens"]
                slopes = [(b - a) / (mb - ma) for a, b, ma, mb in zip(along_m, along_m[1:], ms, ms[1:])]
                entry[key] = {"along_M": along_m, "along_N": along_n,
                              "differences_M": [b - a for a, b in zip(along_m, along_m[1:])],
                              "per_character": slopes[0] if slopes and len(set(slopes)) == 1 else None,
                              "linear_in_M": len(set(slopes)) <= 1,
                              "independent_of_N": len(set(along_n)) == 1}
                if entry[key]["per_character"] is not None:
                    entry[key]["intercept"] = along_m[0] - entry[key]["per_character"] * ms[0]
            if len(settings["max_lens"]) > 1:
                # which ops one more character adds to the graph (from the compiled lists, not a formula)
                m0, m1 = settings["max_lens"][0], settings["max_lens"][-1]
                first = _op_kinds(at(settings["base_batch"], m0, "op_counts"))
                last = _op_kinds(at(settings["base_batch"], m1, "op_counts"))
                entry["ops_per_character"] = {op: (last.get(op, 0) - first.get(op, 0)) / (m1 - m0)
                                              for op in sorted(set(first) | set(last))
                                              if last.get(op, 0) != first.get(op, 0)}
            out.append(entry)
    return out


# ---- initialisation (question 5) ------------------------------------------------------------
INIT_CASES: dict[str, dict[str, Any]] = {
    "one-hot": {"title": "one-hot x (a single x_i = 1)", "low": None, "high": None},
    "uniform": {"title": "x_i ~ U[0, 1]", "low": 0.0, "high": 1.0},
    "shifted": {"title": "x_i ~ U[1000, 1001]", "low": 1000.0, "high": 1001.0},
}
BAD_SCALE = {"one-hot": 10.0, "uniform": 1.0, "shifted": 1.0}


def preactivation_moments(case: str, a: float, d: int = 1000) -> tuple[float, float]:
    """Exact mean and standard deviation of ``s = Σ_{i≤d} x_i w_i`` with ``w_i ~ U[0, a]`` independent.

    ``E[w] = a/2``, ``E[w²] = a²/3``. One-hot ``x``: ``s`` is one ``w_k``.
    Independent ``x_i`` with moments ``m1 = E[x]``, ``m2 = E[x²]``:
    ``E[s] = d m1 a/2`` and ``Var[s] = d (m2 a²/3 − m1² a²/4)``.
    """
    if case == "one-hot":
        return a / 2, a / math.sqrt(12)
    lo, hi = INIT_CASES[case]["low"], INIT_CASES[case]["high"]
    m1 = (lo + hi) / 2
    m2 = (lo * lo + lo * hi + hi * hi) / 3
    return d * m1 * a / 2, math.sqrt(d * (m2 / 3 - m1 * m1 / 4)) * a


def recommended_scale(case: str, d: int = 1000) -> float:
    """The ``a`` that makes the root mean square of the pre-activation 1: ``E[s²] = 1``.

    ``E[s²] = mean² + var`` is proportional to ``a²``, so ``a = 1/sqrt(E[s²] at a=1)``.
    Then ``|s|`` is typically about 1, where tanh is far from flat (tanh'(1) ≈ 0.42)
    and far from its saturation point ``atanh(0.99) ≈ 2.65``.
    """
    mean, std = preactivation_moments(case, 1.0, d)
    return 1.0 / math.sqrt(mean * mean + std * std)


def sample_preactivations(case: str, a: float, d: int, draws: int, rng: np.random.Generator,
                          chunk: int = 500) -> np.ndarray:
    """``draws`` independent samples of ``s = Σ x_i w_i`` (fresh ``x`` and ``w`` every draw)."""
    out = np.empty(draws)
    for start in range(0, draws, chunk):
        k = min(chunk, draws - start)
        w = rng.uniform(0.0, a, size=(k, d))
        if case == "one-hot":
            x = np.zeros((k, d))
            x[np.arange(k), rng.integers(0, d, size=k)] = 1.0
        else:
            x = rng.uniform(INIT_CASES[case]["low"], INIT_CASES[case]["high"], size=(k, d))
        out[start:start + k] = np.einsum("ij,ij->i", x, w)
    return out


def init_scales(case: str, d: int = 1000) -> list[tuple[str, float]]:
    """The scales tried for a case: the recommended one, ``a = 1``, and the case's bad one if different."""
    scales = [("recommended", recommended_scale(case, d)), ("a = 1", 1.0)]
    if BAD_SCALE[case] != 1.0:
        scales.append((f"a = {BAD_SCALE[case]:g}", BAD_SCALE[case]))
    return scales


def run_init(*, d: int = 1000, draws: int = 20000, seed: int = 0, bins: int = 60,
             progress: Progress | None = None) -> dict[str, Any]:
    """Sample ``s`` and ``f = tanh(s)`` for every case and scale; saturation fraction and histograms."""
    _check_positive(d=d, draws=draws, bins=bins)
    progress = progress or NoProgress()
    rng = np.random.default_rng(seed)
    started, t0 = time.time(), time.perf_counter()
    total = sum(len(init_scales(c, d)) for c in INIT_CASES)
    progress.start("init", total)
    rows = []
    for case in INIT_CASES:
        samples = []
        for label, a in init_scales(case, d):
            s = sample_preactivations(case, a, d, draws, rng)
            fs = np.tanh(s)
            mean, std = preactivation_moments(case, a, d)
            samples.append(s)
            rows.append({"case": case, "title": INIT_CASES[case]["title"], "label": label, "a": a,
                         "bad": a == BAD_SCALE[case], "recommended": label == "recommended",
                         "mean_s": float(s.mean()), "std_s": float(s.std()),
                         "mean_s_exact": mean, "std_s_exact": std,
                         "q01": float(np.quantile(s, 0.01)), "q50": float(np.quantile(s, 0.5)),
                         "q99": float(np.quantile(s, 0.99)),
                         "saturated_fraction": float((np.abs(fs) > SATURATED).mean()),
                         "mean_dtanh": float((1 - fs * fs).mean())})
            progress.advance(1, f"{case} a={a:.3g}")
        # one set of log-spaced bins per case, covering every scale tried (s > 0 in all three cases)
        lo = min(max(float(np.quantile(x, 0.001)), 1e-12) for x in samples)
        hi = max(float(x.max()) for x in samples)
        edges = np.geomspace(lo, hi * 1.0001, bins + 1)
        for row, s in zip(rows[-len(samples):], samples):
            counts, _ = np.histogram(np.clip(s, edges[0], edges[-1]), bins=edges)
            row["hist_edges"] = edges.tolist()
            row["hist_counts"] = counts.tolist()
    progress.finish()
    settings = {"d": d, "draws": draws, "seed": seed, "saturation_threshold": SATURATED,
                "s_saturated": S_SATURATED, "bad_scale": BAD_SCALE}
    command = _command("init", draws=draws, seed=seed)
    return {"meta": _meta("init", command, started, time.perf_counter() - t0), "settings": settings,
            "results": rows}


# ---- saving ---------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` completely or not at all (temporary file, then rename); errors as one line."""
    try:
        save_bytes(path, data)
    except OSError as exc:
        raise ExperimentError(f"{path}: cannot write ({exc.strerror or exc})") from None



def _csv_rows(name: str, data: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    if name == "timing":
        fields = ["model", "batch_size", "max_len", "repeat", "epoch", "train_seconds", "batches",
                  "train_rows", "train_loss"]
        return fields, data["measurements"]
    if name == "steps":
        fields = ["model", "engine", "batch_size", "max_len", "forward_steps", "backward_steps",
                  "wengert_steps", "compiled_steps"]
        return fields, data["counts"]
    fields = ["case", "label", "a", "mean_s", "std_s", "mean_s_exact", "std_s_exact", "q01", "q50", "q99",
              "saturated_fraction", "mean_dtanh"]
    return fields, data["results"]


def output_dir(out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ExperimentError(f"--out {out}: not a folder") from None
    except OSError as exc:
        raise ExperimentError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise ExperimentError(f"--out {out}: folder is not writable")
    return out


def save(name: str, data: dict[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Write ``<out>/<name>.json`` (everything) and ``<out>/<name>.csv`` (the raw rows)."""
    out = output_dir(out)
    js = out / f"{name}.json"
    _atomic_write_bytes(js, json.dumps(data, indent=1).encode() + b"\n")
    fields, rows = _csv_rows(name, data)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path = out / f"{name}.csv"
    _atomic_write_bytes(path, buf.getvalue().encode())
    return [js, path]


def load(name: str, out: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(out) / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ExperimentError(f"{path}: unreadable ({exc}); re-run `symdiff experiment {name}`") from None


# ---- plots ----------------------------------------------------------------------------------
FIGURES = {"timing": ("timing_vs_batch_size.png", "timing_vs_max_len.png"),
           "steps": ("steps_lstm.png",), "init": ("init_preactivation.png",)}


def _pyplot() -> Any | None:
    """matplotlib's pyplot on the Agg backend, or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plots_available() -> bool:
    return _pyplot() is not None


def save_plots(name: str, data: dict[str, Any], out: str | os.PathLike[str]) -> list[Path] | None:
    """Draw the experiment's figures into ``out``; ``None`` when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    out = output_dir(out)
    draw = {"timing": _plot_timing, "steps": _plot_steps, "init": _plot_init}[name]
    paths = []
    for filename, fig in zip(FIGURES[name], draw(plt, data)):
        path = out / filename
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
        plt.close(fig)
        _atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def _plot_timing(plt: Any, data: dict[str, Any]) -> list[Any]:
    s = data["settings"]
    figs = []
    for sweep, label, fixed in (("batch_size", "batch size N", f"M = {s['base_len']}"),
                                ("max_len", "max length M", f"N = {s['base_batch']}")):
        fig, ax = plt.subplots(figsize=(5.6, 3.8))
        for kind in s["models"]:
            rows = [r for r in data["summary"] if r["model"] == kind and r["sweep"] == sweep]
            xs = [r["value"] for r in rows]
            med = np.array([r["median"] for r in rows])
            err = np.array([[m - r["min"] for m, r in zip(med, rows)], [r["max"] - m for m, r in zip(med, rows)]])
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=4, label=kind.upper())
        ax.set_yscale("log")
        ax.set_xticks(s["batch_sizes"] if sweep == "batch_size" else s["max_lens"])
        ax.set_xlabel(label)
        ax.set_ylabel("training seconds per epoch (log scale)")
        ax.set_title(f"time per epoch vs {label.split()[-1]} ({fixed}; median, bars = min..max "
                     f"of {s['repeats']})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        figs.append(fig)
    return figs


def _plot_steps(plt: Any, data: dict[str, Any]) -> list[Any]:
    s = data["settings"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.8), sharey=True)
    colors = dict(zip(s["engines"], ("tab:blue", "tab:green", "tab:orange", "tab:red")))
    for entry in data["summary"]:
        if entry["model"] != "lstm":
            continue
        for key, style in (("forward_steps", "o--"), ("backward_steps", "s-")):
            lab = f"{key.split('_')[0]}, {entry['engine']}"
            kw: dict[str, Any] = dict(color=colors[entry["engine"]], label=lab)
            if entry["engine"] == CROSSENT_ONLY:  # one backward step from unfused: draw it thin, on top
                kw.update(lw=1, markersize=3, zorder=3)
            left.plot(s["max_lens"], entry[key]["along_M"], style, **kw)
            right.plot(s["batch_sizes"], entry[key]["along_N"], style, **kw)
    left.set_xlabel(f"max length M (N = {s['base_batch']})")
    right.set_xlabel(f"batch size N (M = {s['base_len']})")
    left.set_ylabel("steps in one LSTM update")
    left.set_xticks(s["max_lens"])
    right.set_xticks(s["batch_sizes"])
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    left.legend(fontsize=7)
    fig.suptitle("engine-counted steps of one LSTM update (forward dashed, backward solid)", fontsize=10)
    fig.tight_layout()
    return [fig]


def _plot_init(plt: Any, data: dict[str, Any]) -> list[Any]:
    fig, axes = plt.subplots(1, len(INIT_CASES), figsize=(11, 3.6))
    for ax, case in zip(axes, INIT_CASES):
        rows = [r for r in data["results"] if r["case"] == case]
        for r in rows:
            edges = np.array(r["hist_edges"])
            ax.stairs(r["hist_counts"], edges,
                      label=f"{'recommended ' if r['recommended'] else ''}a = {r['a']:.3g}: "
                            f"{100 * r['saturated_fraction']:.1f}% saturated")
        ax.set_xscale("log")
        ax.axvspan(S_SATURATED, max(r["hist_edges"][-1] for r in rows), color="red", alpha=0.08)
        ax.axvline(S_SATURATED, color="red", lw=0.8)
        ax.set_title(rows[0]["title"], fontsize=9)
        ax.set_xlabel("s = Σ x_i w_i (log scale; red: |tanh s| > 0.99)", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel(f"count of {data['settings']['draws']} draws")
    fig.tight_layout()
    return [fig]


# ---- one entry point per experiment ---------------------------------------------------------
def run(name: str, *, dataset: str | None = None, epochs: int = 2, repeats: int = 3, seed: int = 0,
        batch_sizes: Sequence[int] = BATCH_SIZES, max_lens: Sequence[int] = MAX_LENS, draws: int = 20000,
        progress: Progress | None = None) -> dict[str, Any]:
    if name == "timing":
        return run_timing(dataset, epochs=epochs, repeats=repeats, seed=seed, batch_sizes=batch_sizes,
                          max_lens=max_lens, progress=progress)
    if name == "steps":
        return run_steps(dataset if dataset is not None else default_dataset(), batch_sizes=batch_sizes,
                         max_lens=max_lens, seed=seed, progress=progress)
    if name == "init":
        return run_init(draws=draws, seed=seed, progress=progress)
    raise ExperimentError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")


def summary_table(name: str, data: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """``(title, columns, rows)`` of strings for the CLI to show."""
    if name == "timing":
        cols = ["model", "N", "M", "batches", "median s/epoch", "min", "max", "ms/batch"]
        rows = [[r["model"], str(r["batch_size"]), str(r["max_len"]), str(r["batches"]), f"{r['median']:.3f}",
                 f"{r['min']:.3f}", f"{r['max']:.3f}", f"{r['median_ms_per_batch']:.2f}"]
                for r in _dedup(data["summary"])]
        s = data["settings"]
        return (f"training seconds per epoch ({s['epochs']} epoch(s) x {s['repeats']} repeat(s), "
                f"{s['rows']['train']} training rows)", cols, rows)
    if name == "steps":
        cols = ["model", "engine", "N", "M", "forward steps", "backward steps"]
        rows = [[r["model"], r["engine"], str(r["batch_size"]), str(r["max_len"]), str(r["forward_steps"]),
                 str(r["backward_steps"])] for r in data["counts"]]
        return "steps in one update (engine counters)", cols, rows
    cols = ["case", "scale", "a", "mean s", "std s", "saturated", "mean tanh'"]
    rows = [[r["case"], r["label"], f"{r['a']:.4g}", f"{r['mean_s']:.4g}", f"{r['std_s']:.3g}",
             f"{100 * r['saturated_fraction']:.1f}%", f"{r['mean_dtanh']:.3f}"] for r in data["results"]]
    return f"pre-activation of tanh(Σ x_i w_i), d={data['settings']['d']}, w_i ~ U[0, a]", cols, rows


def _dedup(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows with the setting shared by both sweeps (N=64, M=10) listed once."""
    seen, out = set(), []
    for r in summary:
        key = (r["model"], r["batch_size"], r["max_len"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


# ---- checks ---------------------------------------------------------------------------------
def _check_positive(**values: int) -> None:
    for k, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ExperimentError(f"{k} must be a whole number >= 1, got {v!r}")


def _check_sizes(values: Sequence[int], what: str) -> None:
    if not values:
        raise ExperimentError(f"no {what} given")
    if any(not isinstance(v, (int, np.integer)) or v < 1 for v in values):
        raise ExperimentError(f"{what} must be whole numbers >= 1, got {list(values)}")
    if list(values) != sorted(set(values)):
        raise ExperimentError(f"{what} must be increasing and distinct, got {list(values)}")


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"16,32,64"`` → ``(16, 32, 64)``: increasing whole numbers >= 1 (an argparse ``type=``)."""
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as 16,32,64, "
                                         f"got {text!r}") from None
    if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"expected increasing whole numbers >= 1 such as 16,32,64, got {text!r}")
    return values


def parse_positive_int(text: str) -> int:
    """A whole number >= 1 (an argparse ``type=``): the training flags' own check."""
    from .flags import positive_int

    return positive_int(text)


# ---- the report -----------------------------------------------------------------------------
def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def _g(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"


def _md_table(cols: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(cols) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _figure(report_dir: Path, out: Path, filename: str, alt: str) -> str:
    path = out / filename
    if not path.exists():
        return f"*(figure `{filename}` not drawn: matplotlib is not installed — `{PLOTS_HINT}`, then " \
               f"`symdiff experiment report`)*"
    rel = os.path.relpath(path, report_dir).replace(os.sep, "/")
    return f"![{alt}]({rel})"


def _timing_section(t: dict[str, Any], steps: dict[str, Any] | None, report_dir: Path, out: Path) -> list[str]:
    s, meta = t["settings"], t["meta"]
    summ = summarize_timing(t["measurements"], s)  # from the raw measurements
    rows_n = {k: [r for r in summ if r["model"] == k and r["sweep"] == "batch_size"] for k in s["models"]}
    rows_m = {k: [r for r in summ if r["model"] == k and r["sweep"] == "max_len"] for k in s["models"]}
    rows = s["rows"]
    L = ["## 1. Training time per epoch", ""]
    L.append(f"Dataset `{s['dataset']}` ({rows['train']:,} training / {rows['valid']:,} validation rows, "
             f"{s['num_chars']} characters, {s['num_labels']} labels); num_hid {s['num_hid']}, learning rate "
             + ", ".join(f"{v:g} ({k.upper()})" for k, v in s["init_lr"].items())
             + f", plain SGD, float64, seed {s['seed']}"
             + ({True: ", the trainer's default engine (elementwise fusion on, §2)",
                 False: ", elementwise fusion off"}.get(s.get("fuse"), ""))
             + f". Every setting was trained {s['repeats']} time(s) for "
             f"{s['epochs']} epoch(s) from the same initial parameters and batch order. The time is the "
             "`train_seconds` the `Trainer` reports: the minibatch loop only (forward, backward, update), without "
             "loading, compiling or validation. A run's figure is the mean over its epochs; the tables give the "
             "median over repeats and the min–max spread.")
    if t.get("warnings"):
        L += ["", "Runs that stopped early: " + "; ".join(t["warnings"])]

    def table(rowsets: dict[str, list[dict[str, Any]]], key: str, label: str) -> str:
        body = []
        for kind, rs in rowsets.items():
            for r in rs:
                body.append([kind.upper(), str(r[key]), str(r["batches"]), _f(r["median"]),
                             f"{_f(r['min'])} – {_f(r['max'])}", _f(r["median_ms_per_batch"], 2)])
        return _md_table(["model", label, "batches/epoch", "median s/epoch", "min – max", "ms/batch"], body)

    L += ["", f"### Against the batch size N (M = {s['base_len']})", "",
          table(rows_n, "batch_size", "N"), "",
          _figure(report_dir, out, FIGURES["timing"][0], "seconds per epoch against N"), "",
          f"### Against the maximum length M (N = {s['base_batch']})", "",
          table(rows_m, "max_len", "M"), "",
          _figure(report_dir, out, FIGURES["timing"][1], "seconds per epoch against M"), ""]

    # the why, with the numbers that support it
    L += ["### Why", ""]
    step_at: dict[tuple[str, int], int] = {}
    if steps is not None:
        for c in steps["counts"]:
            if c["engine"] == "default" and c["batch_size"] == steps["settings"]["base_batch"]:
                step_at[c["model"], c["max_len"]] = c["forward_steps"] + c["backward_steps"]
    fits = {}
    for kind, rs in rows_n.items():
        if len(rs) >= 2:
            ns = np.array([r["batch_size"] for r in rs], dtype=float)
            per_batch = np.array([r["median"] / r["batches"] for r in rs])
            beta, alpha = np.polyfit(ns, per_batch, 1)
            fits[kind] = (alpha, beta, rs)
    if fits:
        parts, not_falling = [], []
        for kind, (alpha, beta, rs) in fits.items():
            first, last = rs[0], rs[-1]
            if alpha > 0 and beta > 0:
                share = alpha / (first["median"] / first["batches"])
                fit = (f"α = {_f(1000 * alpha, 2)} ms per update and β = {_f(1e6 * beta, 1)} µs per row, so at "
                       f"N = {first['batch_size']} the fixed part is {100 * share:.0f}% of an update")
            else:
                fit = (f"α = {_f(1000 * alpha, 2)} ms, β = {_f(1e6 * beta, 1)} µs per row — a fit the noise has "
                       "spoilt (a negative term means nothing physical)")
            parts.append(f"{kind.upper()}: {fit}; epoch time went from {_f(first['median'])} s to "
                         f"{_f(last['median'])} s (×{_f(last['median'] / first['median'], 2)}) from "
                         f"N = {first['batch_size']} to {last['batch_size']}")
            if last["median"] >= first["median"]:
                not_falling.append(kind.upper())
        n_fixed = ""
        if ("lstm", s["base_len"]) in step_at:
            n_fixed = (f" (at M = {s['base_len']} the LSTM's update is {step_at['lstm', s['base_len']]} engine steps, the "
                       f"MLP's {step_at.get(('mlp', s['base_len']), '?')}: §2)")
        caveat = ""
        if not_falling:
            caveat = (f" *In this run the epoch time of the {' and '.join(not_falling)} did not fall from the "
                      "smallest to the largest N: the noise on this shared machine exceeded the effect there; "
                      "compare the min–max columns.*")
        L += ["**Per-epoch time falls as N grows.** An epoch is ⌈rows/N⌉ updates. Every update pays a fixed "
              "price — one Python-level kernel call per step of the Wengert list, each with numpy's call "
              f"overhead, whatever the batch size{n_fixed} — plus work that grows with the N rows of each matrix. "
              "Fitting the median time per update to α + β·N gives " + "; ".join(parts) + ". "
              "Larger batches spread the fixed price over more rows, so fewer, only slightly dearer updates "
              "make a shorter epoch; the gain shrinks as N grows because the per-row work (β × rows per "
              "epoch) is a floor that batching cannot remove." + caveat, ""]
    ratios = {}
    for kind, rs in rows_m.items():
        if len(rs) >= 2:
            ratios[kind] = (rs[0], rs[-1], rs[-1]["median"] / rs[0]["median"])
    if ratios:
        m0, m1 = s["max_lens"][0], s["max_lens"][-1]
        growth = "; ".join(f"{k.upper()} {_f(a['median'])} → {_f(b['median'])} s per epoch "
                           f"(+{_f(b['median'] - a['median'])} s, ×{_f(r, 2)}; per update "
                           f"{_f(a['median_ms_per_batch'], 2)} → {_f(b['median_ms_per_batch'], 2)} ms)"
                           for k, (a, b, r) in ratios.items())
        text = (f"**The LSTM's time grows with M, the MLP's much less.** From M = {m0} to M = {m1}: {growth}. ")
        if ("lstm", m0) in step_at and ("lstm", m1) in step_at:
            sr = step_at["lstm", m1] / step_at["lstm", m0]
            lstm_a, lstm_b, _ = ratios.get("lstm", (None, None, None))
            text += (f"The LSTM is unrolled over the M characters, so its graph itself grows: one update is "
                     f"{step_at['lstm', m0]} engine steps at M = {m0} and {step_at['lstm', m1]} at M = {m1} "
                     f"(×{_f(sr, 2)}, §2), each a numpy call on matrices of N rows, and the cells must run one "
                     "after another")
            if lstm_a is not None:
                us0 = 1e6 * lstm_a["median"] / lstm_a["batches"] / step_at["lstm", m0]
                us1 = 1e6 * lstm_b["median"] / lstm_b["batches"] / step_at["lstm", m1]
                same = 0.8 <= us1 / us0 <= 1.25
                text += (f"; the time per engine step {'stays about the same' if same else 'changes'} "
                         f"({_f(us0, 1)} µs at M = {m0}, {_f(us1, 1)} µs at M = {m1}), so the time follows the "
                         "step count (a little below it: the parameter update and the output layer do not grow "
                         "with M)")
            text += ". "
        else:
            text += ("The LSTM is unrolled over the M characters, so every extra character adds a whole block of "
                     "gate, cell and hidden-state steps to its graph. ")
        if ("mlp", m0) in step_at and ("mlp", m1) in step_at:
            text += (f"The MLP's graph is the same {step_at['mlp', m0]} steps for every M: a longer title only "
                     "widens its one-hot input, and with the gather path `X·W1` picks M rows of `W1` per title "
                     "(the backward pass scatter-adds M rows) — N·M·num_hid additions, no new steps. ")
        if "lstm" in ratios and "mlp" in ratios:
            (la, lb, lr), (ma, mb, mr) = ratios["lstm"], ratios["mlp"]
            d_l, d_m = lb["median"] - la["median"], mb["median"] - ma["median"]
            if d_l <= d_m:
                text += ("*In this run the measured growth does not show the expected difference; with two shared "
                         "cores the noise can exceed the effect — compare the min–max columns.* ")
            else:
                text += (f"In absolute terms the LSTM's epoch grew {_f(d_l / d_m, 0)} times as much as the MLP's. ")
                if mr >= 0.75 * lr:
                    text += (f"Relative to its own size the MLP's time still grew noticeably (×{_f(mr, 2)} against "
                             f"the LSTM's ×{_f(lr, 2)}): its whole update costs only "
                             f"{_f(ma['median_ms_per_batch'], 2)} ms, so even the gather and scatter of M rows of "
                             "`W1` is a visible share of it, while for the LSTM that share is lost among its "
                             "cells. ")
        L += [text, ""]
    return L


ENGINE_NOTES = {
    "default": "the engine as the trainer runs it, with every rewrite it applies by default",
    CROSSENT_ONLY: "the plain list with only the `crossent_softmax` rewrite, which fuses "
                   "`crossEnt(softMax(o), y)` into one step — the engine's only default rewrite before the "
                   "performance passes",
    "unfused": "the plain Wengert list, one step per op — what the assignment's step counts refer to",
}


def _steps_section(st: dict[str, Any], report_dir: Path, out: Path) -> list[str]:
    s = st["settings"]
    summ = summarize_steps(st["counts"], s)  # from the raw counts, not a stored summary
    L = ["## 2. Forward and backward steps in one LSTM update", "",
         "Counted by the engine, not by a formula: `Autograd.reset_counts()`, then `eval` and `bprop` of the "
         "loss's Wengert list on one batch"
         + (f" (the first N training titles of `{s['dataset']}`)" if s.get("dataset") else " of random titles")
         + ", then `forward_steps` / `backward_steps`. A forward step is one (possibly fused) op evaluated; a "
         "backward step is one derivative taken, one per input of a step that leads to a parameter (so `h0`, "
         "`c0`, the characters and the labels get none). The engine configurations counted:", ""]
    for name, eng in s["engines"].items():
        applied = ", ".join(f"`{p}`" for p in eng["passes"]) or "none"
        L.append(f"* *{name}* — `{eng['call']}`: {ENGINE_NOTES.get(name, '')} (rewrites applied: {applied}).")
    if "fuse=False" in s["engines"].get("unfused", {}).get("call", ""):
        L += ["", "Elementwise fusion is switched by `fuse`, not by `passes` (it is on by default), so "
              "`Autograd(xm, passes=())` alone no longer runs the plain list; the unfused counts need "
              "`fuse=False` as well."]
    body = []
    for e in summ:
        for key in ("forward_steps", "backward_steps"):
            c = e[key]
            fit = (f"{c['per_character']:g}·M + {c['intercept']:g}" if c.get("per_character") is not None
                   else "not linear")
            body.append([e["model"].upper(), e["engine"], key.split("_")[0],
                         *[str(v) for v in c["along_M"]], ", ".join(str(d) for d in c["differences_M"]),
                         fit, " / ".join(str(v) for v in c["along_N"])])
    cols = ["model", "engine", "steps", *[f"M={m}" for m in s["max_lens"]], "differences", "fit",
            "N=" + "/".join(str(n) for n in s["batch_sizes"]) + f" (M={s['base_len']})"]
    L += ["", _md_table(cols, body, "lll" + "r" * (len(cols) - 3)), "",
          f"(M sweep at N = {s['base_batch']}, N sweep at M = {s['base_len']}; num_hid {s['num_hid']}, "
          f"{s['num_chars']} characters, {s['num_labels']} labels.)", "",
          _figure(report_dir, out, FIGURES["steps"][0], "steps of one LSTM update against M and N"), ""]

    def entry(model: str, engine: str) -> dict[str, Any] | None:
        return next((e for e in summ if e["model"] == model and e["engine"] == engine), None)

    def comp(e: dict[str, Any]) -> str:
        return ", ".join(f"{_g(v)} × `{k}`" for k, v in sorted(e.get("ops_per_character", {}).items(),
                                                                key=lambda kv: (-kv[1], kv[0])))

    unf, dflt, ce = entry("lstm", "unfused"), entry("lstm", "default"), entry("lstm", CROSSENT_ONLY)
    ms = ", ".join(str(m) for m in s["max_lens"])
    if unf is not None and unf.get("ops_per_character") and unf["forward_steps"].get("per_character") is not None:
        fw, bw = unf["forward_steps"], unf["backward_steps"]
        text = (f"**Linear in M.** The LSTM is unrolled: its graph holds one copy of the cell per character and "
                f"every copy is the same block of ops — per extra character the plain list gains {comp(unf)} "
                f"(read off the compiled lists at M = {s['max_lens'][0]} and {s['max_lens'][-1]}), "
                f"{_g(fw['per_character'])} forward steps, and {_g(bw['per_character'])} backward steps (most of "
                "those ops have two inputs on the path to a parameter, hence two derivatives). Only the count of "
                f"copies depends on M, so the differences between M = {ms} are equal for every configuration. "
                f"The intercepts ({_g(fw['intercept'])} forward, {_g(bw['intercept'])} backward, unfused) are the "
                "output layer, softmax and loss, less the derivatives the first cell does not need because `h0` "
                "and `c0` are inputs. ")
        if dflt is not None and dflt.get("ops_per_character"):
            df, db = dflt["forward_steps"], dflt["backward_steps"]
            rewrites = ", ".join(f"`{p}`" for p in s["engines"]["default"]["passes"]) or "none"
            if df.get("per_character") is not None and df["per_character"] != fw["per_character"]:
                text += (f"The default engine (rewrites {rewrites}) compiles the same block into {comp(dflt)}, so "
                         f"a character costs it {_g(df['per_character'])} forward and {_g(db['per_character'])} "
                         f"backward steps instead of {_g(fw['per_character'])} and {_g(bw['per_character'])}: "
                         "fewer, bigger steps, still linear in M. ")
        text += ("\n\n**Independent of N.** N is the number of rows of every matrix, not part of the graph: a step is "
                 "one op over the whole batch, so a bigger batch makes steps dearer (§1), never more numerous. ")
        if ce is not None:
            d_f = ce["forward_steps"]["along_M"][0] - fw["along_M"][0]
            d_b = ce["backward_steps"]["along_M"][0] - bw["along_M"][0]
            same = (all(c - u == d_f for c, u in zip(ce["forward_steps"]["along_M"], fw["along_M"]))
                    and all(c - u == d_b for c, u in zip(ce["backward_steps"]["along_M"], bw["along_M"])))
            where = "at every M and N" if same else f"at M = {s['max_lens'][0]}"
            text += (f"\n\n**The crossEnt-softMax pass** on its own changes the counts by {d_f:+d} forward and "
                     f"{d_b:+d} backward step(s) ({where}; *{CROSSENT_ONLY}* "
                     "against *unfused*): it swaps `crossEnt` for `crossEnt-softMax` one for one and keeps `softMax` "
                     "to produce the probabilities, so as many ops are evaluated, but the plain list takes two "
                     "derivatives at the loss (through `crossEnt`, then `softMax`) where the fused step takes one "
                     "(`p − y` with respect to the logits). ")
        mlp = entry("mlp", "unfused") or entry("mlp", "default")
        if mlp is not None:
            text += (f"\n\nFor contrast the MLP's update is {mlp['forward_steps']['along_M'][0]} forward and "
                     f"{mlp['backward_steps']['along_M'][0]} backward steps ({mlp['engine']}) for every M and N.")
        L += [text, ""]
    return L


def _attention_section() -> list[str]:
    from symdiff import XMan, f, grad_check
    from symdiff.nn import attention

    rng = np.random.default_rng(0)
    M, N, n = 3, 5, 4
    xm = XMan()
    xm.Q = f.param(name="Q", default=rng.normal(size=(M, n)))
    xm.D = f.param(name="D", default=rng.normal(size=(N, n)))
    xm.T = f.input(name="T", default=np.eye(N)[rng.integers(0, N, size=M)])
    xm.A = attention(xm.Q, xm.D)
    xm.loss = f.mean(f.crossEnt(xm.A, xm.T))
    xm.setup()
    w = xm.operationSequence(xm.register("loss"))
    rep = grad_check(xm, w, max_elements=None, passes=())
    worst = max(p.max_rel for p in rep.params)
    return ["## 3. Soft attention (question 4)", "",
            "For queries `Q` (M × n, one query per row) and document vectors `D` (N × n), all the attention "
            "distributions `α_i = softmax_j(q_iᵀ d_j)` at once are the rows of", "",
            "    A = softMax(Q Dᵀ)        (M × N; softMax row-wise)", "",
            "one matrix product with a transpose and one row-wise softmax: `S = Q Dᵀ` holds every score "
            "`S_ij = q_iᵀ d_j`, and the softmax normalises each row over j. `symdiff/nn.py` builds it from "
            "engine ops, `f.softMax(f.mul(Q, f.transpose(D)))` (`attend` also returns the attended vectors "
            "`A D`). `tests/test_nn.py` compares `A` with a per-query numpy loop and gradient-checks "
            "`mean(crossEnt(A, T))` with `Q` and `D` as parameters. Checked again while writing this report: "
            f"{', '.join(f'{p.name} {p.shape}' for p in rep.params)}, every element, no graph rewrites (`passes=()`) — largest "
            f"relative difference between backprop and central differences {worst:.1e} "
            f"({'agree' if rep.ok else 'DISAGREE'}).", ""]


def _init_section(ini: dict[str, Any], report_dir: Path, out: Path) -> list[str]:
    s = ini["settings"]
    d = s["d"]
    res = ini["results"]
    rec = {r["case"]: r for r in res if r["recommended"]}
    bad = {r["case"]: r for r in res if r["bad"]}
    one = [r for r in res if r["case"] == "one-hot" and r["a"] == 1.0]
    L = ["## 4. Initialisation scale for tanh (question 5)", "",
         f"`f = tanh(s)`, `s = Σ_(i=1..{d}) x_i w_i`, `w_i ~ U[0, a]` independent of each other and of x, so "
         "`E[w] = a/2` and `E[w²] = a²/3`. tanh is responsive for |s| of order 1 (tanh′(1) = 0.42) and flat "
         f"once |s| > atanh({SATURATED}) = {S_SATURATED:.2f}, where |f| > {SATURATED} and the gradient "
         "1 − f² < 0.02. Because every x_i and w_i is non-negative, s is never negative and its **mean** is what "
         "must be controlled, not only its spread. The rule used: make the root mean square of s equal to 1, "
         "`E[s²] = E[s]² + Var[s] = 1`; both terms are proportional to a², so `a = 1 / sqrt(E[s²] at a = 1)`.", "",
         "* **(1) one-hot x** (exactly one x_k = 1): `s = w_k ~ U[0, a]`, `E[s²] = a²/3`, so **a = √3 ≈ 1.73**, "
         "independent of d. s then lies in [0, 1.73] and can never saturate; any a up to about 2.6 would do.",
         "* **(2) x_i ~ U[0, 1]** (`E[x] = 1/2`, `E[x²] = 1/3`): `E[s] = d·a/4`, "
         "`Var[s] = d·a²·(1/9 − 1/16) = 7·d·a²/144`, so `a = 1/sqrt(d²/16 + 7d/144)` ≈ 4/d "
         f"= **{_g(rec['uniform']['a'], 4)}** for d = {d}.",
         "* **(3) x_i ~ U[1000, 1001]** (`E[x] = 1000.5`, `E[x²] = 1000.5² + 1/12`): `E[s] = d·1000.5·a/2`, "
         "`Var[s] = d·a²·(E[x²]/3 − E[x]²/4)`, so a ≈ 2/(1000.5·d) "
         f"= **{_g(rec['shifted']['a'], 4)}**.", "",
         "In general, with non-negative inputs the mean dominates and `a ≈ 2/(d·E[x])`: the scale must shrink like "
         "1/d (and like 1/E[x]), not like 1/√d as for zero-mean weights.", "",
         f"**The experiment** (`{ini['meta']['command']}`) draws {s['draws']:,} independent (x, w) pairs per case "
         "and scale and measures s, the fraction of saturated units (|f| > "
         f"{SATURATED}) and the mean slope tanh′(s):", ""]
    body = [[r["title"], r["label"], _g(r["a"], 4), f"{_g(r['mean_s'], 4)} ({_g(r['mean_s_exact'], 4)})",
             f"{_g(r['std_s'], 3)} ({_g(r['std_s_exact'], 3)})", f"{_g(r['q01'], 3)} – {_g(r['q99'], 3)}",
             f"{100 * r['saturated_fraction']:.1f}%", _f(r["mean_dtanh"])] for r in res]
    L += [_md_table(["x", "scale", "a", "mean s (exact)", "std s (exact)", "1%–99% of s", "saturated", "mean tanh′"],
                    body, "llrrrrrr"), "",
          _figure(report_dir, out, FIGURES["init"][0], "distribution of the pre-activation"), ""]
    text = (f"With the recommended scales no unit saturates and the mean slope is "
            f"{', '.join(_f(rec[c]['mean_dtanh']) for c in INIT_CASES)} (cases 1–3). With a = 1, cases (2) and (3) "
            f"put s near {_g(bad['uniform']['mean_s'], 3)} and {_g(bad['shifted']['mean_s'], 3)}: "
            f"{100 * bad['uniform']['saturated_fraction']:.0f}% and {100 * bad['shifted']['saturated_fraction']:.0f}% "
            "of units saturated, tanh′ = 0 to double precision, so no gradient reaches the weights. ")
    if one:
        text += (f"For one-hot inputs a = 1 is harmless ({100 * one[0]['saturated_fraction']:.0f}% saturated, s ≤ 1); "
                 f"a badly chosen a = {_g(bad['one-hot']['a'])} saturates "
                 f"{100 * bad['one-hot']['saturated_fraction']:.0f}% of them. ")
    ratio = rec["shifted"]["std_s"] / rec["shifted"]["mean_s"]
    text += (f"A caveat the numbers make plain: in case (3) the recommended a keeps s in range, but s varies by only "
             f"{100 * ratio:.1f}% of its mean from unit to unit — the inputs' information sits in their fractional "
             "parts, which weights that are all positive cannot pick out, and std/mean of s does not depend on a at "
             "all. Centring the inputs (x − 1000.5) or zero-mean weights would fix that; no choice of a can.")
    L += [text, ""]
    return L


def write_report(out: str | os.PathLike[str] = DEFAULT_OUT, report: str | os.PathLike[str] = DEFAULT_REPORT,
                 *, replot: bool = True) -> tuple[Path, list[str]]:
    """Write the markdown report from ``<out>/{timing,steps,init}.json``; returns its path and notes.

    With matplotlib installed the figures are redrawn from the same JSON first,
    so figures, tables and text always agree.
    """
    out = Path(out)
    data = {name: load(name, out) for name in EXPERIMENTS}
    if not any(data.values()):
        raise ExperimentError(f"no results in {out}: run `symdiff experiment timing|steps|init --out {out}` first")
    notes: list[str] = []
    if replot:
        for name, d in data.items():
            if d is not None and save_plots(name, d, out) is None:
                notes.append(f"figures not redrawn: matplotlib is not installed ({PLOTS_HINT})")
                break
    report = Path(report)
    try:
        report.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExperimentError(f"--report {report}: cannot create its folder ({exc.strerror or exc})") from None
    if report.is_dir() or not os.access(report.parent, os.W_OK):
        raise ExperimentError(f"--report {report}: not a writable file path")
    rdir = report.parent
    first = next(d for d in data.values() if d is not None)
    m = first["meta"]["machine"]
    L = ["# symdiff experiments: training time, step counts, soft attention, initialisation", "",
         f"*Generated by `symdiff experiment report` from the JSON files in `{_display_path(out)}/`. Every number "
         "here is templated from those files (the raw measurements are the `.json`/`.csv` files beside the "
         "figures); to change the text edit `models/experiments.py` and re-run, do not edit this file.*", "",
         "## Reproduce", "", "```bash", f"pip install -e '.[plots]'   # matplotlib, for the figures"]
    for name in EXPERIMENTS:
        if data[name] is not None:
            L.append(f"{data[name]['meta']['command']} --out {_display_path(out)}")
    L += [f"symdiff experiment report --out {_display_path(out)} --report {_display_path(report)}", "```", ""]
    times = ", ".join(f"{name} {data[name]['meta']['wall_seconds']:.0f} s ({data[name]['meta']['date']})"
                      for name in EXPERIMENTS if data[name] is not None)
    L += [f"Wall-clock time of the runs: {times}. `symdiff experiment all` runs the three and writes this report.",
          "", "## Machine", ""]
    rows = [["CPU (/proc/cpuinfo `model name`)", str(m["cpu_model"])],
            ["logical CPUs (usable by this process)", f"{m['logical_cpus']} ({m['usable_cpus']})"],
            ["numpy / BLAS", f"{m['numpy']} / {m['blas'] or 'unknown'}"],
            ["Python / platform", f"{m['python']} / {m['platform']}"]]
    if "native" in m:
        rows.append(["compiled fused kernels (`symdiff.native`)", m["native"]])
    for name in EXPERIMENTS:
        code = data[name]["meta"].get("code") if data[name] is not None else None
        if code:
            dirty = (f", with uncommitted changes to {', '.join(f'`{c}`' for c in code['uncommitted'])}"
                     if code["uncommitted"] else "")
            rows.append([f"code measured by `{name}`", f"commit `{code['commit']}`{dirty}"])
    if data["timing"] is not None:
        t = data["timing"]["meta"]
        rows.append(["load average (1, 5, 15 min) before → after the timing run",
                     f"{t.get('load_average_before')} → {t['machine']['load_average']}"])
    threads = m.get("blas_thread_env") or {}
    rows.append(["BLAS threads", ", ".join(f"`{k}={v}`" for k, v in threads.items()) if threads
                 else f"library default ({m['usable_cpus']} usable CPUs)"])
    L += [_md_table(["", ""], rows, "ll"), "",
          *([f"BLAS was limited to {', '.join(f'`{k}={v}`' for k, v in threads.items())} for these runs. The "
             "models' matrices are small (N × 50 by 50 × 50 for the LSTM), so a second BLAS thread has little "
             "to gain, and when the cores are already busy with other jobs OpenBLAS's threads wait for each other: "
             "in a trial on this machine (not part of these runs) that made the N ≥ 64 settings much slower and "
             "erratic, which would time the scheduler rather than the code. The variable is part of the commands above.", ""]
            if threads else []),
          "The machine is shared: other jobs were running on its cores during the runs, so single timings are "
          "noisy. The repeats are interleaved (all settings once, then all again), so load that comes and goes is "
          "spread over every setting, and the tables report the median with the min–max spread rather than a "
          "mean. Differences smaller than that spread are not findings.", ""]
    if data["timing"] is not None:
        L += _timing_section(data["timing"], data["steps"], rdir, out)
    else:
        L += ["## 1. Training time per epoch", "", "*Not run yet: `symdiff experiment timing`.*", ""]
    if data["steps"] is not None:
        L += _steps_section(data["steps"], rdir, out)
    else:
        L += ["## 2. Forward and backward steps in one LSTM update", "", "*Not run yet: `symdiff experiment steps`.*", ""]
    L += _attention_section()
    if data["init"] is not None:
        L += _init_section(data["init"], rdir, out)
    else:
        L += ["## 4. Initialisation scale for tanh (question 5)", "", "*Not run yet: `symdiff experiment init`.*", ""]
    text = re.sub(r"[ \t]+\n", "\n", "\n".join(L)).rstrip() + "\n"
    _atomic_write_bytes(report, text.encode())
    return report, notes
