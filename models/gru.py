"""A GRU character classifier: three gate blocks to the LSTM's four. Only the public API.

``z = σ(x Wz + h Uz + bz)`` (update), ``r = σ(x Wr + h Ur + br)`` (reset),
``n = tanh(x Wn + bn + r ⊙ (h Un))`` (candidate), ``h' = n + z ⊙ (h - n)``,
i.e. ``(1-z)⊙n + z⊙h`` with no constant 1 needed. The reset gate scales ``h Un`` after the product
(the "reset after" form of cuDNN and Keras' default), so all three of ``h``'s products share their
left operand and the engine merges them into one, as it does the LSTM's four. Characters are read
in reverse order like the seed's LSTM (the last step reads the title's first character); the final
state goes through a linear output layer (no ReLU on the logits: it can kill a class for good).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from symdiff import XMan, f
from symdiff.init import bias, glorot, side_by_side

GATES = ("n", "r", "z")  # name order = the merged product's column order
# Chosen on the validation split of ../shared/data/smaller (docs/tuning.md).
PRESETS = {
    "best": dict(optimizer="adam", init_lr=0.01, num_hid=64, max_len=30, batch_size=64, epochs=20,
                 schedule="plateau", patience=2, dtype="float32"),
}


def build(dims: dict[str, int], hp: dict[str, Any]) -> XMan:
    M, V, H, C = dims["max_len"], dims["num_chars"], hp["num_hid"], dims["num_labels"]
    dtype = np.dtype(hp["dtype"])
    rng = np.random.default_rng(hp["seed"])
    xm = XMan()
    xs = [f.input(name=f"x{M - 1 - t}") for t in range(M)]  # step t reads position M-1-t
    xm.y = f.input(name="y")
    xm.h0 = f.input(name="h0", default=np.zeros((1, H), dtype))  # zeros: fed with the batch's rows
    W = {g: f.param(name=f"W{g}", default=w) for g, w in side_by_side({g: glorot(rng, V, H, dtype) for g in GATES}).items()}
    U = {g: f.param(name=f"U{g}", default=u) for g, u in side_by_side({g: glorot(rng, H, H, dtype) for g in GATES}).items()}
    b = {g: f.param(name=f"b{g}", default=bias(rng, H, dtype)) for g in GATES}
    xm.W2 = f.param(name="W2", default=glorot(rng, H, C, dtype))
    xm.b2 = f.param(name="b2", default=np.zeros(C, dtype))
    h = xm.h0
    for t in range(M):
        z = f.sigmoid(xs[t] * W["z"] + h * U["z"] + b["z"])
        r = f.sigmoid(xs[t] * W["r"] + h * U["r"] + b["r"])
        n = f.tanh(xs[t] * W["n"] + b["n"] + f.hadamard(r, h * U["n"]))
        h = n + f.hadamard(z, h - n)
        setattr(xm, f"h{t + 1}", h)
    xm.outputs = f.softMax(h * xm.W2 + xm.b2)
    xm.rowloss = f.crossEnt(xm.outputs, xm.y)
    xm.loss = f.mean(xm.rowloss)
    return xm.setup()
