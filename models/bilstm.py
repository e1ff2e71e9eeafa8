"""A bidirectional LSTM character classifier. Only the public API.

Two LSTMs over the title: one reads it forwards (position 0 first), one backwards (position
``M-1`` first); their final states ``h→`` and ``h←`` are concatenated and go through a linear
output layer. There is no concatenation op, and none is needed: ``[h→, h←] W2`` is
``h→ W2f + h← W2b`` with ``W2`` cut in two row blocks — the same numbers. Each LSTM is the seed's
cell (``i, f, o = σ(...)``, ``c̃ = tanh(...)``, ``C' = f⊙C + i⊙c̃``, ``h' = o⊙tanh(C')``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from symdiff import XMan, f
from symdiff.init import bias, glorot, side_by_side

GATES = ("c", "f", "i", "o")
# Chosen on the validation split of ../shared/data/smaller (docs/tuning.md).
PRESETS = {
    "best": dict(optimizer="adam", init_lr=0.01, num_hid=48, max_len=30, batch_size=64, epochs=20,
                 schedule="plateau", patience=2, dtype="float32"),
}


def lstm(xm: XMan, xs: list[Any], prefix: str, V: int, H: int, rng: np.random.Generator, dtype: np.dtype) -> Any:
    """Run an LSTM over ``xs`` (one register per step) from zero states; returns its last ``h``."""
    W = {g: f.param(name=f"{prefix}W{g}", default=w)
         for g, w in side_by_side({g: glorot(rng, V, H, dtype) for g in GATES}).items()}
    U = {g: f.param(name=f"{prefix}U{g}", default=u)
         for g, u in side_by_side({g: glorot(rng, H, H, dtype) for g in GATES}).items()}
    b = {g: f.param(name=f"{prefix}b{g}", default=bias(rng, H, dtype)) for g in GATES}
    h = c = f.input(name=f"{prefix}0", default=np.zeros((1, H), dtype))  # zeros: fed with the batch's rows
    for t, x in enumerate(xs):
        pre = {g: x * W[g] + h * U[g] + b[g] for g in GATES}
        c = f.hadamard(f.sigmoid(pre["f"]), c) + f.hadamard(f.sigmoid(pre["i"]), f.tanh(pre["c"]))
        h = f.hadamard(f.sigmoid(pre["o"]), f.tanh(c))
        setattr(xm, f"{prefix}h{t + 1}", h)
    return h


def build(dims: dict[str, int], hp: dict[str, Any]) -> XMan:
    M, V, H, C = dims["max_len"], dims["num_chars"], hp["num_hid"], dims["num_labels"]
    dtype = np.dtype(hp["dtype"])
    rng = np.random.default_rng(hp["seed"])
    xm = XMan()
    xs = [f.input(name=f"x{t}") for t in range(M)]
    xm.y = f.input(name="y")
    forward = lstm(xm, xs, "fw", V, H, rng, dtype)
    backward = lstm(xm, xs[::-1], "bw", V, H, rng, dtype)
    xm.W2f = f.param(name="W2f", default=glorot(rng, 2 * H, C, dtype)[:H])
    xm.W2b = f.param(name="W2b", default=glorot(rng, 2 * H, C, dtype)[H:])
    xm.b2 = f.param(name="b2", default=np.zeros(C, dtype))
    xm.outputs = f.softMax(forward * xm.W2f + backward * xm.W2b + xm.b2)
    xm.rowloss = f.crossEnt(xm.outputs, xm.y)
    xm.loss = f.mean(xm.rowloss)
    return xm.setup()
