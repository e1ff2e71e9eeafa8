"""The seed's LSTM character classifier, unrolled over ``max_len`` steps in one graph.

Gates ``i, f, o = σ(X_t W_* + H_{t-1} U_* + b_*)``, ``c̃ = tanh(...)``,
``C_t = f⊙C_{t-1} + i⊙c̃``, ``H_t = o⊙tanh(C_t)``, with ``H_0 = C_0 = 0``; then
``relu(H_M W2 + b2)``, softMax and mean cross-entropy. Characters are fed in
reverse order: step ``t`` sees position ``M-1-t`` (as the seed did).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from symdiff import OneHot, XMan, f

from .data import one_hot
from .training import CharModel, bias, glorot, run_main

GATES = ("i", "f", "o", "c")


def build(max_len: int, num_chars: int, num_hid: int, num_labels: int, *, rng: np.random.Generator,
          dtype: Any = np.float64, default_rows: int = 4) -> CharModel:
    """Build the unrolled graph; params drawn in the order W*, U*, b* (i, f, o, c), W2, b2."""
    M, V, H, C = max_len, num_chars, num_hid, num_labels
    dtype = np.dtype(dtype)
    xm = XMan()
    codes = rng.integers(-1, V, size=(default_rows, M))
    dense = one_hot(codes, V, dtype)
    xs = [f.input(name=f"x{t}", default=dense[:, M - 1 - t, :]) for t in range(M)]
    xm.y = f.input(name="y", default=np.eye(C, dtype=dtype)[rng.integers(0, C, default_rows)])
    xm.h0 = f.input(name="h0", default=np.zeros((default_rows, H), dtype))
    xm.c0 = f.input(name="c0", default=np.zeros((default_rows, H), dtype))
    W = {g: f.param(name=f"W{g}", default=w) for g, w in _side_by_side({g: glorot(rng, V, H, dtype) for g in GATES})}
    U = {g: f.param(name=f"U{g}", default=u) for g, u in _side_by_side({g: glorot(rng, H, H, dtype) for g in GATES})}
    b = {g: f.param(name=f"b{g}", default=bias(rng, H, dtype)) for g in GATES}
    xm.W2 = f.param(name="W2", default=glorot(rng, H, C, dtype))
    xm.b2 = f.param(name="b2", default=bias(rng, C, dtype))
    h, c = xm.h0, xm.c0
    for t in range(M):
        pre = {g: xs[t] * W[g] + h * U[g] + b[g] for g in GATES}
        i, fg, o = f.sigmoid(pre["i"]), f.sigmoid(pre["f"]), f.sigmoid(pre["o"])
        c = f.hadamard(fg, c) + f.hadamard(i, f.tanh(pre["c"]))
        h = f.hadamard(o, f.tanh(c))
        setattr(xm, f"c{t + 1}", c)
        setattr(xm, f"h{t + 1}", h)
    xm.O = f.relu(h * xm.W2 + xm.b2)
    xm.outputs = f.softMax(xm.O)
    xm.rowloss = f.crossEnt(xm.outputs, xm.y)
    xm.loss = f.mean(xm.rowloss)
    xm.setup()
    zeros: dict[int, np.ndarray] = {}

    def feed(codes: np.ndarray, dense: bool = False) -> dict[str, Any]:
        n = codes.shape[0]
        if n not in zeros:
            zeros.clear()
            zeros[n] = np.zeros((n, H), dtype)  # never written to: the engine does not mutate inputs
        inputs: dict[str, Any] = {"h0": zeros[n], "c0": zeros[n]}
        if dense:
            d = one_hot(codes, V, dtype)
            for t in range(M):
                inputs[f"x{t}"] = d[:, M - 1 - t, :]
        else:
            for t in range(M):
                inputs[f"x{t}"] = OneHot(codes[:, M - 1 - t], V, dtype)
        return inputs

    return CharModel("lstm", xm, feed, dict(max_len=M, num_chars=V, num_hid=H, num_labels=C), dtype)


def _side_by_side(arrays: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """The four gates' matrices as column blocks of one array (same values, drawn as before).

    The engine's ``merge_matmuls`` multiplies by all four at once, joined in name order;
    stored side by side in that order, the join is a view instead of a copy per batch
    (with native code; otherwise it copies as before). Updates in place keep it so.
    """
    names = sorted(arrays)
    joined = np.concatenate([arrays[g] for g in names], axis=1)
    width = arrays[names[0]].shape[1]
    views = {g: joined[:, j * width:(j + 1) * width] for j, g in enumerate(names)}
    return [(g, views[g]) for g in arrays]


def main(params: dict[str, Any]) -> int:
    """Train the LSTM with the CLI's hyperparameters (``--max_len``, ``--num_hid``, ...)."""
    return run_main("lstm", params)


if __name__ == "__main__":
    import sys

    from .flags import parse_args

    sys.exit(main(parse_args("lstm", sys.argv[1:])))
