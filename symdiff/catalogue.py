"""The rewrite catalogue: accuracy rewrites that are *candidates*, kept only where measured better.

Unlike :func:`stabilise` (whose rewrites are always right: they only remove overflow),
each rule here trades something — an extra transcendental call, a branch — for
accuracy in some region. The declaration pipeline applies each rule alone and all of
them together, adds a Taylor fallback near zero, measures every candidate against
mpmath (:mod:`symdiff.accuracy`) and keeps the best one, never one measurably worse
than the expression as written. Every new function prints as numpy (``_numpycode``)
and as C (a helper in :data:`C_HELPERS`, or a C99 function of the same name).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mpmath
import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1, hypot, log1p

from .symbolic import NUMPY_HELPERS, Sigmoid, Softplus, _StableFunction


# --------------------------------------------------------------------------------------
# New functions
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
        return mpmath.log(mpmath.exp(a) + mpmath.exp(b))


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
        return mpmath.sech(u) ** 2


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


NUMPY_HELPERS.update({"_symdiff_xlogx": _xlogx, "_symdiff_sech2": _sech2})

#: new functions -> C helper names (``sd_<name>`` for double, ``sd_<name>f`` for float; see C_HELPERS)
NEW_FUNCTIONS = (LogAddExp, XLogX, Sech2)

#: C for the new functions, in the style of the C prelude's helpers (NaN passes through)
C_HELPERS = "\n".join(
    f"static inline {t} sd_logaddexp{x}({t} a, {t} b) {{ {t} m = a > b ? a : b; "
    f"if (a == b) return a + log{x}(({t})2); if (m != m) return a + b; "
    f"return m + log1p{x}(exp{x}(-fabs{x}(a - b))); }}\n"
    f"static inline {t} sd_xlogx{x}({t} u) {{ return u == 0 ? 0 : u * log{x}(u); }}\n"
    f"static inline {t} sd_sech2{x}({t} u) {{ {t} e = exp{x}(-2 * fabs{x}(u)); return 4 * e / ((1 + e) * (1 + e)); }}"
    for t, x in (("double", ""), ("float", "f")))


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
    return e.xreplace({d: sp.S.Zero for d in deltas}) if deltas else e


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
