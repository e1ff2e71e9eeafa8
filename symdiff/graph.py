"""Registers, the expression manager ``XMan`` and Wengert lists.

A model is plain Python over *registers*: inputs, params and the outputs of
operations. ``XMan.setup()`` names them; ``operationSequence(reg)`` turns the
graph below ``reg`` into a Wengert list, the topologically ordered steps that
the compiler in :mod:`symdiff.autograd` runs. No numeric code lives here.
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Sequence

from .errors import GraphError, SymdiffError, UnknownNameError, did_you_mean
from .registry import FAMILIES, OPS, Op, get_op, set_register_builder

INPUT, PARAM, OPERATION = "input", "param", "operationOutput"


class Register:
    """A node of the expression graph.

    ``role`` is ``"input"`` (data fed at each step), ``"param"`` (trained) or
    ``"operationOutput"``. Operators build operations the way the seed did:
    ``+`` add, ``-`` subtract, ``*`` and ``@`` the matrix product; ``/`` divides
    elementwise. With a number (``2 * r``, ``1 - r``, ``r ** 0.5``) every operator
    is elementwise and the number a constant folded into the op.
    """

    __slots__ = ("name", "role", "default", "op", "inputs")

    def __init__(self, role: str, name: str | None = None, default: Any = None,
                 op: Op | None = None, inputs: tuple["Register", ...] = ()) -> None:
        self.name = name
        self.role = role
        self.default = default
        self.op = op
        self.inputs = inputs

    @classmethod
    def operation(cls, op: Op, inputs: Sequence[Any]) -> "Register":
        """The register computed by ``op`` from ``inputs`` (checked here, at build time)."""
        if len(inputs) != op.arity:
            raise GraphError(f"op {op.name!r} takes {op.arity} register(s), got {len(inputs)}")
        for k, r in enumerate(inputs):
            if not isinstance(r, Register):
                raise GraphError(
                    f"input {k} of op {op.name!r} is a {type(r).__name__}, not a register; "
                    f"wrap constants with f.input(name=..., default=value)"
                )
        return cls(OPERATION, op=op, inputs=tuple(inputs))

    def isInput(self) -> bool:
        return self.role == INPUT

    def isParam(self) -> bool:
        return self.role == PARAM

    def isOperationOutput(self) -> bool:
        return self.role == OPERATION

    # seed-style operator overloading, plus numbers (constants folded into an op: nothing to feed)
    __array_ufunc__ = None  # numpy scalars on the left defer to the reflected operators below

    def _with(self, kind: str, c: Any, op_name: str | None = None, other: Any = None) -> "Register":
        if isinstance(other, Register) and op_name is not None:
            return Register.operation(get_op(op_name), (self, other))
        scalar = FAMILIES.get("scalar")
        if scalar is None or isinstance(c, Register):
            return NotImplemented
        if not _is_number(c):
            what = "an array" if hasattr(c, "shape") else f"a {type(c).__name__}"
            raise GraphError(f"cannot combine register {self.name or '?'} with {what} ({kind}): only numbers and "
                             f"registers combine with registers; wrap arrays with f.input(name=..., default=value)")
        return Register.operation(scalar(kind, c), (self,))

    def __add__(self, other: Any) -> "Register":
        return self._with("add", other, "add", other)

    def __radd__(self, other: Any) -> "Register":
        return self._with("add", other)

    def __sub__(self, other: Any) -> "Register":
        if isinstance(other, Register):
            return Register.operation(get_op("subtract"), (self, other))
        return self._with("add", -other if _is_number(other) else other)

    def __rsub__(self, other: Any) -> "Register":
        return self._with("rsub", other)

    def __mul__(self, other: Any) -> "Register":
        """Between registers the matrix product (the seed's meaning); with a number, elementwise."""
        return self._with("mul", other, "mul", other)

    def __rmul__(self, other: Any) -> "Register":
        return self._with("mul", other)

    def __matmul__(self, other: Any) -> "Register":
        if not isinstance(other, Register):
            raise GraphError("'@' is the matrix product of two registers; for a number use '*'")
        return Register.operation(get_op("mul"), (self, other))

    def __truediv__(self, other: Any) -> "Register":
        """Elementwise division, by a register or a number."""
        return self._with("div", other, "divide", other)

    def __rtruediv__(self, other: Any) -> "Register":
        return self._with("rdiv", other)

    def __pow__(self, other: Any) -> "Register":
        if isinstance(other, Register):
            raise GraphError("a register to the power of a register is not an op; write f.exp(b * f.log(a))")
        return self._with("pow", other)

    def __rpow__(self, other: Any) -> "Register":
        return self._with("rpow", other)

    def __neg__(self) -> "Register":
        return Register.operation(get_op("negate"), (self,))

    def __pos__(self) -> "Register":
        return self

    def __getitem__(self, index: Any) -> "Register":
        """``x[...]``: ints, slices, None, Ellipsis and integer arrays (a gather), numpy's rules."""
        return FAMILIES["getitem"](self, index)

    def __iter__(self) -> Any:  # __getitem__ must not make registers iterable (an endless gather loop)
        raise GraphError("a register is not iterable; index it (x[0], x[:, 1]) or use f.sum/f.stack")

    def __repr__(self) -> str:
        what = self.op.name if self.op is not None else self.role
        return f"<Register {self.name or '?'}: {what}>"


class _Builder:
    """``f``: ``f.input``/``f.param`` make leaves, ``f.<op>(...)`` applies any registered op."""

    @staticmethod
    def input(name: str | None = None, default: Any = None) -> Register:
        return Register(INPUT, name=name, default=default)

    @staticmethod
    def param(name: str | None = None, default: Any = None) -> Register:
        return Register(PARAM, name=name, default=default)

    def __getattr__(self, opname: str) -> Any:
        if opname.startswith("__"):
            raise AttributeError(opname)
        family = FAMILIES.get(opname)  # ops with static arguments: f.sum(x, axis=1)
        return family if family is not None and opname != "scalar" else get_op(opname)

    def __dir__(self) -> list[str]:
        # a family's default is also a registered op (f.sum is the family, OPS["sum"] its default): each name once
        return sorted({"input", "param", *OPS, *(n for n in FAMILIES if n != "scalar")})


f = _Builder()
set_register_builder(Register.operation)  # op(*registers) builds through the graph; registry never imports it


class Step(NamedTuple):
    """One Wengert-list entry: ``output = op(*inputs)``, all by register name."""

    output: str | tuple[str, ...]   # a tuple for a step made by the fuse_elementwise pass
    op: str
    inputs: tuple[str, ...]

    @property
    def outputs(self) -> tuple[str, ...]:
        """The registers this step computes (one, or several for a multi-output step)."""
        return self.output if isinstance(self.output, tuple) else (self.output,)

    def __str__(self) -> str:
        if isinstance(self.output, tuple):
            mark = "   [fused]" if self.op.startswith("fused") else ""
            return f"{', '.join(self.output)} = {self.op}({', '.join(self.inputs)}){mark}"
        return f"{self.output} = {self.op}({', '.join(self.inputs)})"


class WengertList(list):
    """A list of :class:`Step` s that prints one step a line."""

    def __str__(self) -> str:
        width = len(str(len(self)))
        return "\n".join(f"{k:>{width}}  {step}" for k, step in enumerate(self, 1))


class XMan:
    """The expression manager: assign registers as attributes, then ``setup()``.

    Attribute names become register names (unless the register was given one),
    remaining intermediate registers are named ``z1, z2, ...`` in build order.
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_registers", {})

    def setup(self) -> "XMan":
        """Name every register reachable from an attribute; returns the manager."""
        regs: dict[str, Register] = {}
        attrs = [(k, v) for k, v in vars(self).items() if isinstance(v, Register)]
        for attr, reg in attrs:
            if reg.name is None:
                reg.name = attr
        taken = {reg.name for _, reg in attrs} | {
            r.name for _, reg in attrs for r in _walk(reg) if r.name is not None}
        counter = 0
        for _, reg in attrs:
            for r in _walk(reg):
                if r.name is None:
                    counter += 1
                    while f"z{counter}" in taken:
                        counter += 1
                    r.name = f"z{counter}"
                    taken.add(r.name)
                other = regs.setdefault(r.name, r)
                if other is not r:
                    raise SymdiffError(
                        f"two different registers are both named {r.name!r}; give each "
                        f"input/param a unique name=")
        object.__setattr__(self, "_registers", regs)
        object.__setattr__(self, "_named", frozenset(reg.name for _, reg in attrs))
        return self

    def named(self) -> frozenset[str]:
        """Names of the registers the model holds as attributes (graph rewrites keep them visible)."""
        return getattr(self, "_named", frozenset())

    def register(self, name: str) -> Register:
        """The register called ``name`` (after ``setup``)."""
        try:
            return self._registers[name]
        except KeyError:
            if not self._registers:
                raise UnknownNameError(f"no register named {name!r}: this XMan has no registers yet; "
                                       f"call xm.setup() after assigning them") from None
            raise UnknownNameError(f"no register named {name!r}."
                                   + did_you_mean(name, self._registers, "registers")) from None

    def registers(self) -> dict[str, Register]:
        return dict(self._registers)

    def isParam(self, name: str) -> bool:
        return self.register(name).role == PARAM

    def isInput(self, name: str) -> bool:
        return self.register(name).role == INPUT

    def params(self) -> list[str]:
        return [n for n, r in self._registers.items() if r.role == PARAM]

    def inputDict(self, **overrides: Any) -> dict[str, Any]:
        """Default values of every input and param (copies), updated by ``overrides``.

        An override that names no input or param is an error (a typo would otherwise
        train on the default data without a word).
        """
        leaves = [n for n, r in self._registers.items() if r.role in (INPUT, PARAM)]
        for name in overrides:
            if name not in leaves:
                raise self.unknown_input(name)
        out: dict[str, Any] = {}
        for name, r in self._registers.items():
            if r.role in (INPUT, PARAM) and r.default is not None:
                d = r.default
                out[name] = d.copy() if hasattr(d, "copy") else d
        out.update(overrides)
        return out

    def unknown_input(self, name: str) -> UnknownNameError:
        """The error for a value given under ``name``, which is no input or param of this model."""
        leaves = [n for n, r in self._registers.items() if r.role in (INPUT, PARAM)]
        if name in self._registers:
            return UnknownNameError(f"{name!r} is computed by the graph (op {self._registers[name].op.name!r}), "
                                    f"not an input or param: it takes no value. Inputs and params: "
                                    f"{', '.join(leaves)}")
        return UnknownNameError(f"unknown input {name!r}: no register of this model has that name."
                                + did_you_mean(name, leaves, "inputs and params"))

    def operationSequence(self, reg: Register) -> WengertList:
        """The Wengert list computing ``reg``: each register once, inputs first."""
        if not isinstance(reg, Register):
            raise GraphError(f"operationSequence needs a register, got {type(reg).__name__}; "
                             f"e.g. xm.operationSequence(xm.loss)")
        steps = WengertList()
        for r in _walk(reg):
            if r.name is None:
                raise SymdiffError("unnamed register in the graph: call xm.setup() before operationSequence()")
            if r.role == OPERATION:
                steps.append(Step(r.name, r.op.name, tuple(i.name for i in r.inputs)))
        return steps


def _is_number(value: Any) -> bool:
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _walk(root: Register) -> Iterator[Register]:
    """Post-order over the graph below ``root``, each register once (iterative: deep LSTMs)."""
    seen: set[int] = set()
    stack: list[tuple[Register, bool]] = [(root, False)]
    while stack:
        reg, expanded = stack.pop()
        if expanded:
            yield reg
            continue
        if id(reg) in seen:
            continue
        seen.add(id(reg))
        stack.append((reg, True))
        for child in reversed(reg.inputs):
            if id(child) not in seen:
                stack.append((child, False))
