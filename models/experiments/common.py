"""What every experiment shares: settings, errors, progress, argument checks, storage, markdown.

Nothing here knows a particular experiment; each question's module
(:mod:`~models.experiments.timing`, ...) builds on these helpers.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from ..storage import OutputWriteError, save_bytes

ROOT = Path(__file__).resolve().parent.parent.parent
SHARED_DATASET = ROOT.parent / "shared" / "data" / "smaller"
DEFAULT_OUT = "docs/figures"
DEFAULT_REPORT = "docs/report.md"
BATCH_SIZES = (16, 32, 64)
MAX_LENS = (10, 15, 20)
BASE_BATCH, BASE_LEN, NUM_HID = 64, 10, 50
MODELS = ("mlp", "lstm")
PLOTS_HINT = "pip install -e '.[plots]'"
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class ExperimentError(ValueError):
    """Bad settings or missing inputs; the message is one line for the user."""


class OutputsNotWritten(ExperimentError):
    """Some files of one step could not be written, after every one was tried.

    ``lines``: one per file that failed (the file, the OS's reason, whether its previous
    version is unchanged); ``written``: the files that were written all the same.
    """

    def __init__(self, written: list[Path], lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.written, self.lines = written, lines


@dataclass(frozen=True)
class Settings:
    """The ``symdiff experiment`` command line's settings; each experiment reads the ones it uses."""

    dataset: str | None = None
    epochs: int = 2
    repeats: int = 3
    seed: int = 0
    batch_sizes: Sequence[int] = BATCH_SIZES
    max_lens: Sequence[int] = MAX_LENS
    draws: int = 20000


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
        return display_path(SHARED_DATASET)
    return "demo"


def display_path(path: Path) -> str:
    """A path as short as possible: relative to the working directory when that is shorter."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if len(rel) < len(str(path)) else str(path)


def _ints(values: Iterable[int]) -> str:
    return ",".join(str(v) for v in values)


def command_line(experiment: str, **flags: Any) -> str:
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


def timing_grid(batch_sizes: Sequence[int], max_lens: Sequence[int], base_batch: int = BASE_BATCH,
                base_len: int = BASE_LEN) -> list[tuple[int, int]]:
    """The distinct ``(N, M)`` settings: the N sweep at ``M = base_len``, the M sweep at ``N = base_batch``."""
    grid: list[tuple[int, int]] = []
    for nm in [(n, base_len) for n in batch_sizes] + [(base_batch, m) for m in max_lens]:
        if nm not in grid:
            grid.append(nm)
    return grid


# ---- checks ---------------------------------------------------------------------------------
def check_positive(**values: int) -> None:
    for k, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ExperimentError(f"{k} must be a whole number >= 1, got {v!r}")


def check_sizes(values: Sequence[int], what: str) -> None:
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
    from ..flags import positive_int

    return positive_int(text)


# ---- saving ---------------------------------------------------------------------------------
def write_files(files: Iterable[tuple[Path, bytes]]) -> list[Path]:
    """Write each ``(path, data)`` atomically, trying every one even when another fails (a full disk
    must not cost the files that still fit); the paths written, or :class:`OutputsNotWritten`."""
    written: list[Path] = []
    lines: list[str] = []
    for path, data in files:
        try:
            save_bytes(path, data)
        except OutputWriteError as exc:
            lines.append(f"not written: {exc}")
        else:
            written.append(path)
    if lines:
        raise OutputsNotWritten(written, lines)
    return written


def make_dir(out: str | os.PathLike[str]) -> Path:
    """``out``, created if missing; if it cannot be, each file's write says why (one line each)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    return out


def output_dir(out: str | os.PathLike[str]) -> Path:
    """``out`` as a writable folder (created if needed); one-line errors naming ``--out``."""
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


def save(name: str, data: dict[str, Any], out: str | os.PathLike[str], fields: Sequence[str],
         rows: Iterable[dict[str, Any]]) -> list[Path]:
    """Write ``<out>/<name>.json`` (everything) and ``<out>/<name>.csv`` (the raw ``rows``, ``fields`` only).

    Both are tried; :class:`OutputsNotWritten` names those that failed and those written."""
    out = make_dir(out)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return write_files([(out / f"{name}.json", json.dumps(data, indent=1).encode() + b"\n"),
                        (out / f"{name}.csv", buf.getvalue().encode())])


def load(name: str, out: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(out) / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ExperimentError(f"{path}: unreadable ({exc}); re-run `symdiff experiment {name}`") from None


# ---- markdown for the report ----------------------------------------------------------------
def fmt_f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def fmt_g(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"


def md_table(cols: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(cols) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def figure_link(report_dir: Path, out: Path, filename: str, alt: str) -> str:
    path = out / filename
    if not path.exists():
        return f"*(figure `{filename}` not drawn: matplotlib is not installed — `{PLOTS_HINT}`, then " \
               f"`symdiff experiment report`)*"
    rel = os.path.relpath(path, report_dir).replace(os.sep, "/")
    return f"![{alt}]({rel})"
