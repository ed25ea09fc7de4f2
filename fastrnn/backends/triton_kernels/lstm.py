"""LSTM kernels (with projection, peephole connections and coupled input-forget gates).

Gate blocks of xw / W_hh rows: i, f, g, o (or i, g, o when COUPLED). Saved per step for the backward:
the activated gates [B, G*H] and c_t [B, H], in the accumulation dtype (fp32, or fp64 for fp64).
"""
import triton
import triton.language as tl

from .common import (first_col_tile, load_prev, load_tile, load_vec, load_w, load_wt, row_lengths, tile,
                     time_index, sigmoid, tanh)


@triton.jit
def cell(pi, pf, pg, po, c, wci, wcf, wco, PEEP: tl.constexpr, COUPLED: tl.constexpr):
    """One step's gate math from the pre-activations: (i, f, g, o, c_new, h_new)."""
    if PEEP:
        pi = pi + wci[None, :] * c
        if not COUPLED:
            pf = pf + wcf[None, :] * c
    i = sigmoid(pi)
    if COUPLED:
        f = 1.0 - i
    else:
        f = sigmoid(pf)
    g = tanh(pg)
    c_new = f * c + i * g
    if PEEP:
        po = po + wco[None, :] * c_new
    o = sigmoid(po)
    return i, f, g, o, c_new, o * tanh(c_new)


@triton.jit
def cell_bwd(dh, dc, i, f, g, o, c, cp, wci, wcf, wco, PEEP: tl.constexpr, COUPLED: tl.constexpr):
    """Gradients of the pre-activations and of c_{t-1} from dh_t, dc_t (dc from the next step)."""
    tc = tanh(c)
    dpo = dh * tc * o * (1.0 - o)
    dc = dc + dh * o * (1.0 - tc * tc)
    if PEEP:
        dc = dc + dpo * wco[None, :]
    dpg = dc * i * (1.0 - g * g)
    if COUPLED:
        dpi = dc * (g - cp) * i * (1.0 - i)
        dpf = dpi
    else:
        dpi = dc * g * i * (1.0 - i)
        dpf = dc * cp * f * (1.0 - f)
    dcp = dc * f
    if PEEP:
        dcp = dcp + dpi * wci[None, :]
        if not COUPLED:
            dcp = dcp + dpf * wcf[None, :]
    return dpi, dpf, dpg, dpo, dcp


@triton.jit
def _peep(w_ch, units, umask, H, ACC: tl.constexpr, PEEP: tl.constexpr):
    if PEEP:
        wci = load_vec(w_ch, units, umask, ACC)
        wcf = load_vec(w_ch, H + units, umask, ACC)
        wco = load_vec(w_ch, 2 * H + units, umask, ACC)
    else:
        wci = tl.zeros(units.shape, ACC)
        wcf = wci
        wco = wci
    return wci, wcf, wco


@triton.jit
def fwd_step(xw, w_hh, b_hh, w_ch, h_prev, h0, c_prev, c0, h_out, c_out, c_fin, gates,
             n, n_cont, n_last, H, P,
             HAS_BIAS: tl.constexpr, PEEP: tl.constexpr, COUPLED: tl.constexpr, SAVE: tl.constexpr,
             ACC: tl.constexpr, PREC: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    """One step for rows [0, n): a program owns BB rows x BH hidden units (all gate blocks of them).
    Rows below n_cont continue from (h_prev, c_prev), the others start from (h0, c0); rows from n_last
    on end here and also write c to c_fin."""
    G: tl.constexpr = 3 if COUPLED else 4
    GB: tl.constexpr = 1 if COUPLED else 2  # index of the g block
    rows, units, rmask, umask, m2 = tile(n, H, BB, BH)
    WDT = w_hh.dtype.element_ty
    ai = tl.zeros((BB, BH), ACC)
    af = tl.zeros((BB, BH), ACC)
    ag = tl.zeros((BB, BH), ACC)
    ao = tl.zeros((BB, BH), ACC)
    for k0 in range(0, P, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < P
        h = load_prev(h_prev, h0, rows, ks, P, n_cont, rmask[:, None] & kmask[None, :], ACC).to(WDT)
        ai = tl.dot(h, load_wt(w_hh, 0, units, ks, P, umask, kmask), ai, input_precision=PREC, out_dtype=ACC)
        if not COUPLED:
            af = tl.dot(h, load_wt(w_hh, H, units, ks, P, umask, kmask), af, input_precision=PREC, out_dtype=ACC)
        ag = tl.dot(h, load_wt(w_hh, GB * H, units, ks, P, umask, kmask), ag, input_precision=PREC, out_dtype=ACC)
        ao = tl.dot(h, load_wt(w_hh, (G - 1) * H, units, ks, P, umask, kmask), ao, input_precision=PREC,
                    out_dtype=ACC)
    GH = G * H
    ai += load_tile(xw, rows, units, GH, m2, ACC)
    if not COUPLED:
        af += load_tile(xw, rows, H + units, GH, m2, ACC)
    ag += load_tile(xw, rows, GB * H + units, GH, m2, ACC)
    ao += load_tile(xw, rows, (G - 1) * H + units, GH, m2, ACC)
    if HAS_BIAS:
        ai += load_vec(b_hh, units, umask, ACC)[None, :]
        if not COUPLED:
            af += load_vec(b_hh, H + units, umask, ACC)[None, :]
        ag += load_vec(b_hh, GB * H + units, umask, ACC)[None, :]
        ao += load_vec(b_hh, (G - 1) * H + units, umask, ACC)[None, :]
    c = load_prev(c_prev, c0, rows, units, H, n_cont, m2, ACC)
    wci, wcf, wco = _peep(w_ch, units, umask, H, ACC, PEEP)
    i, f, g, o, c_new, h_new = cell(ai, af, ag, ao, c, wci, wcf, wco, PEEP, COUPLED)
    offs = rows[:, None] * H + units[None, :]
    tl.store(h_out + offs, h_new.to(h_out.dtype.element_ty), mask=m2)
    tl.store(c_out + offs, c_new.to(c_out.dtype.element_ty), mask=m2)
    tl.store(c_fin + offs, c_new.to(c_fin.dtype.element_ty), mask=m2 & (rows[:, None] >= n_last))
    if SAVE:
        goffs = rows[:, None] * GH + units[None, :]
        tl.store(gates + goffs, i, mask=m2)
        if not COUPLED:
            tl.store(gates + goffs + H, f, mask=m2)
        tl.store(gates + goffs + GB * H, g, mask=m2)
        tl.store(gates + goffs + (G - 1) * H, o, mask=m2)


@triton.jit
def bwd_step(gy, rec_h, gn_h, rec_c, gn_c, gates, c_cur, c_prev, c0, w_hh, w_ch,
             d_gates, dh_out, dc_out, dh_fin, dc_fin,
             n, n_cont, n_cprev, n_last, H, P,
             ADD_REC_H: tl.constexpr, PEEP: tl.constexpr, COUPLED: tl.constexpr,
             ACC: tl.constexpr, PREC: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr):
    """One backward step for rows [0, n): a program owns BB rows x BP columns of dh_{t-1} and loops over
    the hidden units, computing their gate gradients on the fly and multiplying them into W_hh; the
    programs of column block 0 also store the gate gradients and dc_{t-1}. dh_t is gy (+ the recurrent
    dh when ADD_REC_H); the recurrent terms of rows below n_cont come from (rec_h, rec_c), the others'
    from the gradients of the final state (gn_h, gn_c). c_{t-1} of rows below n_cprev is c_prev, else c0.
    Rows from n_last on take their last step here and also write dh_fin, dc_fin."""
    G: tl.constexpr = 3 if COUPLED else 4
    GB: tl.constexpr = 1 if COUPLED else 2
    rows, cols, rmask, cmask, out_mask = tile(n, P, BB, BP)
    first = first_col_tile(rows)
    last = rows[:, None] >= n_last
    WDT = w_hh.dtype.element_ty
    GH = G * H
    acc = tl.zeros((BB, BP), ACC)
    for k0 in range(0, H, BK):
        u = k0 + tl.arange(0, BK)
        umask = u < H
        m2 = rmask[:, None] & umask[None, :]
        dh = load_tile(gy, rows, u, H, m2, ACC)
        if ADD_REC_H:
            dh += load_prev(rec_h, gn_h, rows, u, H, n_cont, m2, ACC)
        dc = load_prev(rec_c, gn_c, rows, u, H, n_cont, m2, ACC)
        i = load_tile(gates, rows, u, GH, m2, ACC)
        if COUPLED:
            f = 1.0 - i
        else:
            f = load_tile(gates, rows, H + u, GH, m2, ACC)
        g = load_tile(gates, rows, GB * H + u, GH, m2, ACC)
        o = load_tile(gates, rows, (G - 1) * H + u, GH, m2, ACC)
        c = load_tile(c_cur, rows, u, H, m2, ACC)
        cp = load_prev(c_prev, c0, rows, u, H, n_cprev, m2, ACC)
        wci, wcf, wco = _peep(w_ch, u, umask, H, ACC, PEEP)
        dpi, dpf, dpg, dpo, dcp = cell_bwd(dh, dc, i, f, g, o, c, cp, wci, wcf, wco, PEEP, COUPLED)
        sm = m2 & first
        goffs = rows[:, None] * GH + u[None, :]
        DT = d_gates.dtype.element_ty
        tl.store(d_gates + goffs, dpi.to(DT), mask=sm)
        if not COUPLED:
            tl.store(d_gates + goffs + H, dpf.to(DT), mask=sm)
        tl.store(d_gates + goffs + GB * H, dpg.to(DT), mask=sm)
        tl.store(d_gates + goffs + (G - 1) * H, dpo.to(DT), mask=sm)
        offs = rows[:, None] * H + u[None, :]
        tl.store(dc_out + offs, dcp.to(dc_out.dtype.element_ty), mask=sm)
        tl.store(dc_fin + offs, dcp.to(dc_fin.dtype.element_ty), mask=sm & last)
        acc = tl.dot(dpi.to(WDT), load_w(w_hh, 0, u, cols, P, umask, cmask), acc, input_precision=PREC,
                     out_dtype=ACC)
        if not COUPLED:
            acc = tl.dot(dpf.to(WDT), load_w(w_hh, H, u, cols, P, umask, cmask), acc, input_precision=PREC,
                         out_dtype=ACC)
        acc = tl.dot(dpg.to(WDT), load_w(w_hh, GB * H, u, cols, P, umask, cmask), acc, input_precision=PREC,
                     out_dtype=ACC)
        acc = tl.dot(dpo.to(WDT), load_w(w_hh, (G - 1) * H, u, cols, P, umask, cmask), acc,
                     input_precision=PREC, out_dtype=ACC)
    offs = rows[:, None] * P + cols[None, :]
    tl.store(dh_out + offs, acc.to(dh_out.dtype.element_ty), mask=out_mask)
    tl.store(dh_fin + offs, acc.to(dh_fin.dtype.element_ty), mask=out_mask & last)


@triton.jit
def fwd_seq(xw, w_hh, b_hh, w_ch, h0, c0, lengths, y, h_n, c_n, gates, c_all, T, B, H,
            HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, PEEP: tl.constexpr,
            COUPLED: tl.constexpr, SAVE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
            BB: tl.constexpr, HP: tl.constexpr):
    """The whole sequence in one launch (no projection, H <= HP): a program owns BB rows, keeps W_hh and
    its rows' state on chip and loops over time. A row takes steps only at t < lengths[row]; the loop
    ends at the longest length in the tile."""
    G: tl.constexpr = 3 if COUPLED else 4
    GB: tl.constexpr = 1 if COUPLED else 2
    rows, units, rmask, umask, m2 = tile(B, H, BB, HP)  # a 1-D grid: the one column tile holds every unit
    WDT = w_hh.dtype.element_ty
    GH = G * H
    wi = load_wt(w_hh, 0, units, units, H, umask, umask)
    if COUPLED:
        wf = wi
    else:
        wf = load_wt(w_hh, H, units, units, H, umask, umask)
    wg = load_wt(w_hh, GB * H, units, units, H, umask, umask)
    wo = load_wt(w_hh, (G - 1) * H, units, units, H, umask, umask)
    if HAS_BIAS:
        bi = load_vec(b_hh, units, umask, ACC)
        if COUPLED:
            bf = bi
        else:
            bf = load_vec(b_hh, H + units, umask, ACC)
        bg = load_vec(b_hh, GB * H + units, umask, ACC)
        bo = load_vec(b_hh, (G - 1) * H + units, umask, ACC)
    else:
        bi = tl.zeros((HP,), ACC)
        bf = bi
        bg = bi
        bo = bi
    wci, wcf, wco = _peep(w_ch, units, umask, H, ACC, PEEP)
    h = load_tile(h0, rows, units, H, m2, ACC)
    c = load_tile(c0, rows, units, H, m2, ACC)
    lens, steps = row_lengths(lengths, rows, rmask, T, HAS_LEN, BB)
    for s in range(0, steps):
        t = time_index(s, steps, REVERSE)
        act = m2 & (t < lens)[:, None]
        x = xw + t.to(tl.int64) * B * GH
        hd = h.to(WDT)
        pi = tl.dot(hd, wi, input_precision=PREC, out_dtype=ACC) + load_tile(x, rows, units, GH, act, ACC) + bi[None, :]
        if COUPLED:
            pf = pi
        else:
            pf = tl.dot(hd, wf, input_precision=PREC, out_dtype=ACC) + load_tile(x, rows, H + units, GH, act, ACC) \
                + bf[None, :]
        pg = tl.dot(hd, wg, input_precision=PREC, out_dtype=ACC) + load_tile(x, rows, GB * H + units, GH, act, ACC) \
            + bg[None, :]
        po = tl.dot(hd, wo, input_precision=PREC, out_dtype=ACC) \
            + load_tile(x, rows, (G - 1) * H + units, GH, act, ACC) + bo[None, :]
        i, f, g, o, c_new, h_new = cell(pi, pf, pg, po, c, wci, wcf, wco, PEEP, COUPLED)
        c = tl.where(act, c_new, c)
        h = tl.where(act, h_new, h)
        offs = t.to(tl.int64) * B * H + rows[:, None] * H + units[None, :]
        tl.store(y + offs, h_new.to(y.dtype.element_ty), mask=act)
        if SAVE:
            tl.store(c_all + offs, c_new, mask=act)
            goffs = t.to(tl.int64) * B * GH + rows[:, None] * GH + units[None, :]
            tl.store(gates + goffs, i, mask=act)
            if not COUPLED:
                tl.store(gates + goffs + H, f, mask=act)
            tl.store(gates + goffs + GB * H, g, mask=act)
            tl.store(gates + goffs + (G - 1) * H, o, mask=act)
    offs = rows[:, None] * H + units[None, :]
    tl.store(h_n + offs, h.to(h_n.dtype.element_ty), mask=m2)
    tl.store(c_n + offs, c.to(c_n.dtype.element_ty), mask=m2)
