"""Stable functions and the rewrites that introduce them.

Unstable patterns such as ``log(1+exp(u))`` or ``1/(1+exp(-u))`` become SymPy
functions (:class:`Softplus`, :class:`Sigmoid`, :class:`Step`, :class:`Relu`) that
carry their own stable numpy code and their own derivative; :func:`stabilise`
applies :data:`REWRITES` bottom-up to a forward expression or a derivative.
After differentiating, :func:`refine` also rewrites the sums that cancel in
floating point (``1 - σ(u)``, ``σ(u) - σ(-u)``, ``1 - tanh(u)²``; see
:data:`DERIVATIVE_REWRITES`), so derivatives of every order keep their digits.
Kept apart from ``defop`` because fusion (:mod:`symdiff.fusion`) and the C printer
(:mod:`symdiff.cprint`) use the same functions.

Only the SymPy side of the engine imports SymPy: :mod:`symdiff.stable`,
:mod:`symdiff.declare`, :mod:`symdiff.cprint`, :mod:`symdiff.fusion`, :mod:`symdiff.derivative_ops`
(derivatives of every order as ops) and :mod:`symdiff.ops` (which declares the built-in ops with it). Everything else (graph, registry, compiler,
passes, native) runs on numpy alone.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import sympy as sp


class _StableFunction(sp.Function):
    """A SymPy function with a fixed numpy template (``{0}`` is the argument)."""

    numpy_template = ""

    def _numpycode(self, printer: Any) -> str:
        return self.numpy_template.format(*(printer._print(a) for a in self.args))

    _pythoncode = _numpycode  # lambdify's numpy printer looks for this name


class Softplus(_StableFunction):
    """log(1 + exp(u)), printed as numpy.logaddexp(0, u): finite for any u."""

    nargs = 1
    numpy_template = "numpy.logaddexp(0, {0})"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return Sigmoid(self.args[0])


_EXP_OVERFLOWS_BELOW: dict[np.dtype, float] = {}


def _sigmoid(u: Any) -> Any:
    """sigmoid(u) = 1/(1 + exp(-u)), with accurate tails and no overflow warning.

    Where ``exp(-u)`` overflows (u < -709.8 in float64, -88.7 in float32) the
    few entries are recomputed as ``exp(u)``, sigmoid's value to full precision
    there (down to subnormals, which ``x*sigmoid(x)`` brings back into range).
    ``0.5 + 0.5*tanh(u/2)`` would cancel to 0 already below u = -37. Five cheap
    numpy calls in the common case: this is the LSTM's hottest kernel.
    """
    e = np.negative(u)
    if type(e) is not np.ndarray or e.dtype.kind != "f":  # a scalar, or integers
        with np.errstate(over="ignore"):
            e = np.exp(e)
        if type(e) is not np.ndarray:
            return 1 / (1 + e) if e != np.inf else np.exp(u)
    else:
        with np.errstate(over="ignore"):
            np.exp(e, out=e)  # in place: one array fewer to allocate and write
    e += 1
    s = np.reciprocal(e, out=e)
    low = _EXP_OVERFLOWS_BELOW.get(s.dtype)
    if low is None:
        low = _EXP_OVERFLOWS_BELOW[s.dtype] = -float(np.log(np.finfo(s.dtype).max)) + 1.0
    if s.size and np.min(u) < low:
        tail = u < low
        s[tail] = np.exp(u[tail])
    return s


#: numpy helpers the stable functions' templates may call (lambdify namespace)
NUMPY_HELPERS: dict[str, Callable[..., Any]] = {"_symdiff_sigmoid": _sigmoid}


class Sigmoid(_StableFunction):
    """1 / (1 + exp(-u)), printed as a call of :func:`_sigmoid` (no overflow, accurate tails)."""

    nargs = 1
    numpy_template = "_symdiff_sigmoid({0})"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        # σ(u)σ(-u), not σ(1 - σ): 1 - σ(u) is 0 in floating point from u ≈ 37, where σ' ≈ 1e-16
        u = self.args[0]
        return Sigmoid(u) * Sigmoid(-u)


class Step(_StableFunction):
    """Heaviside step with step(0) = 0, so relu'(0) = 0 deterministically."""

    nargs = 1
    numpy_template = "numpy.heaviside({0}, 0)"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.S.Zero


class Relu(_StableFunction):
    """max(u, 0), printed as numpy.maximum (SymPy's Max prints as a slow select)."""

    nargs = 1
    numpy_template = "numpy.maximum({0}, 0)"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return Step(self.args[0])


STABLE_FUNCTIONS = (Softplus, Sigmoid, Step, Relu)

#: The rewrite set applied to forward expressions and to every derivative.
REWRITES: tuple[tuple[str, str], ...] = (
    ("log(1 + exp(u))", "softplus(u) = logaddexp(0, u)"),
    ("log(1 + exp(-u))", "softplus(-u)"),
    ("log(1/(1 + exp(-u)))  (log-sigmoid)", "-softplus(-u)"),
    ("1/(1 + exp(-u))", "sigmoid(u) as 1/(1+exp(-u)), exp's overflow taken as inf: accurate tails, no warning"),
    ("1/(1 + exp(u))", "sigmoid(-u)"),
    ("exp(u)/(1 + exp(u))", "sigmoid(u)"),
    ("exp(u)/(1 + exp(u))**2 and exp(-u)/(1 + exp(-u))**2", "sigmoid(u)*sigmoid(-u)"),
    ("exp(m*u)/(1 + exp(u))**n, 1 <= m <= n", "sigmoid(u)**m * sigmoid(-u)**(n-m)"),
    ("Max(u, 0)", "relu(u) = maximum(u, 0), derivative step(u) with step(0) = 0"),
    ("Min(u, 0)", "-relu(-u)"),
    ("Heaviside(u, 0)", "step(u)"),
)


def _one_plus_exp(e: sp.Expr) -> sp.Expr | None:
    """Return ``u`` when ``e`` is exactly ``1 + exp(u)``."""
    if isinstance(e, sp.Add) and len(e.args) == 2 and sp.S.One in e.args:
        other = e.args[1] if e.args[0] == sp.S.One else e.args[0]
        if isinstance(other, sp.exp):
            return other.args[0]
    return None


def _rewrite_product(e: sp.Expr) -> sp.Expr:
    """Turn ``exp(m*v) * (1+exp(v))**-n`` factors of a product into sigmoids.

    ``(1+exp(v))**-n`` is ``sigmoid(-v)**n``; an ``exp(m*v)`` factor beside it
    (1 <= m <= n) turns ``m`` of those into ``sigmoid(v)``, since
    ``exp(v) * sigmoid(-v) == sigmoid(v)``. Sigmoids already rewritten in a
    sub-expression take part too, so the order of rewriting does not matter.
    """
    sig: dict[sp.Expr, int] = {}  # a -> n for a factor sigmoid(a)**n
    rest: list[sp.Expr] = []
    for fac in sp.Mul.make_args(e):
        base, n = (fac.base, fac.exp) if isinstance(fac, sp.Pow) else (fac, sp.S.One)
        if n.is_Integer:
            if n < 0:
                v = _one_plus_exp(base)
                if v is not None:
                    sig[-v] = sig.get(-v, 0) + int(-n)
                    continue
            elif isinstance(base, Sigmoid):
                sig[base.args[0]] = sig.get(base.args[0], 0) + int(n)
                continue
        rest.append(fac)
    if not sig:
        return e
    out: list[sp.Expr] = []
    for fac in rest:
        if isinstance(fac, sp.exp):
            w = fac.args[0]
            for a, n in sig.items():
                m = sp.cancel(-w / a)
                if m.is_Integer and 1 <= m <= n:
                    # exp(m v) sigmoid(-v)^n == sigmoid(v)^m sigmoid(-v)^(n-m), with a = -v
                    out.append(Sigmoid(-a) ** int(m))
                    sig[a] = n - int(m)
                    break
            else:
                out.append(fac)
        else:
            out.append(fac)
    out.extend(Sigmoid(a) ** n for a, n in sig.items() if n)
    return sp.Mul(*out)


def stabilise(e: sp.Expr) -> sp.Expr:
    """Rewrite the unstable patterns of :data:`REWRITES`, bottom-up."""
    if not e.args or isinstance(e, (sp.Symbol, sp.Number)):
        return e
    args = [stabilise(a) for a in e.args]
    if any(a is not b for a, b in zip(args, e.args)):
        e = e.func(*args)
    if isinstance(e, sp.log):
        (a,) = e.args
        u = _one_plus_exp(a)
        if u is not None:
            return Softplus(u)
        if isinstance(a, Sigmoid):
            return -Softplus(-a.args[0])
        return e
    if isinstance(e, (sp.Max, sp.Min)) and len(e.args) == 2 and sp.S.Zero in e.args:
        u = e.args[1] if e.args[0] == sp.S.Zero else e.args[0]
        return Relu(u) if isinstance(e, sp.Max) else -Relu(-u)
    if isinstance(e, sp.Heaviside) and len(e.args) == 2 and e.args[1] == 0:
        return Step(e.args[0])
    if isinstance(e, (sp.Mul, sp.Pow)):
        return _rewrite_product(e)
    return e


# --------------------------------------------------------------------------------------
# sums that cancel: rewritten after differentiating
# --------------------------------------------------------------------------------------
#: what :func:`refine` rewrites after differentiating (r is any common factor)
DERIVATIVE_REWRITES: tuple[tuple[str, str], ...] = (
    ("r - r*sigmoid(u)", "r*sigmoid(-u)"),
    ("r*sigmoid(u) - r*sigmoid(-u), r - 2r*sigmoid(u)", "r*tanh(u/2) (accurate near u = 0)"),
    ("r - r*tanh(u)**2", "4r*sigmoid(2u)*sigmoid(-2u) (nonzero out to |u| = 350, not only to 19)"),
    ("sign(u)", "step(u) - step(-u): derivative 0, as relu'' (SymPy's is DiracDelta)"),
)


def _rewrite_add(e: sp.Add) -> sp.Expr:
    """One cancelling pair of terms of a sum, rewritten (none found: ``e`` unchanged).

    With ``r`` any factor, ``s = σ(u)``, ``s̄ = σ(-u)``, ``T = tanh(u)``:
    ``r·s - r·s̄ = r·tanh(u/2)``, ``r·s - r = -r·s̄``, ``r·s - r/2 = r·tanh(u/2)/2``
    and ``r·T² - r = -4r·σ(2u)σ(-2u)``: each left side loses all its digits
    where the right side is small (u near 0, or in a tail).
    """
    terms = list(e.args)
    for i, t in enumerate(terms):
        factors = sp.Mul.make_args(t)
        for m, fac in enumerate(factors):
            if isinstance(fac, Sigmoid):
                u = fac.args[0]
                rest = sp.Mul(*factors[:m], *factors[m + 1:])
                pairs = ((-rest * Sigmoid(-u), rest * sp.tanh(u / 2)), (-rest, -rest * Sigmoid(-u)),
                         (-rest / 2, rest * sp.tanh(u / 2) / 2))
            elif isinstance(fac, sp.Pow) and fac.exp == 2 and isinstance(fac.base, sp.tanh):
                u = fac.base.args[0]
                rest = sp.Mul(*factors[:m], *factors[m + 1:])
                pairs = ((-rest, -4 * rest * Sigmoid(2 * u) * Sigmoid(-2 * u)),)
            else:
                continue
            for k, t2 in enumerate(terms):
                if k == i:
                    continue
                for partner, replacement in pairs:
                    if t2 == partner:
                        others = [t3 for n, t3 in enumerate(terms) if n not in (i, k)]
                        return sp.Add(*others, replacement)
    return e


def _rewrite(e: sp.Expr) -> sp.Expr:
    if not e.args or isinstance(e, (sp.Symbol, sp.Number)):
        return e
    args = [_rewrite(a) for a in e.args]
    if any(a is not b for a, b in zip(args, e.args)):
        e = e.func(*args)
    if isinstance(e, sp.sign):
        # sign(u) = step(u) - step(-u): sign(0) = 0 still, and its derivative is 0 (as relu'' is), not
        # SymPy's 2*DiracDelta(u), which numpy cannot evaluate (|x|'' would fail to declare)
        (u,) = e.args
        return Step(u) - Step(-u)
    while isinstance(e, sp.Add):
        new = _rewrite_add(e)
        if new == e:
            break
        e = new
    return e


def refine(e: sp.Expr) -> sp.Expr:
    """Stabilise ``e``, then rewrite the sums that cancel in floating point (see the module doc).

    ``factor_terms`` first pulls common factors out of sums, so that
    ``σσ̄² - σ²σ̄`` shows its ``σ̄ - σ``; rounds repeat until nothing changes.
    """
    e = stabilise(e)
    for _ in range(4):
        new = _rewrite(sp.factor_terms(e))
        if new == e:
            break
        e = new
    return e
