"""Pieces shared by the numba kernels: fast activations, the blocked GEMM, partitioning."""
from __future__ import annotations

import math
from types import FunctionType

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic, overload

# reassociation/contraction for vectorized reductions, but no 'nnan'/'ninf': NaN and inf must
# propagate exactly as in torch
FM = {"reassoc", "contract", "nsz", "arcp"}
# error_model="numpy": no ZeroDivisionError check on divisions, which would block vectorization
JIT = dict(cache=True, fastmath=FM, nogil=True, error_model="numpy")

# tanh(x) ~ x * P(x^2) / Q(x^2) on [-9, 9], fitted here by least squares against float64 tanh; max
# abs error 3.3e-7 in float32 arithmetic (torch.tanh's own: 3e-8). Used for float32 only.
_P = (9.999999738e-01, 1.308515589e-01, 3.105340692e-03, 1.117165808e-05, -2.031272308e-08,
      5.329159598e-11, -8.642440220e-14)
_Q = (1.0, 4.641847807e-01, 2.450040609e-02, 2.548330486e-04)
P0, P1, P2, P3, P4, P5, P6 = (np.float32(c) for c in _P)
Q0, Q1, Q2, Q3 = (np.float32(c) for c in _Q)
F9 = np.float32(9.0)
HALF32 = np.float32(0.5)


@numba.njit(**JIT)
def _tanh32(x):
    # a NaN fails both comparisons and stays NaN
    if x > F9:
        x = F9
    elif x < -F9:
        x = -F9
    s = x * x
    p = ((((((P6 * s + P5) * s + P4) * s + P3) * s + P2) * s + P1) * s + P0)
    q = (((Q3 * s + Q2) * s + Q1) * s + Q0)
    return x * p / q


def tanh_(x):
    """tanh: the rational approximation in float32, libm's tanh in float64."""


def sigmoid_(x):
    """sigmoid: 0.5*tanh(x/2)+0.5 in float32, 1/(1+exp(-x)) in float64."""


@overload(tanh_, jit_options=dict(fastmath=FM, error_model="numpy"))
def _ol_tanh(x):
    if x == types.float32:
        return lambda x: _tanh32(x)
    return lambda x: math.tanh(x)


@overload(sigmoid_, jit_options=dict(fastmath=FM, error_model="numpy"))
def _ol_sigmoid(x):
    if x == types.float32:
        return lambda x: HALF32 * _tanh32(HALF32 * x) + HALF32
    return lambda x: 1.0 / (1.0 + math.exp(-x))


@numba.njit(**JIT)
def mm_nt(a, n, w, out, j0, j1, acc):
    """out[:n, j0:j1] (+)= a[:n, :] @ w[j0:j1, :].T  (``acc``: accumulate into out).

    Register-blocked 4 rows of ``w`` x 4 rows of ``a``; the inner loop over K vectorizes. One row (batch 1)
    is its own copy of the code, compiled for n = 1: with n only known at run time the batch-1 product took
    ~1.6x as long (an LSTM step at H64, benchmarks/NOTES.md, seventeenth session).
    """
    if n == 1:
        _mm_nt(a, 1, w, out, j0, j1, acc)
    else:
        _mm_nt(a, n, w, out, j0, j1, acc)


@numba.njit(**JIT)
def _mm_nt(a, n, w, out, j0, j1, acc):
    """``mm_nt``'s code."""
    K = w.shape[1]
    zero = a.dtype.type(0)
    j = j0
    while j + 4 <= j1:
        b = 0
        while b + 4 <= n:
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = zero
            a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = zero
            for k in range(K):
                w0 = w[j, k]
                w1 = w[j + 1, k]
                w2 = w[j + 2, k]
                w3 = w[j + 3, k]
                x0 = a[b, k]
                x1 = a[b + 1, k]
                x2 = a[b + 2, k]
                x3 = a[b + 3, k]
                a00 += w0 * x0
                a01 += w1 * x0
                a02 += w2 * x0
                a03 += w3 * x0
                a10 += w0 * x1
                a11 += w1 * x1
                a12 += w2 * x1
                a13 += w3 * x1
                a20 += w0 * x2
                a21 += w1 * x2
                a22 += w2 * x2
                a23 += w3 * x2
                a30 += w0 * x3
                a31 += w1 * x3
                a32 += w2 * x3
                a33 += w3 * x3
            if acc:
                out[b, j] += a00
                out[b, j + 1] += a01
                out[b, j + 2] += a02
                out[b, j + 3] += a03
                out[b + 1, j] += a10
                out[b + 1, j + 1] += a11
                out[b + 1, j + 2] += a12
                out[b + 1, j + 3] += a13
                out[b + 2, j] += a20
                out[b + 2, j + 1] += a21
                out[b + 2, j + 2] += a22
                out[b + 2, j + 3] += a23
                out[b + 3, j] += a30
                out[b + 3, j + 1] += a31
                out[b + 3, j + 2] += a32
                out[b + 3, j + 3] += a33
            else:
                out[b, j] = a00
                out[b, j + 1] = a01
                out[b, j + 2] = a02
                out[b, j + 3] = a03
                out[b + 1, j] = a10
                out[b + 1, j + 1] = a11
                out[b + 1, j + 2] = a12
                out[b + 1, j + 3] = a13
                out[b + 2, j] = a20
                out[b + 2, j + 1] = a21
                out[b + 2, j + 2] = a22
                out[b + 2, j + 3] = a23
                out[b + 3, j] = a30
                out[b + 3, j + 1] = a31
                out[b + 3, j + 2] = a32
                out[b + 3, j + 3] = a33
            b += 4
        while b < n:
            s0 = s1 = s2 = s3 = zero
            for k in range(K):
                x = a[b, k]
                s0 += w[j, k] * x
                s1 += w[j + 1, k] * x
                s2 += w[j + 2, k] * x
                s3 += w[j + 3, k] * x
            if acc:
                out[b, j] += s0
                out[b, j + 1] += s1
                out[b, j + 2] += s2
                out[b, j + 3] += s3
            else:
                out[b, j] = s0
                out[b, j + 1] = s1
                out[b, j + 2] = s2
                out[b, j + 3] = s3
            b += 1
        j += 4
    while j < j1:
        for b in range(n):
            s = zero
            for k in range(K):
                s += w[j, k] * a[b, k]
            if acc:
                out[b, j] += s
            else:
                out[b, j] = s
        j += 1


@numba.njit(**JIT)
def split(total, parts, p):
    """[lo, hi) of part p when ``total`` units are split in ``parts`` (boundaries on multiples of 16)."""
    chunk = ((total + parts - 1) // parts + 15) // 16 * 16
    lo = min(total, p * chunk)
    hi = min(total, lo + chunk)
    return lo, hi


@numba.njit(**JIT)
def row_block(total, parts, p):
    """[lo, hi) of part p when a batch of ``total`` rows is split in ``parts`` (the split by rows)."""
    chunk = (total + parts - 1) // parts
    lo = min(total, p * chunk)
    return lo, min(total, lo + chunk)


@numba.njit(**JIT)
def row_block_state(h0, parts, p):
    """Part p of a batch split by rows: its rows [r0, r1) and its two state buffers (the ``*_fwd_rows``
    kernels' double buffer), the first holding h0's rows."""
    r0, r1 = row_block(h0.shape[0], parts, p)
    h_a, h_b = lines((r1 - r0, h0.shape[1]), h0.dtype), lines((r1 - r0, h0.shape[1]), h0.dtype)
    h_a[:, :] = h0[r0:r1]
    return r0, r1, h_a, h_b


@numba.njit(**JIT)
def first_step(reverse, t, T, b, sizes):
    """Is step t the first one row b takes (its state comes from h0/c0)?"""
    if not reverse:
        return t == 0
    return t == T - 1 or b >= sizes[t + 1]


@numba.njit(**JIT)
def prev_t(reverse, t):
    return t + 1 if reverse else t - 1


@numba.njit(**JIT)
def final_h(y, sizes, reverse, h_n):
    """h_n[b] = the output of row b's last step: y[len_b - 1, b], or y[0, b] in reverse."""
    T, B = y.shape[0], y.shape[1]
    for b in range(B):
        last = 0 if reverse else T - 1
        if not reverse:
            while sizes[last] <= b:
                last -= 1
        h_n[b, :] = y[last, b, :]


@numba.njit(**JIT)
def call_sizes(a_sizes, T, B):
    """The rows of each step of an entry by address: the packed sequence's batch sizes at ``a_sizes``
    (int64 [T]), or B at every step of a dense one (``a_sizes`` 0)."""
    return at(a_sizes, (T,), np.empty(0, np.int64)) if a_sizes else np.full(T, B, np.int64)


@numba.njit(**JIT)
def row_offsets(sizes):
    """The first row of each step in a sequence's rows laid out step after step (the padded layout's T x B
    rows, sizes all B, or a PackedSequence's rows, sizes its batch sizes)."""
    offs = np.empty(sizes.shape[0], np.int64)
    r = 0
    for t in range(sizes.shape[0]):
        offs[t] = r
        r += sizes[t]
    return offs


@numba.njit(**JIT)
def final_rows(y, sizes, offs, reverse, h_n):
    """``final_h`` for an output laid out as rows (``row_offsets``): h_n[b] = row b of its last step."""
    T = sizes.shape[0]
    for b in range(h_n.shape[0]):
        last = 0 if reverse else T - 1
        if not reverse:
            while sizes[last] <= b:
                last -= 1
        h_n[b, :] = y[offs[last] + b, :]


@numba.njit(**JIT)
def fill_h_prev(t, r0, r1, reverse, sizes, offs, h0, y, h_prev, lo, hi):
    """The recurrent input of step t for rows [r0, r1) (all of a step's rows, or a block of the split by
    rows), columns [lo, hi) (all, or a part's of a team's backward): h0 at a row's first step, else its output of
    the step before. y and h_prev as rows (step t's from row offs[t]: ``row_offsets``)."""
    T = sizes.shape[0]
    tp = prev_t(reverse, t)
    o = offs[t]
    for b in range(r0, r1):
        if first_step(reverse, t, T, b, sizes):
            copy_units(h_prev, o + b, h0, b, lo, hi)
        else:
            copy_units(h_prev, o + b, y, offs[tp] + b, lo, hi)


@numba.njit(**JIT)
def project_units(x, n, w_ih, b_ih, xw, j0, j1):
    """xw[:n, j0:j1] = x[:n] @ w_ih[j0:j1].T (+ b_ih[j0:j1]): a cell's input projection, columns j0..j1."""
    mm_nt(x, n, w_ih, xw, j0, j1, False)
    if b_ih.shape[0] > 0:
        bb = b_ih[j0:j1]
        m = j1 - j0
        for b in range(n):
            row = xw[b, j0:j1]
            for u in range(m):
                row[u] += bb[u]


@intrinsic
def _pointer(typingctx, addr, like):
    """The integer ``addr`` as a pointer to elements of ``like``'s dtype."""
    if not isinstance(addr, types.Integer) or not isinstance(like, types.Array):
        return None
    sig = types.CPointer(like.dtype)(addr, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return sig, codegen


@numba.njit(**JIT)
def at(addr, shape, like):
    """The C-contiguous array of ``shape`` whose data starts at ``addr`` (a tensor's data_ptr()), of
    ``like``'s dtype. The fused cells take their tensors this way: a tensor's numpy view costs ~2 us, as
    much as a cell's whole kernel at batch 1 (benchmarks/NOTES.md, "numba's cells by address")."""
    return numba.carray(_pointer(addr, like), shape)


def vec(a, row, start, m):
    """Elements [start, start + m) of row ``row`` of ``a`` (2-D; ``row`` ignored for 1-D ``a``) as a 1-D array.
    For a C-contiguous ``a`` the array has no owner (numba.carray at the address; ``a`` keeps the data alive):
    no bounds logic and, unlike a slice, no reference count, an atomic operation on ``a``'s owner at each view
    and another at its end. The pointwise passes make a dozen views a row a step; as slices they cost an LSTM
    H64 step at batch 1 ~20% (benchmarks/NOTES.md, thirty-first session). Each is a pointer of its own to LLVM,
    as a slice is, so the loops over them still vectorize. Other layouts: the slice."""


@overload(vec, jit_options=dict(fastmath=FM, error_model="numpy"))
def _ol_vec(a, row, start, m):
    if not isinstance(a, types.Array) or a.ndim not in (1, 2):
        return None
    if a.layout == "C":
        if a.ndim == 1:
            return lambda a, row, start, m: at(a.ctypes.data + start * a.itemsize, (m,), a)
        return lambda a, row, start, m: at(a.ctypes.data + (row * a.shape[1] + start) * a.itemsize, (m,), a)
    if a.ndim == 1:
        return lambda a, row, start, m: a[start:start + m]
    return lambda a, row, start, m: a[row, start:start + m]


@numba.njit(**JIT)
def copy_units(dst, dr, src, sr, lo, hi):
    """dst[dr, lo:hi] = src[sr, lo:hi] through ``vec``."""
    d, s = vec(dst, dr, lo, hi - lo), vec(src, sr, lo, hi - lo)
    for u in range(hi - lo):
        d[u] = s[u]


@numba.njit(**JIT)
def lines(shape, dt):
    """An uninitialized C-contiguous array of ``shape`` and dtype ``dt`` whose data starts on a 64-byte cache
    line (numba's np.empty aligns to 32 bytes). The teams' parts write blocks of 16 units of every row of the
    state and workspace buffers: with rows that start on a line, no line holds two parts' units, so no line
    goes back and forth between the workers at each step."""
    n = 1
    for d in shape:
        n *= d
    size = np.empty(0, dt).itemsize
    buf = np.empty(n + 64 // size, dt)
    off = (-(buf.ctypes.data // size)) % (64 // size)
    return buf[off:off + n].reshape(shape)


#: kernel -> its serial twin (``serial_twin``)
TWINS = {}


def serial_twin(kernel):
    """``kernel`` (a dispatcher) compiled without ``parallel``: each ``prange`` a plain loop, no parallel
    region; the kernels it calls by a global name that are ``parallel``, or that reach one through their own
    calls (a helper: ``panel.input_rows`` calls ``panel.project``), are replaced by their own twins, so that a
    twin holds no parallel code at all. Code with a parallel region that numba's disk cache loads needs numba's
    threading layer started (an entry's twin that still held ``panel.project`` crashed, loaded from the cache,
    in a process that had started no parallel kernel: twenty-ninth session), and a process forked under GNU
    OpenMP must never start it. Its own name (``<name>_one_thread``) gives it its own entry in numba's disk
    cache, so the two never load each other's code (the name was ``<name>_serial`` until the twins held
    no parallel code: a new name, so that no cache made before loads the old twins). Made once a kernel."""
    twin = TWINS.get(kernel)
    if twin is not None:
        return twin
    f = kernel.py_func
    glb = f.__globals__
    calls = {name: serial_twin(glb[name]) for name in f.__code__.co_names if _reaches_parallel(glb.get(name))}
    twin = FunctionType(f.__code__, dict(glb, **calls) if calls else glb, f.__name__ + "_one_thread",
                        f.__defaults__, f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_one_thread"
    twin.__module__ = f.__module__
    twin.__doc__ = f.__doc__
    twin = TWINS[kernel] = numba.njit(**JIT)(twin)
    return twin


def _reaches_parallel(fn, seen=None):
    """Whether ``fn`` is a numba dispatcher compiled with ``parallel`` or calls one by a global name, directly
    or through other dispatchers."""
    if not isinstance(fn, numba.core.registry.CPUDispatcher):
        return False
    if fn.targetoptions.get("parallel"):
        return True
    seen = set() if seen is None else seen
    if fn in seen:
        return False
    seen.add(fn)
    glb = fn.py_func.__globals__
    return any(_reaches_parallel(glb.get(name), seen) for name in fn.py_func.__code__.co_names)
