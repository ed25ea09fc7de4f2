"""LSTM kernels (with projection, peephole connections and coupled input-forget gate).

Workspace per step t (saved by the forward for the backward): the activated gates [B, G*H]
(i, f, g, o; or i, g, o when coupled), the cell state c_t [B, H], and with a projection the
pre-projection output h~_t = o * tanh(c_t) [B, H].
"""
from __future__ import annotations

import numba
from numba import prange

from .common import (JIT, at, call_sizes, copy_units, fill_h_prev, final_rows, first_step,
                     lines, mm_nt, prev_t, project_units, row_block, row_block_state, row_offsets, sigmoid_, split,
                     tanh_, vec)
from .panel import back_products, gate_products, input_rows, row_panels, scratch, step_panels
from .team import team_claim, team_done, team_next, team_sync


@numba.njit(**JIT)
def _pointwise_fwd(r0, s0, n, lo, hi, H, xw, gates, b_hh, w_ch, coupled, c, c_all, hout):
    """Gates of units [lo, hi) for rows [0, n): raw recurrent products in rows s0 .. s0 + n of gates
    [.., G*H] -> activations; updates c in place, writes c_t to the same rows of c_all [.., H] and the
    (pre-projection) output to hout's rows [0, n). The step's input projection is rows r0 .. r0 + n of xw
    [rows, G*H]; s0 is the step's first row of the workspace: its own rows when the forward saves for a
    backward, else 0 (one step's rows, reused).

    Every loop runs over views (``vec``) from 0 to their length: indices that numba cannot prove non-negative
    get a wrap-around check that keeps LLVM from vectorizing the loop. And each loop touches few arrays: one
    over many needs more run-time alias checks than LLVM makes and stays scalar (the plain cell's single
    pass over 13 views took 2.5x a pass a gate at H64, one row; benchmarks/NOTES.md, thirty-first session).
    """
    has_b = b_hh.shape[0] > 0
    peep = w_ch.shape[0] > 0
    G = 3 if coupled else 4
    m = hi - lo
    one = xw.dtype.type(1)  # typed constant: a bare 1 would promote float32 math to float64
    for b in range(n):
        gr, xr = s0 + b, r0 + b
        if has_b and not peep and not coupled:  # the plain cell: a pass a gate, each on three arrays
            for k in range(4):
                gk, xk, bk = vec(gates, gr, k * H + lo, m), vec(xw, xr, k * H + lo, m), vec(b_hh, 0, k * H + lo, m)
                if k == 2:
                    for u in range(m):
                        gk[u] = tanh_(gk[u] + (xk[u] + bk[u]))
                else:
                    for u in range(m):
                        gk[u] = sigmoid_(gk[u] + (xk[u] + bk[u]))
            gi, gf, gg, go = (vec(gates, gr, lo, m), vec(gates, gr, H + lo, m), vec(gates, gr, 2 * H + lo, m),
                              vec(gates, gr, 3 * H + lo, m))
            cb, ca, hb = vec(c, b, lo, m), vec(c_all, gr, lo, m), vec(hout, b, lo, m)
            for u in range(m):
                cb[u] = gf[u] * cb[u] + gi[u] * gg[u]
            for u in range(m):
                ca[u] = cb[u]
            for u in range(m):
                hb[u] = go[u] * tanh_(cb[u])
            continue
        for k in range(G):
            gk = vec(gates, gr, k * H + lo, m)
            xk = vec(xw, xr, k * H + lo, m)
            if has_b:
                bk = vec(b_hh, 0, k * H + lo, m)
                for u in range(m):
                    gk[u] += xk[u] + bk[u]
            else:
                for u in range(m):
                    gk[u] += xk[u]
        gi = vec(gates, gr, lo, m)
        gg = vec(gates, gr, (G - 2) * H + lo, m)
        go = vec(gates, gr, (G - 1) * H + lo, m)
        gf = vec(gates, gr, H + lo, m)  # the g block when coupled: not used then
        cb = vec(c, b, lo, m)
        if peep:
            w0, w1, w2 = vec(w_ch, 0, lo, m), vec(w_ch, 1, lo, m), vec(w_ch, 2, lo, m)
            for u in range(m):
                gi[u] += w0[u] * cb[u]
            if not coupled:
                for u in range(m):
                    gf[u] += w1[u] * cb[u]
        for u in range(m):
            gi[u] = sigmoid_(gi[u])
        if not coupled:
            for u in range(m):
                gf[u] = sigmoid_(gf[u])
        for u in range(m):
            gg[u] = tanh_(gg[u])
        if coupled:
            for u in range(m):
                cb[u] = (one - gi[u]) * cb[u] + gi[u] * gg[u]
        else:
            for u in range(m):
                cb[u] = gf[u] * cb[u] + gi[u] * gg[u]
        ca = vec(c_all, gr, lo, m)
        for u in range(m):
            ca[u] = cb[u]
        if peep:
            for u in range(m):
                go[u] += w2[u] * cb[u]
        for u in range(m):
            go[u] = sigmoid_(go[u])
        hb = vec(hout, b, lo, m)
        for u in range(m):
            hb[u] = go[u] * tanh_(cb[u])


@numba.njit(parallel=True, **JIT)
def lstm_fwd(xw, w_hh, b_hh, w_hr, w_ch, coupled, h0, c0, sizes, offs, reverse, parts, y, h_n, c_n, gates, c_all,
             hfull, h_a, h_b, c, panel_rows):
    """Whole-sequence forward of one layer-direction; see fastrnn.backends for the contract. Its steps are
    split over a team of ``parts`` workers (team.py): part p is a block of hidden units (their gate rows of
    W_hh, pointwise pass and cell state) and, with a projection, a second phase a step for a block of
    output columns (their rows of W_hr); each part writes its own columns of y.

    xw [rows, G*H] and y [rows, P]: the input projection and the output as rows, step t's sizes[t] rows
    from row offs[t]: the padded layout's T x B rows (offs[t] = t x B), or a PackedSequence's rows
    (``row_offsets``).

    gates [.., G*H], c_all and hfull [.., H]: the workspace as rows, every step's (y's rows) to keep them
    for the backward, or one step's (B rows) reused (inference).

    h_a, h_b: [B, P] state buffers (double-buffered: a step reads one, writes the other);
    c: [B, H] cell state (each unit is read and written by one part only);
    panel_rows: the steps' products on W_hh's panels from this many rows a step (panel.step_panels), else by
    ``mm_nt``.
    """
    T = sizes.shape[0]
    H = c0.shape[1]
    P = h0.shape[1]
    G = 3 if coupled else 4
    wp = step_panels(w_hh, G, H, h0.shape[0], T, h0, panel_rows, parts, False)
    proj = w_hr.shape[0] > 0
    keep = gates.shape[0] == y.shape[0]
    phases = 2 if proj else 1
    h_a[:, :] = h0
    h_b[:, :] = h0
    c[:, :] = c0
    sync = team_sync(parts)
    for w in prange(parts):
        if team_claim(sync, w):
            tmp = scratch(h0)
            for s in range(T):
                t = T - 1 - s if reverse else s
                n = sizes[t]
                w0 = offs[t] if keep else 0
                src, dst = (h_a, h_b) if s % 2 == 0 else (h_b, h_a)
                hout = hfull[w0:w0 + n] if proj else dst
                ph = s * phases
                p = team_next(sync, parts, w, ph)
                while p >= 0:
                    lo, hi = split(H, parts, p)
                    gate_products(src, n, w_hh, wp, gates, w0, G, H, lo, hi, tmp)
                    _pointwise_fwd(offs[t], w0, n, lo, hi, H, xw, gates, b_hh, w_ch, coupled, c, c_all, hout)
                    if not proj:
                        for b in range(n):
                            copy_units(y, offs[t] + b, dst, b, lo, hi)
                    team_done(sync, p, ph)
                    p = team_next(sync, parts, w, ph)
                if proj:
                    p = team_next(sync, parts, w, ph + 1)
                    while p >= 0:
                        lo, hi = split(P, parts, p)
                        mm_nt(hout, n, w_hr, dst, lo, hi, False)
                        for b in range(n):
                            copy_units(y, offs[t] + b, dst, b, lo, hi)
                        team_done(sync, p, ph + 1)
                        p = team_next(sync, parts, w, ph + 1)
    final_rows(y, sizes, offs, reverse, h_n)
    c_n[:, :] = c  # rows stop updating c after their last step


@numba.njit(parallel=True, **JIT)
def lstm_fwd_rows(xw, w_hh, b_hh, w_hr, w_ch, coupled, h0, c0, T, reverse, parts, y, h_n, c_n, gates, c_all, hfull,
                  panel_rows):
    """``lstm_fwd`` on a dense batch split by rows: part p runs every step of its block of rows with all
    units, its state on buffers of its own, and never waits for another (the split by units waits for every
    part each step). xw [T x B, G*H] and y [T x B, P] as rows; the workspace as lstm_fwd's (T x B rows saved
    for the backward, or B), each part writing its own rows of it."""
    B, H, P = c0.shape[0], c0.shape[1], h0.shape[1]
    G = 3 if coupled else 4
    proj = w_hr.shape[0] > 0
    dt = h0.dtype
    keep = gates.shape[0] == y.shape[0]
    wp = step_panels(w_hh, G, H, B, T, h0, panel_rows, parts, True)
    for p in prange(parts):
        r0, r1, h_a, h_b = row_block_state(h0, parts, p)
        n = r1 - r0
        c = lines((n, H), dt)
        c[:, :] = c0[r0:r1]
        tmp = scratch(h0)
        for s in range(T):
            t = T - 1 - s if reverse else s
            w0 = (t * B if keep else 0) + r0  # the part's rows of the step's workspace
            src, dst = (h_a, h_b) if s % 2 == 0 else (h_b, h_a)
            hout = hfull[w0:w0 + n] if proj else dst
            gate_products(src, n, w_hh, wp, gates, w0, G, H, 0, H, tmp)
            _pointwise_fwd(t * B + r0, w0, n, 0, H, H, xw, gates, b_hh, w_ch, coupled, c, c_all, hout)
            if proj:
                mm_nt(hout, n, w_hr, dst, 0, P, False)
            for b in range(n):
                copy_units(y, t * B + r0 + b, dst, b, 0, P)
        h_n[r0:r1] = h_b if T % 2 == 1 else h_a
        c_n[r0:r1] = c


@numba.njit(**JIT)
def lstm_seq_at(a_xw, a_w_hh, a_b_hh, a_w_hr, a_w_ch, coupled, a_h0, a_c0, a_y, a_h_n, a_c_n, a_sizes, T, B, H, P,
                reverse, parts, by_rows, like, a_w_ih=0, a_b_ih=0, I=0,
                panel_rows=1):
    """``lstm_fwd`` in inference (the chunk and packed entries), on tensors given by address (see
    rnn.rnn_cell; 0 for an absent bias, w_hr or w_ch): a dense sequence's T x B rows, or with ``a_sizes``
    (int64 [T], non-increasing) a packed sequence's rows. Its workspace and state buffers are made here,
    so the host passes integers, not ~20 numpy views (~40 us a call, benchmarks/NOTES.md, seventeenth
    session). With ``a_w_ih`` (and ``a_b_ih``, 0 when absent) ``a_xw`` is the input x [rows, I] and the
    input projection runs here first (panel.input_rows)."""
    G = 3 if coupled else 4
    sizes = call_sizes(a_sizes, T, B)
    rows = sizes.sum()
    dt = like.dtype
    xw, w_hh = input_rows(a_xw, a_w_ih, a_b_ih, rows, I, G * H, parts, like), at(a_w_hh, (G * H, P), like)
    b_hh = at(a_b_hh, (G * H if a_b_hh else 0,), like)
    w_hr = at(a_w_hr, (P, H) if a_w_hr else (0, 0), like)
    w_ch = at(a_w_ch, (3, H) if a_w_ch else (0, 0), like)
    h0, c0 = at(a_h0, (B, P), like), at(a_c0, (B, H), like)
    y, h_n, c_n = at(a_y, (rows, P), like), at(a_h_n, (B, P), like), at(a_c_n, (B, H), like)
    if by_rows:  # a dense batch, ``parts`` blocks of rows (lstm_fwd_rows)
        lstm_fwd_rows(xw, w_hh, b_hh, w_hr, w_ch, coupled, h0, c0, T, reverse, parts, y, h_n, c_n,
                      lines((B, G * H), dt), lines((B, H), dt), lines((B, H) if a_w_hr else (0, 0), dt), panel_rows)
        return
    lstm_fwd(xw, w_hh, b_hh, w_hr, w_ch, coupled, h0, c0, sizes, row_offsets(sizes), reverse, parts, y, h_n, c_n,
             lines((B, G * H), dt), lines((B, H), dt), lines((B, H) if a_w_hr else (0, 0), dt), lines((B, P), dt),
             lines((B, P), dt), lines((B, H), dt), panel_rows)


@numba.njit(**JIT)
def _pointwise_bwd(t, offs, r0, r1, lo, hi, H, reverse, sizes, dh_rec, grad_y, dhf, proj, gates, c_all, c0, w_ch,
                   coupled, dc, dgates, dw_ch):
    """Gate gradients of units [lo, hi) for rows [r0, r1) at step t; dc becomes d c_{t-1}. grad_y, gates,
    c_all and dgates as rows (step t's from row offs[t])."""
    T = sizes.shape[0]
    ro = offs[t]
    peep = w_ch.shape[0] > 0
    G = 3 if coupled else 4
    m = hi - lo
    one, zero = c0.dtype.type(1), c0.dtype.type(0)
    tp = prev_t(reverse, t)
    for b in range(r0, r1):
        gr = ro + b
        gi, gf = vec(gates, gr, lo, m), vec(gates, gr, H + lo, m)
        gg, go = vec(gates, gr, (G - 2) * H + lo, m), vec(gates, gr, (G - 1) * H + lo, m)
        di, df = vec(dgates, gr, lo, m), vec(dgates, gr, H + lo, m)
        dg, do = vec(dgates, gr, (G - 2) * H + lo, m), vec(dgates, gr, (G - 1) * H + lo, m)
        cn = vec(c_all, gr, lo, m)
        cp = vec(c0, b, lo, m) if first_step(reverse, t, T, b, sizes) else vec(c_all, offs[tp] + b, lo, m)
        dcb = vec(dc, b, lo, m)
        dh = vec(dhf, b, lo, m) if proj else vec(dh_rec, b, lo, m)
        gy = vec(grad_y, gr, lo, m)
        if not peep and not coupled:  # the plain cell: passes of few arrays each (see _pointwise_fwd)
            for u in range(m):
                do[u] = dh[u] if proj else dh[u] + gy[u]  # dh_t, held in do until do's own pass
            for u in range(m):
                tc, o, dhu = tanh_(cn[u]), go[u], do[u]
                do[u] = dhu * tc * o * (one - o)
                dcb[u] = dcb[u] + dhu * o * (one - tc * tc)  # d c_t
            for u in range(m):
                di[u] = dcb[u] * gg[u] * gi[u] * (one - gi[u])
            for u in range(m):
                dg[u] = dcb[u] * gi[u] * (one - gg[u] * gg[u])
            for u in range(m):
                df[u] = dcb[u] * cp[u] * gf[u] * (one - gf[u])
            for u in range(m):
                dcb[u] = dcb[u] * gf[u]
            continue
        w0 = vec(w_ch, 0, lo, m) if peep else cn
        w1 = vec(w_ch, 1, lo, m) if peep else cn
        w2 = vec(w_ch, 2, lo, m) if peep else cn
        for u in range(m):
            dhu = dh[u] if proj else dh[u] + gy[u]
            i = gi[u]
            g = gg[u]
            o = go[u]
            tc = tanh_(cn[u])
            dpo = dhu * tc * o * (one - o)
            dct = dcb[u] + dhu * o * (one - tc * tc)
            if peep:
                dct += dpo * w2[u]
            if coupled:
                f = one - i
                dpi = dct * (g - cp[u]) * i * (one - i)
                dpf = zero
            else:
                f = gf[u]
                dpi = dct * g * i * (one - i)
                dpf = dct * cp[u] * f * (one - f)
            dcp = dct * f
            if peep:
                dcp += dpi * w0[u]
                if not coupled:
                    dcp += dpf * w1[u]
            dcb[u] = dcp
            di[u] = dpi
            dg[u] = dct * i * (one - g * g)
            do[u] = dpo
            if not coupled:
                df[u] = dpf
        if peep:
            dw0, dw1, dw2 = vec(dw_ch, 0, lo, m), vec(dw_ch, 1, lo, m), vec(dw_ch, 2, lo, m)
            for u in range(m):
                dw0[u] += di[u] * cp[u]
                dw2[u] += do[u] * cn[u]
            if not coupled:
                for u in range(m):
                    dw1[u] += df[u] * cp[u]


@numba.njit(parallel=True, **JIT)
def lstm_bwd(grad_y, grad_h_n, grad_c_n, w_hh_t, w_hr, w_hr_t, w_ch, coupled, h0, c0, sizes, offs, reverse, parts,
             y, gates, c_all, hfull, dgates, h_prev, dh_proj, dh_rec, dhf, dc, dw_ch, panel_rows):
    """Whole-sequence backward of one layer-direction: the gate gradients of every step (dgates, also
    d_xw), the inputs of each step's recurrent product (h_prev, for dW_hh) and with a projection the
    gradient of each step's output (dh_proj, for dW_hr); dh_rec/dc end as d_h0/d_c0. Every array but the
    state's and the weights' as rows, step t's from row offs[t] as in the forward.

    w_hh_t = w_hh.T [P, G*H] and w_hr_t = w_hr.T [H, P], contiguous. The steps' products by w_hh_t on its
    panels from ``panel_rows`` rows (panel.row_panels).

    Its steps are split over a team of ``parts`` workers (team.py, as the forwards'; a region a step cost ~2-3
    us each, two or three a step: benchmarks/NOTES.md, thirty-first session). Part p of a phase is a block of
    output columns of P (common.split) or of units of H. Without a projection (P = H) a step is one phase:
    part p's columns of the step before's product dh_rec = dgates @ W_hh (the step before's every unit's
    gradients, closed by the last phase), then the pointwise pass of its own units, which read only those
    columns of dh_rec. With a projection two: by columns of P, the product, then dh_proj and h_prev; by units
    of H, dhf = dh_proj @ W_hr's columns and the pointwise pass. A last phase makes the first step's product.
    """
    T = sizes.shape[0]
    B, H = c0.shape[0], c0.shape[1]
    P = h0.shape[1]
    GH = w_hh_t.shape[1]
    proj = w_hr.shape[0] > 0
    wp = row_panels(w_hh_t, B, panel_rows)
    dh_rec[:, :] = grad_h_n
    dc[:, :] = grad_c_n
    dw_ch[:, :] = 0
    phases = 2 if proj else 1
    sync = team_sync(parts)
    for w in prange(parts):
        if team_claim(sync, w):
            tmp = scratch(h0)
            for s in range(T + 1):
                t = s if reverse else T - 1 - s  # this phase's step (none after the last)
                tb = t - 1 if reverse else t + 1  # the step before it in the backward, whose product comes first
                ph = s * phases
                p = team_next(sync, parts, w, ph)
                while p >= 0:
                    lo, hi = split(P, parts, p)
                    if s > 0:
                        back_products(dgates, offs[tb] * GH, sizes[tb], w_hh_t, wp, dh_rec, 0, lo, hi, False, tmp)
                    if s < T:
                        n, o = sizes[t], offs[t]
                        fill_h_prev(t, 0, n, reverse, sizes, offs, h0, y, h_prev, lo, hi)
                        if proj:
                            for b in range(n):
                                dp, dr, gy = vec(dh_proj, o + b, lo, hi - lo), vec(dh_rec, b, lo, hi - lo), vec(
                                    grad_y, o + b, lo, hi - lo)
                                for k in range(hi - lo):
                                    dp[k] = dr[k] + gy[k]
                        else:
                            _pointwise_bwd(t, offs, 0, n, lo, hi, H, reverse, sizes, dh_rec, grad_y, dhf, proj, gates,
                                           c_all, c0, w_ch, coupled, dc, dgates, dw_ch)
                    team_done(sync, p, ph)
                    p = team_next(sync, parts, w, ph)
                if proj and s < T:
                    n, o = sizes[t], offs[t]
                    p = team_next(sync, parts, w, ph + 1)
                    while p >= 0:
                        lo, hi = split(H, parts, p)
                        mm_nt(dh_proj[o:o + n], n, w_hr_t, dhf, lo, hi, False)
                        _pointwise_bwd(t, offs, 0, n, lo, hi, H, reverse, sizes, dh_rec, grad_y, dhf, proj, gates,
                                       c_all, c0, w_ch, coupled, dc, dgates, dw_ch)
                        team_done(sync, p, ph + 1)
                        p = team_next(sync, parts, w, ph + 1)


@numba.njit(parallel=True, **JIT)
def lstm_bwd_rows(grad_y, grad_h_n, grad_c_n, w_hh_t, w_hr, w_hr_t, w_ch, coupled, h0, c0, sizes, offs, reverse, parts,
                  y, gates, c_all, hfull, dgates, h_prev, dh_proj, dh_rec, dhf, dc, dw_ch, panel_rows):
    """``lstm_bwd`` on a dense batch split by rows, with the same arguments: part p runs every step of its
    block of rows with all units and never waits for another (the split by units opens two or three
    parallel regions a step). Without peephole weights (w_ch empty): their gradients are sums over rows."""
    T = sizes.shape[0]
    B, H, P = c0.shape[0], c0.shape[1], h0.shape[1]
    GH = w_hh_t.shape[1]
    proj = w_hr.shape[0] > 0
    wp = row_panels(w_hh_t, B // parts, panel_rows)
    for p in prange(parts):
        r0, r1 = row_block(B, parts, p)
        n = r1 - r0
        tmp = scratch(h0)
        dh_rec[r0:r1, :] = grad_h_n[r0:r1, :]
        dc[r0:r1, :] = grad_c_n[r0:r1, :]
        for s in range(T):
            t = s if reverse else T - 1 - s
            o = offs[t]
            fill_h_prev(t, r0, r1, reverse, sizes, offs, h0, y, h_prev, 0, h_prev.shape[1])
            if proj:
                for b in range(r0, r1):
                    for k in range(P):
                        dh_proj[o + b, k] = dh_rec[b, k] + grad_y[o + b, k]
                mm_nt(dh_proj[o + r0:o + r1], n, w_hr_t, dhf[r0:r1], 0, H, False)
            _pointwise_bwd(t, offs, r0, r1, 0, H, H, reverse, sizes, dh_rec, grad_y, dhf, proj, gates, c_all, c0,
                           w_ch, coupled, dc, dgates, dw_ch)
            back_products(dgates, (o + r0) * GH, n, w_hh_t, wp, dh_rec, r0, 0, P, False, tmp)


@numba.njit(**JIT)
def _cell_units(x, w_ih, b_ih, w_hh, b_hh, w_ch, coupled, h, c, c_out, c_all, hout, xw, gates, B, H, lo, hi):
    """Units [lo, hi) of a fused cell's step (``lstm_cell``, ``lstm_cell_train``): c into c_out, their rows
    of the input projection and of the recurrent product, then their pointwise pass (c_out updated in
    place, c_t also to c_all, the output to hout)."""
    G = 3 if coupled else 4
    for b in range(B):
        for u in range(lo, hi):
            c_out[b, u] = c[b, u]
    for k in range(G):
        project_units(x, B, w_ih, b_ih, xw, k * H + lo, k * H + hi)
        mm_nt(h, B, w_hh, gates, k * H + lo, k * H + hi, False)
    _pointwise_fwd(0, 0, B, lo, hi, H, xw, gates, b_hh, w_ch, coupled, c_out, c_all, hout)


@numba.njit(parallel=True, **JIT)
def lstm_cell(a_x, a_w_ih, a_b_ih, a_w_hh, a_b_hh, a_w_hr, a_w_ch, coupled, a_h, a_c, a_h_out, a_c_out, B, I, H, P,
              parts, like):
    """One step of a cell in inference, input projection included (the contract's ``lstm_cell_fwd``), on
    tensors given by address (see rnn.rnn_cell; 0 for an absent w_hr or w_ch): each thread copies c into
    c_out, projects and multiplies its own units' rows of W_ih and W_hh, then their pointwise part, which
    updates c_out in place (c_all is c_out itself, one slot); then the projection by W_hr."""
    G = 3 if coupled else 4
    x, w_ih, w_hh = at(a_x, (B, I), like), at(a_w_ih, (G * H, I), like), at(a_w_hh, (G * H, P), like)
    b_ih, b_hh = at(a_b_ih, (G * H if a_b_ih else 0,), like), at(a_b_hh, (G * H if a_b_hh else 0,), like)
    w_hr = at(a_w_hr, (P, H) if a_w_hr else (0, 0), like)
    w_ch = at(a_w_ch, (3, H) if a_w_ch else (0, 0), like)
    h, c = at(a_h, (B, P), like), at(a_c, (B, H), like)
    h_out, c_out = at(a_h_out, (B, P), like), at(a_c_out, (B, H), like)
    xw, gates = lines((B, G * H), like.dtype), lines((B, G * H), like.dtype)
    hfull = lines((B, H) if a_w_hr else (0, 0), like.dtype)
    hout = hfull if a_w_hr else h_out
    c_all = c_out
    for p in prange(parts):
        lo, hi = split(H, parts, p)
        _cell_units(x, w_ih, b_ih, w_hh, b_hh, w_ch, coupled, h, c, c_out, c_all, hout, xw, gates, B, H, lo, hi)
    if a_w_hr:
        for p in prange(parts):
            lo, hi = split(P, parts, p)
            mm_nt(hfull, B, w_hr, h_out, lo, hi, False)


@numba.njit(parallel=True, **JIT)
def lstm_cell_train(a_x, a_w_ih, a_b_ih, a_w_hh, a_b_hh, a_h, a_c, a_h_out, a_c_out, a_ws, B, I, H, parts, like):
    """``lstm_cell``'s step of the plain cell (no projection, peepholes or coupled gates) for the one-step
    training node (numba.py, ``_CellTrain``), its gates i, f, g, o [B, 4H] and c' [B, H] kept at a_ws."""
    x, w_ih, w_hh = at(a_x, (B, I), like), at(a_w_ih, (4 * H, I), like), at(a_w_hh, (4 * H, H), like)
    b_ih, b_hh = at(a_b_ih, (4 * H if a_b_ih else 0,), like), at(a_b_hh, (4 * H if a_b_hh else 0,), like)
    h, c = at(a_h, (B, H), like), at(a_c, (B, H), like)
    h_out, c_out = at(a_h_out, (B, H), like), at(a_c_out, (B, H), like)
    xw = lines((B, 4 * H), like.dtype)
    gates = at(a_ws, (B, 4 * H), like)
    c_all = at(a_ws + B * 4 * H * like.itemsize, (B, H), like)
    w_ch = at(0, (0, 0), like)
    for p in prange(parts):
        lo, hi = split(H, parts, p)
        _cell_units(x, w_ih, b_ih, w_hh, b_hh, w_ch, False, h, c, c_out, c_all, h_out, xw, gates, B, H, lo, hi)


@numba.njit(**JIT)
def lstm_cell_train_bwd(a_dh1, a_dc1, a_ws, a_c, a_dg, a_dc, B, H, like):
    """The node's backward pointwise pass: from the gradients of h' and c' and the workspace, the gates'
    pre-activation gradients dg [B, 4H] (x's and h's products are added before the gates: one tensor) and
    c's gradient dc [B, H]."""
    dh1, dc1, c, dc = at(a_dh1, (B, H), like), at(a_dc1, (B, H), like), at(a_c, (B, H), like), at(a_dc, (B, H), like)
    g, c1 = at(a_ws, (B, 4 * H), like), at(a_ws + B * 4 * H * like.itemsize, (B, H), like)
    dg = at(a_dg, (B, 4 * H), like)
    one = like.dtype.type(1)
    for b in range(B):
        gb, db = g[b], dg[b]
        for j in range(H):
            i, f, gg, o = gb[j], gb[H + j], gb[2 * H + j], gb[3 * H + j]
            tc = tanh_(c1[b, j])
            dct = dc1[b, j] + dh1[b, j] * o * (one - tc * tc)
            db[j] = dct * gg * i * (one - i)
            db[H + j] = dct * c[b, j] * f * (one - f)
            db[2 * H + j] = dct * i * (one - gg * gg)
            db[3 * H + j] = dh1[b, j] * tc * o * (one - o)
            dc[b, j] = dct * f
