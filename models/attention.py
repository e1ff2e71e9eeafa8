"""An LSTM whose states at every step are pooled by soft attention with a learned query. Public API only.

The seed's question 4, ``softMax(q·Hᵀ)·H`` (``symdiff.nn.attend``), put to work: for each title,
``H`` is the ``M x h`` matrix of its LSTM states ``H_1 ... H_M``, ``q`` a learned ``h``-vector,
``α = softMax(q·Hᵀ)`` the attention over the steps and ``α·H`` the pooled state, which a linear layer
maps to the classes. A batch holds N titles, so ``H`` is really ``N x M x h``; with 2-D registers
the same numbers come from per-step products with constant selector matrices:

* scores ``S = Σ_t (H_t q) E_t``: ``H_t q`` is ``N x 1``, ``E_t`` the ``1 x M`` row with a 1 at ``t``;
* ``A = softMax(S)`` row-wise (``N x M``; the engine's softMax is the stable one);
* pooled ``P = Σ_t (A R_t) ⊙ H_t``: ``R_t`` is ``M x h`` with ones in row ``t``, so ``A R_t`` repeats
  column ``t`` of ``A`` across the ``h`` units (the engine merges all ``A R_t`` into one product).

The LSTM is the seed's cell, reading the title backwards like the seed's model.
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


def build(dims: dict[str, int], hp: dict[str, Any]) -> XMan:
    M, V, H, C = dims["max_len"], dims["num_chars"], hp["num_hid"], dims["num_labels"]
    dtype = np.dtype(hp["dtype"])
    rng = np.random.default_rng(hp["seed"])
    xm = XMan()
    xs = [f.input(name=f"x{M - 1 - t}") for t in range(M)]  # step t reads position M-1-t
    xm.y = f.input(name="y")
    W = {g: f.param(name=f"W{g}", default=w) for g, w in side_by_side({g: glorot(rng, V, H, dtype) for g in GATES}).items()}
    U = {g: f.param(name=f"U{g}", default=u) for g, u in side_by_side({g: glorot(rng, H, H, dtype) for g in GATES}).items()}
    b = {g: f.param(name=f"b{g}", default=bias(rng, H, dtype)) for g in GATES}
    xm.q = f.param(name="q", default=glorot(rng, H, 1, dtype))
    xm.W2 = f.param(name="W2", default=glorot(rng, H, C, dtype))
    xm.b2 = f.param(name="b2", default=np.zeros(C, dtype))
    # constants (inputs fed their defaults): E_t picks score column t, R_t spreads weight t over h units
    E = [f.input(name=f"E{t:03d}", default=np.eye(M, dtype=dtype)[t:t + 1]) for t in range(M)]
    spread = side_by_side({f"R{t:03d}": np.kron(np.eye(M, dtype=dtype)[:, t:t + 1], np.ones((1, H), dtype))
                           for t in range(M)})
    R = [f.input(name=name, default=value) for name, value in spread.items()]
    h = c = f.input(name="h0", default=np.zeros((1, H), dtype))  # zeros: fed with the batch's rows
    states = []
    for t in range(M):
        pre = {g: xs[t] * W[g] + h * U[g] + b[g] for g in GATES}
        c = f.hadamard(f.sigmoid(pre["f"]), c) + f.hadamard(f.sigmoid(pre["i"]), f.tanh(pre["c"]))
        h = f.hadamard(f.sigmoid(pre["o"]), f.tanh(c))
        setattr(xm, f"h{t + 1}", h)
        states.append(h)
    scores = states[0] * xm.q * E[0]
    for t in range(1, M):
        scores = scores + states[t] * xm.q * E[t]
    xm.alpha = f.softMax(scores)
    pooled = f.hadamard(xm.alpha * R[0], states[0])
    for t in range(1, M):
        pooled = pooled + f.hadamard(xm.alpha * R[t], states[t])
    xm.pooled = pooled
    xm.outputs = f.softMax(pooled * xm.W2 + xm.b2)
    xm.rowloss = f.crossEnt(xm.outputs, xm.y)
    xm.loss = f.mean(xm.rowloss)
    return xm.setup()
