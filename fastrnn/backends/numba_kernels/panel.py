"""A GEMM on packed panels with explicit vectors, for the products numba's loops do not vectorize well.

``mm_nt`` (common.py) computes dot products along K and reduces each at the end: ~55-90 GFLOP/s a core
here. This one keeps W^T in panels of one vector's width (64 bytes: 16 float32 or 8 float64 columns, k-major,
``pack``) and for a block of MR rows of ``a`` and NV panels keeps MR x NV vector accumulators in registers:
each k loads NV vectors of the panels and broadcasts MR elements of ``a``, with no reduction at the end
(~110-116 GFLOP/s a core at 4 rows and more, 1.2-2x ``mm_nt``; benchmarks/NOTES.md, twenty-eighth
session). The vectors are LLVM's generic ones, so the same code runs on AVX2 (two halves a vector) and
AVX-512 alike; numba's disk cache is per CPU. Panels and scratch start on a 64-byte line (``lines``): from
numba's np.empty, 32 bytes off most of the time, each vector load of a panel took two lines (0.99-1.03x the
aligned product's time; benchmarks/NOTES.md, thirty-fourth session).
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .common import JIT, at, lines, mm_nt


def _panels_a_block():
    """NV, the panels of a block of MR rows: 4 where numba compiles for AVX-512 (4 x 4 accumulators of 64 bytes, 16
    of its 32 registers), else 1. On AVX2 each 64-byte accumulator takes two of its 16 ymm registers, and 4 x 4
    spilled: one core of a Zen 3, 12 rows x 8 panels of K 256, 4 x 4 32.9 GFLOP/s, 4 x 1 55.1 (benchmarks/NOTES.md,
    thirty-fifth session). numba compiles for the host CPU unless NUMBA_CPU_NAME names one; its disk cache is per
    CPU."""
    if numba.config.CPU_NAME:
        return 4 if "+avx512f" in (numba.config.CPU_FEATURES or "") else 1
    import llvmlite.binding as ll
    return 4 if ll.get_host_cpu_features().get("avx512f", False) else 1


#: rows of ``a`` and panels a microkernel keeps in registers: 4 x 4 vectors with AVX-512, 4 x 1 without
MR, NV = 4, _panels_a_block()


def _microkernel(mr, nv, ng=1):
    """The intrinsic ``mk(a, a0, lda, wp, w0, K, bias, b0, init, out, o0, ldo, gs, os)``: for r < mr, g < ng and
    v < nv, out[o0 + r*ldo + g*os + v*L : +L] = I + sum over k < K of a[a0 + r*lda + k] * wp[w0 + g*gs +
    (v*K + k)*L : +L], with I 0 (``init`` 0 or False), bias[b0 + g*os + v*L : +L] (1 or True) or what out held
    there (2: accumulate), and L a vector's lanes; ng > 1: ng groups of nv panels, gs elements apart in wp and
    os in out (a step's gates at one row: ``gate_products``); offsets in elements from each
    C-contiguous array's first element, whatever its shape, full vectors stored (the caller makes room). The
    arrays are taken whole, never sliced or reshaped on the way: each view numba makes costs an atomic
    reference count on the array, which the two workers of a team then pass back and forth every step
    (that made the team slower than one thread at H64; benchmarks/NOTES.md, twenty-eighth session)."""

    @intrinsic
    def mk(typingctx, a, a0, lda, wp, w0, K, bias, b0, init, out, o0, ldo, gs, os):
        dt = wp.dtype
        arrays = (a, wp, bias, out)
        if dt not in (types.float32, types.float64) or any(t.dtype != dt or t.layout != "C" for t in arrays):
            return None  # offsets are counted in elements from the first: C-contiguous arrays of one dtype only
        sig = types.void(a, a0, lda, wp, w0, K, bias, b0, init, out, o0, ldo, gs, os)

        def codegen(context, builder, signature, args):
            ty = signature.args
            data = [context.make_array(ty[i])(context, builder, args[i]).data for i in (0, 3, 6, 9)]
            A, W, Bias, O = data
            a0v, lda_, w0v, Kv, b0v, o0v, ldo_, gsv, osv = (context.cast(builder, args[i], ty[i], types.intp)
                                                            for i in (1, 2, 4, 5, 7, 10, 11, 12, 13))
            # the (group, panel) pairs, each an accumulator a row: its panel's offset in wp, its columns' in out
            cols = [(g, v) for g in range(ng) for v in range(nv)]
            n = len(cols)
            elt = context.get_value_type(dt)
            size = context.get_abi_sizeof(elt)
            lanes = 64 // size
            vty = ir.VectorType(elt, lanes)
            vptr = vty.as_pointer()
            i32 = ir.IntType(32)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                                 f"llvm.fma.v{lanes}{'f32' if dt == types.float32 else 'f64'}")

            def c(n):
                return context.get_constant(types.intp, n)

            def vload(base, i):
                return builder.load(builder.bitcast(builder.gep(base, [i]), vptr), align=size)

            mode = context.cast(builder, args[8], ty[8], types.intp)

            def col(g, v):  # a pair's first column, from out's (or bias's) first element of the row
                return builder.add(builder.mul(c(g), osv), c(v * lanes))

            init = [cgutils.alloca_once_value(builder, ir.Constant(vty, None)) for _ in range(n)]
            with builder.if_then(builder.icmp_signed("==", mode, c(1))):
                for i, (g, v) in enumerate(cols):
                    builder.store(vload(Bias, builder.add(b0v, col(g, v))), init[i])
            acc = [[cgutils.alloca_once_value(builder, builder.load(init[i])) for i in range(n)] for _ in range(mr)]
            for r in range(mr):
                for i in range(n):
                    builder.store(builder.load(init[i]), acc[r][i])
            with builder.if_then(builder.icmp_signed("==", mode, c(2))):
                for r in range(mr):
                    row = builder.add(o0v, builder.mul(c(r), ldo_))
                    for i, (g, v) in enumerate(cols):
                        builder.store(vload(O, builder.add(row, col(g, v))), acc[r][i])
            panel = builder.mul(Kv, c(lanes))
            starts = [builder.add(builder.mul(c(g), gsv), builder.mul(c(v), panel)) for g, v in cols]
            with cgutils.for_range(builder, Kv) as loop:
                k = loop.index
                wk = builder.add(w0v, builder.mul(k, c(lanes)))
                ws = [vload(W, builder.add(wk, st)) for st in starts]
                for r in range(mr):
                    x = builder.load(builder.gep(A, [builder.add(builder.add(a0v, builder.mul(c(r), lda_)), k)]))
                    s = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(i32, 0))
                    s = builder.shuffle_vector(s, ir.Constant(vty, ir.Undefined),
                                               ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))
                    for i in range(n):
                        builder.store(builder.call(fma, [s, ws[i], builder.load(acc[r][i])]), acc[r][i])
            for r in range(mr):
                row = builder.add(o0v, builder.mul(c(r), ldo_))
                for i, (g, v) in enumerate(cols):
                    p = builder.bitcast(builder.gep(O, [builder.add(row, col(g, v))]), vptr)
                    builder.store(builder.load(acc[r][i]), p, align=size)
            return context.get_dummy_value()

        return sig, codegen

    return mk


# four variants (MR 4 / 1 x NV 4 / 1; without AVX-512 NV is 1 and they are two): the eight of NV 1-4 compiled ~2 s
# longer on numba's first call and ran no faster measurably (benchmarks/NOTES.md, twenty-eighth session)
_mk44, _mk41, _mk14, _mk11 = (_microkernel(mr, nv) for mr, nv in ((MR, NV), (MR, 1), (1, NV), (1, 1)))
# one or two rows against one panel of each of a step's 4 or 3 gates at once (``gate_products`` below MR rows)
_mg14, _mg24, _mg13, _mg23 = (_microkernel(mr, 1, ng) for ng in (4, 3) for mr in (1, 2))
_mk21 = _microkernel(2, 1)
# two rows against one panel of each of two gates: without AVX-512 two rows against every gate at once (2 x 4
# accumulators of 64 bytes, each two of AVX2's 16 ymm registers) spilled, and a call for each pair of gates took
# 0.38-0.70x the time at H64-512 (one core of a Zen 3; benchmarks/NOTES.md, thirty-sixth session)
_mg22 = _microkernel(2, 1, 2)
# one gate (the RNN) below MR rows, one or two rows against 4 or 2 panels a call: with AVX-512 4 (NV); without it
# a panel a call left one chain of FMAs in an accumulator waiting on itself, and one row against 4 panels, two
# against 2, took 0.49-0.87x the time at H64-512 (same measurement)
_mr14, _mr24, _mr12, _mr22 = (_microkernel(mr, nv) for mr, nv in ((1, 4), (2, 4), (1, 2), (2, 2)))


@numba.njit(**JIT)
def lanes_of(dt_like):
    """A vector's lanes (64 bytes) for the dtype of the array ``dt_like``."""
    return 64 // dt_like.itemsize


@numba.njit(**JIT)
def panels(cols, L):
    """How many panels of L columns hold ``cols`` columns."""
    return (cols + L - 1) // L


@numba.njit(**JIT)
def pack(w, j0, j1, wp):
    """wp[p, k, l] = w[j0 + p*L + l, k] (0 past j1): rows j0..j1 of w [N, K] as panels of W^T (wp [>= ``panels``,
    K, L], L = ``lanes_of(w)``; the panels past j1 all zeros)."""
    K = w.shape[1]
    L = wp.shape[2]
    zero = w.dtype.type(0)
    for p in range(wp.shape[0]):
        for l in range(L):
            j = j0 + p * L + l
            if j < j1:
                row = w[j]
                for k in range(K):
                    wp[p, k, l] = row[k]
            else:
                for k in range(K):
                    wp[p, k, l] = zero


@numba.njit(**JIT)
def pack_t(wt, j0, j1, wp):
    """``pack`` of W given as its transpose wt [K, N] (wp[p, k, l] = wt[k, j0 + p*L + l]; 0 past j1): a product
    with B' = wt as it lies (``project``'s ``wt``), each k a contiguous run of wt's row."""
    K = wt.shape[0]
    L = wp.shape[2]
    zero = wt.dtype.type(0)
    for p in range(wp.shape[0]):
        c0 = j0 + p * L
        m = min(L, max(0, j1 - c0))
        for k in range(K):
            row = wt[k]
            for l in range(m):
                wp[p, k, l] = row[c0 + l]
            for l in range(m, L):
                wp[p, k, l] = zero


@numba.njit(**JIT)
def _group(nv, n, a, a0, lda, wp, w0, K, bias, b0, has_b, out, o0, ldo):
    """Rows [0, n) of a (from element a0) against NV panels from w0 (``nv`` == NV), or one (``nv`` == 1): blocks
    of MR rows, then one at a time (``has_b``: the microkernel's ``init``)."""
    r = 0
    while r + MR <= n:
        if nv == NV:
            _mk44(a, a0 + r * lda, lda, wp, w0, K, bias, b0, has_b, out, o0 + r * ldo, ldo, 0, 0)
        else:
            _mk41(a, a0 + r * lda, lda, wp, w0, K, bias, b0, has_b, out, o0 + r * ldo, ldo, 0, 0)
        r += MR
    while r < n:
        if nv == NV:
            _mk14(a, a0 + r * lda, lda, wp, w0, K, bias, b0, has_b, out, o0 + r * ldo, ldo, 0, 0)
        else:
            _mk11(a, a0 + r * lda, lda, wp, w0, K, bias, b0, has_b, out, o0 + r * ldo, ldo, 0, 0)
        r += 1


@numba.njit(**JIT)
def mm_panels(a, n, wp, w0, bias, has_b, out, c0, cols, tmp):
    """out[:n, c0:c0 + cols] = a[:n] @ W^T (+ bias[c0:c0 + cols] where ``has_b``): ``mm_panels_at`` from a's
    and out's first rows."""
    mm_panels_at(a, 0, n, wp, w0, bias, has_b, out, 0, c0, cols, tmp)


@numba.njit(**JIT)
def mm_panels_at(a, a0, n, wp, w0, bias, init, out, r0, c0, cols, tmp):
    """out[r0:r0 + n, c0:c0 + cols] = (0, bias[c0:c0 + cols], or out's own values: ``init`` 0, 1 or 2, as the
    microkernel's) + rows [0, n) of a (its row 0 from element a0) @ W^T, with W^T's columns c0.. packed by
    ``pack``, from element w0 of wp (wp [.., K, L]: K and L its last two dimensions). a [.., K] and out [.., >=
    c0 + cols] C-contiguous, taken whole (no views: see ``_microkernel``); tmp ``scratch`` (a last panel wider
    than what is left of the columns goes through it; its bias, padded, too). Groups of NV panels, then the
    1-3 whole panels left, then the part one."""
    K = wp.shape[wp.ndim - 2]
    L = lanes_of(wp)  # a constant for the dtype: the divisions below compile to shifts
    lda, ldo = a.shape[a.ndim - 1], out.shape[out.ndim - 1]
    o0 = r0 * ldo
    whole = cols // L
    p = 0
    while p < whole:
        nv = NV if p + NV <= whole else 1
        _group(nv, n, a, a0, lda, wp, w0 + p * K * L, K, bias, c0 + p * L, init, out, o0 + c0 + p * L, ldo)
        p += nv
    m = cols - whole * L
    if m:  # the last, part panel: through tmp (MR rows, then a vector of its bias)
        c1 = c0 + whole * L
        if init == 1:
            for i in range(L):
                tmp[MR * L + i] = bias[c1 + i] if i < m else tmp.dtype.type(0)
        r = 0
        while r < n:
            k = min(MR, n - r)
            if init == 2:
                for i in range(k):
                    for j in range(L):
                        tmp[i * L + j] = out[r0 + r + i, c1 + j] if j < m else tmp.dtype.type(0)
            _group(1, k, a, a0 + r * lda, lda, wp, w0 + whole * K * L, K, tmp, MR * L, init, tmp, 0, L)
            for i in range(k):
                for j in range(m):
                    out[r0 + r + i, c1 + j] = tmp[i * L + j]
            r += k


@numba.njit(**JIT)
def _project_part(x, w, bias, xw, p, parts, wt):
    """Part p of ``project``: its whole groups of panels of columns, with its own rows of w packed."""
    rows, N = xw.shape
    L = lanes_of(w)
    step = NV * L
    groups = (N + step - 1) // step
    c0 = groups * p // parts * step
    c1 = min(N, groups * (p + 1) // parts * step)
    if c1 > c0:
        K = x.shape[1]
        wp = lines((panels(c1 - c0, L), K, L), w.dtype)
        if wt:
            pack_t(w, c0, c1, wp)
        else:
            pack(w, c0, c1, wp)
        mm_panels(x, rows, wp, 0, bias, bias.shape[0] > 0, xw, c0, c1 - c0, scratch(w))


@numba.njit(parallel=True, **JIT)
def project(x, w, bias, xw, parts, wt=False):
    """xw = x @ w.T (+ bias): a sequence's input projection (x [rows, I], w [N, I], xw [rows, N]), split over
    ``parts`` threads by columns; ``wt``: w given as its transpose, [I, N] (xw = x @ w: the backend's ``mm``)."""
    for p in prange(parts):
        _project_part(x, w, bias, xw, p, parts, wt)


@numba.njit(**JIT)
def input_rows(a_x, a_w_ih, a_b_ih, rows, I, N, parts, like):
    """The input projection [rows, N] a by-address sequence entry runs on (lstm.lstm_seq_at): the matrix at
    ``a_x`` when ``a_w_ih`` is 0 (the host projected), else x [rows, I] at ``a_x`` projected here (w_ih at
    ``a_w_ih``, b_ih at ``a_b_ih`` or 0), over ``parts`` of numba's threads, the team's: torch's product between
    numba's regions ran on torch's threads, whose spinning after it held up the team's start (1.07-1.17x a
    call; benchmarks/NOTES.md, twenty-eighth session). One part runs without a parallel region."""
    if not a_w_ih:
        return at(a_x, (rows, N), like)
    xw = lines((rows, N), like.dtype)
    x, w, b = at(a_x, (rows, I), like), at(a_w_ih, (N, I), like), at(a_b_ih, (N if a_b_ih else 0,), like)
    if parts > 1:
        project(x, w, b, xw, parts, False)
    else:
        _project_part(x, w, b, xw, 0, 1, False)
    return xw


@numba.njit(**JIT)
def pack_gates(w_hh, G, H):
    """W_hh [G*H, K] as panels, gate by gate: [G, ceil(H / L), K, L], panel p of gate g holding rows
    g*H + p*L .. + L (zeros past H), so that a part of units [lo, hi) with lo a multiple of L finds its rows
    from panel lo / L (``gate_products``)."""
    L = lanes_of(w_hh)
    wp = lines((G, panels(H, L), w_hh.shape[1], L), w_hh.dtype)
    for g in range(G):
        pack(w_hh, g * H, g * H + H, wp[g])
    return wp


@numba.njit(**JIT)
def no_panels(like):
    """The empty panels that make ``gate_products`` run ``mm_nt``."""
    return np.empty((0, 0, 0, 0), like.dtype)


# inline="always" (here, in _gates_rows and row_gate_products): a call between compiled functions takes a
# reference on each array it passes and drops it on return (NRT_incref / NRT_decref, atomic), ~25-55 ns a call
# layer; a step's product at one row and H64 took 165 ns through the three calls, 82 inlined (74 the bare
# microkernel; benchmarks/NOTES.md, thirty-second session)
@numba.njit(inline="always", **JIT)
def gate_products(src, n, w_hh, wp, out, r0, G, H, lo, hi, tmp):
    """out[r0:r0 + n, g*H + lo : g*H + hi] = src[:n] @ W_hh[g*H + lo : g*H + hi]^T for each gate g < G: a step's
    recurrent products for units [lo, hi) (lo a multiple of 16), on W_hh's panels (``pack_gates``; tmp
    ``scratch``; below MR rows every gate at once, ``row_gate_products``) or, where ``wp`` is empty, with
    ``mm_nt``. Rows of out outside [r0, r0 + n) are not written."""
    if wp.shape[0] == 0:
        o = out[r0:r0 + n]
        for g in range(G):
            mm_nt(src, n, w_hh, o, g * H + lo, g * H + hi, False)
        return
    if n < MR:
        row_gate_products(src, n, wp, out, r0, G, H, lo, hi, tmp)
        return
    L, K = lanes_of(wp), wp.shape[2]
    for g in range(G):
        mm_panels_at(src, 0, n, wp, (g * wp.shape[1] + lo // L) * K * L, tmp, False, out, r0, g * H + lo, hi - lo,
                     tmp)


@numba.njit(inline="always", **JIT)
def _gates_rows(G, nv, mr, a, a0, lda, wp, w0, gs, K, out, o0, ldo, os, tmp):
    """``mr`` (1 or 2) rows of ``a`` (from element a0, lda apart) against panels w0.. (nv: 1 panel of each of G = 4
    or 3 gates, gs elements apart in wp, or 4, 2 or 1 of one gate), into out from element o0 (rows ldo apart, gate
    g's columns os on): one microkernel call (two for two rows of several gates without AVX-512)."""
    if G > 1 and mr == 2 and NV == 1:  # no AVX-512: two gates a call (``_mg22``)
        _mg22(a, a0, lda, wp, w0, K, tmp, 0, 0, out, o0, ldo, gs, os)
        if G == 4:
            _mg22(a, a0, lda, wp, w0 + 2 * gs, K, tmp, 0, 0, out, o0 + 2 * os, ldo, gs, os)
        else:
            _mk21(a, a0, lda, wp, w0 + 2 * gs, K, tmp, 0, 0, out, o0 + 2 * os, ldo, 0, 0)
    elif G == 4:
        if mr == 2:
            _mg24(a, a0, lda, wp, w0, K, tmp, 0, 0, out, o0, ldo, gs, os)
        else:
            _mg14(a, a0, lda, wp, w0, K, tmp, 0, 0, out, o0, ldo, gs, os)
    elif G == 3:
        if mr == 2:
            _mg23(a, a0, lda, wp, w0, K, tmp, 0, 0, out, o0, ldo, gs, os)
        else:
            _mg13(a, a0, lda, wp, w0, K, tmp, 0, 0, out, o0, ldo, gs, os)
    elif nv == 4:
        if mr == 2:
            _mr24(a, a0, lda, wp, w0, K, tmp, 0, 0, out, o0, ldo, 0, 0)
        else:
            _mr14(a, a0, lda, wp, w0, K, tmp, 0, 0, out, o0, ldo, 0, 0)
    elif nv == 2:
        if mr == 2:
            _mr22(a, a0, lda, wp, w0, K, tmp, 0, 0, out, o0, ldo, 0, 0)
        else:
            _mr12(a, a0, lda, wp, w0, K, tmp, 0, 0, out, o0, ldo, 0, 0)
    elif mr == 2:
        _mk21(a, a0, lda, wp, w0, K, tmp, 0, 0, out, o0, ldo, 0, 0)
    else:
        _mk11(a, a0, lda, wp, w0, K, tmp, 0, 0, out, o0, ldo, 0, 0)


@numba.njit(inline="always", **JIT)
def row_gate_products(src, n, wp, out, r0, G, H, lo, hi, tmp):
    """``gate_products`` on panels for fewer than MR rows: panel by panel, each panel of every gate in one
    microkernel call for two rows or one (one gate: NV panels at once; without AVX-512 4 for one row, 2 for two),
    the part panel at the end per gate.
    A call a gate kept a step's few chains of FMAs waiting on each other; at one row and H64 the LSTM's products
    took ~2x as long that way or by ``mm_nt``, 1.2-1.5x at H256 (benchmarks/NOTES.md, thirty-first session)."""
    L, K = lanes_of(wp), wp.shape[2]
    gs = wp.shape[1] * K * L
    lda, ldo = src.shape[1], out.shape[1]
    q0, q1 = lo // L, hi // L
    q = q0
    while q < q1:
        nv = 1
        if G == 1:  # several panels a call (without AVX-512: 4 for one row, else 2; ``_mr14``)
            nv = NV if NV > 1 else (4 if n == 1 else 2)
            if q + nv > q1:
                nv = 1
        r = 0
        while r < n:
            mr = 2 if r + 2 <= n else 1
            _gates_rows(G, nv, mr, src, r * lda, lda, wp, q * K * L, gs, K, out, (r0 + r) * ldo + q * L, ldo, H, tmp)
            r += mr
        q += nv
    if hi > q1 * L:
        for g in range(G):
            mm_panels_at(src, 0, n, wp, (g * wp.shape[1] + q1) * K * L, tmp, False, out, r0, g * H + q1 * L,
                         hi - q1 * L, tmp)


@numba.njit(**JIT)
def row_panels(w, rows, min_rows):
    """Every row of w [N, K] as panels of W^T (``pack``: [ceil(N / L), K, L]) for a call's products of ``rows``
    rows each (a backward's steps, ``back_products``), or none (``mm_nt``) below ``min_rows`` or MR rows (< 0:
    never): at one row the panels lost to ``mm_nt`` (L2-bound either way). One core, the steps' shapes, GFLOP/s, mm_nt /
    panels: 8 x 1024 x 256 108 / 176, 16 x 1024 x 256 126 / 210, 64 x 2048 x 512 137 / 236 on the Zen 5
    (benchmarks/NOTES.md, twenty-ninth session)."""
    L = lanes_of(w)
    if min_rows < 0 or rows < max(min_rows, MR):
        return np.empty((0, 0, L), w.dtype)
    wp = lines((panels(w.shape[0], L), w.shape[1], L), w.dtype)
    pack(w, 0, w.shape[0], wp)
    return wp


@numba.njit(**JIT)
def back_products(a, a0, n, w, wp, out, r0, lo, hi, acc, tmp):
    """out[r0:r0 + n, lo:hi] = (or += where ``acc``) n rows of a [.., K] from element a0 (a row's first)
    @ w[lo:hi]^T (w [N, K]): a backward step's product on w's panels (``row_panels``; lo a multiple of 16; tmp
    ``scratch``), or where ``wp`` is empty with ``mm_nt``."""
    if wp.shape[0] > 0:
        K, L = wp.shape[1], lanes_of(wp)
        mm_panels_at(a, a0, n, wp, (lo // L) * K * L, tmp, 2 if acc else 0, out, r0, lo, hi - lo, tmp)
    else:
        first = a0 // a.shape[1]
        mm_nt(a[first:first + n], n, w, out[r0:r0 + n], lo, hi, acc)


@numba.njit(**JIT)
def scratch(like):
    """``mm_panels``' scratch: MR + 1 vectors."""
    return lines(((MR + 1) * lanes_of(like),), like.dtype)


#: the most columns of W_hh (K) the steps' products take on panels from MR rows: a group of NV panels is NV x K
#: vectors, which every block of MR rows reads again; with AVX-512 (NV 4), past a core's L1 at K = 512 (128 KiB
#: in float32) the product read it from L2 and lost to ``mm_nt`` (RNN B64 H512: 0.92x). Without it (NV 1, K
#: vectors) no limit: one core of a Zen 3, 4-64 rows, K 512-2048, the panels ran 1.3-1.9x ``mm_nt``, whose 4 x 4
#: block spills there (benchmarks/NOTES.md, thirty-sixth session)
PANEL_MAX_K = 256 if NV > 1 else 1 << 62


@numba.njit(**JIT)
def step_panels(w_hh, G, H, B, T, like, min_rows, parts, by_rows):
    """W_hh's panels for a sequence's steps (``pack_gates``), or none (``mm_nt``): from ``min_rows`` rows a step
    (< 0: never; 4 keeps ``mm_nt`` below MR rows, as before the row kernels) and two steps (packing reads W_hh
    once, which the steps pay back) and K up to PANEL_MAX_K. Below MR rows always (``row_gate_products``, 1.2-2.7x
    ``mm_nt`` from H64 to H256, any split; at H512 0.85-0.95x at one or three rows: benchmarks/NOTES.md,
    thirty-first session); from MR rows on one thread, split by rows, or split by units where a part has at least
    64 units. Measured at T100
    (benchmarks/NOTES.md, twenty-eighth session): one thread 1.2-1.4x from B4, by rows 1.25-1.3x; by units 1.2x
    at 64 units a part (H128, H256), 0.8x at 32 (H64).
    """
    if min_rows < 0 or B < min_rows or T < 2 or w_hh.shape[1] > PANEL_MAX_K:
        return no_panels(like)
    if B < MR:  # ``row_gate_products``
        return pack_gates(w_hh, G, H)
    if parts > 1 and not by_rows and H < 64 * parts:
        return no_panels(like)
    return pack_gates(w_hh, G, H)
