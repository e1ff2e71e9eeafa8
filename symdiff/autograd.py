"""Compile a Wengert list into a flat program; run it forward and backward.

Compiling resolves every register name to a slot index and every op name to
its kernels once, and precomputes the backward plan (which derivative to take,
where it goes, whether it is the first contribution or is added). Running a
step is then a list index and a call: no name look-ups, no gradient for data.
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import GraphError, MissingInputError, ShapeError, SymdiffError, UnknownNameError, did_you_mean
from .graph import Step, XMan
from .onehot import OneHot, RowSparse
from .ops import MATMUL_KERNELS, TRANSPOSED_COPY_SIZES, Blocks, CutFed, shared_transposes
from .passes import DEFAULT_PASSES, PASSES
from . import native as native_kernels
from .registry import MULTI_OPS, get_op

__all__ = ["Autograd", "Program", "Values", "SymdiffError", "MissingInputError", "ShapeError", "fusion_passes"]


@dataclass
class Counters:
    forward_steps: int = 0
    backward_steps: int = 0


class Values(dict):
    """``eval``'s result: a name → value dict that remembers its slot list for ``bprop``."""

    __slots__ = ("slots", "program")


class Program:
    """A Wengert list compiled to slots and bound kernels.

    A step's output is a register name, or, for a step made by the
    ``fuse_elementwise`` pass, a tuple of names (the fused group's outputs and
    saved values). ``forward_plan`` holds ``(kernel, output slot(s), input
    slots)``; the backward plan holds one closure per derivative call.
    """

    def __init__(self, steps: Sequence[Step], params: Iterable[str], counters: Counters,
                 native: bool = True, xman: XMan | None = None) -> None:
        self.steps = list(steps)
        self.counters = counters
        self.native = native  # fused kernels may run compiled C (symdiff.native) where arrays fit
        names: list[str] = []
        slot: dict[str, int] = {}

        def slot_of(name: str) -> int:
            if name not in slot:
                slot[name] = len(names)
                names.append(name)
            return slot[name]

        outputs = {o for s in self.steps for o in s.outputs}
        leaves: list[tuple[str, int]] = []
        for s in self.steps:
            for i in s.inputs:
                if i not in outputs and i not in slot:
                    leaves.append((i, slot_of(i)))
        self.ops: list[Any] = []
        self.forward_plan: list[tuple[Any, Any, tuple[int, ...]]] = []
        for s in self.steps:
            if isinstance(s.output, tuple):
                op: Any = MULTI_OPS[s.op]
                arity = op.n_inputs
            else:
                op = get_op(s.op)
                arity = op.arity
            if len(s.inputs) != arity:
                raise SymdiffError(f"step {s}: op {s.op!r} takes {arity} inputs, got {len(s.inputs)}")
            self.ops.append(op)
            forward = op.forward if native else getattr(op, "numpy_forward", op.forward)
            ins = tuple(slot_of(i) for i in s.inputs)
            for o in s.outputs:
                if o in slot:
                    raise SymdiffError(f"register {o!r} is computed twice or used before it is computed")
            out: Any = tuple(slot_of(o) for o in s.output) if isinstance(s.output, tuple) else slot_of(s.output)
            self.forward_plan.append((forward, out, ins))
        self.names = names
        self.slot = slot
        self.leaves = leaves
        # the leaves are slots 0 .. L-1 (named before any step's output): forward fetches their values
        # from the input dict in one call and starts the slot list with them
        assert [k for _, k in leaves] == list(range(len(leaves)))
        leaf_names = [n for n, _ in leaves]
        self._leaf_values: Any = (itemgetter(*leaf_names) if len(leaf_names) > 1 else
                                  (lambda d: (d[leaf_names[0]],)) if leaf_names else (lambda d: ()))
        self._step_slots: list[None] = [None] * (len(names) - len(leaves))
        # names an input dict may hold: this list's registers and the model's (a value for a
        # register another list of the same model uses is fine); anything else is a typo
        self.xman = xman
        self.known = frozenset(names) | (frozenset(xman.registers()) if xman is not None else frozenset())
        # a OneHot value stays sparse only where a kernel expects one; anywhere else it is
        # handed over dense, as if the caller had passed the dense matrix
        sparse = {n for n, _ in leaves}
        for s, op in zip(self.steps, self.ops):
            keeps = getattr(op, "onehot_inputs", ())
            sparse.difference_update(i for j, i in enumerate(s.inputs) if j not in keeps)
        self.dense_leaves = {k for n, k in leaves if n not in sparse}
        params = set(params)
        self.params = [n for n, _ in leaves if n in params]
        self._param_slots = [slot[n] for n in self.params]
        # registers that depend on a parameter: the only ones worth a gradient
        needs = {n for n in self.params}
        for s in self.steps:
            if any(i in needs for i in s.inputs):
                needs.update(s.outputs)
        self.needs_grad = needs
        # slots whose values some backward kernel reads; the rest only lend shape and dtype
        value_needed: set[int] = set()
        for k, (op, (_, _, ins)) in enumerate(zip(self.ops, self.forward_plan)):
            outs = self._outputs_of(k)
            reads = getattr(op, "backward_reads", None)
            if reads is None:
                value_needed.update(outs)
                value_needed.update(ins)
            else:
                value_needed.update(x for x, r in zip(outs, reads[0]) if r)
                value_needed.update(x for x, r in zip(ins, reads[1]) if r)
        self.value_needed = value_needed
        # a fused group's output that the group also uses inside (an LSTM's C_t, also under
        # tanh for H_t) only receives the gradient from outside the group: not its full
        # gradient, so bprop leaves it out (fuse=False shows it)
        self.partial_gradients = {name for s, op in zip(self.steps, self.ops)
                                  for name in getattr(op, "internally_used", lambda _: ())(s.outputs)}
        self._releases: dict[tuple[frozenset[str], bool], list[tuple[Any, ...]]] = {}
        # runs of steps in one native call (see _Run): the dispatcher when it can, else None
        self.runs = native_kernels.runs() if native else None
        if self.runs is not None:  # products by bᵀ as _mul_da makes them: the same gemm call, the same bits
            self.runs.set_transposed_copy(*TRANSPOSED_COPY_SIZES)
        # backward's ownership check: a compiled proof that two views of one buffer are apart, before numpy's
        self._apart = getattr(native_kernels.active(), "apart", None) if native else None
        self._forward_items: dict[Any, list[Any]] = {}
        self._backward_items: dict[tuple[tuple[str, ...], bool], list[Any]] = {}
        self._backward_plans: dict[tuple[str, ...], tuple[list[tuple[Any, int]], int]] = {}
        self._drops: dict[tuple[str, ...], list[tuple[int, ...]]] = {}
        self._backward_descs: dict[tuple[str, ...], list[tuple[Any, ...] | None]] = {}

    # ---- forward ------------------------------------------------------------------------
    def forward(self, inputs: Mapping[str, Any], keep: Iterable[str] | None = None,
                backward: bool = True) -> list[Any]:
        """Values of every slot, given the inputs and params by name.

        With ``keep`` (the registers the caller will read), only the steps those
        registers depend on run (a training batch does not compute the ``outputs`` its
        loss does not read; their slots stay ``None``, and ``backward`` may then start
        only from kept registers), and each intermediate is released right after its
        last use, so memory is reused while in cache: values a later ``backward`` reads
        stay; the others shrink to a zero-stride stand-in of the same shape and dtype
        (``backward=False``: to ``None``).
        """
        if not self.known.issuperset(inputs):
            raise self._unknown_input(min(inputs.keys() - self.known))
        if isinstance(keep, str):
            keep = (keep,)
        releases = None if keep is None else self._release_plan(frozenset(keep), backward)
        try:
            values = self._leaf_values(inputs)
        except KeyError:
            name = next(n for n, _ in self.leaves if n not in inputs)
            raise MissingInputError(
                f"no value for register {name!r}: pass it in the input dict "
                f"(e.g. xm.inputDict({name}=...)) or give it a default") from None
        v: list[Any] = [val if val.__class__ is np.ndarray else self._leaf_value(k, val)
                        for k, val in enumerate(values)]
        v += self._step_slots
        k = 0
        stand_in = _ghost if backward else _gone
        plan_key = None if releases is None else (frozenset(keep), backward)
        items = self._forward_items.get(plan_key)
        if items is None:
            entries = releases if releases is not None else [(k, *step, ()) for k, step in enumerate(self.forward_plan)]
            items = self._forward_items[plan_key] = self._runs_of([(e, self._forward_step(e)) for e in entries], 0)
        try:
            for item in items:
                if item.__class__ is _Run:  # several steps in one native call; Python finishes what it leaves
                    k = item.first
                    done = self.runs.run_forward(item.steps, v, stand_in)
                    if done == item.size:
                        continue
                    rest = item.entries[done:]
                else:
                    rest = (item,)
                for k, fn, o, ins, released in rest:
                    if o.__class__ is int:
                        v[o] = fn(*[v[i] for i in ins])
                    else:  # a fused step: one call computes all of the group's results
                        for s, value in zip(o, fn(*[v[i] for i in ins])):
                            v[s] = value
                    for s in released:
                        v[s] = stand_in(v[s])
        except (ValueError, TypeError, IndexError) as exc:
            raise self._error(k, exc, v, "forward") from exc
        self.counters.forward_steps += len(self.forward_plan) if releases is None else len(releases)
        return v

    def _leaf_value(self, k: int, val: Any) -> Any:
        """A leaf's value that is no plain array: a OneHot stays sparse where a kernel expects one;
        anything else is handed over as an array."""
        if k in self.dense_leaves or not isinstance(val, OneHot):
            return np.asarray(val)
        return val

    def _runs_of(self, pairs: Sequence[tuple[tuple[Any, ...], tuple[Any, ...] | None]], at: int) -> list[Any]:
        """The entries of ``pairs`` ``(entry, description)``, with each stretch of two or more consecutive
        ones that the dispatcher can run (a description, not None) as one :class:`_Run`; ``entry[at]`` is
        the step index."""
        if self.runs is None:
            return [e for e, _ in pairs]
        items: list[Any] = []
        stretch: list[tuple[Any, Any]] = []
        for entry, desc in [*pairs, (None, None)]:
            if desc is not None:
                stretch.append((entry, desc))
                continue
            if len(stretch) >= 2:
                items.append(_Run(tuple(d for _, d in stretch), [e for e, _ in stretch], stretch[0][0][at]))
            else:
                items.extend(e for e, _ in stretch)
            stretch = []
            if entry is not None:
                items.append(entry)
        return items

    def _forward_step(self, entry: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The dispatcher's description of a forward step it can run (``run_forward``), or None."""
        k, fn, o, ins, released = entry
        if fn is MATMUL_KERNELS[0] and o.__class__ is int:
            return (0, o, ins[0], ins[1], tuple(released))
        op = self.ops[k]
        kernel, cuts = (op.inner, op.native_run_inputs()) if isinstance(op, CutFed) else (op, None)
        nat = vars(kernel).get("native_forward")  # a fused kernel's own (not one a wrapper lends)
        if nat is None or o.__class__ is not tuple or fn is not op.forward or kernel.forward is kernel.numpy_forward:
            return None  # (a kernel of over 64 inputs runs numpy's forward)
        return (1, o, ins, nat, kernel.forward_deps, tuple(released), cuts)

    def _unknown_input(self, name: str) -> UnknownNameError:
        if self.xman is not None:
            return self.xman.unknown_input(name)
        return UnknownNameError(f"unknown input {name!r}: this Wengert list has no register of that name."
                                + did_you_mean(name, [n for n, _ in self.leaves], "inputs"))

    def _release_plan(self, keep: frozenset[str], backward: bool) -> list[tuple[Any, ...]]:
        """The steps ``keep`` depends on, each as ``(step index, kernel, output slot(s), input slots,
        slots whose last forward use it is and that may go)``."""
        key = (keep, backward)
        plan = self._releases.get(key)
        if plan is not None:
            return plan
        wanted = {self.slot[n] for n in keep if n in self.slot}
        run: list[int] = []
        for k in range(len(self.forward_plan) - 1, -1, -1):  # walking back: the steps something kept needs
            _, _, ins = self.forward_plan[k]
            if any(x in wanted for x in self._outputs_of(k)):
                run.append(k)
                wanted.update(ins)
        run.reverse()
        last: dict[int, int] = {}
        for k in run:
            for x in self._outputs_of(k):
                last[x] = k  # a result nobody uses goes right away
            for i in self.forward_plan[k][2]:
                last[i] = k
        held = {k for _, k in self.leaves} | {self.slot[n] for n in keep if n in self.slot}
        if backward:
            held |= self.value_needed
        done: dict[int, list[int]] = {k: [] for k in run}
        for x, k in last.items():
            if x not in held:
                done[k].append(x)
        plan = self._releases[key] = [(k, *self.forward_plan[k], tuple(done[k])) for k in run]
        return plan

    # ---- backward -----------------------------------------------------------------------
    def backward_plan(self, seeds: Sequence[str]) -> tuple[list[tuple[Any, int]], int]:
        """Closures ``run(g, v)`` (with their step index) taking the derivatives that lead from
        ``seeds`` to the params, and how many derivatives that is (the backward step count)."""
        key = tuple(sorted(seeds))
        cached = self._backward_plans.get(key)
        if cached is not None:
            return cached
        for s in key:
            if s not in self.slot:
                raise UnknownNameError(f"cannot backpropagate from {s!r}: it is not a register of this Wengert list."
                                       + did_you_mean(s, self.names, "registers"))
        written = set(key)  # registers a gradient reaches, walking back from the seeds
        summed: set[str] = set()  # ... and those whose gradient is already a sum this pass made
        plan: list[tuple[Any, int]] = []
        descs: list[tuple[Any, ...] | None] = []  # per closure: what run_backward is told, or None
        count = 0
        for k in range(len(self.steps) - 1, -1, -1):
            s = self.steps[k]
            outs = s.outputs
            if not any(o in written for o in outs) or not any(o in self.needs_grad for o in outs):
                continue
            _, o, ins = self.forward_plan[k]
            frozen = getattr(self.ops[k], "nondifferentiable", ())
            needed = tuple(name in self.needs_grad and j not in frozen for j, name in enumerate(s.inputs))
            targets = tuple(self.slot[name] for name, need in zip(s.inputs, needed) if need)
            accumulate = []  # per target: _ASSIGN, _SUM (a new array) or _SUM_INTO (into that array)
            for name, need in zip(s.inputs, needed):
                if need:
                    if name not in written:
                        accumulate.append(_ASSIGN)
                    elif name not in summed:
                        accumulate.append(_SUM)
                        summed.add(name)
                    else:
                        accumulate.append(_SUM_INTO)
                    written.add(name)
            op = self.ops[k]
            if isinstance(s.output, tuple):
                plan.append((_fused_backward(op, needed, o, ins, targets, tuple(accumulate), self.native), k))
                descs.append(self._fused_backward_step(op, needed, o, ins, targets, tuple(accumulate)))
            else:
                for j, (t, acc) in zip((j for j, n in enumerate(needed) if n), zip(targets, accumulate)):
                    bp = op.backward[j]
                    plan.append((_single_backward(bp, o, ins, t, acc), k))
                    gemm = op.forward is MATMUL_KERNELS[0] and bp is MATMUL_KERNELS[1 + j]
                    descs.append((2 + j, o, ins[0], ins[1], t, acc) if gemm else None)
            count += len(targets)
        self._backward_plans[key] = (plan, count)
        # for params_only: after a step's last closure, its outputs' gradients and values are spent
        # (their consumers ran before it; outputs are never params, which are leaves)
        self._drops[key] = [self._outputs_of(k) if j + 1 == len(plan) or plan[j + 1][1] != k else ()
                            for j, (_, k) in enumerate(plan)]
        self._backward_descs[key] = descs
        return plan, count

    def _fused_backward_step(self, op: Any, needed: tuple[bool, ...], o: tuple[int, ...], ins: tuple[int, ...],
                             targets: tuple[int, ...], accumulate: tuple[int, ...]) -> tuple[Any, ...] | None:
        """The dispatcher's description of a fused step's compiled backward (``run_backward``), or None."""
        if self.runs is None or not self.native:
            return None
        if isinstance(op, CutFed):
            if "native_forward" not in vars(op.inner):
                return None
            plan, build = op.native_run_backward(needed)
            cuts: Any = op.native_run_inputs()
        elif "native_forward" in vars(op) and not getattr(op, "exact_gradients", False):
            plan, build, cuts = op.native_backward_plan(needed), None, None
        else:
            return None
        return (4, o[:op.n_deltas], o, ins, plan.native, plan.used, plan.grads, plan.n_distinct, targets, accumulate,
                cuts, build)

    def _outputs_of(self, k: int) -> tuple[int, ...]:
        o = self.forward_plan[k][1]
        return o if isinstance(o, tuple) else (o,)

    def backward(self, v: Sequence[Any], seeds: Mapping[str, Any], params_only: bool = False) -> list[Any]:
        """Gradient slots (``None`` where no gradient is needed).

        ``params_only`` is for training loops: once a step's derivatives are taken,
        its outputs' gradients *and values* are dropped (``v`` is cleared of them
        as it goes), so only parameter gradients survive. Memory is then reused
        while it is still in cache instead of growing by megabytes per batch:
        ~10% off an LSTM epoch on this machine.
        """
        plan, count = self.backward_plan(list(seeds))
        g: list[Any] = [None] * len(self.names)
        for name, value in seeds.items():
            k = self.slot[name]
            if v[k] is None:
                raise SymdiffError(f"cannot backpropagate from {name!r}: forward(keep=...) did not compute it; "
                                   f"keep the registers backward starts from (keep=({name!r}, ...))")
            # the seed takes the output's float dtype: loss=np.float64(1.0) keeps a float32 graph float32
            dtype = getattr(v[k], "dtype", None)
            g[k] = np.asarray(value, dtype=dtype if dtype is not None and dtype.kind == "f" else None)
        step = 0
        key = tuple(sorted(seeds))
        items = self._backward_items.get((key, params_only))
        if items is None:
            pairs = []
            for (run, k), drop, desc in zip(plan, self._drops[key], self._backward_descs[key]):
                drop = drop if params_only else ()
                pairs.append(((run, k, drop), None if desc is None else (*desc, tuple(drop))))
            items = self._backward_items[(key, params_only)] = self._runs_of(pairs, 1)
        try:
            with shared_transposes():
                for item in items:
                    if item.__class__ is _Run:  # several derivatives in one native call; Python finishes the rest
                        step = item.first
                        done = self.runs.run_backward(item.steps, g, v, params_only)
                        if done == item.size:
                            continue
                        rest = item.entries[done:]
                    else:
                        rest = (item,)
                    for run, step, drop in rest:
                        run(g, v)
                        for d in drop:
                            g[d] = v[d] = None
        except (ValueError, TypeError, IndexError) as exc:
            raise self._error(step, exc, v, "backward") from exc
        self.counters.backward_steps += count
        # a derivative may hand back delta itself, or a view of it (transpose): give every param
        # gradient memory of its own, shared with no other param's gradient and no caller's seed,
        # so in-place updates (gradient clipping) touch exactly one gradient
        taken: dict[int, list[np.ndarray]] = {}
        apart = self._apart
        for value in seeds.values():
            if isinstance(value, np.ndarray):
                taken.setdefault(id(_owner(value)), []).append(value)
        for k in self._param_slots:
            a = g[k]
            memory = a.values if a.__class__ is RowSparse else a  # a row-sparse gradient's memory is its rows
            if memory.__class__ is not np.ndarray and not isinstance(memory, np.ndarray):
                continue
            base = memory.base
            owner = id(memory if base is None else base)
            same = taken.get(owner)
            if same is None:  # the usual case: memory no other gradient or seed uses
                taken[owner] = [memory]
                continue
            for b in same:  # (views of one buffer, e.g. a joined gradient's column blocks: usually apart)
                if (apart is None or not apart(memory, b)) and np.shares_memory(memory, b):
                    a = g[k] = a.copy()
                    memory = a.values if isinstance(a, RowSparse) else a
                    same = taken.setdefault(id(memory), [])
                    break
            same.append(memory)
        return g

    def _error(self, k: int, exc: Exception, v: Sequence[Any], phase: str) -> SymdiffError:
        s = self.steps[k]
        shapes = ", ".join(f"{i}{_shape_text(v[self.slot[i]])}" for i in s.inputs)
        out = ", ".join(s.outputs)
        cls = ShapeError if "shape" in str(exc) or "broadcast" in str(exc) or "dimension" in str(exc) else SymdiffError
        hint = ""
        if s.op == "mul" and cls is ShapeError:
            hint = (" ('*' and '@' between registers are the matrix product; for the elementwise product "
                    "write f.hadamard(a, b))")
        if s.op.startswith(("fused", "blockwise", "blockmap")):  # several of the user's steps run as one
            hint = (f" ({s.op} runs several steps of the Wengert list at once; Autograd(xm, fuse=False), "
                    f"or --no-fuse, runs them one by one and names the one that fails)")
        return cls(f"{phase} of op {s.op!r} computing register {out!r} failed for inputs {shapes}: {exc}{hint}")


def _shape_text(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, Blocks):
        return f"[blocks {', '.join(str(tuple(np.shape(b))) for b in value)}]"
    return str(tuple(np.shape(value)))


class _Run:
    """Consecutive steps that run in one call into the dispatcher (``run_forward``/``run_backward``):
    matrix products through numpy's own gemm and fused kernels' compiled loops, the same bits as one
    Python call a step, without the interpreter between them. ``steps`` describe them to C;
    ``entries`` are the same steps as Python runs them, for the part a call leaves (a step that does
    not fit: a one-hot operand, a kernel not built yet); ``first`` is the first step's index."""

    __slots__ = ("steps", "entries", "size", "first")

    def __init__(self, steps: tuple[tuple[Any, ...], ...], entries: list[tuple[Any, ...]], first: int) -> None:
        self.steps, self.entries, self.size, self.first = steps, entries, len(steps), first


_GHOSTS: dict[tuple[tuple[int, ...], np.dtype], np.ndarray] = {}


def _ghost(a: Any) -> Any:
    """A read-only zero-stride array with ``a``'s shape and dtype (what backward needs of a value it
    does not read); anything but a plain array is kept as it is."""
    if type(a) is not np.ndarray:
        return a
    key = (a.shape, a.dtype)
    g = _GHOSTS.get(key)
    if g is None:
        if len(_GHOSTS) > 256:
            _GHOSTS.clear()
        g = _GHOSTS[key] = np.broadcast_to(np.zeros((), a.dtype), a.shape)
    return g


def _gone(a: Any) -> None:
    return None


def _owner(a: np.ndarray) -> Any:
    """The object whose memory ``a`` uses (numpy collapses chains of views to it)."""
    return a if a.base is None else a.base


#: how a backward closure stores a gradient in its target slot: the first contribution as it
#: comes (it may be a view of a delta, or shared with another gradient), the second as a new
#: array ``g + d``, every later one added into that array, which nothing else can see yet
_ASSIGN, _SUM, _SUM_INTO = 0, 1, 2


def _sum_into(a: Any, d: Any) -> Any:
    """``a + d``, written into ``a`` (an array a ``_SUM`` made) when that gives the same array: an
    LSTM's recurrent weight and bias gradients take nine additions a batch, now without nine
    allocations. The same bits: one IEEE addition per element either way."""
    if type(a) is np.ndarray and type(d) is np.ndarray and a.shape == d.shape and a.dtype == d.dtype:
        return np.add(a, d, out=a)
    return a + d


def _single_backward(bp: Any, o: int, ins: tuple[int, ...], target: int, accumulate: int) -> Any:
    if accumulate == _SUM_INTO:
        def run(g: list[Any], v: list[Any]) -> None:
            g[target] = _sum_into(g[target], bp(g[o], v[o], *[v[i] for i in ins]))
    elif accumulate == _SUM:
        def run(g: list[Any], v: list[Any]) -> None:
            g[target] = g[target] + bp(g[o], v[o], *[v[i] for i in ins])
    else:
        def run(g: list[Any], v: list[Any]) -> None:
            g[target] = bp(g[o], v[o], *[v[i] for i in ins])
    return run


def _fused_backward(kernel: Any, needed: tuple[bool, ...], results: tuple[int, ...], ins: tuple[int, ...],
                    targets: tuple[int, ...], accumulate: tuple[int, ...], native: bool = True) -> Any:
    """All needed input gradients of a multi-output step in one call (a fused group's share subexpressions).

    Structural multi-output ops (cut, stack, block ops) declare ``exact_gradients``: their
    kernel hands back gradients of exactly their inputs' shapes. A fused group's numpy
    kernels may broadcast: ``kernel.gradients`` sums them back. Compiled kernels are tried
    first where the op has them (``native_backward``); ``None`` from them means numpy.
    """
    out_slots = results[:kernel.n_deltas]
    if getattr(kernel, "exact_gradients", False):
        bp = kernel.backward(needed)
        reads = results + ins

        def run(g: list[Any], v: list[Any]) -> None:
            grads = bp(*[0 if g[s] is None else g[s] for s in out_slots], *[v[s] for s in reads])
            for t, how, d in zip(targets, accumulate, grads):
                g[t] = d if how == _ASSIGN else g[t] + d if how == _SUM else _sum_into(g[t], d)
    else:
        kernel.backward(needed)  # derive the gradients now, with the plan, not in the first batch

        def run(g: list[Any], v: list[Any]) -> None:
            deltas = [0 if g[s] is None else g[s] for s in out_slots]
            grads = kernel.gradients(needed, deltas, [v[s] for s in results], [v[s] for s in ins])
            for t, how, d in zip(targets, accumulate, grads):
                g[t] = d if how == _ASSIGN else g[t] + d if how == _SUM else _sum_into(g[t], d)

    native_backward = getattr(kernel, "native_backward", None) if native else None
    if native_backward is None:
        return run
    nb = native_backward(needed)

    def run_native_first(g: list[Any], v: list[Any]) -> None:
        grads = nb([g[s] for s in out_slots], [v[s] for s in results], [v[s] for s in ins])
        if grads is None:  # the arrays do not fit the compiled loop: numpy kernels
            run(g, v)
            return
        for t, how, d in zip(targets, accumulate, grads):
            g[t] = d if how == _ASSIGN else g[t] + d if how == _SUM else _sum_into(g[t], d)

    return run_native_first


FUSION = ("fuse_blocks", "fuse_elementwise", "fold_cuts")


def fusion_passes(native: bool) -> tuple[str, ...]:
    """The passes ``fuse=True`` adds, which depend on whether fused kernels can be compiled.

    Compiled (:mod:`symdiff.native`), one fused kernel per LSTM step does the gates'
    sums, the sigmoids and tanh and the cell in one loop, reading the gate blocks in
    place: ``fuse_elementwise``, then ``fold_cuts`` (the step takes the gate products whole and
    cuts them itself: two steps fewer each way per LSTM time step). In numpy, stacking the gates first
    (``fuse_blocks``: one call per op for all four) beats one call per gate, and
    ``fuse_elementwise`` then fuses what is left (the cell).
    """
    return ("fuse_elementwise", "fold_cuts") if native else FUSION[:2]


class Autograd:
    """Evaluate and differentiate Wengert lists of an :class:`XMan` graph.

    ``eval(wengert, inputDict)`` returns register values by name;
    ``bprop(wengert, values, loss=1.0)`` returns gradients by register name.
    ``passes`` are the named graph rewrites of :mod:`symdiff.passes` to apply;
    ``fuse`` adds ``fuse_elementwise`` last. Under every setting, ``eval`` and
    ``bprop`` hold the value and the full gradient of every register the user
    *named* (an attribute of the ``XMan``): the passes treat those as boundaries
    (:meth:`compile` with ``whole=True``). Unnamed intermediates (``z1, z2, ...``)
    that a rewrite fused away are left out, as is the partial gradient of a fused
    output its own group also uses. Counters count a fused group as one forward
    step and one backward step per input differentiated (``fuse=False, passes=()``
    gives the seed's counts). A training loop calls :meth:`compile` (no
    boundaries) and the :class:`Program`'s ``forward``/``backward`` itself.

    ``native`` (default: when a C compiler works here, see :mod:`symdiff.native`)
    runs fused kernels as compiled C from the same SymPy expressions, and fuses
    each LSTM step's gates and cell into one kernel; ``native=False`` keeps numpy.
    """

    def __init__(self, xman: XMan, passes: Sequence[str] = DEFAULT_PASSES, fuse: bool = True,
                 native: bool | None = None) -> None:
        self.xman = xman
        if isinstance(passes, str):
            passes = (passes,)
        for p in passes:
            if p not in PASSES:
                raise UnknownNameError(f"unknown pass {p!r}." + did_you_mean(p, PASSES, "passes"))
        # None: compiled fused kernels when a C compiler works here (and SYMDIFF_NATIVE is not 0)
        self.native = native_kernels.enabled() if native is None else bool(native) and native_kernels.enabled()
        self.passes = tuple(p for p in passes if p not in FUSION) + (fusion_passes(self.native) if fuse else ())
        self.counters = Counters()
        self._programs: dict[tuple[bool, tuple[Step, ...]], Program] = {}
        self._last: tuple[Sequence[Step], bool, Program] | None = None

    @property
    def forward_steps(self) -> int:
        return self.counters.forward_steps

    @property
    def backward_steps(self) -> int:
        return self.counters.backward_steps

    def reset_counts(self) -> None:
        self.counters.forward_steps = self.counters.backward_steps = 0

    def compile(self, wengert: Sequence[Step], whole: bool = False) -> Program:
        """The compiled program for ``wengert``, cached by its steps.

        The passes keep the value of every named register (attribute of the
        ``XMan``). ``whole=True`` (what ``eval``/``bprop`` use) also keeps its full
        gradient: no rewrite reaches across a named register, at some cost in
        speed (an LSTM's ``outputs`` then keeps its own ``crossEnt``); a training
        loop that reads only ``loss`` and the params' gradients compiles without it.

        The list last compiled is also remembered by identity, so calling ``eval``
        and ``bprop`` with the same list costs no hashing; a list rebuilt every
        step (``operationSequence`` in the loop) finds its program by content and
        is not compiled again. Do not mutate a list after use.
        """
        last = self._last
        if last is not None and last[0] is wengert and last[1] == whole:
            return last[2]
        steps_key = tuple(s if isinstance(s, Step) else Step(*s) for s in wengert)
        key = (whole, steps_key)
        program = self._programs.get(key)
        if program is None:
            steps = list(steps_key)
            keep = self.xman.named()
            for name in self.passes:
                steps = PASSES[name](steps, keep=keep, whole=keep if whole else ())
            program = self._programs[key] = Program(steps, self.xman.params(), self.counters, self.native,
                                                    xman=self.xman)
        self._last = (wengert, whole, program)
        return program

    def eval(self, wengert: Sequence[Step], inputDict: Mapping[str, Any]) -> Values:
        """Forward pass: register values by name (inputs, params and every named register included).

        A name in ``inputDict`` that is no register of the model is an error naming the closest one.
        """
        program = self.compile(wengert, whole=True)
        slots = program.forward(inputDict)
        values = Values(zip(program.names, slots))
        values.slots = slots
        values.program = program
        return values

    def bprop(self, wengert: Sequence[Step], values: Mapping[str, Any], **seeds: Any) -> dict[str, Any]:
        """Backward pass from the seeded registers (``loss=np.float64(1.0)``) to every param.

        Returns the gradient of every register on the way that depends on a param (every
        named one included; data inputs get none). Each seed is dL/d(register) and must have
        its register's shape: a non-scalar register is never summed silently; seed it with
        ``np.ones_like(values[name])`` to differentiate its sum.
        """
        if not seeds:
            raise GraphError("bprop needs the output to differentiate, e.g. bprop(w, values, loss=np.float64(1.0))")
        program = self.compile(wengert, whole=True)
        if isinstance(values, Values) and values.program is program:
            slots = values.slots
        else:
            missing = [n for n in program.names if n not in values]
            if missing:
                raise MissingInputError(f"values has no entry for register(s) {missing[:5]}: pass the dict eval() returned")
            slots = [values[n] for n in program.names]
        for name, seed in seeds.items():
            if name not in program.slot:
                raise UnknownNameError(f"cannot backpropagate from {name!r}: it is not a register of this Wengert "
                                       f"list." + did_you_mean(name, program.names, "registers"))
            want, got = np.shape(slots[program.slot[name]]), np.shape(seed)
            if want != got:
                hint = (f"; to differentiate the sum of its elements pass {name}=np.ones({want})"
                        if got == () else "")
                raise ShapeError(f"the seed for {name!r} has shape {got} but the register has shape {want}: "
                                 f"a seed is dL/d{name}, one number per element{hint}")
        grads = program.backward(slots, seeds)
        # one-hot weight gradients are row-sparse inside the engine; the public result is dense
        # (and blocks that fuse_blocks could not lay side by side are internal: left out)
        partial = program.partial_gradients
        return {n: g if isinstance(g, np.ndarray) else np.asarray(g)
                for n, g in zip(program.names, grads)
                if g is not None and not isinstance(g, Blocks) and n not in partial}
