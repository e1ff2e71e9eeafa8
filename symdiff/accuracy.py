"""Measured accuracy: a SymPy expression's float64 kernels against mpmath at high precision.

Why: "write the math naively, get sound numerics" is only a claim until it is measured.
This module samples an expression's domain the way Herbie does (Panchekha et al.,
PLDI 2015) and scores a kernel against the exact value:

* **points** (:func:`sample`): log-uniform magnitudes from subnormal to overflow and
  log-uniform moderate ones (|x| in 2^-40 .. 2^12), both signs, exact zeros, small
  integers, and points near where a sum in the expression cancels (its sign changes or
  its terms meet, found by scanning each sum along each argument);
* **truth** (:func:`truth`): the expression *as written* evaluated by mpmath with an
  adaptive precision — enough bits for the inputs' magnitudes (``1 - cos(x)`` at
  x = 2^-k needs 2k more), raised until two precisions round to the same double; a
  removable singularity (``x/expm1(x)`` at 0) gets its limit, the value at the point
  approached from both sides (both must agree);
* **error** (:func:`error`): Herbie's bits of error, log2(1 + ulps between the kernel's
  double and the correctly rounded truth), averaged over the points; the worst relative
  error where the truth is a normal double; and the count of *failures*, points where
  the truth is finite and nonzero but the kernel gives NaN, ±inf or 0.

What is measured is whatever kernel the caller runs: the declaration pipeline
(:mod:`symdiff.forms`) its numpy candidates, :mod:`symdiff.measure` a declared op's
numpy and compiled kernels. This module is on the SymPy side of the engine (it imports
SymPy and mpmath) and imports no other symdiff module.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import mpmath
import numpy as np
import sympy as sp

#: float64 facts the metrics use
TINY = float(np.finfo(np.float64).tiny)
#: mpmath values beyond 2^(2^1100) in magnitude are taken as ±inf (and below 2^-(2^1100) as ±0):
#: far outside float64 either way (exp(1e308) is still kept exactly: log(exp(x) + exp(y)) needs it)
_CLAMP_MAG = 1 << 1100
_MAX_PREC = 1 << 14
#: the precision cap of a truth computed under a time budget (see :func:`truth`)
BUDGET_PREC = 1 << 12


# --------------------------------------------------------------------------------------
# Truth: a small mpmath interpreter over SymPy trees
# --------------------------------------------------------------------------------------
MpFn = Callable[[Sequence[Any]], Any]
_NAN = mpmath.mpf("nan")


def _real(v: Any) -> Any:
    """A real mpf from an mpmath result: complex results (log(-1)) are NaN, huge/tiny clamped."""
    if isinstance(v, mpmath.mpc):
        if v.imag != 0:
            return _NAN
        v = v.real
    if not isinstance(v, mpmath.mpf):
        v = mpmath.mpf(v)
    sign, man, exp, bc = v._mpf_
    if man and exp + bc > _CLAMP_MAG:
        return mpmath.mpf("-inf") if sign else mpmath.mpf("inf")
    if man and exp + bc < -_CLAMP_MAG:
        return mpmath.mpf("-0") if sign else mpmath.mpf(0)
    return v


class _NeedMore(Exception):
    """Raised mid-evaluation when the working precision is visibly too low (see :func:`_eval_adaptive`)."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.bits = bits


#: whether cancellation checks may ask for more precision (off for the last, highest-precision try)
_checks = [True]


def _checked_sum(vals: list[Any]) -> Any:
    """fsum, asking for more precision when the sum cancels most of the working precision.

    Without this, ``1 - tanh(x)**2`` at x = 100 is 0 at every precision below ~300 bits,
    and two such precisions "agree" on the wrong answer.
    """
    r = mpmath.fsum(vals)
    if _checks[0] and mpmath.isfinite(r):
        top = max((_mag(v) for v in vals if mpmath.isfinite(v) and v != 0), default=None)
        prec = mpmath.mp.prec
        # below 2^-1080 the lost digits cannot change a double (it rounds to 0 or the result is
        # larger): a sum that vanishes there is taken as is (a later factor e^1000 would be wrong)
        if top is not None and top - prec > -1080:
            if r == 0:
                raise _NeedMore(2 * prec)
            if top - _mag(r) > prec - 64:
                raise _NeedMore(top - _mag(r) + 128)
    return r


def _log(x: Any) -> Any:
    """log, asking for more precision when x rounded to 1 (log(1 + tiny) absorbed the tiny)."""
    if _checks[0] and x == 1:
        raise _NeedMore(2 * mpmath.mp.prec)
    return mpmath.log(x)


def _safe(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*a: Any) -> Any:
        if any(mpmath.isnan(x) for x in a):
            return _NAN
        try:
            return _real(fn(*a))
        except (ZeroDivisionError, ValueError, OverflowError):
            return _NAN
    return call


def _mag(x: Any) -> int:
    """Binary exponent of an mpf (|x| < 2^mag), -inf-ish for 0."""
    sign, man, exp, bc = x._mpf_
    return exp + bc if man else -(1 << 62)


def mp_exp(x: Any) -> Any:
    """exp for any magnitude: e^x = 2^n e^r with r = x - n ln 2 (mpmath's own is slow for |x| > 1e6:
    seconds per call at 1e300, which made measuring a sigmoid's derivatives take minutes)."""
    if not mpmath.isfinite(x) or _mag(x) < 20:
        return mpmath.exp(x)
    if _mag(x) > 1090:  # e^x beyond 2^(2^1090): no double is near it
        return mpmath.mpf("inf") if x > 0 else mpmath.mpf(0)
    with mpmath.extraprec(_mag(x) + 20):
        n = int(mpmath.floor(x / mpmath.ln2))
        r = x - n * mpmath.ln2
        return mpmath.ldexp(mpmath.exp(r), n)


def _periodic(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """sin, cos, ... of a number far beyond any double (exp(exp(x))): undefined for our purposes."""
    def call(x: Any) -> Any:
        return _NAN if mpmath.isfinite(x) and _mag(x) > 4096 else fn(x)
    return call


def _tanh(x: Any) -> Any:
    return mpmath.sign(x) * (1 - 2 / (mp_exp(2 * abs(x)) + 1)) if _mag(x) > 6 else mpmath.tanh(x)


def _heaviside(x: Any, h0: Any = mpmath.mpf(0.5)) -> Any:
    """The step; at 0 SymPy's default value 1/2 (what differentiating Max(x, 0) gives) is a
    convention at a kink, not a truth: undefined there. An explicit value is kept."""
    if x == 0:
        return _NAN if h0 == 0.5 else h0
    return mpmath.mpf(1) if x > 0 else mpmath.mpf(0)


def _pow(b: Any, e: Any) -> Any:
    if b == 0 and e < 0:
        return mpmath.mpf("inf") if (e % 2 != 1) or not mpmath.isint(e) else mpmath.mpf("inf") * mpmath.sign(b)
    return mpmath.power(b, e)


#: SymPy function -> mpmath function (the stable functions add themselves via MPMATH_FUNCTIONS)
MPMATH_FUNCTIONS: dict[type, Callable[..., Any]] = {
    sp.exp: mp_exp, sp.log: _log, sp.sin: _periodic(mpmath.sin), sp.cos: _periodic(mpmath.cos),
    sp.tan: _periodic(mpmath.tan), sp.sinh: lambda x: (mp_exp(x) - mp_exp(-x)) / 2,
    sp.cosh: lambda x: (mp_exp(x) + mp_exp(-x)) / 2, sp.tanh: _tanh, sp.asin: mpmath.asin,
    sp.acos: mpmath.acos, sp.atan: mpmath.atan, sp.asinh: mpmath.asinh, sp.acosh: mpmath.acosh,
    sp.atanh: mpmath.atanh, sp.erf: mpmath.erf, sp.erfc: mpmath.erfc, sp.Abs: mpmath.fabs,
    sp.sign: mpmath.sign, sp.atan2: mpmath.atan2, sp.sec: mpmath.sec, sp.csc: mpmath.csc,
    sp.cot: mpmath.cot, sp.sech: mpmath.sech, sp.csch: mpmath.csch, sp.coth: mpmath.coth,
    sp.floor: mpmath.floor, sp.ceiling: mpmath.ceil, sp.Heaviside: _heaviside,
    sp.Max: lambda *a: max(a), sp.Min: lambda *a: min(a),
    sp.DiracDelta: lambda x, *k: _NAN if x == 0 else mpmath.mpf(0),
}


def _cond(c: Any, args: Sequence[sp.Symbol]) -> Callable[[Sequence[Any]], bool]:
    if c is sp.true:
        return lambda xs: True
    if c is sp.false:
        return lambda xs: False
    if isinstance(c, (sp.And, sp.Or)):
        parts = [_cond(a, args) for a in c.args]
        combine = all if isinstance(c, sp.And) else any
        return lambda xs: combine(p(xs) for p in parts)
    if isinstance(c, sp.Not):
        inner = _cond(c.args[0], args)
        return lambda xs: not inner(xs)
    if isinstance(c, sp.core.relational.Relational):
        lhs, rhs, op = mp_compile(c.lhs, args), mp_compile(c.rhs, args), c.rel_op
        ops = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
               ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
        cmp = ops[op]
        return lambda xs: bool(cmp(lhs(xs), rhs(xs)))
    raise TypeError(f"accuracy: cannot evaluate the condition {c} with mpmath")


def mp_compile(e: sp.Expr, args: Sequence[sp.Symbol]) -> MpFn:
    """``fn(xs) -> mpf``: ``e`` evaluated by mpmath at the current working precision."""
    if isinstance(e, sp.Symbol):
        if e not in args:
            raise ValueError(f"accuracy: symbol {e} is not one of the arguments {list(args)}")
        j = list(args).index(e)
        return lambda xs: xs[j]
    if isinstance(e, sp.Integer):
        v = int(e)
        return lambda xs: mpmath.mpf(v)
    if isinstance(e, sp.Rational):
        p, q = int(e.p), int(e.q)
        return lambda xs: mpmath.mpf(p) / q
    if isinstance(e, sp.Float):
        v = mpmath.mpf(e._mpf_)
        return lambda xs: v
    if e is sp.pi:
        return lambda xs: +mpmath.pi
    if e is sp.E:
        return lambda xs: +mpmath.e
    if e in (sp.oo, -sp.oo, sp.zoo, sp.nan):
        v = mpmath.mpf("inf") if e is sp.oo else mpmath.mpf("-inf") if e == -sp.oo else _NAN
        return lambda xs: v
    if isinstance(e, sp.Piecewise):
        branches = [(mp_compile(b, args), _cond(c, args)) for b, c in e.args]

        def piecewise(xs: Sequence[Any]) -> Any:
            for value, cond in branches:
                if cond(xs):
                    return value(xs)
            return _NAN
        return piecewise
    parts = [mp_compile(a, args) for a in e.args]
    if isinstance(e, sp.Add):
        def add(xs: Sequence[Any]) -> Any:
            vals = [p(xs) for p in parts]
            return _NAN if any(mpmath.isnan(v) for v in vals) else _real(_checked_sum(vals))
        return add
    if isinstance(e, sp.Mul):
        def mul(xs: Sequence[Any]) -> Any:
            vals = [p(xs) for p in parts]
            return _NAN if any(mpmath.isnan(v) for v in vals) else _real(mpmath.fprod(vals))
        return mul
    if isinstance(e, sp.Pow):
        base, ex = parts
        if e.exp == sp.Rational(1, 2):
            sq = _safe(mpmath.sqrt)
            return lambda xs: sq(base(xs))
        pw = _safe(_pow)
        return lambda xs: pw(base(xs), ex(xs))
    fn = MPMATH_FUNCTIONS.get(e.func)
    if fn is None:
        fn = getattr(e.func, "mpmath_eval", None) or getattr(mpmath, e.func.__name__.lower(), None)
    if fn is None:
        raise TypeError(f"accuracy: no mpmath counterpart for {e.func.__name__}")
    call = _safe(fn)
    if len(parts) == 1:
        (p0,) = parts
        return lambda xs: call(p0(xs))
    return lambda xs: call(*(p(xs) for p in parts))


def _to_double(v: Any) -> float:
    if mpmath.isnan(v):
        return math.nan
    return float(v)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _extra_bits(xs: Sequence[float]) -> int:
    """Bits a small input needs: cancellation at x = 2^-k loses up to ~2k bits (1 - cos x)."""
    k = max((max(0, -math.frexp(x)[1]) for x in xs if x != 0 and math.isfinite(x)), default=0)
    return 2 * k


def _eval_adaptive(fn: MpFn, xs: Sequence[float], max_prec: int = _MAX_PREC) -> float:
    """The double nearest ``fn(xs)``: precision doubled until two evaluations agree (or ``max_prec``)."""
    prec = min(80 + _extra_bits(xs), max_prec // 2)
    prev: float | None = None
    while True:
        _checks[0] = prec < max_prec
        try:
            with mpmath.workprec(prec):
                v = _to_double(fn([mpmath.mpf(x) for x in xs]))
        except _NeedMore as more:
            prev, prec = None, min(max(2 * prec, more.bits), max_prec)
            continue
        finally:
            _checks[0] = True
        if prev is not None and _same(v, prev):
            return v
        if prec >= max_prec:  # not settled: the last value, or none under a budget's lower cap
            return v if max_prec >= _MAX_PREC else math.nan
        prev, prec = v, min(2 * prec, max_prec)


def _limit(fn: MpFn, xs: Sequence[float]) -> float:
    """The value at a removable singularity: approached from both sides, both must agree
    (or only one side is in the domain)."""
    sides = []
    _checks[0] = False
    for s in (1, -1):
        # 2^-2000 away: far enough below any double that an O(eps) remainder rounds away
        with mpmath.workprec(6200 + _extra_bits(xs)):
            eps = mpmath.mpf(2) ** -2000
            moved = [mpmath.mpf(x) + s * eps * max(abs(mpmath.mpf(x)), 1) for x in xs]
            sides.append(_to_double(fn(moved)))
    _checks[0] = True
    defined = [v for v in sides if not math.isnan(v)]
    if len(defined) == 1:  # at the domain's edge (x·log(x) at 0): the limit from inside
        return defined[0]
    return sides[0] if _same(sides[0], sides[1]) else math.nan


def truth(expr: sp.Expr, args: Sequence[sp.Symbol], points: Sequence[np.ndarray],
          deadline: float | None = None) -> np.ndarray:
    """The correctly rounded float64 value of ``expr`` at each point (NaN where undefined).

    Where the expression has no value at a point but the same value on both sides
    (0/0 of ``x/(exp(x)-1)`` at 0, ``x*log(x)`` at 0) that limit is the truth.
    ``deadline`` (a :func:`time.monotonic` value): points are evaluated in a shuffled
    (fixed) order, and those not reached by then are left NaN, i.e. not measured — a
    time budget that still leaves a sample spread over the whole domain. With a deadline
    the working precision also stops at :data:`BUDGET_PREC` bits and removable
    singularities get no limit (mpmath's Bessel functions at thousands of bits took
    seconds per point): a point whose value has not settled by then is not measured.
    """
    fn = mp_compile(sp.sympify(expr), args)
    cols = [np.broadcast_to(np.asarray(p, dtype=np.float64), np.shape(points[0])).ravel() for p in points]
    out = np.full(cols[0].size if cols else 1, np.nan)
    order = np.random.default_rng(0).permutation(out.size) if deadline is not None else range(out.size)
    for i in order:
        if deadline is not None and time.monotonic() > deadline:
            break
        xs = [float(c[i]) for c in cols]
        if deadline is not None:
            out[i] = _eval_adaptive(fn, xs, BUDGET_PREC)
            continue
        v = _eval_adaptive(fn, xs)
        if math.isnan(v) and all(math.isfinite(x) for x in xs):
            v = _limit(fn, xs)
        out[i] = v
    return out.reshape(np.shape(points[0])) if cols else out


# --------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------
def _log_uniform(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    mag = np.exp2(rng.uniform(lo, hi, n))
    return np.where(rng.random(n) < 0.5, -mag, mag)


def _scan_points(expr: sp.Expr, args: Sequence[sp.Symbol], base: Sequence[float]) -> list[np.ndarray]:
    """Points near where a sum inside ``expr`` cancels, scanned along each argument.

    For each sum (``Add``) and each argument it depends on, the sum and its largest
    term are evaluated on a grid of ±2^-30 .. 2^10 (other arguments held at ``base``);
    where the sum changes sign, or its magnitude has a local minimum far below its
    largest term, the spot is refined by bisection and points at relative distances
    2^-8 .. 2^-48 on both sides are returned.
    """
    found: list[np.ndarray] = []
    grid = np.concatenate([-np.logspace(10, -30, 400, base=2.0), np.logspace(-30, 10, 400, base=2.0)])
    adds = [a for a in sp.preorder_traversal(expr) if isinstance(a, sp.Add) and a.free_symbols][:12]
    for add in adds:
        for j, a in enumerate(args):
            if a not in add.free_symbols:
                continue
            others = {b: base[k] for k, b in enumerate(args) if k != j}
            sub = add.xreplace({b: sp.Float(v) for b, v in others.items()})
            try:
                f = sp.lambdify([a], sub, "numpy")
                terms = [sp.lambdify([a], t, "numpy") for t in sp.Add.make_args(sub)]
                with np.errstate(all="ignore"):
                    val = np.broadcast_to(np.asarray(f(grid), dtype=float), grid.shape)
                    big = np.max([np.abs(np.broadcast_to(np.asarray(t(grid), dtype=float), grid.shape))
                                  for t in terms], axis=0)
            except Exception:  # noqa: BLE001 - a sum numpy cannot evaluate has no scan points
                continue
            spots = []
            ok = np.isfinite(val)
            change = np.nonzero(ok[:-1] & ok[1:] & (np.sign(val[:-1]) * np.sign(val[1:]) < 0))[0]
            for i in change[:8]:
                lo, hi = grid[i], grid[i + 1]
                flo = np.sign(val[i])
                for _ in range(80):
                    mid = 0.5 * (lo + hi)
                    with np.errstate(all="ignore"):
                        fm = float(np.asarray(f(np.array([mid])), dtype=float).ravel()[0])
                    if not math.isfinite(fm) or mid in (lo, hi):
                        break
                    lo, hi = (mid, hi) if np.sign(fm) == flo else (lo, mid)
                spots.append(0.5 * (lo + hi))
            with np.errstate(all="ignore"):
                ratio = np.abs(val) / np.where(big > 0, big, 1)
            minima = np.nonzero(ok[1:-1] & (ratio[1:-1] < 1e-3) & (ratio[1:-1] <= ratio[:-2])
                                & (ratio[1:-1] <= ratio[2:]))[0] + 1
            spots += [float(grid[i]) for i in minima[:8]]
            for s in spots:
                if s == 0 or not math.isfinite(s):
                    continue
                near = s * (1 + np.concatenate([np.exp2(-np.arange(8, 49, 4.0)), -np.exp2(-np.arange(8, 49, 4.0))]))
                pts = [np.full(near.shape, base[k]) for k in range(len(args))]
                pts[j] = near
                found.append(np.stack(pts))
    return found


def has_special(e: "sp.Expr | Sequence[sp.Expr]") -> bool:
    """Whether ``e`` has a special function (Bessel, gamma, erf, ...; not Heaviside or DiracDelta).

    Such expressions are measured on a bounded domain (:data:`SPECIAL_MAX_LOG2`) with fewer
    points: mpmath's Bessel functions at arguments near 1e308 take minutes per point.
    """
    exprs = [e] if isinstance(e, sp.Basic) else list(e)
    return any(type(f).__module__.startswith("sympy.functions.special")
               and not type(f).__module__.endswith("delta_functions")
               for x in exprs for f in sp.sympify(x).atoms(sp.Function))


#: expressions with special functions are sampled with |x| ≤ 2^SPECIAL_MAX_LOG2 (= 64), at most
#: SPECIAL_POINTS points (README, "Accuracy by measurement": the limits)
SPECIAL_MAX_LOG2 = 6.0
SPECIAL_POINTS = 120


def sample(expr: "sp.Expr | Sequence[sp.Expr]", args: Sequence[sp.Symbol], n: int = 400, seed: int = 0,
           max_log2: float = 1023.9) -> tuple[np.ndarray, ...]:
    """About ``n`` points (one array per argument) spread over ``expr``'s domain, deterministic per seed.

    A third log-uniform over every double magnitude (2^-1074 .. 2^1024), a third
    log-uniform over moderate ones (2^-40 .. 2^12), the rest special values (0, ±1,
    small integers, points near cancellations); with two or more arguments also pairs
    that nearly cancel (y = ±x(1 + 2^-k)). ``max_log2`` bounds every magnitude
    (special functions: :data:`SPECIAL_MAX_LOG2`).
    """
    rng = np.random.default_rng(seed)
    k = len(args)
    wide = [_log_uniform(rng, n // 3, -1074, max_log2) for _ in range(k)]
    moderate = [_log_uniform(rng, n // 3, -40, min(12.0, max_log2)) for _ in range(k)]
    special = np.array([0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 3.0, -3.0, 10.0, -10.0, 30.0, -30.0, 700.0,
                        -700.0, 710.0, -710.0, 745.0, -745.0, 5e-324, -5e-324, TINY, -TINY])
    cols = [np.concatenate([w, m]) for w, m in zip(wide, moderate)]
    if k == 1:
        cols[0] = np.concatenate([cols[0], special])
    else:
        grid = [rng.choice(special, len(special) * 2) for _ in range(k)]
        cols = [np.concatenate([c, g]) for c, g in zip(cols, grid)]
        x = _log_uniform(rng, max(n // 6, 8), -30, 10)
        rel = np.exp2(-rng.integers(1, 52, x.size)) * np.where(rng.random(x.size) < 0.5, -1, 1)
        for i in range(k):
            for j2 in range(i + 1, k):
                pair = [_log_uniform(rng, x.size, -20, 10) for _ in range(k)]
                pair[i] = x
                pair[j2] = x * (1 + rel) * np.where(rng.random(x.size) < 0.5, -1, 1)
                cols = [np.concatenate([c, p]) for c, p in zip(cols, pair)]
    base = [1.5 + 0.25 * j for j in range(k)]
    exprs = [expr] if isinstance(expr, sp.Basic) else list(expr)
    for block in (b for e in exprs for b in _scan_points(sp.sympify(e), args, base)):
        cols = [np.concatenate([c, b]) for c, b in zip(cols, block)]
    out = tuple(np.asarray(c, dtype=np.float64) for c in cols)
    if max_log2 < 1023.9:
        keep = np.all([np.abs(c) <= 2.0**max_log2 for c in out], axis=0)
        out = tuple(c[keep] for c in out)
    return out


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------
def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How many doubles lie between a and b (±0 count as one), exactly where it matters (small)."""
    def ordinal(v: np.ndarray) -> np.ndarray:
        i = np.ascontiguousarray(v, dtype=np.float64).view(np.int64)
        mag = i & np.int64(0x7FFFFFFFFFFFFFFF)
        return np.where(i < 0, -mag, mag)
    oa, ob = ordinal(a), ordinal(b)
    same = (oa >= 0) == (ob >= 0)  # same sign: the int64 difference cannot overflow
    near = np.abs(np.where(same, oa - ob, 0)).astype(np.float64)
    far = np.abs(oa).astype(np.float64) + np.abs(ob).astype(np.float64)
    return np.where(same, near, far)


@dataclass(frozen=True)
class Error:
    """How far a kernel is from the truth on a set of points."""

    mean_bits: float    # Herbie's average bits of error (0: correctly rounded everywhere)
    max_bits: float
    worst_rel: float    # worst relative error where the truth is a normal double
    worst_at: tuple[float, ...]  # the point of the worst relative error (or of the first failure)
    failures: int       # NaN, ±inf or 0 where the truth is finite and nonzero (inputs not subnormal)
    points: int         # points where the truth is defined
    beyond: float = 0.0  # worst relative error beyond what conditioning explains (inputs not subnormal)

    def better_than(self, other: "Error", slack: float = 0.05) -> bool:
        """Measurably better: fewer failures, or as many and ``slack`` bits less on average."""
        if self.failures != other.failures:
            return self.failures < other.failures
        return self.mean_bits < other.mean_bits - slack

    def ok(self, rtol: float = 1e-13) -> bool:
        """No failures, and relative error at most ``rtol`` beyond ``4·κ·eps`` (κ: the truth's
        condition number, when :func:`error` was given it; else plainly at most ``rtol``)."""
        return self.failures == 0 and self.beyond <= rtol


def error(approx: Any, exact: np.ndarray, points: Sequence[np.ndarray] = (), cond: Any = None) -> Error:
    """Score ``approx`` against the rounded truth ``exact`` (points only name the worst one).

    ``cond``: the truth's condition number κ at each point (|x·f'(x)/f(x)|, summed over
    arguments). Where κ is large (log(x) + 1 near x = 1/e) no double-precision kernel can
    be better than about κ·eps, since its first rounding already moves the answer that much;
    ``beyond`` is the worst relative error in excess of ``4·κ·eps``.
    """
    exact = np.asarray(exact, dtype=np.float64).ravel()
    approx = np.broadcast_to(np.asarray(approx, dtype=np.float64), exact.shape).ravel() if np.ndim(approx) \
        else np.full(exact.shape, float(approx))
    defined = ~np.isnan(exact)
    ex, ap = exact[defined], approx[defined]
    with np.errstate(all="ignore"):
        bits = np.log2(1 + _ulps(ap, ex))
    bits = np.where(np.isnan(ap), 64.0, np.minimum(bits, 64.0))
    normal = np.isfinite(ex) & (np.abs(ex) >= TINY)
    with np.errstate(all="ignore"):
        rel = np.where(normal, np.abs(ap - ex) / np.where(normal, np.abs(ex), 1), 0.0)
    rel = np.where(normal & ~np.isfinite(ap), np.inf, rel)
    slack = 0.0
    if cond is not None:
        kappa = np.broadcast_to(np.asarray(cond, dtype=np.float64), exact.shape).ravel()[defined]
        slack = 4 * np.where(np.isfinite(kappa), kappa, np.inf) * np.finfo(np.float64).eps
    with np.errstate(invalid="ignore"):
        excess = np.where(rel > slack, rel - slack, 0.0)
    fail = np.isfinite(ex) & (ex != 0) & (~np.isfinite(ap) | (ap == 0))
    if len(points):
        # subnormal inputs are outside the guarantee: x/2 or x² of one has no digits left to keep
        sub = np.zeros(exact.shape, dtype=bool)
        for p in points:
            a = np.abs(np.broadcast_to(np.asarray(p, dtype=np.float64), exact.shape).ravel())
            sub |= (a > 0) & (a < TINY)
        fail &= ~sub[defined]
        excess = np.where(sub[defined], 0.0, excess)
    idx = np.nonzero(defined)[0]
    at: tuple[float, ...] = ()
    if idx.size:
        worst = int(np.argmax(fail)) if fail.any() else int(np.argmax(excess))
        at = tuple(float(np.ravel(p)[idx[worst]]) for p in points) if len(points) else ()
    return Error(mean_bits=float(bits.mean()) if bits.size else 0.0, max_bits=float(bits.max(initial=0.0)),
                 worst_rel=float(rel.max(initial=0.0)), worst_at=at, failures=int(fail.sum()),
                 points=int(defined.sum()), beyond=float(excess.max(initial=0.0)))
