"""``defop``: one SymPy expression in, a forward kernel and derived backward kernels out.

The pipeline, run once per declaration (never during training):

1. **validate** the declaration (SymPy objects only, every symbol an argument,
   no undefined functions);
2. **stabilise** the forward expression: unstable patterns such as
   ``log(1+exp(u))`` or ``1/(1+exp(-u))`` become functions that carry their
   own stable numpy code and derivative (see :data:`symdiff.stable.REWRITES`);
3. **differentiate** with respect to every argument and refine the result
   (:func:`symdiff.stable.refine`: stabilised again, so raw derivatives never
   reintroduce ``exp(u)/(1+exp(u))**2``, and sums that cancel rewritten:
   σ' = σ(x)σ(−x), tanh' = 4σ(2x)σ(−2x));
4. **choose by measurement** (:mod:`symdiff.forms`): for the forward expression
   and each derivative, the candidates — as written, stabilised, each accuracy
   rule of :data:`symdiff.stable.RULES` and their combination, the *output form*
   (the forward expression replaced by ``out``, which the backward pass already
   has: exp' = out) and a Taylor fallback near 0 — are run as numpy kernels on
   sampled points and measured against mpmath (:mod:`symdiff.accuracy`); the
   cheapest one not measurably less accurate than the best is kept, so never one
   worse than as written (σ' = out·σ(−x), not out·(1−out), which is 0 from x ≈ 37);
   choices are cached by expression, in process and on disk;
5. **lambdify** to numpy with common-subexpression elimination, then smoke-test
   the kernels once so a function numpy cannot evaluate fails *here*.

The numpy printer and :func:`lambdify_numpy` live here too: fused kernels
(:mod:`symdiff.fusion`) print their composite expressions with them.

Only the SymPy side of the engine imports SymPy: :mod:`symdiff.stable`,
:mod:`symdiff.declare` (with :mod:`symdiff.forms`, :mod:`symdiff.accuracy`), :mod:`symdiff.cprint`, :mod:`symdiff.fusion`, :mod:`symdiff.derivative_ops`
(derivatives of every order as ops) and :mod:`symdiff.ops` (which declares the built-in ops with it). Everything else (graph, registry, compiler,
passes, native) runs on numpy alone.
"""
from __future__ import annotations

import keyword
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.printing.numpy import SciPyPrinter

from .errors import DefopError
from .registry import Op, register, sum_to_shape
from .stable import NUMPY_HELPERS, SCIPY_HELPERS, STABLE_FUNCTIONS, Sigmoid, Taylor, refine, stabilise


@dataclass(frozen=True)
class Symbolic:
    """The SymPy side of a declared op, kept for introspection and fusion."""

    declared: sp.Expr                 # what the user wrote
    args: tuple[sp.Symbol, ...]       # real-valued stand-ins for the user's symbols
    forward: sp.Expr                  # the forward expression as run (stabilised, measured choice)
    derivatives: tuple[sp.Expr, ...]  # d forward / d arg_j, in input form
    backward: tuple[sp.Expr, ...]     # what each backward kernel computes: delta * (output or input form)
    output_form: tuple[bool, ...]     # True where the derivative is written in terms of `out`
    forward_source: str
    backward_sources: tuple[str, ...]
    forms: tuple[str, ...] = ()       # the measured choice: candidate label of the forward, then each derivative
    measured: bool = False            # measured at this declaration (False: one candidate, or a cached choice)

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    def display(self) -> tuple[str, tuple[str, ...]]:
        """Forward and backward expressions as text, in the user's own symbol names."""
        plain = {a: sp.Symbol(a.name) for a in self.args}
        return (str(self.forward.xreplace(plain)), tuple(str(b.xreplace(plain)) for b in self.backward))


if TYPE_CHECKING:
    from .forms import Forms

DELTA = sp.Symbol("delta", real=True)
OUT = sp.Symbol("out", real=True)


def _validate(name: Any, expr: Any, args: Any) -> tuple[sp.Expr, tuple[sp.Symbol, ...]]:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise DefopError(f"op name {name!r} must be a Python identifier (it becomes f.{name})")
    if isinstance(expr, str):
        raise DefopError(
            f"defop({name!r}): the expression is a string; symdiff never parses text. "
            f"Build it from SymPy symbols, e.g. x = sympy.Symbol('x'); defop({name!r}, sympy.tanh(x), args=[x])")
    if isinstance(expr, (int, float)):
        expr = sp.sympify(expr)  # a number is safe to convert (no text is evaluated)
    if not isinstance(expr, sp.Expr):
        raise DefopError(f"defop({name!r}): expected a SymPy expression, got {type(expr).__name__}")
    if isinstance(args, sp.Symbol) or not isinstance(args, (list, tuple)):
        raise DefopError(f"defop({name!r}): args must be a list of SymPy symbols, e.g. args=[x, y]")
    for a in args:
        if not isinstance(a, sp.Symbol):
            raise DefopError(f"defop({name!r}): argument {a!r} is a {type(a).__name__}, not a sympy.Symbol")
    if len(set(args)) != len(args) or not args:
        raise DefopError(f"defop({name!r}): args must be one or more distinct symbols, got {list(args)}")
    undefined = sorted({str(fn.func) for fn in expr.atoms(AppliedUndef)})
    if undefined:
        raise DefopError(
            f"defop({name!r}): the expression uses undefined function(s) {', '.join(undefined)}; "
            f"only functions SymPy knows (exp, log, tanh, Max, ...) can be differentiated and lambdified")
    stray = expr.free_symbols - set(args)
    if stray:
        raise DefopError(
            f"defop({name!r}): symbol(s) {', '.join(sorted(map(str, stray)))} appear in the expression "
            f"but not in args={list(args)}; add them to args or replace them by numbers")
    return expr, tuple(args)


class _NumPyPrinter(SciPyPrinter):
    """SymPy's numpy printer (its SciPy flavour: special functions print as ``scipy.special``
    names), but ``And``/``Or`` broadcast their operands.

    SymPy prints ``(x > 0) & (y > 0)`` as ``logical_and.reduce((x > 0, y > 0))``,
    which stacks the operands and fails when x and y broadcast, e.g. (5, 3) with (3,).
    Special functions need SciPy only when an expression uses one (:func:`special_functions`).
    """

    def _print_expint(self, expr: Any) -> str:  # SymPy's E_nu(x); SciPy names it expn (integer order)
        return f"{self._module_format('scipy.special.expn')}({self._print(expr.args[0])}, {self._print(expr.args[1])})"

    def _print_And(self, expr: Any) -> str:
        return nest_calls(self._module_format(f"{self._module}.logical_and"), [self._print(a) for a in expr.args])

    def _print_Or(self, expr: Any) -> str:
        return nest_calls(self._module_format(f"{self._module}.logical_or"), [self._print(a) for a in expr.args])


def nest_calls(fn: str, args: Sequence[str]) -> str:
    """``fn(a, fn(b, c))``: a function of any number of arguments as nested calls of a binary one."""
    out = args[-1]
    for a in reversed(args[:-1]):
        out = f"{fn}({a}, {out})"
    return out


def _printer() -> _NumPyPrinter:
    return _NumPyPrinter({"fully_qualified_modules": False, "inline": True, "allow_unknown_functions": True,
                          "user_functions": {k: k for k in NUMPY_HELPERS}})  # lambdify's own settings


class MissingExtraError(DefopError):
    """An op needs an optional dependency that is not installed (the message names the extra)."""


def _scipy_special() -> Any:
    """``scipy.special``, or None when SciPy (the ``special`` extra) is not installed."""
    try:
        import scipy.special
    except ImportError:
        return None
    return scipy.special


def _functions(expr: Any) -> list[sp.Expr]:
    exprs = expr if isinstance(expr, (list, tuple)) else [expr]
    found: dict[sp.Expr, None] = {}
    for e in exprs:
        for fn in sp.sympify(e).atoms(sp.Function):
            if not isinstance(fn, (*STABLE_FUNCTIONS, sp.Piecewise)):
                found[fn] = None
    return list(found)


def special_functions(expr: Any) -> dict[str, str]:
    """The functions in ``expr`` that numpy lacks: SymPy name -> the ``scipy.special`` name printed.

    Raises ``TypeError`` naming a function that neither numpy nor SciPy can
    evaluate (an unevaluated ``Derivative``, a Meijer G function, ...).
    """
    printer = _printer()
    needed: dict[str, str] = {}
    exprs = expr if isinstance(expr, (list, tuple)) else [expr]
    for e in exprs:
        for kind in (sp.Derivative, sp.Subs, sp.Integral):
            for bad in sp.sympify(e).atoms(kind):
                raise TypeError(f"it holds an unevaluated {kind.__name__}, which neither numpy nor SciPy can "
                                f"evaluate")
    for fn in _functions(expr):
        try:
            text = printer.doprint(fn)
        except Exception:  # noqa: BLE001 - SymPy's printers refuse functions they have no code for
            raise TypeError(f"{fn.func.__name__} has no numpy or scipy.special counterpart") from None
        head = re.match(r"[\w.]+", text)
        name = head.group(0).removeprefix("numpy.").removeprefix("scipy.special.") if head else ""
        if name in SCIPY_HELPERS:  # a stable function computed by scipy.special (erfc, erfcx)
            needed[fn.func.__name__] = SCIPY_HELPERS[name]
            continue
        if not name or hasattr(np, name) or name in NUMPY_HELPERS:
            continue
        needed[fn.func.__name__] = name
    return needed


def _namespace(expr: Any) -> dict[str, Any]:
    """The ``scipy.special`` functions ``expr`` needs, by printed name (empty: numpy suffices)."""
    needed = special_functions(expr)
    if not needed:
        return {}
    special = _scipy_special()
    if special is None:
        fn, name = next(iter(needed.items()))
        raise MissingExtraError(f"{fn} is computed by scipy.special.{name}, and SciPy is not installed: "
                                f"pip install 'symdiff[special]'")
    missing = [fn for fn, name in needed.items() if not hasattr(special, name)]
    if missing:
        raise TypeError(f"neither numpy nor scipy.special has a function for {', '.join(missing)}")
    return {name: getattr(special, name) for name in needed.values()}


def lambdify_numpy(params: Sequence[sp.Symbol], expr: Any) -> tuple[Callable[..., Any], str]:
    """A numpy kernel for ``expr`` (CSE'd, stable functions as their templates) and its source.

    Special functions numpy lacks are taken from ``scipy.special`` (the ``special``
    extra); without SciPy this raises :class:`MissingExtraError` naming the function.
    """
    import inspect

    fn = sp.lambdify(list(params), expr, modules=[NUMPY_HELPERS, _namespace(expr), "numpy"], printer=_printer(),
                     cse=True, docstring_limit=0)
    source = inspect.getsource(fn)
    if any(isinstance(e, sp.Basic) and e.has(Taylor) for e in (expr if isinstance(expr, (list, tuple)) else [expr])):
        raw = fn

        def fn(*xs: Any) -> Any:  # both branches are computed: the one not taken may divide 0 by 0
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                return raw(*xs)
    return fn, source


SUPPORTED = "use functions numpy or scipy.special supports (exp, log, tanh, sqrt, Max, Abs, erf, gamma, besselj, ...)"


def _evaluates(params: Sequence[sp.Symbol], expr: Any) -> bool:
    """Whether ``expr`` prints as numpy and evaluates on a small array."""
    try:
        fn, _ = lambdify_numpy(params, expr)
        probe = [np.linspace(0.1 + 0.05 * k, 0.9, 4) for k in range(len(params))]
        with np.errstate(all="ignore"):
            np.asarray(fn(*probe), dtype=np.float64)
    except Exception:  # noqa: BLE001 - a yes/no probe: any failure means no
        return False
    return True


def _culprit(expr: Any) -> Any:
    """The innermost subexpression of ``expr`` that numpy cannot evaluate (its arguments can), or None."""
    for node in sp.postorder_traversal(expr):
        if not isinstance(node, sp.Expr) or node.is_Atom or isinstance(node, (sp.Add, sp.Mul, sp.Pow)):
            continue
        params = sorted(node.free_symbols, key=str)
        if not _evaluates(params, node):
            return node
    return None


def declaration_error(name: str, what: str, expr: Any, exc: BaseException | None,
                      arg: sp.Symbol | None = None) -> DefopError:
    """One line: which op, which function SymPy or numpy could not handle, and what to do.

    ``arg``: the argument a failing derivative is taken with respect to (it may be declared nondiff).
    """
    bad = _culprit(expr)
    if bad is not None:  # in the user's own symbol names, not the real-valued stand-ins
        bad = bad.xreplace({d: sp.Symbol(d.name) for d in bad.atoms(sp.Dummy)})
    if isinstance(bad, sp.Derivative):
        nondiff = (f"if {arg} needs no gradient (an order, a fixed parameter), declare it nondiff=[{arg}]; "
                   f"otherwise " if arg is not None else "")
        return DefopError(f"defop({name!r}): SymPy cannot differentiate {bad.expr} (the {what} stays "
                          f"{bad}); {nondiff}declare an expression with a derivative (floor, ceiling, frac, ... "
                          f"have none that numpy could use), or write the op by hand as a structural op")
    if isinstance(bad, sp.Integral):
        return DefopError(f"defop({name!r}): the {what} holds the unevaluated integral {bad}, which numpy cannot "
                          f"compute; give a closed form (try sympy.integrate(...).doit()) instead")
    if bad is not None:
        func = bad.func.__name__ if isinstance(bad, sp.Basic) else str(bad)
        return DefopError(f"defop({name!r}): the {what} uses {func} (in {bad}), which neither numpy nor "
                          f"scipy.special can evaluate; {SUPPORTED}")
    detail = f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})" if exc is not None else ""
    return DefopError(f"defop({name!r}): the {what} could not be evaluated with numpy or SciPy{detail}; {SUPPORTED}")


def _smoke_test(name: str, fn: Callable[..., Any], n_args: int, what: str, expr: Any) -> None:
    """Evaluate once on a small array so an unprintable function fails at declaration."""
    probe = [np.linspace(0.1 + 0.05 * k, 0.9, 4) for k in range(n_args)]
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy.special's own warnings (an order truncated to an integer)
            np.asarray(fn(*probe), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - re-raised as one line naming the function
        raise declaration_error(name, what, expr, exc) from exc


def keeps_float32(fn: Callable[..., Any], n_args: int) -> bool:
    """Whether ``fn`` maps float32 arrays to float32 results (checked once, at declaration).

    ``fn`` may return one array or a list of them (a fused group's results).
    """
    probe = [np.linspace(0.1 + 0.05 * k, 0.9, 4, dtype=np.float32) for k in range(n_args)]
    with np.errstate(all="ignore"):
        out = fn(*probe)
    return all(np.asarray(o).dtype == np.float32 for o in (out if isinstance(out, list) else [out]))


def _backward_kernel(raw: Callable[..., Any], j: int) -> Callable[..., Any]:
    """Wrap a lambdified derivative so its result has input j's shape and dtype."""

    def backward(delta: Any, out: Any, *inputs: Any) -> Any:
        g = raw(delta, out, *inputs)
        x = inputs[j]
        try:
            if g.shape == x.shape and g.dtype == x.dtype:  # the common case: nothing to undo
                return g
        except AttributeError:
            pass
        # broadcast to undo, a constant, or a derivative whose constants widened the dtype
        # (e.g. Piecewise/Max derivatives print as select() of Python floats)
        return sum_to_shape(g, np.shape(x), np.result_type(x, delta))

    return backward


def derive(expr: sp.Expr, args: Sequence[sp.Symbol], nondiff: Sequence[sp.Symbol] = (),
           measure: bool = True, given_forward: bool = False) -> "Forms":
    """The forward and derivative forms to run: stabilised, then chosen by measured error.

    Arguments in ``nondiff`` get the derivative 0: they are never differentiated.

    See :mod:`symdiff.forms`: the candidates are the expression as written, stabilised,
    each accuracy rule of :data:`symdiff.stable.RULES`, their combination, the output
    forms of each derivative (``out`` for the forward expression) and a Taylor fallback;
    the cheapest of those not measurably less accurate than the best is kept.
    ``given_forward``: the forward is already a measured choice, only the derivatives are chosen.
    """
    from .forms import choose_forms

    return choose_forms(expr, args, stabilise=stabilise, refine=refine, nondiff=nondiff,
                        lambdify=lambda p, e: lambdify_numpy(p, e)[0], delta=DELTA, out=OUT,
                        measure=measure, given_forward=given_forward)


#: below this, an output-form σ' = out(1 - out) or tanh' = 1 - out² could lose more than 1e-13 of
#: its relative precision to cancellation (the accuracy guarantee, symdiff.forms): those entries are
#: recomputed from the input (measured: 1.3e-13 at tanh' = 1.4e-3, so 2^-10 was not enough)
_TAIL = 2.0 ** -7


def _tail_corrected(fwd: sp.Expr, a: sp.Symbol) -> Callable[..., Any] | None:
    """σ' and tanh' for the plain op list: cheap from the saved output, exact in the tails.

    ``out·(1 - out)`` (σ) and ``1 - out²`` (tanh) need no transcendental, and
    their terms are at most 1 in size, so their absolute error is a few ulps:
    where the derivative is at least 2⁻⁷ its relative error is below 1e-13.
    The few entries below (|u| ≳ 4.8 for σ, ≳ 3.1 for tanh) take the refined
    input form, written for an even function so it cannot overflow:
    ``σ(u)σ(-u) = e/(1 + e)²`` with ``e = exp(-|u|)``, and ``4σ(2u)σ(-2u)``
    the same with ``e = exp(-2|u|)``: every digit out to the subnormals.
    float32 keeps the input form everywhere (its 2⁻⁷ would cost 1e-5 of
    relative precision). None: not σ or tanh.
    """
    if fwd == Sigmoid(a):  # exactly σ(u): σ(-u) has the opposite sign
        fast_expr, scale, k = OUT * (1 - OUT), 1.0, 1.0
    elif fwd == sp.tanh(a):
        fast_expr, scale, k = 1 - OUT**2, 4.0, 2.0
    else:
        return None
    fast, _ = lambdify_numpy((OUT,), fast_expr)

    def slow(u: np.ndarray) -> np.ndarray:
        e = np.exp(-k * np.abs(u))
        return scale * e / ((1 + e) * (1 + e))

    def backward(delta: Any, out: Any, u: Any) -> Any:
        out, u = np.asarray(out), np.asarray(u)
        if out.dtype != np.float64 or out.shape != u.shape:
            d = slow(u)
        else:
            d = fast(out)
            if type(d) is not np.ndarray:  # a 0-d input gives a scalar: writable memory for the tail
                d = np.array(d)
            tail = d < _TAIL
            if tail.any():
                d[tail] = slow(u[tail])
        g = delta * d
        if np.shape(g) == u.shape and g.dtype == u.dtype:
            return g
        return sum_to_shape(g, u.shape, np.result_type(u, delta))

    return backward


_TRAINING_BACKWARD: dict[int, tuple[Op, Any]] = {}


def training_backward(op: Op) -> tuple[Callable[..., Any], tuple[bool, bool]]:
    """A unary declared op's backward kernel for training loops, and what it reads ``(out, input)``.

    The fused training kernels' trade (:meth:`symdiff.fusion.FusedKernel._fast_output_forms`)
    for the block ops of the numpy engine: σ' as ``out·(1 - out)`` and tanh' as
    ``1 - out²``, free of transcendentals, which lose relative precision only where
    the derivative is below 1e-16 of the gradient it scales. Ops without such an
    output form keep their own kernel.
    """
    cached = _TRAINING_BACKWARD.get(id(op))
    if cached is not None and cached[0] is op:
        return cached[1]
    sym = op.symbolic
    kernel: Any = (op.backward[0], tuple(x[0] for x in (op.backward_reads or ((True,), (True,)))))
    if sym is not None and op.arity == 1:
        (a,) = sym.args
        d = stabilise(sp.diff(sym.forward, a))
        if isinstance(sym.forward, Sigmoid):
            d = d.xreplace({Sigmoid(-a): 1 - OUT})
        in_out = d.subs(sym.forward, OUT) if sym.forward != a else d
        if a not in in_out.free_symbols and in_out != d:
            raw, _ = lambdify_numpy((DELTA, OUT, a), DELTA * in_out)
            kernel = (_backward_kernel(raw, 0), (True, False))
    _TRAINING_BACKWARD[id(op)] = (op, kernel)
    return kernel


def _no_gradient(delta: Any, out: Any, *inputs: Any) -> Any:
    raise TypeError("this input is declared nondiff: it has no gradient")


def declare(name: str, expr: sp.Expr, args: Sequence[sp.Symbol], *, nondiff: Sequence[sp.Symbol] = (),
            doc: str = "", measure: bool = True, given_forward: bool = False) -> Op:
    """:func:`defop` without registering: the op, derived, stabilised and smoke-tested.

    Used for ops made on demand (a number times a register, ``r ** 0.5``), which
    are found by name but are not primitives of their own, and for gradient graphs'
    derivative ops (``given_forward``: their forward is an op's measured derivative,
    their own derivatives are measured, :func:`symdiff.forms.choose_forms`).
    """
    expr, args = _validate(name, expr, args)
    try:  # SciPy missing: say so for the function the user wrote, before a rewrite (erf -> erfc) hides it
        _namespace(expr)
    except MissingExtraError as exc:
        raise MissingExtraError(f"defop({name!r}): {exc}") from None
    except TypeError:
        pass  # a function neither numpy nor SciPy has: diagnosed below, on the kernel
    if isinstance(nondiff, sp.Symbol) or not isinstance(nondiff, (list, tuple)):
        raise DefopError(f"defop({name!r}): nondiff must be a list of argument symbols, e.g. nondiff=[nu]")
    for a in nondiff:
        if a not in args:
            raise DefopError(f"defop({name!r}): nondiff argument {a!r} is not one of args={list(args)}")
    # real-valued stand-ins: derivatives of Abs, sign, ... are then the real ones
    real = tuple(sp.Dummy(a.name, real=True) for a in args)
    frozen = tuple(r for a, r in zip(args, real) if a in nondiff)
    expr = expr.xreplace(dict(zip(args, real)))
    try:
        chosen = derive(expr, real, frozen, measure=measure, given_forward=given_forward)
    except Exception as exc:  # noqa: BLE001 - SymPy failing deep inside: one line naming the op
        raise DefopError(f"defop({name!r}): SymPy could not differentiate or simplify {expr} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         f"{SUPPORTED}") from exc
    fwd, derivs, backward, output_form = chosen.forward, chosen.derivatives, chosen.backward, chosen.output_form

    # a failure is diagnosed on the input-form expression (the output form may hide f(x) as `out`)
    def kernel(params: Sequence[sp.Symbol], e: Any, what: str, shown: Any,
               arg: sp.Symbol | None = None) -> tuple[Callable[..., Any], str]:
        try:
            return lambdify_numpy(params, e)
        except MissingExtraError as exc:  # SciPy not installed: the function and the extra, nothing else
            raise MissingExtraError(f"defop({name!r}): {exc}") from None
        except Exception as exc:  # noqa: BLE001 - e.g. PrintMethodNotImplementedError, 14 frames deep
            raise declaration_error(name, what, shown, exc, arg) from exc

    forward_fn, forward_src = kernel(real, fwd, "forward expression", fwd)
    _smoke_test(name, forward_fn, len(real), "forward expression", fwd)
    bp_fns, bp_srcs = [], []
    for j, b in enumerate(backward):
        if real[j] in frozen:
            bp_fns.append(_no_gradient)
            bp_srcs.append("")
            continue
        what = f"derivative wrt {args[j]}"
        raw, src = kernel((DELTA, OUT, *real), b, what, derivs[j], args[j])
        _smoke_test(name, lambda *xs, raw=raw: raw(xs[0], xs[0], *xs), len(real), what, derivs[j])
        bp_fns.append(_backward_kernel(raw, j))
        bp_srcs.append(src)

    if all(a in fwd.free_symbols for a in real) and keeps_float32(forward_fn, len(real)):
        forward = forward_fn  # numpy broadcasting already gives the output its full shape and dtype
    else:  # e.g. a constant (lambdify returns a scalar), or select() of Python constants (float64)
        def forward(*xs: Any) -> Any:
            shape = np.broadcast_shapes(*(np.shape(x) for x in xs))
            return np.broadcast_to(forward_fn(*xs), shape).astype(np.result_type(*xs, 1.0), copy=True)

    symbolic = Symbolic(expr, real, fwd, derivs, backward, output_form, forward_src, tuple(bp_srcs),
                        chosen.labels, chosen.measured)
    used = set().union(*(b.free_symbols for b in backward))
    cheap = _tail_corrected(fwd, real[0]) if len(real) == 1 else None
    if cheap is not None:  # σ, tanh: from the output where that is exact, from the input in the tails
        bp_fns[0] = cheap
        used |= {OUT, real[0]}
    return Op(name=name, arity=len(real), forward=forward, backward=tuple(bp_fns), elementwise=True,
              doc=doc or f"{name}({', '.join(a.name for a in args)}) = {expr}", symbolic=symbolic,
              backward_reads=((OUT in used,), tuple(a in used for a in real)),
              nondifferentiable=tuple(j for j, r in enumerate(real) if r in frozen))


def defop(name: str, expr: sp.Expr, args: Sequence[sp.Symbol], *, nondiff: Sequence[sp.Symbol] = (),
          replace: bool = False, doc: str = "", measure: bool = True) -> Op:
    """Declare an elementwise op from one SymPy expression; SymPy derives its gradient.

    >>> x = sympy.Symbol("x")
    >>> softplus = defop("softplus", sympy.log(1 + sympy.exp(x)), args=[x])

    The op is registered (``f.softplus`` works) and returned (``softplus(reg)``
    builds the same register). Inputs broadcast like numpy; gradients are
    summed back to each input's shape. Special functions numpy lacks (erf,
    gamma, Bessel functions, ...) are evaluated by ``scipy.special`` (the
    ``special`` extra). Arguments listed in ``nondiff`` (an integer order, a
    fixed shape parameter) are never differentiated: they get no gradient.
    ``measure=False`` skips the measured choice of forms (:mod:`symdiff.forms`):
    the stabilised forms run, declaration costs no mpmath. (Gradient graphs'
    derivative ops are measured: their forward is given, their derivatives chosen.)
    """
    return register(declare(name, expr, args, nondiff=nondiff, doc=doc, measure=measure), replace=replace)
