"""symdiff: reverse-mode autodiff over Wengert lists, every elementwise op declared once in SymPy.

>>> from symdiff import XMan, f, Autograd, defop, grad_check
>>> from symdiff import grad, hvp, jvp          # gradients as graphs, Hessian-vector products, forward mode

Names are imported lazily (PEP 562): ``import symdiff.optim`` or a CLI's
``--help`` does not pay for importing SymPy and deriving the built-in ops.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Autograd": "autograd", "Program": "autograd",
    "SymdiffError": "errors", "MissingInputError": "errors", "UnknownNameError": "errors",
    "ShapeError": "errors", "GraphError": "errors", "DefopError": "errors",
    "GradCheckReport": "gradcheck", "grad_check": "gradcheck", "check_grads": "gradcheck",
    "grad": "differential", "hvp": "differential", "jvp": "differential", "HVP": "differential",
    "JVP": "differential", "GradientError": "errors", "DerivativeError": "errors",
    "Register": "graph", "Step": "graph", "WengertList": "graph", "XMan": "graph", "f": "graph",
    "OneHot": "onehot",
    "OPS": "registry", "MULTI_OPS": "registry", "Op": "registry", "get_op": "registry",
    "REWRITES": "stable", "defop": "declare",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'symdiff' has no attribute {name!r}")
    importlib.import_module(".ops", __name__)  # the built-in primitives are registered before any use
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
