"""Numbers with registers: ``2 * r``, ``1 - r``, ``r / 3``, ``r ** 0.5``, ``2 ** r``.

A number beside a register is a constant of the computation, not a graph input:
it is folded into an elementwise op made on demand (``times_2``, ``rsub_1``,
``pow_0p5``), declared through the same pipeline as any op (:func:`symdiff.declare.declare`),
so SymPy derives its derivative, the fusion pass fuses it and the C printer
compiles it. Nothing is fed for it and nothing receives a gradient for it.
The ops are found by name (``symdiff.registry.INSTANCES``) but are not listed as
primitives of their own; ``symdiff ops`` shows the operators instead.

A SymPy-side module: the graph layer reaches it through ``FAMILIES["scalar"]``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import sympy as sp

from .declare import declare
from .errors import GraphError
from .registry import FAMILIES, Op, instance

_X = sp.Symbol("x")

#: kind -> (name prefix, expression of x and the constant c, how it reads)
KINDS: dict[str, tuple[str, Callable[[sp.Expr, sp.Expr], sp.Expr], str]] = {
    "add": ("plus", lambda x, c: x + c, "r + c, c + r, r - c"),
    "rsub": ("rsub", lambda x, c: c - x, "c - r"),
    "mul": ("times", lambda x, c: c * x, "c * r, r * c"),
    "div": ("over", lambda x, c: x / c, "r / c"),
    "rdiv": ("rdiv", lambda x, c: c / x, "c / r"),
    "pow": ("pow", lambda x, c: x ** c, "r ** c"),
    "rpow": ("rpow", lambda x, c: c ** x, "c ** r"),
}


def is_number(value: Any) -> bool:
    """A real Python or numpy number (not a bool, not an array)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _exact(c: float | int) -> sp.Expr:
    """``c`` as a SymPy number that evaluates back to exactly ``c`` (0.1 -> 1/10, 0.5 -> 1/2)."""
    if isinstance(c, numbers.Integral) or float(c).is_integer():
        return sp.Integer(int(c))
    r = sp.nsimplify(float(c), rational=True)
    return r if float(r) == float(c) else sp.Float(float(c), precision=53)


def _tag(c: float | int) -> str:
    text = str(int(c)) if float(c).is_integer() and abs(c) < 1e15 else repr(float(c))
    return text.replace("-", "m").replace(".", "p").replace("+", "")


def scalar_op(kind: str, c: Any) -> Op:
    """The elementwise op computing ``kind`` of a register with the number ``c`` (made once per number)."""
    if not is_number(c):
        raise GraphError(f"expected a number, got {type(c).__name__}")
    if not math.isfinite(float(c)):
        raise GraphError(f"the constant {c!r} is not finite; only finite numbers can be combined with registers")
    prefix, build, _ = KINDS[kind]
    name = f"{prefix}_{_tag(c)}"
    expr = build(_X, _exact(c))
    return instance(name, lambda: declare(name, expr, [_X], doc=f"{expr} (a constant folded into the op)"))


FAMILIES["scalar"] = scalar_op
