"""GRU kernels with the cell options (layer norm of the recurrent product, zoneout, recurrent dropout),
forward and backward; the products' columns and the pointwise part's rows split over ``parts`` threads, as
in ``lstm_options``. torch's GRU form (reset after the recurrent product).

Workspace per step t: r, z, n [B, 3H], the n block of the recurrent product (normalized, plus b_hn) [B, H],
the normalized recurrent product [B, 3H] and its rstd [B, 1].
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .common import JIT, fill_h_prev, final_h, mm_nt, sigmoid_, split, tanh_
from .lstm_options import _keep, masked, normalize


@numba.njit(**JIT)
def _fwd_rows(lo, hi, t, st, xw, b_hh, ln_h, zmask, zp, h, y, gates, hn_all, xhat, stats):
    """The pointwise part of step t for rows [lo, hi): layer norm of the recurrent product, the cell and
    zoneout, into y[t] (h is updated from it after every row is done)."""
    H = h.shape[1]
    GH = 3 * H
    has_b = b_hh.shape[0] > 0
    one = xw.dtype.type(1)
    normalize(gates[st], lo, hi, ln_h, xhat[st], stats[st])
    for b in range(lo, hi):
        g = gates[st, b]
        if has_b:
            for k in range(GH):
                g[k] += b_hh[k]
        for j in range(H):
            r = sigmoid_(xw[t, b, j] + g[j])
            z = sigmoid_(xw[t, b, H + j] + g[H + j])
            ghn = g[2 * H + j]
            nn = tanh_(xw[t, b, 2 * H + j] + r * ghn)
            g[j] = r
            g[H + j] = z
            g[2 * H + j] = nn
            hn_all[st, b, j] = ghn
            new = (one - z) * nn + z * h[b, j]
            k = _keep(zmask, zp, t, b, j)
            y[t, b, j] = k * h[b, j] + (one - k) * new


@numba.njit(parallel=True, **JIT)
def gru_opt_fwd(xw, w_hh, b_hh, ln_h, rmask, zmask, zp, h0, sizes, reverse, parts, y, h_n, gates, hn_all, xhat, stats,
                h, hm):
    T = xw.shape[0]
    H = h0.shape[1]
    GH = 3 * H
    zp = xw.dtype.type(zp)
    h[:, :] = h0
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = sizes[t]
        st = t if gates.shape[0] == T else 0
        src = masked(h, hm, rmask, n)
        for p in prange(parts):
            lo, hi = split(GH, parts, p)
            mm_nt(src, n, w_hh, gates[st], lo, hi, False)
        rows = min(parts, n)  # the pointwise part: rows split over the threads
        if rows > 1:
            for p in prange(rows):
                _fwd_rows(p * n // rows, (p + 1) * n // rows, t, st, xw, b_hh, ln_h, zmask, zp, h, y, gates, hn_all,
                          xhat, stats)
        else:
            _fwd_rows(0, n, t, st, xw, b_hh, ln_h, zmask, zp, h, y, gates, hn_all, xhat, stats)
        for b in range(n):
            for j in range(H):
                h[b, j] = y[t, b, j]
    final_h(y, sizes, reverse, h_n)


@numba.njit(**JIT)
def _bwd_rows(lo, hi, t, grad_y, ln_h, rmask, zmask, zp, gates, hn_all, xhat, stats, d_xw, d_rec, h_prev, hm_prev,
              dh_rec, carry, d_ln_h, d_b_hh):
    """The pointwise part of backward step t for rows [lo, hi): d_xw, d_rec (through the layer norm), the
    direct share of dh_{t-1} (carry), hm_prev; the layer norm's gradients accumulate into this part's
    d_ln_h, d_b_hh."""
    H = h_prev.shape[2]
    GH = 3 * H
    ln = ln_h.shape[0] > 0
    rdrop = rmask.shape[0] > 0
    one, zero = h_prev.dtype.type(1), h_prev.dtype.type(0)
    for b in range(lo, hi):
        g = gates[t, b]
        dx = d_xw[t, b]
        dr = d_rec[t, b]
        for j in range(H):
            full = grad_y[t, b, j] + dh_rec[b, j]
            k = _keep(zmask, zp, t, b, j)
            d = (one - k) * full
            r, z, nn = g[j], g[H + j], g[2 * H + j]
            d_n = d * (one - z) * (one - nn * nn)
            d_z = d * (h_prev[t, b, j] - nn) * z * (one - z)
            d_r = d_n * hn_all[t, b, j] * r * (one - r)
            dx[j] = d_r
            dx[H + j] = d_z
            dx[2 * H + j] = d_n
            dr[j] = d_r
            dr[H + j] = d_z
            dr[2 * H + j] = d_n * r
            carry[b, j] = k * full + d * z  # to h_{t-1}: zoneout's share and z * h_{t-1}'s
        if ln:
            t1, t2 = zero, zero
            for q in range(GH):
                dn = dr[q] * ln_h[q]
                t1 += dn
                t2 += dn * xhat[t, b, q]
            rs = stats[t, b, 0]
            for q in range(GH):
                d_b_hh[q] += dr[q]
                d_ln_h[q] += dr[q] * xhat[t, b, q]
                dr[q] = rs * (dr[q] * ln_h[q] - t1 / GH - xhat[t, b, q] * t2 / GH)
        for j in range(H):
            hm_prev[t, b, j] = h_prev[t, b, j] * rmask[b, j] if rdrop else h_prev[t, b, j]


@numba.njit(parallel=True, **JIT)
def gru_opt_bwd(grad_y, grad_h_n, w_hh_t, ln_h, rmask, zmask, zp, h0, sizes, reverse, parts, y, gates, hn_all, xhat,
                stats, d_xw, d_rec, h_prev, hm_prev, dh_rec, carry, d_ln_h, d_b_hh):
    """d_xw; d_rec: the raw recurrent product's gradient (for dW_hh with hm_prev, the product's masked
    input); dh_rec ends as d_h0; with layer norm the gain's and b_hh's gradients accumulate (b_hh is
    added after the normalization), one slice per thread ([parts, 3H]: the caller sums them)."""
    T = grad_y.shape[0]
    H = h0.shape[1]
    rdrop = rmask.shape[0] > 0
    zp = h0.dtype.type(zp)
    B = h0.shape[0]
    offs = np.arange(T) * B  # fill_h_prev's rows: step t's from t x B
    y2, h_prev2 = y.reshape((T * B, y.shape[2])), h_prev.reshape((T * B, h_prev.shape[2]))
    dh_rec[:, :] = grad_h_n
    for s in range(T):
        t = s if reverse else T - 1 - s
        n = sizes[t]
        fill_h_prev(t, 0, n, reverse, sizes, offs, h0, y2, h_prev2, 0, h_prev2.shape[1])
        rows = min(parts, n)  # the pointwise part: rows split over the threads, each with its accumulators
        if rows > 1:
            for p in prange(rows):
                _bwd_rows(p * n // rows, (p + 1) * n // rows, t, grad_y, ln_h, rmask, zmask, zp, gates, hn_all, xhat,
                          stats, d_xw, d_rec, h_prev, hm_prev, dh_rec, carry, d_ln_h[p], d_b_hh[p])
        else:
            _bwd_rows(0, n, t, grad_y, ln_h, rmask, zmask, zp, gates, hn_all, xhat, stats, d_xw, d_rec, h_prev,
                      hm_prev, dh_rec, carry, d_ln_h[0], d_b_hh[0])
        for p in prange(parts):
            lo, hi = split(H, parts, p)
            mm_nt(d_rec[t], n, w_hh_t, dh_rec, lo, hi, False)
        for b in range(n):
            for j in range(H):
                v = dh_rec[b, j]
                if rdrop:
                    v *= rmask[b, j]
                dh_rec[b, j] = v + carry[b, j]
