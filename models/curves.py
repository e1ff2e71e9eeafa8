"""Training curves from ``--metrics_file`` JSON: train/valid loss and valid accuracy per epoch,
several runs on one figure (``symdiff plot``). matplotlib is the optional ``plots`` extra.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

PLOTS_EXTRA = "pip install 'symdiff[plots]'  (from a checkout: pip install -e '.[plots]')"


class CurvesError(ValueError):
    """A metrics file that cannot be plotted, or no matplotlib: one line."""


@dataclass
class Run:
    """One training run's per-epoch numbers (``None`` where the metrics file has ``null``)."""

    name: str
    epochs: list[int]
    train_loss: list[float | None]
    valid_loss: list[float | None]
    valid_accuracy: list[float | None]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read a metrics file written by ``symdiff mlp|lstm --metrics_file``."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CurvesError(f"{p}: no such metrics file; write one with symdiff mlp|lstm --metrics_file {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CurvesError(f"{p}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise CurvesError(f"{p}:{exc.lineno}: not JSON ({exc.msg}); give a file written by --metrics_file") from None
    epochs = obj.get("epochs") if isinstance(obj, dict) else None
    if not isinstance(epochs, list) or not all(isinstance(e, dict) and isinstance(e.get("epoch"), int)
                                               for e in epochs):
        raise CurvesError(f"{p}: no list of epochs with an 'epoch' number each; give a file written by "
                          f"symdiff mlp|lstm --metrics_file")
    if not epochs:
        raise CurvesError(f"{p}: the run finished no epoch, so there is nothing to plot")
    name = f"{p.stem} ({obj['model']})" if isinstance(obj.get("model"), str) else p.stem
    return Run(name, [e["epoch"] for e in epochs], [_number(e.get("train_loss")) for e in epochs],
               [_number(e.get("valid_loss")) for e in epochs], [_number(e.get("valid_accuracy")) for e in epochs])


def _pyplot() -> Any:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CurvesError(f"plotting needs matplotlib, the 'plots' extra: {PLOTS_EXTRA}") from None
    return plt


def plot_runs(runs: Sequence[Run], out: str | os.PathLike[str]) -> Path:
    """Loss (train solid, valid dashed) and valid accuracy per epoch, one colour per run; returns ``out``."""
    plt = _pyplot()
    from .storage import save_bytes  # atomic: the destination is the old file or the whole new one

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    nan = float("nan")
    for k, run in enumerate(runs):
        colour = f"C{k % 10}"
        ax_loss.plot(run.epochs, [nan if v is None else v for v in run.train_loss], "-o", color=colour,
                     markersize=3, label=f"{run.name} train")
        ax_loss.plot(run.epochs, [nan if v is None else v for v in run.valid_loss], "--s", color=colour,
                     markersize=3, label=f"{run.name} valid")
        ax_acc.plot(run.epochs, [nan if v is None else v for v in run.valid_accuracy], "-o", color=colour,
                    markersize=3, label=run.name)
    ax_loss.set(xlabel="epoch", ylabel="mean cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    buffer = io.BytesIO()
    suffix = Path(out).suffix.lstrip(".").lower() or "png"
    fig.savefig(buffer, format=suffix, dpi=120)
    plt.close(fig)
    save_bytes(out, buffer.getvalue())
    return Path(out)
