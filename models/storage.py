"""Atomic output files: a reader sees the old file or the complete new one, never half of one.

Each writer writes a temporary file in the destination folder, flushes it to
disk, then ``os.replace``-s it over the destination (atomic on POSIX), so a
killed process leaves at worst a stray ``.tmp`` file, never a truncated output
(:func:`remove_output` clears those with the file they were for).

A write that fails (no space left, permission denied, the folder removed or made
read-only, an I/O error) removes its temporary file and raises :class:`OutputWriteError`,
whose text is one line for the user: the file, the operating system's reason, and
whether a previous file is still there unchanged; callers catch it per output, so one
failed output never stops the others.
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import tempfile
from glob import escape as glob_escape
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


class OutputWriteError(OSError):
    """An output could not be written; ``str()`` is the one line to show the user.

    A subclass of :class:`OSError` (with the original ``errno``), so code that already
    catches ``OSError`` keeps working.
    """

    def __init__(self, path: Path, cause: BaseException, previous: bool, stray: Path | None = None) -> None:
        super().__init__(getattr(cause, "errno", None), os_reason(cause))
        self.path, self.previous, self.stray = path, previous, stray

    def __str__(self) -> str:
        kept = (f"the previous {self.path.name} is unchanged" if self.previous
                else "no file was written" if self.path.parent.is_dir()
                else f"the folder {self.path.parent} no longer exists")
        left = f"; a temporary file {self.stray} could not be removed" if self.stray else ""
        return f"{self.path}: {self.strerror}; {kept}{left}"


def os_reason(exc: BaseException) -> str:
    """The operating system's reason for a failed write, e.g. ``No space left on device (ENOSPC)``."""
    code = getattr(exc, "errno", None)
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"{text} ({errno.errorcode[code]})" if code in errno.errorcode else text


class _Stream:
    """Only ``write``: numpy then writes arrays through it in chunks instead of ``fwrite``-ing
    them with ``tofile``, whose short write on a full disk loses the OS's reason
    (``OSError: 11655 requested and 4592 written``) where ``write`` raises ``ENOSPC``."""

    def __init__(self, fh: io.BufferedWriter) -> None:
        self.write = fh.write


def _temporary_affixes(path: Path) -> tuple[str, str]:
    """How a writer's temporary file for ``path`` is named (``.NAME.<random>.tmp``), in one place
    for the writer and for :func:`remove_output`, which clears what a killed writer left."""
    return f".{path.name}.", ".tmp"


def _atomic_write(path: str | os.PathLike[str], write: Callable[[io.BufferedWriter], None]) -> None:
    path = Path(path)
    previous = path.is_file()
    tmp: str | None = None
    try:
        prefix, suffix = _temporary_affixes(path)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent or ".")
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _new_file_mode(path))
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        stray = None
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:  # the folder went away with it
                pass
            except OSError:
                stray = Path(tmp)
        if isinstance(exc, OSError):
            raise OutputWriteError(path, exc, previous and path.is_file(), stray) from exc
        raise


def remove_output(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` and the temporary files its writers left beside it (``.NAME.*.tmp``): a
    writer killed mid-write (SIGKILL, a preempted machine) never gets to remove its own."""
    path = Path(path)
    path.unlink(missing_ok=True)
    prefix, suffix = _temporary_affixes(path)
    for stray in path.parent.glob(f"{glob_escape(prefix)}*{suffix}"):
        stray.unlink(missing_ok=True)


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    _atomic_write(path, lambda fh: np.save(_Stream(fh), array, allow_pickle=False))


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
