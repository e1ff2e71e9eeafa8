"""C printing: the same SymPy expressions as one loop over rows and contiguous columns.

:func:`c_source` writes the C that :mod:`symdiff.native` compiles; :data:`C_PRELUDE`
holds the stable functions (and the accuracy catalogue's) as inline helpers with
numpy's NaN and signed-zero behaviour.
This module prints; it neither compiles nor decides when to (see :mod:`symdiff.fusion`).

Only the SymPy side of the engine imports SymPy: :mod:`symdiff.stable`,
:mod:`symdiff.declare`, :mod:`symdiff.cprint`, :mod:`symdiff.fusion`, and :mod:`symdiff.ops`
(which declares the built-in ops with it). Everything else (graph, registry, compiler,
passes, native) runs on numpy alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import sympy as sp
from sympy.codegen.ast import float32, float64, real
from sympy.printing.c import C99CodePrinter

from .declare import nest_calls
from .stable import NEW_FUNCTIONS, STABLE_FUNCTIONS


#: the functions ``sd_math.h`` provides (glibc's libmvec where found, else its own straight-line C; either
#: way the loops vectorise): SymPy's class names, which the printer maps to ``sd_<name>``
INLINE_MATH = ("exp", "expm1", "log", "log1p", "tanh")
#: other functions with vector variants in glibc's libmvec (declared ``simd`` so gcc calls them 4-8 lanes
#: at a time where libmvec is found; scalar libm otherwise)
_VECTOR_MATH = ("sin", "cos", "tan", "sinh", "cosh", "asin", "acos", "atan", "asinh", "acosh", "atanh", "exp2",
                "log2", "log10", "cbrt", "erf", "erfc")
#: the elementary functions' C (shipped beside this module; their accuracy: README "Performance")
SD_MATH = (Path(__file__).with_name("sd_math.h")).read_text()

C_PRELUDE = "\n".join([
    "#include <math.h>",
    "#ifdef SYMDIFF_VECTOR_MATH",
    "#define SD_SIMD __attribute__((simd(\"notinbranch\"), nothrow, const))",
    *(f"double {f}(double) SD_SIMD; float {f}f(float) SD_SIMD;" for f in _VECTOR_MATH),
    "double pow(double, double) SD_SIMD; float powf(float, float) SD_SIMD;",
    "#endif",
    SD_MATH,  # sd_exp, sd_expm1, sd_log, sd_log1p, sd_tanh, sd_sigmoid, sd_softplus (and ...f)
    *(f"static inline {t} sd_relu{x}({t} u) {{ return u > 0 ? u : (u == u ? 0 : u); }}\n"  # +0 for -0, as numpy
      f"static inline {t} sd_step{x}({t} u) {{ return u > 0 ? 1 : (u <= 0 ? 0 : u); }}\n"
      # numpy.maximum/minimum keep a NaN; C's fmax/fmin drop it
      f"static inline {t} sd_max{x}({t} a, {t} b) {{ return a != a || b != b ? a + b : (a > b ? a : b); }}\n"
      f"static inline {t} sd_min{x}({t} a, {t} b) {{ return a != a || b != b ? a + b : (a < b ? a : b); }}\n"
      # the accuracy catalogue's functions (symdiff.stable.NEW_FUNCTIONS), as numpy computes them
      f"static inline {t} sd_logaddexp{x}({t} a, {t} b) {{ {t} m = a > b ? a : b; "
      f"if (a == b) return a + ({t})0.69314718055994530942; if (m != m) return a + b; "
      f"return m + log1p{x}(exp{x}(-fabs{x}(a - b))); }}\n"
      f"static inline {t} sd_xlogx{x}({t} u) {{ return u == 0 ? 0 : u * log{x}(u); }}\n"
      f"static inline {t} sd_sech2{x}({t} u) {{ {t} e = exp{x}(-2 * fabs{x}(u)); "
      f"return 4 * e / ((1 + e) * (1 + e)); }}\n"
      f"static inline {t} sd_stableerfc{x}({t} u) {{ return erfc{x}(u); }}"
      for t, x in (("double", ""), ("float", "f"))),
])


class _CPrinter(C99CodePrinter):
    """SymPy's C99 printer; the stable functions, exp, expm1, log, log1p, tanh, Max and Min call the
    prelude's helpers."""

    def __init__(self, single: bool) -> None:
        self._suffix = "f" if single else ""
        helpers = {f.__name__: f"sd_{f.__name__.lower()}{self._suffix}" for f in (*STABLE_FUNCTIONS, *NEW_FUNCTIONS)}
        helpers.update({name: f"sd_{name}{self._suffix}" for name in INLINE_MATH})
        super().__init__({"type_aliases": {real: float32 if single else float64}, "user_functions": helpers})

    def _print_Max(self, e: sp.Expr) -> str:
        return nest_calls(f"sd_max{self._suffix}", [self._print(a) for a in e.args])

    def _print_Min(self, e: sp.Expr) -> str:
        return nest_calls(f"sd_min{self._suffix}", [self._print(a) for a in e.args])

    def _print_Taylor(self, e: sp.Expr) -> str:
        """The series near 0, the general form elsewhere (both computed: no traps, and it vectorises)."""
        u, r, series, general = (self._print(a) for a in e.args)
        return f"(fabs{self._suffix}({u}) < {r} ? {series} : {general})"


def c_missing(outputs: Sequence[sp.Expr]) -> tuple[str, ...]:
    """The functions in ``outputs`` that C99's math library lacks (Bessel functions, polygamma, ...).

    A kernel using one cannot be compiled; it runs with numpy/SciPy instead (see :mod:`symdiff.fusion`).
    """
    printer = _CPrinter(False)
    missing: dict[str, None] = {}
    for e in outputs:
        for fn in sp.sympify(e).atoms(sp.Function):
            try:  # the function alone, on plain arguments (tanh(polygamma(..)) is polygamma's fault)
                printer.doprint(fn.func(*(sp.Symbol(f"a{k}", real=True) for k in range(len(fn.args)))))
            except Exception:  # noqa: BLE001 - SymPy's C printer refuses what C has no function for
                missing[fn.func.__name__] = None
    return tuple(missing)


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
        lanes = 8 if single else 4
        # Whole vectors only: a row's last, partial vector is done as the last full one, overlapping
        # the one before (same values written twice). A scalar tail would call scalar libm per
        # element: with K = 50 that tail cost as much as the 48 vectorised elements. Chunks of one
        # 256-bit vector (gcc's width for AVX2 and, by its default -mprefer-vector-width=256, for
        # AVX-512 too): with K = 50, 16-lane float32 chunks computed 64 elements a row for 50, 8-lane
        # ones 56; the LSTM cell's forward kernel ran 10% (float32) and 5% (float64) faster so.
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
