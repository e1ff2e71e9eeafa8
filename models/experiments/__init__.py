"""The assignment's experiments, answered by the project itself and reproducibly.

One module per question, each owning its run, its summary, its figures and its
report section:

* :mod:`~models.experiments.timing` — training seconds per epoch against N and M;
* :mod:`~models.experiments.steps` — forward and backward steps of one update;
* :mod:`~models.experiments.attention` — soft attention (a report section only);
* :mod:`~models.experiments.init` — question 5, the tanh initialisation scale;
* :mod:`~models.experiments.curvature` — the top Hessian eigenvalue per epoch against 2/lr;

beside :mod:`~models.experiments.common` (settings, checks, storage),
:mod:`~models.experiments.machine` (what a run ran on), :mod:`~models.experiments.plots`
(matplotlib, optional) and :mod:`~models.experiments.report` (assembles ``docs/report.md``).
A new experiment is one new module and one entry in :data:`SECTIONS`.

Each run returns a JSON-able dict; :func:`save` writes it (JSON and CSV,
atomically) and :func:`save_plots` draws its figures when matplotlib is
installed. No presentation here: the CLI (``symdiff experiment``) shows progress and tables.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from . import attention, curvature, init, steps, timing
from .common import (BATCH_SIZES, DEFAULT_OUT, DEFAULT_REPORT, MAX_LENS, PLOTS_HINT, ExperimentError, NoProgress,
                     OutputsNotWritten, Progress, Settings, load, output_dir, parse_int_list, parse_positive_int)
from .common import save as _save
from .init import INIT_CASES, preactivation_moments, recommended_scale, run_init
from .plots import plots_available, save_figures
from .report import write_report as _write_report
from .steps import CROSSENT_ONLY, count_update_steps, engines, run_steps
from .timing import run_timing

#: The report's sections, in order. Those with a ``NAME`` are experiments: ``symdiff experiment NAME``
#: runs them, saves ``NAME.json``/``.csv`` and draws their figures.
SECTIONS = (timing, steps, attention, init, curvature)
_BY_NAME = {s.NAME: s for s in SECTIONS if s.NAME is not None}
EXPERIMENTS = tuple(_BY_NAME)
#: one line per experiment for ``symdiff experiment --help``
HELP = {name: s.HELP for name, s in _BY_NAME.items()}

__all__ = ["BATCH_SIZES", "CROSSENT_ONLY", "DEFAULT_OUT", "DEFAULT_REPORT", "EXPERIMENTS", "HELP", "INIT_CASES",
           "MAX_LENS", "PLOTS_HINT", "SECTIONS", "ExperimentError", "NoProgress", "OutputsNotWritten", "Progress", "Settings",
           "count_update_steps", "engines", "load", "output_dir", "parse_int_list", "parse_positive_int", "plots_available",
           "preactivation_moments", "recommended_scale", "run", "run_init", "run_steps", "run_timing", "save",
           "save_plots", "summary_table", "write_report"]


def _experiment(name: str) -> Any:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ExperimentError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}") from None


def run(name: str, *, dataset: str | None = None, epochs: int = 2, repeats: int = 3, seed: int = 0,
        batch_sizes: Sequence[int] = BATCH_SIZES, max_lens: Sequence[int] = MAX_LENS, draws: int = 20000,
        progress: Progress | None = None) -> dict[str, Any]:
    """Run experiment ``name`` with the command line's settings (each uses the ones it needs)."""
    settings = Settings(dataset=dataset, epochs=epochs, repeats=repeats, seed=seed, batch_sizes=batch_sizes,
                        max_lens=max_lens, draws=draws)
    return _experiment(name).start(settings, progress)


def save(name: str, data: dict[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Write ``<out>/<name>.json`` (everything) and ``<out>/<name>.csv`` (the raw rows)."""
    ex = _experiment(name)
    return _save(name, data, out, ex.CSV_FIELDS, data[ex.CSV_ROWS])


def save_plots(name: str, data: dict[str, Any], out: str | os.PathLike[str]) -> list[Path] | None:
    """Draw the experiment's figures into ``out``; ``None`` when matplotlib is missing."""
    ex = _experiment(name)
    return save_figures(ex.FIGURES, ex.draw, data, out)


def summary_table(name: str, data: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """``(title, columns, rows)`` of strings for the CLI to show."""
    return _experiment(name).summary_table(data)


def write_report(out: str | os.PathLike[str] = DEFAULT_OUT, report: str | os.PathLike[str] = DEFAULT_REPORT,
                 *, replot: bool = True) -> tuple[Path, list[str]]:
    """Write the markdown report from the experiments' JSON in ``out``, :data:`SECTIONS` in order.

    With matplotlib installed the figures are redrawn from the same JSON first,
    so figures, tables and text always agree.
    """
    return _write_report(SECTIONS, out, report, replot=replot)
