"""A declared op measured against mpmath: as written, as its numpy kernel runs, as its C kernel runs.

Why: the guarantee of the declaration pipeline (:mod:`symdiff.forms`) is checked here on
points other than the ones the choice was made on; ``symdiff ops --accuracy`` and the
tests show it. The compiled kernel measured is the one the engine builds for the op
alone in a fused group (:mod:`symdiff.fusion`), so the chain rule over the ops' own
derivatives is measured too. Apart from :mod:`symdiff.accuracy` (which knows nothing of
ops) because it reaches into the declaration, fusion and compiled code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import sympy as sp

from . import native
import time

from . import accuracy
from .accuracy import Error, error, sample, truth
from .declare import DELTA, OUT, lambdify_numpy
from .fusion import GroupSpec, fused_kernel

#: time budget per truth for an op with special functions (points not reached are not measured)
SPECIAL_SECONDS = 5.0


# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One expression of an op (its forward, or one derivative), measured three ways."""

    what: str                 # "forward" or "d/dx"
    chosen: str               # the candidate the declaration chose (symdiff.forms labels)
    run: str                  # the expression as run (user's symbol names)
    as_written: Error         # the expression as declared (its SymPy derivative), lambdified naively
    numpy: Error              # the op's numpy kernel
    compiled: Error | None    # the compiled C kernel of the op alone in a fused group (None: no compiler)


@dataclass(frozen=True)
class OpAccuracy:
    name: str
    rows: tuple[Row, ...]
    compiled_status: str      # why ``compiled`` is None, or "on"


def _tile(points: Sequence[np.ndarray], size: int) -> tuple[tuple[np.ndarray, ...], int]:
    """The points repeated up to ``size`` elements (compiled kernels run only on big enough arrays)."""
    n = points[0].size
    reps = max(1, -(-size // n))
    return tuple(np.tile(p, reps) for p in points), n


def _compiled(op: Any, points: Sequence[np.ndarray]) -> tuple[list[np.ndarray] | None, str]:
    """Forward and derivatives from the C kernels the engine would compile for ``op`` alone."""

    if not native.enabled():
        return None, f"native kernels {native.status()}"
    spec = GroupSpec(steps=((op.name, tuple(("in", k) for k in range(op.arity))),), n_inputs=op.arity,
                     outputs=(0,), saved=())
    kernel = fused_kernel(spec)
    xs, n = _tile(points, native.MIN_ELEMENTS)
    fns = kernel.native_forward.ready(xs)
    if fns is None:
        return None, kernel.native_forward.error or "not compiled"
    with np.errstate(all="ignore"):
        fwd = native.dispatcher().forward(fns, xs, kernel.forward_deps)
        if fwd is None:
            return None, "the dispatcher refused the arrays"
        out = fwd[0]
        needed = tuple(j not in op.nondifferentiable for j in range(op.arity))
        grads = kernel.native_backward(needed)([np.ones_like(out)], [out], list(xs))
    if grads is None:
        return None, kernel.native_backward_plan(needed).native.error or "backward not compiled"
    return [np.asarray(a).ravel()[:n] for a in (out, *grads)], "on"


def measure_op(op: Any, n: int = 400, seed: int = 1, compiled: bool = True,
               keep: Callable[[tuple[np.ndarray, ...]], np.ndarray] | None = None) -> OpAccuracy:
    """Forward and every derivative of a declared op: as written, numpy kernel, compiled kernel.

    ``seed`` differs from the declaration's sample (seed 0), so the choice is checked on
    points it was not made on. ``keep(points) -> mask`` restricts the points (a known limit).
    """
    sym = op.symbolic
    if sym is None:
        raise ValueError(f"op {op.name!r} is hand-written (structural): only declared ops can be measured")
    args, declared = sym.args, sym.declared
    wrt = [j for j in range(len(args)) if j not in op.nondifferentiable]  # a Bessel order has no derivative
    truths = [declared, *(sp.diff(declared, args[j]) for j in wrt)]
    special = accuracy.has_special(truths)
    if special:  # a bounded domain, fewer points and a time budget per truth (mpmath's Bessel near 1e308: minutes)
        pts = sample(truths, args, n=min(n, accuracy.SPECIAL_POINTS), seed=seed, max_log2=accuracy.SPECIAL_MAX_LOG2)
    else:
        pts = sample(truths, args, n=n, seed=seed)
    if keep is not None:
        mask = np.asarray(keep(pts), dtype=bool)
        pts = tuple(p[mask] for p in pts)

    def exact_of(t: sp.Expr) -> np.ndarray:
        return truth(t, args, pts, deadline=time.monotonic() + SPECIAL_SECONDS if special else None)
    exact = [exact_of(t) for t in truths]
    conds = []
    for i, t in enumerate(truths):  # κ = Σ_k |x_k ∂t/∂x_k| / |t|, from the truths of the next derivatives
        grads = exact[1:] if i == 0 else [exact_of(sp.diff(t, args[j])) for j in wrt]
        with np.errstate(all="ignore"):
            conds.append(sum(np.abs(pts[j] * g) for j, g in zip(wrt, grads)) / np.abs(exact[i]))
    shape = np.shape(pts[0])
    with np.errstate(all="ignore"):
        naive = [np.broadcast_to(np.asarray(lambdify_numpy(args, t)[0](*pts), dtype=np.float64), shape)
                 for t in truths]
        out = np.broadcast_to(np.asarray(op.forward(*pts), dtype=np.float64), shape)
        run = [out, *(np.broadcast_to(np.asarray(op.backward[j](np.ones(shape), out, *pts), dtype=np.float64),
                                      shape) for j in wrt)]
    c_vals, status = _compiled(op, pts) if compiled else (None, "not measured")
    labels = getattr(sym, "forms", ()) or ("",) * (len(args) + 1)
    labels = [labels[0], *(labels[1 + j] for j in wrt)]
    plain = {a: sp.Symbol(a.name) for a in args}
    shown = [sym.forward, *(sym.backward[j] / DELTA for j in wrt)]
    rows = []
    for i, t in enumerate(truths):
        rows.append(Row(
            what="forward" if i == 0 else f"d/d{args[wrt[i - 1]].name}", chosen=labels[i],
            run=str(sp.sympify(shown[i]).xreplace(plain)).replace(str(OUT), "out"),
            as_written=error(naive[i], exact[i], pts, conds[i]), numpy=error(run[i], exact[i], pts, conds[i]),
            compiled=error(c_vals[i], exact[i], pts, conds[i]) if c_vals is not None else None))
    return OpAccuracy(op.name, tuple(rows), status)
