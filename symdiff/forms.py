"""Measured choice of the form a declared op runs in (forward and every derivative).

Candidates for each expression: as written; stabilised (:func:`stabilise`, today's
pipeline); each catalogue rule (:data:`symdiff.stable.RULES`) alone on top of that;
all of them together; for a derivative also its output forms (the forward expression
replaced by ``out`` wherever it occurs); and, for one-argument expressions that still
lose bits near 0, a Taylor fallback. Each is lambdified as the engine would run it and
measured against mpmath (:mod:`symdiff.accuracy`). The choice: among the candidates
not measurably worse than the best (:meth:`Error.better_than`), the cheapest; since
the expression as written is a candidate, the choice is never measurably worse than it.

Cost: nothing is measured when all candidates are the same expression. Otherwise the
choice is cached by expression, in process and on disk (``forms-v1.json`` in the
kernel cache folder, :func:`symdiff.native.cache_dir`), as candidate *labels* only
(the candidates are rebuilt from the expression, never read back as code).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import sympy as sp

from . import accuracy
from .stable import RULES, Taylor, apply_rules, drop_dirac, taylor_fallback

#: bump when candidates or their labels change: old cached choices are then ignored
VERSION = "6"
#: points measured per expression at declaration (the tests and ``ops --accuracy`` use more)
DECLARE_POINTS = 240
#: points for a gradient graph's derivative op (one is declared per op and order; its forward is already
#: a measured choice, so only its derivatives are measured) and the time budget of each truth there and
#: for special functions (:func:`symdiff.accuracy.truth`: points not reached are not measured)
DERIVATIVE_POINTS = 120
TRUTH_SECONDS = 1.5
#: radii the Taylor fallback tries
TAYLOR_RADII = (2.0**-3, 2.0**-5, 2.0**-8, 2.0**-12)

Evaluate = Callable[[sp.Expr, Sequence[np.ndarray]], np.ndarray]


@dataclass
class Choice:
    """What was chosen for one expression, and (when measured now) how each candidate did."""

    label: str
    expr: sp.Expr
    errors: dict[str, accuracy.Error] = field(default_factory=dict)


def cost(e: sp.Expr) -> int:
    """Rough cost of evaluating ``e``: transcendental calls dominate (10 each), then arithmetic."""
    n = 0
    for node in sp.preorder_traversal(e):
        if isinstance(node, Taylor):
            n += 5
        elif isinstance(node, (sp.Max, sp.Min, sp.Abs, sp.sign, sp.Heaviside, sp.Piecewise)):
            n += 1
        elif isinstance(node, sp.Function):
            n += 1 if type(node).__name__ in ("Relu", "Step") else 10
        elif isinstance(node, (sp.Add, sp.Mul)):
            n += len(node.args) - 1
        elif isinstance(node, sp.Pow):
            n += 1 if node.exp.is_Integer and abs(node.exp) <= 3 else 10
    return n


# --------------------------------------------------------------------------------------
# Cache (labels only)
# --------------------------------------------------------------------------------------
_lock = threading.Lock()
_memory: dict[str, dict[str, str]] = {}
_disk: dict[str, Any] = {"loaded": False, "entries": {}}


def _path() -> str:
    from .native import cache_dir

    return os.path.join(str(cache_dir()), f"forms-v{VERSION}.json")


def cache_key(declared: sp.Expr, args: Sequence[sp.Symbol], kind: str = "") -> str:
    """Stable across processes: the expression with its arguments renamed a0, a1, ... (Dummy-free);
    ``kind`` keeps a derivative op's choice (forward given) apart from a defop of the same expression."""
    named = declared.xreplace({a: sp.Symbol(f"a{j}", real=True) for j, a in enumerate(args)})
    return hashlib.sha256(f"{VERSION}|{kind}|{len(args)}|{sp.srepr(named)}".encode()).hexdigest()[:24]


def _cached(key: str) -> dict[str, str] | None:
    if key in _memory:
        return _memory[key]
    with _lock:
        if not _disk["loaded"]:
            _disk["loaded"] = True
            try:
                with open(_path(), encoding="utf-8") as fh:
                    data = json.load(fh)
                if isinstance(data, dict):
                    _disk["entries"] = {k: v for k, v in data.items()
                                        if isinstance(v, dict) and all(isinstance(s, str) for s in v.values())}
            except (OSError, ValueError):
                pass
        return _disk["entries"].get(key)


def _store(key: str, labels: dict[str, str]) -> None:
    _memory[key] = labels
    with _lock:
        _disk["entries"][key] = labels
        try:
            path = _path()
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            try:  # merge with what other processes wrote meanwhile
                with open(path, encoding="utf-8") as fh:
                    on_disk = json.load(fh)
                if isinstance(on_disk, dict):
                    _disk["entries"] = {**on_disk, **_disk["entries"]}
            except (OSError, ValueError):
                pass
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".forms.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(_disk["entries"], fh)
                os.replace(tmp, path)
            except OSError:
                os.unlink(tmp)  # a full disk: leave no half-written file behind
                raise
        except OSError:
            pass  # no writable cache: the choice is made again next run, nothing else changes


def clear_memory() -> None:
    """Forget in-process choices (tests: force a fresh measurement or a disk read)."""
    _memory.clear()
    _disk["loaded"] = False
    _disk["entries"] = {}


# --------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------
Thunk = Callable[[], "sp.Expr | None"]


def rule_candidates(stable: sp.Expr) -> list[tuple[str, Thunk]]:
    """``stabilised``, each rule that changes it, and all rules together (labels are stable names)."""
    out: list[tuple[str, Thunk]] = [("stabilised", lambda: stable)]
    for rule in RULES:
        out.append((f"rule:{rule.name}", lambda rule=rule: apply_rules(stable, (rule,))))
    out.append(("all rules", lambda: apply_rules(stable, RULES)))
    # common factors pulled out first: σ(-u)²σ(u) - σ(-u)σ(u)² is σ(u)σ(-u)(σ(-u) - σ(u)), a rule's pattern
    out.append(("factored", lambda: apply_rules(sp.factor_terms(apply_rules(stable, RULES)), RULES)))
    return out


def _distinct(cands: list[tuple[str, Thunk]]) -> list[tuple[str, sp.Expr]]:
    seen: dict[sp.Expr, str] = {}
    out = []
    for label, thunk in cands:
        e = thunk()
        if e is not None and e not in seen:
            seen[e] = label
            out.append((label, e))
    return out


def _needs_taylor(err: accuracy.Error, got: np.ndarray, exact: np.ndarray, x: np.ndarray) -> bool:
    """Whether the best candidate still loses bits at small |x| (where a series would help)."""
    small = (np.abs(x) < 2.0**-3) & ~np.isnan(exact)
    if not small.any():
        return False
    with np.errstate(all="ignore"):
        bad = ~np.isfinite(got[small]) | (np.abs(got[small] - exact[small]) > 1e-14 * np.abs(exact[small]))
    return bool(bad.any()) and err.mean_bits > 0


def pick(truth: sp.Expr, args: Sequence[sp.Symbol], cands: list[tuple[str, sp.Expr]], evaluate: Evaluate,
         points: Sequence[np.ndarray], exact: np.ndarray, *, taylor_of: sp.Expr | None = None) -> Choice:
    """Measure the candidates and keep the cheapest one not measurably worse than the best."""
    scored: list[tuple[str, sp.Expr, accuracy.Error, np.ndarray]] = []
    for label, e in cands:
        try:
            got = evaluate(e, points)
        except Exception:  # noqa: BLE001 - numpy cannot run it (DiracDelta of a raw derivative): no candidate
            continue
        scored.append((label, e, accuracy.error(got, exact, points), got))
    if not scored:  # numpy can run none of them: keep the first, the smoke test will say why
        return Choice(cands[0][0], cands[0][1])
    best = _best(scored)
    if taylor_of is not None and len(args) == 1 and _needs_taylor(best[2], best[3], exact, points[0]):
        base_label, base = best[0], best[1]
        for r in TAYLOR_RADII:
            t = taylor_fallback(base, taylor_of, args[0], r)
            if t is None:
                continue
            got = evaluate(t, points)
            scored.append((f"taylor:{r!r}|{base_label}", t, accuracy.error(got, exact, points), got))
        best = _best(scored)
    return Choice(best[0], best[1], {label: err for label, _, err, _ in scored})


def _best(scored: list[Any]) -> Any:
    top = min(scored, key=lambda s: (s[2].failures, s[2].mean_bits))
    fine = [s for s in scored if not top[2].better_than(s[2])]
    # the expression as written only when it is measurably better than every other form: the stabilised
    # forms also keep promises a sample cannot show (no overflow warnings, relu'(0) = 0)
    fine = [s for s in fine if s[0] != "as written"] or fine
    return min(fine, key=lambda s: cost(s[1]))  # the cheapest; on equal cost the earliest


def rebuild(label: str, cands: list[tuple[str, Thunk]], taylor_of: sp.Expr | None,
            args: Sequence[sp.Symbol]) -> sp.Expr | None:
    """The candidate a cached label names, built alone (None if it no longer exists: measure again)."""
    by_label = dict(cands)
    if label in by_label:
        return by_label[label]()
    if label.startswith("taylor:") and taylor_of is not None and len(args) == 1:
        head, _, base_label = label.partition("|")
        base = by_label[base_label]() if base_label in by_label else None
        try:
            r = float(head[len("taylor:"):])
        except ValueError:
            return None
        if base is not None and r in TAYLOR_RADII:
            return taylor_fallback(base, taylor_of, args[0], r)
    return None


# --------------------------------------------------------------------------------------
# The declaration step
# --------------------------------------------------------------------------------------
@dataclass
class Forms:
    """The forms an op runs in: forward, each derivative (input form) and each backward (``delta * …``)."""

    forward: sp.Expr
    derivatives: tuple[sp.Expr, ...]
    backward: tuple[sp.Expr, ...]
    output_form: tuple[bool, ...]
    labels: tuple[str, ...]        # chosen candidate: forward, then each derivative
    measured: bool                 # measured now (False: one candidate only, or a cached choice)
    errors: tuple[dict[str, accuracy.Error], ...] = ()


def _numpy_evaluator(lambdify: Callable[[Sequence[sp.Symbol], sp.Expr], Callable[..., Any]],
                     params: Sequence[sp.Symbol], fixed: Sequence[Any] = ()) -> Evaluate:
    def evaluate(e: sp.Expr, points: Sequence[np.ndarray]) -> np.ndarray:
        fn = lambdify(params, e)
        with np.errstate(all="ignore"):
            got = fn(*fixed, *points)
        return np.broadcast_to(np.asarray(got, dtype=np.float64), np.shape(points[0]))
    return evaluate


def choose_forms(expr: sp.Expr, args: Sequence[sp.Symbol], *, stabilise: Callable[[sp.Expr], sp.Expr],
                 lambdify: Callable[[Sequence[sp.Symbol], sp.Expr], Callable[..., Any]],
                 delta: sp.Symbol, out: sp.Symbol, points: int = DECLARE_POINTS,
                 refine: Callable[[sp.Expr], sp.Expr] | None = None, nondiff: Sequence[sp.Symbol] = (),
                 measure: bool = True, given_forward: bool = False) -> Forms:
    """The forward and derivative forms with the least measured error (see the module docstring).

    ``given_forward``: the forward expression is already a measured choice (a gradient
    graph's derivative op: the derivative an op chose), so it runs stabilised as given and
    only its derivatives are chosen, on :data:`DERIVATIVE_POINTS` points with a time
    budget (:data:`TRUTH_SECONDS` per truth). Expressions with special functions are
    measured on a bounded domain (:func:`symdiff.accuracy.has_special`) with that budget.

    ``measure=False`` measures nothing (no mpmath, no cache): the stabilised forms, each
    derivative in output form where that adds ``out`` to nothing (exp' = out) — for a
    caller that must not spend mpmath time at all.

    ``lambdify(params, expr)`` must build the numpy kernel exactly as the engine will,
    so what is measured is what runs. ``refine`` turns a raw derivative into the base
    candidate (default ``stabilise``; :func:`symdiff.stable.refine` also rewrites the
    sums that cancel, σ' = σσ̄, for every order of derivative).
    """
    refine = refine or stabilise
    args = tuple(args)
    if not measure:
        return _unmeasured(expr, args, stabilise(expr), refine, nondiff, delta, out)
    key = cache_key(expr, args, "derivative op" if given_forward else "")
    cached = _cached(key)
    stable = stabilise(expr)
    fwd_thunks = [("given", lambda: stable)] if given_forward else [*rule_candidates(stable), ("as written", lambda: expr)]
    need_measure = cached is None
    fwd = None
    if cached is not None:  # a cached choice builds only the candidate it names: start-up stays fast
        fwd = rebuild(cached.get("forward", ""), fwd_thunks, expr, args)
        need_measure = fwd is None
    truths = [sp.S.Zero if a in nondiff else sp.diff(expr, a) for a in args]
    special = accuracy.has_special([expr, *truths])
    budgeted = given_forward or special
    sampled: dict[Any, Any] = {}

    def measurement() -> tuple[np.ndarray, ...]:
        if "points" not in sampled:
            n = min(points, DERIVATIVE_POINTS) if given_forward else points
            if special:  # mpmath's Bessel, gamma, ... near 1e308 take minutes: a bounded domain, fewer points
                n = min(n, accuracy.SPECIAL_POINTS)
            sampled["points"] = accuracy.sample([expr, *truths], args, n=n,
                                                max_log2=accuracy.SPECIAL_MAX_LOG2 if special else 1023.9)
        return sampled["points"]

    def exact(i: int) -> np.ndarray:
        """The truth of the forward (0) or of derivative i - 1 on the sampled points."""
        if i not in sampled:
            deadline = time.monotonic() + TRUTH_SECONDS if budgeted else None
            sampled[i] = accuracy.truth([expr, *truths][i], args, measurement(), deadline=deadline)
        return sampled[i]

    def measurable(e: sp.Expr) -> bool:
        try:  # a function mpmath has no counterpart for: nothing to measure against, keep the default
            accuracy.mp_compile(e, args)
            return True
        except (TypeError, ValueError):
            return False

    labels, errors = [], []
    measured = False
    if fwd is None:
        fwd_cands = _distinct(fwd_thunks)
        if (len(fwd_cands) == 1 and (given_forward or not _may_cancel(expr, args))) or not measurable(expr):
            choice = Choice(fwd_cands[0][0], fwd_cands[0][1])
        else:
            pts = measurement()
            choice = pick(expr, args, fwd_cands, _numpy_evaluator(lambdify, args), pts, exact(0), taylor_of=expr)
            measured = True
        fwd, flabel, ferr = choice.expr, choice.label, choice.errors
    else:
        flabel, ferr = cached["forward"], {}
    labels.append(flabel)
    errors.append(ferr)

    derivs, backward, output_form = [], [], []
    for j, a in enumerate(args):
        if a in nondiff:  # declared not differentiable (an order, a static argument): 0, nothing to choose
            labels.append("nondiff")
            errors.append({})
            derivs.append(sp.S.Zero)
            backward.append(delta * sp.S.Zero)
            output_form.append(False)
            continue
        base = refine(drop_dirac(sp.diff(fwd, a)))
        inner = rule_candidates(base)
        with_out: list[tuple[str, Thunk]] = []
        for label, thunk in inner:
            with_out.append((label, thunk))
            if fwd not in args:
                with_out.append((f"{label}|out", lambda thunk=thunk: _out_form(thunk(), fwd, out)))
        thunks = [*with_out, ("as written", lambda j=j: truths[j])]
        d = None
        if cached is not None and not need_measure:
            d = rebuild(cached.get(f"d{j}", ""), thunks, truths[j], args)
        if d is not None:
            label, derr = cached[f"d{j}"], {}
        else:
            cands = _distinct(thunks)
            # a derivative op gets no new Taylor series (SymPy's series of a third derivative took
            # minutes); its forward's own Taylor branch, if chosen, is differentiated branch by branch
            if (len(cands) == 1 and (given_forward or not _may_cancel(truths[j], args))) or not measurable(truths[j]):
                label, d, derr = cands[0][0], cands[0][1], {}
            else:
                pts = measurement()
                fwd_values = _numpy_evaluator(lambdify, args)(fwd, pts)
                ev = _numpy_evaluator(lambdify, (delta, out, *args), (1.0, fwd_values))
                ch = pick(truths[j], args, cands, ev, pts, exact(1 + j), taylor_of=None if given_forward else truths[j])
                label, d, derr = ch.label, ch.expr, ch.errors
                measured = True
        labels.append(label)
        errors.append(derr)
        derivs.append(d.xreplace({out: fwd}) if out in d.free_symbols else d)
        backward.append(delta * d)
        output_form.append(out in d.free_symbols)
    if measured or cached is None or need_measure:
        _store(key, {"forward": labels[0], **{f"d{j}": lab for j, lab in enumerate(labels[1:])}})
    return Forms(fwd, tuple(derivs), tuple(backward), tuple(output_form), tuple(labels), measured, tuple(errors))


def _unmeasured(expr: sp.Expr, args: tuple[sp.Symbol, ...], fwd: sp.Expr, refine: Callable[[sp.Expr], sp.Expr],
                nondiff: Sequence[sp.Symbol], delta: sp.Symbol, out: sp.Symbol) -> Forms:
    """The forms without measuring: stabilised, output form only where it cancels nothing."""
    derivs, backward, output_form, labels = [], [], [], ["stabilised"]
    for a in args:
        d = sp.S.Zero if a in nondiff else refine(drop_dirac(sp.diff(fwd, a)))
        in_out = _out_form(d, fwd, out) if fwd not in args and a not in nondiff else None
        use_out = (in_out is not None and not (in_out.free_symbols & set(args))
                   and not any(out in t.free_symbols for t in in_out.atoms(sp.Add)))
        derivs.append(d)
        backward.append(delta * (in_out if use_out else d))
        output_form.append(use_out)
        labels.append("nondiff" if a in nondiff else "stabilised|out" if use_out else "stabilised")
    return Forms(fwd, tuple(derivs), tuple(backward), tuple(output_form), tuple(labels), False,
                 tuple({} for _ in labels))


def _may_cancel(e: sp.Expr, args: Sequence[sp.Symbol]) -> bool:
    """Whether a one-argument expression has a sum of two terms that both depend on the argument
    (sin(x) - x): a removable cancellation a Taylor fallback might fix, worth measuring."""
    if len(args) != 1:
        return False
    return any(isinstance(a, sp.Add) and sum(1 for t in a.args if t.has(args[0])) >= 2
               for a in sp.preorder_traversal(e))


def _out_form(e: sp.Expr | None, fwd: sp.Expr, out: sp.Symbol) -> sp.Expr | None:
    """``e`` with the forward expression replaced by ``out`` (None when it does not occur)."""
    if e is None:
        return None
    r = e.subs(fwd, out)
    return r if r != e else None
