"""GRU kernels, torch's form: n = tanh(xn + r * (W_hn h + b_hn)).

Gate blocks of xw / W_hh rows: r, z, n. Saved per step for the backward: r, z, n and W_hn h + b_hn,
[B, 4H] in the accumulation dtype.
"""
import triton
import triton.language as tl

from .common import (LN_EPS, centered, finish_h, first_col_tile, ln_backward, load_prev, load_tile, load_vec,
                     load_w, load_wt, row_lengths, split_dh, tile, time_index, sigmoid, tanh)


@triton.jit
def cell(xr, xz, xn, hr, hz, hn, h):
    """(r, z, n, h_new) from the input parts xr, xz, xn, the recurrent parts (biases included) and h."""
    r = sigmoid(xr + hr)
    z = sigmoid(xz + hz)
    n = tanh(xn + r * hn)
    return r, z, n, n + z * (h - n)


@triton.jit
def cell_bwd(dh, r, z, n, ghn, hp):
    """Gradients of the pre-activations (r, z, n blocks) and of W_hn h + b_hn."""
    dpn = dh * (1.0 - z) * (1.0 - n * n)
    dpz = dh * (hp - n) * z * (1.0 - z)
    dpr = dpn * ghn * r * (1.0 - r)
    return dpr, dpz, dpn, dpn * r


@triton.jit
def fwd_step(xw, w_hh, b_hh, h_prev, h0, h_out, saved, n, n_cont, H,
             HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
             BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    """One step for rows [0, n) (see lstm.fwd_step)."""
    rows, units, rmask, umask, m2 = tile(n, H, BB, BH)
    WDT = w_hh.dtype.element_ty
    ar = tl.zeros((BB, BH), ACC)
    az = tl.zeros((BB, BH), ACC)
    an = tl.zeros((BB, BH), ACC)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < H
        h = load_prev(h_prev, h0, rows, ks, H, n_cont, rmask[:, None] & kmask[None, :], ACC).to(WDT)
        ar = tl.dot(h, load_wt(w_hh, 0, units, ks, H, umask, kmask), ar, input_precision=PREC, out_dtype=ACC)
        az = tl.dot(h, load_wt(w_hh, H, units, ks, H, umask, kmask), az, input_precision=PREC, out_dtype=ACC)
        an = tl.dot(h, load_wt(w_hh, 2 * H, units, ks, H, umask, kmask), an, input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        ar += load_vec(b_hh, units, umask, ACC)[None, :]
        az += load_vec(b_hh, H + units, umask, ACC)[None, :]
        an += load_vec(b_hh, 2 * H + units, umask, ACC)[None, :]
    GH = 3 * H
    hp = load_prev(h_prev, h0, rows, units, H, n_cont, m2, ACC)
    r, z, nn, h_new = cell(load_tile(xw, rows, units, GH, m2, ACC), load_tile(xw, rows, H + units, GH, m2, ACC),
                           load_tile(xw, rows, 2 * H + units, GH, m2, ACC), ar, az, an, hp)
    tl.store(h_out + rows[:, None] * H + units[None, :], h_new.to(h_out.dtype.element_ty), mask=m2)
    if SAVE:
        soffs = rows[:, None] * (4 * H) + units[None, :]
        tl.store(saved + soffs, r, mask=m2)
        tl.store(saved + soffs + H, z, mask=m2)
        tl.store(saved + soffs + 2 * H, nn, mask=m2)
        tl.store(saved + soffs + 3 * H, an, mask=m2)


@triton.jit
def bwd_step(gy, rec_h, gn_h, saved, h_prev, w_hh, d_xw, d_gh, dh_out, dh_fin, n, n_cont, n_last, H,
             ACC: tl.constexpr, PREC: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr):
    """One backward step for rows [0, n) (see lstm.bwd_step): d_xw gets the pre-activation gradients,
    d_gh those of W_hh h + b_hh (they differ in the n block by the factor r)."""
    rows, cols, rmask, cmask, out_mask = tile(n, H, BB, BP)
    first = first_col_tile(rows)
    WDT = w_hh.dtype.element_ty
    GH = 3 * H
    acc = tl.zeros((BB, BP), ACC)
    for k0 in range(0, H, BK):
        u = k0 + tl.arange(0, BK)
        umask = u < H
        m2 = rmask[:, None] & umask[None, :]
        dh = load_tile(gy, rows, u, H, m2, ACC) + load_prev(rec_h, gn_h, rows, u, H, n_cont, m2, ACC)
        r = load_tile(saved, rows, u, 4 * H, m2, ACC)
        z = load_tile(saved, rows, H + u, 4 * H, m2, ACC)
        nn = load_tile(saved, rows, 2 * H + u, 4 * H, m2, ACC)
        ghn = load_tile(saved, rows, 3 * H + u, 4 * H, m2, ACC)
        hp = load_tile(h_prev, rows, u, H, m2, ACC)
        dpr, dpz, dpn, dghn = cell_bwd(dh, r, z, nn, ghn, hp)
        sm = m2 & first
        goffs = rows[:, None] * GH + u[None, :]
        DT = d_xw.dtype.element_ty
        tl.store(d_xw + goffs, dpr.to(DT), mask=sm)
        tl.store(d_xw + goffs + H, dpz.to(DT), mask=sm)
        tl.store(d_xw + goffs + 2 * H, dpn.to(DT), mask=sm)
        tl.store(d_gh + goffs, dpr.to(DT), mask=sm)
        tl.store(d_gh + goffs + H, dpz.to(DT), mask=sm)
        tl.store(d_gh + goffs + 2 * H, dghn.to(DT), mask=sm)
        acc = tl.dot(dpr.to(WDT), load_w(w_hh, 0, u, cols, H, umask, cmask), acc, input_precision=PREC,
                     out_dtype=ACC)
        acc = tl.dot(dpz.to(WDT), load_w(w_hh, H, u, cols, H, umask, cmask), acc, input_precision=PREC,
                     out_dtype=ACC)
        acc = tl.dot(dghn.to(WDT), load_w(w_hh, 2 * H, u, cols, H, umask, cmask), acc, input_precision=PREC,
                     out_dtype=ACC)
    # the direct path h_new = ... + z * h
    dh = load_tile(gy, rows, cols, H, out_mask, ACC) \
        + load_prev(rec_h, gn_h, rows, cols, H, n_cont, out_mask, ACC)
    acc += dh * load_tile(saved, rows, H + cols, 4 * H, out_mask, ACC)
    offs = rows[:, None] * H + cols[None, :]
    tl.store(dh_out + offs, acc.to(dh_out.dtype.element_ty), mask=out_mask)
    tl.store(dh_fin + offs, acc.to(dh_fin.dtype.element_ty), mask=out_mask & (rows[:, None] >= n_last))


@triton.jit
def fwd_seq(xw, w_hh, b_hh, h0, lengths, y, h_n, saved, T, B, H,
            HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr,
            ACC: tl.constexpr, PREC: tl.constexpr, BB: tl.constexpr, HP: tl.constexpr):
    """The whole sequence in one launch for H <= HP (see lstm.fwd_seq)."""
    rows, units, rmask, umask, m2 = tile(B, H, BB, HP)  # a 1-D grid: the one column tile holds every unit
    WDT = w_hh.dtype.element_ty
    GH = 3 * H
    wr = load_wt(w_hh, 0, units, units, H, umask, umask)
    wz = load_wt(w_hh, H, units, units, H, umask, umask)
    wn = load_wt(w_hh, 2 * H, units, units, H, umask, umask)
    if HAS_BIAS:
        br = load_vec(b_hh, units, umask, ACC)
        bz = load_vec(b_hh, H + units, umask, ACC)
        bn = load_vec(b_hh, 2 * H + units, umask, ACC)
    else:
        br = tl.zeros((HP,), ACC)
        bz = br
        bn = br
    h = load_tile(h0, rows, units, H, m2, ACC)
    lens, steps = row_lengths(lengths, rows, rmask, T, HAS_LEN, BB)
    for s in range(0, steps):
        t = time_index(s, steps, REVERSE)
        act = m2 & (t < lens)[:, None]
        x = xw + t.to(tl.int64) * B * GH
        hd = h.to(WDT)
        hr = tl.dot(hd, wr, input_precision=PREC, out_dtype=ACC) + br[None, :]
        hz = tl.dot(hd, wz, input_precision=PREC, out_dtype=ACC) + bz[None, :]
        hn = tl.dot(hd, wn, input_precision=PREC, out_dtype=ACC) + bn[None, :]
        r, z, nn, h_new = cell(load_tile(x, rows, units, GH, act, ACC), load_tile(x, rows, H + units, GH, act, ACC),
                               load_tile(x, rows, 2 * H + units, GH, act, ACC), hr, hz, hn, h)
        h = tl.where(act, h_new, h)
        tl.store(y + t.to(tl.int64) * B * H + rows[:, None] * H + units[None, :], h_new.to(y.dtype.element_ty),
                 mask=act)
        if SAVE:
            soffs = t.to(tl.int64) * B * 4 * H + rows[:, None] * (4 * H) + units[None, :]
            tl.store(saved + soffs, r, mask=act)
            tl.store(saved + soffs + H, z, mask=act)
            tl.store(saved + soffs + 2 * H, nn, mask=act)
            tl.store(saved + soffs + 3 * H, hn, mask=act)
    tl.store(h_n + rows[:, None] * H + units[None, :], h.to(h_n.dtype.element_ty), mask=m2)


# ---- the cell options: row kernels (host code: TritonBackend._gru_opts_fwd/_bwd) -------------------------
# A step is a matmul (raw = hm @ W_hh^T, cuBLAS) and one row kernel. Saved per step: r, z, n, ghn as in
# fwd_step, then (layer norm) the normalized raw product [3H] and its rstd.


@triton.jit
def fwd_opts_step(xw, raw, b_hh, ln_h, zm, rmask, p, h_state, y, hm, saved, xhat_h, rstd, n, H,
                  HAS_BIAS: tl.constexpr, LN: tl.constexpr, Z: tl.constexpr, RMASK: tl.constexpr,
                  SAVE: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr, HP: tl.constexpr):
    """One step of rows [0, n) with the cell options, from raw = hm @ W_hh^T: layer norm of raw over its
    3H columns (gain ln_h), + b_hh, the cell, zoneout of h (finish_h)."""
    rows, units, _, umask, m2 = tile(n, H, BR, HP)
    GH = 3 * H
    hr = load_tile(raw, rows, units, GH, m2, ACC)
    hz = load_tile(raw, rows, H + units, GH, m2, ACC)
    hn = load_tile(raw, rows, 2 * H + units, GH, m2, ACC)
    goffs = rows[:, None] * GH + units[None, :]
    if LN:
        mean = (tl.sum(hr, 1) + tl.sum(hz, 1) + tl.sum(hn, 1)) / GH
        hr = centered(hr, mean, m2)
        hz = centered(hz, mean, m2)
        hn = centered(hn, mean, m2)
        rs = 1.0 / tl.sqrt((tl.sum(hr * hr, 1) + tl.sum(hz * hz, 1) + tl.sum(hn * hn, 1)) / GH + LN_EPS)
        hr = hr * rs[:, None]
        hz = hz * rs[:, None]
        hn = hn * rs[:, None]
        if SAVE:
            tl.store(xhat_h + goffs, hr, mask=m2)
            tl.store(xhat_h + goffs + H, hz, mask=m2)
            tl.store(xhat_h + goffs + 2 * H, hn, mask=m2)
            tl.store(rstd + rows, rs, mask=rows < n)
        hr = hr * load_vec(ln_h, units, umask, ACC)[None, :]
        hz = hz * load_vec(ln_h, H + units, umask, ACC)[None, :]
        hn = hn * load_vec(ln_h, 2 * H + units, umask, ACC)[None, :]
    if HAS_BIAS:
        hr += load_vec(b_hh, units, umask, ACC)[None, :]
        hz += load_vec(b_hh, H + units, umask, ACC)[None, :]
        hn += load_vec(b_hh, 2 * H + units, umask, ACC)[None, :]
    hp = load_tile(h_state, rows, units, H, m2, ACC)
    r, z, nn, h_new = cell(load_tile(xw, rows, units, GH, m2, ACC), load_tile(xw, rows, H + units, GH, m2, ACC),
                           load_tile(xw, rows, 2 * H + units, GH, m2, ACC), hr, hz, hn, hp)
    if SAVE:
        soffs = rows[:, None] * (4 * H) + units[None, :]
        tl.store(saved + soffs, r, mask=m2)
        tl.store(saved + soffs + H, z, mask=m2)
        tl.store(saved + soffs + 2 * H, nn, mask=m2)
        tl.store(saved + soffs + 3 * H, hn, mask=m2)
    finish_h(h_new, h_state, zm, p, rmask, y, hm, rows, units, H, m2, Z, RMASK, ACC)


@triton.jit
def bwd_opts_step(gy, dh_state, zm, p, saved, h_prev, xhat_h, rstd, ln_h, d_xw, dg, d_raw, n, H,
                  LN: tl.constexpr, Z: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr, HP: tl.constexpr):
    """The backward of fwd_opts_step for rows [0, n): dh_t = grad_y_t + dh_state, split by zoneout; the
    pre-activation gradients into d_xw, those of gh = LN(raw) + b_hh into dg (ACC), of raw into d_raw
    (layer norm), and the direct share of dh_{t-1} (zoneout's and the z*h path's) into dh_state."""
    rows, units, _, umask, m2 = tile(n, H, BR, HP)
    GH = 3 * H
    dh, direct = split_dh(gy, dh_state, zm, p, rows, units, H, m2, Z, ACC)
    r = load_tile(saved, rows, units, 4 * H, m2, ACC)
    z = load_tile(saved, rows, H + units, 4 * H, m2, ACC)
    nn = load_tile(saved, rows, 2 * H + units, 4 * H, m2, ACC)
    ghn = load_tile(saved, rows, 3 * H + units, 4 * H, m2, ACC)
    dpr, dpz, dpn, dghn = cell_bwd(dh, r, z, nn, ghn, load_tile(h_prev, rows, units, H, m2, ACC))
    tl.store(dh_state + rows[:, None] * H + units[None, :], direct + dh * z, mask=m2)
    goffs = rows[:, None] * GH + units[None, :]
    DT = d_xw.dtype.element_ty
    tl.store(d_xw + goffs, dpr.to(DT), mask=m2)
    tl.store(d_xw + goffs + H, dpz.to(DT), mask=m2)
    tl.store(d_xw + goffs + 2 * H, dpn.to(DT), mask=m2)
    tl.store(dg + goffs, dpr, mask=m2)
    tl.store(dg + goffs + H, dpz, mask=m2)
    tl.store(dg + goffs + 2 * H, dghn, mask=m2)
    if LN:
        xr = load_tile(xhat_h, rows, units, GH, m2, ACC)
        xz = load_tile(xhat_h, rows, H + units, GH, m2, ACC)
        xn = load_tile(xhat_h, rows, 2 * H + units, GH, m2, ACC)
        dr = dpr * load_vec(ln_h, units, umask, ACC)[None, :]
        dz = dpz * load_vec(ln_h, H + units, umask, ACC)[None, :]
        dn = dghn * load_vec(ln_h, 2 * H + units, umask, ACC)[None, :]
        s1 = tl.sum(dr, 1) + tl.sum(dz, 1) + tl.sum(dn, 1)
        s2 = tl.sum(dr * xr, 1) + tl.sum(dz * xz, 1) + tl.sum(dn * xn, 1)
        rs = tl.load(rstd + rows, mask=rows < n, other=0.0).to(ACC)
        tl.store(d_raw + goffs, ln_backward(dr, xr, s1, s2, rs, GH), mask=m2)
        tl.store(d_raw + goffs + H, ln_backward(dz, xz, s1, s2, rs, GH), mask=m2)
        tl.store(d_raw + goffs + 2 * H, ln_backward(dn, xn, s1, s2, rs, GH), mask=m2)
