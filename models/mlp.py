"""The seed's MLP character classifier, built on the engine.

``O1 = relu(X W1 + b1)``, ``O2 = relu(O1 W2 + b2)``, ``P = softMax(O2)``,
``loss = mean(crossEnt(P, T))`` where ``X`` is the flattened ``N x (M*V)``
one-hot title (position ``m``, character ``c`` is column ``m*V + c``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from symdiff import OneHot, XMan, f

from .data import one_hot
from .training import CharModel, bias, glorot, run_main


def build(max_len: int, num_chars: int, num_hid: int, num_labels: int, *, rng: np.random.Generator,
          dtype: Any = np.float64, default_rows: int = 4) -> CharModel:
    """Build the graph; params are drawn from ``rng`` (W1, b1, W2, b2 in that order)."""
    M, V, H, C = max_len, num_chars, num_hid, num_labels
    dtype = np.dtype(dtype)
    xm = XMan()
    codes = rng.integers(-1, V, size=(default_rows, M))
    xm.X = f.input(name="X", default=one_hot(codes, V, dtype).reshape(default_rows, M * V))
    xm.y = f.input(name="y", default=np.eye(C, dtype=dtype)[rng.integers(0, C, default_rows)])
    xm.W1 = f.param(name="W1", default=glorot(rng, M * V, H, dtype))
    xm.b1 = f.param(name="b1", default=bias(rng, H, dtype))
    xm.W2 = f.param(name="W2", default=glorot(rng, H, C, dtype))
    xm.b2 = f.param(name="b2", default=bias(rng, C, dtype))
    xm.O1 = f.relu(xm.X * xm.W1 + xm.b1)
    xm.O2 = f.relu(xm.O1 * xm.W2 + xm.b2)
    xm.outputs = f.softMax(xm.O2)
    xm.rowloss = f.crossEnt(xm.outputs, xm.y)
    xm.loss = f.mean(xm.rowloss)
    xm.setup()
    offsets = np.arange(M) * V

    def feed(codes: np.ndarray, dense: bool = False) -> dict[str, Any]:
        n = codes.shape[0]
        if dense:
            return {"X": one_hot(codes, V, dtype).reshape(n, M * V)}
        flat = np.where(codes >= 0, codes + offsets, -1)
        return {"X": OneHot(flat, M * V, dtype)}

    return CharModel("mlp", xm, feed, dict(max_len=M, num_chars=V, num_hid=H, num_labels=C), dtype)


def main(params: dict[str, Any]) -> int:
    """Train the MLP with the CLI's hyperparameters (``--max_len``, ``--num_hid``, ...)."""
    return run_main("mlp", params)


if __name__ == "__main__":
    import sys

    from .flags import parse_args

    sys.exit(main(parse_args("mlp", sys.argv[1:])))
