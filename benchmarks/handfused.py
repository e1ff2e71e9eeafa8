"""A hand-fused numpy LSTM: how fast numpy itself gets on this model (a yardstick, not an engine).

Same math and parameters as :func:`benchmarks.reference.lstm_loss_and_grads`,
written the way one would for speed: gate weights concatenated once per batch,
every character's ``x·W + b`` as one gather before the loop, one product and
one stacked pre-activation per step, sigmoid over three gates at once, the
step gradients written into one buffer so ``U``'s gradient is one product and
``W``'s one scatter-add. The benchmark reports it next to the engine so the
gap between the engine and what numpy allows is measured, not guessed.
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import numpy as np
import numpy.typing as npt

from benchmarks import reference as R

Array = npt.NDArray[np.floating]
ORDER = ("c", "f", "i", "o")  # tanh block first, then the three sigmoid gates side by side


def _sigmoid(u: Array) -> Array:
    """1/(1+exp(-u)), overflow-free for the pre-activations an LSTM sees (|u| < 700)."""
    e = np.exp(np.negative(u))
    e += 1
    return np.reciprocal(e, out=e)


def lstm_loss_and_grads(params: Mapping[str, Array], x_idx: npt.NDArray[np.integer],
                        y: npt.ArrayLike) -> tuple[float, R.Params]:
    """Mean cross-entropy and its gradients for the reference's LSTM (characters fed in reverse)."""
    dt = R._dtype_of(params)
    V, H = params["Wi"].shape
    x_idx = np.asarray(x_idx)
    n, M = x_idx.shape
    W = np.concatenate([params["W" + g] for g in ORDER], axis=1)
    U = np.concatenate([params["U" + g] for g in ORDER], axis=1)
    b = np.concatenate([params["b" + g] for g in ORDER])
    idx = x_idx[:, ::-1].T  # (M, n): step t sees position M-1-t
    pad = idx < 0
    XW = W[np.where(pad, 0, idx)]
    XW[pad] = 0
    XW += b
    hs = np.zeros((M + 1, n, H), dt)
    c = np.zeros((n, H), dt)
    saved = []
    for t in range(M):
        z = XW[t] + hs[t] @ U
        g = np.tanh(z[:, :H])
        s = _sigmoid(z[:, H:])
        f, i, o = s[:, :H], s[:, H:2 * H], s[:, 2 * H:]
        c_new = f * c
        c_new += i * g
        tc = np.tanh(c_new)
        np.multiply(o, tc, out=hs[t + 1])
        saved.append((g, s, c, tc))
        c = c_new
    a = hs[M] @ params["W2"] + params["b2"]
    O = np.maximum(a, 0)
    loss, dO = R._xent_head(O, R._check_y(y, n, O.shape[1], dt))
    da = dO * (a > 0)
    grads: R.Params = {"W2": hs[M].T @ da, "b2": da.sum(axis=0)}
    dh = da @ params["W2"].T
    dc = np.zeros_like(dh)
    dZ = np.empty((M, n, 4 * H), dt)
    for t in reversed(range(M)):
        g, s, c_prev, tc = saved[t]
        f, i, o = s[:, :H], s[:, H:2 * H], s[:, 2 * H:]
        dc += dh * o * (1 - tc * tc)
        dz = dZ[t]
        np.multiply(dc * i, 1 - g * g, out=dz[:, :H])
        np.multiply(dc, c_prev, out=dz[:, H:2 * H])
        np.multiply(dc, g, out=dz[:, 2 * H:3 * H])
        np.multiply(dh, tc, out=dz[:, 3 * H:])
        dz[:, H:] *= s * (1 - s)
        dh = dz @ U.T
        dc = dc * f
    flat = dZ.reshape(M * n, 4 * H)
    dU = hs[:M].reshape(M * n, H).T @ flat
    db = flat.sum(axis=0)
    rows = np.flatnonzero(~pad.ravel())
    chars = idx.ravel()[rows]
    order = np.argsort(chars, kind="stable")
    sorted_chars = chars[order]
    starts = np.flatnonzero(np.r_[True, sorted_chars[1:] != sorted_chars[:-1]])
    dW = np.zeros((V, 4 * H), dt)
    if rows.size:
        dW[sorted_chars[starts]] = np.add.reduceat(flat[rows[order]], starts, axis=0)
    for k, gate in enumerate(ORDER):
        cols = slice(k * H, (k + 1) * H)
        grads["W" + gate], grads["U" + gate], grads["b" + gate] = dW[:, cols], dU[:, cols], db[cols]
    return loss, grads


def train_epoch(params: MutableMapping[str, Array], x_codes: npt.NDArray[np.integer], y_onehot: npt.ArrayLike,
                batch_size: int, lr: float, rng: np.random.Generator) -> float:
    """One epoch of plain SGD in the reference's batch order; mean of the batch losses."""
    y_arr = np.asarray(y_onehot, dtype=R._dtype_of(params))
    perm = rng.permutation(len(x_codes))
    losses = []
    for start in range(0, len(x_codes), batch_size):
        rows = perm[start:start + batch_size]
        loss, grads = lstm_loss_and_grads(params, x_codes[rows], y_arr[rows])
        R.sgd_step(params, grads, lr)
        losses.append(loss)
    return float(np.mean(losses))
