"""Hand-written numpy reference for the two symdiff models (no autodiff).

This is the "hand-written numpy, dense one-hot matmuls" baseline used by the
performance benchmark, and an independent cross-check of the engine's losses
and gradients.  Forward and backward passes are written out explicitly.

Conventions
-----------
* ``x_idx``: integer array (N, M) of character indices, ``-1`` = padding.
* ``y``: (N, C) one-hot labels.
* Dense one-hot ``X[n, m, x_idx[n, m]] = 1``; all-zero vector for padding.
* Every temporary is created in the parameters' dtype (float64 by default,
  float32 works without silent upcasts); the loss is returned as a Python float.

Parameter names match the engine's models so parameters can be copied across.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]
Params = dict[str, Array]

MLP_PARAMS: tuple[str, ...] = ("W1", "b1", "W2", "b2")
LSTM_PARAMS: tuple[str, ...] = (
    "Wi", "Wf", "Wo", "Wc",
    "Ui", "Uf", "Uo", "Uc",
    "bi", "bf", "bo", "bc",
    "W2", "b2",
)
_GATES: tuple[str, ...] = ("i", "f", "o", "c")


# --------------------------------------------------------------------------- #
# Initialisation
# --------------------------------------------------------------------------- #
def _glorot(rng: np.random.Generator, din: int, dout: int, dtype: npt.DTypeLike) -> Array:
    """Glorot-uniform (din, dout) matrix, U(-a, a) with a = sqrt(6/(din+dout))."""
    a = np.sqrt(6.0 / (din + dout))
    return rng.uniform(-a, a, size=(din, dout)).astype(dtype)


def _bias(rng: np.random.Generator, n: int, dtype: npt.DTypeLike) -> Array:
    """Bias vector drawn from U(-0.1, 0.1)."""
    return rng.uniform(-0.1, 0.1, size=(n,)).astype(dtype)


def init_mlp(
    V: int, M: int, H: int, C: int, rng: np.random.Generator, dtype: npt.DTypeLike = np.float64
) -> Params:
    """MLP parameters ``W1`` (M*V, H), ``b1`` (H,), ``W2`` (H, C), ``b2`` (C,)."""
    return {
        "W1": _glorot(rng, M * V, H, dtype),
        "b1": _bias(rng, H, dtype),
        "W2": _glorot(rng, H, C, dtype),
        "b2": _bias(rng, C, dtype),
    }


def init_lstm(
    V: int, H: int, C: int, rng: np.random.Generator, dtype: npt.DTypeLike = np.float64
) -> Params:
    """LSTM parameters, drawn in ``LSTM_PARAMS`` order."""
    p: Params = {}
    for g in _GATES:
        p["W" + g] = _glorot(rng, V, H, dtype)
    for g in _GATES:
        p["U" + g] = _glorot(rng, H, H, dtype)
    for g in _GATES:
        p["b" + g] = _bias(rng, H, dtype)
    p["W2"] = _glorot(rng, H, C, dtype)
    p["b2"] = _bias(rng, C, dtype)
    return p


# --------------------------------------------------------------------------- #
# Shared pieces
# --------------------------------------------------------------------------- #
def one_hot(x_idx: IntArray, V: int, dtype: npt.DTypeLike = np.float64) -> Array:
    """Dense one-hot (N, M, V) of ``x_idx``; rows with index -1 stay zero."""
    x_idx = np.asarray(x_idx)
    if x_idx.ndim != 2:
        raise ValueError(f"x_idx must be 2-D (N, M), got shape {x_idx.shape}")
    if x_idx.size and (x_idx.min() < -1 or x_idx.max() >= V):
        raise ValueError(f"x_idx entries must lie in [-1, {V - 1}]")
    N, M = x_idx.shape
    X = np.zeros((N, M, V), dtype=dtype)
    n, m = np.nonzero(x_idx >= 0)
    X[n, m, x_idx[n, m]] = 1
    return X


def _dtype_of(params: Mapping[str, Array]) -> np.dtype:
    """Common floating dtype of the parameters (error if they disagree)."""
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1:
        raise TypeError(f"parameters have mixed dtypes: {sorted(map(str, dtypes))}")
    dt = dtypes.pop()
    if not np.issubdtype(dt, np.floating):
        raise TypeError(f"parameters must be floating point, got {dt}")
    return dt


def _relu(z: Array) -> Array:
    """max(z, 0), same dtype as z."""
    return np.maximum(z, 0)


def _sigmoid(z: Array) -> Array:
    """Stable logistic sigmoid 0.5*(1 + tanh(z/2))."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _log_softmax(z: Array) -> Array:
    """Row-wise log-softmax with max subtraction."""
    s = z - z.max(axis=1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


def _xent_head(logits: Array, y: Array) -> tuple[float, Array]:
    """Mean cross-entropy of softmax(logits) vs y, and d loss / d logits = (P - y)/N."""
    N = logits.shape[0]
    logp = _log_softmax(logits)
    loss = -float((y * logp).sum()) / N
    dlogits = (np.exp(logp) - y) / N
    return loss, dlogits


def _check_y(y: npt.ArrayLike, N: int, C: int, dtype: np.dtype) -> Array:
    """Labels as an (N, C) array of the parameters' dtype."""
    y_arr = np.asarray(y, dtype=dtype)
    if y_arr.shape != (N, C):
        raise ValueError(f"y must have shape {(N, C)}, got {y_arr.shape}")
    return y_arr


# --------------------------------------------------------------------------- #
# MLP
# --------------------------------------------------------------------------- #
def _mlp_forward(params: Mapping[str, Array], x_idx: IntArray) -> dict[str, Array]:
    """Forward pass; returns the intermediates needed by the backward pass."""
    dt = _dtype_of(params)
    W1 = params["W1"]
    N, M = np.shape(x_idx)
    V = W1.shape[0] // M
    if V * M != W1.shape[0]:
        raise ValueError(f"W1 has {W1.shape[0]} rows, not a multiple of M={M}")
    X = one_hot(x_idx, V, dt).reshape(N, M * V)  # column m*V + c
    a1 = X @ W1 + params["b1"]
    O1 = _relu(a1)
    a2 = O1 @ params["W2"] + params["b2"]
    O2 = _relu(a2)
    return {"X": X, "a1": a1, "O1": O1, "a2": a2, "O2": O2}


def mlp_predict(params: Mapping[str, Array], x_idx: IntArray) -> Array:
    """Class probabilities P (N, C) of the MLP."""
    return np.exp(_log_softmax(_mlp_forward(params, x_idx)["O2"]))


def mlp_loss_and_grads(
    params: Mapping[str, Array], x_idx: IntArray, y: npt.ArrayLike
) -> tuple[float, Params]:
    """Mean cross-entropy loss of the MLP and its gradients wrt every parameter."""
    dt = _dtype_of(params)
    fw = _mlp_forward(params, x_idx)
    y_arr = _check_y(y, fw["O2"].shape[0], fw["O2"].shape[1], dt)
    loss, dO2 = _xent_head(fw["O2"], y_arr)

    da2 = dO2 * (fw["a2"] > 0)  # relu'(0) = 0
    dW2 = fw["O1"].T @ da2
    db2 = da2.sum(axis=0)
    dO1 = da2 @ params["W2"].T
    da1 = dO1 * (fw["a1"] > 0)
    dW1 = fw["X"].T @ da1
    db1 = da1.sum(axis=0)
    return loss, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}


# --------------------------------------------------------------------------- #
# LSTM
# --------------------------------------------------------------------------- #
def _lstm_forward(
    params: Mapping[str, Array], x_idx: IntArray
) -> tuple[list[dict[str, Array]], Array, Array]:
    """Forward pass over the reversed sequence.

    Returns (per-step caches for BPTT, final hidden state h_M, pre-relu logits).
    """
    dt = _dtype_of(params)
    V, H = params["Wi"].shape
    N, M = np.shape(x_idx)
    X = one_hot(x_idx, V, dt)
    h = np.zeros((N, H), dtype=dt)
    c = np.zeros((N, H), dtype=dt)
    steps: list[dict[str, Array]] = []
    for t in range(M):
        xt = X[:, M - 1 - t, :]  # characters are fed in reverse order
        i = _sigmoid(xt @ params["Wi"] + h @ params["Ui"] + params["bi"])
        f = _sigmoid(xt @ params["Wf"] + h @ params["Uf"] + params["bf"])
        o = _sigmoid(xt @ params["Wo"] + h @ params["Uo"] + params["bo"])
        g = np.tanh(xt @ params["Wc"] + h @ params["Uc"] + params["bc"])
        c_new = f * c + i * g
        tc = np.tanh(c_new)
        h_new = o * tc
        steps.append({"x": xt, "h_prev": h, "c_prev": c, "i": i, "f": f, "o": o, "g": g, "tc": tc})
        h, c = h_new, c_new
    return steps, h, h @ params["W2"] + params["b2"]


def lstm_predict(params: Mapping[str, Array], x_idx: IntArray) -> Array:
    """Class probabilities P (N, C) of the LSTM."""
    _, _, a = _lstm_forward(params, x_idx)
    return np.exp(_log_softmax(_relu(a)))


def lstm_loss_and_grads(
    params: Mapping[str, Array], x_idx: IntArray, y: npt.ArrayLike
) -> tuple[float, Params]:
    """Mean cross-entropy loss of the LSTM and its gradients (explicit BPTT)."""
    dt = _dtype_of(params)
    steps, hM, a = _lstm_forward(params, x_idx)
    O = _relu(a)
    y_arr = _check_y(y, O.shape[0], O.shape[1], dt)
    loss, dO = _xent_head(O, y_arr)

    da = dO * (a > 0)
    grads: Params = {k: np.zeros_like(params[k]) for k in LSTM_PARAMS}
    grads["W2"] = hM.T @ da
    grads["b2"] = da.sum(axis=0)
    dh = da @ params["W2"].T
    dc = np.zeros_like(dh)
    for s in reversed(steps):
        i, f, o, g, tc = s["i"], s["f"], s["o"], s["g"], s["tc"]
        # h = o * tanh(c);  c = f * c_prev + i * g
        dc = dc + dh * o * (1 - tc * tc)
        pre = {
            "i": (dc * g) * i * (1 - i),
            "f": (dc * s["c_prev"]) * f * (1 - f),
            "o": (dh * tc) * o * (1 - o),
            "c": (dc * i) * (1 - g * g),
        }
        dh = np.zeros_like(dh)
        for k in _GATES:
            dz = pre[k]
            grads["W" + k] += s["x"].T @ dz
            grads["U" + k] += s["h_prev"].T @ dz
            grads["b" + k] += dz.sum(axis=0)
            dh += dz @ params["U" + k].T
        dc = dc * f
    return loss, grads


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
LossFn = Callable[[Mapping[str, Array], IntArray, npt.ArrayLike], tuple[float, Params]]
_LOSS_FNS: dict[str, LossFn] = {"mlp": mlp_loss_and_grads, "lstm": lstm_loss_and_grads}


def sgd_step(params: MutableMapping[str, Array], grads: Mapping[str, Array], lr: float) -> None:
    """Plain SGD, in place: p -= lr * g (lr cast to each parameter's dtype)."""
    for k, p in params.items():
        p -= p.dtype.type(lr) * grads[k]


def train_epoch(
    kind: str,
    params: MutableMapping[str, Array],
    x_codes: IntArray,
    y_onehot: npt.ArrayLike,
    batch_size: int,
    lr: float,
    rng: np.random.Generator,
) -> float:
    """One epoch of minibatch SGD (order ``rng.permutation(n)``, short last batch kept).

    ``kind`` is ``"mlp"`` or ``"lstm"``.  Returns the mean of the batch losses.
    """
    try:
        loss_fn = _LOSS_FNS[kind]
    except KeyError:
        raise ValueError(f"kind must be 'mlp' or 'lstm', got {kind!r}") from None
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    x_codes = np.asarray(x_codes)
    y_arr = np.asarray(y_onehot, dtype=_dtype_of(params))
    n = x_codes.shape[0]
    if n == 0:
        raise ValueError("empty training set")
    perm = rng.permutation(n)
    losses: list[float] = []
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        loss, grads = loss_fn(params, x_codes[idx], y_arr[idx])
        sgd_step(params, grads, lr)
        losses.append(loss)
    return float(np.mean(losses))
