"""GRU kernels, torch's form: n = tanh(x_n + r * (W_hn h + b_hn)), reset applied after the product.

Workspace per step t: the activated gates r, z, n [B, 3H] and the recurrent part of the candidate,
W_hn h + b_hn [B, H] (its gradient needs it, and it cannot be merged with x_n).
"""
from __future__ import annotations

import numba
from numba import prange

from .common import (JIT, at, call_sizes, copy_units, fill_h_prev, final_rows, lines, mm_nt,
                     project_units, row_block, row_block_state, row_offsets, sigmoid_, split, tanh_, vec)
from .panel import back_products, gate_products, input_rows, row_panels, scratch, step_panels
from .team import team_claim, team_done, team_next, team_sync


@numba.njit(**JIT)
def _pointwise_fwd(r0, w0, n, lo, hi, H, xw, gates, hn_all, b_hh, src, dst):
    """Units [lo, hi) of rows [0, n), the step's input projection rows r0 .. r0 + n of xw, its raw products and
    workspace rows w0 .. w0 + n of gates [.., 3H] and hn_all [.., H] (loops over views from 0: see
    lstm._pointwise_fwd)."""
    has_b = b_hh.shape[0] > 0
    m = hi - lo
    one = xw.dtype.type(1)  # typed constant: a bare 1 would promote float32 math to float64
    for b in range(n):
        w, x = w0 + b, r0 + b
        gr, gz, gn = vec(gates, w, lo, m), vec(gates, w, H + lo, m), vec(gates, w, 2 * H + lo, m)
        xr, xz, xn = vec(xw, x, lo, m), vec(xw, x, H + lo, m), vec(xw, x, 2 * H + lo, m)
        hn = vec(hn_all, w, lo, m)
        if has_b:
            br, bz, bn = vec(b_hh, 0, lo, m), vec(b_hh, 0, H + lo, m), vec(b_hh, 0, 2 * H + lo, m)
            for u in range(m):
                gr[u] = sigmoid_(gr[u] + br[u] + xr[u])
            for u in range(m):
                gz[u] = sigmoid_(gz[u] + bz[u] + xz[u])
            for u in range(m):
                hn[u] = gn[u] + bn[u]
        else:
            for u in range(m):
                gr[u] = sigmoid_(gr[u] + xr[u])
            for u in range(m):
                gz[u] = sigmoid_(gz[u] + xz[u])
            for u in range(m):
                hn[u] = gn[u]
        for u in range(m):
            gn[u] = tanh_(xn[u] + gr[u] * hn[u])
        hs, hd = vec(src, b, lo, m), vec(dst, b, lo, m)
        for u in range(m):
            hd[u] = (one - gz[u]) * gn[u] + gz[u] * hs[u]


@numba.njit(parallel=True, **JIT)
def gru_fwd(xw, w_hh, b_hh, h0, sizes, offs, reverse, parts, y, h_n, gates, hn_all, h_a, h_b, panel_rows):
    """Whole-sequence forward of one layer-direction, its steps split over a team of ``parts`` workers
    (team.py): part p is a block of units, their gate rows of W_hh, pointwise pass and columns of y. xw
    [rows, 3H] and y [rows, H] as rows, the workspace gates [.., 3H] and hn_all [.., H] too (every step's
    rows, or one step's reused); panel_rows as lstm.lstm_fwd's."""
    T = sizes.shape[0]
    H = h0.shape[1]
    wp = step_panels(w_hh, 3, H, h0.shape[0], T, h0, panel_rows, parts, False)
    keep = gates.shape[0] == y.shape[0]
    h_a[:, :] = h0
    h_b[:, :] = h0
    sync = team_sync(parts)
    for w in prange(parts):
        if team_claim(sync, w):
            tmp = scratch(h0)
            for s in range(T):
                t = T - 1 - s if reverse else s
                n = sizes[t]
                w0 = offs[t] if keep else 0  # the step's workspace rows: every step kept, or one reused
                src, dst = (h_a, h_b) if s % 2 == 0 else (h_b, h_a)
                p = team_next(sync, parts, w, s)
                while p >= 0:
                    lo, hi = split(H, parts, p)
                    gate_products(src, n, w_hh, wp, gates, w0, 3, H, lo, hi, tmp)
                    _pointwise_fwd(offs[t], w0, n, lo, hi, H, xw, gates, hn_all, b_hh, src, dst)
                    for b in range(n):
                        copy_units(y, offs[t] + b, dst, b, lo, hi)
                    team_done(sync, p, s)
                    p = team_next(sync, parts, w, s)
    final_rows(y, sizes, offs, reverse, h_n)


@numba.njit(parallel=True, **JIT)
def gru_fwd_rows(xw, w_hh, b_hh, h0, T, reverse, parts, y, h_n, gates, hn_all, panel_rows):
    """``gru_fwd`` on a dense batch split by rows (see lstm.lstm_fwd_rows)."""
    B, H = h0.shape[0], h0.shape[1]
    wp = step_panels(w_hh, 3, H, B, T, h0, panel_rows, parts, True)
    keep = gates.shape[0] == y.shape[0]
    for p in prange(parts):
        r0, r1, h_a, h_b = row_block_state(h0, parts, p)
        n = r1 - r0
        tmp = scratch(h0)
        for s in range(T):
            t = T - 1 - s if reverse else s
            w0 = (t * B if keep else 0) + r0
            src, dst = (h_a, h_b) if s % 2 == 0 else (h_b, h_a)
            gate_products(src, n, w_hh, wp, gates, w0, 3, H, 0, H, tmp)
            _pointwise_fwd(t * B + r0, w0, n, 0, H, H, xw, gates, hn_all, b_hh, src, dst)
            for b in range(n):
                copy_units(y, t * B + r0 + b, dst, b, 0, H)
        h_n[r0:r1] = h_b if T % 2 == 1 else h_a


@numba.njit(**JIT)
def gru_seq_at(a_xw, a_w_hh, a_b_hh, a_h0, a_y, a_h_n, a_sizes, T, B, H, reverse, parts, by_rows, like, a_w_ih=0,
               a_b_ih=0, I=0, panel_rows=1):
    """``gru_fwd`` in inference, on tensors given by address (see lstm.lstm_seq_at)."""
    sizes = call_sizes(a_sizes, T, B)
    rows = sizes.sum()
    xw, w_hh = input_rows(a_xw, a_w_ih, a_b_ih, rows, I, 3 * H, parts, like), at(a_w_hh, (3 * H, H), like)
    b_hh = at(a_b_hh, (3 * H if a_b_hh else 0,), like)
    h0, y, h_n = at(a_h0, (B, H), like), at(a_y, (rows, H), like), at(a_h_n, (B, H), like)
    dt = like.dtype
    if by_rows:
        gru_fwd_rows(xw, w_hh, b_hh, h0, T, reverse, parts, y, h_n, lines((B, 3 * H), dt), lines((B, H), dt),
                     panel_rows)
        return
    gru_fwd(xw, w_hh, b_hh, h0, sizes, row_offsets(sizes), reverse, parts, y, h_n, lines((B, 3 * H), dt),
            lines((B, H), dt), lines((B, H), dt), lines((B, H), dt), panel_rows)


@numba.njit(**JIT)
def _pointwise_bwd(o, r0, r1, lo, hi, H, dh_rec, grad_y, gates, hn_all, h_prev, d_xw, d_hh):
    """Gate gradients of units [lo, hi) for rows [r0, r1) of a step whose rows start at row o of the arrays
    laid out as rows; dh_rec[:, lo:hi] becomes the direct part dh * z of d h_{t-1} (each thread reads and
    writes only its own units; the product part is added after the region)."""
    m = hi - lo
    one = gates.dtype.type(1)
    for b in range(r0, r1):
        w = o + b
        gr, gz, gn = vec(gates, w, lo, m), vec(gates, w, H + lo, m), vec(gates, w, 2 * H + lo, m)
        dxr, dxz, dxn = vec(d_xw, w, lo, m), vec(d_xw, w, H + lo, m), vec(d_xw, w, 2 * H + lo, m)
        dhr, dhz, dhn = vec(d_hh, w, lo, m), vec(d_hh, w, H + lo, m), vec(d_hh, w, 2 * H + lo, m)
        dr, gy, hp, hn = vec(dh_rec, b, lo, m), vec(grad_y, w, lo, m), vec(h_prev, w, lo, m), vec(hn_all, w, lo, m)
        # passes of few arrays each (see lstm._pointwise_fwd); dr holds dh = d h_t until the last
        for u in range(m):
            dr[u] = dr[u] + gy[u]
        for u in range(m):
            dxn[u] = dr[u] * (one - gz[u]) * (one - gn[u] * gn[u])
        for u in range(m):
            dxz[u] = dr[u] * (hp[u] - gn[u]) * gz[u] * (one - gz[u])
        for u in range(m):
            dxr[u] = dxn[u] * hn[u] * gr[u] * (one - gr[u])
        for u in range(m):
            dhr[u] = dxr[u]
        for u in range(m):
            dhz[u] = dxz[u]
        for u in range(m):
            dhn[u] = dxn[u] * gr[u]
        for u in range(m):
            dr[u] = dr[u] * gz[u]


@numba.njit(parallel=True, **JIT)
def gru_bwd(grad_y, grad_h_n, w_hh_t, h0, sizes, offs, reverse, parts, y, gates, hn_all, d_xw, d_hh, h_prev, dh_rec,
            panel_rows):
    """d_xw: gradient of the input projection; d_hh: of the recurrent product (W_hh h + b_hh), for dW_hh
    and db_hh; h_prev: each step's recurrent input; dh_rec ends as d_h0. w_hh_t = w_hh.T [H, 3H], on its
    panels from ``panel_rows`` rows (panel.row_panels). Every array but the state's as rows, step t's
    from row offs[t] as in the forward. Its steps split over a team of ``parts`` workers, a phase a step
    (see lstm.lstm_bwd): part p's units get the step before's product added to their columns of dh_rec, then
    their pointwise pass, which sets those columns to the direct part of the next."""
    T = sizes.shape[0]
    B, H = h0.shape[0], h0.shape[1]
    GH = w_hh_t.shape[1]
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
                        back_products(d_hh, offs[tb] * GH, sizes[tb], w_hh_t, wp, dh_rec, 0, lo, hi, True, tmp)
                    if s < T:
                        fill_h_prev(t, 0, sizes[t], reverse, sizes, offs, h0, y, h_prev, lo, hi)
                        _pointwise_bwd(offs[t], 0, sizes[t], lo, hi, H, dh_rec, grad_y, gates, hn_all, h_prev, d_xw,
                                       d_hh)
                    team_done(sync, p, s)
                    p = team_next(sync, parts, w, s)


@numba.njit(parallel=True, **JIT)
def gru_bwd_rows(grad_y, grad_h_n, w_hh_t, h0, sizes, offs, reverse, parts, y, gates, hn_all, d_xw, d_hh, h_prev,
                 dh_rec, panel_rows):
    """``gru_bwd`` on a dense batch split by rows, with the same arguments: part p runs every step of its
    block of rows with all units and never waits for another."""
    T = sizes.shape[0]
    B, H = h0.shape[0], h0.shape[1]
    GH = w_hh_t.shape[1]
    wp = row_panels(w_hh_t, B // parts, panel_rows)
    for p in prange(parts):
        r0, r1 = row_block(B, parts, p)
        tmp = scratch(h0)
        dh_rec[r0:r1, :] = grad_h_n[r0:r1, :]
        for s in range(T):
            t = s if reverse else T - 1 - s
            fill_h_prev(t, r0, r1, reverse, sizes, offs, h0, y, h_prev, 0, h_prev.shape[1])
            _pointwise_bwd(offs[t], r0, r1, 0, H, H, dh_rec, grad_y, gates, hn_all, h_prev, d_xw, d_hh)
            back_products(d_hh, (offs[t] + r0) * GH, r1 - r0, w_hh_t, wp, dh_rec, r0, 0, H, True, tmp)


@numba.njit(**JIT)
def _cell_units(x, w_ih, b_ih, w_hh, b_hh, h, h_out, xw, gates, hn, B, H, lo, hi):
    """Units [lo, hi) of a fused cell's step (``gru_cell``, ``gru_cell_train``): their rows of the input
    projection and of the recurrent product, then their pointwise pass (gates [B, 3H], hn [B, H])."""
    for k in range(3):
        project_units(x, B, w_ih, b_ih, xw, k * H + lo, k * H + hi)
        mm_nt(h, B, w_hh, gates, k * H + lo, k * H + hi, False)
    _pointwise_fwd(0, 0, B, lo, hi, H, xw, gates, hn, b_hh, h, h_out)


@numba.njit(parallel=True, **JIT)
def gru_cell(a_x, a_w_ih, a_b_ih, a_w_hh, a_b_hh, a_h, a_out, B, I, H, parts, like):
    """One step of a cell in inference, input projection included (``gru_cell_fwd``), on tensors given
    by address (see rnn.rnn_cell)."""
    x, w_ih, w_hh = at(a_x, (B, I), like), at(a_w_ih, (3 * H, I), like), at(a_w_hh, (3 * H, H), like)
    b_ih, b_hh = at(a_b_ih, (3 * H if a_b_ih else 0,), like), at(a_b_hh, (3 * H if a_b_hh else 0,), like)
    h, h_out = at(a_h, (B, H), like), at(a_out, (B, H), like)
    xw, gates = lines((B, 3 * H), like.dtype), lines((B, 3 * H), like.dtype)
    hn = lines((B, H), like.dtype)
    for p in prange(parts):
        lo, hi = split(H, parts, p)
        _cell_units(x, w_ih, b_ih, w_hh, b_hh, h, h_out, xw, gates, hn, B, H, lo, hi)


@numba.njit(parallel=True, **JIT)
def gru_cell_train(a_x, a_w_ih, a_b_ih, a_w_hh, a_b_hh, a_h, a_out, a_ws, B, I, H, parts, like):
    """``gru_cell``'s step for the one-step training node (numba.py, ``_CellTrain``), its gates kept at
    a_ws: r, z, n [B, 3H], then W_hn h + b_hn [B, H]."""
    x, w_ih, w_hh = at(a_x, (B, I), like), at(a_w_ih, (3 * H, I), like), at(a_w_hh, (3 * H, H), like)
    b_ih, b_hh = at(a_b_ih, (3 * H if a_b_ih else 0,), like), at(a_b_hh, (3 * H if a_b_hh else 0,), like)
    h, h_out = at(a_h, (B, H), like), at(a_out, (B, H), like)
    xw = lines((B, 3 * H), like.dtype)
    gates = at(a_ws, (B, 3 * H), like)
    hn = at(a_ws + B * 3 * H * like.itemsize, (B, H), like)
    for p in prange(parts):
        lo, hi = split(H, parts, p)
        _cell_units(x, w_ih, b_ih, w_hh, b_hh, h, h_out, xw, gates, hn, B, H, lo, hi)


@numba.njit(**JIT)
def gru_cell_train_bwd(a_dh1, a_ws, a_h, a_dxw, a_dhw, a_dhd, B, H, like):
    """The node's backward pointwise pass: from h's gradient dh1 [B, H] and the workspace, the gates'
    gradients on the input side dxw and the recurrent side dhw [B, 3H] (n's times r on the recurrent
    side) and h's direct part dhd [B, H]."""
    dh1, h, dhd = at(a_dh1, (B, H), like), at(a_h, (B, H), like), at(a_dhd, (B, H), like)
    g, hn = at(a_ws, (B, 3 * H), like), at(a_ws + B * 3 * H * like.itemsize, (B, H), like)
    dxw, dhw = at(a_dxw, (B, 3 * H), like), at(a_dhw, (B, 3 * H), like)
    one = like.dtype.type(1)
    for b in range(B):
        gb, xb, rb = g[b], dxw[b], dhw[b]
        for j in range(H):
            r, z, n, d = gb[j], gb[H + j], gb[2 * H + j], dh1[b, j]
            dn = d * (one - z) * (one - n * n)
            dz = d * (h[b, j] - n) * z * (one - z)
            dr = dn * hn[b, j] * r * (one - r)
            xb[j] = dr
            rb[j] = dr
            xb[H + j] = dz
            rb[H + j] = dz
            xb[2 * H + j] = dn
            rb[2 * H + j] = dn * r
            dhd[b, j] = d * z
