"""Partial derivatives as ops: every order of an elementwise op derived by SymPy.

``partial(op, j)`` is the op computing ∂op/∂arg_j, declared through the same
pipeline as any op (:func:`symdiff.declare.declare`: stabilised, lambdified,
compiled when fused); its forward is the op's measured derivative, given, and its
own derivatives — the next order — are chosen by measurement (:mod:`symdiff.forms`,
cached by expression), so differentiating it again asks SymPy again and measures
again: the k-th derivative is ``partial`` applied k times. Ops are
cached by their expression, so repeated ``grad`` calls declare nothing new and
a derivative that *is* an op already (exp' = exp) reuses it.

Before declaring, :func:`refine` removes the cancellations SymPy's raw
derivatives carry (see ``/work/shared/notes`` and JAX #40385): ``1 - σ(u)``
becomes ``σ(-u)``, ``σ(u) - σ(-u)`` becomes ``tanh(u/2)`` (accurate at u ≈ 1e-8,
where the difference of two values near 1/2 keeps 8 digits), and
``1 - tanh(u)²`` becomes ``4σ(2u)σ(-2u)`` (nonzero out to |u| ≈ 350, where
``1 - tanh²`` is 0 from |u| ≈ 19). This is a SymPy-side module.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import sympy as sp

from .errors import DerivativeError
from .registry import OPS, Op, register
from .declare import declare
from .stable import refine


# --------------------------------------------------------------------------------------
# elementwise expressions as ops, cached by expression
# --------------------------------------------------------------------------------------
_CANON = tuple(sp.Dummy(f"a{k}", real=True) for k in range(64))
_BY_EXPR: dict[tuple[int, str], Op] = {}
_PARTIALS: dict[tuple[int, int], tuple[Op, Op | sp.Expr]] = {}  # (id(op), j) -> (op, result)


def _key(expr: sp.Expr, args: Sequence[sp.Symbol]) -> tuple[int, str]:
    return (len(args), sp.srepr(expr.xreplace(dict(zip(args, _CANON)))))


def _registered(op: Op) -> bool:
    """Whether ``op`` is (again) in the registry under its name: an op made here and later dropped
    (a test's registry reset) is registered again while its name is free."""
    if OPS.get(op.name) is op:
        return True
    if op.name not in OPS:
        register(op)
        return True
    return False


def _known(key: tuple[int, str]) -> Op | None:
    """A registered op computing exactly this expression (a declared op, or one made here)."""
    op = _BY_EXPR.get(key)
    if op is not None and _registered(op):
        return op
    for other in list(OPS.values()):  # a declared op with this expression: exp' is exp
        if other.symbolic is not None and other.arity == key[0] and _op_key(other) == key:
            _BY_EXPR[key] = other
            return other
    return None


_OP_KEYS: dict[int, tuple[Op, tuple[int, str]]] = {}


def _op_key(op: Op) -> tuple[int, str]:
    known = _OP_KEYS.get(id(op))
    if known is None or known[0] is not op:
        known = _OP_KEYS[id(op)] = (op, _key(op.symbolic.forward, op.symbolic.args))
    return known[1]


def expression_op(expr: sp.Expr, args: Sequence[sp.Symbol], name: str, nondiff: Sequence[int] = ()) -> Op:
    """The op computing ``expr`` of ``args`` elementwise: an existing one with that expression, or
    a new one declared as ``name`` (with a number appended if that name is taken)."""
    expr = refine(sp.sympify(expr))
    key = _key(expr, args)
    op = _known(key)
    if op is not None:
        return op
    base, k = name, 1
    while name in OPS:
        k += 1
        name = f"{base}_{k}"
    plain = [sp.Symbol(a.name) for a in args]
    # the forward is given (an op's measured derivative, or a gradient graph's plain algebra); the
    # op's own derivatives -- the next order -- are chosen by measurement, cached by expression
    op = register(declare(name, expr.xreplace(dict(zip(args, plain))), args=plain, nondiff=[plain[i] for i in nondiff],
                          given_forward=True,
                          doc=f"{name}({', '.join(map(str, plain))}) = {expr.xreplace(dict(zip(args, plain)))}"))
    _BY_EXPR[key] = op
    return op


def partial(op: Op, j: int) -> Op | sp.Expr:
    """∂op/∂(argument j) as an op of the same arguments, or the constant it is (a SymPy number).

    Raises :class:`DerivativeError` naming the op if SymPy's derivative cannot be
    evaluated with numpy, and ``TypeError`` for an op that has no SymPy expression.
    """
    cached = _PARTIALS.get((id(op), j))
    if cached is not None and cached[0] is op and (not isinstance(cached[1], Op) or _registered(cached[1])):
        return cached[1]
    sym = op.symbolic
    if sym is None:
        raise DerivativeError(f"op {op.name!r} was not declared with defop: it has no SymPy expression to differentiate")
    # the op's own derivative as chosen by measurement (symdiff.forms), not a fresh unmeasured one
    d = refine(sym.derivatives[j]) if j < len(sym.derivatives) else refine(sp.diff(sym.forward, sym.args[j]))
    if d.is_number:
        result: Op | sp.Expr = d
    else:
        try:
            # an argument the op does not differentiate (a Bessel order) is not differentiated in its partials
            result = expression_op(d, sym.args, f"{op.name}__d{sym.args[j].name}", op.nondifferentiable)
        except (TypeError, ValueError) as exc:
            raise DerivativeError(
                f"cannot declare the derivative of op {op.name!r} with respect to {sym.args[j].name!r}, "
                f"{d.xreplace({a: sp.Symbol(a.name) for a in sym.args})}, "
                f"as an op (each derivative op carries its own derivative, one order higher): {exc}") from exc
    _PARTIALS[(id(op), j)] = (op, result)
    return result


def elementwise_op(fn: Callable[..., Any], arity: int, name: str) -> Op:
    """The op computing ``fn(*args)`` elementwise, ``fn`` applied to SymPy symbols (so callers that
    build graphs write ``lambda p, t: -t / p`` without importing SymPy themselves)."""
    args = _CANON[:arity]
    return expression_op(fn(*args), args, name)


def scale_op(c: sp.Expr) -> Op:
    """The op ``c*x`` for a constant ``c`` (a constant derivative times a cotangent)."""
    x = _CANON[0]
    return expression_op(sp.sympify(c) * x, (x,), "scale")


def constant_like(value: int) -> Op:
    """``ones_like``/``zeros_like``: the constant ``value`` in the shape of the argument."""
    x = _CANON[0]
    return expression_op(sp.Integer(value), (x,), {1: "ones_like", 0: "zeros_like"}[value])


def identity_op() -> Op:
    x = _CANON[0]
    return expression_op(x, (x,), "identity")


def derivative_table(order: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """Each declared elementwise op's derivatives up to ``order``, as derived and stabilised.

    One entry per op: ``(op name, [(derivative, expression), ...])`` where a
    derivative reads ``d2/dx dy``. Declares the derivative ops it needs.
    """
    if order < 1:
        raise ValueError(f"order must be 1 or more, got {order}")
    rows = []
    for name, op in sorted(OPS.items()):
        sym = op.symbolic
        if sym is None or "__d" in name:  # derivative ops appear under the op they come from
            continue
        names = [a.name for a in sym.args]
        plain = {a: sp.Symbol(a.name) for a in sym.args}
        lines = []
        for k in range(1, order + 1):
            for index in itertools.combinations_with_replacement(range(op.arity), k):
                current: Op | sp.Expr = op
                for j in index:
                    current = partial(current, j) if isinstance(current, Op) else sp.S.Zero
                text = str(current) if not isinstance(current, Op) else str(current.symbolic.forward.xreplace(
                    {a: plain[b] for a, b in zip(current.symbolic.args, sym.args)}))  # positional: same arguments
                wrt = " ".join(f"d{names[j]}" for j in index)
                lines.append((f"d{k if k > 1 else ''}/{wrt}", text))
        rows.append((name, lines))
    return rows
