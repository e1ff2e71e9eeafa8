"""Stable functions, the rewrites that introduce them, and the accuracy rewrite catalogue.

Unstable patterns such as ``log(1+exp(u))`` or ``1/(1+exp(-u))`` become SymPy
functions (:class:`Softplus`, :class:`Sigmoid`, :class:`Step`, :class:`Relu`) that
carry their own stable numpy code and their own derivative; :func:`stabilise`
applies :data:`REWRITES` bottom-up to a forward expression or a derivative.
After differentiating, :func:`refine` also rewrites the sums that cancel in
floating point (``1 - σ(u)``, ``σ(u) - σ(-u)``, ``1 - tanh(u)²``; see
:data:`DERIVATIVE_REWRITES`), so derivatives of every order keep their digits.
The rewrites of
:data:`REWRITES` only remove overflow, so they are always applied.

The **catalogue** (:data:`RULES`, second half of this file) holds the rewrites that
trade something — an extra call, a branch — for accuracy in some region
(``exp(u) - 1 → expm1(u)``, ``1 - cos(u) → 2 sin²(u/2)``, ...), with the functions they
introduce (:class:`LogAddExp`, :class:`XLogX`, :class:`Sech2`, :class:`Taylor`; SymPy's
``expm1``, ``log1p``, ``hypot``). They are candidates, not defaults: the declaration
pipeline (:mod:`symdiff.forms`) measures every candidate against mpmath
(:mod:`symdiff.accuracy`) and keeps one only where it is measured better. Every
function prints as numpy (its template or a helper in :data:`NUMPY_HELPERS`) and as C
(a helper in :data:`symdiff.cprint.C_PRELUDE`, or the C99 function of the same name).
Kept apart from ``defop`` because fusion (:mod:`symdiff.fusion`) and the C printer
(:mod:`symdiff.cprint`) use the same functions.

Only the SymPy side of the engine imports SymPy: :mod:`symdiff.stable`,
:mod:`symdiff.declare`, :mod:`symdiff.cprint`, :mod:`symdiff.fusion`, :mod:`symdiff.derivative_ops`
(derivatives of every order as ops) and :mod:`symdiff.ops` (which declares the built-in ops with it). Everything else (graph, registry, compiler,
passes, native) runs on numpy alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mpmath
import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1, hypot, log1p

from .accuracy import mp_exp


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

    @staticmethod
    def mpmath_eval(u: Any) -> Any:
        return mpmath.log1p(mp_exp(u))


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

    @staticmethod
    def mpmath_eval(u: Any) -> Any:
        # mp_exp, not mpmath.sigmoid: that took seconds per point at |u| ~ 1e300 (measuring σ'' took minutes)
        return 1 / (1 + mp_exp(-u))


class Step(_StableFunction):
    """Heaviside step with step(0) = 0, so relu'(0) = 0 deterministically."""

    nargs = 1
    numpy_template = "numpy.heaviside({0}, 0)"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.S.Zero

    @staticmethod
    def mpmath_eval(u: Any) -> Any:
        return mpmath.mpf(1) if u > 0 else mpmath.mpf(0)


class Relu(_StableFunction):
    """max(u, 0), printed as numpy.maximum (SymPy's Max prints as a slow select)."""

    nargs = 1
    numpy_template = "numpy.maximum({0}, 0)"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return Step(self.args[0])

    @staticmethod
    def mpmath_eval(u: Any) -> Any:
        return u if u > 0 else mpmath.mpf(0)


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


# --------------------------------------------------------------------------------------
# The accuracy catalogue: functions
# --------------------------------------------------------------------------------------
class LogAddExp(_StableFunction):
    """log(exp(a) + exp(b)) as numpy.logaddexp: no overflow for large a, b; exact when one dominates."""

    nargs = 2
    numpy_template = "numpy.logaddexp({0}, {1})"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        a, b = self.args
        return Sigmoid(a - b) if argindex == 1 else Sigmoid(b - a)

    @staticmethod
    def mpmath_eval(a: Any, b: Any) -> Any:
        top, low = (a, b) if a >= b else (b, a)
        return top + mpmath.log1p(mp_exp(low - top))


def _xlogx(u: Any) -> Any:
    """u*log(u) with its limit 0 at u = 0 (and no divide-by-zero warning there)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.multiply(u, np.log(u))
    return np.where(u == 0, 0 * u, r)


class XLogX(_StableFunction):
    """u*log(u), defined as 0 at u = 0 (its limit; 0*log(0) is NaN in floating point)."""

    nargs = 1
    numpy_template = "_symdiff_xlogx({0})"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.log(self.args[0]) + 1

    @staticmethod
    def mpmath_eval(u: Any) -> Any:
        return mpmath.mpf(0) if u == 0 else u * mpmath.log(u)


def _sech2(u: Any) -> Any:
    """1/cosh(u)² = 4e/(1+e)² with e = exp(-2|u|): no overflow, full precision in the tails."""
    e = np.exp(-2 * np.abs(u))
    return 4 * e / (1 + e) ** 2


class Sech2(_StableFunction):
    """1 - tanh(u)², tanh's derivative: ``1 - tanh²`` is 0 from |u| ≈ 19 on, this keeps every digit."""

    nargs = 1
    numpy_template = "_symdiff_sech2({0})"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return -2 * sp.tanh(self.args[0]) * Sech2(self.args[0])

    @staticmethod
    def mpmath_eval(u: Any) -> Any:
        e = mp_exp(-2 * abs(u))
        return 4 * e / (1 + e) ** 2


class Taylor(_StableFunction):
    """``series`` where |u| < r, else ``general``: a removable cancellation near 0 (sin(x) - x).

    ``Taylor(u, r, series, general)``; ``series`` is a polynomial in Horner form. Both
    branches are computed (numpy's ``where``, C's ternary), so the kernel runs with
    floating-point warnings off. Differentiating differentiates both branches.
    """

    nargs = 4

    def _numpycode(self, printer: Any) -> str:
        u, r, s, g = (printer._print(a) for a in self.args)
        return f"numpy.where(numpy.abs({u}) < {r}, {s}, {g})"

    _pythoncode = _numpycode

    def _eval_derivative(self, x: sp.Symbol) -> sp.Expr:
        u, r, s, g = self.args
        return Taylor(u, r, sp.horner(sp.expand(sp.diff(s, x))) if s.free_symbols else sp.diff(s, x), sp.diff(g, x))

    def fdiff(self, argindex: int = 1) -> sp.Expr:  # pragma: no cover - _eval_derivative is used
        raise NotImplementedError

    @staticmethod
    def mpmath_eval(u: Any, r: Any, s: Any, g: Any) -> Any:  # pragma: no cover - never part of a truth
        raise TypeError("Taylor is a kernel form, not a value: measure the expression it came from")


def _erfcx(u: Any) -> Any:
    """exp(u²)·erfc(u) by scipy.special.erfcx (only reached from erf/erfc, which need SciPy already)."""
    from scipy.special import erfcx

    return erfcx(u)


def _log_half_erfc(u: Any) -> Any:
    """log(erfc(u)/2): log(erfcx(u)) - u² - log 2 for u > 0 (erfc underflows from u ≈ 27 on),
    log1p(-erfc(-u)/2) for u ≤ 0 (erfc(u)/2 is near 1 there: the log of it would cancel)."""
    from scipy.special import erfc, erfcx

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        pos = np.log(erfcx(u)) - u * u - 0.6931471805599453
        neg = np.log1p(-0.5 * erfc(-u))
    return np.where(u > 0, pos, neg)


def _erfc(u: Any) -> Any:
    from scipy.special import erfc

    return erfc(u)


class StableErfc(_StableFunction):
    """erfc(u), kept as written: SymPy turns erfc(-u) into 2 - erfc(u), the cancellation removed."""

    nargs = 1
    numpy_template = "_symdiff_erfc({0})"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return -2 / sp.sqrt(sp.pi) * sp.exp(-self.args[0] ** 2)

    @staticmethod
    def mpmath_eval(u: Any) -> Any:
        return mpmath.erfc(u)


class Erfcx(_StableFunction):
    """The scaled complementary error function exp(u²)·erfc(u) (scipy.special.erfcx; no C99 counterpart)."""

    nargs = 1
    numpy_template = "_symdiff_erfcx({0})"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return 2 * self.args[0] * Erfcx(self.args[0]) - 2 / sp.sqrt(sp.pi)

    @staticmethod
    def mpmath_eval(u: Any) -> Any:
        return mp_exp(u * u) * mpmath.erfc(u)


class LogHalfErfc(_StableFunction):
    """log(erfc(u)/2) = log Φ(-u·√2): the log of the normal CDF, every digit in both tails."""

    nargs = 1
    numpy_template = "_symdiff_log_half_erfc({0})"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return -2 / (sp.sqrt(sp.pi) * Erfcx(self.args[0]))

    @staticmethod
    def mpmath_eval(u: Any) -> Any:
        return mpmath.log(mpmath.erfc(u) / 2)


#: the helpers above that call scipy.special (name printed -> the scipy.special function it needs), so a
#: kernel using one without SciPy fails with the one-line MissingExtraError (symdiff.declare)
SCIPY_HELPERS = {"_symdiff_erfc": "erfc", "_symdiff_erfcx": "erfcx", "_symdiff_log_half_erfc": "erfcx"}
NUMPY_HELPERS.update({"_symdiff_xlogx": _xlogx, "_symdiff_sech2": _sech2, "_symdiff_erfcx": _erfcx, "_symdiff_erfc": _erfc,
                      "_symdiff_log_half_erfc": _log_half_erfc})

#: the catalogue's functions that print as C helpers ``sd_<name>`` (see :mod:`symdiff.cprint`)
#: (Erfcx and LogHalfErfc have none: C99 lacks erfcx, so kernels with them run numpy/SciPy)
NEW_FUNCTIONS = (LogAddExp, XLogX, Sech2, StableErfc)


# --------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One rewrite: ``apply(node)`` returns the rewritten node or None (tried bottom-up)."""

    name: str
    pattern: str
    result: str
    helps: str
    apply: Callable[[sp.Expr], sp.Expr | None]


def _const_and_term(e: sp.Expr, match: Callable[[sp.Expr], sp.Expr | None]) -> tuple[sp.Expr, sp.Expr, sp.Expr, list[sp.Expr]] | None:
    """In a sum ``k + m·F + rest`` where ``match(F)`` gives ``u`` and ``m == -k``: (k, u, F-term, rest)."""
    if not isinstance(e, sp.Add):
        return None
    terms = list(e.args)
    consts = [t for t in terms if t.is_Number]
    if len(consts) != 1:
        return None
    k = consts[0]
    for t in terms:
        coeff, f = t.as_coeff_Mul()
        u = match(f)
        if u is not None and coeff == -k:
            rest = [s for s in terms if s is not t and s is not k]
            return k, u, t, rest
    return None


def _func_arg(cls: Any) -> Callable[[sp.Expr], sp.Expr | None]:
    return lambda f: f.args[0] if isinstance(f, cls) else None


def _expm1(e: sp.Expr) -> sp.Expr | None:
    """``exp(u) - 1`` (times any constant, inside any sum) → ``expm1(u)``."""
    hit = _const_and_term(e, _func_arg(sp.exp))
    if hit is None:
        return None
    k, u, _, rest = hit
    return sp.Add(-k * expm1(u), *rest)


def _log1p(e: sp.Expr) -> sp.Expr | None:
    """``log(1 + u)`` and ``log(1 - u)`` → ``log1p(±u)``."""
    if isinstance(e, sp.log) and isinstance(e.args[0], sp.Add) and sp.S.One in e.args[0].args:
        return log1p(e.args[0] - 1)
    return None


def _logaddexp(e: sp.Expr) -> sp.Expr | None:
    """``log(exp(a) + exp(b))`` → ``logaddexp(a, b)``."""
    if isinstance(e, sp.log) and isinstance(e.args[0], sp.Add) and len(e.args[0].args) == 2:
        a, b = e.args[0].args
        if isinstance(a, sp.exp) and isinstance(b, sp.exp):
            return LogAddExp(a.args[0], b.args[0])
    return None


def _hypot(e: sp.Expr) -> sp.Expr | None:
    """``sqrt(a² + b²)`` (a number c counts as sqrt(c)²) → ``hypot(a, b)``."""
    if isinstance(e, sp.Pow) and e.exp == sp.Rational(1, 2) and isinstance(e.base, sp.Add) and len(e.base.args) == 2:
        roots = []
        for t in e.base.args:
            if isinstance(t, sp.Pow) and t.exp == 2:
                roots.append(t.base)
            elif t.is_Number and t > 0:
                roots.append(sp.sqrt(t))
            else:
                return None
        return hypot(*roots)
    return None


def _one_minus_cos(e: sp.Expr) -> sp.Expr | None:
    """``k - k·cos(u)`` → ``2k·sin(u/2)²``."""
    hit = _const_and_term(e, _func_arg(sp.cos))
    if hit is None:
        return None
    k, u, _, rest = hit
    return sp.Add(2 * k * sp.sin(u / 2) ** 2, *rest)


def _one_minus_tanh2(e: sp.Expr) -> sp.Expr | None:
    """``k - k·tanh(u)²`` → ``k·sech2(u)`` (tanh's derivative)."""
    def match(f: sp.Expr) -> sp.Expr | None:
        return f.base.args[0] if isinstance(f, sp.Pow) and f.exp == 2 and isinstance(f.base, sp.tanh) else None
    hit = _const_and_term(e, match)
    if hit is None:
        return None
    k, u, _, rest = hit
    return sp.Add(k * Sech2(u), *rest)


def _one_minus_sigmoid(e: sp.Expr) -> sp.Expr | None:
    """``k - k·σ(u)`` → ``k·σ(-u)``."""
    hit = _const_and_term(e, _func_arg(Sigmoid))
    if hit is None:
        return None
    k, u, _, rest = hit
    return sp.Add(k * Sigmoid(-u), *rest)


def _xlogx_rule(e: sp.Expr) -> sp.Expr | None:
    """``u·log(u)`` (a factor pair of a product) → ``xlogx(u)``, which is 0 at u = 0."""
    if not isinstance(e, sp.Mul):
        return None
    factors = list(e.args)
    for f in factors:
        if isinstance(f, sp.log) and f.args[0] in factors:
            rest = list(factors)
            rest.remove(f)
            rest.remove(f.args[0])
            return sp.Mul(XLogX(f.args[0]), *rest)
    return None


def _exp_difference(e: sp.Expr) -> sp.Expr | None:
    """``exp(a) - exp(b)`` → ``sign(a - b)·exp(max)·(-expm1(min - max))``.

    The difference is factored out before anything rounds: near a = b (both near 0, or
    both -700) min - max is exact (Sterbenz) and expm1 keeps its digits; -expm1 of a
    non-positive number lies in [0, 1), so only exp(max) can overflow, where the result does.
    """
    if not isinstance(e, sp.Add):
        return None
    split = [(t, *t.as_coeff_Mul()) for t in e.args]
    for t1, c1, f1 in split:
        for t2, c2, f2 in split:
            if isinstance(f1, sp.exp) and isinstance(f2, sp.exp) and c1 > 0 and c2 == -c1:
                a, b = f1.args[0], f2.args[0]
                hi, lo = sp.Max(a, b), sp.Min(a, b)
                rest = [t for t in e.args if t is not t1 and t is not t2]
                return sp.Add(-c1 * sp.sign(a - b) * sp.exp(hi) * expm1(lo - hi), *rest)
    return None


def _one_plus_tanh(e: sp.Expr) -> sp.Expr | None:
    """``k + k·tanh(u)`` → ``2k·σ(2u)`` and ``k - k·tanh(u)`` → ``2k·σ(-2u)``."""
    if not isinstance(e, sp.Add):
        return None
    consts = [t for t in e.args if t.is_Number]
    if len(consts) != 1:
        return None
    k = consts[0]
    for t in e.args:
        coeff, f = t.as_coeff_Mul()
        if isinstance(f, sp.tanh) and abs(coeff) == abs(k) and k != 0:
            rest = [s for s in e.args if s is not t and s is not k]
            return sp.Add(2 * k * Sigmoid(2 * f.args[0] * sp.sign(coeff / k)), *rest)
    return None


def _one_plus_erf(e: sp.Expr) -> sp.Expr | None:
    """``k + k·erf(u)`` → ``k·erfc(-u)`` and ``k - k·erf(u)`` → ``k·erfc(u)`` (Φ, GELU's erf form)."""
    if not isinstance(e, sp.Add):
        return None
    consts = [t for t in e.args if t.is_Number]
    if len(consts) != 1 or consts[0] == 0:
        return None
    k = consts[0]
    for t in e.args:
        coeff, f = t.as_coeff_Mul()
        if isinstance(f, sp.erf) and abs(coeff) == abs(k):
            rest = [s for s in e.args if s is not t and s is not k]
            return sp.Add(k * StableErfc(-f.args[0] * sp.sign(coeff / k)), *rest)
    return None


def _log_erfc(e: sp.Expr) -> sp.Expr | None:
    """``log(c·erfc(u))`` → ``log(2c) + log_half_erfc(u)`` (log Φ: finite far in the left tail)."""
    if not isinstance(e, sp.log):
        return None
    c, f = e.args[0].as_coeff_Mul()
    if isinstance(f, (sp.erfc, StableErfc)) and c > 0:
        return sp.log(2 * c) + LogHalfErfc(f.args[0])
    return None


def _sigmoid_difference(e: sp.Expr) -> sp.Expr | None:
    """``k·σ(u) - k·σ(-u)`` → ``k·tanh(u/2)`` (the difference vanishes at u = 0, tanh keeps its digits)."""
    if not isinstance(e, sp.Add):
        return None
    split = [(t, *t.as_coeff_Mul()) for t in e.args]
    for t1, c1, f1 in split:
        for t2, c2, f2 in split:
            if (t1 is not t2 and isinstance(f1, Sigmoid) and isinstance(f2, Sigmoid) and c2 == -c1
                    and f2.args[0] == -f1.args[0]):
                rest = [t for t in e.args if t is not t1 and t is not t2]
                return sp.Add(c1 * sp.tanh(f1.args[0] / 2), *rest)
    return None


def _sqrt_difference(e: sp.Expr) -> sp.Expr | None:
    """``sqrt(a) - sqrt(b)`` → ``(a - b)/(sqrt(a) + sqrt(b))`` when a - b is simpler than a and b."""
    if not isinstance(e, sp.Add) or len(e.args) != 2:
        return None
    p, q = e.args
    if q.could_extract_minus_sign() and not p.could_extract_minus_sign():
        pass
    elif p.could_extract_minus_sign() and not q.could_extract_minus_sign():
        p, q = q, p
    else:
        return None
    a, b = p, -q
    if not (isinstance(a, sp.Pow) and isinstance(b, sp.Pow) and a.exp == b.exp == sp.Rational(1, 2)):
        return None
    diff = sp.expand(a.base - b.base)
    if sp.count_ops(diff) >= sp.count_ops(a.base) + sp.count_ops(b.base):
        return None
    return diff / (a + b)


def _softplus_minus(e: sp.Expr) -> sp.Expr | None:
    """``softplus(u) - u`` → ``softplus(-u)`` (log(1 + exp(u)) - u = log(1 + exp(-u)))."""
    if not isinstance(e, sp.Add):
        return None
    for t in e.args:
        if isinstance(t, Softplus):
            u = t.args[0]
            rest = list(e.args)
            rest.remove(t)
            left = sp.Add(*rest) + u
            if left == 0 or len(sp.Add.make_args(left)) < len(rest):
                return Softplus(-u) + left
    return None


#: The catalogue, one rule a row: where it helps is measured, not assumed (see symdiff.accuracy)
RULES: tuple[Rule, ...] = (
    Rule("expm1", "exp(u) - 1", "expm1(u)",
         "|u| < 1: exp(u) rounds to 1 + O(eps) and the subtraction leaves only rounding (all digits lost below 1e-16); "
         "also u/(exp(u) - 1), (exp(u) - 1)/u and the derivatives that contain them", _expm1),
    Rule("log1p", "log(1 + u), log(1 - u)", "log1p(±u)",
         "|u| < 1: 1 + u rounds away u's low digits before the log sees them", _log1p),
    Rule("logaddexp", "log(exp(a) + exp(b))", "logaddexp(a, b)",
         "a or b > 709 (exp overflows) or both < -745 (both underflow to 0, log(0) = -inf)", _logaddexp),
    Rule("hypot", "sqrt(a² + b²)", "hypot(a, b)",
         "|a| or |b| > 1e154 (the square overflows) or both < 1e-162 (the squares underflow)", _hypot),
    Rule("1-cos", "1 - cos(u)", "2·sin(u/2)²",
         "|u| < 1e-4 and near multiples of 2π: cos(u) rounds to 1 and the difference to 0", _one_minus_cos),
    Rule("sech2", "1 - tanh(u)²", "sech2(u) = 4e/(1+e)², e = exp(-2|u|)",
         "|u| > 1: tanh² rounds toward 1; from |u| ≈ 19 on the result is 0 instead of ~4e^-2|u| "
         "(added: measurement showed tanh's own derivative failing)", _one_minus_tanh2),
    Rule("1-sigmoid", "1 - σ(u)", "σ(-u)",
         "u > 1: σ(u) rounds toward 1; from u ≈ 37 on the result is 0 instead of ~e^-u "
         "(σ' = σ(u)(1 - σ(u)) becomes σ(u)σ(-u))", _one_minus_sigmoid),
    Rule("xlogx", "u·log(u)", "xlogx(u), 0 at u = 0",
         "u = 0: 0·log(0) is 0·(-inf) = NaN, the limit is 0", _xlogx_rule),
    Rule("exp-diff", "exp(a) - exp(b)", "sign(a - b)·exp(max(a, b))·(-expm1(min - max))",
         "a ≈ b anywhere (sinh written as (exp(x) - exp(-x))/2 loses every digit at |x| < 1e-16; "
         "exp(-700) - exp(-745)) (added: measurement of sinh and differences of exponentials)", _exp_difference),
    Rule("1+tanh", "1 + tanh(u), 1 - tanh(u)", "2·σ(2u), 2·σ(-2u)",
         "u < -1 (resp. u > 1): tanh(u) rounds toward ∓1; from |u| ≈ 19 on the result is 0 "
         "(added: measurement of GELU's tanh form)", _one_plus_tanh),
    Rule("1+erf", "1 + erf(u), 1 - erf(u)", "erfc(-u), erfc(u)",
         "u < -1 (resp. u > 1): erf(u) rounds toward ∓1; from u ≈ -6 on the result is 0 instead of ~e^-u² "
         "(added: GELU x/2·(1 + erf(x/√2)) and Φ were 0 for x < -8)", _one_plus_erf),
    Rule("log-erfc", "log(c·erfc(u))", "log(2c) + log_half_erfc(u)",
         "u > 27: erfc underflows and the log is -inf; u < -1: log(erfc(u)/2) cancels near 0 "
         "(added: log Φ(x) = log((1 + erf(x/√2))/2))", _log_erfc),
    Rule("sigmoid-diff", "σ(u) - σ(-u)", "tanh(u/2)",
         "|u| < 1: both near 1/2; from |u| < 1e-16 on the result is 0 (added: measurement of σ'')",
         _sigmoid_difference),
    Rule("sqrt-diff", "sqrt(a) - sqrt(b)", "(a - b)/(sqrt(a) + sqrt(b))",
         "a ≈ b, when a - b simplifies (sqrt(x + 1) - sqrt(x) for large x) "
         "(added: measurement of the textbook example)", _sqrt_difference),
    Rule("softplus-minus", "softplus(u) - u", "softplus(-u)",
         "u > 37: softplus(u) rounds to u and the difference to 0 instead of e^-u "
         "(added: measurement of log(1 + exp(x)) - x)", _softplus_minus),
)

#: Not a rule of the table: :func:`taylor_fallback` replaces a whole expression near 0 by its series
TAYLOR_NOTE = ("Taylor fallback", "f(x) with a removable cancellation at 0 (sin(x) - x, (1 - cos x)/x², "
               "x/(exp(x) - 1)'s derivative)", "series of f where |x| < r, f elsewhere (r chosen by measurement)")


def apply_rules(e: sp.Expr, rules: tuple[Rule, ...]) -> sp.Expr:
    """Apply ``rules`` bottom-up, each node rewritten until no rule matches it."""
    if not e.args or isinstance(e, (sp.Symbol, sp.Number)):
        return e
    args = [apply_rules(a, rules) for a in e.args]
    if any(a is not b for a, b in zip(args, e.args)):
        e = e.func(*args)
    for _ in range(8):
        for rule in rules:
            new = rule.apply(e)
            if new is not None and new != e:
                e = apply_rules(new, rules) if new.args and new.func is not e.func else new
                break
        else:
            return e
    return e


_SERIES: dict[tuple[sp.Expr, sp.Symbol, int], sp.Expr | None] = {}


def taylor_fallback(general: sp.Expr, truth: sp.Expr, x: sp.Symbol, radius: float, terms: int = 18) -> sp.Expr | None:
    """``Taylor(x, r, series, general)``: ``truth``'s series at 0 (``terms`` powers) where |x| < r.

    None when the series is not a polynomial (log or fractional powers: no removable
    cancellation there), SymPy cannot find it, or its last term at |x| = r is not below
    2^-60 of its first (the series would not be accurate to the last digit there).
    """
    key = (truth, x, terms)
    if key not in _SERIES:  # one series per expression, whatever the radius (SymPy's series is slow)
        try:
            _SERIES[key] = sp.series(truth, x, 0, terms).removeO()
        except Exception:  # noqa: BLE001 - SymPy gives up on some functions: no fallback then
            _SERIES[key] = None
    s = _SERIES[key]
    if s is None:
        return None
    if s.has(sp.Order) or not s.is_polynomial(x) or s.free_symbols - {x}:
        return None
    s = sp.expand(s)
    if s == 0:
        return None
    if s.free_symbols:
        coeffs = [(m[0], c) for m, c in sp.Poly(s, x).terms()]
        (lead_k, lead_c), (last_k, last_c) = min(coeffs), max(coeffs)
        if last_k > lead_k and abs(float(last_c)) * radius ** (last_k - lead_k) > 2.0**-60 * abs(float(lead_c)):
            return None
    s = sp.horner(s.evalf(20)) if s.free_symbols else sp.Float(s, 20)
    return Taylor(x, sp.Float(radius), s, general)


def drop_dirac(e: sp.Expr) -> sp.Expr:
    """A derivative with SymPy's DiracDelta (from sign, Heaviside) set to 0: it is 0 wherever a
    double can land but on the kink itself, where the derivative is undefined anyway."""
    deltas = e.atoms(sp.DiracDelta)
    dropped = e.xreplace({d: sp.S.Zero for d in deltas}) if deltas else e
    # nothing but DiracDelta (sign, Heaviside): no usable gradient; kept, so declaring it fails clearly
    return e if dropped == 0 and e != 0 else dropped


def rules_in(label: str) -> tuple[Rule, ...]:
    """The rules a chosen candidate's label names (``rule:expm1|out`` → expm1; ``all rules`` → all).

    Fused kernels differentiate a composite of several ops; they apply the rules their
    ops' own measured choices used, so a fused sigmoid keeps σ(u)σ(-u) where the op
    chose it.
    """
    names = set()
    for part in label.split("|"):
        if part in ("all rules", "factored"):
            return RULES
        if part.startswith("rule:"):
            names.add(part[len("rule:"):])
    return tuple(r for r in RULES if r.name in names)
