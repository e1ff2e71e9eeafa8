"""Optimisers and learning-rate schedules for symdiff's training loop.

Why this lives in ``symdiff/`` and not beside the trainer in ``models/``: it is public
API for anyone who writes their own loop over ``Program.forward``/``backward``
(``symdiff.optim.Adam(params)``), it knows nothing of models, data or the CLI
(numpy arrays in, numpy arrays updated), and the engine's data flow stays one way:
``models/`` imports it, never the reverse. It is engine-*level* but not engine-*core*:
nothing else in ``symdiff/`` imports it, and importing it does not import SymPy.

Optimisers update numpy parameter arrays *in place*: the model, the optimiser
and any checkpoint code all hold references to the same arrays, so rebinding
a name (``w = w - lr * g``) would silently detach the model from its
optimiser.  Every update is written with in-place ufuncs on the parameter and
on state buffers created with ``np.zeros_like(param)``, so float32 models stay
float32 (numpy keeps the dtype of the output operand of an in-place op).

Conventions follow PyTorch so that hyper-parameters carry over:

* SGD momentum: ``v = mu*v + g``; plain ``w -= lr*v``;
  Nesterov ``w -= lr*(g + mu*v)``.
* Adam: bias-corrected moments, ``eps`` added to ``sqrt(v)/sqrt(1-beta2**t)``.
* ``weight_decay`` on SGD/Adam is L2 (``g + wd*w``); AdamW decouples it
  (``w *= 1 - lr*wd`` before the Adam step).

``Averaged`` wraps any of them and keeps an exponential moving average of the
parameters beside the raw ones (what a training loop evaluates and keeps).

Schedules are plain objects queried once after every epoch; they return the
learning rate for the next epoch and the training loop assigns it to
``optimizer.lr``.
"""

from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .errors import SymdiffError
from . import native as _native
from .onehot import RowSparse

__all__ = [
    "Optimizer",
    "SGD",
    "Adam",
    "AdamW",
    "Averaged",
    "clip_grad_norm",
    "make_optimizer",
    "OPTIMIZERS",
    "USES_MOMENTUM",
    "Schedule",
    "Constant",
    "StepDecay",
    "HalveOnPlateau",
    "Cosine",
    "make_schedule",
    "SCHEDULES",
]

StateDict = dict[str, "np.ndarray | float | int"]


# --------------------------------------------------------------------------
# argument validation helpers
# --------------------------------------------------------------------------

def _as_float(name: str, value: Any) -> float:
    """Convert to float, rejecting bools/strings so typos fail loudly."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise SymdiffError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _positive(name: str, value: Any) -> float:
    v = _as_float(name, value)
    if not (math.isfinite(v) and v > 0.0):
        raise SymdiffError(f"{name} must be finite and > 0, got {value!r}")
    return v


def _non_negative(name: str, value: Any) -> float:
    v = _as_float(name, value)
    if not (math.isfinite(v) and v >= 0.0):
        raise SymdiffError(f"{name} must be finite and >= 0, got {value!r}")
    return v


def _unit_interval(name: str, value: Any) -> float:
    """Value in [0, 1): decay factors of 1 never forget, > 1 diverge."""
    v = _as_float(name, value)
    if not (0.0 <= v < 1.0):
        raise SymdiffError(f"{name} must be in [0, 1), got {value!r}")
    return v


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise SymdiffError(f"{name} must be an integer >= 1, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise SymdiffError(f"{name} must be an integer >= 1, got {value!r}") from None
    if v < 1:
        raise SymdiffError(f"{name} must be an integer >= 1, got {value!r}")
    return v


# --------------------------------------------------------------------------
# optimisers
# --------------------------------------------------------------------------

class Optimizer:
    """Base class: owns a name -> array mapping and updates it in place.

    ``params`` is kept by reference (not copied) so the optimiser and the
    model always see the same arrays.  Subclasses implement ``_update`` for a
    single parameter and declare their per-parameter state buffers in
    ``_slots`` so that ``state_dict`` can be generic.
    """

    _slots: tuple[str, ...] = ()
    _counts_steps: bool = False  # whether a per-parameter step count is kept

    def __init__(self, params: dict[str, np.ndarray], lr: float):
        if not isinstance(params, dict):
            raise SymdiffError(
                f"params must be a dict mapping names to numpy arrays, got {type(params).__name__}"
            )
        if not params:
            raise SymdiffError("params must contain at least one parameter, got an empty dict")
        for name, p in params.items():
            if not isinstance(p, np.ndarray):
                raise SymdiffError(
                    f"params[{name!r}] must be a numpy ndarray (updated in place), "
                    f"got {type(p).__name__}"
                )
            if not np.issubdtype(p.dtype, np.floating):
                raise SymdiffError(
                    f"params[{name!r}] must have a floating dtype, got {p.dtype}"
                )
            if not p.flags.writeable:
                raise SymdiffError(f"params[{name!r}] must be writeable (updated in place)")
        self.params = params
        self._lr = _positive("lr", lr)
        # Buffers are created eagerly so state_dict() is complete from step 0.
        self._state: dict[str, dict[str, np.ndarray]] = {
            slot: {name: np.zeros_like(p) for name, p in params.items()}
            for slot in self._slots
        }
        self._steps: dict[str, int] = (
            {name: 0 for name in params} if self._counts_steps else {}
        )

    # ``lr`` is a property so schedules cannot set a NaN/negative rate.  Zero
    # is allowed here (unlike in the constructor) because annealing schedules
    # legitimately end at min_lr=0.
    @property
    def lr(self) -> float:
        """Current learning rate; schedules assign it between epochs."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _non_negative("lr", value)

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """Apply one update for every gradient whose name is a parameter.

        Names that are not parameters (e.g. gradients w.r.t. inputs) are
        ignored so the caller can pass the autodiff engine's output as is.
        Gradients are never modified.
        """
        for name, g in grads.items():
            p = self.params.get(name)
            if p is None:
                continue
            if isinstance(g, RowSparse) and g.shape == p.shape:
                if self._rows_only():
                    self._update_rows(p, g)
                    continue
                g = self._densify(name, g)
            g = np.asarray(g)
            if g.shape != p.shape:
                raise SymdiffError(
                    f"gradient for {name!r} has shape {g.shape}, "
                    f"expected the parameter's shape {p.shape}"
                )
            if name not in self._steps and self._counts_steps:
                self._steps[name] = 0
            for slot in self._slots:  # parameters added after construction
                if name not in self._state[slot]:
                    self._state[slot][name] = np.zeros_like(p)
            self._update(name, p, g)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        raise NotImplementedError

    def _rows_only(self) -> bool:
        """Whether a row-sparse gradient can update just its rows (no state, no decay)."""
        return False

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: Any, kind: str = "tmp") -> np.ndarray:
        """A per-parameter work array, reused across steps.

        Large temporaries allocated afresh every step are mapped and unmapped by
        the allocator each time (page faults dominated Adam on a 5000x128 weight).
        """
        buffers = self.__dict__.setdefault("_buffers", {})
        buf = buffers.get((kind, name))
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = buffers[(kind, name)] = np.empty(shape, dtype)
        return buf

    def _densify(self, name: str, g: RowSparse) -> np.ndarray:
        """The dense matrix of a row-sparse gradient, in a reused buffer."""
        dense = self._scratch(name, g.shape, g.dtype, "dense")
        dense.fill(0)
        dense[g.rows] = g.values
        return dense

    def _update_rows(self, p: np.ndarray, g: RowSparse) -> None:
        raise NotImplementedError

    def state_dict(self) -> StateDict:
        """Flat snapshot (copies) that ``np.savez`` can store without pickle.

        Keys: ``"lr"``, ``"<slot>/<param name>"`` for buffers and
        ``"step/<param name>"`` for step counts.  Hyper-parameters are not
        included; they come from the constructor of the restoring optimiser.
        """
        out: StateDict = {"lr": float(self._lr)}
        for slot in self._slots:
            for name, buf in self._state[slot].items():
                out[f"{slot}/{name}"] = buf.copy()
        for name, t in self._steps.items():
            out[f"step/{name}"] = int(t)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()`` output (or an ``np.load`` of it).

        Strict about keys so that loading another optimiser's state (e.g.
        Adam moments into momentum SGD) fails instead of silently resetting.
        Buffers are copied into the existing arrays, keeping their dtype.
        """
        expected = set(self.state_dict())
        got = set(state.keys())
        if got != expected:
            missing = sorted(expected - got)
            unexpected = sorted(got - expected)
            raise SymdiffError(
                f"state does not match {type(self).__name__}: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        new_bufs: list[tuple[np.ndarray, np.ndarray]] = []
        for slot in self._slots:
            for name, buf in self._state[slot].items():
                value = np.asarray(state[f"{slot}/{name}"])
                if value.shape != buf.shape:
                    raise SymdiffError(
                        f"state[{slot + '/' + name!r}] has shape {value.shape}, "
                        f"expected {buf.shape}"
                    )
                new_bufs.append((buf, value))
        steps = {}
        for name in self._steps:
            t = int(np.asarray(state[f"step/{name}"]))
            if t < 0:
                raise SymdiffError(f"state['step/{name}'] must be >= 0, got {t}")
            steps[name] = t
        lr = _non_negative("lr", float(np.asarray(state["lr"])))
        # Everything validated: now mutate, so a bad state leaves us untouched.
        for buf, value in new_bufs:
            np.copyto(buf, value, casting="same_kind")
        self._steps.update(steps)
        self._lr = lr


class SGD(Optimizer):
    """Stochastic gradient descent, optionally with (Nesterov) momentum.

    With ``momentum == 0`` and ``weight_decay == 0`` the update is exactly
    ``p -= lr * g``, bit-identical to the original hand-written loop, so
    switching the training code to this class changes no results.
    """

    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        self.momentum = _unit_interval("momentum", momentum)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise SymdiffError(
                f"nesterov=True requires momentum in (0, 1), got momentum={momentum!r}"
            )
        self.weight_decay = _non_negative("weight_decay", weight_decay)
        # Only allocate a velocity buffer when it is used.
        self._slots = ("momentum",) if self.momentum > 0.0 else ()
        super().__init__(params, lr)

    def _rows_only(self) -> bool:
        return not self.momentum and not self.weight_decay

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """One update; on compiled code in one call for all parameters where it can
        (:func:`symdiff.native.dispatcher`'s ``sgd_step``, the same bits), else one at a time."""
        native = _native.active()
        if native is None or not self._step_compiled(native, grads):
            super().step(grads)

    def _step_compiled(self, native: Any, grads: Mapping[str, np.ndarray]) -> bool:
        """:meth:`_update` (or :meth:`_update_rows`) of every parameter with a gradient, in one compiled
        call; False (nothing changed) for anything it does not take: the per-parameter path then
        decides, or raises."""
        params, rows_only = self.params, self._rows_only()
        velocities = self._state["momentum"] if self.momentum else None
        ps: list[np.ndarray] = []
        gs: list[Any] = []
        vs: list[np.ndarray] = []
        for name, g in grads.items():
            p = params.get(name)
            if p is None:
                continue
            if type(g) is RowSparse:
                if g.shape != p.shape:
                    return False
                g = (g.rows, g.values) if rows_only else self._densify(name, g)
            elif type(g) is not np.ndarray:
                return False
            ps.append(p)
            gs.append(g)
            if velocities is not None:
                v = velocities.get(name)
                if v is None:  # a parameter added after construction: the per-parameter path makes its buffer
                    return False
                vs.append(v)
        return native.sgd_step(ps, gs, self._lr, self.momentum, self.nesterov, self.weight_decay,
                               vs if velocities is not None else None) is not None

    def _update_rows(self, p: np.ndarray, g: RowSparse) -> None:
        # the rows a one-hot batch touched; identical to p -= lr * dense(g) (untouched rows get -lr*0)
        native = _native.active()
        if native is not None and native.rows_sub_scaled(p, g.rows, g.values, self._lr):
            return  # compiled: the same arithmetic without the gathered and scattered copies
        p[g.rows] -= self._lr * g.values

    def _update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        lr = self._lr
        if self.weight_decay:
            g = g + self.weight_decay * p  # new array: never touch caller's grads
        if not self.momentum:
            p -= lr * g
            return
        v = self._state["momentum"][name]
        v *= self.momentum
        v += g
        if self.nesterov:
            p -= lr * (g + self.momentum * v)
        else:
            p -= lr * v


class Adam(Optimizer):
    """Adam with bias correction (Kingma & Ba), PyTorch formulation.

    ``weight_decay`` here is classic L2 (added to the gradient, hence also
    rescaled by the adaptive denominator); use ``AdamW`` for decoupled decay.
    Step counts are per parameter, so a parameter that receives no gradient in
    some step still gets the right bias correction.
    """

    _slots = ("exp_avg", "exp_avg_sq")
    _counts_steps = True
    _decoupled = False

    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise SymdiffError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        self.betas = (_unit_interval("betas[0]", b1), _unit_interval("betas[1]", b2))
        self.eps = _positive("eps", eps)
        self.weight_decay = _non_negative("weight_decay", weight_decay)
        super().__init__(params, lr)
        self._flatten()

    def _update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        lr = self._lr
        if self.weight_decay:
            if self._decoupled:
                p *= 1.0 - lr * self.weight_decay
            else:
                g = g + self.weight_decay * p
        t = self._steps[name] + 1
        self._steps[name] = t
        m = self._state["exp_avg"][name]
        v = self._state["exp_avg_sq"][name]
        tmp = self._scratch(name, g.shape, np.result_type(g, m))
        denom = self._scratch(name, v.shape, v.dtype, "denom")
        p -= self._moments(m, v, g, tmp, denom, t)

    def _moments(self, m: np.ndarray, v: np.ndarray, g: np.ndarray, tmp: np.ndarray, denom: np.ndarray,
                 t: int) -> np.ndarray:
        """Move the moments ``m``, ``v`` by the gradient ``g``; the step to subtract, in ``denom``.

        The one place of Adam's arithmetic, for one parameter or for all of them in one flat
        buffer (:meth:`step`): elementwise, so both give the same bits.
        """
        b1, b2 = self.betas
        m *= b1
        np.multiply(1.0 - b1, g, out=tmp)
        m += tmp
        v *= b2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v += tmp
        bias1 = 1.0 - b1**t
        bias2 = 1.0 - b2**t
        np.sqrt(v, out=denom)
        denom /= math.sqrt(bias2)
        denom += self.eps
        np.divide(m, denom, out=denom)
        denom *= self._lr / bias1
        return denom

    def _flatten(self) -> None:
        """Put every parameter's moments into one flat buffer each (views per parameter).

        Why: on a model of many small parameters (an LSTM's 14) Adam's dozen numpy calls a
        parameter cost more than their arithmetic; on the flat buffers :meth:`step` makes them
        once for all, plus a copy in and a subtraction out a parameter. Only when every
        parameter has one floating dtype; the state dict's keys and values stay the same.
        """
        self._flat: tuple[Any, ...] | None = None
        ps = list(self.params.items())
        dtype = ps[0][1].dtype
        if any(p.dtype != dtype for _, p in ps):
            return
        sizes = [p.size for _, p in ps]
        offsets = np.concatenate(([0], np.cumsum(sizes))).tolist()
        total = offsets[-1]
        buffers = [np.zeros(total, dtype) for _ in range(4)]  # exp_avg, exp_avg_sq, gradient, scratch
        views = [[b[offsets[i]:offsets[i + 1]].reshape(p.shape) for i, (_, p) in enumerate(ps)] for b in buffers]
        for slot, flat_views in zip(self._slots, views):
            for (name, _), view in zip(ps, flat_views):
                np.copyto(view, self._state[slot][name])
                self._state[slot][name] = view
        denom = np.empty(total, dtype)
        denoms = [denom[offsets[i]:offsets[i + 1]].reshape(p.shape) for i, (_, p) in enumerate(ps)]
        self._flat = (ps, buffers, views[2], views[3], denom, denoms)

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """One update; when every parameter has a gradient of its own dtype and all have taken as many
        steps, on the flat buffers (:meth:`_flatten`), else one parameter at a time: the same bits."""
        flat = getattr(self, "_flat", None)
        if flat is None or len(self.params) != len(flat[0]):
            return super().step(grads)
        ps, (m, v, g_flat, tmp), g_views, tmp_views, denom, denoms = flat
        t = None
        for name, p in ps:
            g = grads.get(name)
            sparse = type(g) is RowSparse
            if (self.params.get(name) is not p or g is None or g.shape != p.shape or g.dtype != p.dtype
                    or not (sparse or type(g) is np.ndarray)):
                return super().step(grads)
            if t is None:
                t = self._steps[name]
            elif self._steps[name] != t:
                return super().step(grads)
        lr, wd = self._lr, self.weight_decay
        if self._step_compiled(ps, grads, m, v, g_flat, denom, t + 1):
            return
        for (name, p), gv, tv in zip(ps, g_views, tmp_views):
            g = grads[name]
            if type(g) is RowSparse:
                gv.fill(0)
                gv[g.rows] = g.values
            else:
                np.copyto(gv, g)
            if wd and self._decoupled:
                p *= 1.0 - lr * wd
            elif wd:
                np.multiply(p, wd, out=tv)
                gv += tv  # g + wd * p, as one parameter's step computes it
            self._steps[name] = t + 1
        self._moments(m, v, g_flat, tmp, denom, t + 1)
        for (_, p), d in zip(ps, denoms):
            p -= d

    def _step_compiled(self, ps: list[tuple[str, np.ndarray]], grads: Mapping[str, Any], m: np.ndarray,
                       v: np.ndarray, g_flat: np.ndarray, denom: np.ndarray, t: int) -> bool:
        """:meth:`step`'s flat update (copy in, decay, :meth:`_moments`, subtract) in one compiled call
        (:func:`symdiff.native.dispatcher`'s ``adam_step``: numpy's operations in numpy's order, the
        same bits); False, nothing changed, where there is no compiler or it does not take the arrays."""
        native = _native.active()
        if native is None:
            return False
        gs: list[Any] = []
        for name, _ in ps:
            g = grads[name]
            gs.append((g.rows, g.values) if type(g) is RowSparse else g)
        b1, b2 = self.betas
        lr, wd = self._lr, self.weight_decay
        scalars = (b1, 1.0 - b1, b2, 1.0 - b2, math.sqrt(1.0 - b2**t), self.eps, lr / (1.0 - b1**t),
                   wd, 1.0 - lr * wd)
        decay = 0 if not wd else 2 if self._decoupled else 1
        if native.adam_step([p for _, p in ps], gs, (m, v, g_flat, denom), scalars, decay) is None:
            return False
        for name, _ in ps:
            self._steps[name] = t
        return True


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter).

    Decay is applied directly to the weights (``w *= 1 - lr*wd``, i.e.
    ``w -= lr*wd*w``) before the Adam step, so its strength does not depend on
    the gradient scale the way L2-in-Adam does.
    """

    _decoupled = True

    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay)


class Averaged:
    """An optimiser that also keeps an exponential moving average of the parameters.

    Why: with minibatch noise the weights keep jumping around the minimum they have found; their
    running average sits nearer its centre and usually evaluates better (a lower validation loss
    and a smoother curve) than the last step's weights. The raw weights go on training unchanged;
    ``swapped()`` puts the average into the parameter arrays for evaluating or saving, then puts the
    raw weights back.

    After step ``t`` every average moves ``a += (1 - b) * (p - a)`` with
    ``b = min(decay, (1 + t) / (10 + t))``: the early steps, whose weights are still far from any
    minimum, are forgotten quickly (the warm-up of TensorFlow's ExponentialMovingAverage).
    ``decay`` 0.998 averages over roughly the last 500 steps. Steps, ``lr`` and the state dict
    pass through to the wrapped optimiser; the state dict adds ``average/<name>`` and ``average_steps``.
    """

    def __init__(self, optimizer: Optimizer, decay: float):
        self.decay = _as_float("decay", decay)
        if not 0.0 < self.decay < 1.0:
            raise SymdiffError(f"decay must be in (0, 1), got {decay}")
        self.optimizer = optimizer
        self.params = optimizer.params
        self.average = {name: p.copy() for name, p in self.params.items()}
        self.steps = 0

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.lr = value

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """The wrapped optimiser's step, then every average moves towards its parameter."""
        self.optimizer.step(grads)
        self.steps += 1
        weight = 1.0 - min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        for name, p in self.params.items():
            a = self.average[name]
            a += weight * (p - a)  # in place: float32 averages stay float32

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The averages in the parameter arrays inside the block; the raw weights again after it."""
        raw = {name: p.copy() for name, p in self.params.items()}
        try:
            for name, p in self.params.items():
                np.copyto(p, self.average[name])
            yield
        finally:
            for name, p in self.params.items():
                np.copyto(p, raw[name])

    def state_dict(self) -> StateDict:
        out = self.optimizer.state_dict()
        out.update({f"average/{name}": a.copy() for name, a in self.average.items()})
        out["average_steps"] = int(self.steps)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        inner = {k: v for k, v in state.items() if not k.startswith("average")}
        expected = {f"average/{name}" for name in self.average} | {"average_steps"}
        got = {k for k in state if k.startswith("average")}
        if got != expected:
            raise SymdiffError(f"state does not match Averaged: missing keys {sorted(expected - got)}, "
                               f"unexpected keys {sorted(got - expected)}")
        values = {}
        for name, a in self.average.items():
            value = np.asarray(state[f"average/{name}"])
            if value.shape != a.shape:
                raise SymdiffError(f"state['average/{name}'] has shape {value.shape}, expected {a.shape}")
            values[name] = value
        steps = int(np.asarray(state["average_steps"]))
        if steps < 0:
            raise SymdiffError(f"state['average_steps'] must be >= 0, got {steps}")
        self.optimizer.load_state_dict(inner)  # checks its own keys first: a bad state changes nothing here
        for name, value in values.items():
            np.copyto(self.average[name], value, casting="same_kind")
        self.steps = steps


def clip_grad_norm(grads: Mapping[str, np.ndarray], max_norm: float) -> float:
    """Rescale all gradients in place so their global L2 norm <= max_norm.

    One global norm (rather than per-array) preserves the update direction.
    Returns the norm *before* clipping so the caller can log it; if it is not
    finite the arrays are left untouched and the caller should treat the step
    as diverged.  The norm is accumulated in float64 to avoid float32 overflow.
    """
    max_norm = _positive("max_norm", max_norm)
    arrays = []
    for name, g in grads.items():
        if isinstance(g, RowSparse):
            g = g.values  # the zero rows add nothing to the norm and need no scaling
        if not isinstance(g, np.ndarray):
            raise SymdiffError(
                f"grads[{name!r}] must be a numpy ndarray (clipped in place), "
                f"got {type(g).__name__}"
            )
        arrays.append(g)
    total = 0.0
    for g in arrays:
        total += float(np.sum(np.square(g, dtype=np.float64)))
    norm = math.sqrt(total)
    if not math.isfinite(norm):
        return norm
    if norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in arrays:
            g *= scale
    return norm


_OPTIMIZER_FACTORIES: dict[str, Callable[..., Optimizer]] = {
    "sgd": lambda params, lr, momentum, wd: SGD(params, lr, weight_decay=wd),
    "momentum": lambda params, lr, momentum, wd: SGD(
        params, lr, momentum=momentum, weight_decay=wd
    ),
    "nesterov": lambda params, lr, momentum, wd: SGD(
        params, lr, momentum=momentum, nesterov=True, weight_decay=wd
    ),
    "adam": lambda params, lr, momentum, wd: Adam(params, lr, weight_decay=wd),
    "adamw": lambda params, lr, momentum, wd: AdamW(params, lr, weight_decay=wd),
}

OPTIMIZERS: tuple[str, ...] = tuple(_OPTIMIZER_FACTORIES)
#: the optimisers that use ``momentum`` (the others ignore it)
USES_MOMENTUM: tuple[str, ...] = ("momentum", "nesterov")


def make_optimizer(
    name: str,
    params: dict[str, np.ndarray],
    lr: float,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> Optimizer:
    """Build an optimiser from a CLI-style name (case-insensitive).

    ``momentum`` is used only by "momentum" and "nesterov"; "sgd" is the plain
    seed update.  ``weight_decay`` is L2 for sgd/momentum/nesterov/adam and
    decoupled for adamw.
    """
    key = name.lower() if isinstance(name, str) else name
    factory = _OPTIMIZER_FACTORIES.get(key)
    if factory is None:
        raise SymdiffError(
            f"unknown optimizer {name!r}; valid names are: {', '.join(OPTIMIZERS)}"
        )
    return factory(params, lr, momentum, weight_decay)


# --------------------------------------------------------------------------
# learning-rate schedules
# --------------------------------------------------------------------------

class Schedule:
    """Base schedule: ``after_epoch`` is called once after every epoch.

    It returns the learning rate for the *next* epoch (epochs count from 1),
    so epoch 1 always runs at ``base_lr``.  The current value is also kept in
    ``self.lr``.
    """

    def __init__(self, base_lr: float):
        self.base_lr = _positive("base_lr", base_lr)
        self.lr = self.base_lr

    def after_epoch(self, epoch: int, valid_loss: float) -> float:
        """Record the finished epoch and return the next epoch's lr."""
        if isinstance(epoch, (bool, np.bool_)):
            raise SymdiffError(f"epoch must be an integer >= 1, got {epoch!r}")
        try:
            e = operator.index(epoch)
        except TypeError:
            raise SymdiffError(f"epoch must be an integer >= 1, got {epoch!r}") from None
        if e < 1:
            raise SymdiffError(f"epoch must be an integer >= 1 (epochs count from 1), got {epoch!r}")
        self.lr = float(self._next_lr(e, float(valid_loss)))
        return self.lr

    def _next_lr(self, epoch: int, valid_loss: float) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, float | int]:
        """Flat, numpy-savable state for resuming (only ``lr`` here)."""
        return {"lr": float(self.lr)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()`` output (or an ``np.load`` of it)."""
        self.lr = _non_negative("lr", float(np.asarray(state["lr"])))


class Constant(Schedule):
    """Keep ``base_lr`` for every epoch (the seed behaviour)."""

    def _next_lr(self, epoch: int, valid_loss: float) -> float:
        return self.base_lr


class StepDecay(Schedule):
    """Multiply the lr by ``gamma`` every ``step_size`` epochs.

    ``lr = base * gamma ** (epoch // step_size)``: with step_size=5 epochs
    1-5 run at base, 6-10 at base*gamma, and so on.
    """

    def __init__(self, base_lr: float, step_size: int = 5, gamma: float = 0.5):
        super().__init__(base_lr)
        self.step_size = _positive_int("step_size", step_size)
        g = _as_float("gamma", gamma)
        if not (0.0 < g <= 1.0):
            raise SymdiffError(f"gamma must be in (0, 1], got {gamma!r}")
        self.gamma = g

    def _next_lr(self, epoch: int, valid_loss: float) -> float:
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class HalveOnPlateau(Schedule):
    """Cut the lr by ``factor`` when the validation loss stalls.

    A loss counts as an improvement only if strictly less than the best so
    far (NaN never improves).  After ``patience`` consecutive non-improving
    epochs the lr is multiplied by ``factor`` (floored at ``min_lr``) and the
    counter restarts, so a long plateau cuts once every ``patience`` epochs.
    """

    def __init__(
        self,
        base_lr: float,
        patience: int = 1,
        factor: float = 0.5,
        min_lr: float = 0.0,
    ):
        super().__init__(base_lr)
        self.patience = _positive_int("patience", patience)
        f = _as_float("factor", factor)
        if not (0.0 < f < 1.0):
            raise SymdiffError(f"factor must be in (0, 1), got {factor!r}")
        self.factor = f
        m = _non_negative("min_lr", min_lr)
        if m > self.base_lr:
            raise SymdiffError(f"min_lr must be in [0, base_lr={self.base_lr}], got {min_lr!r}")
        self.min_lr = m
        self.best = math.inf
        self.num_bad_epochs = 0

    def _next_lr(self, epoch: int, valid_loss: float) -> float:
        if valid_loss < self.best:
            self.best = valid_loss
            self.num_bad_epochs = 0
            return self.lr
        self.num_bad_epochs += 1
        if self.num_bad_epochs >= self.patience:
            self.num_bad_epochs = 0
            return max(self.lr * self.factor, self.min_lr)
        return self.lr

    def state_dict(self) -> dict[str, float | int]:
        """Includes best loss and the bad-epoch counter, needed to resume."""
        return {"lr": float(self.lr), "best": float(self.best),
                "num_bad_epochs": int(self.num_bad_epochs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.best = float(np.asarray(state["best"]))
        self.num_bad_epochs = int(np.asarray(state["num_bad_epochs"]))


class Cosine(Schedule):
    """Cosine annealing from ``base_lr`` to ``min_lr`` over ``total_epochs``.

    ``lr = min + (base - min) * (1 + cos(pi * epoch / total)) / 2``, held at
    ``min_lr`` once ``epoch >= total_epochs`` so extra epochs do not warm up
    again.
    """

    def __init__(self, base_lr: float, total_epochs: int, min_lr: float = 0.0):
        super().__init__(base_lr)
        self.total_epochs = _positive_int("total_epochs", total_epochs)
        m = _non_negative("min_lr", min_lr)
        if m > self.base_lr:
            raise SymdiffError(f"min_lr must be in [0, base_lr={self.base_lr}], got {min_lr!r}")
        self.min_lr = m

    def _next_lr(self, epoch: int, valid_loss: float) -> float:
        if epoch >= self.total_epochs:
            return self.min_lr
        frac = epoch / self.total_epochs
        return self.min_lr + (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * frac)) / 2.0


_SCHEDULE_FACTORIES: dict[str, Callable[..., Schedule]] = {
    "constant": lambda base_lr, total_epochs, **kw: Constant(base_lr, **kw),
    "step": lambda base_lr, total_epochs, **kw: StepDecay(base_lr, **kw),
    "plateau": lambda base_lr, total_epochs, **kw: HalveOnPlateau(base_lr, **kw),
    "cosine": lambda base_lr, total_epochs, **kw: Cosine(base_lr, total_epochs, **kw),
}

SCHEDULES: tuple[str, ...] = tuple(_SCHEDULE_FACTORIES)


def make_schedule(name: str, base_lr: float, total_epochs: int, **kw: Any) -> Schedule:
    """Build a schedule from a CLI-style name (case-insensitive).

    ``total_epochs`` is only used by "cosine" but is always validated, since
    the training loop always knows it.  Extra keyword arguments go to the
    schedule's constructor (e.g. ``step_size``, ``patience``, ``min_lr``).
    """
    key = name.lower() if isinstance(name, str) else name
    factory = _SCHEDULE_FACTORIES.get(key)
    if factory is None:
        raise SymdiffError(
            f"unknown schedule {name!r}; valid names are: {', '.join(SCHEDULES)}"
        )
    total_epochs = _positive_int("total_epochs", total_epochs)
    return factory(base_lr, total_epochs, **kw)
