"""Gradients as graphs: ``grad`` builds one, ``hvp`` and ``jvp`` evaluate second and forward derivatives.

``grad(xm, of, wrt)`` walks the Wengert list of ``of`` backwards and asks each
op for its *pullback*: a function of registers returning registers. An
elementwise op's pullback multiplies the cotangent by its partial derivatives,
which are ops themselves (:func:`symdiff.derivative_ops.partial`: derived by
SymPy, stabilised, declared through ``defop``), then sums the result back to
the input's shape with ``sum_like``, whose own pullback is a broadcast. The
structural ops' pullbacks use only ops that have pullbacks too
(:mod:`symdiff.shape_ops`), so the result is an ordinary graph: it evaluates
with ``Autograd``, the passes, fusion and compiled kernels apply to it, and it
can be passed to ``grad`` again, for any order.

``jvp`` pushes tangents forward with genuine forward rules built from the same
partial-derivative ops. ``hvp`` is forward-over-reverse: the forward rules
applied to the gradient graph (measured against reverse-over-reverse in
``benchmarks/bench.py``; see the README).

Differentiation happens on the register graph, before the passes, so the
passes' own multi-output steps (stacked products, cuts, fused groups) never
need rules of their own: they are rebuilt on the gradient graph.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import shape_ops  # noqa: F401  (registers the ops gradient graphs are made of)
from .autograd import Autograd
from .errors import GradientError, SymdiffError
from .array_ops import PULLBACKS as FAMILY_PULLBACKS, PUSHFORWARDS as FAMILY_PUSHFORWARDS, sum_op
from .derivative_ops import constant_like, elementwise_op, identity_op, partial, scale_op
from .graph import Register, Step, WengertList, XMan
from .passes import GRAPH_PASSES
from .registry import Op, get_op

__all__ = ["grad", "hvp", "jvp", "HVP", "JVP", "wengert_for", "PULLBACKS", "PUSHFORWARDS", "GradientError"]


# --------------------------------------------------------------------------------------
# building registers, with common subexpressions shared
# --------------------------------------------------------------------------------------
class Builder:
    """Applies ops to registers, reusing a register when the same op was applied to the same inputs.

    ``shapes`` (register name → shape), when given, are the shapes the graph will be evaluated
    with: a sum back to an input's shape (``sum_like``) or a broadcast to the output's
    (``broadcast_like``) that these shapes make a no-op is then left out. Such a graph holds only
    for inputs of those shapes (``HVP`` builds one per set of input shapes); without ``shapes``
    every one is kept.
    """

    def __init__(self, existing: Sequence[Register] = (), shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self._made: dict[tuple[int, tuple[int, ...]], Register] = {}
        self._shapes = shapes or {}
        for r in existing:
            if r.op is not None:
                self._made.setdefault((id(r.op), tuple(id(i) for i in r.inputs)), r)

    def __call__(self, op: Op | str, *inputs: Register) -> Register:
        op = get_op(op) if isinstance(op, str) else op
        key = (id(op), tuple(id(i) for i in inputs))
        reg = self._made.get(key)
        if reg is None:
            reg = self._made[key] = Register.operation(op, inputs)
        return reg

    def same_shape(self, a: Register, b: Register) -> bool:
        """Whether ``a`` and ``b`` are known to have the same shape (False when either is unknown)."""
        sa = self._shapes.get(a.name) if a.name is not None else None
        return sa is not None and b.name is not None and self._shapes.get(b.name) == sa

    def add(self, terms: Sequence[Register]) -> Register:
        total = terms[0]
        for t in terms[1:]:
            total = self("add", total, t)
        return total

    def times_constant(self, c: Any, g: Register) -> Register | None:
        """``c * g`` for a SymPy number ``c`` (None for 0)."""
        if c == 0:
            return None
        if c == 1:
            return g
        if c == -1:
            return self("negate", g)
        return self(scale_op(c), g)

    def times_partial(self, op: Op, j: int, inputs: Sequence[Register], g: Register) -> Register | None:
        """``g ⊙ ∂op/∂input_j`` (``g`` times a constant when the partial derivative is one)."""
        p = partial(op, j)
        if isinstance(p, Op):
            return self("hadamard", g, self(p, *inputs))
        return self.times_constant(p, g)


Pullback = Callable[[Builder, Register, Register, tuple[Register, ...], tuple[bool, ...]],
                    Sequence["Register | None"]]
Pushforward = Callable[[Builder, Register, tuple[Register, ...], tuple["Register | None", ...]], "Register | None"]


# --------------------------------------------------------------------------------------
# pullbacks: (builder, delta, out, inputs, needed) -> one register (or None) per input
# --------------------------------------------------------------------------------------
def _pull_elementwise(op: Op) -> Pullback:
    def pull(b: Builder, delta: Register, out: Register, ins: tuple[Register, ...],
             needed: tuple[bool, ...]) -> list[Register | None]:
        grads: list[Register | None] = []
        for j, x in enumerate(ins):
            g = b.times_partial(op, j, ins, delta) if needed[j] and j not in op.nondifferentiable else None
            if g is not None and op.arity > 1 and not b.same_shape(x, out):  # x may have been broadcast: sum back
                g = b("sum_like", g, x)
            grads.append(g)
        return grads

    return pull


def _column(b: Builder, delta: Register) -> Register:
    return b("column", delta)


def _xent_dp() -> Op:
    """∂crossEnt/∂p elementwise, ``-t/p`` (summed over a row by the cross-entropy itself)."""
    return elementwise_op(lambda p, t: -t / p, 2, "crossEnt__dp")


PULLBACKS: dict[str, Pullback] = {
    "mul": lambda b, d, out, ins, need: [need[0] and b("mul_nt", d, ins[1]), need[1] and b("mul_tn", ins[0], d)],
    "mul_nt": lambda b, d, out, ins, need: [need[0] and b("mul", d, ins[1]), need[1] and b("mul_tn", d, ins[0])],
    "mul_tn": lambda b, d, out, ins, need: [need[0] and b("mul_nt", ins[1], d), need[1] and b("mul", ins[0], d)],
    "transpose": lambda b, d, out, ins, need: [b("transpose", d)],
    "softMax": lambda b, d, out, ins, need: [
        b("hadamard", out, b("subtract", d, b("rowsum", b("hadamard", d, out))))],
    "crossEnt": lambda b, d, out, ins, need: [
        need[0] and b("hadamard", _column(b, d), b(_xent_dp(), *ins)),
        need[1] and b("hadamard", _column(b, d), b("negate", b("log", ins[0])))],
    "crossEnt-softMax": lambda b, d, out, ins, need: [
        need[0] and b("hadamard", _column(b, d),
                      b("subtract", b("hadamard", b("softMax", ins[0]), b("rowsum", ins[1])), ins[1])),
        need[1] and b("hadamard", _column(b, d), b("negate", b("log_softmax", ins[0])))],
    "mean": lambda b, d, out, ins, need: [b("spread", d, ins[0])],
    "spread": lambda b, d, out, ins, need: [need[0] and b("mean", d), None],
    "rowsum": lambda b, d, out, ins, need: [b("broadcast_like", d, ins[0])],
    "sum_like": lambda b, d, out, ins, need: [need[0] and b("broadcast_like", d, ins[0]), None],
    "broadcast_like": lambda b, d, out, ins, need: [need[0] and b("sum_like", d, ins[0]), None],
    "column": lambda b, d, out, ins, need: [b("uncolumn", d)],
    "uncolumn": lambda b, d, out, ins, need: [b("column", d)],
}


# --------------------------------------------------------------------------------------
# pushforwards: (builder, out, inputs, tangents) -> the output's tangent (None: zero)
# --------------------------------------------------------------------------------------
def _push_elementwise(op: Op) -> Pushforward:
    def push(b: Builder, out: Register, ins: tuple[Register, ...], dots: tuple[Register | None, ...]) -> Register | None:
        terms, full, sources = [], False, []
        for j, dx in enumerate(dots):
            if dx is not None and j not in op.nondifferentiable:
                p = partial(op, j)
                full = full or isinstance(p, Op)  # a partial-derivative op's value has the output's shape
                t = b.times_partial(op, j, ins, dx)
                if t is not None:
                    terms.append(t)
                    sources.append(ins[j])
        if not terms:
            return None
        total = b.add(terms)
        # a tangent that only reached a broadcast input through constant partials (x + b) has that
        # input's shape: give it the output's. When every input's tangent is a term, their sum
        # broadcasts to the output's shape by itself (and a sum stays a sum for sum_products);
        # when every such input is known to have the output's shape, so has the sum
        covered = len(terms) == op.arity or all(b.same_shape(x, out) for x in sources)
        return b("broadcast_like", total, out) if op.arity > 1 and not full and not covered else total

    return push


def _bilinear(name: str) -> Pushforward:
    def push(b: Builder, out: Register, ins: tuple[Register, ...], dots: tuple[Register | None, ...]) -> Register | None:
        terms = [b(name, dots[0], ins[1]) if dots[0] is not None else None,
                 b(name, ins[0], dots[1]) if dots[1] is not None else None]
        terms = [t for t in terms if t is not None]
        return b.add(terms) if terms else None

    return push


def _linear(name: str, frozen: tuple[int, ...] = ()) -> Pushforward:
    """An op linear in its first argument (the others only lend shapes)."""
    def push(b: Builder, out: Register, ins: tuple[Register, ...], dots: tuple[Register | None, ...]) -> Register | None:
        return None if dots[0] is None else b(name, dots[0], *ins[1:])

    return push


def _row_dot(b: Builder, row_gradient: Register, dot: Register) -> Register:
    return b("uncolumn", b("rowsum", b("hadamard", row_gradient, dot)))


def _push_crossent(b: Builder, out: Register, ins: tuple[Register, ...], dots: tuple[Register | None, ...]) -> Register | None:
    p, t = ins
    terms = []
    if dots[0] is not None:
        terms.append(_row_dot(b, b(_xent_dp(), p, t), dots[0]))
    if dots[1] is not None:
        terms.append(_row_dot(b, b("negate", b("log", p)), dots[1]))
    return b.add(terms) if terms else None


def _push_crossent_softmax(b: Builder, out: Register, ins: tuple[Register, ...],
                           dots: tuple[Register | None, ...]) -> Register | None:
    o, t = ins
    terms = []
    if dots[0] is not None:
        g = b("subtract", b("hadamard", b("softMax", o), b("rowsum", t)), t)
        terms.append(_row_dot(b, g, dots[0]))
    if dots[1] is not None:
        terms.append(_row_dot(b, b("negate", b("log_softmax", o)), dots[1]))
    return b.add(terms) if terms else None


PUSHFORWARDS: dict[str, Pushforward] = {
    "mul": _bilinear("mul"),
    "mul_nt": _bilinear("mul_nt"),
    "mul_tn": _bilinear("mul_tn"),
    "transpose": _linear("transpose"),
    "softMax": lambda b, out, ins, dots: None if dots[0] is None else b(
        "hadamard", out, b("subtract", dots[0], b("rowsum", b("hadamard", out, dots[0])))),
    "crossEnt": _push_crossent,
    "crossEnt-softMax": _push_crossent_softmax,
    "mean": _linear("mean"),
    "spread": _linear("spread"),
    "rowsum": _linear("rowsum"),
    "sum_like": _linear("sum_like"),
    "broadcast_like": _linear("broadcast_like"),
    "column": _linear("column"),
    "uncolumn": _linear("uncolumn"),
}


def _pullback(op: Op) -> Pullback:
    if op.elementwise and op.symbolic is not None:
        return _pull_elementwise(op)
    rule = PULLBACKS.get(op.name) or FAMILY_PULLBACKS.get(op.family)  # f.sum(x, axis=1), x[...], ...
    if rule is None:
        raise GradientError(
            f"op {op.name!r} has no graph pullback, so its gradient cannot be built as a graph; "
            f"declare elementwise ops with symdiff.defop, or add a rule to symdiff.differential.PULLBACKS")
    return rule


def _pushforward(op: Op) -> Pushforward:
    if op.elementwise and op.symbolic is not None:
        return _push_elementwise(op)
    rule = PUSHFORWARDS.get(op.name) or FAMILY_PUSHFORWARDS.get(op.family)
    if rule is None:
        raise GradientError(
            f"op {op.name!r} has no forward rule, so its directional derivative cannot be built as a graph; "
            f"declare elementwise ops with symdiff.defop, or add a rule to symdiff.differential.PUSHFORWARDS")
    return rule


# --------------------------------------------------------------------------------------
# grad
# --------------------------------------------------------------------------------------
def _operations(xm: XMan, names: Sequence[str]) -> list[Register]:
    """The operation registers computing ``names``, inputs first, each once."""
    seen: set[str] = set()
    out = []
    for name in names:
        for step in xm.operationSequence(xm.register(name)):
            if step.output not in seen:
                seen.add(step.output)
                out.append(xm.register(step.output))
    return out


def _leaves_of(xm: XMan, ops: Sequence[Register], roots: Sequence[str]) -> set[str]:
    made = {r.name for r in ops}
    leaves = {i.name for r in ops for i in r.inputs if i.name not in made}
    return leaves | {n for n in roots if n not in made}


def _check_names(xm: XMan, of: str, wrt: Sequence[str]) -> None:
    regs = xm.registers()
    if not regs:
        raise GradientError("the XMan has no registers: assign them as attributes and call setup() first")
    if not isinstance(of, str) or of not in regs:
        raise GradientError(f"grad: 'of' must name a register of the graph, got {of!r}")
    if isinstance(wrt, str) or not wrt:
        raise GradientError(f"grad: 'wrt' must be a non-empty list of register names, got {wrt!r}")
    for w in wrt:
        r = regs.get(w)
        if r is None or r.role not in ("param", "input"):
            leaves = sorted(n for n, r2 in regs.items() if r2.role in ("param", "input"))
            what = "no register" if r is None else "an operation output, not a param or input"
            raise GradientError(f"grad: wrt name {w!r} is {what}; differentiate with respect to a param or "
                                f"input: {', '.join(leaves)}")
    if len(set(wrt)) != len(wrt):
        raise GradientError(f"grad: wrt names must be distinct, got {list(wrt)}")


def _scalar_check(xm: XMan, of: str, values: Mapping[str, Any] | None) -> None:
    """``of`` must be a scalar: checked on the default values (or ``values``) when every leaf has one."""
    ops = _operations(xm, [of])
    leaves = _leaves_of(xm, ops, [of])
    vals = xm.inputDict() if values is None else values
    if any(n not in vals for n in leaves):
        return  # nothing to evaluate with: checked when the gradient graph runs
    if not ops:
        shape = np.shape(vals[of])
    else:
        with np.errstate(all="ignore"):
            v = Autograd(xm, passes=(), fuse=False, native=False).eval(WengertList(
                Step(r.name, r.op.name, tuple(i.name for i in r.inputs)) for r in ops), vals)
        shape = np.shape(v[of])
    if int(np.prod(shape)) != 1:
        raise GradientError(f"grad: register {of!r} has shape {tuple(shape)}, not a scalar; differentiate a "
                            f"scalar such as f.mean(...) or f.sum(...) of it")


def grad(xm: XMan, of: str, wrt: Sequence[str], *, prefix: str = "grad_") -> XMan:
    """A new, set-up ``XMan`` holding every register of ``xm`` plus ``{prefix}<name>`` = ∂of/∂name.

    ``of`` names a scalar register; ``wrt`` names params or inputs. The result is
    made of registered ops, so it evaluates with ``Autograd``, can be extended
    (assign attributes, ``setup()``) and differentiated again with ``grad`` (pass
    another ``prefix`` when ``grad_<name>`` already exists). ``xm`` is not changed.
    Adjoints of intermediate registers are named ``{prefix}<register>`` where free.
    """
    _check_names(xm, of, wrt)
    return _grad(xm, of, wrt, prefix, None)


def _grad(xm: XMan, of: str, wrt: Sequence[str], prefix: str, shapes: Mapping[str, tuple[int, ...]] | None) -> XMan:
    """``grad``; with ``shapes`` (see :class:`Builder`) the result holds only for inputs of those shapes."""
    regs = xm.registers()
    for w in wrt:
        if f"{prefix}{w}" in regs:
            raise GradientError(f"grad: the graph already has a register {prefix + w!r}; pass another prefix=, "
                                f"e.g. grad(..., prefix='d2_') for a second derivative")
    _scalar_check(xm, of, None)
    ops = _operations(xm, [of])
    build = Builder(list(regs.values()), shapes)
    # registers on a path from a wrt leaf to `of`: the only ones a gradient flows through
    depends = set(wrt)
    for r in ops:
        if any(i.name in depends for i in r.inputs):
            depends.add(r.name)
    root = xm.register(of)
    adjoint: dict[str, list[Register]] = {}
    if of in depends:
        adjoint[of] = [build(constant_like(1), root)]
    totals: dict[str, Register] = {}
    for r in reversed(ops):
        parts = adjoint.pop(r.name, None)
        if not parts:
            continue
        delta = totals[r.name] = build.add(parts)
        needed = tuple(i.name in depends for i in r.inputs)
        contributions = _pullback(r.op)(build, delta, r, r.inputs, needed)
        for x, g, need in zip(r.inputs, contributions, needed):
            if need and g is not None and g is not False:
                adjoint.setdefault(x.name, []).append(g)
    gx = XMan()
    for attr, value in vars(xm).items():
        if isinstance(value, Register):
            setattr(gx, attr, value)
    claimed: set[int] = {id(r) for r in regs.values()}
    for w in wrt:
        parts = adjoint.get(w)
        g = build.add(parts) if parts else build(constant_like(0), xm.register(w))
        if id(g) in claimed or g.name is not None:  # shared with another register: give it its own step
            g = Register.operation(identity_op(), (g,))
        g.name = f"{prefix}{w}"
        claimed.add(id(g))
        setattr(gx, f"{prefix}{w}", g)
    taken = set(regs) | {f"{prefix}{w}" for w in wrt}
    for name, t in totals.items():
        if t.name is None and id(t) not in claimed and f"{prefix}{name}" not in taken:
            t.name = f"{prefix}{name}"
            taken.add(t.name)
            claimed.add(id(t))
    return gx.setup()


def wengert_for(xm: XMan, names: Sequence[str]) -> WengertList:
    """One Wengert list computing every register in ``names`` (each step once, inputs first)."""
    steps = WengertList()
    seen: set[str] = set()
    for name in names:
        for step in xm.operationSequence(xm.register(name)):
            if step.output not in seen:
                seen.add(step.output)
                steps.append(step)
    return steps


# --------------------------------------------------------------------------------------
# forward mode
# --------------------------------------------------------------------------------------
def _push(xm: XMan, outs: Sequence[str], tangent_inputs: Mapping[str, Register],
          build: Builder) -> dict[str, Register | None]:
    """Tangent registers of ``outs`` given tangent registers of some leaves (others: zero)."""
    dots: dict[str, Register | None] = dict(tangent_inputs)
    for r in _operations(xm, outs):
        in_dots = tuple(dots.get(i.name) for i in r.inputs)
        dots[r.name] = None if all(d is None for d in in_dots) else _pushforward(r.op)(build, r, r.inputs, in_dots)
    return {o: dots.get(o) for o in outs}


def _free_name(taken: Any, base: str) -> str:
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}{k}"
    return name


def _free_prefix(regs: Any, wrt: Sequence[str], base: str) -> str:
    """``base`` (or ``base`` with a number) such that no ``prefix + name`` is a register already."""
    k = 1
    prefix = base
    while any(prefix + w in regs for w in wrt):
        k += 1
        prefix = f"{base.rstrip('_')}{k}_"
    return prefix


def _check_arrays(kind: str, arrays: Mapping[str, Any], values: Mapping[str, Any], allowed: Sequence[str],
                  xm: XMan) -> dict[str, np.ndarray]:
    out = {}
    for name, a in arrays.items():
        if name not in allowed:
            raise GradientError(f"{kind} given for {name!r}, which is not one of {list(allowed)}")
        if name not in values:
            raise GradientError(f"no value for register {name!r}: pass it in values (e.g. xm.inputDict({name}=...))")
        a = np.asarray(a)
        shape = np.shape(values[name])
        if a.shape != tuple(shape):
            raise GradientError(f"the {kind[:-1]} for register {name!r} has shape {a.shape}, but {name!r} has "
                                f"shape {tuple(shape)}")
        out[name] = a
    return out


class JVP:
    """The directional derivative of one register, built once as a graph and evaluated on demand.

    Cost: the forward pass plus one tangent pass of about the same number of
    steps (each elementwise op adds one partial-derivative op and a product per
    input with a tangent): roughly 2-3x one ``eval``, measured in the benchmark.
    """

    def __init__(self, xm: XMan, out: str, wrt: Sequence[str], *, native: bool | None = None) -> None:
        regs = xm.registers()
        if out not in regs:
            raise GradientError(f"jvp: no register named {out!r}")
        for w in wrt:
            if w not in regs or regs[w].role not in ("param", "input"):
                raise GradientError(f"jvp: tangent given for {w!r}, which is not a param or input of the graph")
        build = Builder(list(regs.values()))
        gx = XMan()
        for attr, value in vars(xm).items():
            if isinstance(value, Register):
                setattr(gx, attr, value)
        self.tangent_names = {}
        taken = set(regs)
        t_in = {}
        for w in wrt:
            name = _free_name(taken, f"tangent_{w}")
            taken.add(name)
            self.tangent_names[w] = name
            t_in[w] = Register("input", name=name)
            setattr(gx, name, t_in[w])
        dot = _push(xm, [out], t_in, build)[out]
        self.out = out
        self.result = None
        if dot is not None:
            if dot.name is not None:
                dot = Register.operation(identity_op(), (dot,))
            dot.name = _free_name(taken, f"jvp_{out}")
            setattr(gx, dot.name, dot)
            self.result = dot.name
        self.graph = gx.setup()
        self.autograd = Autograd(gx, passes=GRAPH_PASSES, native=native)
        self.wengert = wengert_for(gx, [out] + ([self.result] if self.result else []))
        self.wrt = tuple(wrt)
        self.program = self.autograd.compile(self.wengert)  # as HVP: no boundaries, intermediates released

    def __call__(self, tangents: Mapping[str, Any], values: Mapping[str, Any]) -> np.ndarray:
        tangents = _check_arrays("tangents", tangents, values, self.wrt, self.graph)
        feed = dict(values)
        for w in self.wrt:
            feed[self.tangent_names[w]] = tangents[w] if w in tangents else np.zeros(np.shape(values[w]))
        p = self.program
        v = p.forward(feed, keep=[self.out] + ([self.result] if self.result else []), backward=False)
        out = v[p.slot[self.out]]
        if self.result is None:
            return np.zeros(np.shape(out), dtype=np.result_type(out, 1.0))
        return np.asarray(v[p.slot[self.result]])


def jvp(xm: XMan, out: str, tangents: Mapping[str, Any], values: Mapping[str, Any] | None = None) -> np.ndarray:
    """Forward mode: d(register ``out``) along ``tangents`` (name → array; other leaves: tangent 0), at ``values``."""
    values = xm.inputDict() if values is None else values
    if not isinstance(tangents, Mapping) or not tangents:
        raise GradientError("jvp: tangents must be a non-empty dict name -> array")
    return _cached(xm, ("jvp", out, tuple(sorted(tangents))),
                   lambda: JVP(xm, out, sorted(tangents)))(tangents, values)


# --------------------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------------------
def _shapes(graph: XMan, names: Sequence[str], values: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every register's shape on the way to ``names`` at ``values`` (one plain numpy evaluation);
    empty when they cannot be evaluated (a missing input, a shape error): nothing is left out
    then, and the error comes from the real program, at the call that needs it."""
    try:
        with np.errstate(all="ignore"):
            v = Autograd(graph, passes=(), fuse=False, native=False).eval(wengert_for(graph, names), values)
    except (SymdiffError, ValueError, TypeError, IndexError):
        return {}
    return {name: tuple(np.shape(value)) for name, value in v.items()}


class HVP:
    """``H·v`` of a scalar register with respect to some leaves, built once per set of input shapes.

    ``mode="forward"`` (the default, forward-over-reverse) pushes the vectors
    forward through the gradient graph; ``mode="reverse"`` (reverse-over-reverse)
    differentiates ⟨∇f, v⟩ again with ``grad``. Both give the same numbers; the
    benchmark times them (``benchmarks/bench.py``).

    The graph is built for the shapes of ``values`` (default ``xm.inputDict()``), which
    lets it leave out the sums back to an input's shape that are no-ops at those shapes
    (an LSTM's HVP: 352 of 393); a call with inputs of other shapes (a last, smaller
    batch) builds the graph for those once more. ``graph``, ``wengert`` and ``program``
    are those of the latest call's shapes.
    """

    def __init__(self, xm: XMan, of: str, wrt: Sequence[str], *, mode: str = "forward",
                 native: bool | None = None, values: Mapping[str, Any] | None = None) -> None:
        if mode not in ("forward", "reverse"):
            raise GradientError(f"hvp: mode must be 'forward' or 'reverse', got {mode!r}")
        _check_names(xm, of, wrt)
        self._xm, self._native = xm, native
        self.wrt, self.of, self.mode = tuple(wrt), of, mode
        self._leaves = sorted(_leaves_of(xm, _operations(xm, [of]), [of]))
        self._built: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._use(xm.inputDict() if values is None else values)

    def _signature(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(tuple(np.shape(values[n])) if n in values else None for n in self._leaves)

    def _use(self, values: Mapping[str, Any]) -> None:
        """Make the graph for the shapes of ``values`` (built once per signature) the current one."""
        sig = self._signature(values)
        if sig not in self._built:
            if len(self._built) >= 4:
                self._built.clear()
            self._built[sig] = self._build(values if all(s is not None for s in sig) else {})
        self._sig = sig
        (self.graph, self.vector_names, self.results, self.autograd, self.wengert, self.program) = self._built[sig]

    def _build(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        xm, of, wrt = self._xm, self.of, self.wrt
        regs = xm.registers()
        prefix = _free_prefix(regs, wrt, "grad_")
        gx = _grad(xm, of, wrt, prefix, _shapes(xm, [of], values) if values else None)
        taken = set(gx.registers())
        vector_names = {}
        for w in wrt:
            name = _free_name(taken, f"vector_{w}")
            taken.add(name)
            vector_names[w] = name
        vin = {w: Register("input", name=vector_names[w]) for w in wrt}
        for w in wrt:
            setattr(gx, vector_names[w], vin[w])
        feed = {**values, **{vector_names[w]: np.zeros(np.shape(values[w])) for w in wrt}} if values else {}
        if self.mode == "reverse":
            build = Builder(list(gx.registers().values()))
            dots = [build(sum_op(), build("hadamard", gx.register(f"{prefix}{w}"), vin[w])) for w in wrt]
            s = build.add(dots)
            name = _free_name(taken, "grad_dot_vector")
            if s.name is not None:
                s = Register.operation(identity_op(), (s,))
            setattr(gx, name, s)
            gx.setup()
            p2 = _free_prefix(gx.registers(), wrt, "hvp_")
            hx = _grad(gx, name, wrt, p2, _shapes(gx, [name], feed) if feed else None)
            results = [f"{p2}{w}" for w in wrt]
        else:
            gx.setup()
            grads = [f"{prefix}{w}" for w in wrt]
            build = Builder(list(gx.registers().values()), _shapes(gx, grads, feed) if feed else None)
            dots = _push(gx, grads, vin, build)
            hx = gx
            results = []
            for w in wrt:
                d = dots[f"{prefix}{w}"]
                if d is None:
                    d = build(constant_like(0), gx.register(w))
                if d.name is not None:
                    d = Register.operation(identity_op(), (d,))
                d.name = _free_name(taken, f"hvp_{w}")
                taken.add(d.name)
                setattr(hx, d.name, d)
                results.append(d.name)
            hx.setup()
        autograd = Autograd(hx, passes=GRAPH_PASSES, native=self._native)
        wengert = wengert_for(hx, results)
        # no backward runs over this program and only the results are read: no register is a
        # boundary for the passes, and each intermediate is released after its last use, so
        # memory is reused while in cache (an LSTM HVP: ~40% of its time was fresh pages)
        return hx, vector_names, results, autograd, wengert, autograd.compile(wengert)

    def __call__(self, vectors: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = [w for w in self.wrt if w not in vectors]
        if missing:
            raise GradientError(f"hvp: no vector given for {missing}; pass one array per wrt name")
        vectors = _check_arrays("vectors", vectors, values, self.wrt, self.graph)
        if self._signature(values) != self._sig:
            self._use(values)
        feed = dict(values)
        feed.update({self.vector_names[w]: vectors[w] for w in self.wrt})
        p = self.program
        v = p.forward(feed, keep=self.results, backward=False)
        return {w: np.asarray(v[p.slot[r]]) for w, r in zip(self.wrt, self.results)}


def hvp(xm: XMan, of: str, wrt: Sequence[str], vectors: Mapping[str, Any],
        values: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The Hessian of scalar ``of`` with respect to ``wrt`` applied to ``vectors``, at ``values``.

    ``vectors`` maps each name of ``wrt`` to an array of that register's shape;
    ``values`` is a dict as for ``eval`` (default ``xm.inputDict()``). Returns one
    array per name. The graph is built once per (graph, of, wrt) and reused.
    """
    if isinstance(wrt, str):
        raise GradientError(f"hvp: wrt must be a list of names, got the string {wrt!r}")
    values = xm.inputDict() if values is None else values
    _check_names(xm, of, wrt)
    _check_arrays("vectors", vectors, values, wrt, xm)

    def make() -> HVP:
        _scalar_check(xm, of, values)  # once, before the graph is built
        return HVP(xm, of, wrt, values=values)

    return _cached(xm, ("hvp", of, tuple(wrt)), make)(vectors, values)


_CACHE: "weakref.WeakKeyDictionary[XMan, dict[Any, Any]]" = weakref.WeakKeyDictionary()


def _cached(xm: XMan, key: Any, make: Callable[[], Any]) -> Any:
    """One built graph per XMan, request and register set (``setup()`` again: built anew)."""
    per = _CACHE.setdefault(xm, {})
    full = (key, tuple(sorted(xm.registers())))
    if full not in per:
        if len(per) > 16:
            per.clear()
        per[full] = make()
    return per[full]
