"""Figures, with matplotlib: an optional extra (``.[plots]``), and the only module that imports it.

Each experiment draws its own figures (its ``draw(plt, data)``); this module loads
pyplot on the Agg backend and writes the PNGs atomically. Without matplotlib the
data is still written and :func:`save_figures` returns ``None``.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from .common import atomic_write_bytes, output_dir


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
    out = output_dir(out)
    paths = []
    for filename, fig in zip(filenames, draw(plt, data)):
        path = out / filename
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths
