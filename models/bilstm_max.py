"""A bidirectional LSTM whose states are max-pooled over time (BiLSTM-max). Only the public API.

Two LSTMs read the title, one backwards (position ``M-1`` first, as the seed's LSTM) and one
forwards. Instead of keeping only each one's final state (``models/bilstm.py``), every unit's
largest value over all steps is kept: ``P = max_t H_t`` per direction (``f.max`` over
``f.stack`` of the states), and ``[P←, P→] W`` (written ``P← W2b + P→ W2f``) gives the logits. A
unit can so report "this pattern occurred somewhere in the title", wherever the pattern was.

Padded positions (after the title's end; all-zero one-hot rows) leave the state as it was: the
mask ``m_t = x_t · 1`` (``V x h`` ones, so ``m_t`` is ``N x h``, 1 on a character, 0 on a pad)
gives ``H_t = H_{t-1} + m_t ⊙ (H'_t - H_{t-1})``, the same for ``C``. The forward LSTM's last state
is then the one at the title's last character, and the backward LSTM starts on it from zeros.

Chosen on validation (docs/tuning.md): max pooling moved the validation loss from 0.53 (last
state, one or both directions) to 0.47; see there for the measurements.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from symdiff import XMan, f
from symdiff.init import bias, glorot, side_by_side

GATES = ("c", "f", "i", "o")
# Chosen on the validation split of ../shared/data/smaller (docs/tuning.md).
PRESETS = {
    "best": dict(optimizer="adam", init_lr=0.01, num_hid=64, max_len=30, batch_size=64, epochs=20,
                 schedule="plateau", patience=2, dtype="float32"),
}


def lstm(xm: XMan, xs: list[Any], masks: list[Any], prefix: str, V: int, H: int, rng: np.random.Generator,
         dtype: np.dtype) -> list[Any]:
    """An LSTM over ``xs`` from zero states, holding its state where ``masks`` is 0; all its ``h``."""
    W = {g: f.param(name=f"{prefix}W{g}", default=w)
         for g, w in side_by_side({g: glorot(rng, V, H, dtype) for g in GATES}).items()}
    U = {g: f.param(name=f"{prefix}U{g}", default=u)
         for g, u in side_by_side({g: glorot(rng, H, H, dtype) for g in GATES}).items()}
    b = {g: f.param(name=f"{prefix}b{g}", default=bias(rng, H, dtype)) for g in GATES}
    h = c = f.input(name=f"{prefix}0", default=np.zeros((1, H), dtype))  # zeros: fed with the batch's rows
    states = []
    for t, (x, m) in enumerate(zip(xs, masks)):
        pre = {g: x * W[g] + h * U[g] + b[g] for g in GATES}
        c_new = f.hadamard(f.sigmoid(pre["f"]), c) + f.hadamard(f.sigmoid(pre["i"]), f.tanh(pre["c"]))
        h_new = f.hadamard(f.sigmoid(pre["o"]), f.tanh(c_new))
        c = c + f.hadamard(m, c_new - c)  # a pad (m = 0) keeps the state
        h = h + f.hadamard(m, h_new - h)
        setattr(xm, f"{prefix}h{t + 1}", h)
        states.append(h)
    return states


def build(dims: dict[str, int], hp: dict[str, Any]) -> XMan:
    M, V, H, C = dims["max_len"], dims["num_chars"], hp["num_hid"], dims["num_labels"]
    dtype = np.dtype(hp["dtype"])
    rng = np.random.default_rng(hp["seed"])
    xm = XMan()
    xs = [f.input(name=f"x{t}") for t in range(M)]
    xm.y = f.input(name="y")
    ones = f.input(name="ONES", default=np.ones((V, H), dtype))  # a constant: x_t · 1 is 1 on a character
    masks = [x * ones for x in xs]
    backward = lstm(xm, xs[::-1], masks[::-1], "bw", V, H, rng, dtype)
    forward = lstm(xm, xs, masks, "fw", V, H, rng, dtype)
    xm.Pb = f.max(f.stack(backward, axis=1), axis=1)  # N x h: each unit's maximum over the steps
    xm.Pf = f.max(f.stack(forward, axis=1), axis=1)
    W2 = glorot(rng, 2 * H, C, dtype)
    xm.W2b = f.param(name="W2b", default=W2[:H].copy())
    xm.W2f = f.param(name="W2f", default=W2[H:].copy())
    xm.b2 = f.param(name="b2", default=np.zeros(C, dtype))
    xm.outputs = f.softMax(xm.Pb * xm.W2b + xm.Pf * xm.W2f + xm.b2)
    xm.rowloss = f.crossEnt(xm.outputs, xm.y)
    xm.loss = f.mean(xm.rowloss)
    return xm.setup()
