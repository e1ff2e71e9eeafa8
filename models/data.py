"""Data layer for the character-level DBPedia entity-title classifiers.

A dataset is three files ``<prefix>.train``, ``<prefix>.valid`` and ``<prefix>.test`` with one
``Title<TAB>Label`` row per line.  Titles are percent-encoded UTF-8 (``Mikl%C3%B3s_Horthy``) and are
decoded here once, so everything downstream works on real characters.

Every problem with a file is reported as a :class:`DataError` whose message is a single line
``"<path>:<lineno>: <what is wrong> — <what to do>"`` (or ``"<path>: ..."`` for the whole file), so
a CLI can print it as is and an editor can jump to the line.
"""

from __future__ import annotations

import os
import site
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Sequence
from urllib.parse import unquote

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_DATASET",
    "SPLITS",
    "Batch",
    "DataError",
    "Dataset",
    "Split",
    "Vocab",
    "build_vocab",
    "load_dataset",
    "minibatches",
    "one_hot",
    "read_split",
    "resolve_dataset",
    "shipped_data_dirs",
]

#: Dataset used when the user names none; shipped in the project's ``data/`` folder.
DEFAULT_DATASET = "demo"

#: File suffixes of the three splits, in the order they are read.
SPLITS: tuple[str, ...] = ("train", "valid", "test")

PAD = -1
"""Index used for "no character" (padding, or a character outside the dictionary)."""

_BOM = b"\xef\xbb\xbf"
_EXCERPT = 60


class DataError(ValueError):
    """A dataset file is missing or malformed; the message is one line meant for the user."""


def _excerpt(text: str) -> str:
    """Quote (part of) an offending line safely: ``repr`` keeps the message on one line."""
    if len(text) > _EXCERPT:
        text = text[:_EXCERPT] + "…"
    return repr(text)


def _error(path: Path, lineno: int | None, problem: str, fix: str) -> DataError:
    where = f"{path}:{lineno}" if lineno is not None else f"{path}"
    return DataError(f"{where}: {problem} — {fix}")


# --------------------------------------------------------------------------------------------------
# Parsing


def read_split(path: str | os.PathLike[str]) -> list[tuple[int, str, str]]:
    """Parse one split file into ``(lineno, title, label)`` rows with decoded, stripped titles.

    Line numbers are 1-based physical lines so that messages (and unknown-label reports) point
    at the right place even when blank lines are skipped.  Raises :class:`DataError`.
    """
    path = Path(path)
    if path.is_dir():
        raise _error(path, None, "is a directory, not a data file",
                     "pass a dataset prefix such as 'data/demo' "
                     "(files <prefix>.train/.valid/.test)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _error(path, None, "no such file",
                     "check the dataset prefix; a dataset is <prefix>.train, <prefix>.valid "
                     "and <prefix>.test") from None
    except OSError as exc:
        raise _error(path, None, f"cannot read file ({exc.strerror or exc})",
                     "check that the file exists and is readable") from None

    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Decoding the whole file at once is fast; only on failure do we work out the line.
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise _error(path, lineno, f"bytes {data[exc.start:exc.end]!r} are not valid UTF-8",
                     "save the file as UTF-8 (titles should be percent-encoded)") from None

    rows: list[tuple[int, str, str]] = []
    # split("\n") rather than splitlines(): the latter also splits on \x85, \u2028, ... which
    # may legitimately occur inside a title.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line or line.isspace():
            continue
        tabs = line.count("\t")
        if tabs != 1:
            problem = "no tab" if tabs == 0 else f"{tabs} tabs"
            raise _error(path, lineno, f"expected 'Title<TAB>Label' but found {problem} in "
                         f"{_excerpt(line)}",
                         "write exactly one tab between the title and the label")
        raw_title, raw_label = line.split("\t")
        try:
            title = unquote(raw_title, errors="strict").strip()
        except UnicodeDecodeError as exc:
            raise _error(path, lineno, f"title {_excerpt(raw_title)} has percent-escapes that "
                         f"are not valid UTF-8 ({exc.reason})",
                         "fix the %XX escapes (each character must be complete UTF-8)") from None
        label = raw_label.strip()
        if not title:
            raise _error(path, lineno, f"empty title in {_excerpt(line)}",
                         "put the entity title before the tab, or delete the line")
        if not label:
            raise _error(path, lineno, f"empty label in {_excerpt(line)}",
                         "put the class label after the tab, or delete the line")
        rows.append((lineno, title, label))

    if not rows:
        raise _error(path, None, "no data rows (file is empty or blank)",
                     "add 'Title<TAB>Label' lines or point to another dataset")
    return rows


# --------------------------------------------------------------------------------------------------
# Vocabulary


@dataclass(frozen=True)
class Vocab:
    """Character dictionary and class list shared by every split of a dataset.

    ``chars`` maps each character to an input index (space is always 0) and ``labels`` is the
    sorted list of classes, so output column ``j`` is ``labels[j]``.
    """

    chars: dict[str, int]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        # encode_titles relies on these invariants; catch a hand-built Vocab that breaks them.
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("Vocab.chars keys must be single characters")
        if sorted(self.chars.values()) != list(range(len(self.chars))):
            raise ValueError("Vocab.chars indices must be exactly 0..len(chars)-1")
        if self.chars.get(" ") != 0:
            raise ValueError("Vocab.chars must map ' ' to 0")
        if list(self.labels) != sorted(set(self.labels)):
            raise ValueError("Vocab.labels must be sorted and unique")

    @property
    def num_chars(self) -> int:
        """Number of distinct input characters (width of the one-hot input)."""
        return len(self.chars)

    @property
    def num_labels(self) -> int:
        """Number of classes (width of the output layer)."""
        return len(self.labels)

    @cached_property
    def _table(self) -> np.ndarray:
        """Code point -> char index lookup table (-1 for characters not in the dictionary)."""
        size = max(map(ord, self.chars)) + 1
        table = np.full(size, PAD, dtype=np.int32)
        table[np.fromiter(map(ord, self.chars), dtype=np.int64, count=len(self.chars))] = \
            np.fromiter(self.chars.values(), dtype=np.int32, count=len(self.chars))
        return table

    def encode_titles(self, titles: Sequence[str], max_len: int) -> np.ndarray:
        """Encode titles as an ``int32 (n, max_len)`` array of char indices, ``-1`` = no character.

        Titles longer than ``max_len`` are truncated; unknown characters also become ``-1`` so
        that arbitrary user text can be predicted.  Vectorised over one UTF-32 buffer of all
        titles, because a per-character Python loop dominates training start-up otherwise.
        """
        if isinstance(titles, str):
            raise TypeError("encode_titles expects a sequence of titles, not a single string")
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        n = len(titles)
        out = np.full((n, max_len), PAD, dtype=np.int32)
        if n == 0:
            return out
        cut = [t[:max_len] for t in titles]
        lengths = np.fromiter(map(len, cut), dtype=np.int64, count=n)
        total = int(lengths.sum())
        if total == 0:
            return out
        cps = np.frombuffer("".join(cut).encode("utf-32-le"), dtype="<u4").astype(np.int64)
        table = self._table
        known = cps < table.shape[0]
        ids = np.full(total, PAD, dtype=np.int32)
        ids[known] = table[cps[known]]
        row = np.repeat(np.arange(n), lengths)
        starts = np.cumsum(lengths) - lengths
        col = np.arange(total) - np.repeat(starts, lengths)
        out[row, col] = ids
        return out


def build_vocab(titles: Iterable[str], train_labels: Iterable[str]) -> Vocab:
    """Build the dictionary deterministically: ' ' -> 0, other characters by code point.

    ``titles`` should cover all three splits (so test characters are not silently dropped);
    labels come from the training split only, since the model can only learn those.
    """
    charset: set[str] = set()
    for title in titles:
        charset.update(title)
    charset.discard(" ")
    chars = {" ": 0}
    chars.update((c, i) for i, c in enumerate(sorted(charset), start=1))
    return Vocab(chars=chars, labels=tuple(sorted(set(train_labels))))


# --------------------------------------------------------------------------------------------------
# Dataset


@dataclass
class Split:
    """One parsed file: decoded titles and label ids (``-1`` = label unseen in train, test only)."""

    path: Path
    titles: list[str]
    label_ids: np.ndarray
    unknown_labels: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.titles)


@dataclass
class Dataset:
    """The three splits of one dataset plus the vocabulary they share."""

    prefix: Path
    vocab: Vocab
    train: Split
    valid: Split
    test: Split


def _split_path(prefix: str | os.PathLike[str], split: str) -> Path:
    # Not Path.with_suffix: a prefix may itself contain dots ("runs/v1.2/demo").
    return Path(f"{os.fspath(prefix)}.{split}")


def load_dataset(prefix: str | os.PathLike[str]) -> Dataset:
    """Read ``<prefix>.train/.valid/.test``, build the vocabulary and map labels to ids.

    A valid label never seen in train is an error (validation accuracy would be meaningless);
    in test it is tolerated (id ``-1``, listed in ``Split.unknown_labels``) so that predictions
    can still be produced and the mismatch reported.
    """
    prefix = Path(prefix)
    paths = {s: _split_path(prefix, s) for s in SPLITS}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise _error(prefix, None, f"dataset incomplete, missing {', '.join(missing)}",
                     "a dataset needs <prefix>.train, <prefix>.valid and <prefix>.test")
    rows = {s: read_split(p) for s, p in paths.items()}

    vocab = build_vocab((title for s in SPLITS for _, title, _ in rows[s]),
                        [label for _, _, label in rows["train"]])
    index = {label: i for i, label in enumerate(vocab.labels)}

    splits: dict[str, Split] = {}
    for s in SPLITS:
        unknown = [(lineno, label) for lineno, _, label in rows[s] if label not in index]
        if unknown and s == "valid":
            lineno, label = unknown[0]
            more = f" ({len(unknown)} rows in all)" if len(unknown) > 1 else ""
            raise _error(paths[s], lineno,
                         f"label {label!r} does not occur in {paths['train']}{more}",
                         f"use one of {', '.join(vocab.labels)}, or add {label!r} rows to train")
        ids = np.fromiter((index.get(label, PAD) for _, _, label in rows[s]), dtype=np.int64,
                          count=len(rows[s]))
        splits[s] = Split(path=paths[s], titles=[title for _, title, _ in rows[s]],
                          label_ids=ids, unknown_labels=unknown)
    return Dataset(prefix=prefix, vocab=vocab, **splits)


def shipped_data_dirs() -> list[Path]:
    """Folders searched for demo data by bare name, in order.

    The source checkout (also what an editable install sees), then the ``data_files`` target of
    a regular install, then that of a ``pip install --user``.
    """
    dirs = [
        Path(__file__).resolve().parent.parent / "data",
        Path(sys.prefix) / "share" / "symdiff" / "data",
        Path(site.getuserbase()) / "share" / "symdiff" / "data",
    ]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _is_bare_name(name: str) -> bool:
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return bool(name) and not any(sep in name for sep in seps) and name not in {".", ".."}


def resolve_dataset(name: str | os.PathLike[str]) -> Path:
    """Turn what the user typed (a path prefix or a shipped dataset name) into a path prefix.

    A prefix whose ``.train`` file exists wins, so local data always shadows the shipped demo.
    """
    text = os.fspath(name)
    if text and _split_path(text, "train").exists():
        return Path(text)
    tried = [str(_split_path(text, "train"))]
    dirs = shipped_data_dirs()
    if _is_bare_name(text):
        for d in dirs:
            candidate = d / text
            if _split_path(candidate, "train").exists():
                return candidate
            tried.append(str(_split_path(candidate, "train")))

    available = sorted({p.name[: -len(".train")] for d in dirs if d.is_dir()
                        for p in d.glob("*.train")})
    hint = "pass a path prefix such that <prefix>.train exists"
    for s in SPLITS:
        stem = text[: -len(s) - 1]
        if text.endswith(f".{s}") and stem and _split_path(stem, "train").exists():
            hint = f"drop the .{s} suffix: the dataset prefix is {stem!r}"
            break
    names = ", ".join(available) if available else "none"
    raise DataError(f"{text or repr(text)}: dataset not found (tried {', '.join(tried)}) — {hint}; "
                    f"shipped datasets: {names}")


# --------------------------------------------------------------------------------------------------
# Batching


@dataclass
class Batch:
    """One minibatch; ``rows`` maps it back to file order (to put predictions in place)."""

    x: np.ndarray
    y: np.ndarray
    rows: np.ndarray


def _one_hot_table(depth: int, dtype: npt.DTypeLike) -> np.ndarray:
    """``eye(depth)`` plus a trailing zero row, so that index ``-1`` selects the zero row."""
    table = np.zeros((depth + 1, depth), dtype=dtype)
    table[np.arange(depth), np.arange(depth)] = 1
    return table


def _check_ids(ids: np.ndarray, depth: int, what: str) -> None:
    if ids.size and (ids.min() < -1 or ids.max() >= depth):
        raise ValueError(f"{what} must lie in [-1, {depth}), got values in "
                         f"[{ids.min()}, {ids.max()}]")


def one_hot(x: np.ndarray, depth: int, dtype: npt.DTypeLike = np.float64) -> np.ndarray:
    """Dense one-hot ``x.shape + (depth,)`` of an index array; ``-1`` gives an all-zero vector.

    Done by indexing a ``(depth+1, depth)`` table, so it is a single vectorised gather.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"one_hot needs an integer array, got {x.dtype}")
    if depth < 0:
        raise ValueError(f"depth must be non-negative, got {depth}")
    _check_ids(x, depth, "one_hot indices")
    return _one_hot_table(depth, dtype)[x]


#: about how many values :func:`minibatches` gathers at once (codes or one-hot labels of many batches)
GATHER_ELEMENTS = 1 << 20


def minibatches(codes: np.ndarray, label_ids: np.ndarray, num_labels: int, batch_size: int,
                rng: np.random.Generator | None = None,
                dtype: npt.DTypeLike = np.float64) -> Iterator[Batch]:
    """Yield batches covering every row exactly once; the last short batch is kept.

    With ``rng`` the rows are permuted once per call, so calling this once per epoch with one
    seeded Generator gives a different but reproducible order every epoch.
    """
    codes = np.asarray(codes)
    label_ids = np.asarray(label_ids)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (n, max_len), got shape {codes.shape}")
    if label_ids.shape != (codes.shape[0],):
        raise ValueError(f"label_ids must have shape ({codes.shape[0]},), got {label_ids.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    _check_ids(label_ids, num_labels, "label ids")
    n = codes.shape[0]
    order = np.arange(n, dtype=np.int64) if rng is None else rng.permutation(n).astype(np.int64)
    table = _one_hot_table(num_labels, dtype)
    # The rows of many batches are gathered at once and each batch is a view of them: two gathers
    # per batch cost more than the slices (a training batch's whole overhead counts), and the
    # block (about GATHER_ELEMENTS values) bounds the memory for many rows or many labels.
    width = max(num_labels, codes.shape[1], 1)
    block = batch_size * max(1, GATHER_ELEMENTS // (batch_size * width))
    for first in range(0, n, block):
        rows = order[first:first + block]
        x, y = codes[rows], table[label_ids[rows]]
        for start in range(0, len(rows), batch_size):
            stop = start + batch_size
            yield Batch(x=x[start:stop], y=y[start:stop], rows=rows[start:stop])
