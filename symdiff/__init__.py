"""symdiff: reverse-mode autodiff over Wengert lists, every elementwise op declared once in SymPy.

>>> from symdiff import XMan, f, Autograd, defop, grad_check
"""
from __future__ import annotations

from . import ops as _builtin_ops  # noqa: F401  (registers the built-in primitives)
from .autograd import Autograd, MissingInputError, Program, ShapeError, SymdiffError
from .gradcheck import GradCheckReport, grad_check
from .graph import Register, Step, WengertList, XMan, f
from .onehot import OneHot
from .registry import OPS, Op, get_op
from .symbolic import REWRITES, defop

__all__ = [
    "Autograd", "GradCheckReport", "MissingInputError", "OPS", "OneHot", "Op", "Program", "REWRITES",
    "Register", "ShapeError", "Step", "SymdiffError", "WengertList", "XMan", "defop", "f", "get_op",
    "grad_check",
]
__version__ = "0.1.0"
