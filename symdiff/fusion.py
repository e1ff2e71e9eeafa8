"""Fusion: a connected group of elementwise steps becomes one composite expression.

The fusion pass (:mod:`symdiff.passes`) describes a group as a :class:`GroupSpec`;
:func:`fused_kernel` composes the ops' SymPy expressions into one, derives its gradients
jointly, and lambdifies them (cached by structure: the ten identical LSTM cells derive
once). Each kernel runs compiled C (:mod:`symdiff.cprint` prints it, :mod:`symdiff.native`
builds it) where the arrays fit, numpy otherwise; :class:`_Native` is that glue.

Only the SymPy side of the engine imports SymPy: :mod:`symdiff.stable`,
:mod:`symdiff.declare`, :mod:`symdiff.cprint`, :mod:`symdiff.fusion`, and :mod:`symdiff.ops`
(which declares the built-in ops with it). Everything else (graph, registry, compiler,
passes, native) runs on numpy alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import sympy as sp

from . import native
from .cprint import c_missing, c_source
from .declare import keeps_float32, lambdify_numpy
from .registry import MULTI_OPS, get_op, sum_to_shape
from .stable import Relu, Sigmoid, Step, stabilise


class _Native:
    """A kernel that runs compiled C when the arrays fit, numpy otherwise (see :mod:`symdiff.native`).

    Built lazily, on the first call big enough to be worth it, and only once: a kernel
    that fails to build stays numpy for good (``error`` says why).
    """

    def __init__(self, name: str, operands: Sequence[sp.Symbol], outputs: Sequence[sp.Expr]) -> None:
        self.name, self.operands, self.outputs = name, tuple(operands), tuple(outputs)
        self.fns: tuple[int, int] | None = None
        self.error: str | None = None
        self.source = ""
        lacking = c_missing(self.outputs)
        if lacking:  # e.g. a Bessel function: C99 has none, so numpy/SciPy it is, from the start
            self.error = f"C99 has no {', '.join(lacking)}: runs with numpy/SciPy"

    def ready(self, arrays: Sequence[Any]) -> tuple[int, int] | None:
        """The compiled kernels' addresses (float64, float32), built now if these arrays are
        the first big enough to be worth it; None while not built, or if it cannot be."""
        if self.fns is None and self.error is None and any(getattr(a, "size", 0) >= native.MIN_ELEMENTS
                                                           for a in arrays):
            if not native.enabled():
                self.error = f"native kernels {native.status()}"
                return None
            try:
                self.source = c_source("k", self.operands, self.outputs)
                self.fns = native.load_kernels(self.source, ("k_f64", "k_f32"), stem=_c_stem(self.name))
            except Exception as exc:  # noqa: BLE001 - unprintable or uncompilable: numpy it is
                self.error = f"{type(exc).__name__}: {exc}"[:300]
        return self.fns


@dataclass(frozen=True)
class NativeBackward:
    """A compiled backward kernel: operands read (``used``), needed input -> output block (``grads``)."""

    native: _Native
    used: bytes
    grads: tuple[tuple[int, int], ...]
    n_distinct: int


def _c_stem(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)[:40]


@dataclass(frozen=True)
class GroupSpec:
    """The structure of a group of elementwise steps, in local terms (hashable: the cache key).

    ``steps[j] = (op name, args)`` where each arg is ``("in", k)`` (group input k)
    or ``("step", i)`` (the value of local step i < j). ``outputs`` are the local
    steps whose values leave the group (they receive gradients); ``saved`` are
    internal steps worth keeping for the backward pass (transcendental values
    such as a sigmoid's output, which the derivatives reuse).
    """

    steps: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]
    n_inputs: int
    outputs: tuple[int, ...]
    saved: tuple[int, ...]

    @property
    def results(self) -> tuple[int, ...]:
        """Local steps the fused forward returns: the outputs, then the saved values."""
        return self.outputs + tuple(s for s in self.saved if s not in self.outputs)


def costly(op_name: str) -> bool:
    """Whether an elementwise op's value is worth saving for the backward pass (not polynomial)."""
    sym = get_op(op_name).symbolic
    return sym is not None and any(not isinstance(fn, (Relu, Step)) for fn in sym.forward.atoms(sp.Function))


#: How fused training kernels differentiate σ and tanh, chosen by measurement (README, "One trade"):
#: ``"saved"``, σ(1 − σ) and 1 − tanh² of the saved values (no transcendental in the backward kernel,
#: relative precision lost where the derivative is below 1e-16 of the gradient it scales), or
#: ``"exact"``, each op's own measured derivative (σ(u)σ(−u) as r·σ(−u), 4σ(2u)σ(−2u): one vectorised
#: ``sd_exp`` each, but u is recomputed from the group's inputs). ``python -m benchmarks.bench`` times
#: both in the same run ("engine, exact σ'/tanh'" against "engine"); kernels are cached per setting.
FUSED_DERIVATIVES = "saved"

_OP_CALLS: dict[tuple[int, bool], tuple[Any, type]] = {}


def _op_call(op: Any, exact: bool = False) -> type:
    """A SymPy function standing for one application of a declared op, for the chain rule.

    Differentiating a composite of these uses each op's *own* derivative, the form its
    declaration chose by measured error (σ' = σ(u)σ(-u), tanh' = sech²), instead of
    SymPy re-deriving it from the forward expression (σ(1 - σ), 1 - tanh²); ``unwrap``
    gives the plain composite back. ``exact``: see :data:`FUSED_DERIVATIVES`.
    """
    hit = _OP_CALLS.get((id(op), exact))
    if hit is not None and hit[0] is op:
        return hit[1]
    sym = op.symbolic
    local = tuple(sym.derivatives[j] if exact else _fused_derivative(sym, j) for j in range(len(sym.args)))

    def fdiff(self: Any, argindex: int = 1) -> sp.Expr:
        return local[argindex - 1].xreplace(dict(zip(sym.args, self.args)))

    def unwrap(self: Any) -> sp.Expr:
        return sym.forward.xreplace(dict(zip(sym.args, self.args)))

    cls = type(f"op_{_c_stem(op.name)}_{len(_OP_CALLS)}", (sp.Function,),
               {"nargs": op.arity, "fdiff": fdiff, "unwrap": unwrap})
    _OP_CALLS[(id(op), exact)] = (op, cls)
    return cls


def _fused_derivative(sym: Any, j: int) -> sp.Expr:
    """The derivative a fused kernel uses for argument j of an op: its chosen one, except where
    that reads the op's inputs again while the plain derivative needs only the op's value.

    σ' = σ(u)σ(−u) and tanh' = 4σ(2u)σ(−2u) are exact in the tails, but inside a fused LSTM
    step they recompute the gate sums from all 13 input blocks in the backward kernel
    (measured: the LSTM epoch 0.31 → 0.62 of the hand-written reference); σ(1 − σ) and
    1 − tanh² read only the saved values. So fused kernels keep those and lose the tails
    (|u| > ~19 for tanh, > ~37 for σ, where these derivatives are below 1e-16): the
    training trade of :meth:`FusedKernel._fast_output_forms`, here for the chain rule.
    """
    chosen = sym.derivatives[j]
    plain = stabilise(sp.diff(sym.forward, sym.args[j]))
    if sym.forward in sym.args or not (chosen.free_symbols & set(sym.args)):
        return chosen
    marker = sp.Dummy("value")
    in_value = plain.subs(sym.forward, marker)
    if in_value != plain and not (in_value.free_symbols & set(sym.args)):
        return plain
    return chosen


def _unwrap(e: sp.Expr) -> sp.Expr:
    """Every op application of :func:`_op_call` replaced by its forward expression, innermost first."""
    if not e.args:
        return e
    args = [_unwrap(a) for a in e.args]
    if any(a is not b for a, b in zip(args, e.args)):
        e = e.func(*args)
    return e.unwrap() if hasattr(e, "unwrap") else e


class FusedKernel:
    """One fused group: a forward returning all results, and backward kernels per needed-input mask."""

    def __init__(self, name: str, spec: GroupSpec) -> None:
        self.name, self.spec = name, spec
        self.exact = FUSED_DERIVATIVES == "exact"  # fixed at creation: fused_kernel caches per setting
        self.inputs = tuple(sp.Dummy(f"in{k}", real=True) for k in range(spec.n_inputs))
        exprs: list[sp.Expr] = []
        calls: list[sp.Expr] = []  # the same composite of op applications, differentiated by the chain rule
        for op_name, args in spec.steps:
            op = get_op(op_name)
            sym = op.symbolic
            vals = [self.inputs[k] if kind == "in" else exprs[k] for kind, k in args]
            exprs.append(sym.forward.xreplace(dict(zip(sym.args, vals))))
            calls.append(_op_call(op, self.exact)(*(self.inputs[k] if kind == "in" else calls[k] for kind, k in args)))
        self.expressions = tuple(exprs)
        self._calls = tuple(calls)
        self.results = spec.results
        self.result_symbols = tuple(sp.Dummy(f"r{r}", real=True) for r in self.results)
        self.delta_symbols = tuple(sp.Dummy(f"d{o}", real=True) for o in spec.outputs)
        self.n_inputs, self.n_deltas = spec.n_inputs, len(spec.outputs)
        self.forward, self.forward_source = lambdify_numpy(self.inputs, [exprs[r] for r in self.results])
        deps: list[set[int]] = []  # group inputs each local step depends on, structurally
        for _, args in spec.steps:
            deps.append(set().union(*({k} if kind == "in" else deps[k] for kind, k in args)))
        uses = [sorted(deps[r]) for r in self.results]
        self._conform_forward(spec, uses)
        self.numpy_forward = self.forward
        self.native_forward = _Native(f"{name}_forward", self.inputs, [exprs[r] for r in self.results])
        self.forward_deps = tuple(sum(1 << k for k in use) for use in uses)  # result i's inputs, as bits
        self.forward = self._forward_native_first(self.forward_deps)
        self._backward: dict[tuple[bool, ...], tuple[Callable[..., Any], str, tuple[sp.Expr, ...]]] = {}
        self._backward_terms: dict[Any, Callable[..., Any]] = {}
        self._native_backward: dict[tuple[bool, ...], NativeBackward] = {}

    def internally_used(self, names: Sequence[str]) -> tuple[str, ...]:
        """Which of the step's output ``names`` the group itself also consumes (see Autograd.bprop)."""
        used = {k for _, args in self.spec.steps for kind, k in args if kind == "step"}
        return tuple(n for n, r in zip(names, self.results) if r in self.spec.outputs and r in used)

    def _forward_native_first(self, deps: tuple[int, ...]) -> Callable[..., Any]:
        """The forward kernel: compiled C where the arrays fit it, else the numpy one.

        ``deps[i]`` (a bitmask of inputs) lets the dispatcher check that result i
        really has the full broadcast shape the C loop writes.
        """
        nat, numpy_forward = self.native_forward, self.numpy_forward
        if len(self.inputs) > 64:
            return numpy_forward

        def forward(*xs: Any) -> Any:
            fns = nat.fns
            if fns is None:
                fns = nat.ready(xs)
            if fns is not None:
                out = native.dispatcher().forward(fns, xs, deps)
                if out is not None:
                    return out
            return numpy_forward(*xs)

        return forward

    def native_backward(self, needed: tuple[bool, ...]) -> Callable[..., Any]:
        """``bw(deltas, results, inputs) -> list | None``: the needed gradients from compiled C.

        ``deltas`` may hold ``None`` (no gradient reached that output). ``None`` back
        means the arrays do not fit the C loop (or nothing was compiled): use
        :meth:`backward`. Gradients equal for several inputs (d/dx and d/dy of x + y)
        are computed once; full-shape ones come back as side-by-side column blocks of
        one buffer (so a cut's backward joins them without copying).
        """
        plan = self.native_backward_plan(needed)
        nat, used, gmap, n_distinct = plan.native, plan.used, plan.grads, plan.n_distinct

        def bw(deltas: list[Any], results: list[Any], inputs: list[Any]) -> list[Any] | None:
            fns = nat.fns
            if fns is None:
                fns = nat.ready(results)
                if fns is None:
                    return None
            return native.dispatcher().backward(fns, deltas, results, inputs, used, gmap, n_distinct)

        return bw

    def native_backward_plan(self, needed: tuple[bool, ...]) -> "NativeBackward":
        """The compiled backward kernel for ``needed`` and how its outputs map to the inputs."""
        plan = self._native_backward.get(needed)
        if plan is None:
            grads = self.gradient_expressions(needed)
            wrt = [j for j, need in enumerate(needed) if need]
            # in input order: the fusion pass puts a cut's blocks side by side in layout order, so
            # their gradients are then side by side in the buffer too
            distinct = list(dict.fromkeys(grads))
            operands = (*self.delta_symbols, *self.result_symbols, *self.inputs)
            free = set().union(*(g.free_symbols for g in distinct))
            plan = self._native_backward[needed] = NativeBackward(
                _Native(f"{self.name}_backward", operands, distinct), bytes(int(s in free) for s in operands),
                tuple((j, distinct.index(g)) for j, g in zip(wrt, grads)), len(distinct))
        return plan

    def gradients(self, needed: tuple[bool, ...], deltas: Sequence[Any], results: Sequence[Any],
                  inputs: Sequence[Any]) -> list[Any]:
        """The needed inputs' gradients from the numpy kernels, each of its input's shape and dtype.

        ``deltas`` hold 0 where no gradient arrived. When the outputs differ in shape
        (one broadcast, one not) each term is summed back to its input's shape on its
        own, or a broadcast term would be over-counted.
        """
        args = (*deltas, *results, *inputs)
        wanted = [x for x, need in zip(inputs, needed) if need]
        n_out = self.n_deltas
        if n_out > 1 and len({d.shape for d in deltas if hasattr(d, "shape")}) > 1:
            terms = self.backward_terms(needed)(*args)
            return [sum(sum_to_shape(terms[a * n_out + k], x.shape, x.dtype) for k in range(n_out))
                    for a, x in enumerate(wanted)]
        grads = self.backward(needed)(*args)
        return [d if getattr(d, "shape", None) == x.shape and d.dtype == x.dtype else sum_to_shape(d, x.shape, x.dtype)
                for x, d in zip(wanted, grads)]

    def _conform_forward(self, spec: GroupSpec, uses: list[list[int]]) -> None:
        """Give each result the shape and dtype the unfused steps would have given it.

        Unfused, every op broadcasts all its inputs and keeps their float dtype; a
        composite expression drops inputs an op ignores (a constant, ``x`` of
        ``f(x, y) = x``) and may widen float32 (``select`` of Python constants). Such
        groups, found once here, get a wrapper; the others keep the bare kernel.
        """
        exact = all({self.inputs[k] for k in use} <= self.expressions[r].free_symbols
                    for r, use in zip(self.results, uses))
        if exact and keeps_float32(self.forward, spec.n_inputs):
            return
        raw = self.forward

        def forward(*xs: Any) -> list[Any]:
            dtype = np.result_type(*xs, 1.0)
            return [np.broadcast_to(o, np.broadcast_shapes(*(np.shape(xs[k]) for k in use))).astype(dtype)
                    for o, use in zip(raw(*xs), uses)]

        self.forward = forward

    def _fast_output_forms(self, to_result: dict[sp.Expr, Any]) -> dict[sp.Expr, Any]:
        """The training kernels' one trade of tail precision for speed: σ(-u) read as ``1 - r``.

        A saved sigmoid ``r = σ(u)`` makes σ'(u) = σ(u)σ(-u) into ``r·(1 - r)``, and
        (with :func:`stabilise`, not :func:`refine`) tanh' stays ``1 - r²``: no
        transcendental in the backward kernel. Both lose their *relative* precision
        where σ or tanh round to ±1 (|u| ≳ 18), where the derivative is below 1e-16
        of the gradient it scales, so the gradient's absolute error stays at rounding
        level. The precise forms (σ(u)σ(-u), 4σ(2u)σ(-2u): the op kernels', gradient
        graphs' and every higher order's) cost 25% of an LSTM training epoch here,
        measured (compiled kernels, 2026-11-30). Tests hold fused and unfused to 1e-12.
        With :data:`FUSED_DERIVATIVES` ``"exact"`` nothing is traded.
        """
        out = dict(to_result)
        if self.exact:
            return out
        out.update({Sigmoid(-e.args[0]): 1 - s for e, s in to_result.items() if isinstance(e, Sigmoid)})
        return out

    def gradient_terms(self, needed: Sequence[bool]) -> tuple[sp.Expr, ...]:
        """``delta_k * d(result k)/d(input j)`` for each needed j and each output k, flattened.

        Used when the group's outputs differ in shape: each term must then be
        summed back to the input's shape on its own before the terms are added.
        """
        to_result = {self.expressions[r]: s for r, s in zip(self.results, self.result_symbols)}
        to_result = self._fast_output_forms(to_result)
        return tuple(stabilise(d * self._derivative(o, j)).xreplace(to_result)
                     for j, need in enumerate(needed) if need
                     for o, d in zip(self.spec.outputs, self.delta_symbols))

    def _derivative(self, o: int, j: int) -> sp.Expr:
        """d(local step o)/d(input j) by the chain rule over the ops' own measured derivatives."""
        return _unwrap(sp.diff(self._calls[o], self.inputs[j]))

    def backward_terms(self, needed: tuple[bool, ...]) -> Callable[..., Any]:
        """Like :meth:`backward`, but returns the per-output terms (see :meth:`gradient_terms`)."""
        key = ("terms", needed)
        if key not in self._backward_terms:
            fn, _ = lambdify_numpy((*self.delta_symbols, *self.result_symbols, *self.inputs),
                              list(self.gradient_terms(needed)))
            self._backward_terms[key] = fn
        return self._backward_terms[key]

    def gradient_expressions(self, needed: Sequence[bool]) -> tuple[sp.Expr, ...]:
        """dL/d(input j) for each needed j, written with the saved results wherever they occur."""
        to_result = {self.expressions[r]: s for r, s in zip(self.results, self.result_symbols)}
        # relu'(u) = step(u) = step(relu(u)): read the saved result instead of recomputing u
        to_result.update({Step(e.args[0]): Step(s) for e, s in list(to_result.items()) if isinstance(e, Relu)})
        to_result = self._fast_output_forms(to_result)
        grads = []
        for j, need in enumerate(needed):
            if not need:
                continue
            g = sum((d * self._derivative(o, j) for o, d in zip(self.spec.outputs, self.delta_symbols)), sp.S.Zero)
            # factor_terms: c·δc + c·δh·o·(1-tanh²) → c·(δc + δh·o·(1-tanh²)), whose sum CSE then
            # shares between all the gates' gradients (17 numpy calls per LSTM cell become 10)
            grads.append(sp.factor_terms(stabilise(g).xreplace(to_result)))
        return tuple(grads)

    def backward(self, needed: tuple[bool, ...]) -> Callable[..., Any]:
        """``bp(*deltas, *results, *inputs) -> tuple`` of the needed input gradients (cached per mask)."""
        if needed not in self._backward:
            grads = self.gradient_expressions(needed)
            fn, src = lambdify_numpy((*self.delta_symbols, *self.result_symbols, *self.inputs), list(grads))
            self._backward[needed] = (fn, src, grads)
        return self._backward[needed][0]

    def runs_as(self) -> str:
        """How the kernel runs (for ``symdiff ops --fused``): compiled C, or numpy/SciPy and why."""
        kernels = [self.native_forward, *(plan.native for plan in self._native_backward.values())]
        lacking = [k.error for k in kernels if k.error and k.error.startswith("C99")]
        if lacking:
            return lacking[0]
        return "compiled C where the arrays fit" if native.enabled() else f"numpy (native kernels {native.status()})"

    def display(self) -> tuple[list[str], list[str]]:
        """Composite expressions of the results and the generated gradients, as text."""
        names = {s: sp.Symbol(f"in{k}") for k, s in enumerate(self.inputs)}
        names.update({s: sp.Symbol(f"r{r}") for r, s in zip(self.results, self.result_symbols)})
        names.update({s: sp.Symbol(f"delta{o}") for o, s in zip(self.spec.outputs, self.delta_symbols)})
        fwd = [f"r{r} = {self.expressions[r].xreplace(names)}" for r in self.results]
        bwd = []
        for mask, (_, _, grads) in self._backward.items():  # one kernel per set of inputs needing gradients
            wrt = [j for j, need in enumerate(mask) if need]
            if len(self._backward) > 1:
                bwd.append(f"backward kernel for in{', in'.join(map(str, wrt))}:")
            bwd += [f"dL/d in{j} = {g.xreplace(names)}" for j, g in zip(wrt, grads)]
        return fwd, bwd


#: fused kernels by name; the same structure (an LSTM cell at every time step) derives once
FUSED: dict[str, FusedKernel] = {}
_FUSED_BY_SPEC: dict[tuple[GroupSpec, tuple[Any, ...], str], FusedKernel] = {}


def fused_kernel(spec: GroupSpec) -> FusedKernel:
    """The kernel for ``spec``, derived on first use and cached by structure (registered in MULTI_OPS)."""
    # keyed by the Op objects too: an op redefined with replace=True must not reuse the old kernel
    key = (spec, tuple(get_op(op) for op, _ in spec.steps), FUSED_DERIVATIVES)
    kernel = _FUSED_BY_SPEC.get(key)
    if kernel is None:
        ops = "+".join(dict.fromkeys(op for op, _ in spec.steps))
        kernel = FusedKernel(f"fused{len(FUSED) + 1}[{ops}]", spec)
        _FUSED_BY_SPEC[key] = FUSED[kernel.name] = MULTI_OPS[kernel.name] = kernel
    return kernel
