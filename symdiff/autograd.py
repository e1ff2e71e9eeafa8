"""Compile a Wengert list into a flat program; run it forward and backward.

Compiling resolves every register name to a slot index and every op name to
its kernels once, and precomputes the backward plan (which derivative to take,
where it goes, whether it is the first contribution or is added). Running a
step is then a list index and a call: no name look-ups, no gradient for data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .graph import Step, XMan
from .onehot import OneHot
from .passes import DEFAULT_PASSES, PASSES
from .registry import Op, get_op


class SymdiffError(ValueError):
    """An error in the user's graph or values, with what to do about it."""


class MissingInputError(SymdiffError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ShapeError(SymdiffError):
    pass


@dataclass
class Counters:
    forward_steps: int = 0
    backward_steps: int = 0


class Values(dict):
    """``eval``'s result: a name → value dict that remembers its slot list for ``bprop``."""

    __slots__ = ("slots", "program")


class Program:
    """A Wengert list compiled to slots and bound kernels."""

    def __init__(self, steps: Sequence[Step], params: Iterable[str], counters: Counters) -> None:
        self.steps = list(steps)
        self.counters = counters
        names: list[str] = []
        slot: dict[str, int] = {}

        def slot_of(name: str) -> int:
            if name not in slot:
                slot[name] = len(names)
                names.append(name)
            return slot[name]

        outputs = {s.output for s in self.steps}
        leaves: list[tuple[str, int]] = []
        for s in self.steps:
            for i in s.inputs:
                if i not in outputs and i not in slot:
                    leaves.append((i, slot_of(i)))
        self.ops: list[Op] = []
        self.forward_plan: list[tuple[Any, int, tuple[int, ...]]] = []
        for s in self.steps:
            op = get_op(s.op)
            if len(s.inputs) != op.arity:
                raise SymdiffError(f"step {s}: op {op.name!r} takes {op.arity} inputs, got {len(s.inputs)}")
            self.ops.append(op)
            ins = tuple(slot_of(i) for i in s.inputs)
            if s.output in slot:
                raise SymdiffError(f"register {s.output!r} is computed twice or used before it is computed")
            self.forward_plan.append((op.forward, slot_of(s.output), ins))
        self.names = names
        self.slot = slot
        self.leaves = leaves
        params = set(params)
        self.params = [n for n, _ in leaves if n in params]
        # registers that depend on a parameter: the only ones worth a gradient
        needs = {n for n in self.params}
        for s in self.steps:
            if any(i in needs for i in s.inputs):
                needs.add(s.output)
        self.needs_grad = needs
        self._backward_plans: dict[tuple[str, ...], list[tuple[Any, int, tuple[int, ...], int, bool]]] = {}

    # ---- forward ------------------------------------------------------------------------
    def forward(self, inputs: Mapping[str, Any]) -> list[Any]:
        """Values of every slot, given the inputs and params by name."""
        v: list[Any] = [None] * len(self.names)
        for name, k in self.leaves:
            try:
                val = inputs[name]
            except KeyError:
                raise MissingInputError(
                    f"no value for register {name!r}: pass it in the input dict "
                    f"(e.g. xm.inputDict({name}=...)) or give it a default") from None
            if type(val) is not np.ndarray and not isinstance(val, OneHot):
                val = np.asarray(val)
            v[k] = val
        k = 0
        try:
            for k, (fn, o, ins) in enumerate(self.forward_plan):
                v[o] = fn(*[v[i] for i in ins])
        except (ValueError, TypeError, IndexError) as exc:
            raise self._error(k, exc, v, "forward") from exc
        self.counters.forward_steps += len(self.forward_plan)
        return v

    # ---- backward -----------------------------------------------------------------------
    def backward_plan(self, seeds: Sequence[str]) -> list[tuple[Any, int, tuple[int, ...], int, bool]]:
        """Derivatives to take for gradients flowing from ``seeds`` to the params."""
        key = tuple(sorted(seeds))
        plan = self._backward_plans.get(key)
        if plan is not None:
            return plan
        for s in key:
            if s not in self.slot:
                raise SymdiffError(f"cannot backpropagate from {s!r}: it is not a register of this Wengert list")
        # registers the seeds depend on
        live = set(key)
        for s in reversed(self.steps):
            if s.output in live:
                live.update(s.inputs)
        written = set(key)
        plan = []
        for k in range(len(self.steps) - 1, -1, -1):
            s = self.steps[k]
            if s.output not in live or s.output not in self.needs_grad or s.output not in written:
                continue
            _, o, ins = self.forward_plan[k]
            for j, name in enumerate(s.inputs):
                if name in self.needs_grad:
                    target = self.slot[name]
                    plan.append((self.ops[k].backward[j], o, ins, target, name in written))
                    written.add(name)
        self._backward_plans[key] = plan
        return plan

    def backward(self, v: Sequence[Any], seeds: Mapping[str, Any]) -> list[Any]:
        """Gradient slots (``None`` where no gradient is needed)."""
        plan = self.backward_plan(list(seeds))
        g: list[Any] = [None] * len(self.names)
        for name, value in seeds.items():
            g[self.slot[name]] = value
        n = 0
        try:
            for n, (bp, o, ins, target, accumulate) in enumerate(plan):
                d = bp(g[o], v[o], *[v[i] for i in ins])
                g[target] = g[target] + d if accumulate else d
        except (ValueError, TypeError, IndexError) as exc:
            step = self.forward_plan.index(next(p for p in self.forward_plan if p[1] == plan[n][1]))
            raise self._error(step, exc, v, "backward") from exc
        self.counters.backward_steps += len(plan)
        # a derivative may hand back delta itself: give every param its own array
        seen: set[int] = set()
        for name in self.params:
            k = self.slot[name]
            if g[k] is not None:
                if id(g[k]) in seen:
                    g[k] = g[k].copy()
                seen.add(id(g[k]))
        return g

    def _error(self, k: int, exc: Exception, v: Sequence[Any], phase: str) -> SymdiffError:
        s = self.steps[k]
        shapes = ", ".join(f"{i}{tuple(np.shape(v[self.slot[i]])) if v[self.slot[i]] is not None else '?'}"
                           for i in s.inputs)
        cls = ShapeError if "shape" in str(exc) or "broadcast" in str(exc) or "dimension" in str(exc) else SymdiffError
        return cls(f"{phase} of op {s.op!r} computing register {s.output!r} failed for inputs {shapes}: {exc}")


class Autograd:
    """Evaluate and differentiate Wengert lists of an :class:`XMan` graph.

    ``eval(wengert, inputDict)`` returns every register's value;
    ``bprop(wengert, values, loss=1.0)`` returns gradients by register name.
    ``passes`` are the named graph rewrites of :mod:`symdiff.passes` to apply.
    """

    def __init__(self, xman: XMan, passes: Sequence[str] = DEFAULT_PASSES) -> None:
        self.xman = xman
        unknown = [p for p in passes if p not in PASSES]
        if unknown:
            raise ValueError(f"unknown pass(es) {unknown}; available: {sorted(PASSES)}")
        self.passes = tuple(passes)
        self.counters = Counters()
        self._programs: dict[int, tuple[list[Step], Program]] = {}

    @property
    def forward_steps(self) -> int:
        return self.counters.forward_steps

    @property
    def backward_steps(self) -> int:
        return self.counters.backward_steps

    def reset_counts(self) -> None:
        self.counters.forward_steps = self.counters.backward_steps = 0

    def compile(self, wengert: Sequence[Step]) -> Program:
        """The compiled program for ``wengert`` (cached; do not mutate a list after use)."""
        cached = self._programs.get(id(wengert))
        if cached is not None and cached[0] is wengert:
            return cached[1]
        steps = [Step(*s) if not isinstance(s, Step) else s for s in wengert]
        for name in self.passes:
            steps = PASSES[name](steps)
        program = Program(steps, self.xman.params(), self.counters)
        self._programs[id(wengert)] = (wengert, program)  # keeps the list alive, so ids stay unique
        return program

    def eval(self, wengert: Sequence[Step], inputDict: Mapping[str, Any]) -> Values:
        """Forward pass: a dict of every register's value (inputs and params included)."""
        program = self.compile(wengert)
        slots = program.forward(inputDict)
        values = Values(zip(program.names, slots))
        values.slots = slots
        values.program = program
        return values

    def bprop(self, wengert: Sequence[Step], values: Mapping[str, Any], **seeds: Any) -> dict[str, Any]:
        """Backward pass from the seeded registers (``loss=np.float64(1.0)``) to every param."""
        if not seeds:
            raise TypeError("bprop needs the output to differentiate, e.g. bprop(w, values, loss=np.float64(1.0))")
        program = self.compile(wengert)
        if isinstance(values, Values) and values.program is program:
            slots = values.slots
        else:
            missing = [n for n in program.names if n not in values]
            if missing:
                raise MissingInputError(f"values has no entry for register(s) {missing[:5]}: pass the dict eval() returned")
            slots = [values[n] for n in program.names]
        grads = program.backward(slots, seeds)
        return {n: g for n, g in zip(program.names, grads) if g is not None}
