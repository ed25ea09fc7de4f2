"""GRU kernels with the cell options (layer norm of the recurrent product, zoneout, recurrent dropout),
forward and backward; one thread, as ``lstm_options``. torch's GRU form (reset after the recurrent product).

Workspace per step t: r, z, n [B, 3H], the n block of the recurrent product (normalized, plus b_hn) [B, H],
the normalized recurrent product [B, 3H] and its rstd [B, 1].
"""
from __future__ import annotations

import numba

from .common import JIT, fill_h_prev, final_h, mm_nt, sigmoid_, tanh_
from .lstm_options import _keep, recurrent_product


@numba.njit(**JIT)
def gru_opt_fwd(xw, w_hh, b_hh, ln_h, rmask, zmask, zp, h0, sizes, reverse, y, h_n, gates, hn_all, xhat, stats,
                h, hm):
    T = xw.shape[0]
    H = h0.shape[1]
    GH = 3 * H
    has_b = b_hh.shape[0] > 0
    one = xw.dtype.type(1)
    zp = xw.dtype.type(zp)
    h[:, :] = h0
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = sizes[t]
        st = t if gates.shape[0] == T else 0
        recurrent_product(h, hm, rmask, n, w_hh, gates[st], ln_h, xhat[st], stats[st])
        for b in range(n):
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
        for b in range(n):
            for j in range(H):
                h[b, j] = y[t, b, j]
    final_h(y, sizes, reverse, h_n)


@numba.njit(**JIT)
def gru_opt_bwd(grad_y, grad_h_n, w_hh_t, ln_h, rmask, zmask, zp, h0, sizes, reverse, y, gates, hn_all, xhat,
                stats, d_xw, d_rec, h_prev, hm_prev, dh_rec, carry, d_ln_h, d_b_hh):
    """d_xw; d_rec: the raw recurrent product's gradient (for dW_hh with hm_prev, the product's masked
    input); dh_rec ends as d_h0; with layer norm the gain's and b_hh's gradients accumulate (b_hh is
    added after the normalization)."""
    T = grad_y.shape[0]
    H = h0.shape[1]
    GH = 3 * H
    ln = ln_h.shape[0] > 0
    rdrop = rmask.shape[0] > 0
    one, zero = h0.dtype.type(1), h0.dtype.type(0)
    zp = h0.dtype.type(zp)
    dh_rec[:, :] = grad_h_n
    for s in range(T):
        t = s if reverse else T - 1 - s
        n = sizes[t]
        fill_h_prev(t, n, reverse, sizes, h0, y, h_prev)
        for b in range(n):
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
        mm_nt(d_rec[t], n, w_hh_t, dh_rec, 0, H, False)
        for b in range(n):
            for j in range(H):
                v = dh_rec[b, j]
                if rdrop:
                    v *= rmask[b, j]
                dh_rec[b, j] = v + carry[b, j]
