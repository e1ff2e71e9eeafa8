"""``defop``: one SymPy expression in, a forward kernel and derived backward kernels out.

The pipeline, run once per declaration (never during training):

1. **validate** the declaration (SymPy objects only, every symbol an argument,
   no undefined functions);
2. **stabilise** the forward expression: unstable patterns such as
   ``log(1+exp(u))`` or ``1/(1+exp(-u))`` become functions that carry their
   own stable numpy code and derivative (see :data:`REWRITES`);
3. **differentiate** with respect to every argument and stabilise the result
   again (so raw derivatives never reintroduce ``exp(u)/(1+exp(u))**2``);
4. **output form**: substitute the forward expression by ``out``; keep it when
   no input symbol is left (σ' = out·(1−out), tanh' = 1−out², exp' = out),
   because the backward pass already has ``out`` and this skips recomputation;
5. **lambdify** to numpy with common-subexpression elimination, then smoke-test
   the kernels once so a function numpy cannot evaluate fails *here*.

This is the only module that imports SymPy.
"""
from __future__ import annotations

import keyword
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import sympy as sp
from sympy.codegen.ast import float32, float64, real
from sympy.core.function import AppliedUndef
from sympy.printing.c import C99CodePrinter
from sympy.printing.numpy import NumPyPrinter

from . import native
from .registry import MULTI_OPS, Op, register, sum_to_shape


# --------------------------------------------------------------------------------------
# Stable functions: each prints itself as numpy code and knows its own derivative.
# --------------------------------------------------------------------------------------
class _StableFunction(sp.Function):
    """A SymPy function with a fixed numpy template (``{0}`` is the argument)."""

    numpy_template = ""

    def _numpycode(self, printer: Any) -> str:
        return self.numpy_template.format(*(printer._print(a) for a in self.args))

    _pythoncode = _numpycode  # lambdify's numpy printer looks for this name


class Softplus(_StableFunction):
    """log(1 + exp(u)), printed as numpy.logaddexp(0, u): finite for any u."""

    nargs = 1
    numpy_template = "numpy.logaddexp(0, {0})"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return Sigmoid(self.args[0])


_EXP_OVERFLOWS_BELOW: dict[np.dtype, float] = {}


def _sigmoid(u: Any) -> Any:
    """sigmoid(u) = 1/(1 + exp(-u)), with accurate tails and no overflow warning.

    Where ``exp(-u)`` overflows (u < -709.8 in float64, -88.7 in float32) the
    few entries are recomputed as ``exp(u)``, sigmoid's value to full precision
    there (down to subnormals, which ``x*sigmoid(x)`` brings back into range).
    ``0.5 + 0.5*tanh(u/2)`` would cancel to 0 already below u = -37. Five cheap
    numpy calls in the common case: this is the LSTM's hottest kernel.
    """
    e = np.negative(u)
    if type(e) is not np.ndarray or e.dtype.kind != "f":  # a scalar, or integers
        with np.errstate(over="ignore"):
            e = np.exp(e)
        if type(e) is not np.ndarray:
            return 1 / (1 + e) if e != np.inf else np.exp(u)
    else:
        with np.errstate(over="ignore"):
            np.exp(e, out=e)  # in place: one array fewer to allocate and write
    e += 1
    s = np.reciprocal(e, out=e)
    low = _EXP_OVERFLOWS_BELOW.get(s.dtype)
    if low is None:
        low = _EXP_OVERFLOWS_BELOW[s.dtype] = -float(np.log(np.finfo(s.dtype).max)) + 1.0
    if s.size and np.min(u) < low:
        tail = u < low
        s[tail] = np.exp(u[tail])
    return s


#: numpy helpers the stable functions' templates may call (lambdify namespace)
NUMPY_HELPERS: dict[str, Callable[..., Any]] = {"_symdiff_sigmoid": _sigmoid}


class Sigmoid(_StableFunction):
    """1 / (1 + exp(-u)), printed as a call of :func:`_sigmoid` (no overflow, accurate tails)."""

    nargs = 1
    numpy_template = "_symdiff_sigmoid({0})"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        s = Sigmoid(self.args[0])
        return s * (1 - s)


class Step(_StableFunction):
    """Heaviside step with step(0) = 0, so relu'(0) = 0 deterministically."""

    nargs = 1
    numpy_template = "numpy.heaviside({0}, 0)"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.S.Zero


class Relu(_StableFunction):
    """max(u, 0), printed as numpy.maximum (SymPy's Max prints as a slow select)."""

    nargs = 1
    numpy_template = "numpy.maximum({0}, 0)"

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return Step(self.args[0])


STABLE_FUNCTIONS = (Softplus, Sigmoid, Step, Relu)

#: The rewrite set applied to forward expressions and to every derivative.
REWRITES: tuple[tuple[str, str], ...] = (
    ("log(1 + exp(u))", "softplus(u) = logaddexp(0, u)"),
    ("log(1 + exp(-u))", "softplus(-u)"),
    ("log(1/(1 + exp(-u)))  (log-sigmoid)", "-softplus(-u)"),
    ("1/(1 + exp(-u))", "sigmoid(u) as 1/(1+exp(-u)), exp's overflow taken as inf: accurate tails, no warning"),
    ("1/(1 + exp(u))", "sigmoid(-u)"),
    ("exp(u)/(1 + exp(u))", "sigmoid(u)"),
    ("exp(u)/(1 + exp(u))**2 and exp(-u)/(1 + exp(-u))**2", "sigmoid(u)*sigmoid(-u)"),
    ("exp(m*u)/(1 + exp(u))**n, 1 <= m <= n", "sigmoid(u)**m * sigmoid(-u)**(n-m)"),
    ("Max(u, 0)", "relu(u) = maximum(u, 0), derivative step(u) with step(0) = 0"),
    ("Min(u, 0)", "-relu(-u)"),
    ("Heaviside(u, 0)", "step(u)"),
)


def _one_plus_exp(e: sp.Expr) -> sp.Expr | None:
    """Return ``u`` when ``e`` is exactly ``1 + exp(u)``."""
    if isinstance(e, sp.Add) and len(e.args) == 2 and sp.S.One in e.args:
        other = e.args[1] if e.args[0] == sp.S.One else e.args[0]
        if isinstance(other, sp.exp):
            return other.args[0]
    return None


def _rewrite_product(e: sp.Expr) -> sp.Expr:
    """Turn ``exp(m*v) * (1+exp(v))**-n`` factors of a product into sigmoids.

    ``(1+exp(v))**-n`` is ``sigmoid(-v)**n``; an ``exp(m*v)`` factor beside it
    (1 <= m <= n) turns ``m`` of those into ``sigmoid(v)``, since
    ``exp(v) * sigmoid(-v) == sigmoid(v)``. Sigmoids already rewritten in a
    sub-expression take part too, so the order of rewriting does not matter.
    """
    sig: dict[sp.Expr, int] = {}  # a -> n for a factor sigmoid(a)**n
    rest: list[sp.Expr] = []
    for fac in sp.Mul.make_args(e):
        base, n = (fac.base, fac.exp) if isinstance(fac, sp.Pow) else (fac, sp.S.One)
        if n.is_Integer:
            if n < 0:
                v = _one_plus_exp(base)
                if v is not None:
                    sig[-v] = sig.get(-v, 0) + int(-n)
                    continue
            elif isinstance(base, Sigmoid):
                sig[base.args[0]] = sig.get(base.args[0], 0) + int(n)
                continue
        rest.append(fac)
    if not sig:
        return e
    out: list[sp.Expr] = []
    for fac in rest:
        if isinstance(fac, sp.exp):
            w = fac.args[0]
            for a, n in sig.items():
                m = sp.cancel(-w / a)
                if m.is_Integer and 1 <= m <= n:
                    # exp(m v) sigmoid(-v)^n == sigmoid(v)^m sigmoid(-v)^(n-m), with a = -v
                    out.append(Sigmoid(-a) ** int(m))
                    sig[a] = n - int(m)
                    break
            else:
                out.append(fac)
        else:
            out.append(fac)
    out.extend(Sigmoid(a) ** n for a, n in sig.items() if n)
    return sp.Mul(*out)


def stabilise(e: sp.Expr) -> sp.Expr:
    """Rewrite the unstable patterns of :data:`REWRITES`, bottom-up."""
    if not e.args or isinstance(e, (sp.Symbol, sp.Number)):
        return e
    args = [stabilise(a) for a in e.args]
    if any(a is not b for a, b in zip(args, e.args)):
        e = e.func(*args)
    if isinstance(e, sp.log):
        (a,) = e.args
        u = _one_plus_exp(a)
        if u is not None:
            return Softplus(u)
        if isinstance(a, Sigmoid):
            return -Softplus(-a.args[0])
        return e
    if isinstance(e, (sp.Max, sp.Min)) and len(e.args) == 2 and sp.S.Zero in e.args:
        u = e.args[1] if e.args[0] == sp.S.Zero else e.args[0]
        return Relu(u) if isinstance(e, sp.Max) else -Relu(-u)
    if isinstance(e, sp.Heaviside) and len(e.args) == 2 and e.args[1] == 0:
        return Step(e.args[0])
    if isinstance(e, (sp.Mul, sp.Pow)):
        return _rewrite_product(e)
    return e


# --------------------------------------------------------------------------------------
# defop
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Symbolic:
    """The SymPy side of a declared op, kept for introspection and fusion."""

    declared: sp.Expr                 # what the user wrote
    args: tuple[sp.Symbol, ...]       # real-valued stand-ins for the user's symbols
    forward: sp.Expr                  # stabilised forward expression
    derivatives: tuple[sp.Expr, ...]  # d forward / d arg_j, in input form
    backward: tuple[sp.Expr, ...]     # what each backward kernel computes: delta * (output or input form)
    output_form: tuple[bool, ...]     # True where the derivative is written in terms of `out`
    forward_source: str
    backward_sources: tuple[str, ...]

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    def display(self) -> tuple[str, tuple[str, ...]]:
        """Forward and backward expressions as text, in the user's own symbol names."""
        plain = {a: sp.Symbol(a.name) for a in self.args}
        return (str(self.forward.xreplace(plain)), tuple(str(b.xreplace(plain)) for b in self.backward))


DELTA = sp.Symbol("delta", real=True)
OUT = sp.Symbol("out", real=True)


def _validate(name: Any, expr: Any, args: Any) -> tuple[sp.Expr, tuple[sp.Symbol, ...]]:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"op name {name!r} must be a Python identifier (it becomes f.{name})")
    if isinstance(expr, str):
        raise TypeError(
            f"defop({name!r}): the expression is a string; symdiff never parses text. "
            f"Build it from SymPy symbols, e.g. x = sympy.Symbol('x'); defop({name!r}, sympy.tanh(x), args=[x])")
    if isinstance(expr, (int, float)):
        expr = sp.sympify(expr)  # a number is safe to convert (no text is evaluated)
    if not isinstance(expr, sp.Expr):
        raise TypeError(f"defop({name!r}): expected a SymPy expression, got {type(expr).__name__}")
    if isinstance(args, sp.Symbol) or not isinstance(args, (list, tuple)):
        raise TypeError(f"defop({name!r}): args must be a list of SymPy symbols, e.g. args=[x, y]")
    for a in args:
        if not isinstance(a, sp.Symbol):
            raise TypeError(f"defop({name!r}): argument {a!r} is a {type(a).__name__}, not a sympy.Symbol")
    if len(set(args)) != len(args) or not args:
        raise ValueError(f"defop({name!r}): args must be one or more distinct symbols, got {list(args)}")
    undefined = sorted({str(fn.func) for fn in expr.atoms(AppliedUndef)})
    if undefined:
        raise ValueError(
            f"defop({name!r}): the expression uses undefined function(s) {', '.join(undefined)}; "
            f"only functions SymPy knows (exp, log, tanh, Max, ...) can be differentiated and lambdified")
    stray = expr.free_symbols - set(args)
    if stray:
        raise ValueError(
            f"defop({name!r}): symbol(s) {', '.join(sorted(map(str, stray)))} appear in the expression "
            f"but not in args={list(args)}; add them to args or replace them by numbers")
    return expr, tuple(args)


class _NumPyPrinter(NumPyPrinter):
    """SymPy's numpy printer, but ``And``/``Or`` broadcast their operands.

    SymPy prints ``(x > 0) & (y > 0)`` as ``logical_and.reduce((x > 0, y > 0))``,
    which stacks the operands and fails when x and y broadcast, e.g. (5, 3) with (3,).
    """

    def _print_And(self, expr: Any) -> str:
        return _nest(self._module_format(f"{self._module}.logical_and"), [self._print(a) for a in expr.args])

    def _print_Or(self, expr: Any) -> str:
        return _nest(self._module_format(f"{self._module}.logical_or"), [self._print(a) for a in expr.args])


def _nest(fn: str, args: Sequence[str]) -> str:
    """``fn(a, fn(b, c))``: a function of any number of arguments as nested calls of a binary one."""
    out = args[-1]
    for a in reversed(args[:-1]):
        out = f"{fn}({a}, {out})"
    return out


def _lambdify(params: Sequence[sp.Symbol], expr: Any) -> tuple[Callable[..., Any], str]:
    import inspect

    printer = _NumPyPrinter({"fully_qualified_modules": False, "inline": True, "allow_unknown_functions": True,
                             "user_functions": {k: k for k in NUMPY_HELPERS}})  # lambdify's own settings
    fn = sp.lambdify(list(params), expr, modules=[NUMPY_HELPERS, "numpy"], printer=printer, cse=True,
                     docstring_limit=0)
    return fn, inspect.getsource(fn)


def _smoke_test(name: str, fn: Callable[..., Any], n_args: int, what: str) -> None:
    """Evaluate once on a small array so an unprintable function fails at declaration."""
    probe = [np.linspace(0.1 + 0.05 * k, 0.9, 4) for k in range(n_args)]
    try:
        with np.errstate(all="ignore"):
            np.asarray(fn(*probe), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise TypeError(
            f"defop({name!r}): the {what} could not be evaluated with numpy ({type(exc).__name__}: {exc}); "
            f"use functions numpy supports (exp, log, sin, tanh, sqrt, Max, Abs, ...)") from exc


def _keeps_float32(fn: Callable[..., Any], n_args: int) -> bool:
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


def derive(expr: sp.Expr, args: Sequence[sp.Symbol]) -> tuple[sp.Expr, tuple[sp.Expr, ...], tuple[sp.Expr, ...], tuple[bool, ...]]:
    """Stabilised forward expression, input-form derivatives, backward expressions, output-form flags."""
    fwd = stabilise(expr)
    derivs = tuple(stabilise(sp.diff(fwd, a)) for a in args)
    backward, output_form = [], []
    for d in derivs:
        in_out = d.subs(fwd, OUT) if fwd not in args else d
        use_out = in_out != d and not (in_out.free_symbols & set(args))
        backward.append(DELTA * (in_out if use_out else d))
        output_form.append(use_out)
    return fwd, derivs, tuple(backward), tuple(output_form)


def defop(name: str, expr: sp.Expr, args: Sequence[sp.Symbol], *, replace: bool = False,
          doc: str = "") -> Op:
    """Declare an elementwise op from one SymPy expression; SymPy derives its gradient.

    >>> x = sympy.Symbol("x")
    >>> softplus = defop("softplus", sympy.log(1 + sympy.exp(x)), args=[x])

    The op is registered (``f.softplus`` works) and returned (``softplus(reg)``
    builds the same register). Inputs broadcast like numpy; gradients are
    summed back to each input's shape.
    """
    expr, args = _validate(name, expr, args)
    # real-valued stand-ins: derivatives of Abs, sign, ... are then the real ones
    real = tuple(sp.Dummy(a.name, real=True) for a in args)
    expr = expr.xreplace(dict(zip(args, real)))
    fwd, derivs, backward, output_form = derive(expr, real)

    forward_fn, forward_src = _lambdify(real, fwd)
    _smoke_test(name, forward_fn, len(real), "forward expression")
    bp_fns, bp_srcs = [], []
    for j, b in enumerate(backward):
        raw, src = _lambdify((DELTA, OUT, *real), b)
        _smoke_test(name, lambda *xs, raw=raw: raw(xs[0], xs[0], *xs), len(real), f"derivative wrt {args[j]}")
        bp_fns.append(_backward_kernel(raw, j))
        bp_srcs.append(src)

    if all(a in fwd.free_symbols for a in real) and _keeps_float32(forward_fn, len(real)):
        forward = forward_fn  # numpy broadcasting already gives the output its full shape and dtype
    else:  # e.g. a constant (lambdify returns a scalar), or select() of Python constants (float64)
        def forward(*xs: Any) -> Any:
            shape = np.broadcast_shapes(*(np.shape(x) for x in xs))
            return np.broadcast_to(forward_fn(*xs), shape).astype(np.result_type(*xs, 1.0), copy=True)

    symbolic = Symbolic(expr, real, fwd, derivs, backward, output_form, forward_src, tuple(bp_srcs))
    used = set().union(*(b.free_symbols for b in backward))
    op = Op(name=name, arity=len(real), forward=forward, backward=tuple(bp_fns), elementwise=True,
            doc=doc or f"{name}({', '.join(a.name for a in args)}) = {expr}", symbolic=symbolic,
            backward_reads=((OUT in used,), tuple(a in used for a in real)))
    return register(op, replace=replace)


# --------------------------------------------------------------------------------------
# C: the same expressions as one loop (compiled by symdiff.native)
# --------------------------------------------------------------------------------------
#: vector variants glibc's libmvec provides (declared ``simd`` so gcc calls them 4-8 lanes at a time)
_VECTOR_MATH = ("exp", "log", "tanh", "log1p", "expm1", "sin", "cos", "tan", "sinh", "cosh", "asin", "acos",
                "atan", "asinh", "acosh", "atanh", "exp2", "log2", "log10", "cbrt", "erf", "erfc")

C_PRELUDE = "\n".join([
    "#include <math.h>",
    "#ifdef SYMDIFF_VECTOR_MATH",
    "#define SD_SIMD __attribute__((simd(\"notinbranch\"), nothrow, const))",
    *(f"double {f}(double) SD_SIMD; float {f}f(float) SD_SIMD;" for f in _VECTOR_MATH),
    "double pow(double, double) SD_SIMD; float powf(float, float) SD_SIMD;",
    "#endif",
    # the stable functions, as their numpy templates define them (NaN passes through)
    *(f"static inline {t} sd_sigmoid{x}({t} u) {{ {t} e = exp{x}(-fabs{x}(u)); {t} r = 1 / (1 + e); "
      f"return u >= 0 ? r : e * r; }}\n"
      f"static inline {t} sd_softplus{x}({t} u) {{ return (u > 0 ? u : 0) + log1p{x}(exp{x}(-fabs{x}(u))); }}\n"
      f"static inline {t} sd_relu{x}({t} u) {{ return u > 0 ? u : (u == u ? 0 : u); }}\n"  # +0 for -0, as numpy
      # tanh from expm1 (accurate near 0, no overflow): libmvec's expm1 is ~1.7x its tanh
      f"static inline {t} sd_tanh{x}({t} u) {{ {t} e = expm1{x}(-2 * fabs{x}(u)); "
      f"return copysign{x}(-e / (e + 2), u); }}\n"
      f"static inline {t} sd_step{x}({t} u) {{ return u > 0 ? 1 : (u <= 0 ? 0 : u); }}\n"
      # numpy.maximum/minimum keep a NaN; C's fmax/fmin drop it
      f"static inline {t} sd_max{x}({t} a, {t} b) {{ return a != a || b != b ? a + b : (a > b ? a : b); }}\n"
      f"static inline {t} sd_min{x}({t} a, {t} b) {{ return a != a || b != b ? a + b : (a < b ? a : b); }}"
      for t, x in (("double", ""), ("float", "f"))),
])


class _CPrinter(C99CodePrinter):
    """SymPy's C99 printer; the stable functions, tanh, Max and Min call the prelude's helpers."""

    def __init__(self, single: bool) -> None:
        self._suffix = "f" if single else ""
        helpers = {f.__name__: f"sd_{f.__name__.lower()}{self._suffix}" for f in (*STABLE_FUNCTIONS, sp.tanh)}
        super().__init__({"type_aliases": {real: float32 if single else float64}, "user_functions": helpers})

    def _print_Max(self, e: sp.Expr) -> str:
        return _nest(f"sd_max{self._suffix}", [self._print(a) for a in e.args])

    def _print_Min(self, e: sp.Expr) -> str:
        return _nest(f"sd_min{self._suffix}", [self._print(a) for a in e.args])


def c_source(name: str, operands: Sequence[sp.Symbol], outputs: Sequence[sp.Expr]) -> str:
    """C for ``outputs[i] = f(operands)`` over an (R, K) loop, as ``{name}_f64`` and ``{name}_f32``.

    Signature ``void f(long R, long K, char **p, const long *rs)``: ``p`` holds the
    operands then the outputs, ``rs`` their row strides in elements (0: one row
    broadcast over all). The inner loop is contiguous, so it vectorises; common
    subexpressions are computed once per element.
    """
    n = len(operands)
    plain = [sp.Symbol(f"v{j}", real=True) for j in range(n)]
    exprs = [sp.sympify(e).xreplace(dict(zip(operands, plain))) for e in outputs]
    temps, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("t"), optimizations="basic")
    used = set().union(*(e.free_symbols for _, e in temps), *(e.free_symbols for e in reduced))
    parts = []
    for t, single in (("double", False), ("float", True)):
        printer = _CPrinter(single)
        body = [f"void {name}_{'f32' if single else 'f64'}(long R, long K, char **p, const long *rs) {{",
                "    for (long r = 0; r < R; r++) {"]
        body += [f"        const {t} *restrict a{j} = (const {t} *)p[{j}] + r * rs[{j}];"
                 for j in range(n) if plain[j] in used]
        body += [f"        {t} *restrict o{i} = ({t} *)p[{n + i}] + r * rs[{n + i}];" for i in range(len(exprs))]
        element = [f"const {t} v{j} = a{j}[k];" for j in range(n) if plain[j] in used]
        element += [f"const {t} {s} = {printer.doprint(e)};" for s, e in temps]
        element += [f"o{i}[k] = {printer.doprint(e)};" for i, e in enumerate(reduced)]
        inner = ["{", *("    " + line for line in element), "}"]
        lanes = 16 if single else 8
        # Whole vectors only: a row's last, partial vector is done as the last full one, overlapping
        # the one before (same values written twice). A scalar tail would call scalar libm per
        # element: with K = 50 that tail cost as much as the 48 vectorised elements.
        body += [f"        if (K >= {lanes}) {{",
                 "            for (long k0 = 0;; k0 += %d) {" % lanes,
                 f"                if (k0 + {lanes} > K) k0 = K - {lanes};",
                 "                #pragma omp simd",
                 f"                for (long k = k0; k < k0 + {lanes}; k++)",
                 *("                " + line for line in inner),
                 f"                if (k0 + {lanes} >= K) break;",
                 "            }",
                 "        } else {",
                 "            #pragma omp simd",
                 "            for (long k = 0; k < K; k++)",
                 *("            " + line for line in inner),
                 "        }", "    }", "}"]
        parts.append("\n".join(body))
    return C_PRELUDE + "\n\n" + "\n\n".join(parts) + "\n"


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


# --------------------------------------------------------------------------------------
# Fusion: a connected group of elementwise steps becomes one composite expression
# --------------------------------------------------------------------------------------
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
    from .registry import get_op

    sym = get_op(op_name).symbolic
    return sym is not None and any(not isinstance(fn, (Relu, Step)) for fn in sym.forward.atoms(sp.Function))


class FusedKernel:
    """One fused group: a forward returning all results, and backward kernels per needed-input mask."""

    def __init__(self, name: str, spec: GroupSpec) -> None:
        from .registry import get_op

        self.name, self.spec = name, spec
        self.inputs = tuple(sp.Dummy(f"in{k}", real=True) for k in range(spec.n_inputs))
        exprs: list[sp.Expr] = []
        for op_name, args in spec.steps:
            sym = get_op(op_name).symbolic
            vals = [self.inputs[k] if kind == "in" else exprs[k] for kind, k in args]
            exprs.append(sym.forward.xreplace(dict(zip(sym.args, vals))))
        self.expressions = tuple(exprs)
        self.results = spec.results
        self.result_symbols = tuple(sp.Dummy(f"r{r}", real=True) for r in self.results)
        self.delta_symbols = tuple(sp.Dummy(f"d{o}", real=True) for o in spec.outputs)
        self.n_inputs, self.n_deltas = spec.n_inputs, len(spec.outputs)
        self.forward, self.forward_source = _lambdify(self.inputs, [exprs[r] for r in self.results])
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
        if exact and _keeps_float32(self.forward, spec.n_inputs):
            return
        raw = self.forward

        def forward(*xs: Any) -> list[Any]:
            dtype = np.result_type(*xs, 1.0)
            return [np.broadcast_to(o, np.broadcast_shapes(*(np.shape(xs[k]) for k in use))).astype(dtype)
                    for o, use in zip(raw(*xs), uses)]

        self.forward = forward

    def gradient_terms(self, needed: Sequence[bool]) -> tuple[sp.Expr, ...]:
        """``delta_k * d(result k)/d(input j)`` for each needed j and each output k, flattened.

        Used when the group's outputs differ in shape: each term must then be
        summed back to the input's shape on its own before the terms are added.
        """
        to_result = {self.expressions[r]: s for r, s in zip(self.results, self.result_symbols)}
        return tuple(stabilise(d * sp.diff(self.expressions[o], self.inputs[j])).xreplace(to_result)
                     for j, need in enumerate(needed) if need
                     for o, d in zip(self.spec.outputs, self.delta_symbols))

    def backward_terms(self, needed: tuple[bool, ...]) -> Callable[..., Any]:
        """Like :meth:`backward`, but returns the per-output terms (see :meth:`gradient_terms`)."""
        key = ("terms", needed)
        if key not in self._backward_terms:
            fn, _ = _lambdify((*self.delta_symbols, *self.result_symbols, *self.inputs),
                              list(self.gradient_terms(needed)))
            self._backward_terms[key] = fn
        return self._backward_terms[key]

    def gradient_expressions(self, needed: Sequence[bool]) -> tuple[sp.Expr, ...]:
        """dL/d(input j) for each needed j, written with the saved results wherever they occur."""
        to_result = {self.expressions[r]: s for r, s in zip(self.results, self.result_symbols)}
        # relu'(u) = step(u) = step(relu(u)): read the saved result instead of recomputing u
        to_result.update({Step(e.args[0]): Step(s) for e, s in list(to_result.items()) if isinstance(e, Relu)})
        grads = []
        for j, need in enumerate(needed):
            if not need:
                continue
            g = sum((d * sp.diff(self.expressions[o], self.inputs[j])
                     for o, d in zip(self.spec.outputs, self.delta_symbols)), sp.S.Zero)
            # factor_terms: c·δc + c·δh·o·(1-tanh²) → c·(δc + δh·o·(1-tanh²)), whose sum CSE then
            # shares between all the gates' gradients (17 numpy calls per LSTM cell become 10)
            grads.append(sp.factor_terms(stabilise(g).xreplace(to_result)))
        return tuple(grads)

    def backward(self, needed: tuple[bool, ...]) -> Callable[..., Any]:
        """``bp(*deltas, *results, *inputs) -> tuple`` of the needed input gradients (cached per mask)."""
        if needed not in self._backward:
            grads = self.gradient_expressions(needed)
            fn, src = _lambdify((*self.delta_symbols, *self.result_symbols, *self.inputs), list(grads))
            self._backward[needed] = (fn, src, grads)
        return self._backward[needed][0]

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
_FUSED_BY_SPEC: dict[tuple[GroupSpec, tuple[Any, ...]], FusedKernel] = {}


def fused_kernel(spec: GroupSpec) -> FusedKernel:
    from .registry import get_op

    # keyed by the Op objects too: an op redefined with replace=True must not reuse the old kernel
    key = (spec, tuple(get_op(op) for op, _ in spec.steps))
    kernel = _FUSED_BY_SPEC.get(key)
    if kernel is None:
        ops = "+".join(dict.fromkeys(op for op, _ in spec.steps))
        kernel = FusedKernel(f"fused{len(FUSED) + 1}[{ops}]", spec)
        _FUSED_BY_SPEC[key] = FUSED[kernel.name] = MULTI_OPS[kernel.name] = kernel
    return kernel
