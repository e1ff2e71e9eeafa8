/* symdiff's native dispatcher: calls a generated elementwise kernel on numpy arrays.
 *
 * Compiled at run time by symdiff/native.py (never at install time). It exists because
 * reading twenty array pointers through ctypes costs ~20 us a call, more than the kernel
 * saves; here it is ~20 ns an array. Anything it cannot handle (dtype, layout, broadcast
 * other than along rows) makes it return None, and the caller runs the numpy kernel.
 *
 * A kernel is  void k(long R, long K, char **p, const long *rs):  for r < R, k < K it reads
 * operand j at p[j] + (r*rs[j] + k) elements and writes each output the same way. Operands
 * are 1-D (K,) or 2-D (rows, K) with a contiguous last axis; rows is R or 1 (rs = 0 then).
 *
 * It also runs whole stretches of a program's steps (run_forward, run_backward: products through
 * numpy's own BLAS gemm, which symdiff/blas.py hands over, and fused kernels), so that the
 * interpreter runs only between such stretches.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <numpy/ufuncobject.h>
#include <math.h>
#include <string.h>

typedef void (*kernel_t)(long R, long K, char **p, const long *rs);
#define MAXOPS 192

typedef struct {
    char *data;
    long rs;
    int nd;
    npy_intp rows, cols;
} operand;

/* Describe one array; 0 if usable. With shape_only, only its shape matters (a value the
 * kernel does not read, e.g. a zero-stride stand-in left by release mode). */
static int inspect(PyObject *o, int typenum, int shape_only, operand *op) {
    if (!PyArray_Check(o)) return -1;
    PyArrayObject *a = (PyArrayObject *)o;
    int nd = PyArray_NDIM(a);
    if (nd < 1 || nd > 2) return -1;
    npy_intp *sh = PyArray_DIMS(a), *st = PyArray_STRIDES(a);
    op->nd = nd;
    op->cols = sh[nd - 1];
    op->rows = nd == 2 ? sh[0] : 1;
    op->rs = 0;
    op->data = NULL;
    if (shape_only) return 0;
    if (PyArray_TYPE(a) != typenum) return -1;
    npy_intp isz = PyArray_ITEMSIZE(a);
    if (op->cols > 1 && st[nd - 1] != isz) return -1;
    if (nd == 2 && op->rows > 1) {
        if (st[0] % isz) return -1;
        op->rs = (long)(st[0] / isz);
    }
    op->data = PyArray_BYTES(a);
    return 0;
}

/* A view of base's memory at data (new reference, or NULL with an exception set). */
static PyObject *view_of(PyObject *base, PyArray_Descr *descr, int nd, npy_intp *dims, npy_intp *strides,
                         char *data, int writeable) {
    Py_INCREF(descr);  /* stolen by NewFromDescr */
    PyObject *a = PyArray_NewFromDescr(&PyArray_Type, descr, nd, dims, strides, data,
                                       writeable ? NPY_ARRAY_WRITEABLE : 0, NULL);
    if (!a) return NULL;
    Py_INCREF(base);  /* stolen by SetBaseObject */
    if (PyArray_SetBaseObject((PyArrayObject *)a, base) < 0) { Py_DECREF(a); return NULL; }
    return a;
}

typedef struct {
    int nd;
    npy_intp R, K;
} fullshape;

/* The broadcast shape of the operands, if only rows broadcast. */
static int full_shape(operand *ops, int n, fullshape *fs) {
    fs->nd = 0; fs->R = 1; fs->K = -1;
    for (int j = 0; j < n; j++) {
        if (!ops[j].nd) continue; /* absent (a missing delta) */
        if (fs->K < 0) fs->K = ops[j].cols;
        if (ops[j].cols != fs->K) return -1;
        if (ops[j].nd > fs->nd) fs->nd = ops[j].nd;
        if (ops[j].nd == 2 && ops[j].rows != 1) {
            if (fs->R != 1 && fs->R != ops[j].rows) return -1;
            fs->R = ops[j].rows;
        }
    }
    return fs->K < 0 ? -1 : 0;
}

static int is_full(const operand *op, const fullshape *fs) {
    return op->nd == fs->nd && op->rows == (fs->nd == 2 ? fs->R : 1);
}

static int typenum_of(PyObject *seq) {
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *o = PySequence_Fast_GET_ITEM(seq, j);
        if (PyArray_Check(o)) return PyArray_TYPE((PyArrayObject *)o);
    }
    return -1;
}

static kernel_t pick(PyObject *fns, int typenum) {
    /* fns = (float64 kernel address, float32 kernel address), 0 where absent */
    Py_ssize_t which = typenum == NPY_DOUBLE ? 0 : typenum == NPY_FLOAT ? 1 : -1;
    if (which < 0) return NULL;
    PyObject *f = PyTuple_GET_ITEM(fns, which);
    unsigned long long addr = PyLong_AsUnsignedLongLong(f);
    if (PyErr_Occurred()) { PyErr_Clear(); return NULL; }
    return (kernel_t)(uintptr_t)addr;
}

static PyObject *new_full(const fullshape *fs, int typenum) {
    npy_intp dims[2] = {fs->R, fs->K};
    if (fs->nd == 1) dims[0] = fs->K;
    return PyArray_EMPTY(fs->nd, dims, typenum, 0);
}

/* The forward kernel fn on operands already described: a new list of results, or None (new reference)
 * when they do not fit it. deps[i]: bitmask of the inputs result i depends on (each result must reach
 * the full shape). */
static PyObject *forward_ops(kernel_t fn, int typenum, operand *ops, Py_ssize_t n_in, PyObject *deps) {
    Py_ssize_t n_out = PyTuple_GET_SIZE(deps);
    if (n_in + n_out > MAXOPS || n_in > 64) Py_RETURN_NONE;
    fullshape fs;
    if (full_shape(ops, (int)n_in, &fs)) Py_RETURN_NONE;
    unsigned long long fullmask = 0;
    for (Py_ssize_t j = 0; j < n_in; j++)
        if (is_full(&ops[j], &fs)) fullmask |= 1ULL << j;
    for (Py_ssize_t i = 0; i < n_out; i++) {
        unsigned long long d = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(deps, i));
        if (PyErr_Occurred() || !(d & fullmask)) { PyErr_Clear(); Py_RETURN_NONE; }
    }
    char *p[MAXOPS];
    long rs[MAXOPS];
    for (Py_ssize_t j = 0; j < n_in; j++) { p[j] = ops[j].data; rs[j] = ops[j].rs; }
    PyObject *out = PyList_New(n_out);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < n_out; i++) {
        PyObject *a = new_full(&fs, typenum);
        if (!a) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(out, i, a);
        p[n_in + i] = PyArray_BYTES((PyArrayObject *)a);
        rs[n_in + i] = fs.nd == 2 ? (long)fs.K : 0;
    }
    fn((long)(fs.nd == 2 ? fs.R : 1), (long)fs.K, p, rs);
    return out;
}

/* forward(fns, inputs, deps) -> list of results, or None. */
static PyObject *forward(PyObject *self, PyObject *args) {
    PyObject *fns, *inputs, *deps;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyTuple_Type, &fns, &PyTuple_Type, &inputs, &PyTuple_Type, &deps))
        return NULL;
    Py_ssize_t n_in = PyTuple_GET_SIZE(inputs), n_out = PyTuple_GET_SIZE(deps);
    if (n_in + n_out > MAXOPS || n_in > 64) Py_RETURN_NONE;
    int typenum = typenum_of(inputs);
    kernel_t fn = pick(fns, typenum);
    if (!fn) Py_RETURN_NONE;
    operand ops[MAXOPS];
    for (Py_ssize_t j = 0; j < n_in; j++)
        if (inspect(PyTuple_GET_ITEM(inputs, j), typenum, 0, &ops[j])) Py_RETURN_NONE;
    return forward_ops(fn, typenum, ops, n_in, deps);
}

static PyObject *backward_ops(kernel_t fn, int typenum, operand *ops, Py_ssize_t nd_, Py_ssize_t nr,
                              Py_ssize_t ni, PyObject *grads, Py_ssize_t n_distinct);

/* backward(fns, deltas, results, inputs, used, grads, n_distinct) -> list of gradients, or None.
 * Operands of the kernel: deltas (None: no gradient arrived, read as zeros), results, inputs,
 * then n_distinct outputs. used: bytes, 1 where the kernel reads that operand. grads: for
 * each needed input, (input index, distinct output index); inputs sharing an expression
 * (d/dx of x+y equals d/dy) share one computed block. The distinct outputs are blocks of
 * one (R, n_distinct*K) buffer, side by side, so a cut's backward can join them for free;
 * an input that broadcast along rows gets its block summed over rows. */
static PyObject *backward(PyObject *self, PyObject *args) {
    PyObject *fns, *deltas, *results, *inputs, *grads;
    const char *used;
    Py_ssize_t n_used, n_distinct;
    if (!PyArg_ParseTuple(args, "O!O!O!O!y#O!n", &PyTuple_Type, &fns, &PyList_Type, &deltas, &PyList_Type,
                          &results, &PyList_Type, &inputs, &used, &n_used, &PyTuple_Type, &grads, &n_distinct))
        return NULL;
    Py_ssize_t nd_ = PyList_GET_SIZE(deltas), nr = PyList_GET_SIZE(results), ni = PyList_GET_SIZE(inputs);
    Py_ssize_t n_ops = nd_ + nr + ni;
    if (n_ops + n_distinct > MAXOPS || n_used != n_ops || n_distinct < 1) Py_RETURN_NONE;
    int typenum = typenum_of(results);
    kernel_t fn = pick(fns, typenum);
    if (!fn) Py_RETURN_NONE;
    operand ops[MAXOPS];
    PyObject *all[MAXOPS];
    for (Py_ssize_t j = 0; j < nd_; j++) all[j] = PyList_GET_ITEM(deltas, j);
    for (Py_ssize_t j = 0; j < nr; j++) all[nd_ + j] = PyList_GET_ITEM(results, j);
    for (Py_ssize_t j = 0; j < ni; j++) all[nd_ + nr + j] = PyList_GET_ITEM(inputs, j);
    for (Py_ssize_t j = 0; j < n_ops; j++) {
        if (j < nd_ && all[j] == Py_None) { ops[j].nd = 0; continue; }
        if (inspect(all[j], typenum, !used[j], &ops[j])) Py_RETURN_NONE;
    }
    return backward_ops(fn, typenum, ops, nd_, nr, ni, grads, n_distinct);
}

/* The backward kernel fn on operands already described (deltas with nd 0: none arrived): a new list of
 * the needed gradients, or None when they do not fit it (see backward below). */
static PyObject *backward_ops(kernel_t fn, int typenum, operand *ops, Py_ssize_t nd_, Py_ssize_t nr,
                              Py_ssize_t ni, PyObject *grads, Py_ssize_t n_distinct) {
    Py_ssize_t n_ops = nd_ + nr + ni;
    fullshape fs;
    if (full_shape(ops, (int)n_ops, &fs)) Py_RETURN_NONE;
    for (Py_ssize_t j = 0; j < nd_ + nr; j++)  /* deltas and results: the full shape, or absent */
        if (ops[j].nd && !is_full(&ops[j], &fs)) Py_RETURN_NONE;
    long R = (long)(fs.nd == 2 ? fs.R : 1), K = (long)fs.K;
    PyObject *zeros = NULL;
    char *p[MAXOPS];
    long rs[MAXOPS];
    for (Py_ssize_t j = 0; j < n_ops; j++) {
        if (!ops[j].nd) {
            if (!zeros) {
                npy_intp dims[1] = {K};
                zeros = PyArray_ZEROS(1, dims, typenum, 0);
                if (!zeros) return NULL;
            }
            p[j] = PyArray_BYTES((PyArrayObject *)zeros); rs[j] = 0;
        } else { p[j] = ops[j].data; rs[j] = ops[j].rs; }
    }
    npy_intp bdims[2] = {R, (npy_intp)n_distinct * K};
    PyArrayObject *buf = (PyArrayObject *)PyArray_EMPTY(2, bdims, typenum, 0);
    if (!buf) { Py_XDECREF(zeros); return NULL; }
    npy_intp isz = PyArray_ITEMSIZE(buf);
    for (Py_ssize_t m = 0; m < n_distinct; m++) {
        p[n_ops + m] = PyArray_BYTES(buf) + m * K * isz;
        rs[n_ops + m] = (long)(n_distinct * K);
    }
    fn(R, K, p, rs);
    Py_XDECREF(zeros);
    Py_ssize_t ng = PyTuple_GET_SIZE(grads);
    PyObject *out = PyList_New(ng);
    if (!out) { Py_DECREF(buf); return NULL; }
    for (Py_ssize_t g = 0; g < ng; g++) {
        PyObject *pair = PyTuple_GET_ITEM(grads, g);
        Py_ssize_t j = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 0));
        Py_ssize_t m = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 1));
        if (j < 0 || j >= ni || m < 0 || m >= n_distinct) {
            Py_DECREF(out); Py_DECREF(buf);
            PyErr_SetString(PyExc_ValueError, "native backward: bad gradient map");
            return NULL;
        }
        operand *in = &ops[nd_ + nr + j];
        char *block = PyArray_BYTES(buf) + m * K * isz;
        PyObject *a;
        if (is_full(in, &fs)) {  /* a view of block m */
            npy_intp dims[2] = {R, K}, strides[2] = {(npy_intp)n_distinct * K * isz, isz};
            if (fs.nd == 1) { dims[0] = K; strides[0] = isz; }
            a = view_of((PyObject *)buf, PyArray_DESCR(buf), fs.nd, dims, strides, block, 1);
        } else {  /* broadcast along rows: sum the block's rows into the input's shape */
            npy_intp dims[2] = {1, K};
            if (in->nd == 1) dims[0] = K;
            a = PyArray_ZEROS(in->nd, dims, typenum, 0);
            if (a) {
                char *dst = PyArray_BYTES((PyArrayObject *)a);
                if (typenum == NPY_DOUBLE) {
                    double *d = (double *)dst;
                    for (long r = 0; r < R; r++) {
                        const double *s = (const double *)block + r * (long)n_distinct * K;
                        for (long k = 0; k < K; k++) d[k] += s[k];
                    }
                } else {
                    float *d = (float *)dst;
                    for (long r = 0; r < R; r++) {
                        const float *s = (const float *)block + r * (long)n_distinct * K;
                        for (long k = 0; k < K; k++) d[k] += s[k];
                    }
                }
            }
        }
        if (!a) { Py_DECREF(out); Py_DECREF(buf); return NULL; }
        PyList_SET_ITEM(out, g, a);
    }
    Py_DECREF(buf);
    return out;
}

/* join_columns(parts) -> the array parts are side by side columns of, or None.
 * A compiled backward writes the gradients of a cut's blocks into one buffer; joining
 * them back (the cut's own backward) is then a view instead of a copy. */
static PyObject *join_columns(PyObject *self, PyObject *args) {
    PyObject *parts;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &parts)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(parts);
    if (n < 1 || !PyArray_CheckExact(PyList_GET_ITEM(parts, 0))) Py_RETURN_NONE;
    PyArrayObject *first = (PyArrayObject *)PyList_GET_ITEM(parts, 0);
    PyObject *base = PyArray_BASE(first);
    if (PyArray_NDIM(first) != 2 || !base || !PyArray_CheckExact(base)) Py_RETURN_NONE;
    npy_intp *st = PyArray_STRIDES(first), R = PyArray_DIM(first, 0), isz = PyArray_ITEMSIZE(first);
    if (st[1] != isz) Py_RETURN_NONE;
    char *expect = PyArray_BYTES(first);
    npy_intp width = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *o = PyList_GET_ITEM(parts, j);
        if (!PyArray_CheckExact(o)) Py_RETURN_NONE;
        PyArrayObject *a = (PyArrayObject *)o;
        if (PyArray_NDIM(a) != 2 || PyArray_BASE(a) != base || PyArray_DIM(a, 0) != R || PyArray_BYTES(a) != expect
            || PyArray_STRIDE(a, 0) != st[0] || PyArray_STRIDE(a, 1) != st[1]
            || !PyArray_EquivTypes(PyArray_DESCR(a), PyArray_DESCR(first)))
            Py_RETURN_NONE;
        expect += PyArray_DIM(a, 1) * isz;
        width += PyArray_DIM(a, 1);
    }
    npy_intp dims[2] = {R, width}, strides[2] = {st[0], st[1]};
    return view_of(base, PyArray_DESCR(first), 2, dims, strides, PyArray_BYTES(first),
                   PyArray_FLAGS(first) & NPY_ARRAY_WRITEABLE);
}

/* segment_sum(delta, rows, starts) -> (len(starts), K) array, or None.
 * out[s] = sum of delta[rows[j]] for starts[s] <= j < starts[s+1]: a one-hot product's weight
 * gradient (rows grouped by character), read straight from delta with no gathered copy.
 * delta may also be a list of (n, K) blocks standing for their row-wise concatenation (the
 * gradients of a stacked product's row blocks, see ops.RowBlocks): row r is row r % n of block
 * r / n, so the blocks need not be copied into one array first. */
#define SEGMENT_MAXBLOCKS 4096
/* The delta argument of segment_sum and onehot_scatter: one 2-d float array, or a list of up to
 * SEGMENT_MAXBLOCKS arrays of its dtype and shape standing for their row-wise concatenation, each
 * with unit column stride. 1 when it is such (the blocks' data and row strides in elements filled
 * in), 0 when not (the caller returns None and Python takes its numpy path). */
typedef struct {
    Py_ssize_t nb;
    npy_intp Nb, K;
    int typenum;
    char *base[SEGMENT_MAXBLOCKS];
    npy_intp brs[SEGMENT_MAXBLOCKS];
} DeltaBlocks;

static int read_delta_blocks(PyObject *dobj, DeltaBlocks *out) {
    PyArrayObject *single[1];
    PyArrayObject **blocks = single;
    Py_ssize_t nb = 1;
    if (PyList_Check(dobj)) {
        nb = PyList_GET_SIZE(dobj);
        if (nb < 1 || nb > SEGMENT_MAXBLOCKS) return 0;
        blocks = (PyArrayObject **)&PyList_GET_ITEM(dobj, 0);
    } else {
        single[0] = (PyArrayObject *)dobj;
    }
    for (Py_ssize_t b = 0; b < nb; b++)
        if (!PyArray_Check((PyObject *)blocks[b])) return 0;
    PyArrayObject *delta = blocks[0];
    int typenum = PyArray_TYPE(delta);
    if (PyArray_NDIM(delta) != 2 || (typenum != NPY_DOUBLE && typenum != NPY_FLOAT)) return 0;
    npy_intp Nb = PyArray_DIM(delta, 0), K = PyArray_DIM(delta, 1), isz = PyArray_ITEMSIZE(delta);
    for (Py_ssize_t b = 0; b < nb; b++) {
        PyArrayObject *d = blocks[b];
        if (PyArray_NDIM(d) != 2 || PyArray_TYPE(d) != typenum || PyArray_DIM(d, 0) != Nb
            || PyArray_DIM(d, 1) != K) return 0;
        if (K > 1 && PyArray_STRIDE(d, 1) != isz) return 0;
        if (PyArray_STRIDE(d, 0) % isz) return 0;
        out->base[b] = PyArray_BYTES(d);
        out->brs[b] = PyArray_STRIDE(d, 0) / isz;
    }
    out->nb = nb;
    out->Nb = Nb;
    out->K = K;
    out->typenum = typenum;
    return 1;
}

static PyObject *segment_sum(PyObject *self, PyObject *args) {
    PyObject *dobj;
    PyArrayObject *rows, *starts;
    if (!PyArg_ParseTuple(args, "OO!O!", &dobj, &PyArray_Type, &rows, &PyArray_Type, &starts))
        return NULL;
    DeltaBlocks bl;
    if (!read_delta_blocks(dobj, &bl)) Py_RETURN_NONE;
    Py_ssize_t nb = bl.nb;
    npy_intp Nb = bl.Nb, K = bl.K;
    int typenum = bl.typenum;
    char **base = bl.base;
    npy_intp *brs = bl.brs;
    npy_intp N = Nb * nb;
    if (PyArray_NDIM(rows) != 1 || PyArray_TYPE(rows) != NPY_INTP || !PyArray_IS_C_CONTIGUOUS(rows)
        || PyArray_NDIM(starts) != 1 || PyArray_TYPE(starts) != NPY_INTP || !PyArray_IS_C_CONTIGUOUS(starts))
        Py_RETURN_NONE;
    npy_intp n = PyArray_DIM(rows, 0), S = PyArray_DIM(starts, 0);
    const npy_intp *r = (const npy_intp *)PyArray_DATA(rows), *st = (const npy_intp *)PyArray_DATA(starts);
    for (npy_intp j = 0; j < n; j++)
        if (r[j] < 0 || r[j] >= N) Py_RETURN_NONE;
    for (npy_intp s = 0; s < S; s++)
        if (st[s] < 0 || st[s] > n || (s && st[s] < st[s - 1])) Py_RETURN_NONE;
    npy_intp dims[2] = {S, K};
    PyObject *out = PyArray_ZEROS(2, dims, typenum, 0);
    if (!out) return NULL;
    for (npy_intp s = 0; s < S; s++) {
        npy_intp lo = st[s], hi = s + 1 < S ? st[s + 1] : n;
        if (typenum == NPY_DOUBLE) {
            double *restrict o = (double *)PyArray_DATA((PyArrayObject *)out) + s * K;
            for (npy_intp j = lo; j < hi; j++) {
                npy_intp b = r[j] / Nb;
                const double *restrict d = (const double *)base[b] + (r[j] - b * Nb) * brs[b];
                for (npy_intp k = 0; k < K; k++) o[k] += d[k];
            }
        } else {
            float *restrict o = (float *)PyArray_DATA((PyArrayObject *)out) + s * K;
            for (npy_intp j = lo; j < hi; j++) {
                npy_intp b = r[j] / Nb;
                const float *restrict d = (const float *)base[b] + (r[j] - b * Nb) * brs[b];
                for (npy_intp k = 0; k < K; k++) o[k] += d[k];
            }
        }
    }
    return out;
}

/* The (n, k) integer matrix of a one-hot value's columns (int32 or int64, C order), or -1. */
static int onehot_indices(PyArrayObject *idx, npy_intp depth, npy_intp *n, npy_intp *k, int *wide) {
    int t = PyArray_TYPE(idx);
    if (PyArray_NDIM(idx) != 2 || !PyArray_IS_C_CONTIGUOUS(idx)) return -1;
    if (t == NPY_INT32 || (t == NPY_INT && sizeof(int) == 4)) *wide = 0;
    else if (t == NPY_INT64 || (t == NPY_LONG && sizeof(long) == 8) || (t == NPY_LONGLONG && sizeof(long long) == 8)) *wide = 1;
    else return -1;
    *n = PyArray_DIM(idx, 0);
    *k = PyArray_DIM(idx, 1);
    npy_intp total = *n * *k;
    if (*wide) {
        const int64_t *c = (const int64_t *)PyArray_DATA(idx);
        for (npy_intp j = 0; j < total; j++) if (c[j] < -1 || c[j] >= depth) return -1;
    } else {
        const int32_t *c = (const int32_t *)PyArray_DATA(idx);
        for (npy_intp j = 0; j < total; j++) if (c[j] < -1 || c[j] >= depth) return -1;
    }
    return 0;
}

#define ONEHOT_COLUMN(idx, wide, j) \
    ((wide) ? (npy_intp)((const int64_t *)PyArray_DATA(idx))[j] : (npy_intp)((const int32_t *)PyArray_DATA(idx))[j])

/* onehot_gather(indices, w) -> (n, H) array, or None.
 * Row r of the result is the sum of the rows of w that row r of the one-hot matrix selects
 * (-1: none), added in slot order: the one-hot product X @ w without the (n, k, H) gathered copy. */
static PyObject *onehot_gather(PyObject *self, PyObject *args) {
    PyArrayObject *idx, *w;
    if (!PyArg_ParseTuple(args, "O!O!", &PyArray_Type, &idx, &PyArray_Type, &w)) return NULL;
    int typenum = PyArray_TYPE(w), wide;
    if (PyArray_NDIM(w) != 2 || (typenum != NPY_DOUBLE && typenum != NPY_FLOAT)) Py_RETURN_NONE;
    npy_intp D = PyArray_DIM(w, 0), H = PyArray_DIM(w, 1), isz = PyArray_ITEMSIZE(w), n, k;
    if ((H > 1 && PyArray_STRIDE(w, 1) != isz) || PyArray_STRIDE(w, 0) % isz) Py_RETURN_NONE;
    if (onehot_indices(idx, D, &n, &k, &wide)) Py_RETURN_NONE;
    npy_intp ws = PyArray_STRIDE(w, 0) / isz;
    npy_intp dims[2] = {n, H};
    /* not zeroed first: a row's first selected row of w is written as 0 + w[c] (the same bits as
     * adding it to zeros, -0.0 included), later ones added; a row selecting nothing is zeroed */
    PyObject *out = PyArray_EMPTY(2, dims, typenum, 0);
    if (!out) return NULL;
    for (npy_intp r = 0; r < n; r++) {
        int first = 1;
        for (npy_intp s = 0; s < k; s++) {
            npy_intp c = ONEHOT_COLUMN(idx, wide, r * k + s);
            if (c < 0) continue;
            if (typenum == NPY_DOUBLE) {
                double *restrict o = (double *)PyArray_DATA((PyArrayObject *)out) + r * H;
                const double *restrict a = (const double *)PyArray_DATA(w) + c * ws;
                if (first) for (npy_intp h = 0; h < H; h++) o[h] = 0.0 + a[h];
                else for (npy_intp h = 0; h < H; h++) o[h] += a[h];
            } else {
                float *restrict o = (float *)PyArray_DATA((PyArrayObject *)out) + r * H;
                const float *restrict a = (const float *)PyArray_DATA(w) + c * ws;
                if (first) for (npy_intp h = 0; h < H; h++) o[h] = 0.0f + a[h];
                else for (npy_intp h = 0; h < H; h++) o[h] += a[h];
            }
            first = 0;
        }
        if (first) memset(PyArray_BYTES((PyArrayObject *)out) + r * H * isz, 0, (size_t)(H * isz));
    }
    return out;
}

/* onehot_scatter(indices, depth, delta) -> (columns, values), or None.
 * The weight gradient X.T @ delta of a one-hot X, kept to the columns some row selects:
 * columns ascending (intp), values[i] the sum of the delta rows that select columns[i], added
 * in row order (as segment_sum adds a stable sort's groups), with no sort. delta may be a list
 * of equal (n, K) blocks standing for their row-wise concatenation, as for segment_sum. */
static PyObject *onehot_scatter(PyObject *self, PyObject *args) {
    PyArrayObject *idx;
    Py_ssize_t depth;
    PyObject *dobj;
    if (!PyArg_ParseTuple(args, "O!nO", &PyArray_Type, &idx, &depth, &dobj)) return NULL;
    DeltaBlocks bl;
    if (depth < 1 || !read_delta_blocks(dobj, &bl)) Py_RETURN_NONE;
    Py_ssize_t nb = bl.nb;
    npy_intp Nb = bl.Nb, K = bl.K, n, k;
    int typenum = bl.typenum, wide;
    char **base = bl.base;
    npy_intp *brs = bl.brs;
    if (onehot_indices(idx, depth, &n, &k, &wide) || n != Nb * nb) Py_RETURN_NONE;
    npy_intp *pos = (npy_intp *)PyMem_Malloc((size_t)depth * sizeof(npy_intp));
    if (!pos) return PyErr_NoMemory();
    for (npy_intp c = 0; c < depth; c++) pos[c] = -1;
    for (npy_intp j = 0; j < n * k; j++) {
        npy_intp c = ONEHOT_COLUMN(idx, wide, j);
        if (c >= 0) pos[c] = 0;
    }
    npy_intp S = 0;
    for (npy_intp c = 0; c < depth; c++) if (pos[c] == 0) pos[c] = 1, S++;
    npy_intp cdims[1] = {S}, vdims[2] = {S, K};
    PyObject *columns = PyArray_EMPTY(1, cdims, NPY_INTP, 0);
    PyObject *values = columns ? PyArray_ZEROS(2, vdims, typenum, 0) : NULL;
    if (!values) { Py_XDECREF(columns); PyMem_Free(pos); return NULL; }
    npy_intp *cols = (npy_intp *)PyArray_DATA((PyArrayObject *)columns), s = 0;
    for (npy_intp c = 0; c < depth; c++) if (pos[c] == 1) { cols[s] = c; pos[c] = s++; }
    for (npy_intp r = 0; r < n; r++) {
        npy_intp b = r / Nb;
        for (npy_intp j = 0; j < k; j++) {
            npy_intp c = ONEHOT_COLUMN(idx, wide, r * k + j);
            if (c < 0) continue;
            if (typenum == NPY_DOUBLE) {
                double *restrict o = (double *)PyArray_DATA((PyArrayObject *)values) + pos[c] * K;
                const double *restrict d = (const double *)base[b] + (r - b * Nb) * brs[b];
                for (npy_intp q = 0; q < K; q++) o[q] += d[q];
            } else {
                float *restrict o = (float *)PyArray_DATA((PyArrayObject *)values) + pos[c] * K;
                const float *restrict d = (const float *)base[b] + (r - b * Nb) * brs[b];
                for (npy_intp q = 0; q < K; q++) o[q] += d[q];
            }
        }
    }
    PyMem_Free(pos);
    return Py_BuildValue("(NN)", columns, values);
}

/* rows_sub_scaled(p, rows, values, lr) -> True, or None.
 * p[rows[i]] -= lr * values[i] for distinct rows: plain SGD on a row-sparse gradient. Written as
 * numpy's p[rows] -= lr * values computes it (lr in p's dtype, the product rounded before the
 * subtraction: the dispatcher is built with -ffp-contract=off), so both give the same bits. */
static PyObject *rows_sub_scaled(PyObject *self, PyObject *args) {
    PyArrayObject *p, *rows, *values;
    double lr;
    if (!PyArg_ParseTuple(args, "O!O!O!d", &PyArray_Type, &p, &PyArray_Type, &rows, &PyArray_Type, &values, &lr))
        return NULL;
    int typenum = PyArray_TYPE(p);
    if (PyArray_NDIM(p) != 2 || (typenum != NPY_DOUBLE && typenum != NPY_FLOAT) || !PyArray_ISWRITEABLE(p)
        || PyArray_NDIM(values) != 2 || PyArray_TYPE(values) != typenum
        || PyArray_NDIM(rows) != 1 || PyArray_TYPE(rows) != NPY_INTP || !PyArray_IS_C_CONTIGUOUS(rows))
        Py_RETURN_NONE;
    npy_intp D = PyArray_DIM(p, 0), K = PyArray_DIM(p, 1), S = PyArray_DIM(rows, 0), isz = PyArray_ITEMSIZE(p);
    if (PyArray_DIM(values, 0) != S || PyArray_DIM(values, 1) != K) Py_RETURN_NONE;
    if (K > 1 && (PyArray_STRIDE(p, 1) != isz || PyArray_STRIDE(values, 1) != isz)) Py_RETURN_NONE;
    if (PyArray_STRIDE(p, 0) % isz || PyArray_STRIDE(values, 0) % isz) Py_RETURN_NONE;
    const npy_intp *r = (const npy_intp *)PyArray_DATA(rows);
    for (npy_intp i = 0; i < S; i++) if (r[i] < 0 || r[i] >= D) Py_RETURN_NONE;
    npy_intp ps = PyArray_STRIDE(p, 0) / isz, vs = PyArray_STRIDE(values, 0) / isz;
    for (npy_intp i = 0; i < S; i++) {
        if (typenum == NPY_DOUBLE) {
            double *restrict o = (double *)PyArray_DATA(p) + r[i] * ps;
            const double *restrict v = (const double *)PyArray_DATA(values) + i * vs;
            for (npy_intp q = 0; q < K; q++) { double t = lr * v[q]; o[q] -= t; }
        } else {
            const float a = (float)lr;
            float *restrict o = (float *)PyArray_DATA(p) + r[i] * ps;
            const float *restrict v = (const float *)PyArray_DATA(values) + i * vs;
            for (npy_intp q = 0; q < K; q++) { float t = a * v[q]; o[q] -= t; }
        }
    }
    Py_RETURN_TRUE;
}

/* ---- runs of steps in one call (symdiff.autograd's NativeRun) --------------------------------------
 * A run is consecutive steps of a program that all run here: matrix products (BLAS gemm, called exactly
 * as numpy's matmul calls it for 2-D operands, so the bits are numpy's) and fused kernels (forward/
 * backward above). Values live in the program's slot list; a step that does not fit (a one-hot operand,
 * a kernel not built yet, a layout numpy would treat otherwise) ends the call, which returns how many
 * steps it did: Python runs the rest of the run as it always does. */
typedef void (*gemm_f32_t)(int, int, int, long long, long long, long long, float, const float *, long long,
                           const float *, long long, float, float *, long long);
typedef void (*gemm_f64_t)(int, int, int, long long, long long, long long, double, const double *, long long,
                           const double *, long long, double, double *, long long);
typedef void (*gemm_f32_lp_t)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                              float *, int);
typedef void (*gemm_f64_lp_t)(int, int, int, int, int, int, double, const double *, int, const double *, int,
                              double, double *, int);
static void *blas_s = NULL, *blas_d = NULL;
static int blas_ilp64 = 1;
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

/* set_blas(sgemm address, dgemm address, ilp64): the cblas_?gemm numpy's matmul calls (symdiff.blas). */
static PyObject *set_blas(PyObject *self, PyObject *args) {
    unsigned long long s, d;
    int ilp64;
    if (!PyArg_ParseTuple(args, "KKp", &s, &d, &ilp64)) return NULL;
    blas_s = (void *)(uintptr_t)s; blas_d = (void *)(uintptr_t)d; blas_ilp64 = ilp64;
    Py_RETURN_NONE;
}

/* The sizes of a C-ordered right operand b for which delta @ b.T multiplies by a contiguous copy of b.T,
 * as symdiff.ops._mul_da does: symdiff.ops.TRANSPOSED_COPY_SIZES, handed over by the Program that runs
 * (set_transposed_copy), so that both paths make the same gemm call. Until then: never (an empty range). */
static npy_intp tcopy_lo = 1, tcopy_hi = 0;

static PyObject *set_transposed_copy(PyObject *self, PyObject *args) {
    Py_ssize_t lo, hi;
    if (!PyArg_ParseTuple(args, "nn", &lo, &hi)) return NULL;
    tcopy_lo = lo; tcopy_hi = hi;
    Py_RETURN_NONE;
}

/* numpy's is_blasable2d (umath/matmul.c.src) */
static int blasable2d(npy_intp s1, npy_intp s2, npy_intp d1, npy_intp d2, npy_intp isz) {
    if (s2 != isz) return 0;
    return s1 % isz == 0 && s1 / isz >= d2 && s1 / isz <= (npy_intp)0x7ffffffffffffffeLL;
}

/* A (m, n) @ (n, p) product as numpy's matmul computes it for 2-D float operands, into a new C-ordered
 * array: new reference; NULL without an exception set when numpy would not call gemm here (a 1 among
 * m, n, p, an operand BLAS cannot read, A·Aᵀ which numpy gives to syrk, no BLAS known); NULL with one set
 * on failure. Operands: data and byte strides (is1_m, is1_n), (is2_n, is2_p). */
static PyObject *gemm_new(int typenum, char *ip1, npy_intp is1_m, npy_intp is1_n, char *ip2, npy_intp is2_n,
                          npy_intp is2_p, npy_intp m, npy_intp n, npy_intp p) {
    void *fn = typenum == NPY_FLOAT ? blas_s : typenum == NPY_DOUBLE ? blas_d : NULL;
    if (!fn || m <= 1 || n <= 1 || p <= 1) return NULL;
    if (!blas_ilp64 && (m > 0x7ffffffe || n > 0x7ffffffe || p > 0x7ffffffe)) return NULL;
    npy_intp sz = typenum == NPY_FLOAT ? 4 : 8;
    int t1, t2;
    npy_intp lda, ldb;
    if (blasable2d(is1_m, is1_n, m, n, sz)) { t1 = NO_TRANS; lda = is1_m / sz; }
    else if (blasable2d(is1_n, is1_m, n, m, sz)) { t1 = TRANS; lda = is1_n / sz; }
    else return NULL;
    if (blasable2d(is2_n, is2_p, n, p, sz)) { t2 = NO_TRANS; ldb = is2_n / sz; }
    else if (blasable2d(is2_p, is2_n, p, n, sz)) { t2 = TRANS; ldb = is2_p / sz; }
    else return NULL;
    if (ip1 == ip2 && m == p && is1_m == is2_p && is1_n == is2_n && t1 != t2) return NULL; /* syrk */
    if (!blas_ilp64 && (lda > 0x7ffffffe || ldb > 0x7ffffffe)) return NULL;
    npy_intp dims[2] = {m, p};
    PyObject *out = PyArray_EMPTY(2, dims, typenum, 0);
    if (!out) return NULL;
    char *op = PyArray_BYTES((PyArrayObject *)out);
    if (typenum == NPY_FLOAT) {
        if (blas_ilp64) ((gemm_f32_t)fn)(ROW_MAJOR, t1, t2, m, p, n, 1.0f, (float *)ip1, lda, (float *)ip2, ldb, 0.0f, (float *)op, p);
        else ((gemm_f32_lp_t)fn)(ROW_MAJOR, t1, t2, (int)m, (int)p, (int)n, 1.0f, (float *)ip1, (int)lda, (float *)ip2, (int)ldb, 0.0f, (float *)op, (int)p);
    } else {
        if (blas_ilp64) ((gemm_f64_t)fn)(ROW_MAJOR, t1, t2, m, p, n, 1.0, (double *)ip1, lda, (double *)ip2, ldb, 0.0, (double *)op, p);
        else ((gemm_f64_lp_t)fn)(ROW_MAJOR, t1, t2, (int)m, (int)p, (int)n, 1.0, (double *)ip1, (int)lda, (double *)ip2, (int)ldb, 0.0, (double *)op, (int)p);
    }
    return out;
}

/* A plain 2-D float32/float64 array in native byte order, aligned: what gemm may read. */
static int gemm_operand(PyObject *o, int typenum) {
    if (!PyArray_CheckExact(o)) return 0;
    PyArrayObject *a = (PyArrayObject *)o;
    return PyArray_NDIM(a) == 2 && PyArray_TYPE(a) == typenum && PyArray_ISALIGNED(a) && PyArray_ISNOTSWAPPED(a);
}

/* a @ b (tr_a: a.T @ b, tr_b: a @ b.T) as numpy computes it, or NULL (see gemm_new). */
static PyObject *product(PyObject *ao, PyObject *bo, int tr_a, int tr_b) {
    if (!PyArray_CheckExact(ao)) return NULL;
    int typenum = PyArray_TYPE((PyArrayObject *)ao);
    if (!gemm_operand(ao, typenum) || !gemm_operand(bo, typenum)) return NULL;
    PyArrayObject *a = (PyArrayObject *)ao, *b = (PyArrayObject *)bo;
    npy_intp m = PyArray_DIM(a, tr_a), n = PyArray_DIM(a, !tr_a), is1_m = PyArray_STRIDE(a, tr_a),
             is1_n = PyArray_STRIDE(a, !tr_a);
    npy_intp n2 = PyArray_DIM(b, tr_b), p = PyArray_DIM(b, !tr_b), is2_n = PyArray_STRIDE(b, tr_b),
             is2_p = PyArray_STRIDE(b, !tr_b);
    if (n != n2) return NULL;
    return gemm_new(typenum, PyArray_BYTES(a), is1_m, is1_n, PyArray_BYTES(b), is2_n, is2_p, m, n, p);
}

/* gemm(a, b) -> a @ b, or None where numpy would not call gemm (for tests and symdiff.blas's check). */
static PyObject *gemm(PyObject *self, PyObject *args) {
    PyObject *a, *b;
    if (!PyArg_ParseTuple(args, "OO", &a, &b)) return NULL;
    PyObject *out = product(a, b, 0, 0);
    if (out || PyErr_Occurred()) return out;
    Py_RETURN_NONE;
}

/* v[slot] = value (stealing value) */
static void put(PyObject *v, Py_ssize_t slot, PyObject *value) {
    PyList_SetItem(v, slot, value);
}

/* The compiled kernels of a symdiff.fusion._Native, or NULL (not built yet: Python builds it). */
static PyObject *kernels_of(PyObject *nat) {
    PyObject *fns = PyObject_GetAttrString(nat, "fns");
    if (!fns) return NULL;
    if (fns == Py_None || !PyTuple_Check(fns)) { Py_DECREF(fns); return NULL; }
    return fns;
}

#define SLOT(t, j) PyLong_AsSsize_t(PyTuple_GET_ITEM(t, j))

/* A column block [off, off + w) of a 2-D matrix m as a kernel operand: what m[..., off:off + w] would give
 * inspect (symdiff.ops.CutFed cuts a product so). 0 if usable. */
static int block_operand(PyObject *mo, npy_intp off, npy_intp w, int typenum, int shape_only, operand *op) {
    if (!PyArray_Check(mo) || PyArray_NDIM((PyArrayObject *)mo) != 2) return -1;
    PyArrayObject *m = (PyArrayObject *)mo;
    npy_intp R = PyArray_DIM(m, 0), isz = PyArray_ITEMSIZE(m);
    op->nd = 2; op->rows = R; op->cols = w; op->rs = 0; op->data = NULL;
    if (shape_only) return 0;
    if (PyArray_TYPE(m) != typenum) return -1;
    npy_intp *st = PyArray_STRIDES(m);
    if (w > 1 && st[1] != isz) return -1;
    if (R > 1) {
        if (st[0] % isz) return -1;
        op->rs = (long)(st[0] / isz);
    }
    op->data = PyArray_BYTES(m) + off * st[1];
    return 0;
}

#define MAXFLAT 256
/* The operands of a fused kernel's inputs in a run: the step's input slots ins, read from v, or with
 * cuts = (n_plain, order) those of a CutFed step (plain inputs, then (product, layout) per cut, each
 * product cut into its layout's column blocks; inner input i is flat[order[i]]). used: per operand
 * whether the kernel reads it (NULL: all). typenum: the first array's type if *typenum < 0 (as
 * typenum_of does for the inputs the kernel gets). Returns the number of operands, or -1 if they
 * do not fit (a vector block, a layout not as expected, an operand inspect refuses). */
static Py_ssize_t kernel_inputs(PyObject *v, PyObject *ins, PyObject *cuts, const char *used, int *typenum,
                                operand *ops) {
    PyObject *obj[MAXFLAT];
    npy_intp off[MAXFLAT], width[MAXFLAT];
    Py_ssize_t n_ins = PyTuple_GET_SIZE(ins), n_flat = 0, n_inner;
    PyObject *order = NULL;
    if (cuts == Py_None) {
        if (n_ins > MAXFLAT) return -1;
        for (Py_ssize_t j = 0; j < n_ins; j++) { obj[j] = PyList_GET_ITEM(v, SLOT(ins, j)); off[j] = -1; }
        n_flat = n_inner = n_ins;
    } else {
        Py_ssize_t n_plain = PyLong_AsSsize_t(PyTuple_GET_ITEM(cuts, 0));
        order = PyTuple_GET_ITEM(cuts, 1);
        n_inner = PyTuple_GET_SIZE(order);
        if (n_plain > MAXFLAT) return -1;
        for (Py_ssize_t j = 0; j < n_plain; j++) { obj[j] = PyList_GET_ITEM(v, SLOT(ins, j)); off[j] = -1; }
        n_flat = n_plain;
        for (Py_ssize_t c = n_plain; c + 1 < n_ins; c += 2) {
            PyObject *m = PyList_GET_ITEM(v, SLOT(ins, c)), *lo = PyList_GET_ITEM(v, SLOT(ins, c + 1));
            if (!PyArray_Check(m) || PyArray_NDIM((PyArrayObject *)m) != 2 || !PyArray_Check(lo)) return -1;
            PyArrayObject *layout = (PyArrayObject *)lo;
            if (PyArray_NDIM(layout) != 2 || PyArray_DIM(layout, 0) != 2 || PyArray_TYPE(layout) != NPY_INTP)
                return -1;
            npy_intp nb = PyArray_DIM(layout, 1) - 1, cols = PyArray_DIM((PyArrayObject *)m, 1);
            if (nb < 1 || n_flat + nb > MAXFLAT) return -1;
            for (npy_intp b = 0; b < nb; b++) {
                npy_intp a = *(npy_intp *)PyArray_GETPTR2(layout, 0, b), e = *(npy_intp *)PyArray_GETPTR2(layout, 0, b + 1);
                if (*(npy_intp *)PyArray_GETPTR2(layout, 1, b) || a < 0 || e < a || e > cols) return -1;
                obj[n_flat] = m; off[n_flat] = a; width[n_flat++] = e - a;
            }
        }
    }
    if (n_inner > MAXOPS / 2) return -1;
    Py_ssize_t pick_of[MAXOPS];
    for (Py_ssize_t i = 0; i < n_inner; i++) {
        Py_ssize_t f = order ? PyLong_AsSsize_t(PyTuple_GET_ITEM(order, i)) : i;
        if (f < 0 || f >= n_flat) return -1;
        pick_of[i] = f;
        if (*typenum < 0 && PyArray_Check(obj[f])) *typenum = PyArray_TYPE((PyArrayObject *)obj[f]);
    }
    for (Py_ssize_t i = 0; i < n_inner; i++) {
        Py_ssize_t f = pick_of[i];
        int shape_only = used ? !used[i] : 0;
        if (off[f] < 0 ? inspect(obj[f], *typenum, shape_only, &ops[i])
                       : block_operand(obj[f], off[f], width[f], *typenum, shape_only, &ops[i]))
            return -1;
    }
    return n_inner;
}

/* join_columns on a list, or their concatenation along the last axis when they are not side by side
 * (symdiff.ops._join for blocks without vectors). New reference, or NULL with an exception. */
static PyObject *join_columns(PyObject *self, PyObject *args);
static PyObject *joined(PyObject *parts) {
    PyObject *args = PyTuple_Pack(1, parts);
    if (!args) return NULL;
    PyObject *r = join_columns(NULL, args);
    Py_DECREF(args);
    if (r != Py_None) return r;
    Py_DECREF(r);
    return PyArray_Concatenate(parts, -1);
}

/* run_forward(steps, v, stand_in) -> number of steps done (v updated), or NULL on error.
 * steps[k] = (0, out, a, b, released) for out = a @ b, or (1, outs, ins, native, deps, released, cuts) for
 * a fused kernel's forward (native: its symdiff.fusion._Native; cuts: see kernel_inputs); released: slots
 * to replace with stand_in(value) after the step. */
static PyObject *run_forward(PyObject *self, PyObject *args) {
    PyObject *steps, *v, *stand_in;
    if (!PyArg_ParseTuple(args, "O!O!O", &PyTuple_Type, &steps, &PyList_Type, &v, &stand_in)) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(steps), k;
    for (k = 0; k < n; k++) {
        PyObject *st = PyTuple_GET_ITEM(steps, k);
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(st, 0));
        PyObject *released;
        if (kind == 0) {
            PyObject *out = product(PyList_GET_ITEM(v, SLOT(st, 2)), PyList_GET_ITEM(v, SLOT(st, 3)), 0, 0);
            if (!out) { if (PyErr_Occurred()) return NULL; break; }
            put(v, SLOT(st, 1), out);
            released = PyTuple_GET_ITEM(st, 4);
        } else {
            PyObject *fns = kernels_of(PyTuple_GET_ITEM(st, 3));
            if (!fns) { if (PyErr_Occurred()) return NULL; break; }
            operand ops[MAXOPS];
            int typenum = -1;
            Py_ssize_t n_in = kernel_inputs(v, PyTuple_GET_ITEM(st, 2), PyTuple_GET_ITEM(st, 6), NULL, &typenum, ops);
            kernel_t fn = n_in < 0 ? NULL : pick(fns, typenum);
            Py_DECREF(fns);
            if (!fn) break;
            PyObject *res = forward_ops(fn, typenum, ops, n_in, PyTuple_GET_ITEM(st, 4));
            if (!res) return NULL;
            if (res == Py_None) { Py_DECREF(res); break; }
            PyObject *outs = PyTuple_GET_ITEM(st, 1);
            Py_ssize_t no = PyTuple_GET_SIZE(outs);
            if (PyList_GET_SIZE(res) < no) no = PyList_GET_SIZE(res);
            for (Py_ssize_t j = 0; j < no; j++) {
                PyObject *x = PyList_GET_ITEM(res, j);
                Py_INCREF(x);
                put(v, SLOT(outs, j), x);
            }
            Py_DECREF(res);
            released = PyTuple_GET_ITEM(st, 5);
        }
        if (released != Py_None) {
            for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(released); j++) {
                Py_ssize_t s = SLOT(released, j);
                PyObject *x = PyObject_CallOneArg(stand_in, PyList_GET_ITEM(v, s));
                if (!x) return NULL;
                put(v, s, x);
            }
        }
    }
    return PyLong_FromSsize_t(k);
}

/* a + d elementwise for two C-ordered float arrays of one shape and dtype (into a when inplace), as
 * numpy adds them (one IEEE addition an element); NULL without an exception when they are not such,
 * or overlap other than exactly, or are 0-d (numpy's a + d is then a scalar). New reference. */
static PyObject *add_plain(PyObject *ao, PyObject *dobj, int inplace) {
    if (!PyArray_CheckExact(ao) || !PyArray_CheckExact(dobj)) return NULL;
    PyArrayObject *a = (PyArrayObject *)ao, *d = (PyArrayObject *)dobj;
    int t = PyArray_TYPE(a);
    if ((t != NPY_FLOAT && t != NPY_DOUBLE) || PyArray_TYPE(d) != t || PyArray_NDIM(a) == 0 || !PyArray_SAMESHAPE(a, d)
        || !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_IS_C_CONTIGUOUS(d) || !PyArray_ISALIGNED(a)
        || !PyArray_ISALIGNED(d) || !PyArray_ISNOTSWAPPED(a) || !PyArray_ISNOTSWAPPED(d))
        return NULL;
    npy_intp n = PyArray_SIZE(a), bytes = n * PyArray_ITEMSIZE(a);
    char *pa = PyArray_BYTES(a), *pd = PyArray_BYTES(d);
    if (pa != pd && pa < pd + bytes && pd < pa + bytes) return NULL;
    PyObject *out;
    if (inplace) {
        if (!PyArray_ISWRITEABLE(a)) return NULL;
        Py_INCREF(ao);
        out = ao;
    } else {
        out = PyArray_EMPTY(PyArray_NDIM(a), PyArray_DIMS(a), t, 0);
        if (!out) return NULL;
    }
    char *po = PyArray_BYTES((PyArrayObject *)out);
    if (t == NPY_FLOAT) {
        const float *x = (const float *)pa, *y = (const float *)pd;
        float *o = (float *)po;
        for (npy_intp i = 0; i < n; i++) o[i] = x[i] + y[i];
    } else {
        const double *x = (const double *)pa, *y = (const double *)pd;
        double *o = (double *)po;
        for (npy_intp i = 0; i < n; i++) o[i] = x[i] + y[i];
    }
    return out;
}

/* g[t] combined with d (a new reference, stolen): how=0 assign, 1 g[t] + d (a new array), 2 added into
 * g[t] in place when both are arrays of one shape and dtype (symdiff.autograd._sum_into), else g[t] + d. */
static int accumulate(PyObject *g, Py_ssize_t t, long how, PyObject *d) {
    if (how == 0) { put(g, t, d); return 0; }
    PyObject *a = PyList_GET_ITEM(g, t), *r = add_plain(a, d, how == 2);
    if (r || PyErr_Occurred()) {
        /* added here, or failed */
    } else if (how == 2 && PyArray_CheckExact(a) && PyArray_CheckExact(d)
        && PyArray_SAMESHAPE((PyArrayObject *)a, (PyArrayObject *)d)
        && PyArray_EquivTypes(PyArray_DESCR((PyArrayObject *)a), PyArray_DESCR((PyArrayObject *)d)))
        r = PyNumber_InPlaceAdd(a, d);
    else
        r = PyNumber_Add(a, d);
    Py_DECREF(d);
    if (!r) return -1;
    put(g, t, r);
    return 0;
}

#define MAXCACHE 16
/* run_backward(steps, g, v, drop) -> number of steps done (g and v updated), or NULL on error.
 * steps[k] = (2, o, a, b, target, how, dropped) for d(a @ b)/da = delta @ b.T, (3, ...) for
 * d/db = a.T @ delta, or (4, outs, results, ins, native, used, grads, n_distinct, targets, hows, cuts,
 * build, dropped) for a fused kernel's backward (cuts: see kernel_inputs; build: None, or for a CutFed
 * step its inputs' gradients from the kernel's: an index, or (layout input, indices) of blocks to
 * join); with drop, g[s] = v[s] = None for the dropped slots after the
 * step (Program.backward's params_only). delta @ b.T uses a contiguous copy of b.T where
 * symdiff.ops._mul_da does (set_transposed_copy), made once per b in this call. */
static PyObject *run_backward(PyObject *self, PyObject *args) {
    PyObject *steps, *g, *v;
    int drop;
    if (!PyArg_ParseTuple(args, "O!O!O!p", &PyTuple_Type, &steps, &PyList_Type, &g, &PyList_Type, &v, &drop))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(steps), k;
    PyObject *cache_b[MAXCACHE], *cache_t[MAXCACHE];
    int ncache = 0;
    PyObject *result = NULL;
    for (k = 0; k < n; k++) {
        PyObject *st = PyTuple_GET_ITEM(steps, k);
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(st, 0));
        PyObject *dropped;
        if (kind == 2 || kind == 3) {
            PyObject *delta = PyList_GET_ITEM(g, SLOT(st, 1)), *a = PyList_GET_ITEM(v, SLOT(st, 2)),
                     *b = PyList_GET_ITEM(v, SLOT(st, 3)), *d;
            if (kind == 3) d = product(a, delta, 1, 0);
            else {
                if (!PyArray_CheckExact(b)) break;
                PyArrayObject *ba = (PyArrayObject *)b;
                npy_intp size = PyArray_SIZE(ba);
                if (PyArray_NDIM(ba) == 2 && PyArray_IS_C_CONTIGUOUS(ba) && size >= tcopy_lo && size <= tcopy_hi) {
                    PyObject *bt = NULL;
                    for (int c = 0; c < ncache; c++) if (cache_b[c] == b) bt = cache_t[c];
                    if (!bt) {
                        if (ncache == MAXCACHE) break;
                        PyObject *view = PyArray_Transpose(ba, NULL);
                        if (!view) goto done;
                        bt = PyArray_NewCopy((PyArrayObject *)view, NPY_CORDER);
                        Py_DECREF(view);
                        if (!bt) goto done;
                        Py_INCREF(b);
                        cache_b[ncache] = b; cache_t[ncache++] = bt;
                    }
                    d = product(delta, bt, 0, 0);
                } else d = product(delta, b, 0, 1);
            }
            if (!d) { if (PyErr_Occurred()) goto done; break; }
            if (accumulate(g, SLOT(st, 4), PyLong_AsLong(PyTuple_GET_ITEM(st, 5)), d)) goto done;
            dropped = PyTuple_GET_ITEM(st, 6);
        } else {
            PyObject *fns = kernels_of(PyTuple_GET_ITEM(st, 4));
            if (!fns) { if (PyErr_Occurred()) goto done; break; }
            PyObject *dslots = PyTuple_GET_ITEM(st, 1), *rslots = PyTuple_GET_ITEM(st, 2);
            Py_ssize_t nd_ = PyTuple_GET_SIZE(dslots), nr = PyTuple_GET_SIZE(rslots);
            const char *used = PyBytes_AS_STRING(PyTuple_GET_ITEM(st, 5));
            Py_ssize_t n_used = PyBytes_GET_SIZE(PyTuple_GET_ITEM(st, 5));
            int typenum = -1;
            for (Py_ssize_t j = 0; j < nr && typenum < 0; j++) {
                PyObject *x = PyList_GET_ITEM(v, SLOT(rslots, j));
                if (PyArray_Check(x)) typenum = PyArray_TYPE((PyArrayObject *)x);
            }
            kernel_t fn = pick(fns, typenum);
            Py_DECREF(fns);
            operand ops[MAXOPS];
            if (!fn || nd_ + nr > MAXOPS / 2) break;
            int fits = 1;
            for (Py_ssize_t j = 0; j < nd_ + nr && fits; j++) {
                PyObject *x = j < nd_ ? PyList_GET_ITEM(g, SLOT(dslots, j)) : PyList_GET_ITEM(v, SLOT(rslots, j - nd_));
                if (j < nd_ && x == Py_None) { ops[j].nd = 0; continue; }
                fits = !inspect(x, typenum, !used[j], &ops[j]);
            }
            if (!fits) break;
            Py_ssize_t ni = kernel_inputs(v, PyTuple_GET_ITEM(st, 3), PyTuple_GET_ITEM(st, 10), used + nd_ + nr,
                                          &typenum, ops + nd_ + nr);
            if (ni < 0 || nd_ + nr + ni != n_used || PyLong_AsSsize_t(PyTuple_GET_ITEM(st, 7)) < 1 || nd_ + nr + ni + PyLong_AsSsize_t(PyTuple_GET_ITEM(st, 7)) > MAXOPS)
                break;
            PyObject *grads = backward_ops(fn, typenum, ops, nd_, nr, ni, PyTuple_GET_ITEM(st, 6),
                                           PyLong_AsSsize_t(PyTuple_GET_ITEM(st, 7)));
            if (!grads) goto done;
            if (grads == Py_None) { Py_DECREF(grads); break; }
            PyObject *build = PyTuple_GET_ITEM(st, 11);
            if (build != Py_None) {  /* a CutFed step: its inputs' gradients from the inner kernel's */
                Py_ssize_t nbld = PyTuple_GET_SIZE(build);
                PyObject *wrapped = PyList_New(nbld);
                if (!wrapped) { Py_DECREF(grads); goto done; }
                for (Py_ssize_t j = 0; j < nbld; j++) {
                    PyObject *b = PyTuple_GET_ITEM(build, j), *x;
                    if (PyLong_Check(b)) {
                        x = PyList_GET_ITEM(grads, PyLong_AsSsize_t(b));
                        Py_INCREF(x);
                    } else {
                        PyObject *ranks = PyTuple_GET_ITEM(b, 1);
                        PyObject *parts = PyList_New(PyTuple_GET_SIZE(ranks));
                        if (!parts) { Py_DECREF(wrapped); Py_DECREF(grads); goto done; }
                        for (Py_ssize_t r = 0; r < PyTuple_GET_SIZE(ranks); r++) {
                            PyObject *y = PyList_GET_ITEM(grads, SLOT(ranks, r));
                            Py_INCREF(y);
                            PyList_SET_ITEM(parts, r, y);
                        }
                        x = joined(parts);
                        Py_DECREF(parts);
                        if (!x) { Py_DECREF(wrapped); Py_DECREF(grads); goto done; }
                    }
                    PyList_SET_ITEM(wrapped, j, x);
                }
                Py_DECREF(grads);
                grads = wrapped;
            }
            PyObject *targets = PyTuple_GET_ITEM(st, 8), *hows = PyTuple_GET_ITEM(st, 9);
            Py_ssize_t nt = PyTuple_GET_SIZE(targets);
            if (PyList_GET_SIZE(grads) < nt) nt = PyList_GET_SIZE(grads);
            for (Py_ssize_t j = 0; j < nt; j++) {
                PyObject *d = PyList_GET_ITEM(grads, j);
                Py_INCREF(d);
                if (accumulate(g, SLOT(targets, j), PyLong_AsLong(PyTuple_GET_ITEM(hows, j)), d)) {
                    Py_DECREF(grads); goto done;
                }
            }
            Py_DECREF(grads);
            dropped = PyTuple_GET_ITEM(st, 12);
        }
        if (drop) {
            for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(dropped); j++) {
                Py_ssize_t s = SLOT(dropped, j);
                Py_INCREF(Py_None); put(g, s, Py_None);
                Py_INCREF(Py_None); put(v, s, Py_None);
            }
        }
    }
    result = PyLong_FromSsize_t(k);
done:
    for (int c = 0; c < ncache; c++) { Py_DECREF(cache_b[c]); Py_DECREF(cache_t[c]); }
    return result;
}

/* ---- the loss head (crossEnt-softMax, mean) in one call, with numpy's own loops -----------------
 * A batch's head is a 64 x labels array: numpy's nine calls there cost far more than the arithmetic,
 * most of it in numpy's machinery gone cold after a run. These helpers do what ops.py's numpy code does,
 * step for step, calling numpy's own inner loops (the ufunc's registered loop for exp, log and the
 * add loop numpy's reductions call: pairwise, from 0) where numpy's bits depend on the loop, plain C
 * (one IEEE operation each, no contraction) elsewhere. symdiff/numpy_loops.py hands the loops over and
 * keeps them only if the results equal numpy's bit for bit. Anything else (layout, dtype, a value that
 * is not finite, where numpy would warn) returns None and ops.py runs numpy. */
typedef void (*uloop_t)(char **args, npy_intp const *dims, npy_intp const *steps, void *data);
typedef struct { uloop_t fn; void *data; } uloop;
static uloop loop_exp[2], loop_log[2], loop_add[2];  /* [0] float32, [1] float64 */
static int head_ready = 0;

/* The loop of a ufunc (nin inputs, one output) whose operands are all of type tn. */
static int ufunc_loop(PyObject *obj, int nin, int tn, uloop *out) {
    if (strcmp(Py_TYPE(obj)->tp_name, "numpy.ufunc") != 0) return -1;
    PyUFuncObject *u = (PyUFuncObject *)obj;
    if (u->nin != nin || u->nout != 1 || !u->functions || !u->types) return -1;
    for (int i = 0; i < u->ntypes; i++) {
        const char *ty = u->types + (Py_ssize_t)i * u->nargs;
        int all = 1;
        for (int j = 0; j < u->nargs; j++) all &= ty[j] == tn;
        if (all && u->functions[i]) {
            out->fn = (uloop_t)u->functions[i];
            out->data = u->data ? u->data[i] : NULL;
            return 0;
        }
    }
    return -1;
}

/* set_head_loops(exp, log, add) -> bool: take numpy's float32/float64 loops (or forget them: None). */
static PyObject *set_head_loops(PyObject *self, PyObject *args) {
    PyObject *e, *l, *a;
    if (!PyArg_ParseTuple(args, "OOO", &e, &l, &a)) return NULL;
    head_ready = 0;
    if (e == Py_None) Py_RETURN_FALSE;
    for (int k = 0; k < 2; k++) {
        int tn = k ? NPY_DOUBLE : NPY_FLOAT;
        if (ufunc_loop(e, 1, tn, &loop_exp[k]) || ufunc_loop(l, 1, tn, &loop_log[k])
            || ufunc_loop(a, 2, tn, &loop_add[k])) Py_RETURN_FALSE;
    }
    head_ready = 1;
    Py_RETURN_TRUE;
}

/* numpy's add.reduce of n contiguous elements at a: from 0, one call of the add loop (pairwise). */
#define HEAD_SUM(T, k, a, n, res) do { \
        (res) = 0; char *rargs_[3] = {(char *)&(res), (char *)(a), (char *)&(res)}; \
        npy_intp rd_[1] = {(n)}, rs_[3] = {0, sizeof(T), 0}; \
        loop_add[k].fn(rargs_, rd_, rs_, loop_add[k].data); } while (0)
/* numpy's unary loop over n contiguous elements (in and out may be the same memory) */
#define HEAD_UNARY(L, T, k, in, out, n) do { \
        char *uargs_[2] = {(char *)(in), (char *)(out)}; npy_intp ud_[1] = {(n)}, us_[2] = {sizeof(T), sizeof(T)}; \
        L[k].fn(uargs_, ud_, us_, L[k].data); } while (0)
/* numpy's maximum of a row: the first element, then (m >= x or m is NaN) ? m : x */
#define HEAD_MAX(a, c, m) do { (m) = (a)[0]; \
        for (npy_intp j_ = 1; j_ < (c); j_++) (m) = ((m) >= (a)[j_] || (m) != (m)) ? (m) : (a)[j_]; } while (0)

/* A C-contiguous array of typenum with nd dimensions (dims out), else -1. */
static int head_array(PyObject *o, int nd, int typenum, npy_intp *dims) {
    if (!PyArray_CheckExact(o)) return -1;
    PyArrayObject *a = (PyArrayObject *)o;
    if (PyArray_NDIM(a) != nd || PyArray_TYPE(a) != typenum || !PyArray_IS_C_CONTIGUOUS(a)) return -1;
    for (int d = 0; d < nd; d++) dims[d] = PyArray_DIM(a, d);
    return 0;
}

#define HEAD_CE_FORWARD(T, k) do { \
        const T *o = (const T *)PyArray_DATA((PyArrayObject *)oo), *t = (const T *)PyArray_DATA((PyArrayObject *)to); \
        T *z = (T *)PyArray_DATA((PyArrayObject *)zo), *e = (T *)PyArray_DATA((PyArrayObject *)eo); \
        T *loss = (T *)PyArray_DATA((PyArrayObject *)out); \
        for (npy_intp i = 0; i < n; i++) { T m; HEAD_MAX(o + i * c, c, m); \
            for (npy_intp j = 0; j < c; j++) z[i * c + j] = o[i * c + j] - m; } \
        HEAD_UNARY(loop_exp, T, k, z, e, n * c);                 /* np.exp(z) */ \
        for (npy_intp i = 0; i < n; i++) HEAD_SUM(T, k, e + i * c, c, loss[i]);  /* .sum(axis=1) */ \
        HEAD_UNARY(loop_log, T, k, loss, loss, n);               /* np.log(s, out=s) */ \
        for (npy_intp i = 0; i < n; i++) { T ls = loss[i]; \
            for (npy_intp j = 0; j < c; j++) { T u = z[i * c + j] - ls; z[i * c + j] = u * t[i * c + j]; } \
            T r; HEAD_SUM(T, k, z + i * c, c, r); loss[i] = -r; if (!isfinite(r)) bad = 1; } \
    } while (0)

/* crossent_softmax(o, t) -> -sum(t * log_softmax(o), axis=1), as ops._crossent_softmax, or None. */
static PyObject *crossent_softmax(PyObject *self, PyObject *args) {
    PyObject *oo, *to;
    if (!PyArg_ParseTuple(args, "OO", &oo, &to)) return NULL;
    if (!head_ready || !PyArray_Check(oo)) Py_RETURN_NONE;
    int typenum = PyArray_TYPE((PyArrayObject *)oo), k = typenum == NPY_DOUBLE, bad = 0;
    npy_intp od[2], td[2];
    if ((typenum != NPY_FLOAT && !k) || head_array(oo, 2, typenum, od) || head_array(to, 2, typenum, td)
        || od[0] != td[0] || od[1] != td[1] || od[1] < 1) Py_RETURN_NONE;
    npy_intp n = od[0], c = od[1];
    PyObject *zo = PyArray_EMPTY(2, od, typenum, 0), *eo = PyArray_EMPTY(2, od, typenum, 0);
    PyObject *out = PyArray_EMPTY(1, od, typenum, 0);
    if (!zo || !eo || !out) { Py_XDECREF(zo); Py_XDECREF(eo); Py_XDECREF(out); return NULL; }
    if (k) HEAD_CE_FORWARD(double, 1); else HEAD_CE_FORWARD(float, 0);
    Py_DECREF(zo); Py_DECREF(eo);
    if (bad) { Py_DECREF(out); Py_RETURN_NONE; }  /* numpy's path, with its warnings */
    return out;
}

#define HEAD_CE_GRAD(T, k) do { \
        const T *o = (const T *)PyArray_DATA((PyArrayObject *)oo), *t = (const T *)PyArray_DATA((PyArrayObject *)to); \
        const T *d = (const T *)PyArray_DATA((PyArrayObject *)dobj); T *z = (T *)PyArray_DATA((PyArrayObject *)out); \
        for (npy_intp i = 0; i < n; i++) { T m; HEAD_MAX(o + i * c, c, m); \
            for (npy_intp j = 0; j < c; j++) z[i * c + j] = o[i * c + j] - m; } \
        HEAD_UNARY(loop_exp, T, k, z, z, n * c);                 /* np.exp(z, out=z) */ \
        for (npy_intp i = 0; i < n; i++) { T s, ts; \
            HEAD_SUM(T, k, z + i * c, c, s); HEAD_SUM(T, k, t + i * c, c, ts); \
            for (npy_intp j = 0; j < c; j++) { T u = z[i * c + j] / s; u = u * ts; u = u - t[i * c + j]; \
                u = u * d[i]; z[i * c + j] = u; if (!isfinite(u)) bad = 1; } } \
    } while (0)

/* crossent_softmax_grad(delta, o, t) -> delta[:, None] * (softmax(o) * t.sum(1) - t), as
 * ops._crossent_softmax_do, or None. */
static PyObject *crossent_softmax_grad(PyObject *self, PyObject *args) {
    PyObject *dobj, *oo, *to;
    if (!PyArg_ParseTuple(args, "OOO", &dobj, &oo, &to)) return NULL;
    if (!head_ready || !PyArray_Check(oo)) Py_RETURN_NONE;
    int typenum = PyArray_TYPE((PyArrayObject *)oo), k = typenum == NPY_DOUBLE, bad = 0;
    npy_intp od[2], td[2], dd[1];
    if ((typenum != NPY_FLOAT && !k) || head_array(oo, 2, typenum, od) || head_array(to, 2, typenum, td)
        || head_array(dobj, 1, typenum, dd) || od[0] != td[0] || od[1] != td[1] || dd[0] != od[0]
        || od[1] < 1) Py_RETURN_NONE;
    npy_intp n = od[0], c = od[1];
    PyObject *out = PyArray_EMPTY(2, od, typenum, 0);
    if (!out) return NULL;
    if (k) HEAD_CE_GRAD(double, 1); else HEAD_CE_GRAD(float, 0);
    if (bad) { Py_DECREF(out); Py_RETURN_NONE; }
    return out;
}

/* mean_of(a) -> 0-d np.add.reduce(a) / a.size for a 1-D contiguous float array (numpy's mean), or None. */
static PyObject *mean_of(PyObject *self, PyObject *args) {
    PyObject *ao;
    if (!PyArg_ParseTuple(args, "O", &ao)) return NULL;
    if (!head_ready || !PyArray_Check(ao)) Py_RETURN_NONE;
    int typenum = PyArray_TYPE((PyArrayObject *)ao);
    npy_intp ad[1];
    if ((typenum != NPY_FLOAT && typenum != NPY_DOUBLE) || head_array(ao, 1, typenum, ad) || ad[0] < 1
        || ad[0] > 8192) Py_RETURN_NONE;  /* (longer: numpy's reduction may cut it into buffers) */
    PyObject *out = PyArray_EMPTY(0, NULL, typenum, 0);
    if (!out) return NULL;
    if (typenum == NPY_DOUBLE) { double s; HEAD_SUM(double, 1, PyArray_DATA((PyArrayObject *)ao), ad[0], s);
        *(double *)PyArray_DATA((PyArrayObject *)out) = s / (double)ad[0]; }
    else { float s; HEAD_SUM(float, 0, PyArray_DATA((PyArrayObject *)ao), ad[0], s);
        *(float *)PyArray_DATA((PyArrayObject *)out) = s / (float)ad[0]; }
    return out;
}

/* mean_grad(delta, a) -> an array of a's shape filled with delta / a.size (ops._mean_back: np.full),
 * for a 0-d delta of a's float dtype, or None. a's values are not read (it may be a stand-in). */
static PyObject *mean_grad(PyObject *self, PyObject *args) {
    PyObject *dobj, *ao;
    if (!PyArg_ParseTuple(args, "OO", &dobj, &ao)) return NULL;
    if (!PyArray_CheckExact(dobj) || !PyArray_CheckExact(ao)) Py_RETURN_NONE;
    PyArrayObject *d = (PyArrayObject *)dobj, *a = (PyArrayObject *)ao;
    int typenum = PyArray_TYPE(a);
    npy_intp size = PyArray_SIZE(a);
    if ((typenum != NPY_FLOAT && typenum != NPY_DOUBLE) || PyArray_TYPE(d) != typenum || PyArray_NDIM(d) != 0
        || size < 1 || size > (1 << 24)) Py_RETURN_NONE;  /* (a count a float32 holds exactly) */
    PyObject *out = PyArray_EMPTY(PyArray_NDIM(a), PyArray_DIMS(a), typenum, 0);
    if (!out) return NULL;
    if (typenum == NPY_DOUBLE) {
        double v = *(const double *)PyArray_DATA(d) / (double)size, *o = (double *)PyArray_DATA((PyArrayObject *)out);
        for (npy_intp i = 0; i < size; i++) o[i] = v;
    } else {
        float v = *(const float *)PyArray_DATA(d) / (float)size, *o = (float *)PyArray_DATA((PyArrayObject *)out);
        for (npy_intp i = 0; i < size; i++) o[i] = v;
    }
    return out;
}

/* apart(a, b) -> True if arrays a and b provably share no byte, else False (then ask np.shares_memory).
 * Proved by their extents, or, for two 2-D arrays with the same row stride and contiguous rows (column
 * blocks of one buffer: a joined gradient cut per gate), by where their rows sit within a row stride.
 * backward's ownership check asks it of every two param gradients of one buffer, every batch. */
static PyObject *apart(PyObject *self, PyObject *args) {
    PyObject *ao, *bo;
    if (!PyArg_ParseTuple(args, "OO", &ao, &bo)) return NULL;
    if (!PyArray_Check(ao) || !PyArray_Check(bo)) Py_RETURN_FALSE;
    PyArrayObject *x[2] = {(PyArrayObject *)ao, (PyArrayObject *)bo};
    char *lo[2], *hi[2];
    for (int i = 0; i < 2; i++) {
        if (PyArray_SIZE(x[i]) == 0) Py_RETURN_TRUE;  /* no memory at all */
        lo[i] = hi[i] = PyArray_BYTES(x[i]);
        for (int d = 0; d < PyArray_NDIM(x[i]); d++) {
            npy_intp span = (PyArray_DIM(x[i], d) - 1) * PyArray_STRIDE(x[i], d);
            if (span < 0) lo[i] += span; else hi[i] += span;
        }
        hi[i] += PyArray_ITEMSIZE(x[i]);
    }
    if (hi[0] <= lo[1] || hi[1] <= lo[0]) Py_RETURN_TRUE;
    if (PyArray_NDIM(x[0]) != 2 || PyArray_NDIM(x[1]) != 2) Py_RETURN_FALSE;
    npy_intp isz = PyArray_ITEMSIZE(x[0]), s0 = PyArray_STRIDE(x[0], 0);
    npy_intp wa = PyArray_DIM(x[0], 1) * isz, wb = PyArray_DIM(x[1], 1) * isz;
    if (PyArray_ITEMSIZE(x[1]) != isz || PyArray_STRIDE(x[1], 0) != s0 || s0 <= 0 || wa > s0 || wb > s0
        || (PyArray_DIM(x[0], 1) > 1 && PyArray_STRIDE(x[0], 1) != isz)
        || (PyArray_DIM(x[1], 1) > 1 && PyArray_STRIDE(x[1], 1) != isz)) Py_RETURN_FALSE;
    npy_intp off = (npy_intp)(PyArray_BYTES(x[1]) - PyArray_BYTES(x[0])) % s0;
    if (off < 0) off += s0;  /* b's rows start off bytes into a row stride measured from a's rows */
    if (off >= wa && off + wb <= s0) Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

/* sgd_step(params, grads, lr, momentum, nesterov, weight_decay, velocities) -> True, or None.
 * SGD on every parameter in one call (a Python loop of `p -= lr * g` costs more than its
 * arithmetic on an LSTM's fourteen small arrays): params[i] -= lr * grads[i], where grads[i] is an
 * array of params[i]'s shape and dtype, a pair (rows, values) of a row-sparse gradient
 * (p[rows] -= lr * values, rows distinct; plain SGD only), or None (no gradient: untouched).
 * With weight_decay, g + weight_decay * p; with momentum, v = v * momentum + g (velocities[i], the
 * parameter's shape) and the step is v, or g + momentum * v (nesterov): optim.SGD's operations in
 * its order, each rounded as numpy rounds it (scalars in p's dtype, a product rounded before a sum:
 * the dispatcher is built with -ffp-contract=off), so both give the same bits. Everything is checked
 * before anything is written: None means nothing changed and the caller runs numpy. */
typedef struct {
    char *p;
    const char *g;
    const npy_intp *rows;   /* NULL: dense, row r of g updates row r of p */
    char *v;                /* the velocity (momentum), or NULL */
    npy_intp R, K, ps, gs, vs;  /* rows, columns, row strides in elements */
    int dbl;
} sgd_item;

/* One array as rows x columns with a contiguous last axis and non-negative strides in elements;
 * its first and one-past-last byte. 0 if usable. */
static int sgd_layout(PyArrayObject *a, int typenum, npy_intp *R, npy_intp *K, npy_intp *rs,
                      char **lo, char **hi) {
    int nd = PyArray_NDIM(a);
    npy_intp isz = PyArray_ITEMSIZE(a);
    if (PyArray_TYPE(a) != typenum || nd < 1 || nd > 2) return -1;
    npy_intp *sh = PyArray_DIMS(a), *st = PyArray_STRIDES(a);
    *K = sh[nd - 1];
    *R = nd == 2 ? sh[0] : 1;
    *rs = 0;
    if (*K > 1 && st[nd - 1] != isz) return -1;
    if (nd == 2 && *R > 1) {
        if (st[0] < 0 || st[0] % isz) return -1;
        *rs = st[0] / isz;
    }
    *lo = PyArray_BYTES(a);
    *hi = *lo + ((*R > 0 && *K > 0) ? ((*R - 1) * *rs + *K) * isz : 0);
    return 0;
}

/* A parameter's gradient: a dense array of p's rank or a pair (rows, values) of a row-sparse one
 * whose distinct rows index p's *R rows (then *R becomes the gradient's row count), read as
 * sgd_layout reads an array; *rows is NULL for a dense one. 0 if usable (sgd_step and adam_step). */
static int grad_layout(PyObject *go, PyArrayObject *p, int typenum, npy_intp *R, npy_intp K,
                       const npy_intp **rows, npy_intp *gs, char **glo, char **ghi) {
    PyObject *vo = go;
    *rows = NULL;
    if (PyTuple_Check(go)) {
        if (PyTuple_GET_SIZE(go) != 2 || PyArray_NDIM(p) != 2) return -1;
        PyObject *ro = PyTuple_GET_ITEM(go, 0);
        vo = PyTuple_GET_ITEM(go, 1);
        if (!PyArray_Check(ro) || !PyArray_Check(vo)) return -1;
        PyArrayObject *ra = (PyArrayObject *)ro;
        if (PyArray_NDIM(ra) != 1 || PyArray_TYPE(ra) != NPY_INTP || !PyArray_IS_C_CONTIGUOUS(ra)
            || PyArray_NDIM((PyArrayObject *)vo) != 2) return -1;
        const npy_intp *r = (const npy_intp *)PyArray_DATA(ra);
        npy_intp S = PyArray_DIM(ra, 0);
        for (npy_intp q = 0; q < S; q++) if (r[q] < 0 || r[q] >= *R) return -1;
        if (PyArray_DIM((PyArrayObject *)vo, 0) != S) return -1;
        *rows = r;
    } else if (!PyArray_Check(go) || PyArray_NDIM((PyArrayObject *)go) != PyArray_NDIM(p)) {
        return -1;
    }
    npy_intp gR, gK;
    if (sgd_layout((PyArrayObject *)vo, typenum, &gR, &gK, gs, glo, ghi) || gK != K) return -1;
    if (*rows == NULL && gR != *R) return -1;
    if (*rows != NULL) *R = gR;  /* the loop runs over the gradient's rows */
    return 0;
}

#define SGD_ROW(T)                                                                                     \
    do {                                                                                               \
        const T LR = (T)lr, MU = (T)mu, WD = (T)wd;                                                    \
        T *o = (T *)it->p + pr * it->ps;                                                               \
        const T *g = (const T *)it->g + r * it->gs;                                                    \
        if (!mu && !wd) {                                                                              \
            for (npy_intp q = 0; q < it->K; q++) { T t = LR * g[q]; o[q] -= t; }                       \
        } else if (!mu) {                                                                              \
            for (npy_intp q = 0; q < it->K; q++) { T t = WD * o[q]; t = g[q] + t; t = LR * t; o[q] -= t; } \
        } else {                                                                                       \
            T *v = (T *)it->v + r * it->vs;                                                            \
            for (npy_intp q = 0; q < it->K; q++) {                                                     \
                T gg = g[q];                                                                           \
                if (wd) { T t = WD * o[q]; gg = gg + t; }                                              \
                T vv = v[q] * MU;                                                                      \
                vv = vv + gg;                                                                          \
                v[q] = vv;                                                                             \
                T u = vv;                                                                              \
                if (nesterov) { T t = MU * vv; u = gg + t; }                                           \
                u = LR * u;                                                                            \
                o[q] -= u;                                                                             \
            }                                                                                          \
        }                                                                                              \
    } while (0)

static PyObject *sgd_step(PyObject *self, PyObject *args) {
    PyObject *params, *grads, *vels;
    double lr, mu, wd;
    int nesterov;
    if (!PyArg_ParseTuple(args, "O!O!ddpdO", &PyList_Type, &params, &PyList_Type, &grads, &lr, &mu, &nesterov,
                          &wd, &vels)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(params);
    if (PyList_GET_SIZE(grads) != n || (mu && (!PyList_Check(vels) || PyList_GET_SIZE(vels) != n)))
        Py_RETURN_NONE;
    sgd_item *items = PyMem_Malloc((n ? n : 1) * sizeof(sgd_item));
    if (!items) return PyErr_NoMemory();
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *po = PyList_GET_ITEM(params, i), *go = PyList_GET_ITEM(grads, i);
        if (go == Py_None) continue;
        if (!PyArray_Check(po)) goto unfit;
        PyArrayObject *p = (PyArrayObject *)po;
        int typenum = PyArray_TYPE(p);
        if ((typenum != NPY_DOUBLE && typenum != NPY_FLOAT) || !PyArray_ISWRITEABLE(p)) goto unfit;
        sgd_item *it = &items[m];
        char *plo, *phi, *glo, *ghi;
        if (sgd_layout(p, typenum, &it->R, &it->K, &it->ps, &plo, &phi)) goto unfit;
        it->p = plo;
        it->v = NULL;
        it->dbl = typenum == NPY_DOUBLE;
        if (PyTuple_Check(go) && (mu || wd)) goto unfit;  /* row-sparse: plain SGD only */
        if (grad_layout(go, p, typenum, &it->R, it->K, &it->rows, &it->gs, &glo, &ghi)) goto unfit;
        /* a gradient overlapping its parameter other than exactly (p -= lr * p) would read updated values */
        if (glo < phi && plo < ghi && !(it->rows == NULL && glo == plo && it->gs == it->ps)) goto unfit;
        it->g = glo;
        if (mu) {  /* the velocity: the parameter's shape, overlapping neither it nor the gradient */
            PyObject *vel = PyList_GET_ITEM(vels, i);
            npy_intp vR, vK;
            char *vlo, *vhi;
            if (!PyArray_Check(vel) || !PyArray_ISWRITEABLE((PyArrayObject *)vel)
                || PyArray_NDIM((PyArrayObject *)vel) != PyArray_NDIM(p)
                || sgd_layout((PyArrayObject *)vel, typenum, &vR, &vK, &it->vs, &vlo, &vhi)
                || vR != it->R || vK != it->K || (vlo < phi && plo < vhi) || (vlo < ghi && glo < vhi)) goto unfit;
            it->v = vlo;
        }
        m++;
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        const sgd_item *it = &items[i];
        for (npy_intp r = 0; r < it->R; r++) {
            npy_intp pr = it->rows ? it->rows[r] : r;
            if (it->dbl) SGD_ROW(double);
            else SGD_ROW(float);
        }
    }
    PyMem_Free(items);
    Py_RETURN_TRUE;
unfit:
    PyMem_Free(items);
    Py_RETURN_NONE;
}

/* adam_step(params, grads, (m, v, g, denom), (b1, 1-b1, b2, 1-b2, sqrt(bias2), eps, lr/bias1, wd, 1-lr*wd),
 *           decay) -> True, or None.
 * One Adam step of every parameter in one call, on the flat moment buffers optim.Adam keeps (m, v, g,
 * denom: 1-d, contiguous, one element per parameter element in params' order): each gradient (an array
 * of its parameter's shape and dtype, or a pair (rows, values) of a row-sparse one, zero elsewhere) is
 * copied into g; decay 1 adds wd * p to it (L2), decay 2 first multiplies p by 1 - lr*wd (AdamW); then
 * the moments and the step as Adam._moments computes them, and p -= step. Every operation is the one
 * numpy does, in its order and rounding (scalars in the arrays' dtype, -ffp-contract=off), so both give
 * the same bits. Everything is checked before anything is written: None means nothing changed. */
static int flat_of(PyObject *o, int typenum, npy_intp N, char **data) {
    if (!PyArray_Check(o)) return -1;
    PyArrayObject *a = (PyArrayObject *)o;
    if (PyArray_TYPE(a) != typenum || PyArray_NDIM(a) != 1 || PyArray_DIM(a, 0) != N
        || !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISWRITEABLE(a)) return -1;
    *data = PyArray_BYTES(a);
    return 0;
}

/* Adam._moments on the flat buffers, elementwise: numpy's operations in numpy's order. Separate
 * restrict-qualified loops so that they vectorise (sqrt and division are correctly rounded either way). */
#define ADAM_MOMENTS(T, SQRT)                                                                          \
    static __attribute__((noinline)) void adam_moments_##T(T *restrict M, T *restrict V, const T *restrict G, T *restrict D,     \
                                 npy_intp N, T B1, T C1, T B2, T C2, T SB2, T EPS, T LRB) {            \
        for (npy_intp q = 0; q < N; q++) {                                                             \
            T mm = M[q] * B1, t = C1 * G[q];                                                           \
            mm = mm + t;                                                                               \
            M[q] = mm;                                                                                 \
            T vv = V[q] * B2;                                                                          \
            t = G[q] * G[q];                                                                           \
            t = t * C2;                                                                                \
            vv = vv + t;                                                                               \
            V[q] = vv;                                                                                 \
            T d = SQRT(vv);                                                                            \
            d = d / SB2;                                                                               \
            d = d + EPS;                                                                               \
            d = mm / d;                                                                                \
            D[q] = d * LRB;                                                                            \
        }                                                                                              \
    }
ADAM_MOMENTS(double, sqrt)
ADAM_MOMENTS(float, sqrtf)

#define ADAM_LOOP(T, SQRT)                                                                            \
    do {                                                                                              \
        const T B1 = (T)s[0], C1 = (T)s[1], B2 = (T)s[2], C2 = (T)s[3], SB2 = (T)s[4], EPS = (T)s[5],  \
                LRB = (T)s[6], WD = (T)s[7], PD = (T)s[8];                                            \
        T *M = (T *)md, *V = (T *)vd, *G = (T *)gd, *D = (T *)dd;                                     \
        for (Py_ssize_t i = 0; i < m; i++) {                                                          \
            const sgd_item *it = &items[i];                                                           \
            T *g0 = G + offs[i];                                                                      \
            if (it->rows) {                                                                           \
                for (npy_intp q = 0; q < rows_of[i] * it->K; q++) g0[q] = 0;                          \
                for (npy_intp r = 0; r < it->R; r++) {                                                \
                    const T *src = (const T *)it->g + r * it->gs;                                     \
                    T *dst = g0 + it->rows[r] * it->K;                                                \
                    for (npy_intp q = 0; q < it->K; q++) dst[q] = src[q];                             \
                }                                                                                     \
            } else {                                                                                  \
                for (npy_intp r = 0; r < it->R; r++) {                                                \
                    const T *src = (const T *)it->g + r * it->gs;                                     \
                    for (npy_intp q = 0; q < it->K; q++) g0[r * it->K + q] = src[q];                  \
                }                                                                                     \
            }                                                                                         \
            if (decay) {                                                                              \
                for (npy_intp r = 0; r < rows_of[i]; r++) {                                           \
                    T *p = (T *)it->p + r * it->ps, *gr = g0 + r * it->K;                             \
                    if (decay == 2) for (npy_intp q = 0; q < it->K; q++) p[q] *= PD;                  \
                    else for (npy_intp q = 0; q < it->K; q++) { T t = p[q] * WD; gr[q] += t; }        \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        adam_moments_##T(M, V, G, D, N, B1, C1, B2, C2, SB2, EPS, LRB);                                 \
        for (Py_ssize_t i = 0; i < m; i++) {                                                          \
            const sgd_item *it = &items[i];                                                           \
            const T *d0 = D + offs[i];                                                                \
            for (npy_intp r = 0; r < rows_of[i]; r++) {                                               \
                T *p = (T *)it->p + r * it->ps;                                                       \
                for (npy_intp q = 0; q < it->K; q++) p[q] -= d0[r * it->K + q];                       \
            }                                                                                         \
        }                                                                                             \
    } while (0)

static PyObject *adam_step(PyObject *self, PyObject *args) {
    PyObject *params, *grads, *flat, *scal;
    int decay;
    if (!PyArg_ParseTuple(args, "O!O!O!O!i", &PyList_Type, &params, &PyList_Type, &grads, &PyTuple_Type, &flat,
                          &PyTuple_Type, &scal, &decay)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(params);
    if (PyList_GET_SIZE(grads) != n || n == 0 || PyTuple_GET_SIZE(flat) != 4 || PyTuple_GET_SIZE(scal) != 9
        || decay < 0 || decay > 2) Py_RETURN_NONE;
    double s[9];
    for (int k = 0; k < 9; k++) {
        s[k] = PyFloat_AsDouble(PyTuple_GET_ITEM(scal, k));
        if (s[k] == -1.0 && PyErr_Occurred()) return NULL;
    }
    if (!PyArray_Check(PyList_GET_ITEM(params, 0))) Py_RETURN_NONE;
    int typenum = PyArray_TYPE((PyArrayObject *)PyList_GET_ITEM(params, 0));
    if (typenum != NPY_DOUBLE && typenum != NPY_FLOAT) Py_RETURN_NONE;
    sgd_item *items = PyMem_Malloc(n * sizeof(sgd_item));
    npy_intp *offs = PyMem_Malloc(n * sizeof(npy_intp)), *rows_of = PyMem_Malloc(n * sizeof(npy_intp));
    if (!items || !offs || !rows_of) { PyMem_Free(items); PyMem_Free(offs); PyMem_Free(rows_of); return PyErr_NoMemory(); }
    Py_ssize_t m = 0;
    npy_intp N = 0;
    char *md, *vd, *gd, *dd;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *po = PyList_GET_ITEM(params, i), *go = PyList_GET_ITEM(grads, i);
        if (!PyArray_Check(po)) goto unfit;
        PyArrayObject *p = (PyArrayObject *)po;
        if (!PyArray_ISWRITEABLE(p)) goto unfit;
        sgd_item *it = &items[m];
        char *plo, *phi, *glo, *ghi;
        if (sgd_layout(p, typenum, &it->R, &it->K, &it->ps, &plo, &phi)) goto unfit;
        it->p = plo;
        rows_of[m] = it->R;
        offs[m] = N;
        N += it->R * it->K;
        if (grad_layout(go, p, typenum, &it->R, it->K, &it->rows, &it->gs, &glo, &ghi)) goto unfit;
        it->g = glo;
        m++;
    }
    if (flat_of(PyTuple_GET_ITEM(flat, 0), typenum, N, &md) || flat_of(PyTuple_GET_ITEM(flat, 1), typenum, N, &vd)
        || flat_of(PyTuple_GET_ITEM(flat, 2), typenum, N, &gd) || flat_of(PyTuple_GET_ITEM(flat, 3), typenum, N, &dd))
        goto unfit;
    {   /* the flat buffers are the optimiser's own: four distinct ones */
        npy_intp isz = typenum == NPY_DOUBLE ? 8 : 4;
        char *b[4] = {md, vd, gd, dd};
        for (int j = 0; j < 4; j++)
            for (int k = j + 1; k < 4; k++)
                if (N && b[j] < b[k] + N * isz && b[k] < b[j] + N * isz) goto unfit;
    }
    /* none may overlap a parameter or a gradient */
    for (Py_ssize_t i = 0; i < m; i++) {
        const sgd_item *it = &items[i];
        npy_intp isz = typenum == NPY_DOUBLE ? 8 : 4;
        const char *plo = it->p, *phi = it->p + ((rows_of[i] - 1) * it->ps + it->K) * isz;
        const char *glo = it->g, *ghi = it->g + ((it->R - 1) * it->gs + it->K) * isz;
        char *bufs[4] = {md, vd, gd, dd};
        for (int k = 0; k < 4; k++) {
            const char *lo = bufs[k], *hi = bufs[k] + N * isz;
            if (rows_of[i] * it->K && lo < phi && plo < hi) goto unfit;
            if (it->R * it->K && lo < ghi && glo < hi) goto unfit;
        }
    }
    if (typenum == NPY_DOUBLE) ADAM_LOOP(double, sqrt);
    else ADAM_LOOP(float, sqrtf);
    PyMem_Free(items); PyMem_Free(offs); PyMem_Free(rows_of);
    Py_RETURN_TRUE;
unfit:
    PyMem_Free(items); PyMem_Free(offs); PyMem_Free(rows_of);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"onehot_gather", onehot_gather, METH_VARARGS, "A one-hot matrix times a matrix, or None."},
    {"onehot_scatter", onehot_scatter, METH_VARARGS, "A one-hot matrix's transpose times a matrix, row-sparse, or None."},
    {"rows_sub_scaled", rows_sub_scaled, METH_VARARGS, "p[rows] -= lr * values in place; None if it does not fit."},
    {"segment_sum", segment_sum, METH_VARARGS, "Sums of groups of rows of a matrix, or None."},
    {"join_columns", join_columns, METH_VARARGS, "The array some column blocks are side by side in, or None."},
    {"set_blas", set_blas, METH_VARARGS, "Hand over the cblas_?gemm numpy's matmul calls."},
    {"set_transposed_copy", set_transposed_copy, METH_VARARGS, "The b sizes for which delta @ b.T copies b.T (ops._mul_da's)."},
    {"gemm", gemm, METH_VARARGS, "a @ b through that gemm as numpy calls it, or None where numpy would not."},
    {"run_forward", run_forward, METH_VARARGS, "Run forward steps (products, fused kernels); how many ran."},
    {"run_backward", run_backward, METH_VARARGS, "Run backward steps (products, fused kernels); how many ran."},
    {"set_head_loops", set_head_loops, METH_VARARGS, "Hand over numpy's exp, log and add loops for the loss head."},
    {"crossent_softmax", crossent_softmax, METH_VARARGS, "ops._crossent_softmax in one call, or None."},
    {"crossent_softmax_grad", crossent_softmax_grad, METH_VARARGS, "ops._crossent_softmax_do in one call, or None."},
    {"apart", apart, METH_VARARGS, "True if two arrays provably share no memory, else False."},
    {"mean_grad", mean_grad, METH_VARARGS, "ops._mean_back's filled array in one call, or None."},
    {"mean_of", mean_of, METH_VARARGS, "numpy's mean of a 1-D float array as a 0-d array, or None."},
    {"forward", forward, METH_VARARGS, "Run a generated forward kernel; None if the arrays do not fit it."},
    {"backward", backward, METH_VARARGS, "Run a generated backward kernel; None if the arrays do not fit it."},
    {"sgd_step", sgd_step, METH_VARARGS, "One SGD step (momentum, weight decay) of every parameter in place; None if one does not fit."},
    {"adam_step", adam_step, METH_VARARGS, "One Adam step of every parameter on the flat moment buffers; None if one does not fit."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_symdiff_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__symdiff_native(void) {
    import_array();
    return PyModule_Create(&module);
}
