"""Parameter initialisers for model files (numpy only, no SymPy).

A model's ``build`` draws its parameters from one seeded Generator, so the same
``--seed`` gives the same starting point; these are the draws the shipped models use.

>>> import numpy as np
>>> from symdiff.init import glorot, bias
>>> rng = np.random.default_rng(0)
>>> glorot(rng, 30, 50, np.float32).shape, bias(rng, 50, np.float32).shape
((30, 50), (50,))
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["glorot", "bias", "side_by_side"]


def glorot(rng: np.random.Generator, din: int, dout: int, dtype: Any = np.float64) -> np.ndarray:
    """Glorot-uniform ``U(-a, a)``, ``a = sqrt(6/(din+dout))``: keeps activations' variance level across layers."""
    a = math.sqrt(6.0 / (din + dout))
    return rng.uniform(-a, a, size=(din, dout)).astype(dtype)


def bias(rng: np.random.Generator, n: int, dtype: Any = np.float64) -> np.ndarray:
    """Biases at scale 0.1, ``U(-0.1, 0.1)``: small, but not all equal (as the seed drew them)."""
    return rng.uniform(-0.1, 0.1, size=(n,)).astype(dtype)


def side_by_side(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same matrices, stored as column blocks of one array in name order (views into it).

    Why: the engine's ``merge_matmuls`` pass turns ``h*U1, h*U2, ...`` (one left operand, several
    parameters) into one product with the parameters joined side by side in name order. Stored that
    way already, the join is a view instead of a copy per batch (with native code). The values are
    unchanged, and in-place updates keep the layout. Name the blocks so that their sorted order is
    the order you want (``U0..U9`` sort; ``U2, U10`` do not).
    """
    names = sorted(arrays)
    joined = np.concatenate([arrays[g] for g in names], axis=1)
    widths = np.cumsum([0] + [arrays[g].shape[1] for g in names])
    views = {g: joined[:, widths[j]:widths[j + 1]] for j, g in enumerate(names)}
    return {g: views[g] for g in arrays}
