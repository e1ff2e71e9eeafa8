"""Built-in primitives, in one table-like place.

Elementwise ops are one line of SymPy each; :func:`symdiff.defop` derives,
stabilises and compiles their gradients. Structural ops (matrix product,
softmax, cross-entropy, mean, transpose) are written by hand below them,
because their Jacobians are not elementwise.

One of the modules that import SymPy, with :mod:`symdiff.stable`, :mod:`symdiff.declare`,
:mod:`symdiff.cprint` and :mod:`symdiff.fusion`; the rest of the engine runs on numpy alone.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from operator import itemgetter
from typing import Any, Iterator

import numpy as np
import sympy as sp

from . import native, numpy_loops
from .onehot import OneHot
from .registry import MULTI_OPS, Op, register
from .declare import defop, training_backward

x, y = sp.symbols("x y")

# ---- elementwise: declared once, derived by SymPy ---------------------------------------
defop("add", x + y, args=[x, y], doc="x + y (numpy broadcasting; gradients summed back)")
defop("subtract", x - y, args=[x, y], doc="x - y")
defop("hadamard", x * y, args=[x, y], doc="elementwise product x ⊙ y")
defop("relu", sp.Max(x, 0), args=[x], doc="max(x, 0); relu'(0) = 0")
defop("sigmoid", 1 / (1 + sp.exp(-x)), args=[x], doc="logistic sigmoid, stable for any x")
defop("tanh", sp.tanh(x), args=[x], doc="hyperbolic tangent")
defop("exp", sp.exp(x), args=[x], doc="exponential")
defop("log", sp.log(x), args=[x], doc="natural logarithm (x > 0)")
defop("square", x**2, args=[x], doc="x squared")
defop("negate", -x, args=[x], doc="-x")
defop("divide", x / y, args=[x, y], doc="x / y, elementwise (also written x / y between registers)")


# ---- structural: hand-written ------------------------------------------------------------
def _mul(a: Any, b: np.ndarray) -> np.ndarray:
    if isinstance(a, OneHot):
        return a.matmul(b)
    return a @ b


_PASS = threading.local()  # .transposes: {id(b): (b, contiguous b.T)} while a backward pass runs


@contextmanager
def shared_transposes() -> Iterator[None]:
    """One backward pass: values do not change inside it, so the contiguous copy of a product's
    right operand's transpose (:func:`_mul_da`) is made once per operand, not once per product
    using it (an LSTM's ten ``delta @ Uᵀ``). The copies go when the pass ends."""
    outer = getattr(_PASS, "transposes", None)
    _PASS.transposes = {} if outer is None else outer
    try:
        yield
    finally:
        _PASS.transposes = outer


#: the sizes of a C-ordered right operand ``b`` for which ``delta @ b.T`` multiplies by a contiguous copy
#: of ``b.T``: OpenBLAS is slower with a transposed right operand at these sizes than the copy costs
#: (LSTM, 64x200 @ (50x200).T: 34 us; 3.6 us copy + 24 us). A native run (symdiff.autograd) is handed
#: the same sizes, so that it makes the same gemm call and gets the same bits
TRANSPOSED_COPY_SIZES = (1024, 1 << 16)


def _mul_da(delta: Any, out: Any, a: Any, b: np.ndarray) -> np.ndarray:
    if type(delta) is RowBlocks:
        delta = delta.joined()
    if np.ndim(b) == 1:  # matrix-vector (or vector-vector) product: delta has lost b's axis
        return np.multiply.outer(delta, b) if np.ndim(a) == 2 else delta * b
    if b.flags.c_contiguous and TRANSPOSED_COPY_SIZES[0] <= b.size <= TRANSPOSED_COPY_SIZES[1]:
        cache = getattr(_PASS, "transposes", None)
        if cache is None:
            return delta @ np.ascontiguousarray(b.T)
        hit = cache.get(id(b))
        if hit is None or hit[0] is not b:  # (b is held: its id cannot be reused while cached)
            hit = cache[id(b)] = (b, np.ascontiguousarray(b.T))
        return delta @ hit[1]
    return delta @ b.T


def _mul_db(delta: Any, out: Any, a: Any, b: np.ndarray) -> Any:
    if isinstance(a, OneHot):
        return a.rmatmul_grad(delta)  # reads RowBlocks' blocks in place
    if type(delta) is RowBlocks:
        delta = delta.joined()
    if np.ndim(a) == 1:  # vector-matrix (or vector-vector) product: delta has lost a's axis
        return np.multiply.outer(a, delta) if np.ndim(b) == 2 else delta * a
    return a.T @ delta


#: the matrix product's forward and its two derivatives: where a program's step runs these on dense
#: 2-D float arrays, a native run (symdiff.autograd) may compute them with gemm instead, same bits
MATMUL_KERNELS = (_mul, _mul_da, _mul_db)


def _softmax(o: np.ndarray) -> np.ndarray:
    z = o - o.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def _softmax_back(delta: np.ndarray, p: np.ndarray, o: np.ndarray) -> np.ndarray:
    return p * (delta - (delta * p).sum(axis=-1, keepdims=True))


def _log_softmax(o: np.ndarray) -> np.ndarray:
    z = o - o.max(axis=1, keepdims=True)
    s = np.exp(z).sum(axis=1, keepdims=True)
    z -= np.log(s, out=s)
    return z


def _crossent(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    # log of an underflowed probability is -inf by definition; the fused pass avoids it
    with np.errstate(divide="ignore"):
        logp = np.log(p)
    return -(t * np.where(t != 0, logp, 0)).sum(axis=1)


def _crossent_dp(delta: np.ndarray, out: Any, p: np.ndarray, t: np.ndarray) -> np.ndarray:
    return -delta[:, None] * t / p


def _crossent_dt(delta: np.ndarray, out: Any, p: np.ndarray, t: np.ndarray) -> np.ndarray:
    return -delta[:, None] * np.log(p)


def _head() -> Any | None:
    """The dispatcher when the loss head may run there (native code on, numpy's loops handed over and
    agreeing with the numpy code below: :mod:`symdiff.numpy_loops`), else None. One look-up once decided."""
    d = native.active()
    return d if d is not None and numpy_loops.install(d, _head_reference) else None


def _head_reference(o: np.ndarray, t: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, ...]:
    """The head with numpy (what the compiled head must equal): loss, its gradient, their means."""
    loss = _crossent_softmax_numpy(o, t)
    return (loss, _crossent_softmax_do_numpy(d, None, o, t), _mean_numpy(loss),
            _mean_back_numpy(d[-1:].reshape(()), None, loss))


def _crossent_softmax(o: np.ndarray, t: np.ndarray) -> np.ndarray:
    head = _head()  # compiled: the same steps in one call, numpy's own loops (symdiff.numpy_loops)
    if head is not None:
        loss = head.crossent_softmax(o, t)
        if loss is not None:
            return loss
    return _crossent_softmax_numpy(o, t)


def _crossent_softmax_numpy(o: np.ndarray, t: np.ndarray) -> np.ndarray:
    z = _log_softmax(o)
    z *= t  # in place (a batch's few columns: the calls, not the arithmetic, cost here)
    loss = z.sum(axis=1)
    return np.negative(loss, out=loss)


def _crossent_softmax_do(delta: np.ndarray, out: Any, o: np.ndarray, t: np.ndarray) -> np.ndarray:
    head = _head()
    if head is not None:
        g = head.crossent_softmax_grad(delta, o, t)
        if g is not None:
            return g
    return _crossent_softmax_do_numpy(delta, out, o, t)


def _crossent_softmax_do_numpy(delta: np.ndarray, out: Any, o: np.ndarray, t: np.ndarray) -> np.ndarray:
    # d/do_k of -sum_j t_j log softmax(o)_j = p_k * sum_j t_j - t_k   (= p - t for one-hot t)
    g = _softmax(o)
    g *= t.sum(axis=1, keepdims=True)
    g -= t
    g *= delta[:, None]
    return g


def _crossent_softmax_dt(delta: np.ndarray, out: Any, o: np.ndarray, t: np.ndarray) -> np.ndarray:
    return -delta[:, None] * _log_softmax(o)


def _mean(a: np.ndarray) -> np.ndarray:
    head = _head()  # compiled: numpy's pairwise add loop, as np.add.reduce calls it
    if head is not None:
        m = head.mean_of(a)
        if m is not None:
            return m
    return _mean_numpy(a)


def _mean_numpy(a: np.ndarray) -> np.ndarray:
    if type(a) is np.ndarray and a.dtype.kind == "f" and a.dtype.itemsize >= 4 and a.size:
        # what np.mean computes for these (one pairwise sum in the dtype, divided by the count),
        # without its dispatch and bookkeeping: 1 us of the 4 it takes on a batch's row losses
        return np.asarray(np.add.reduce(a, axis=None) / a.size)
    return np.asarray(np.mean(a))


def _mean_back(delta: Any, out: Any, a: np.ndarray) -> np.ndarray:
    head = _head()
    if head is not None:
        g = head.mean_grad(delta, a)
        if g is not None:
            return g
    return _mean_back_numpy(delta, out, a)


def _mean_back_numpy(delta: Any, out: Any, a: np.ndarray) -> np.ndarray:
    return np.full(np.shape(a), delta / np.size(a), dtype=np.result_type(a, delta))


def _transpose(a: np.ndarray) -> np.ndarray:
    return np.transpose(a)


def _transpose_back(delta: np.ndarray, out: Any, a: np.ndarray) -> np.ndarray:
    return np.transpose(delta)


STRUCTURAL = (
    Op("mul", 2, _mul, (_mul_da, _mul_db), onehot_inputs=(0,),
       formula="a @ b (matrix product; one-hot a gathers rows of b)",
       derivative_formulas=("delta @ b.T", "a.T @ delta (scatter-add for one-hot a)"),
       backward_reads=((False,), (True, True)), doc="matrix product, also written a * b and a @ b"),
    Op("softMax", 1, _softmax, (_softmax_back,), formula="exp(o - max o) / sum exp(o - max o), along the last axis",
       derivative_formulas=("out * (delta - sum(delta * out, axis=-1))",), backward_reads=((True,), (False,)),
       doc="softmax along the last axis (row-wise for a matrix); f.softMax(x, axis=k) for another"),
    Op("crossEnt", 2, _crossent, (_crossent_dp, _crossent_dt), formula="-sum(t * log p, axis=1)",
       derivative_formulas=("-delta * t / p", "-delta * log p"), backward_reads=((False,), (True, True)), doc="per-row cross-entropy of probabilities p against targets t"),
    Op("crossEnt-softMax", 2, _crossent_softmax, (_crossent_softmax_do, _crossent_softmax_dt),
       formula="-sum(t * log_softmax(o), axis=1)",
       derivative_formulas=("delta * (softmax(o) * sum(t) - t)", "-delta * log_softmax(o)"),
       backward_reads=((False,), (True, True)), doc="crossEnt(softMax(o), t) fused by the crossent_softmax pass: stable, gradient p - t"),
    Op("mean", 1, _mean, (_mean_back,), formula="mean of all elements", derivative_formulas=("delta / size",),
       backward_reads=((False,), (False,)), doc="mean of all elements (a scalar)"),
    Op("transpose", 1, _transpose, (_transpose_back,), formula="a.T", derivative_formulas=("delta.T",),
       backward_reads=((False,), (False,)), doc="matrix transpose"),
)
for _op in STRUCTURAL:
    register(_op)


# ---- multi-output structural ops, made by the merge_matmuls pass ---------------------------
class Stack:
    """``hconcat{k}`` (side by side, ``axis=1``) / ``vconcat{k}`` (on top, ``axis=0``) of k operands.

    The second output, the *layout*, holds the offsets at which the matching
    ``split{k}``/``rsplit{k}`` cuts (so operands of different widths merge) and
    which operands were vectors (a vector is one column, or one row). One-hot
    parts of one depth stacked by rows stay one-hot, so the product that
    follows is still a gather and its weight gradient one scatter-add.
    """

    nondifferentiable: tuple[int, ...] = ()
    exact_gradients = True  # backward hands back gradients of exactly the parts' shapes

    def __init__(self, k: int, axis: int) -> None:
        self.name = f"{'hconcat' if axis else 'vconcat'}{k}"
        self.n_inputs, self.n_deltas, self.axis = k, 1, axis
        self.backward_reads = ((False, True), (False,) * k)  # only the layout
        self.onehot_inputs = tuple(range(k)) if axis == 0 else ()  # one-hot rows stack as one-hot
        self._layouts: dict[tuple[tuple[int, ...], tuple[bool, ...]], np.ndarray] = {}
        # parts found side by side, by identity: (parts, the view, layout). Every batch joins the same
        # parameter arrays (an LSTM's W and U gates), and a view of them stays valid when they are
        # updated in place, so the next batch takes the same view (parts held: their ids stay theirs)
        self._views: dict[tuple[int, ...], tuple[tuple[Any, ...], np.ndarray, np.ndarray]] = {}

    def forward(self, *parts: Any) -> tuple[Any, np.ndarray]:
        k, axis = self.n_inputs, self.axis
        if axis == 1 and native.active() is not None:  # (the join is a compiled helper's: not when switched off)
            hit = self._views.get(tuple(map(id, parts)))
            if hit is not None and all(a is b for a, b in zip(hit[0], parts)):
                return hit[1], hit[2]
        if axis == 0 and isinstance(parts[0], OneHot):  # one plain pass over the parts (an LSTM's x0 ... x9)
            depth = parts[0].depth
            for p in parts:
                if not isinstance(p, OneHot) or p.depth != depth:
                    break
            else:
                return OneHot.vstack(list(parts)), self._layout(tuple([p.indices.shape[0] for p in parts]), (False,) * k)
        dense = [np.asarray(p) for p in parts]
        if any(d.ndim not in (1, 2) for d in dense):
            raise ValueError(f"{self.name} needs vectors or matrices, got shapes {[d.shape for d in dense]}")
        flags = [d.ndim == 1 for d in dense]
        dense = [np.expand_dims(d, axis) if d.ndim == 1 else d for d in dense]
        if len({d.shape[1 - axis] for d in dense}) != 1:
            raise ValueError(f"{self.name} needs operands that agree along axis {1 - axis}, got shapes "
                             f"{[np.shape(p) for p in parts]}")
        layout = self._layout(tuple(d.shape[axis] for d in dense), tuple(flags))
        if axis == 1 and not any(flags):
            joined = _side_by_side(dense)  # parts stored side by side already (the LSTM's gate weights)
            if joined is not None:
                if all(type(p) is np.ndarray for p in parts):
                    if len(self._views) >= 16:
                        self._views.clear()
                    self._views[tuple(map(id, parts))] = (parts, joined, layout)
                return joined, layout
        return np.concatenate(dense, axis=axis), layout

    def _layout(self, widths: tuple[int, ...], flags: tuple[bool, ...]) -> np.ndarray:
        """One layout array per set of widths (read-only, shared): every batch reuses it."""
        key = (widths, flags)
        layout = self._layouts.get(key)
        if layout is None:
            layout = np.array([np.cumsum([0, *widths]), [*flags, 0]])
            layout.flags.writeable = False
            if len(self._layouts) > 64:
                self._layouts.clear()
            self._layouts[key] = layout
        return layout

    def backward(self, needed: tuple[bool, ...]) -> Any:
        axis = self.axis

        def bp(delta: Any, stacked: Any, layout: np.ndarray, *parts: Any) -> tuple[Any, ...]:
            cuts = [c for c, need in zip(_cuts(layout), needed) if need]
            # delta[:, c], not delta[..., c]: a row-sparse delta keeps only column slices sparse
            return tuple(delta[:, c] for c in cuts) if axis else tuple(delta[c] for c in cuts)

        return bp


class Cut:
    """``split{k}`` (last axis) / ``rsplit{k}`` (first axis): a product cut back into k blocks (views)."""

    nondifferentiable: tuple[int, ...] = (1,)  # the layout
    exact_gradients = True

    def __init__(self, k: int, axis: int) -> None:
        self.name = f"{'split' if axis else 'rsplit'}{k}"
        self.n_inputs, self.n_deltas, self.axis = 2, k, axis
        self.backward_reads = ((False,) * k, (False, True))  # only the layout (blocks lend their shapes)

    def forward(self, m: Any, layout: np.ndarray | None) -> tuple[np.ndarray, ...]:
        return tuple(_blocks(m, layout, -1 if self.axis else 0))

    def backward(self, needed: tuple[bool, ...]) -> Any:
        k = self.n_deltas
        axis = -1 if self.axis else 0

        def bp(*args: Any) -> tuple[Any]:
            deltas, blocks, layout = args[:k], args[k:2 * k], args[2 * k + 1]
            # a block that got no gradient arrives as the placeholder 0 (a RowSparse is a real gradient)
            parts = [np.zeros_like(blk) if isinstance(d, (int, float)) else d for d, blk in zip(deltas, blocks)]
            if axis == 0 and layout is not None:
                rows = RowBlocks.of(parts, layout)
                if rows is not None:
                    return (rows,)
            return (_join(parts, layout, axis),)

        return bp


class RowBlocks:
    """Equal row blocks standing for their concatenation: the gradient of a product stacked by rows.

    ``rsplit``'s backward would copy its blocks' gradients into one array (an LSTM's ten
    steps: 10 × 64 × 200 numbers a batch) only for the product's backward to read them
    once. The product's backward reads them where they are instead (a one-hot's
    scatter-add, :meth:`OneHot.rmatmul_grad`) or joins them itself (:meth:`joined`);
    anything else sees the joined array through ``__array__``.
    """

    __slots__ = ("parts", "shape", "dtype")
    ndim = 2

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.shape = (parts[0].shape[0] * len(parts), parts[0].shape[1])
        self.dtype = parts[0].dtype

    @classmethod
    def of(cls, parts: list[Any], layout: np.ndarray) -> "RowBlocks | None":
        """``parts`` as row blocks if they are plain matrices of one shape and dtype (no vector blocks)."""
        first = parts[0]
        if type(first) is not np.ndarray or first.ndim != 2 or _remembered(layout)[3]:
            return None
        shape, dtype = first.shape, first.dtype
        for p in parts:  # one plain loop (no generator): an LSTM's ten step gradients, every batch
            if type(p) is not np.ndarray or p.shape != shape or (p.dtype is not dtype and p.dtype != dtype):
                return None
        return cls(parts)

    def joined(self) -> np.ndarray:
        return np.concatenate(self.parts, axis=0)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.joined()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __add__(self, other: Any) -> np.ndarray:
        return self.joined() + np.asarray(other)

    __radd__ = __add__


class Blocks(list):
    """Blocks that could not be laid side by side in one array (their leading shapes differ).

    The horizontal-fusion ops fall back to one block at a time and pass a
    ``Blocks`` list with layout ``None`` instead of an array and its layout;
    :class:`Cut` hands the blocks out unchanged. Same results, no speed-up.
    """

    shape = None  # not an array: the compiler's shape checks leave it alone
    dtype = None


#: layouts met lately, by identity: (layout, block indices, their ``(..., index)`` keys, any vector block)
_layout_cuts: dict[int, tuple[Any, list[Any], list[Any], bool]] = {}


def _remembered(layout: np.ndarray) -> tuple[Any, list[Any], list[Any], bool]:
    """A layout's block indices, their ``(..., index)`` keys and whether a block is a vector, made once.

    By identity (layouts are internal, never written, and each op's are reused batch after batch;
    held here, so an id stays theirs): a batch meets a few (an LSTM's gate weights, its stacked
    inputs), forward and backward, so a few are kept, not only the last.
    """
    hit = _layout_cuts.get(id(layout))
    if hit is not None and hit[0] is layout:
        return hit
    offsets, vectors = layout.tolist()  # plain ints: indexing with numpy scalars is slower
    cuts = [a if v else slice(a, b) for a, b, v in zip(offsets, offsets[1:], vectors)]
    if len(_layout_cuts) >= 32:
        _layout_cuts.clear()
    hit = _layout_cuts[id(layout)] = (layout, cuts, [(Ellipsis, c) for c in cuts], any(vectors))
    return hit


def _cuts(layout: np.ndarray) -> list[Any]:
    """The index of each block a layout describes: a slice, or an int for a vector block."""
    return _remembered(layout)[1]


def _blocks(m: Any, layout: np.ndarray | None, axis: int = -1) -> list[Any]:
    """The blocks (views) of ``m`` along its last (``axis=-1``) or first (``0``) axis; ``Blocks`` already are."""
    if layout is None:
        return list(m)
    if axis:  # m[..., cut] per block, mapped in C (a fused LSTM step cuts two products, twice a batch)
        return list(map(m.__getitem__, _remembered(layout)[2]))
    return [m[c] for c in _cuts(layout)]


def _join(parts: list[Any], layout: np.ndarray | None, axis: int = -1) -> Any:
    """Inverse of :func:`_blocks`: gradients of the blocks as one gradient of ``m``."""
    if layout is None:
        return Blocks(parts)
    if axis == -1 and type(parts) is list:  # (vector blocks are 1-D: never side by side)
        joined = _side_by_side(parts)
        if joined is not None:
            return joined
    if _remembered(layout)[3]:
        parts = [np.expand_dims(d, axis) if v else d for d, v in zip(parts, layout[1].tolist())]
    return np.concatenate(parts, axis=axis)


def _side_by_side(parts: list[Any]) -> np.ndarray | None:
    """The column range of one buffer that ``parts`` already are, in order (no copy), else None.

    A compiled fused backward writes the gradients of a cut's blocks side by side
    into one buffer (:mod:`symdiff.native`); joining them back is then a view. Only
    such buffers are laid out that way, so without the compiled dispatcher: None.
    """
    d = native.active()
    return None if d is None else d.join_columns(parts)


class Concat:
    """``cat{k}``: k operands side by side along their *last* axis (a bias per gate → one bias).

    Unlike ``hconcat`` (right operands of a product, where a vector is a column)
    this keeps numpy's broadcasting view: ``(H,)`` vectors join into ``(k·H,)``.
    Operands whose leading shapes differ stay apart as :class:`Blocks`.
    """

    exact_gradients = True

    def __init__(self, k: int) -> None:
        self.name = f"cat{k}"
        self.n_inputs, self.n_deltas = k, 1
        self.nondifferentiable: tuple[int, ...] = ()
        self.backward_reads = ((False, True), (False,) * k)

    def forward(self, *parts: Any) -> tuple[Any, np.ndarray | None]:
        dense = [np.asarray(p) for p in parts]
        if any(d.ndim == 0 for d in dense) or len({d.shape[:-1] for d in dense}) != 1:
            return Blocks(dense), None
        offsets = np.cumsum([0, *(d.shape[-1] for d in dense)])
        return np.concatenate(dense, axis=-1), np.array([offsets, [0] * len(offsets)])

    def backward(self, needed: tuple[bool, ...]) -> Any:
        def bp(delta: Any, joined: Any, layout: np.ndarray | None, *parts: Any) -> tuple[Any, ...]:
            return tuple(d for d, need in zip(_blocks(delta, layout), needed) if need)

        return bp


class Blockwise:
    """``blockwise[op]``: a binary elementwise op applied to two arrays cut into the same blocks.

    Made by the ``fuse_blocks`` pass from ``op(a_j, b_j)`` for every block ``j``
    of two cuts (an LSTM's four gate pre-activations ``x·W_g + h·U_g``, then
    ``+ b_g``): one call on the whole ``(N, k·H)`` arrays instead of k calls on
    strided views. The op's own (SymPy-derived) kernels do the work. When the
    layouts differ (blocks of other widths, broadcasting per block) it falls
    back to one block at a time, with the same results.
    """

    nondifferentiable = (1, 3)  # the layouts
    exact_gradients = True  # the op's own kernels sum each gradient back to its input's shape

    def __init__(self, op_name: str) -> None:
        from .registry import get_op

        self.op = get_op(op_name)
        self.name = f"blockwise[{op_name}]"
        self.n_inputs, self.n_deltas = 4, 1
        (out,), (a, b) = self.op.backward_reads or ((True,), (True, True))
        self.backward_reads = ((out, True), (a, True, b, True))
        self._seen: dict[tuple[int, int], tuple[Any, Any, bool]] = {}

    def describe(self) -> str:
        return (f"{self.op.name} of two arrays cut into the same blocks, in one call on the whole arrays "
                f"(block by block if their layouts differ); gradients from {self.op.name}'s own kernels")

    def _aligned(self, la: Any, lb: Any) -> bool:
        # the same few layout objects come back at every time step of a batch: compare each pair once
        key = (id(la), id(lb))
        seen = self._seen.get(key)
        if seen is not None and seen[0] is la and seen[1] is lb:
            return seen[2]
        same = (la is not None and lb is not None and la.shape == lb.shape
                and bool((la == lb).all()) and not la[1].any())
        if len(self._seen) > 16:
            self._seen.clear()
        self._seen[key] = (la, lb, same)  # holding them keeps their ids from being reused
        return same

    def forward(self, a: Any, la: Any, b: Any, lb: Any) -> tuple[Any, np.ndarray | None]:
        fn = self.op.forward
        if self._aligned(la, lb):
            return fn(a, b), la
        return Blocks([fn(x, y) for x, y in zip(_blocks(a, la), _blocks(b, lb))]), None

    def backward(self, needed: tuple[bool, ...]) -> Any:
        da, db = self.op.backward
        wanted = [g for g, need in ((da, needed[0]), (db, needed[2])) if need]

        def bp(delta: Any, r: Any, lr: Any, a: Any, la: Any, b: Any, lb: Any) -> Any:
            if lr is not None:  # aligned: whole arrays
                return [g(delta, r, a, b) for g in wanted]
            per = list(zip(_blocks(delta, None), r, _blocks(a, la), _blocks(b, lb)))
            out = []
            if needed[0]:
                out.append(_join([da(d, o, x, y) for d, o, x, y in per], la))
            if needed[2]:
                out.append(_join([db(d, o, x, y) for d, o, x, y in per], lb))
            return tuple(out)

        return bp


class BlockMap:
    """``blockmap[op1,op2,...]``: a unary elementwise op per block, one call per run of equal ops.

    Made by the ``fuse_blocks`` pass when every block of a cut goes through a
    unary op: an LSTM's gates ``[tanh, sigmoid, sigmoid, sigmoid]`` become one
    ``tanh`` and one ``sigmoid`` over three blocks at once. It cuts as it goes:
    its results are the k blocks (views), then each run's whole result, which
    the backward pass hands to the op's output-form derivative.
    """

    nondifferentiable = (1,)
    exact_gradients = True

    def __init__(self, op_names: tuple[str, ...]) -> None:
        from .registry import get_op

        self.ops = tuple(get_op(n) for n in op_names)
        runs: list[tuple[Any, int, int]] = []  # (op, first block, one past the last block)
        for j, op in enumerate(self.ops):
            if runs and runs[-1][0] is op:
                runs[-1] = (op, runs[-1][1], j + 1)
            else:
                runs.append((op, j, j + 1))
        self.runs = runs
        label = ",".join(f"{op.name}*{b - a}" if b - a > 1 else op.name for op, a, b in runs)
        self.name = f"blockmap[{label}]"
        self.n_inputs, self.n_deltas = 2, len(op_names)
        self._last_layout: tuple[Any, tuple[list[int], list[int]]] | None = None
        # training kernels: σ' = out·(1 - out), tanh' = 1 - out², as the fused kernels (see training_backward)
        self._backward = [training_backward(op) for op in self.ops]
        self.backward_reads = ((False,) * len(op_names) + (any(r[0] for _, r in self._backward),) * len(runs),
                               (any(r[1] for _, r in self._backward), True))

    def _layout(self, layout: np.ndarray) -> tuple[list[int], list[int]]:
        """``layout`` as plain int lists (cached: one layout object serves a whole batch)."""
        last = self._last_layout
        if last is not None and last[0] is layout:
            return last[1]
        lists = layout.tolist()
        self._last_layout = (layout, lists)
        return lists

    def describe(self) -> str:
        runs = "; ".join(f"{op.name} on block{'s' if b - a > 1 else ''} {a}" + (f"-{b - 1}" if b - a > 1 else "")
                         for op, a, b in self.runs)
        return f"{runs} of the stacked input, one call per run; gradients from each op's own kernel"

    def forward(self, s: Any, layout: Any) -> tuple[Any, ...]:
        if layout is None:
            blocks = [op.forward(x) for op, x in zip(self.ops, s)]
            return (*blocks, *(Blocks(blocks[a:b]) for _, a, b in self.runs))
        offsets, vectors = self._layout(layout)
        blocks: list[Any] = []
        whole = []
        for op, a, b in self.runs:
            base = offsets[a]
            t = op.forward(s[..., base:offsets[b]])
            whole.append(t)
            for j in range(a, b):
                lo = offsets[j] - base
                blocks.append(t[..., lo] if vectors[j] else t[..., lo:offsets[j + 1] - base])
        return (*blocks, *whole)

    def backward(self, needed: tuple[bool, ...]) -> Any:
        k = self.n_deltas
        runs = [(training_backward(op)[0], a, b) for op, a, b in self.runs]

        def bp(*args: Any) -> tuple[Any, ...]:
            deltas, blocks, whole, s, layout = args[:k], args[k:2 * k], args[2 * k:-2], args[-2], args[-1]
            if any(isinstance(d, (int, float)) for d in deltas):  # a block no gradient reached
                deltas = [np.zeros_like(blk) if isinstance(d, (int, float)) else d for d, blk in zip(deltas, blocks)]
            if layout is None:
                return (Blocks([bw(d, o, x) for (bw, _), d, o, x in zip(self._backward, deltas, blocks, s)]),)
            offsets, vectors = self._layout(layout)
            parts = []
            for (derivative, a, b), t in zip(runs, whole):
                if b - a == 1 and not vectors[a]:
                    d = deltas[a]
                else:  # the run's block gradients side by side, as the run's result t lies
                    d = np.concatenate([np.expand_dims(x, -1) if vectors[j] else x
                                        for j, x in zip(range(a, b), deltas[a:b])], axis=-1)
                parts.append(derivative(d, t, s[..., offsets[a]:offsets[b]]))
            return (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1),)

        return bp


class CutFed:
    """A fused kernel reading whole products cut into column blocks: its cuts folded in.

    Made by the ``fold_cuts`` pass from a ``split{k}`` whose blocks all go to one fused
    step and nowhere else (an LSTM step's ``x·W`` and ``h·U``, each cut into four gate
    blocks): the fused step takes the product and its layout instead and cuts it itself,
    and hands back the product's gradient joined from the blocks' (a view where the
    compiled backward wrote them side by side). The same views and the same join as
    the cut's own kernels, so the same numbers; what goes is one forward step and one
    backward closure per cut (two per LSTM time step), the interpreter's cost of them.

    Inputs: the fused kernel's other inputs in their order, then ``(m, layout)`` per cut.
    """

    def __init__(self, inner: Any, sources: tuple[tuple[int, ...], ...]) -> None:
        # sources[i]: where inner input i comes from: (-1, j) plain input j, or (g, b) block b of cut g
        self.inner, self.sources = inner, sources
        self.n_plain = sum(1 for g, _ in sources if g < 0)
        self.n_cuts = 1 + max(g for g, _ in sources)
        self.n_inputs = self.n_plain + 2 * self.n_cuts
        self.n_deltas = inner.n_deltas
        self.nondifferentiable = tuple(self.n_plain + 2 * g + 1 for g in range(self.n_cuts))
        label = ";".join(",".join(str(i) for i, (g, _) in enumerate(sources) if g == c) for c in range(self.n_cuts))
        self.name = f"{inner.name}{{cuts:{label}}}"
        # inner input i is flat[order[i]], flat = plain inputs, then each cut's blocks in order
        starts, at = [], self.n_plain
        for c in range(self.n_cuts):
            starts.append(at)
            at += sum(1 for g, _ in sources if g == c)
        self.order = tuple(x if g < 0 else starts[g] + x for g, x in sources)
        order = self.order
        # flat -> inner inputs in one C call (itemgetter of one index returns the item, not a tuple)
        self._pick = itemgetter(*order) if len(order) > 1 else (lambda flat: (flat[order[0]],))
        self._cut_at = tuple(self.n_plain + 2 * c for c in range(self.n_cuts))
        self.blocks_of = tuple(tuple(i for _, i in sorted((b, i) for i, (g, b) in enumerate(sources) if g == c))
                               for c in range(self.n_cuts))
        reads = getattr(inner, "backward_reads", None)
        if reads is not None:
            plain = tuple(r for r, (g, _) in zip(reads[1], sources) if g < 0)
            cuts = tuple(x for blocks in self.blocks_of for x in (any(reads[1][i] for i in blocks), True))
            self.backward_reads = (reads[0], plain + cuts)
        self.forward = self._expanding(inner.forward)
        self.numpy_forward = self._expanding(getattr(inner, "numpy_forward", inner.forward))
        self._plans: dict[tuple[bool, ...], tuple[tuple[bool, ...], list[Any]]] = {}

    def __getattr__(self, name: str) -> Any:
        # what describes the fused kernel itself (results, display, runs_as, spec) is the inner kernel's
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(inner, name)

    def internally_used(self, names: Any) -> tuple[str, ...]:
        return self.inner.internally_used(names)

    def inner_inputs(self, inputs: Any) -> tuple[str, ...]:
        """What each of the fused kernel's own inputs (``in0``, ``in1``, ...) is, given this step's inputs."""
        n = self.n_plain
        return tuple(inputs[x] if g < 0 else f"{inputs[n + 2 * g]}, column block {x}" for g, x in self.sources)

    def describe(self) -> str:
        return f"{self.inner.name} reading {self.n_cuts} product(s) cut into blocks (cuts folded in)"

    def _expand(self, xs: Any) -> list[Any]:
        # what the cuts' own forward did (_blocks); runs twice per fused step and batch
        flat = list(xs[:self.n_plain])
        for p in self._cut_at:
            flat += _blocks(xs[p], xs[p + 1])
        return list(self._pick(flat))

    def _expanding(self, fn: Any) -> Any:
        expand = self._expand

        def forward(*xs: Any) -> Any:
            return fn(*expand(xs))

        return forward

    def _plan(self, needed: tuple[bool, ...]) -> tuple[tuple[bool, ...], list[Any]]:
        """The inner kernel's needed mask, and how to build each needed wrapper gradient from its gradients."""
        plan = self._plans.get(needed)
        if plan is None:
            n = self.n_plain
            plain_at = {j: i for i, (g, j) in enumerate(self.sources) if g < 0}
            inner_needed = [False] * len(self.sources)
            for j in range(n):
                if needed[j]:
                    inner_needed[plain_at[j]] = True
            for c, blocks in enumerate(self.blocks_of):
                if needed[n + 2 * c]:
                    for i in blocks:
                        inner_needed[i] = True
            rank = {i: r for r, i in enumerate(i for i, need in enumerate(inner_needed) if need)}
            build: list[Any] = []
            for j in range(n):
                if needed[j]:
                    build.append(rank[plain_at[j]])
            for c, blocks in enumerate(self.blocks_of):
                if needed[n + 2 * c]:
                    build.append((n + 2 * c + 1, tuple(rank[i] for i in blocks)))
            plan = self._plans[needed] = (tuple(inner_needed), build)
        return plan

    @staticmethod
    def _assemble(build: list[Any], grads: Any, inputs: Any) -> list[Any]:
        out = []
        for b in build:
            if b.__class__ is int:
                out.append(grads[b])
            else:  # a cut's blocks' gradients, joined back into the product's gradient as the cut's backward did
                out.append(_join([grads[r] for r in b[1]], inputs[b[0]], -1))
        return out

    def backward(self, needed: tuple[bool, ...]) -> Any:
        return self.inner.backward(self._plan(needed)[0])

    def gradients(self, needed: tuple[bool, ...], deltas: Any, results: Any, inputs: Any) -> list[Any]:
        inner_needed, build = self._plan(needed)
        return self._assemble(build, self.inner.gradients(inner_needed, deltas, results, self._expand(inputs)), inputs)

    def native_run_inputs(self) -> tuple[int, tuple[int, ...]]:
        """How a native run (symdiff.autograd) feeds the inner kernel: ``(plain inputs, order)``, inner input
        i being ``flat[order[i]]`` of the plain inputs then each cut's column blocks, as :meth:`_expand`."""
        return self.n_plain, self.order

    def native_run_backward(self, needed: tuple[bool, ...]) -> tuple[Any, tuple[Any, ...]]:
        """The inner kernel's compiled backward plan for ``needed``, and how this step's gradients are
        made of its gradients (an index, or ``(layout input, indices)`` of blocks to join), for a native run."""
        inner_needed, build = self._plan(needed)
        return self.inner.native_backward_plan(inner_needed), tuple(build)

    def native_backward(self, needed: tuple[bool, ...]) -> Any:
        inner_needed, build = self._plan(needed)
        nb, expand, assemble = self.inner.native_backward(inner_needed), self._expand, self._assemble

        def bw(deltas: list[Any], results: list[Any], inputs: list[Any]) -> list[Any] | None:
            grads = nb(deltas, results, expand(inputs))
            return None if grads is None else assemble(build, grads, inputs)

        return bw


def cut_fed_op(inner: Any, sources: tuple[tuple[int, ...], ...]) -> CutFed:
    """The ``fold_cuts`` pass's op for fused kernel ``inner`` (registered on first use)."""
    op = CutFed(inner, sources)
    known = MULTI_OPS.get(op.name)
    if known is not None and known.inner is inner:
        return known
    MULTI_OPS[op.name] = op
    return op


MULTI_KINDS = {"hconcat": (Stack, 1), "split": (Cut, 1), "vconcat": (Stack, 0), "rsplit": (Cut, 0)}


class SumProducts:
    """``sum_mul_tn{k}``: ``a_1ᵀb_1 + ... + a_kᵀb_k`` as one product of the stacked operands.

    Made by the ``sum_products`` pass from a gradient graph's weight gradients
    (an LSTM's ``Σ_t h_tᵀ δ_t``: one product per gate and time step, and in an
    HVP twice as many): ``[a_1; ...; a_k]ᵀ [b_1; ...; b_k]`` is the same sum,
    one BLAS call instead of k calls and k-1 additions. One-hot ``a`` of one
    depth stack as one-hot (one scatter-add). Operands that do not stack (the
    sum broadcast two differently shaped products) are multiplied one by one.
    """

    nondifferentiable: tuple[int, ...] = ()
    exact_gradients = True

    def __init__(self, k: int) -> None:
        self.name = f"sum_mul_tn{k}"
        self.k = k
        self.n_inputs, self.n_deltas = 2 * k, 1
        self.backward_reads = ((False,), (True,) * (2 * k))
        self.onehot_inputs = tuple(range(k))

    def forward(self, *args: Any) -> tuple[np.ndarray]:
        from .shape_ops import _mul_tn

        a, b = args[:self.k], [np.asarray(x) for x in args[self.k:]]
        onehot = all(isinstance(x, OneHot) for x in a) and len({x.depth for x in a}) == 1
        dense = a if onehot else [np.asarray(x) for x in a]
        if (all(np.ndim(x) == 2 for x in (*dense, *b)) and len({x.shape[1] for x in dense}) == 1
                and len({x.shape[1] for x in b}) == 1 and all(x.shape[0] == y.shape[0] for x, y in zip(dense, b))):
            stacked = OneHot.vstack(list(a)) if onehot else np.concatenate(dense, axis=0)
            return (_mul_tn(stacked, np.concatenate(b, axis=0)),)
        total = _mul_tn(a[0], b[0])
        for x, y in zip(a[1:], b[1:]):
            total = total + _mul_tn(x, y)
        return (total,)

    def backward(self, needed: tuple[bool, ...]) -> Any:
        from .shape_ops import _mul_tn_da, _mul_tn_db
        from .registry import sum_to_shape

        k = self.k

        def bp(delta: Any, out: Any, *args: Any) -> tuple[Any, ...]:
            grads = []
            for j, need in enumerate(needed):
                if not need:
                    continue
                a, b = args[j % k], args[k + j % k]
                d = sum_to_shape(delta, (np.shape(a)[1], np.shape(b)[1]), np.result_type(delta))
                grads.append(_mul_tn_da(d, out, a, b) if j < k else _mul_tn_db(d, out, a, b))
            return tuple(grads)

        return bp


def sum_products_op(k: int) -> SumProducts:
    """The ``sum_mul_tn{k}`` op of the ``sum_products`` pass, registered on first use."""
    op = SumProducts(k)
    return MULTI_OPS.setdefault(op.name, op)


def multi_op(kind: str, k: int) -> Any:
    """The ``hconcat{k}``/``split{k}``/``vconcat{k}``/``rsplit{k}`` op, registered on first use."""
    cls, axis = MULTI_KINDS[kind]
    op = cls(k, axis)
    return MULTI_OPS.setdefault(op.name, op)


def block_op(kind: str, arg: Any) -> Any:
    """The ``cat{k}`` (arg k), ``blockwise[op]`` (arg op name) or ``blockmap[...]`` (arg op names)
    op of the ``fuse_blocks`` pass, registered on first use."""
    op = {"cat": Concat, "blockwise": Blockwise, "blockmap": BlockMap}[kind](arg)
    known = MULTI_OPS.get(op.name)
    if known is not None and getattr(known, "ops", None) == getattr(op, "ops", None) \
            and getattr(known, "op", None) is getattr(op, "op", None):
        return known
    MULTI_OPS[op.name] = op  # new, or an op it uses was redefined with replace=True
    return op


# ---- numbers with registers, and ops with static arguments (f.sum(x, axis=1), x[1:], ...) -----------
from . import array_ops, scalar_ops  # noqa: E402,F401  (install FAMILIES["scalar"], f.sum, f.reshape, ...)


# ---- the structural ops gradient graphs are built from (symdiff.grad) ----------------------
from . import shape_ops  # noqa: E402,F401  (registers sum, rowsum, sum_like, ... with the built-ins)
