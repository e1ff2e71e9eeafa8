"""Central-difference gradient checks for whole graphs and for single ops."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .autograd import Autograd
from .errors import ShapeError, SymdiffError, UnknownNameError, did_you_mean
from .graph import Step, XMan
from .onehot import OneHot
from .registry import Op


@dataclass
class ParamCheck:
    name: str
    shape: tuple[int, ...]
    checked: int          # elements perturbed
    max_abs: float        # max |numeric - analytic|
    max_rel: float        # max |numeric - analytic| / max(|numeric|, |analytic|, tiny)
    ok: bool


@dataclass
class GradCheckReport:
    """Per-parameter agreement between backprop and central differences."""

    params: list[ParamCheck] = field(default_factory=list)
    eps: float = 1e-4
    rtol: float = 1e-4
    atol: float = 1e-6

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.params)

    def __str__(self) -> str:
        lines = [f"{'param':<12} {'shape':<14} {'checked':>8} {'max abs diff':>13} {'max rel diff':>13}  ok"]
        for p in self.params:
            lines.append(f"{p.name:<12} {str(p.shape):<14} {p.checked:>8} {p.max_abs:>13.3e} {p.max_rel:>13.3e}  "
                         f"{'yes' if p.ok else 'NO'}")
        return "\n".join(lines)


def _float64(v: Any) -> Any:
    if isinstance(v, OneHot):
        return OneHot(v.indices, v.depth, np.float64)
    a = np.asarray(v)
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a


def grad_check(xm: XMan, wengert: Sequence[Step], inputs: Mapping[str, Any] | None = None, *,
               eps: float = 1e-4, rtol: float = 1e-4, atol: float = 1e-6,
               max_elements: int | None = 64, seed: int = 0, loss: str | None = None,
               passes: Sequence[str] | None = None, fuse: bool = True,
               projection: Any = None) -> GradCheckReport:
    """Compare ``bprop`` with central differences ``(L(w+eps) - L(w-eps)) / 2eps``.

    Runs in float64 at the registers' default values (or ``inputs``). ``L`` is the
    register ``loss`` (default: the list's last), which must be a scalar, or
    ``sum(projection * loss)`` for a ``projection`` array of its shape (a random one
    checks every output element's gradient at once): a non-scalar output is never
    summed silently. Each param has up to ``max_elements`` elements perturbed, chosen
    by a seeded RNG (``None`` checks every element). An element agrees when
    ``|num - ana| <= atol + rtol * max(|num|, |ana|)``; the seed assignment's bar
    (3 decimal places) is far looser. ``passes``/``fuse`` choose the graph
    rewrites as for :class:`Autograd` (default: all of them). A check that would
    check nothing (no params, ``max_elements`` < 1, ``eps`` not > 0) is an error.
    """
    if not (isinstance(eps, (int, float, np.floating)) and np.isfinite(eps) and eps > 0):
        raise SymdiffError(f"grad_check: eps must be a finite number > 0, got {eps!r}")
    if max_elements is not None and max_elements < 1:
        raise SymdiffError(f"grad_check: max_elements must be at least 1 (or None for every element), "
                           f"got {max_elements!r}: a check of no element checks nothing")
    ad = Autograd(xm, fuse=fuse) if passes is None else Autograd(xm, passes=passes, fuse=fuse)
    values = {k: _float64(v) for k, v in (xm.inputDict() if inputs is None else inputs).items()}
    loss = loss or wengert[-1][0]
    program = ad.compile(wengert)
    if loss not in program.slot:
        raise UnknownNameError(f"grad_check: loss {loss!r} is not a register of this Wengert list."
                               + did_you_mean(loss, program.names, "registers"))
    if not program.params:
        raise SymdiffError(f"grad_check: {loss!r} depends on no param, so there is nothing to check; "
                           f"declare trained values with f.param(...)")
    slots = program.forward(values)
    out = slots[program.slot[loss]]
    if projection is None:
        if np.shape(out) != ():
            raise ShapeError(f"grad_check: {loss!r} has shape {np.shape(out)}, not a scalar; pass "
                             f"projection=np.random.default_rng(0).standard_normal({np.shape(out)}) to check "
                             f"the gradient of sum(projection * {loss})")
        weights = np.ones((), dtype=np.float64)
    else:
        weights = np.asarray(projection, dtype=np.float64)
        if weights.shape != np.shape(out):
            raise ShapeError(f"grad_check: projection has shape {weights.shape} but {loss!r} has shape "
                             f"{np.shape(out)}; they must match")
    grads = program.backward(slots, {loss: weights.copy()})
    rng = np.random.default_rng(seed)

    def total(vals: Mapping[str, Any]) -> float:
        s = program.forward(vals)
        return float(np.sum(weights * s[program.slot[loss]]))

    report = GradCheckReport(eps=eps, rtol=rtol, atol=atol)
    for name in program.params:
        w = values[name]
        g = grads[program.slot[name]]
        analytic = np.zeros_like(w) if g is None else np.asarray(g, dtype=np.float64)
        flat = w.reshape(-1)
        idx = np.arange(flat.size)
        if max_elements is not None and flat.size > max_elements:
            idx = rng.choice(flat.size, size=max_elements, replace=False)
        max_abs = max_rel = 0.0
        ok = True
        for i in idx:
            orig = flat[i]
            flat[i] = orig + eps
            up = total(values)
            flat[i] = orig - eps
            down = total(values)
            flat[i] = orig
            num = (up - down) / (2 * eps)
            ana = analytic.reshape(-1)[i]
            diff = abs(num - ana)
            scale = max(abs(num), abs(ana))
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / scale if scale > 1e-12 else 0.0)
            ok = ok and diff <= atol + rtol * scale
        report.params.append(ParamCheck(name, tuple(w.shape), len(idx), max_abs, max_rel, ok))
    return report


def check_op(op: Op, shapes: Sequence[tuple[int, ...]] | None = None, *, rng: np.random.Generator,
             eps: float = 1e-6, low: float = -2.0, high: float = 2.0,
             inputs: Sequence[Any] | None = None) -> float:
    """Max relative error of ``op``'s backward kernels against central differences.

    Inputs are drawn uniformly from ``[low, high]`` with the given (possibly
    broadcasting) shapes, or taken from ``inputs`` (copied to float64; boolean masks kept) for ops
    that need particular values, e.g. probabilities. The check contracts the
    output with a random ``delta`` so every element of every input gradient is
    tested. Each difference ``f(x+eps) - f(x-eps)`` is taken before the
    contraction, so outputs the perturbed element does not touch cancel exactly.
    """
    if inputs is not None:  # floats in float64; a boolean mask stays as it is
        xs = [np.array(x) if np.asarray(x).dtype == bool else np.array(x, dtype=np.float64) for x in inputs]
    elif shapes is not None:
        xs = [rng.uniform(low, high, size=s) for s in shapes]
    else:
        raise TypeError("check_op needs the input shapes or the inputs themselves")
    out = op.forward(*xs)
    delta = rng.standard_normal(np.shape(out))
    worst = 0.0
    for j, x in enumerate(xs):
        if j in op.nondifferentiable:  # a mask, an order: no gradient to check
            continue
        ana = op.backward[j](delta, out, *xs)
        if np.shape(ana) != np.shape(x):
            raise AssertionError(f"{op.name}: gradient wrt input {j} has shape {np.shape(ana)}, input has {np.shape(x)}")
        if x.size == 0:  # an empty part (a concat's): its gradient is right once its shape is
            continue
        num = np.zeros_like(x)
        for i in range(x.size):
            orig = x.flat[i]
            x.flat[i] = orig + eps
            up = np.array(op.forward(*xs), dtype=np.float64)  # a copy: the output may be a view of x
            x.flat[i] = orig - eps
            down = np.array(op.forward(*xs), dtype=np.float64)
            x.flat[i] = orig
            num.flat[i] = float(np.sum(delta * (up - down))) / (2 * eps)
        scale = np.maximum(np.maximum(np.abs(num), np.abs(ana)), 1e-3)
        worst = max(worst, float(np.max(np.abs(num - ana) / scale)))
    return worst


@dataclass
class OrderCheck:
    """One order of :func:`check_grads`: the worst relative error over the elements checked."""

    order: int
    of: str
    checked: int
    max_rel: float
    ok: bool


def check_grads(xm: XMan, of: str, wrt: Sequence[str], *, order: int = 2, values: Mapping[str, Any] | None = None,
                eps: float = 1e-5, rtol: float = 1e-5, atol: float = 1e-8, max_elements: int | None = 16,
                seed: int = 0, fuse: bool = True) -> list[OrderCheck]:
    """Gradient graphs checked against central differences, order after order (HIPS ``check_grads``).

    Order 1 compares ``grad(xm, of, wrt)`` with central differences of ``of``.
    For order k + 1, the scalar ``⟨∇of, r⟩`` (fixed random ``r`` per name, added
    to the gradient graph as inputs) becomes ``of`` on that gradient graph, whose
    own gradient graph is checked the same way: every derivative rule is then
    checked as a function of its inputs, not only at one cotangent. Runs in
    float64, with the passes and fusion of ``Autograd`` (``fuse``).
    """
    from .differential import grad, wengert_for
    from .graph import f

    rng = np.random.default_rng(seed)
    vals = {k: _float64(v) for k, v in (xm.inputDict() if values is None else values).items()}
    current, name, out = xm, of, []
    for k in range(1, order + 1):
        prefix = f"d{k}_"
        gx = grad(current, name, wrt, prefix=prefix)
        ad = Autograd(gx, fuse=fuse)
        wengert = wengert_for(gx, [name, *(prefix + w for w in wrt)])
        v = ad.eval(wengert, vals)
        worst, checked, ok = 0.0, 0, True
        for w in wrt:
            x = vals[w]
            flat = x.reshape(-1)
            analytic = np.asarray(v[prefix + w], dtype=np.float64).reshape(-1)
            idx = np.arange(flat.size)
            if max_elements is not None and flat.size > max_elements:
                idx = rng.choice(flat.size, size=max_elements, replace=False)
            for i in idx:
                orig = flat[i]
                flat[i] = orig + eps
                up = float(ad.eval(wengert, vals)[name])
                flat[i] = orig - eps
                down = float(ad.eval(wengert, vals)[name])
                flat[i] = orig
                num, ana = (up - down) / (2 * eps), analytic[i]
                diff, scale = abs(num - ana), max(abs(num), abs(ana))
                worst = max(worst, diff / scale if scale > atol else 0.0)
                ok = ok and diff <= atol + rtol * scale
                checked += 1
        out.append(OrderCheck(k, name, checked, float(worst), bool(ok)))
        if k == order:
            break
        terms = []
        for w in wrt:
            r = f"r{k}_{w}"
            vals[r] = rng.standard_normal(np.shape(vals[w]))
            setattr(gx, r, f.input(name=r))
            terms.append(f.sum(f.hadamard(gx.register(prefix + w), getattr(gx, r))))
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        name = f"s{k}"
        setattr(gx, name, total)
        current = gx.setup()
    return out
