"""The engine's user-facing errors: one base class, :class:`SymdiffError`.

Every error a user's graph, values, op declaration or settings can cause is a
``SymdiffError`` with a one-line message saying what is wrong, where, and what
to do, so ``except symdiff.SymdiffError`` catches exactly those (a bug in
symdiff itself stays an ``AssertionError`` or a plain exception). It subclasses
``ValueError`` (and the subclasses below ``KeyError``/``TypeError`` where Python
code would expect one), so older ``except ValueError`` code keeps working.
No imports: every module of the engine, SymPy-side or not, may use it.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class SymdiffError(ValueError):
    """An error in the user's graph, values, ops or settings, with what to do about it."""


class _KeyMessage(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingInputError(SymdiffError, _KeyMessage):
    """A leaf register got no value."""


class UnknownNameError(SymdiffError, _KeyMessage):
    """A name (input, register, op, pass) that does not exist; the message names the closest one."""


class ShapeError(SymdiffError):
    """Values whose shapes do not fit the op or the register they are given for."""


class GraphError(SymdiffError, TypeError):
    """A graph built wrongly (a constant where a register belongs, a wrong number of inputs)."""


class DefopError(SymdiffError, TypeError):
    """An op declaration ``defop`` cannot turn into kernels (also a ``TypeError``, as these once were)."""


class GradientError(SymdiffError):
    """A request ``grad``/``hvp``/``jvp`` cannot satisfy (names the register, op or shapes)."""


class DerivativeError(DefopError):
    """A partial derivative SymPy cannot turn into numpy code (names the op, argument and expression)."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``name`` (a likely typo), or None when none is close."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return match[0] if match else None


def did_you_mean(name: str, candidates: Iterable[str], what: str = "") -> str:
    """``" Did you mean 'x'?"`` for the closest candidate, else the list of candidates (shortened)."""
    candidates = sorted(set(candidates))
    best = closest(name, candidates)
    if best is not None:
        return f" Did you mean {best!r}?"
    shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
    return f" Known {what or 'names'}: {shown or 'none'}."
