"""Using a saved model: predictions for titles (with what the model could not read) and scores
on a labelled file. The numbers and the rows to show are made here; ``cli.py`` presents them.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote

import numpy as np

from symdiff import Autograd

from . import data as D
from .training import EVAL_BATCH, CharModel, cross_entropy_rows


# ---- predictions ----------------------------------------------------------------------------
@dataclass
class Prediction:
    """One title's prediction and what the model did not see of it."""

    title: str                 # as the user gave it
    label: str                 # the most probable class
    probs: np.ndarray          # one per class, in the model's (sorted) label order
    unknown_chars: str         # characters the model has no input for (read as padding), in order
    length: int                # characters in the decoded title
    read: int                  # characters the model read (at most its max_len)

    def warnings(self) -> list[str]:
        """What the model could not read of this title: never silent."""
        notes = []
        shown = self.title if len(self.title) <= 60 else self.title[:57] + "..."
        if self.length == 0:
            notes.append(f"title {shown!r} is empty: predicted from no characters at all")
        if self.unknown_chars:
            notes.append(f"title {shown!r}: characters {', '.join(map(repr, self.unknown_chars))} are not in the "
                         f"model's vocabulary and were read as padding")
        if self.read < self.length:
            notes.append(f"title {shown!r}: only the first {self.read} of its {self.length} characters were read "
                         f"(the model's max_len)")
        return notes


def _decode(title: str) -> str:
    """A title as the data files write it: percent-escapes decoded, a stray ``%`` kept."""
    return unquote(title).strip()


def predict(model: CharModel, vocab: D.Vocab, titles: Sequence[str]) -> list[Prediction]:
    """The model's prediction for each title, with its unknown characters and truncation."""
    decoded = [_decode(t) for t in titles]
    probs = probabilities(model, vocab, decoded)
    max_len = model.dims["max_len"]
    out = []
    for title, text, row in zip(titles, decoded, probs):
        seen = text[:max_len]
        unknown = "".join(dict.fromkeys(c for c in seen if c not in vocab.chars))
        out.append(Prediction(title, vocab.labels[int(row.argmax())], row, unknown, len(text), len(seen)))
    return out


def probabilities(model: CharModel, vocab: D.Vocab, decoded_titles: Sequence[str]) -> np.ndarray:
    """Class probabilities for already decoded titles, ``EVAL_BATCH`` rows per forward pass."""
    xm = model.xm
    program = Autograd(xm).compile(xm.operationSequence(xm.register("outputs")))
    codes = vocab.encode_titles(list(decoded_titles), model.dims["max_len"])
    out = np.empty((len(codes), vocab.num_labels), dtype=model.dtype)
    for start in range(0, len(codes), EVAL_BATCH):
        v = program.forward({**model.params, **model.feed(codes[start:start + EVAL_BATCH])},
                            keep=("outputs",), backward=False)
        out[start:start + EVAL_BATCH] = v[program.slot["outputs"]]
    return out


class TitlesFileError(ValueError):
    """A ``--titles`` file that cannot be read: one line, exit code 2."""


def read_titles(source: str) -> list[str]:
    """One title per line from the file ``source`` (``-``: standard input); blank lines are skipped."""
    try:
        if source == "-":
            data = sys.stdin.buffer.read()
            where = "standard input"
        else:
            where = source
            data = Path(source).read_bytes()
    except FileNotFoundError:
        raise TitlesFileError(f"--titles {source}: no such file; give a file with one title per line, "
                              f"or - for standard input") from None
    except IsADirectoryError:
        raise TitlesFileError(f"--titles {source}: is a directory; give a file with one title per line") from None
    except OSError as exc:
        raise TitlesFileError(f"--titles {source}: cannot read it ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TitlesFileError(f"--titles {where}:{line}: bytes {data[exc.start:exc.end]!r} are not UTF-8; "
                              f"save the titles as UTF-8") from None
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def tsv_lines(predictions: Sequence[Prediction], labels: Sequence[str]) -> list[str]:
    """A header (``title``, ``label``, one column per class in sorted label order) and a row per title.

    Tabs and line breaks inside a title are written as percent-escapes, as the data files do.
    """
    def cell(text: str) -> str:
        return text.replace("\t", "%09").replace("\n", "%0A").replace("\r", "%0D")

    lines = ["\t".join(["title", "label", *map(cell, labels)])]
    for p in predictions:
        lines.append("\t".join([cell(p.title), cell(p.label), *(f"{x:.6f}" for x in p.probs)]))
    return lines


# ---- scores on a labelled file ----------------------------------------------------------------
SCORE_SPLITS = ("test", "valid", "train")


@dataclass
class Score:
    """A saved model on one labelled file: mean loss, accuracy and the confusion matrix."""

    path: Path
    labels: tuple[str, ...]
    rows: int
    scored: int                # rows whose label the model knows
    loss: float | None
    accuracy: float | None
    confusion: np.ndarray      # [true label, predicted label] counts over the scored rows
    unknown_labels: list[tuple[int, str]]

    def as_json(self, model_path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
        return {"model": str(model_path), "kind": kind, "file": str(self.path), "rows": self.rows,
                "scored": self.scored, "loss": self.loss, "accuracy": self.accuracy, "labels": list(self.labels),
                "confusion": self.confusion.tolist(),
                "unknown_labels": [{"line": n, "label": lab} for n, lab in self.unknown_labels]}


def score(model: CharModel, vocab: D.Vocab, dataset: str | os.PathLike[str], split: str = "test") -> Score:
    """Score the model on ``<dataset>.<split>`` (a path prefix or shipped name, as for training).

    Rows whose label the model was not trained on are predicted but left out of the loss,
    accuracy and confusion matrix, and listed (as for training's test split). Raises
    :class:`models.data.DataError` for a bad file, with its line.
    """
    if split not in SCORE_SPLITS:
        raise ValueError(f"split must be one of {', '.join(SCORE_SPLITS)}, got {split!r}")
    path = Path(f"{os.fspath(D.resolve_dataset(dataset))}.{split}")
    rows = D.read_split(path)
    index = {label: j for j, label in enumerate(vocab.labels)}
    ids = np.array([index.get(label, D.PAD) for _, _, label in rows], dtype=np.int64)
    unknown = [(n, label) for n, _, label in rows if label not in index]
    codes = vocab.encode_titles([t for _, t, _ in rows], model.dims["max_len"])
    xm = model.xm
    program = Autograd(xm).compile(xm.operationSequence(xm.register("loss")))
    C = vocab.num_labels
    probs = np.empty((len(rows), C), dtype=model.dtype)
    rowloss = np.empty(len(rows), dtype=np.float64)
    known = ids >= 0
    has_rowloss = "rowloss" in program.slot  # optional in a model file
    for b in D.minibatches(codes, ids, C, EVAL_BATCH, dtype=model.dtype):
        v = program.forward({**model.params, **model.feed(b.x), "y": b.y},
                            keep=("outputs", "rowloss") if has_rowloss else ("outputs",), backward=False)
        probs[b.rows] = v[program.slot["outputs"]]
        rowloss[b.rows] = (v[program.slot["rowloss"]] if has_rowloss
                           else cross_entropy_rows(probs[b.rows], ids[b.rows]))
    confusion = np.zeros((C, C), dtype=np.int64)
    predicted = probs.argmax(axis=1)
    np.add.at(confusion, (ids[known], predicted[known]), 1)
    n = int(known.sum())
    loss = float(rowloss[known].mean()) if n else None
    accuracy = float((predicted[known] == ids[known]).mean()) if n else None
    return Score(path, tuple(vocab.labels), len(rows), n, loss, accuracy, confusion, unknown)
