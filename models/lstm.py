"""The seed's LSTM character classifier, a model file like any user's (``symdiff train lstm`` = ``symdiff lstm``).

Unrolled over ``max_len`` steps in one graph. Gates ``i, f, o = σ(X_t W_* + H_{t-1} U_* + b_*)``,
``c̃ = tanh(...)``, ``C_t = f⊙C_{t-1} + i⊙c̃``, ``H_t = o⊙tanh(C_t)``, with ``H_0 = C_0 = 0``; then
``relu(H_M W2 + b2)``, softMax and mean cross-entropy. Characters are read in reverse order: step
``t`` reads position ``M-1-t`` (input ``x{M-1-t}``), as the seed did. Only the public API.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from symdiff import XMan, f
from symdiff.init import bias, glorot, side_by_side

GATES = ("i", "f", "o", "c")
# Chosen on the validation split of ../shared/data/smaller (docs/tuning.md); keys left out keep the flags' defaults.
PRESETS = {
    "best": dict(optimizer="adam", init_lr=0.01, weight_decay=0.0, num_hid=64, max_len=30, batch_size=64,
                 epochs=20, schedule="plateau", patience=2, dtype="float32", momentum=0.9, clip=None, average=None),
}


def build(dims: dict[str, int], hp: dict[str, Any], default_rows: int = 4) -> XMan:
    """The unrolled graph; params drawn from ``default_rng(hp["seed"])``: W*, U*, b* (i, f, o, c), W2, b2."""
    M, V, H, C = dims["max_len"], dims["num_chars"], hp["num_hid"], dims["num_labels"]
    dtype = np.dtype(hp.get("dtype", "float64"))
    rng = np.random.default_rng(hp.get("seed", 0))
    xm = XMan()
    codes = rng.integers(-1, V, size=(default_rows, M))
    dense = np.eye(V + 1, V, dtype=dtype)[codes]
    xs = [f.input(name=f"x{M - 1 - t}", default=dense[:, M - 1 - t, :]) for t in range(M)]  # step t: position M-1-t
    xm.y = f.input(name="y", default=np.eye(C, dtype=dtype)[rng.integers(0, C, default_rows)])
    xm.h0 = f.input(name="h0", default=np.zeros((default_rows, H), dtype))
    xm.c0 = f.input(name="c0", default=np.zeros((default_rows, H), dtype))
    # side_by_side: the gates' matrices as column blocks of one array, so the engine's merged
    # product by all four reads them in place (same values, drawn in the same order)
    W = {g: f.param(name=f"W{g}", default=w) for g, w in side_by_side({g: glorot(rng, V, H, dtype) for g in GATES}).items()}
    U = {g: f.param(name=f"U{g}", default=u) for g, u in side_by_side({g: glorot(rng, H, H, dtype) for g in GATES}).items()}
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
    return xm.setup()


if __name__ == "__main__":
    import sys

    from .flags import parse_args
    from .training import run_main

    sys.exit(run_main("lstm", parse_args("lstm", sys.argv[1:])))
