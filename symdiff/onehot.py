"""A sparse one-hot matrix value, so ``X·W`` with one-hot ``X`` is a row gather.

Character models multiply one-hot rows by weight matrices; doing that as a
dense matrix product wastes almost all its FLOPs. A :class:`OneHot` input value
lets the ``mul`` op gather rows of ``W`` forward and scatter-add ``delta`` rows
backward, with the same math. Anything else that touches a ``OneHot`` sees the
dense matrix through ``__array__``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import SymdiffError

from . import native as _native


def _check_indices(idx: np.ndarray, depth: int, what: str, shape: str) -> None:
    """One-hot indices are a 2-d integer array in [-1, depth): the one check of a batch's codes."""
    if idx.ndim != 2 or idx.dtype.kind not in "iu":  # (np.issubdtype costs 10x this, every batch)
        raise SymdiffError(f"{what} must be an integer array of shape {shape}, got {idx.dtype} {idx.shape}")
    if idx.size and (idx.max() >= depth or idx.min() < -1):
        raise SymdiffError(f"{what} must lie in [-1, {depth - 1}], got [{idx.min()}, {idx.max()}]")


class OneHot:
    """An ``(n, depth)`` 0/1 matrix with at most ``k`` ones per row.

    ``indices`` is an ``(n, k)`` integer array of the columns holding a one;
    ``-1`` marks an unused slot (a padded character). A column listed twice in
    a row counts twice, in the gather, its gradient and the dense form alike (the
    models never do it: each slot is a distinct one-hot position).
    """

    __slots__ = ("indices", "depth", "dtype", "_valid", "_flat", "_segments", "_position")
    __array_priority__ = 100

    def __init__(self, indices: np.ndarray, depth: int, dtype: Any = np.float64) -> None:
        idx = np.asarray(indices)
        if idx.ndim == 1:
            idx = idx[:, None]
        _check_indices(idx, depth, "OneHot indices", "(n, k)")
        self.indices = idx
        self.depth = int(depth)
        self.dtype = np.dtype(dtype)
        self._valid: np.ndarray | None = None
        self._flat: tuple[np.ndarray, np.ndarray] | None = None
        self._segments: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._position: tuple[np.ndarray, int] | None = None  # (codes by position, t) from per_position

    @property
    def shape(self) -> tuple[int, int]:
        return (self.indices.shape[0], self.depth)

    @property
    def ndim(self) -> int:
        return 2

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        dense = np.zeros(self.shape, dtype=dtype or self.dtype)
        rows, cols = self._nonzeros()
        np.add.at(dense, (rows, cols), 1)  # a column listed twice in a row counts twice, as in matmul
        return dense

    def _nonzeros(self) -> tuple[np.ndarray, np.ndarray]:
        """Row and column of every one (cached: the same batch is used forward and backward)."""
        if self._flat is None:
            n, k = self.indices.shape
            rows = np.repeat(np.arange(n), k)
            cols = self.indices.ravel()
            keep = cols >= 0
            self._flat = (rows[keep], cols[keep])
        return self._flat

    def matmul(self, w: np.ndarray) -> np.ndarray:
        """``self @ w`` as a gather: the sum of the rows of ``w`` each row selects."""
        idx = self.indices
        if w.ndim != 2 or w.shape[0] != self.depth:
            raise SymdiffError(f"matrix product of one-hot {self.shape} with {w.shape}: inner dimensions differ")
        native = _native.active()
        if native is not None and type(w) is np.ndarray:
            out = native.onehot_gather(idx, w)  # compiled: sums the rows in place, no (n, k, h) copy
            if out is not None:
                return out
        padded = self._padding()
        if idx.shape[1] == 1:
            out = w[idx[:, 0]]
            if padded is not None:
                out[padded[:, 0]] = 0
            return out
        rows = w[idx]  # (n, k, h)
        if padded is not None:
            rows[padded] = 0
        return rows.sum(axis=1)

    def rmatmul_grad(self, delta: np.ndarray) -> "RowSparse":
        """``self.T @ delta`` (the weight gradient) as a scatter-add of ``delta`` rows.

        Compiled (:mod:`symdiff.native`): one pass over the indices finds the columns,
        one adds every row of ``delta`` to its columns' sums, in row order (no sort).
        Else the ones are grouped by column once per batch (cached), then each group of
        ``delta`` rows is summed (``segment_sum`` where it fits, which adds in the same
        order; else one ``reduceat``, several times faster than ``np.add.at``, whose
        summation order may differ in the last bit). The result keeps only the rows a character touched
        (:class:`RowSparse`): a batch touches a few hundred of the MLP's ~2000
        rows of ``W1``, and plain SGD then updates just those.
        """
        native = _native.active()
        blocks = getattr(delta, "parts", None)  # ops.RowBlocks: equal row blocks, read in place
        if native is not None and (type(delta) is np.ndarray or blocks is not None):
            # compiled: one pass marks the columns, one adds each row of delta to its columns' sums,
            # in the same order as the sorted groups below (no sort, no gathered copy)
            found = native.onehot_scatter(self.indices, self.depth, delta if blocks is None else blocks)
            if found is not None:
                columns, values = found
                return RowSparse(columns, values, (self.depth, values.shape[1]))
        if self._segments is None:
            rows, cols = self._nonzeros()
            # int16 where the columns fit: numpy's stable sort of 16-bit keys is a radix sort (2x faster here)
            keys = cols.astype(np.int16) if self.depth <= np.iinfo(np.int16).max else cols
            order = np.argsort(keys, kind="stable")
            sorted_cols = cols[order]
            first = np.empty(cols.size, bool)  # where a new column's group starts (np.r_ costs 3x this)
            first[:1] = True
            np.not_equal(sorted_cols[1:], sorted_cols[:-1], out=first[1:])
            starts = np.flatnonzero(first)
            self._segments = (rows[order], sorted_cols[starts], starts)
        rows, columns, starts = self._segments
        shape = (self.depth, delta.shape[1])
        if not rows.size:
            return RowSparse(columns, np.zeros((0, shape[1]), delta.dtype), shape)
        if native is not None and (type(delta) is np.ndarray or blocks is not None):
            # compiled: sums delta's rows in place, without the gathered copy (~4x faster here)
            values = native.segment_sum(delta if blocks is None else blocks, rows, starts)
            if values is not None:
                return RowSparse(columns, values, shape)
        delta = np.asarray(delta)
        return RowSparse(columns, np.add.reduceat(delta[rows], starts, axis=0), shape)

    def _padding(self) -> np.ndarray | None:
        if self._valid is None:
            pad = self.indices < 0
            self._valid = pad if pad.any() else np.zeros(0, bool)
        return self._valid if self._valid.size else None

    @classmethod
    def per_position(cls, codes: np.ndarray, depth: int, dtype: Any = np.float64) -> "list[OneHot]":
        """One ``(n, depth)`` one-hot matrix per column of an ``(n, M)`` code matrix (``-1``: none).

        A sequence model's inputs ``x0 ... x{M-1}``: the codes are checked once for all the
        positions (not once per position, as ``M`` constructions would), and each position's
        indices are contiguous (the compiled gather reads them in place).
        """
        idx = np.asarray(codes)
        _check_indices(idx, depth, "codes", "(n, positions)")
        columns = np.ascontiguousarray(idx.T)
        return cls._checked(columns[:, :, None], depth, dtype, stack=columns)

    @staticmethod
    def vstack(parts: "list[OneHot]") -> "OneHot":
        """The rows of several one-hot matrices of one depth, stacked (slots padded with -1).

        All the positions of one :meth:`per_position` call, in order (a sequence model's stacked
        input product), are already stacked in memory: their stack is a view, no copy."""
        first = parts[0]._position
        if first is not None and first[1] == 0 and len(parts) == first[0].shape[0]:
            columns, depth, dtype = first[0], parts[0].depth, parts[0].dtype
            for t, p in enumerate(parts):  # one plain loop: it runs every batch of a sequence model
                at = p._position
                if at is None or at[0] is not columns or at[1] != t or p.depth != depth or p.dtype != dtype:
                    break
            else:
                return OneHot._checked([columns.reshape(-1, 1)], depth, dtype)[0]
        k = max(p.indices.shape[1] for p in parts)
        idx = [p.indices if p.indices.shape[1] == k else
               np.pad(p.indices, ((0, 0), (0, k - p.indices.shape[1])), constant_values=-1) for p in parts]
        return OneHot._checked([np.concatenate(idx)], parts[0].depth, parts[0].dtype)[0]

    @classmethod
    def _checked(cls, indices: Any, depth: int, dtype: Any, stack: np.ndarray | None = None) -> "list[OneHot]":
        """One OneHot for each index array of ``indices``, known valid (rows of checked ones): no
        second pass over them. In one loop, as cheap as it gets: a sequence model's batch makes
        one per position (the training loop's own overhead per batch counts). ``stack``: the
        position-major codes whose rows ``indices`` are (per_position), so that :meth:`vstack`
        stacks all of them, in order, as a view."""
        depth, dtype, new = int(depth), np.dtype(dtype), cls.__new__
        out = []
        for t, idx in enumerate(indices):
            one = new(cls)
            one.indices, one.depth, one.dtype = idx, depth, dtype
            one._valid = one._flat = one._segments = None
            one._position = None if stack is None else (stack, t)
            out.append(one)
        return out

    def __repr__(self) -> str:
        return f"OneHot(shape={self.shape}, ones_per_row<={self.indices.shape[1]})"


class RowSparse:
    """A matrix that is zero outside a set of rows: the weight gradient of a one-hot product.

    ``rows`` are distinct; ``values[i]`` is row ``rows[i]``. Anything that needs
    the full matrix gets it through ``__array__`` (so sums, ``np.asarray``,
    Adam's moments all see the dense gradient); plain SGD and gradient
    clipping work on the rows alone. Column slices stay sparse (the gate
    weights of a merged LSTM product are cut out of one gradient).
    """

    __slots__ = ("rows", "values", "shape")
    ndim = 2

    def __init__(self, rows: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> None:
        self.rows, self.values, self.shape = rows, values, tuple(shape)

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        dense = np.zeros(self.shape, dtype=dtype or self.values.dtype)
        dense[self.rows] = self.values
        return dense

    def __getitem__(self, key: Any) -> Any:
        if (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None)
                and isinstance(key[1], slice)):
            cols = self.values[:, key[1]]
            return RowSparse(self.rows, cols, (self.shape[0], cols.shape[1]))
        return np.asarray(self)[key]

    def __add__(self, other: Any) -> np.ndarray:
        return np.asarray(self) + np.asarray(other)

    __radd__ = __add__

    def copy(self) -> "RowSparse":
        return RowSparse(self.rows, self.values.copy(), self.shape)

    def __repr__(self) -> str:
        return f"RowSparse(shape={self.shape}, rows={len(self.rows)})"
