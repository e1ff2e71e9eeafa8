"""Question 2: forward and backward steps of ONE update, read from the engine's counters.

Counted (``Autograd.forward_steps/backward_steps``) for the default engine and for
the plain, unfused Wengert list (see :func:`engines`).

Like every experiment module it provides ``NAME``, ``HELP``, ``TITLE``, ``FIGURES``,
``CSV_FIELDS``/``CSV_ROWS``, ``start(settings, progress)``, ``summary_table(data)``,
``draw(plt, data)`` and ``report_section(data, results, report_dir, out)``; the list
in :mod:`models.experiments` is all that names it.
"""
from __future__ import annotations

import inspect
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .common import (BASE_BATCH, BASE_LEN, BATCH_SIZES, MAX_LENS, NUM_HID, ExperimentError, NoProgress, Progress,
                     Settings, check_sizes, command_line, default_dataset, figure_link, fmt_g, md_table, timing_grid)
from .machine import run_meta

NAME = "steps"
HELP = "engine steps of one LSTM update"
TITLE = "## 2. Forward and backward steps in one LSTM update"
FIGURES = ("steps_lstm.png",)
CSV_FIELDS = ("model", "engine", "batch_size", "max_len", "forward_steps", "backward_steps", "wengert_steps",
              "compiled_steps")
CSV_ROWS = "counts"
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
    """The ``Autograd(...)`` call a configuration stands for, as text for the report."""
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

    ``engine`` holds ``Autograd`` keyword arguments (see :func:`engines`). The update is run as
    the training loop runs it (``compile``, ``forward``, ``backward(params_only=True)``), not
    through ``eval``/``bprop``, whose plan keeps every named register's gradient.
    """
    from symdiff import Autograd

    xm = model.xm
    ad = Autograd(xm, **(engine or {}))
    wengert = xm.operationSequence(xm.register("loss"))
    inputs = {**model.params, **model.feed(codes), "y": targets}
    program = ad.compile(wengert)
    ad.reset_counts()
    values = program.forward(inputs, keep=("loss",))
    grads = program.backward(values, {"loss": np.ones((), dtype=model.dtype)}, params_only=True)
    missing = [p for p in xm.params() if grads[program.slot[p]] is None]
    if missing:
        raise ExperimentError(f"the update computed no gradient for {missing}")
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
    from .. import data as D
    from ..training import build_model

    check_sizes(batch_sizes, "batch sizes")
    check_sizes(max_lens, "max lengths")
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
    command = command_line("steps", dataset=dataset, batch_sizes=batch_sizes, max_lens=max_lens)
    return {"meta": run_meta("steps", command, started, time.perf_counter() - t0), "settings": settings,
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


def start(settings: Settings, progress: Progress | None = None) -> dict[str, Any]:
    """``symdiff experiment steps``: :func:`run_steps` on the command line's (or the default) dataset."""
    s = settings
    return run_steps(s.dataset if s.dataset is not None else default_dataset(), batch_sizes=s.batch_sizes,
                     max_lens=s.max_lens, seed=s.seed, progress=progress)


def summary_table(data: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """``(title, columns, rows)`` of strings for the CLI to show."""
    cols = ["model", "engine", "N", "M", "forward steps", "backward steps"]
    rows = [[r["model"], r["engine"], str(r["batch_size"]), str(r["max_len"]), str(r["forward_steps"]),
             str(r["backward_steps"])] for r in data["counts"]]
    return "steps in one update (engine counters)", cols, rows


def draw(plt: Any, data: dict[str, Any]) -> list[Any]:
    """Steps of one LSTM update against M and against N, per engine."""
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


ENGINE_NOTES = {
    "default": "the engine as the trainer runs it, with every rewrite it applies by default",
    CROSSENT_ONLY: "the plain list with only the `crossent_softmax` rewrite, which fuses "
                   "`crossEnt(softMax(o), y)` into one step — the engine's only default rewrite before the "
                   "performance passes",
    "unfused": "the plain Wengert list, one step per op — what the assignment's step counts refer to",
}


def report_section(st: dict[str, Any], results: dict[str, Any], report_dir: Path, out: Path) -> list[str]:
    """§2 of the report: the counts, their fit in M, and why."""
    s = st["settings"]
    summ = summarize_steps(st["counts"], s)  # from the raw counts, not a stored summary
    L = [TITLE, "",
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
    L += ["", md_table(cols, body, "lll" + "r" * (len(cols) - 3)), "",
          f"(M sweep at N = {s['base_batch']}, N sweep at M = {s['base_len']}; num_hid {s['num_hid']}, "
          f"{s['num_chars']} characters, {s['num_labels']} labels.)", "",
          figure_link(report_dir, out, FIGURES[0], "steps of one LSTM update against M and N"), ""]

    def entry(model: str, engine: str) -> dict[str, Any] | None:
        return next((e for e in summ if e["model"] == model and e["engine"] == engine), None)

    def comp(e: dict[str, Any]) -> str:
        return ", ".join(f"{fmt_g(v)} × `{k}`" for k, v in sorted(e.get("ops_per_character", {}).items(),
                                                                key=lambda kv: (-kv[1], kv[0])))

    unf, dflt, ce = entry("lstm", "unfused"), entry("lstm", "default"), entry("lstm", CROSSENT_ONLY)
    ms = ", ".join(str(m) for m in s["max_lens"])
    if unf is not None and unf.get("ops_per_character") and unf["forward_steps"].get("per_character") is not None:
        fw, bw = unf["forward_steps"], unf["backward_steps"]
        text = (f"**Linear in M.** The LSTM is unrolled: its graph holds one copy of the cell per character and "
                f"every copy is the same block of ops — per extra character the plain list gains {comp(unf)} "
                f"(read off the compiled lists at M = {s['max_lens'][0]} and {s['max_lens'][-1]}), "
                f"{fmt_g(fw['per_character'])} forward steps, and {fmt_g(bw['per_character'])} backward steps (most of "
                "those ops have two inputs on the path to a parameter, hence two derivatives). Only the count of "
                f"copies depends on M, so the differences between M = {ms} are equal for every configuration. "
                f"The intercepts ({fmt_g(fw['intercept'])} forward, {fmt_g(bw['intercept'])} backward, unfused) are the "
                "output layer, softmax and loss, less the derivatives the first cell does not need because `h0` "
                "and `c0` are inputs. ")
        if dflt is not None and dflt.get("ops_per_character"):
            df, db = dflt["forward_steps"], dflt["backward_steps"]
            rewrites = ", ".join(f"`{p}`" for p in s["engines"]["default"]["passes"]) or "none"
            if df.get("per_character") is not None and df["per_character"] != fw["per_character"]:
                text += (f"The default engine (rewrites {rewrites}) compiles the same block into {comp(dflt)}, so "
                         f"a character costs it {fmt_g(df['per_character'])} forward and {fmt_g(db['per_character'])} "
                         f"backward steps instead of {fmt_g(fw['per_character'])} and {fmt_g(bw['per_character'])}: "
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
