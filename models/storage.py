"""Atomic output files: a reader sees the old file or the complete new one, never half of one.

Each writer writes a temporary file in the destination folder, flushes it to
disk, then ``os.replace``-s it over the destination (atomic on POSIX), so a
killed process leaves at worst a stray ``.tmp`` file, never a truncated output.
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np


class OutputPathError(ValueError):
    """An output path that cannot be written (checked before any work is done)."""


def check_output_path(path: str | os.PathLike[str], flag: str) -> Path:
    """Fail early, naming the flag, if ``path`` cannot receive a file."""
    p = Path(path)
    if p.is_dir():
        example = {"--metrics_file": "metrics.json", "--save_model": "model.npz"}.get(flag, "out.npy")
        raise OutputPathError(f"{flag} {p}: is a directory; give a file name such as {p / example}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"{flag} {p}: folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"{flag} {p}: folder {parent} is not writable")
    return p


def _new_file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would give: the existing file's, else 0o666 minus umask.

    (``mkstemp`` creates its file 0o600, which would make every output private to its owner.)
    """
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _atomic_write(path: str | os.PathLike[str], write: Callable[[io.BufferedWriter], None]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _new_file_mode(path))
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    _atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))


def save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    _atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _finite_or_null(obj: Any) -> Any:
    """NaN and infinities become ``null``: ``json.dumps`` would write ``NaN``, which is not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def save_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    _atomic_write(path, lambda fh: fh.write(data))


def save_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Strict JSON (non-finite numbers written as ``null``), atomically."""
    text = json.dumps(_finite_or_null(obj), indent=2, allow_nan=False)
    _atomic_write(path, lambda fh: fh.write(text.encode() + b"\n"))
