"""Question 1: training seconds per epoch of the MLP and the LSTM against the batch size N and length M.

Measured with the real :class:`~models.training.Trainer` (its ``train_seconds``: the
training loop only).

Like every experiment module it provides ``NAME``, ``HELP``, ``TITLE``, ``FIGURES``,
``CSV_FIELDS``/``CSV_ROWS``, ``start(settings, progress)``, ``summary_table(data)``,
``draw(plt, data)`` and ``report_section(data, results, report_dir, out)``; the list
in :mod:`models.experiments` is all that names it.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .common import (BASE_BATCH, BASE_LEN, BATCH_SIZES, MAX_LENS, MODELS, NUM_HID, ExperimentError, NoProgress,
                     Progress, Settings, check_positive, check_sizes, command_line, default_dataset, figure_link,
                     fmt_f, md_table, timing_grid)
from .machine import code_version, machine_info, run_meta

NAME = "timing"
HELP = "seconds/epoch vs N and M"
TITLE = "## 1. Training time per epoch"
FIGURES = ("timing_vs_batch_size.png", "timing_vs_max_len.png")
CSV_FIELDS = ("model", "batch_size", "max_len", "repeat", "epoch", "train_seconds", "batches", "train_rows",
              "train_loss")
CSV_ROWS = "measurements"


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
    from .. import data as D
    from ..flags import DEFAULT_LR
    from ..training import StopFlag, TrainConfig, Trainer, build_model

    check_positive(epochs=epochs, repeats=repeats, num_hid=num_hid)
    check_sizes(batch_sizes, "batch sizes")
    check_sizes(max_lens, "max lengths")
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
    command = command_line("timing", dataset=dataset, epochs=epochs, repeats=repeats,
                       batch_sizes=batch_sizes, max_lens=max_lens, seed=seed)
    meta = run_meta("timing", command, started, wall, code)
    meta["load_average_before"] = load_before
    return {"meta": meta, "settings": settings, "measurements": measurements,
            "summary": summarize_timing(measurements, settings), "warnings": warnings}


def summarize_timing(measurements: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model and sweep point: the median, min and max over repeats of the mean seconds per epoch.

    A run's first epoch is a warm-up (caches, first calls of every kernel: up to twice as slow), so
    the per-epoch figure averages the epochs after it, and the first is reported apart
    (``warmup_median``). With one epoch per run there is nothing else: the figure is that epoch
    and ``warmup_included`` says so.
    """
    rows = []
    for kind in settings["models"]:
        for sweep, values in (("batch_size", settings["batch_sizes"]), ("max_len", settings["max_lens"])):
            for v in values:
                n, m = (v, settings["base_len"]) if sweep == "batch_size" else (settings["base_batch"], v)
                mine = [x for x in measurements if x["model"] == kind and x["batch_size"] == n and x["max_len"] == m]
                if not mine:
                    continue
                by_repeat: dict[int, dict[int, float]] = {}
                for x in mine:
                    by_repeat.setdefault(x["repeat"], {})[x["epoch"]] = x["train_seconds"]
                warmup_included = all(len(e) < 2 for e in by_repeat.values())
                per_repeat = [statistics.fmean([t for k, t in e.items() if k > min(e)] or list(e.values()))
                              for e in by_repeat.values()]
                first = [e[min(e)] for e in by_repeat.values()]
                med = statistics.median(per_repeat)
                batches = mine[0]["batches"]
                rows.append({"model": kind, "sweep": sweep, "value": v, "batch_size": n, "max_len": m,
                             "repeats": len(per_repeat), "median": med, "min": min(per_repeat),
                             "max": max(per_repeat), "batches": batches,
                             "median_ms_per_batch": 1000 * med / batches,
                             "per_repeat": per_repeat, "warmup_median": statistics.median(first),
                             "warmup_included": warmup_included})
    return rows


def start(settings: Settings, progress: Progress | None = None) -> dict[str, Any]:
    """``symdiff experiment timing``: :func:`run_timing` with the command line's settings."""
    s = settings
    return run_timing(s.dataset, epochs=s.epochs, repeats=s.repeats, seed=s.seed, batch_sizes=s.batch_sizes,
                      max_lens=s.max_lens, progress=progress)


def summary_table(data: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """``(title, columns, rows)`` of strings for the CLI to show."""
    summary = summarize_timing(data["measurements"], data["settings"])  # from the raw numbers
    cols = ["model", "N", "M", "batches", "median s/epoch", "min", "max", "ms/batch", "1st epoch (warm-up)"]
    rows = [[r["model"], str(r["batch_size"]), str(r["max_len"]), str(r["batches"]), f"{r['median']:.3f}",
             f"{r['min']:.3f}", f"{r['max']:.3f}", f"{r['median_ms_per_batch']:.2f}",
             "included" if r["warmup_included"] else f"{r['warmup_median']:.3f}"]
            for r in _dedup(summary)]
    s = data["settings"]
    which = ("the only epoch, warm-up included: use --epochs 2 or more to leave it out" if s["epochs"] < 2
             else f"epochs 2-{s['epochs']}; the first is the warm-up, shown apart")
    return (f"training seconds per epoch ({which}; {s['repeats']} repeat(s), "
            f"{s['rows']['train']} training rows)", cols, rows)


def _dedup(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows with the setting shared by both sweeps (N=64, M=10) listed once."""
    seen, out = set(), []
    for r in summary:
        key = (r["model"], r["batch_size"], r["max_len"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def draw(plt: Any, data: dict[str, Any]) -> list[Any]:
    """Seconds per epoch against N, then against M (median, bars min..max over repeats)."""
    s = data["settings"]
    summary = summarize_timing(data["measurements"], s)  # from the raw numbers (older files included)
    figs = []
    for sweep, label, fixed in (("batch_size", "batch size N", f"M = {s['base_len']}"),
                                ("max_len", "max length M", f"N = {s['base_batch']}")):
        fig, ax = plt.subplots(figsize=(5.6, 3.8))
        for kind in s["models"]:
            rows = [r for r in summary if r["model"] == kind and r["sweep"] == sweep]
            xs = [r["value"] for r in rows]
            med = np.array([r["median"] for r in rows])
            err = np.array([[m - r["min"] for m, r in zip(med, rows)], [r["max"] - m for m, r in zip(med, rows)]])
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=4, label=kind.upper())
        ax.set_yscale("log")
        ax.set_xticks(s["batch_sizes"] if sweep == "batch_size" else s["max_lens"])
        ax.set_xlabel(label)
        ax.set_ylabel("training s/epoch, warm-up left out (log)" if s["epochs"] > 1
                      else "training seconds per epoch (log scale)")
        ax.set_title(f"time per epoch vs {label.split()[-1]} ({fixed}; median, bars = min..max "
                     f"of {s['repeats']})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        figs.append(fig)
    return figs


def report_section(t: dict[str, Any], results: dict[str, Any], report_dir: Path, out: Path) -> list[str]:
    """§1 of the report, with the step counts of §2 (``results["steps"]``) where they explain a time."""
    steps = results.get("steps")
    s, meta = t["settings"], t["meta"]
    summ = summarize_timing(t["measurements"], s)  # from the raw measurements
    rows_n = {k: [r for r in summ if r["model"] == k and r["sweep"] == "batch_size"] for k in s["models"]}
    rows_m = {k: [r for r in summ if r["model"] == k and r["sweep"] == "max_len"] for k in s["models"]}
    rows = s["rows"]
    L = [TITLE, ""]
    L.append(f"Dataset `{s['dataset']}` ({rows['train']:,} training / {rows['valid']:,} validation rows, "
             f"{s['num_chars']} characters, {s['num_labels']} labels); num_hid {s['num_hid']}, learning rate "
             + ", ".join(f"{v:g} ({k.upper()})" for k, v in s["init_lr"].items())
             + f", plain SGD, float64, seed {s['seed']}"
             + ({True: ", the trainer's default engine (elementwise fusion on, §2)",
                 False: ", elementwise fusion off"}.get(s.get("fuse"), ""))
             + f". Every setting was trained {s['repeats']} time(s) for "
             f"{s['epochs']} epoch(s) from the same initial parameters and batch order. The time is the "
             "`train_seconds` the `Trainer` reports: the minibatch loop only (forward, backward, update), without "
             "loading, compiling or validation. A run's figure is the mean over its epochs after the first: the "
             "first is a warm-up (caches, every kernel's first call) and its median is given apart; the tables "
             "give the median over repeats and the min–max spread."
             + (" *With one epoch per run the figures below include the warm-up.*" if s["epochs"] < 2 else ""))
    if t.get("warnings"):
        L += ["", "Runs that stopped early: " + "; ".join(t["warnings"])]

    def table(rowsets: dict[str, list[dict[str, Any]]], key: str, label: str) -> str:
        body = []
        for kind, rs in rowsets.items():
            for r in rs:
                body.append([kind.upper(), str(r[key]), str(r["batches"]), fmt_f(r["median"]),
                             f"{fmt_f(r['min'])} – {fmt_f(r['max'])}", fmt_f(r["median_ms_per_batch"], 2),
                             "–" if r.get("warmup_included", True) else fmt_f(r["warmup_median"])])
        return md_table(["model", label, "batches/epoch", "median s/epoch", "min – max", "ms/batch",
                         "1st epoch (warm-up)"], body)

    L += ["", f"### Against the batch size N (M = {s['base_len']})", "",
          table(rows_n, "batch_size", "N"), "",
          figure_link(report_dir, out, FIGURES[0], "seconds per epoch against N"), "",
          f"### Against the maximum length M (N = {s['base_batch']})", "",
          table(rows_m, "max_len", "M"), "",
          figure_link(report_dir, out, FIGURES[1], "seconds per epoch against M"), ""]

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
                fit = (f"α = {fmt_f(1000 * alpha, 2)} ms per update and β = {fmt_f(1e6 * beta, 1)} µs per row, so at "
                       f"N = {first['batch_size']} the fixed part is {100 * share:.0f}% of an update")
            else:
                fit = (f"α = {fmt_f(1000 * alpha, 2)} ms, β = {fmt_f(1e6 * beta, 1)} µs per row — a fit the noise has "
                       "spoilt (a negative term means nothing physical)")
            parts.append(f"{kind.upper()}: {fit}; epoch time went from {fmt_f(first['median'])} s to "
                         f"{fmt_f(last['median'])} s (×{fmt_f(last['median'] / first['median'], 2)}) from "
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
        growth = "; ".join(f"{k.upper()} {fmt_f(a['median'])} → {fmt_f(b['median'])} s per epoch "
                           f"(+{fmt_f(b['median'] - a['median'])} s, ×{fmt_f(r, 2)}; per update "
                           f"{fmt_f(a['median_ms_per_batch'], 2)} → {fmt_f(b['median_ms_per_batch'], 2)} ms)"
                           for k, (a, b, r) in ratios.items())
        text = (f"**The LSTM's time grows with M, the MLP's much less.** From M = {m0} to M = {m1}: {growth}. ")
        if ("lstm", m0) in step_at and ("lstm", m1) in step_at:
            sr = step_at["lstm", m1] / step_at["lstm", m0]
            lstm_a, lstm_b, _ = ratios.get("lstm", (None, None, None))
            text += (f"The LSTM is unrolled over the M characters, so its graph itself grows: one update is "
                     f"{step_at['lstm', m0]} engine steps at M = {m0} and {step_at['lstm', m1]} at M = {m1} "
                     f"(×{fmt_f(sr, 2)}, §2), each a numpy call on matrices of N rows, and the cells must run one "
                     "after another")
            if lstm_a is not None:
                us0 = 1e6 * lstm_a["median"] / lstm_a["batches"] / step_at["lstm", m0]
                us1 = 1e6 * lstm_b["median"] / lstm_b["batches"] / step_at["lstm", m1]
                same = 0.8 <= us1 / us0 <= 1.25
                text += (f"; the time per engine step {'stays about the same' if same else 'changes'} "
                         f"({fmt_f(us0, 1)} µs at M = {m0}, {fmt_f(us1, 1)} µs at M = {m1}), so the time follows the "
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
                text += (f"In absolute terms the LSTM's epoch grew {fmt_f(d_l / d_m, 0)} times as much as the MLP's. ")
                if mr >= 0.75 * lr:
                    text += (f"Relative to its own size the MLP's time still grew noticeably (×{fmt_f(mr, 2)} against "
                             f"the LSTM's ×{fmt_f(lr, 2)}): its whole update costs only "
                             f"{fmt_f(ma['median_ms_per_batch'], 2)} ms, so even the gather and scatter of M rows of "
                             "`W1` is a visible share of it, while for the LSTM that share is lost among its "
                             "cells. ")
        L += [text, ""]
    return L
