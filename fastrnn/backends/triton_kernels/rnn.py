"""Elman RNN kernels (tanh or relu). Nothing is saved for the backward beyond the outputs y."""
import triton
import triton.language as tl

from .common import (first_col_tile, load_prev, load_tile, load_vec, load_w, load_wt, row_lengths, tile,
                     time_index, tanh)


@triton.jit
def cell(pre, RELU: tl.constexpr):
    if RELU:
        return tl.where(pre < 0.0, 0.0, pre)  # NaN stays NaN, as in torch.relu
    else:
        return tanh(pre)


@triton.jit
def cell_bwd(dh, h, RELU: tl.constexpr):
    if RELU:
        return tl.where(h <= 0.0, 0.0, dh)  # as torch: the gradient passes where h is NaN
    else:
        return dh * (1.0 - h * h)


@triton.jit
def fwd_step(xw, w_hh, b_hh, h_prev, h0, h_out, n, n_cont, H,
             HAS_BIAS: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
             BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    """One step for rows [0, n) (see lstm.fwd_step)."""
    rows, units, rmask, umask, m2 = tile(n, H, BB, BH)
    WDT = w_hh.dtype.element_ty
    acc = tl.zeros((BB, BH), ACC)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < H
        h = load_prev(h_prev, h0, rows, ks, H, n_cont, rmask[:, None] & kmask[None, :], ACC).to(WDT)
        acc = tl.dot(h, load_wt(w_hh, 0, units, ks, H, umask, kmask), acc, input_precision=PREC, out_dtype=ACC)
    acc += load_tile(xw, rows, units, H, m2, ACC)
    if HAS_BIAS:
        acc += load_vec(b_hh, units, umask, ACC)[None, :]
    tl.store(h_out + rows[:, None] * H + units[None, :], cell(acc, RELU).to(h_out.dtype.element_ty), mask=m2)


@triton.jit
def bwd_step(gy, rec_h, gn_h, y_t, w_hh, d_xw, dh_out, dh_fin, n, n_cont, n_last, H,
             RELU: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
             BB: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr):
    """One backward step for rows [0, n) (see lstm.bwd_step)."""
    rows, cols, rmask, cmask, out_mask = tile(n, H, BB, BP)
    first = first_col_tile(rows)
    WDT = w_hh.dtype.element_ty
    acc = tl.zeros((BB, BP), ACC)
    for k0 in range(0, H, BK):
        u = k0 + tl.arange(0, BK)
        umask = u < H
        m2 = rmask[:, None] & umask[None, :]
        dh = load_tile(gy, rows, u, H, m2, ACC) + load_prev(rec_h, gn_h, rows, u, H, n_cont, m2, ACC)
        dpre = cell_bwd(dh, load_tile(y_t, rows, u, H, m2, ACC), RELU)
        tl.store(d_xw + rows[:, None] * H + u[None, :], dpre.to(d_xw.dtype.element_ty), mask=m2 & first)
        acc = tl.dot(dpre.to(WDT), load_w(w_hh, 0, u, cols, H, umask, cmask), acc, input_precision=PREC,
                     out_dtype=ACC)
    offs = rows[:, None] * H + cols[None, :]
    tl.store(dh_out + offs, acc.to(dh_out.dtype.element_ty), mask=out_mask)
    tl.store(dh_fin + offs, acc.to(dh_fin.dtype.element_ty), mask=out_mask & (rows[:, None] >= n_last))


@triton.jit
def fwd_seq(xw, w_hh, b_hh, h0, lengths, y, h_n, T, B, H,
            HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
            ACC: tl.constexpr, PREC: tl.constexpr, BB: tl.constexpr, HP: tl.constexpr):
    """The whole sequence in one launch for H <= HP (see lstm.fwd_seq)."""
    rows, units, rmask, umask, m2 = tile(B, H, BB, HP)  # a 1-D grid: the one column tile holds every unit
    WDT = w_hh.dtype.element_ty
    w = load_wt(w_hh, 0, units, units, H, umask, umask)
    if HAS_BIAS:
        b = load_vec(b_hh, units, umask, ACC)
    else:
        b = tl.zeros((HP,), ACC)
    h = load_tile(h0, rows, units, H, m2, ACC)
    lens, steps = row_lengths(lengths, rows, rmask, T, HAS_LEN, BB)
    for s in range(0, steps):
        t = time_index(s, steps, REVERSE)
        act = m2 & (t < lens)[:, None]
        pre = tl.dot(h.to(WDT), w, input_precision=PREC, out_dtype=ACC) + b[None, :] \
            + load_tile(xw + t.to(tl.int64) * B * H, rows, units, H, act, ACC)
        h_new = cell(pre, RELU)
        h = tl.where(act, h_new, h)
        tl.store(y + t.to(tl.int64) * B * H + rows[:, None] * H + units[None, :], h_new.to(y.dtype.element_ty),
                 mask=act)
    tl.store(h_n + rows[:, None] * H + units[None, :], h.to(h_n.dtype.element_ty), mask=m2)
