"""The seed's MLP character classifier, a model file like any user's (``symdiff train mlp`` = ``symdiff mlp``).

``O1 = relu(X W1 + b1)``, ``O2 = relu(O1 W2 + b2)``, ``P = softMax(O2)``,
``loss = mean(crossEnt(P, T))`` where ``X`` is the flattened ``N x (M*V)``
one-hot title (position ``m``, character ``c`` is column ``m*V + c``).
Only the public API: ``symdiff`` and ``symdiff.init``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from symdiff import XMan, f
from symdiff.init import bias, glorot

# Chosen on the validation split of ../shared/data/smaller (docs/tuning.md); keys left out keep the flags' defaults.
PRESETS = {
    "best": dict(optimizer="adamw", init_lr=0.006, weight_decay=0.3, num_hid=128, max_len=25, batch_size=128,
                 epochs=30, schedule="plateau", patience=2, dtype="float32", momentum=0.9, clip=None, average=None),
}


def build(dims: dict[str, int], hp: dict[str, Any], default_rows: int = 4) -> XMan:
    """The graph; params drawn from ``default_rng(hp["seed"])`` (W1, b1, W2, b2, after the inputs' defaults)."""
    M, V, H, C = dims["max_len"], dims["num_chars"], hp["num_hid"], dims["num_labels"]
    dtype = np.dtype(hp.get("dtype", "float64"))
    rng = np.random.default_rng(hp.get("seed", 0))
    xm = XMan()
    codes = rng.integers(-1, V, size=(default_rows, M))
    xm.X = f.input(name="X", default=np.eye(V + 1, V, dtype=dtype)[codes].reshape(default_rows, M * V))
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
    return xm.setup()


if __name__ == "__main__":
    import sys

    from .flags import parse_args
    from .training import run_main

    sys.exit(run_main("mlp", parse_args("mlp", sys.argv[1:])))
