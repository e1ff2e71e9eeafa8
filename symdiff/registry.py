"""The op registry: one table of every primitive the engine knows.

Kept free of SymPy and of graph code so that both the graph builder and the
compiler can look ops up without pulling in the symbolic machinery. The layers run
one way: :mod:`symdiff.graph` imports this module, never the reverse. ``op(*registers)``
builds a graph node through a builder the graph layer installs when it is imported
(:func:`set_register_builder`), so an op stays callable without the registry knowing
what a register is.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import SymdiffError, UnknownNameError

Kernel = Callable[..., Any]


@dataclass(eq=False)
class Op:
    """A primitive: a forward kernel and one backward kernel per input.

    ``backward[j](delta, out, *inputs)`` returns dL/d(input j) given
    ``delta = dL/d(out)``; it already has input j's shape (broadcast
    reductions are applied inside it), as the seed's ``BP_FUNS`` did.
    ``symbolic`` carries the SymPy side (expression, derivatives) for ops
    declared with :func:`symdiff.defop`, and is ``None`` for hand-written ops.
    """

    name: str
    arity: int
    forward: Kernel
    backward: tuple[Kernel, ...]
    elementwise: bool = False
    doc: str = ""
    symbolic: Any = None
    # names of hand-written forward/backward formulas, for `symdiff ops`
    formula: str = ""
    derivative_formulas: tuple[str, ...] = field(default_factory=tuple)
    # inputs whose kernels take a symdiff.OneHot value as it is (a gather); elsewhere it is made dense
    onehot_inputs: tuple[int, ...] = ()
    # whose *values* the backward kernels read: ((out,), (input 0, input 1, ...)); None = all of them.
    # Anything else only lends its shape and dtype, so a training loop may release it early.
    backward_reads: tuple[tuple[bool, ...], tuple[bool, ...]] | None = None
    # inputs that get no gradient (a where-mask, a Bessel function's order): bprop never asks for one
    nondifferentiable: tuple[int, ...] = ()
    # an instance of an op family with static arguments (``f.sum(x, axis=1)``): the family's name and
    # the arguments, validated when the graph was built (see symdiff.array_ops)
    family: str = ""
    static: tuple[tuple[str, Any], ...] = ()

    def __call__(self, *inputs: Any) -> Any:
        """Build a register computed by this op: ``gate(a, b)`` is ``f.gate(a, b)``."""
        if _build_register is None:  # only reachable with no register in sight: graph makes them
            raise TypeError(f"op {self.name!r} builds graph registers, but symdiff.graph is not loaded; "
                            f"make inputs with symdiff.f.input(...) / f.param(...) first")
        return _build_register(self, inputs)

    def __repr__(self) -> str:
        kind = "elementwise" if self.elementwise else "structural"
        return f"<Op {self.name}/{self.arity} {kind}>"


OPS: dict[str, Op] = {}

#: ops made on demand, one per set of static arguments or constant (``sum[axis=1]``, ``mul_by_2``):
#: found by name like any op, but not listed as primitives (their families are, in ``FAMILIES``)
INSTANCES: dict[str, Op] = {}

#: op families with static arguments, by the name ``f.<name>`` uses: callables building registers
FAMILIES: dict[str, Any] = {}

#: how ``op(*inputs)`` builds a register; installed by :mod:`symdiff.graph` on import
_build_register: Callable[[Op, Sequence[Any]], Any] | None = None


def set_register_builder(build: Callable[[Op, Sequence[Any]], Any]) -> None:
    """Install what ``Op.__call__`` calls (the graph layer's ``Register.operation``)."""
    global _build_register
    _build_register = build

#: ops whose step has several outputs (fused groups, split): ``forward(*inputs)`` returns a
#: tuple of results; the first ``n_deltas`` results receive gradients; ``backward(needed)``
#: returns ``bp(*deltas, *results, *inputs)`` giving the needed inputs' gradients as a tuple.
MULTI_OPS: dict[str, Any] = {}


def register(op: Op, *, replace: bool = False) -> Op:
    """Add ``op`` to the registry; refuse to silently shadow an existing op."""
    if op.name in OPS and not replace:
        raise SymdiffError(
            f"an op named {op.name!r} already exists ({OPS[op.name]!r}); "
            f"pick another name, or pass replace=True to redefine it"
        )
    if len(op.backward) != op.arity:
        raise SymdiffError(f"op {op.name!r}: {op.arity} inputs but {len(op.backward)} backward kernels")
    OPS[op.name] = op
    return op


def get_op(name: str) -> Op:
    """Look an op up by name, with a did-you-mean hint when it is unknown."""
    try:
        return OPS[name]
    except KeyError:
        made = INSTANCES.get(name)
        if made is not None:
            return made
        close = difflib.get_close_matches(name, OPS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(
            f"unknown op {name!r}.{hint} Declare it with symdiff.defop(...) first; "
            f"known ops: {', '.join(sorted(OPS))}"
        ) from None


def sum_to_shape(grad: Any, shape: Sequence[int], dtype: Any) -> np.ndarray:
    """Sum a gradient back to the shape of an input that numpy broadcast.

    Leading axes that broadcasting added are summed away, axes where the input
    had size 1 are summed with keepdims. A constant derivative (a Python
    scalar from lambdify) becomes a full array of the input's shape. The
    result has ``dtype``.
    """
    shape = tuple(shape)
    g = np.asarray(grad)
    if g.shape == shape:
        return g if g.dtype == dtype else g.astype(dtype)
    if g.ndim == 0:
        return np.full(shape, g, dtype=dtype)
    lead = g.ndim - len(shape)
    if lead > 0:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    if g.shape != shape:  # the derivative did not depend on a broadcast axis
        g = np.broadcast_to(g, shape).copy()
    return g if g.dtype == dtype else g.astype(dtype)


def instance(name: str, make: Callable[[], Op]) -> Op:
    """The on-demand op called ``name``, made by ``make()`` the first time it is asked for."""
    op = INSTANCES.get(name)
    if op is None:
        op = INSTANCES[name] = make()
    return op
