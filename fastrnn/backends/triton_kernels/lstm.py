"""LSTM kernels (with projection, peephole connections and coupled input-forget gates).

Gate blocks of xw / W_hh rows: i, f, g, o (or i, g, o when COUPLED). Saved per step for the backward:
the activated gates [B, G*H] and c_t [B, H], in the accumulation dtype (fp32, or fp64 for fp64).
"""
import triton
import triton.language as tl

from .common import (LN_EPS, centered, finish_h, first_col_tile, keep_weight, ln_backward, load_prev, load_tile,
                     load_vec, load_w, load_wt, row_lengths, split_dh, tile, time_index, sigmoid, tanh)


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
    return gates_bwd(dc + dh * o * (1.0 - tc * tc), dpo, i, f, g, cp, wci, wcf, wco, PEEP, COUPLED)


@triton.jit
def gates_bwd(dc, dpo, i, f, g, cp, wci, wcf, wco, PEEP: tl.constexpr, COUPLED: tl.constexpr):
    """cell_bwd from the point where dc_t (without its peephole term) and dpo are known."""
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
def load_gates(ptr, rows, units, ld, m2, H, ACC: tl.constexpr, COUPLED: tl.constexpr):
    """The (i, f, g, o) tiles [BB, len(units)] of a row-major [*, G*H] array (f = i when COUPLED: no f block)."""
    G: tl.constexpr = 3 if COUPLED else 4
    GB: tl.constexpr = 1 if COUPLED else 2
    i = load_tile(ptr, rows, units, ld, m2, ACC)
    f = i
    if not COUPLED:
        f = load_tile(ptr, rows, H + units, ld, m2, ACC)
    return i, f, load_tile(ptr, rows, GB * H + units, ld, m2, ACC), load_tile(ptr, rows, (G - 1) * H + units, ld,
                                                                            m2, ACC)


@triton.jit
def gate_vecs(ptr, units, umask, H, ACC: tl.constexpr, COUPLED: tl.constexpr):
    """The (i, f, g, o) parts [1, len(units)] of a [G*H] vector (a bias, a gain), ready to broadcast."""
    G: tl.constexpr = 3 if COUPLED else 4
    GB: tl.constexpr = 1 if COUPLED else 2
    i = load_vec(ptr, units, umask, ACC)[None, :]
    f = i
    if not COUPLED:
        f = load_vec(ptr, H + units, umask, ACC)[None, :]
    return i, f, load_vec(ptr, GB * H + units, umask, ACC)[None, :], \
        load_vec(ptr, (G - 1) * H + units, umask, ACC)[None, :]


@triton.jit
def store_gates(ptr, rows, units, ld, m2, H, i, f, g, o, COUPLED: tl.constexpr):
    """Store (i, f, g, o) tiles into a row-major [*, G*H] array (f not when COUPLED), in its dtype."""
    G: tl.constexpr = 3 if COUPLED else 4
    GB: tl.constexpr = 1 if COUPLED else 2
    DT = ptr.dtype.element_ty
    offs = rows[:, None] * ld + units[None, :]
    tl.store(ptr + offs, i.to(DT), mask=m2)
    if not COUPLED:
        tl.store(ptr + offs + H, f.to(DT), mask=m2)
    tl.store(ptr + offs + GB * H, g.to(DT), mask=m2)
    tl.store(ptr + offs + (G - 1) * H, o.to(DT), mask=m2)


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
    xi, xf, xg, xo = load_gates(xw, rows, units, GH, m2, H, ACC, COUPLED)
    ai += xi
    af += xf
    ag += xg
    ao += xo
    if HAS_BIAS:
        bi, bf, bg, bo = gate_vecs(b_hh, units, umask, H, ACC, COUPLED)
        ai += bi
        af += bf
        ag += bg
        ao += bo
    c = load_prev(c_prev, c0, rows, units, H, n_cont, m2, ACC)
    wci, wcf, wco = _peep(w_ch, units, umask, H, ACC, PEEP)
    i, f, g, o, c_new, h_new = cell(ai, af, ag, ao, c, wci, wcf, wco, PEEP, COUPLED)
    offs = rows[:, None] * H + units[None, :]
    tl.store(h_out + offs, h_new.to(h_out.dtype.element_ty), mask=m2)
    tl.store(c_out + offs, c_new.to(c_out.dtype.element_ty), mask=m2)
    tl.store(c_fin + offs, c_new.to(c_fin.dtype.element_ty), mask=m2 & (rows[:, None] >= n_last))
    if SAVE:
        store_gates(gates, rows, units, GH, m2, H, i, f, g, o, COUPLED)


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


# ---- the cell options: row kernels (host code: TritonBackend._lstm_opts_fwd/_bwd) ------------------------
# A step with layer norm, zoneout or recurrent dropout is a matmul (raw = hm @ W_hh^T, cuBLAS) and one row
# kernel; with projection the row kernel writes m and finish_step completes h after the W_hr matmul.
# Saved per step (rows of the workspace): the activated gates, c' (before zoneout), m (projection),
# c_t after zoneout (zoneout of c), the normalized recurrent product and c' and their rstd (layer norm).


@triton.jit
def _ln_gates(ai, af, ag, ao, m2, GH, COUPLED: tl.constexpr):
    """Mean-centred gate blocks of the raw recurrent product and the rows' rstd over all G*H columns."""
    s = tl.sum(ai, 1) + tl.sum(ag, 1) + tl.sum(ao, 1)
    if not COUPLED:
        s += tl.sum(af, 1)
    mean = s / GH
    ai = centered(ai, mean, m2)
    af = centered(af, mean, m2)
    ag = centered(ag, mean, m2)
    ao = centered(ao, mean, m2)
    v = tl.sum(ai * ai, 1) + tl.sum(ag * ag, 1) + tl.sum(ao * ao, 1)
    if not COUPLED:
        v += tl.sum(af * af, 1)
    rstd = 1.0 / tl.sqrt(v / GH + LN_EPS)
    return ai * rstd[:, None], af * rstd[:, None], ag * rstd[:, None], ao * rstd[:, None], rstd


@triton.jit
def fwd_opts_step(xw, raw, b_hh, w_ch, ln_h, ln_c, ln_cb, zm_h, zm_c, rmask, p_h, p_c,
                  h_state, c_state, m_out, y, hm, gates, c_new_out, c_post, xhat_h, xhat_c, rstd, n, H,
                  HAS_BIAS: tl.constexpr, PEEP: tl.constexpr, COUPLED: tl.constexpr, LN: tl.constexpr,
                  ZH: tl.constexpr, ZC: tl.constexpr, RMASK: tl.constexpr, PROJ: tl.constexpr,
                  SAVE: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr, HP: tl.constexpr):
    """One step of rows [0, n) with the cell options, from raw = hm @ W_hh^T: layer norm of raw (gain
    ln_h), + xw_t + b_hh, the cell (peephole, coupled), layer norm of c' into tanh (ln_c, ln_cb), zoneout
    of c into c_state and, without projection, of h (finish_h); with projection m goes to m_out."""
    G: tl.constexpr = 3 if COUPLED else 4
    rows, units, _, umask, m2 = tile(n, H, BR, HP)
    GH = G * H
    ai, af, ag, ao = load_gates(raw, rows, units, GH, m2, H, ACC, COUPLED)
    if LN:
        ai, af, ag, ao, rs = _ln_gates(ai, af, ag, ao, m2, GH, COUPLED)
        if SAVE:
            store_gates(xhat_h, rows, units, GH, m2, H, ai, af, ag, ao, COUPLED)
            tl.store(rstd + rows * 2, rs, mask=rows < n)
        gi, gf, gg, go = gate_vecs(ln_h, units, umask, H, ACC, COUPLED)
        ai = ai * gi
        af = af * gf
        ag = ag * gg
        ao = ao * go
    xi, xf, xg, xo = load_gates(xw, rows, units, GH, m2, H, ACC, COUPLED)
    ai += xi
    af += xf
    ag += xg
    ao += xo
    if HAS_BIAS:
        bi, bf, bg, bo = gate_vecs(b_hh, units, umask, H, ACC, COUPLED)
        ai += bi
        af += bf
        ag += bg
        ao += bo
    c = load_tile(c_state, rows, units, H, m2, ACC)
    wci, wcf, wco = _peep(w_ch, units, umask, H, ACC, PEEP)
    i, f, g, o, c_new, h_new = cell(ai, af, ag, ao, c, wci, wcf, wco, PEEP, COUPLED)
    offs = rows[:, None] * H + units[None, :]
    if LN:
        dc = centered(c_new, tl.sum(tl.where(m2, c_new, 0.0), 1) / H, m2)
        rc = 1.0 / tl.sqrt(tl.sum(dc * dc, 1) / H + LN_EPS)
        xc = dc * rc[:, None]
        h_new = o * tanh(xc * load_vec(ln_c, units, umask, ACC)[None, :] + load_vec(ln_cb, units, umask, ACC)[None, :])
        if SAVE:
            tl.store(xhat_c + offs, xc, mask=m2)
            tl.store(rstd + rows * 2 + 1, rc, mask=rows < n)
    c_out = c_new + keep_weight(zm_c, p_c, rows, units, H, m2, ZC, ACC) * (c - c_new)
    tl.store(c_state + offs, c_out, mask=m2)
    if SAVE:
        store_gates(gates, rows, units, GH, m2, H, i, f, g, o, COUPLED)
        tl.store(c_new_out + offs, c_new, mask=m2)
        if ZC != 0:
            tl.store(c_post + offs, c_out, mask=m2)
    if PROJ:
        tl.store(m_out + offs, h_new, mask=m2)
    else:
        finish_h(h_new, h_state, zm_h, p_h, rmask, y, hm, rows, units, H, m2, ZH, RMASK, ACC)


@triton.jit
def bwd_opts_step(gy, dh_state, dm, dc_state, zm_h, zm_c, p_h, p_c, gates, c_new_in, c_prev, xhat_h, xhat_c,
                  rstd, w_ch, ln_h, ln_c, ln_cb, d_xw, dg, d_raw, dcn_out, n, H,
                  PEEP: tl.constexpr, COUPLED: tl.constexpr, LN: tl.constexpr, ZH: tl.constexpr,
                  ZC: tl.constexpr, PROJ: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr, HP: tl.constexpr):
    """The backward of fwd_opts_step for rows [0, n): from dh_t (grad_y_t + dh_state, split by zoneout;
    with projection the candidate's gradient dm comes in) and dc_t (dc_state) to the gate gradients
    (d_xw in the input's dtype, dg in ACC), the raw product's gradient d_raw (through the layer norm),
    dc_{t-1} into dc_state, the direct share of dh_{t-1} into dh_state (no projection), and the gradient
    of the normalized c' into dcn_out (layer norm, for its gain and bias)."""
    G: tl.constexpr = 3 if COUPLED else 4
    rows, units, _, umask, m2 = tile(n, H, BR, HP)
    GH = G * H
    offs = rows[:, None] * H + units[None, :]
    if PROJ:
        dh = load_tile(dm, rows, units, H, m2, ACC)
    else:
        dh, direct = split_dh(gy, dh_state, zm_h, p_h, rows, units, H, m2, ZH, ACC)
        tl.store(dh_state + offs, direct, mask=m2)
    dct = load_tile(dc_state, rows, units, H, m2, ACC)
    kc = keep_weight(zm_c, p_c, rows, units, H, m2, ZC, ACC)
    i, f, g, o = load_gates(gates, rows, units, GH, m2, H, ACC, COUPLED)
    if COUPLED:
        f = 1.0 - i
    cp = load_tile(c_prev, rows, units, H, m2, ACC)
    wci, wcf, wco = _peep(w_ch, units, umask, H, ACC, PEEP)
    dc = dct - kc * dct
    if LN:
        xc = load_tile(xhat_c, rows, units, H, m2, ACC)
        gc = load_vec(ln_c, units, umask, ACC)[None, :]
        tc = tanh(xc * gc + load_vec(ln_cb, units, umask, ACC)[None, :])
        dcn = dh * o * (1.0 - tc * tc)
        tl.store(dcn_out + offs, dcn, mask=m2)
        dxh = dcn * gc
        rc = tl.load(rstd + rows * 2 + 1, mask=rows < n, other=0.0).to(ACC)
        dc += ln_backward(dxh, xc, tl.sum(dxh, 1), tl.sum(dxh * xc, 1), rc, H)
    else:
        tc = tanh(load_tile(c_new_in, rows, units, H, m2, ACC))
        dc += dh * o * (1.0 - tc * tc)
    dpi, dpf, dpg, dpo, dcp = gates_bwd(dc, dh * tc * o * (1.0 - o), i, f, g, cp, wci, wcf, wco, PEEP, COUPLED)
    tl.store(dc_state + offs, dcp + kc * dct, mask=m2)
    store_gates(d_xw, rows, units, GH, m2, H, dpi, dpf, dpg, dpo, COUPLED)
    store_gates(dg, rows, units, GH, m2, H, dpi, dpf, dpg, dpo, COUPLED)
    if LN:  # through the recurrent product's layer norm: one more pass over the row's G*H columns
        xi, xf, xg, xo = load_gates(xhat_h, rows, units, GH, m2, H, ACC, COUPLED)
        gi, gf, gg, go = gate_vecs(ln_h, units, umask, H, ACC, COUPLED)
        di = dpi * gi
        df = dpf * gf
        dg_ = dpg * gg
        do = dpo * go
        s1 = tl.sum(di, 1) + tl.sum(dg_, 1) + tl.sum(do, 1)
        s2 = tl.sum(di * xi, 1) + tl.sum(dg_ * xg, 1) + tl.sum(do * xo, 1)
        if not COUPLED:
            s1 += tl.sum(df, 1)
            s2 += tl.sum(df * xf, 1)
        rs = tl.load(rstd + rows * 2, mask=rows < n, other=0.0).to(ACC)
        store_gates(d_raw, rows, units, GH, m2, H, ln_backward(di, xi, s1, s2, rs, GH),
                    ln_backward(df, xf, s1, s2, rs, GH), ln_backward(dg_, xg, s1, s2, rs, GH),
                    ln_backward(do, xo, s1, s2, rs, GH), COUPLED)
