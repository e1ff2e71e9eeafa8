"""Figures, with matplotlib: an optional extra (``.[plots]``), and the only module that imports it.

Each experiment draws its own figures (its ``draw(plt, data)``); this module loads
pyplot on the Agg backend and writes the PNGs atomically. Without matplotlib the
data is still written and :func:`save_figures` returns ``None``.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .common import make_dir, write_files


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
    """Whether matplotlib is installed (the figures can be drawn)."""
    return _pyplot() is not None


def save_figures(filenames: Sequence[str], draw: Callable[[Any, dict[str, Any]], list[Any]],
                 data: dict[str, Any], out: str | os.PathLike[str]) -> list[Path] | None:
    """Draw an experiment's figures into ``out`` as ``filenames``; ``None`` when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    out = make_dir(out)

    def pngs() -> Iterator[tuple[Path, bytes]]:
        for filename, fig in zip(filenames, draw(plt, data)):
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
            plt.close(fig)
            yield out / filename, buf.getvalue()
    return write_files(pngs())  # every figure tried; OutputsNotWritten names the ones that failed
