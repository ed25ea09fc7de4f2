"""Elman RNN kernels (tanh or relu). No workspace: the backward needs only each step's output y."""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .common import (JIT, at, call_sizes, fill_h_prev, final_rows, lines, mm_nt,
                     project_units, row_block, row_block_state, row_offsets, split, tanh_, vec)
from .panel import back_products, gate_products, input_rows, row_panels, scratch, step_panels
from .team import team_claim, team_done, team_next, team_sync


@numba.njit(**JIT)
def _pointwise_fwd(r0, n, lo, hi, xw, b_hh, relu, dst, y, y0):
    """Units [lo, hi) of rows [0, n): the step's input projection rows r0 .. r0 + n of xw added, the
    nonlinearity, into dst and rows y0 .. y0 + n of y. No views: indices as unsigned integers (numba checks a
    signed index for wrap-around, which keeps LLVM from vectorizing the loop), so that the step makes no
    reference count (each view costs one: twenty-ninth session)."""
    has_b = b_hh.shape[0] > 0
    zero = xw.dtype.type(0)
    for b in range(n):
        rx, ry = np.uintp(r0 + b), np.uintp(y0 + b)
        bb = np.uintp(b)
        for j in range(lo, hi):
            u = np.uintp(j)
            v = dst[bb, u] + xw[rx, u]
            if has_b:
                v += b_hh[u]
            if relu:
                # as torch.relu: NaN fails the comparison and passes through, -inf gives 0
                v = zero if v < 0 else v
            else:
                v = tanh_(v)
            dst[bb, u] = v
            y[ry, u] = v


@numba.njit(parallel=True, **JIT)
def rnn_fwd(xw, w_hh, b_hh, h0, sizes, offs, reverse, relu, parts, y, h_n, h_a, h_b, panel_rows):
    """Whole-sequence forward of one layer-direction, its steps split over a team of ``parts`` workers (see
    team.py): part p is a block of units, its product, pointwise pass and its columns of y. xw [rows, H] and
    y [rows, H] as rows; panel_rows as lstm.lstm_fwd's."""
    T = sizes.shape[0]
    H = h0.shape[1]
    wp = step_panels(w_hh, 1, H, h0.shape[0], T, h0, panel_rows, parts, False)
    h_a[:, :] = h0
    h_b[:, :] = h0
    sync = team_sync(parts)
    for w in prange(parts):
        if team_claim(sync, w):
            tmp = scratch(h0)
            for s in range(T):
                t = T - 1 - s if reverse else s
                n = sizes[t]
                src, dst = (h_a, h_b) if s % 2 == 0 else (h_b, h_a)
                p = team_next(sync, parts, w, s)
                while p >= 0:
                    lo, hi = split(H, parts, p)
                    gate_products(src, n, w_hh, wp, dst, 0, 1, H, lo, hi, tmp)
                    _pointwise_fwd(offs[t], n, lo, hi, xw, b_hh, relu, dst, y, offs[t])
                    team_done(sync, p, s)
                    p = team_next(sync, parts, w, s)
    final_rows(y, sizes, offs, reverse, h_n)


@numba.njit(parallel=True, **JIT)
def rnn_fwd_rows(xw, w_hh, b_hh, h0, T, reverse, relu, parts, y, h_n, panel_rows):
    """``rnn_fwd`` on a dense batch split by rows (see lstm.lstm_fwd_rows)."""
    B, H = h0.shape[0], h0.shape[1]
    wp = step_panels(w_hh, 1, H, B, T, h0, panel_rows, parts, True)
    for p in prange(parts):
        r0, r1, h_a, h_b = row_block_state(h0, parts, p)
        n = r1 - r0
        tmp = scratch(h0)
        for s in range(T):
            t = T - 1 - s if reverse else s
            src, dst = (h_a, h_b) if s % 2 == 0 else (h_b, h_a)
            gate_products(src, n, w_hh, wp, dst, 0, 1, H, 0, H, tmp)
            _pointwise_fwd(t * B + r0, n, 0, H, xw, b_hh, relu, dst, y, t * B + r0)
        h_n[r0:r1] = h_b if T % 2 == 1 else h_a


@numba.njit(**JIT)
def rnn_seq_at(a_xw, a_w_hh, a_b_hh, a_h0, a_y, a_h_n, a_sizes, T, B, H, reverse, relu, parts, by_rows, like,
               a_w_ih=0, a_b_ih=0, I=0,
               panel_rows=1):
    """``rnn_fwd`` in inference, on tensors given by address (see lstm.lstm_seq_at)."""
    sizes = call_sizes(a_sizes, T, B)
    rows = sizes.sum()
    xw = input_rows(a_xw, a_w_ih, a_b_ih, rows, I, H, parts, like)
    w_hh, b_hh = at(a_w_hh, (H, H), like), at(a_b_hh, (H if a_b_hh else 0,), like)
    h0, y, h_n = at(a_h0, (B, H), like), at(a_y, (rows, H), like), at(a_h_n, (B, H), like)
    if by_rows:
        rnn_fwd_rows(xw, w_hh, b_hh, h0, T, reverse, relu, parts, y, h_n, panel_rows)
        return
    rnn_fwd(xw, w_hh, b_hh, h0, sizes, row_offsets(sizes), reverse, relu, parts, y, h_n, lines((B, H), like.dtype),
            lines((B, H), like.dtype), panel_rows)


@numba.njit(**JIT)
def _pointwise_bwd(o, r0, r1, lo, hi, relu, dh_rec, grad_y, y, d_xw):
    """The pre-activation gradient of units [lo, hi) for rows [r0, r1) of a step whose rows start at row o of
    grad_y, y and d_xw."""
    zero, one = y.dtype.type(0), y.dtype.type(1)
    m = hi - lo
    for b in range(r0, r1):
        dr, gy, v, dx = vec(dh_rec, b, lo, m), vec(grad_y, o + b, lo, m), vec(y, o + b, lo, m), vec(d_xw, o + b, lo, m)
        if relu:
            for u in range(m):
                dx[u] = dr[u] + gy[u] if v[u] > 0 else zero  # as torch's threshold_backward
        else:
            for u in range(m):
                dx[u] = (dr[u] + gy[u]) * (one - v[u] * v[u])


@numba.njit(parallel=True, **JIT)
def rnn_bwd(grad_y, grad_h_n, w_hh_t, h0, sizes, offs, reverse, relu, parts, y, d_xw, h_prev, dh_rec, panel_rows):
    """The whole-sequence backward: d_xw, the pre-activation gradients (also for dW_hh); h_prev, each step's
    recurrent input; dh_rec ends as d_h0. w_hh_t = w_hh.T, on its panels from ``panel_rows`` rows
    (panel.row_panels). grad_y, y, d_xw and h_prev [rows, H] as rows, step t's from row offs[t] as in the
    forward. Its steps split over a team of ``parts`` workers, a phase a step (see lstm.lstm_bwd)."""
    T = sizes.shape[0]
    B, H = h0.shape[0], h0.shape[1]
    wp = row_panels(w_hh_t, B, panel_rows)
    dh_rec[:, :] = grad_h_n
    sync = team_sync(parts)
    for w in prange(parts):
        if team_claim(sync, w):
            tmp = scratch(h0)
            for s in range(T + 1):
                t = s if reverse else T - 1 - s
                tb = t - 1 if reverse else t + 1
                p = team_next(sync, parts, w, s)
                while p >= 0:
                    lo, hi = split(H, parts, p)
                    if s > 0:
                        back_products(d_xw, offs[tb] * H, sizes[tb], w_hh_t, wp, dh_rec, 0, lo, hi, False, tmp)
                    if s < T:
                        fill_h_prev(t, 0, sizes[t], reverse, sizes, offs, h0, y, h_prev, lo, hi)
                        _pointwise_bwd(offs[t], 0, sizes[t], lo, hi, relu, dh_rec, grad_y, y, d_xw)
                    team_done(sync, p, s)
                    p = team_next(sync, parts, w, s)


@numba.njit(parallel=True, **JIT)
def rnn_bwd_rows(grad_y, grad_h_n, w_hh_t, h0, sizes, offs, reverse, relu, parts, y, d_xw, h_prev, dh_rec, panel_rows):
    """``rnn_bwd`` on a dense batch split by rows, with the same arguments: part p runs every step of its
    block of rows and never waits for another."""
    T = sizes.shape[0]
    B, H = h0.shape[0], h0.shape[1]
    wp = row_panels(w_hh_t, B // parts, panel_rows)
    for p in prange(parts):
        r0, r1 = row_block(B, parts, p)
        tmp = scratch(h0)
        dh_rec[r0:r1, :] = grad_h_n[r0:r1, :]
        for s in range(T):
            t = s if reverse else T - 1 - s
            fill_h_prev(t, r0, r1, reverse, sizes, offs, h0, y, h_prev, 0, h_prev.shape[1])
            _pointwise_bwd(offs[t], r0, r1, 0, H, relu, dh_rec, grad_y, y, d_xw)
            back_products(d_xw, (offs[t] + r0) * H, r1 - r0, w_hh_t, wp, dh_rec, r0, 0, H, False, tmp)


@numba.njit(**JIT)
def _cell_units(x, w_ih, b_ih, w_hh, b_hh, h, h_out, xw, B, relu, lo, hi):
    """Units [lo, hi) of a fused cell's step (``rnn_cell``, ``rnn_cell_train``): their input projection,
    recurrent product and activation."""
    project_units(x, B, w_ih, b_ih, xw, lo, hi)
    mm_nt(h, B, w_hh, h_out, lo, hi, False)
    _pointwise_fwd(0, B, lo, hi, xw, b_hh, relu, h_out, h_out, 0)


@numba.njit(parallel=True, **JIT)
def rnn_cell(a_x, a_w_ih, a_b_ih, a_w_hh, a_b_hh, a_h, a_out, B, I, H, relu, parts, like):
    """One step of a cell in inference, input projection included (``rnn_cell_fwd``), on tensors given
    by address (``common.at``; 0: an absent bias); each of ``parts`` threads takes its own units."""
    x, w_ih, w_hh = at(a_x, (B, I), like), at(a_w_ih, (H, I), like), at(a_w_hh, (H, H), like)
    b_ih, b_hh = at(a_b_ih, (H if a_b_ih else 0,), like), at(a_b_hh, (H if a_b_hh else 0,), like)
    h, h_out = at(a_h, (B, H), like), at(a_out, (B, H), like)
    xw = lines((B, H), like.dtype)
    for p in prange(parts):
        lo, hi = split(H, parts, p)
        _cell_units(x, w_ih, b_ih, w_hh, b_hh, h, h_out, xw, B, relu, lo, hi)


@numba.njit(parallel=True, **JIT)
def rnn_cell_train(a_x, a_w_ih, a_b_ih, a_w_hh, a_b_hh, a_h, a_out, a_ws, B, I, H, relu, parts, like):
    """``rnn_cell``'s step for the one-step training node (numba.py, ``_CellTrain``), which also writes act'
    of each unit to a_ws [B, H]: 1 - h'^2, or relu's 0 where h' <= 0 (NaN passes, as torch's
    threshold_backward): the backward's factor, apart from h' (which the caller may change in place)."""
    x, w_ih, w_hh = at(a_x, (B, I), like), at(a_w_ih, (H, I), like), at(a_w_hh, (H, H), like)
    b_ih, b_hh = at(a_b_ih, (H if a_b_ih else 0,), like), at(a_b_hh, (H if a_b_hh else 0,), like)
    h, h_out, ws = at(a_h, (B, H), like), at(a_out, (B, H), like), at(a_ws, (B, H), like)
    xw = lines((B, H), like.dtype)
    one, zero = like.dtype.type(1), like.dtype.type(0)
    for p in prange(parts):
        lo, hi = split(H, parts, p)
        _cell_units(x, w_ih, b_ih, w_hh, b_hh, h, h_out, xw, B, relu, lo, hi)
        for b in range(B):
            y, d = h_out[b, lo:hi], ws[b, lo:hi]
            if relu:
                for u in range(hi - lo):
                    d[u] = zero if y[u] <= zero else one
            else:
                for u in range(hi - lo):
                    d[u] = one - y[u] * y[u]
