"""Checkpoints: everything a training run needs to go on after it was stopped, in one ``.npz``.

Why one file: it is written with storage's atomic writer, so a run killed at any moment (even
``kill -9`` in the middle of a write) leaves either the previous complete checkpoint or the new
complete one, and resuming from it continues the run bit for bit: the parameters, the best
parameters and their epoch, the optimizer's buffers (e.g. Adam's moments and step counts), the
schedule's state, the shuffling generator's state, the epoch number and the metrics so far.

Arrays are stored as arrays (exact, NaN and infinities included); the rest is one JSON string
in the archive (``meta/checkpoint``), as ``--save_model`` does: no pickles, and loading never
unpickles (``allow_pickle=False``).
"""
from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .storage import remove_output, save_npz

FORMAT = "symdiff-checkpoint-1"
# TrainConfig fields that change how the numbers are computed but not the model or the optimisation
# ("same math"): a checkpoint may be resumed with them changed (e.g. --no-native on a machine without
# a C compiler), though bit-identity with an uninterrupted run is then only promised up to rounding.
ENGINE_ONLY = ("dense", "fuse", "native")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run: one line, saying why and what to do."""


@dataclass
class TrainState:
    """The training loop's state after ``epoch`` finished epochs."""

    epoch: int
    params: dict[str, np.ndarray]
    best_params: dict[str, np.ndarray] | None
    best_epoch: int | None
    best_loss: float
    since_best: int
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    rng: dict[str, Any]
    epochs: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None   # a finishing reason already decided (early-stop, dead-relu, diverged)
    message: str | None = None


def data_fingerprint(titles_and_labels: list[tuple[list[str], np.ndarray]]) -> str:
    """A short hash of the training and validation rows: a checkpoint belongs to one dataset."""
    h = hashlib.sha256()
    for titles, labels in titles_and_labels:
        h.update("\n".join(titles).encode("utf-8", "surrogatepass"))
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def identity(kind: str, config: dict[str, Any], dims: dict[str, int], fingerprint: str) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it."""
    return {"model": kind, **{k: v for k, v in config.items() if k not in ENGINE_ONLY},
            **{f"dims.{k}": v for k, v in dims.items()}, "data": fingerprint}


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def save_checkpoint(path: str | Path, ident: dict[str, Any], state: TrainState) -> None:
    """Write ``state`` to ``path`` atomically (old file or complete new one, never half)."""
    arrays: dict[str, np.ndarray] = {f"param/{n}": a for n, a in state.params.items()}
    if state.best_params is not None:
        arrays.update({f"best/{n}": a for n, a in state.best_params.items()})
    for k, v in state.optimizer.items():
        arrays[f"optimizer/{k}"] = np.asarray(v)
    for k, v in state.schedule.items():
        arrays[f"schedule/{k}"] = np.asarray(v)
    arrays["state/best_loss"] = np.asarray(state.best_loss, dtype=np.float64)
    meta = {"format": FORMAT, "identity": ident, "epoch": state.epoch, "best_epoch": state.best_epoch,
            "since_best": state.since_best, "rng": state.rng, "stopped": state.stopped,
            "message": state.message,
            "epochs": [{k: _json_safe(v) for k, v in e.items()} for e in state.epochs]}
    arrays["meta/checkpoint"] = np.array(json.dumps(meta, allow_nan=False))
    save_npz(path, arrays)


def load_checkpoint(path: str | Path, ident: dict[str, Any], param_shapes: dict[str, tuple[int, ...]],
                    flag: str = "--checkpoint") -> TrainState:
    """Read a checkpoint written by :func:`save_checkpoint` for a run with settings ``ident``.

    Refuses (one line, :class:`CheckpointError`) a file that is not a checkpoint, holds pickled
    arrays, or was written by another model or configuration: the message names the setting.
    """
    path = Path(path)
    fix = f"give {flag} a new path to start afresh, or delete {path}"
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{flag} {path}: not a symdiff checkpoint (not an .npz archive); {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
        meta = json.loads(str(files["meta/checkpoint"]))
        if meta.get("format") != FORMAT:
            raise KeyError("format")
    except ValueError as exc:
        if "pickle" in str(exc) or "Object arrays" in str(exc):
            raise CheckpointError(f"{flag} {path}: holds pickled arrays, which symdiff never loads; {fix}") from None
        raise CheckpointError(f"{flag} {path}: unreadable checkpoint ({exc}); {fix}") from None
    except (KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{flag} {path}: not a symdiff checkpoint ({exc}); {fix}") from None
    theirs = meta["identity"]
    for key in dict.fromkeys([*ident, *theirs]):
        if ident.get(key) != theirs.get(key):
            what = {"model": "model", "data": "training/validation data"}.get(key, key.replace("dims.", ""))
            raise CheckpointError(
                f"{flag} {path}: written by a run with {what}={theirs.get(key)!r}, this run has "
                f"{what}={ident.get(key)!r}; resume with the same settings, or {fix}")
    params, best = {}, {}
    for name, shape in param_shapes.items():
        for prefix, into in (("param/", params), ("best/", best)):
            key = prefix + name
            if key in files:
                if files[key].shape != tuple(shape):
                    raise CheckpointError(f"{flag} {path}: array {key!r} has shape {files[key].shape}, "
                                          f"the model needs {tuple(shape)}; {fix}")
                into[name] = files[key]
        if name not in params:
            raise CheckpointError(f"{flag} {path}: missing array 'param/{name}'; {fix}")
    nan = float("nan")
    return TrainState(
        epoch=int(meta["epoch"]), params=params, best_params=best or None, best_epoch=meta["best_epoch"],
        best_loss=float(files["state/best_loss"]), since_best=int(meta["since_best"]),
        optimizer={k[10:]: files[k] for k in files if k.startswith("optimizer/")},
        schedule={k[9:]: files[k] for k in files if k.startswith("schedule/")},
        rng=meta["rng"], stopped=meta["stopped"], message=meta["message"],
        epochs=[{k: (nan if v is None else v) for k, v in e.items()} for e in meta["epochs"]])


class Checkpoint:
    """Where a run keeps its checkpoint, and the state it resumes from (read and checked up front)."""

    def __init__(self, path: str | Path, ident: dict[str, Any], param_shapes: dict[str, tuple[int, ...]],
                 flag: str = "--checkpoint") -> None:
        self.path, self.ident, self.flag = Path(path), ident, flag
        self.resume: TrainState | None = (load_checkpoint(self.path, ident, param_shapes, flag)
                                          if self.path.exists() else None)

    def save(self, state: TrainState) -> None:
        save_checkpoint(self.path, self.ident, state)

    def discard(self) -> None:
        """The run is over: remove the checkpoint and any half-written copy a killed writer left."""
        remove_output(self.path)
