"""LSTM kernels with the cell options (layer norm, zoneout, recurrent dropout), forward and backward.

Taken only when a call uses an option (the plain kernels in ``lstm.py`` stay as they are). One thread: a
step's layer norm reduces over all of a row's units, and the options' users train at the batch sizes
where the recurrence is short anyway; the cpp backend splits these over threads. The math:
``fastrnn.backends`` (the contract) and ``fastrnn.modules._CELL_OPTIONS_DOC``.

Workspace per step t: the activated gates [B, G*H], the carried (zoned) c_t [B, H], with a projection the
pre-projection output [B, H], the cell's c~_t before zoneout [B, H], the normalized recurrent product
[B, G*H] and per row (rstd of the product, mean and rstd of c~) [B, 3].
"""
from __future__ import annotations

import math

import numba

from .common import JIT, fill_h_prev, final_h, first_step, mm_nt, prev_t, sigmoid_, tanh_

EPS = 1e-5  # nn.LayerNorm's


@numba.njit(**JIT)
def _keep(mask, p, t, b, j):
    """Zoneout's keep weight of unit j of row b at step t: the mask's, or the probability (eval)."""
    if mask.shape[0] > 0:
        return mask[t, b, j]
    return p


@numba.njit(**JIT)
def mean_rstd(v):
    """(mean, 1/sqrt(var + eps)) of a row, biased variance as nn.LayerNorm."""
    n = v.shape[0]
    mean = v.dtype.type(0)
    for k in range(n):
        mean += v[k]
    mean /= n
    var = v.dtype.type(0)
    for k in range(n):
        var += (v[k] - mean) * (v[k] - mean)
    return mean, v.dtype.type(1) / math.sqrt(var / n + v.dtype.type(EPS))


@numba.njit(**JIT)
def recurrent_product(h, hm, rmask, n, w_hh, g, ln_h, xhat, stats):
    """g[:n] = the recurrent product of rows [0, n) (h times its recurrent dropout mask, when given), with
    layer norm over each row (gain ln_h; xhat and stats[:, 0] get the normalized row and its rstd)."""
    src = h
    if rmask.shape[0] > 0:
        for b in range(n):
            for k in range(h.shape[1]):
                hm[b, k] = h[b, k] * rmask[b, k]
        src = hm
    mm_nt(src, n, w_hh, g, 0, g.shape[1], False)
    if ln_h.shape[0] > 0:
        for b in range(n):
            mean, rs = mean_rstd(g[b])
            stats[b, 0] = rs
            for k in range(g.shape[1]):
                xhat[b, k] = (g[b, k] - mean) * rs
                g[b, k] = xhat[b, k] * ln_h[k]


@numba.njit(**JIT)
def lstm_opt_fwd(xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, zmask_h, zmask_c, zh, zc, coupled, h0, c0,
                 sizes, reverse, y, h_n, c_n, gates, c_all, hfull, ctil, xhat, stats, h, hm, hn, c):
    """Whole-sequence forward of one layer-direction. gates .. stats: the workspace, [T, ...] to keep every
    step for the backward or [1, ...] to reuse one slot; h, hm, hn [B, P] and c [B, H]: scratch."""
    T, B = xw.shape[0], xw.shape[1]
    H = c0.shape[1]
    P = h0.shape[1]
    G = 3 if coupled else 4
    GH = G * H
    KG, KO = G - 2, G - 1
    proj = w_hr.shape[0] > 0
    peep = w_ch.shape[0] > 0
    ln = ln_h.shape[0] > 0
    has_b = b_hh.shape[0] > 0
    one, zero = xw.dtype.type(1), xw.dtype.type(0)
    zh, zc = xw.dtype.type(zh), xw.dtype.type(zc)
    h[:, :] = h0
    c[:, :] = c0
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = sizes[t]
        st = t if gates.shape[0] == T else 0
        recurrent_product(h, hm, rmask, n, w_hh, gates[st], ln_h, xhat[st], stats[st])
        for b in range(n):
            g = gates[st, b]
            for k in range(GH):
                g[k] += xw[t, b, k]
                if has_b:
                    g[k] += b_hh[k]
            for j in range(H):
                cp = c[b, j]
                gi = g[j]
                gf = zero if coupled else g[H + j]
                if peep:
                    gi += w_ch[0, j] * cp
                    if not coupled:
                        gf += w_ch[1, j] * cp
                i = sigmoid_(gi)
                f = one - i if coupled else sigmoid_(gf)
                gg = tanh_(g[KG * H + j])
                cn = f * cp + i * gg
                go = g[KO * H + j]
                if peep:
                    go += w_ch[2, j] * cn
                o = sigmoid_(go)
                g[j] = i
                if not coupled:
                    g[H + j] = f
                g[KG * H + j] = gg
                g[KO * H + j] = o
                ctil[st, b, j] = cn
                k = _keep(zmask_c, zc, t, b, j)
                c[b, j] = k * cp + (one - k) * cn
                c_all[st, b, j] = c[b, j]
            mc, rc = zero, one
            if ln:
                mc, rc = mean_rstd(ctil[st, b])
                stats[st, b, 1] = mc
                stats[st, b, 2] = rc
            out = hfull[st, b] if proj else hn[b]
            for j in range(H):
                a = ctil[st, b, j]
                if ln:
                    a = (a - mc) * rc * ln_c[j] + ln_cb[j]
                out[j] = g[KO * H + j] * tanh_(a)
        if proj:
            mm_nt(hfull[st], n, w_hr, hn, 0, P, False)
        for b in range(n):
            for k in range(P):
                kk = _keep(zmask_h, zh, t, b, k)
                v = kk * h[b, k] + (one - kk) * hn[b, k]
                h[b, k] = v
                y[t, b, k] = v
    final_h(y, sizes, reverse, h_n)
    c_n[:, :] = c


@numba.njit(**JIT)
def lstm_opt_bwd(grad_y, grad_h_n, grad_c_n, w_hh_t, w_hr_t, w_ch, ln_h, ln_c, ln_cb, rmask, zmask_h, zmask_c,
                 zh, zc, coupled, h0, c0, sizes, reverse, y, gates, c_all, ctil, xhat, stats, dgates, d_rec,
                 h_prev, dh_proj, dh_rec, dhf, dc, carry, dw_ch, d_ln_h, d_ln_c, d_ln_cb):
    """Whole-sequence backward: dgates (= d_xw) and d_rec (the raw recurrent product's gradient, for dW_hh
    and dh; the same array without layer norm), h_prev (the product's input, masked), dh_proj (projection);
    dh_rec/dc end as d_h0/d_c0; dw_ch and the layer norm's gradients accumulate."""
    T = grad_y.shape[0]
    H = c0.shape[1]
    P = h0.shape[1]
    G = 3 if coupled else 4
    GH = G * H
    KG, KO = G - 2, G - 1
    proj = w_hr_t.shape[0] > 0
    peep = w_ch.shape[0] > 0
    ln = ln_h.shape[0] > 0
    rdrop = rmask.shape[0] > 0
    one, zero = c0.dtype.type(1), c0.dtype.type(0)
    zh, zc = c0.dtype.type(zh), c0.dtype.type(zc)
    dh_rec[:, :] = grad_h_n
    dc[:, :] = grad_c_n
    for s in range(T):
        t = s if reverse else T - 1 - s
        n = sizes[t]
        tp = prev_t(reverse, t)
        fill_h_prev(t, n, reverse, sizes, h0, y, h_prev)
        if rdrop:
            for b in range(n):
                for k in range(P):
                    h_prev[t, b, k] *= rmask[b, k]
        for b in range(n):  # zoneout of h: (1-k) of dh_t to the cell, k carried to h_{t-1}
            for k in range(P):
                full = grad_y[t, b, k] + dh_rec[b, k]
                kk = _keep(zmask_h, zh, t, b, k)
                carry[b, k] = kk * full
                if proj:
                    dh_proj[t, b, k] = (one - kk) * full
                else:
                    dhf[b, k] = (one - kk) * full
        if proj:
            mm_nt(dh_proj[t], n, w_hr_t, dhf, 0, H, False)
        for b in range(n):
            g = gates[t, b]
            d = dgates[t, b]
            first = first_step(reverse, t, T, b, sizes)
            mc, rc = zero, one
            if ln:
                mc, rc = stats[t, b, 1], stats[t, b, 2]
            s1, s2 = zero, zero
            for j in range(H):  # through h = o * tanh(a), a = c~ or its layer norm
                o = g[KO * H + j]
                a = ctil[t, b, j]
                ch = (a - mc) * rc
                if ln:
                    a = ch * ln_c[j] + ln_cb[j]
                ta = tanh_(a)
                d[KO * H + j] = dhf[b, j] * ta * o * (one - o)
                da = dhf[b, j] * o * (one - ta * ta)
                if ln:
                    d_ln_c[j] += da * ch
                    d_ln_cb[j] += da
                    da *= ln_c[j]
                    s1 += da
                    s2 += da * ch
                dhf[b, j] = da  # reused: the gradient of a (times the gain)
            for j in range(H):
                i = g[j]
                gg = g[KG * H + j]
                f = one - i if coupled else g[H + j]
                cp = c0[b, j] if first else c_all[tp, b, j]
                d_o = d[KO * H + j]
                dct = dhf[b, j]
                if ln:
                    ch = (ctil[t, b, j] - mc) * rc
                    dct = rc * (dct - s1 / H - ch * s2 / H)
                kc = _keep(zmask_c, zc, t, b, j)
                dcv = dct + (one - kc) * dc[b, j]
                if peep:
                    dcv += d_o * w_ch[2, j]
                d_g = dcv * i * (one - gg * gg)
                if coupled:
                    d_i = dcv * (gg - cp) * i * (one - i)
                    d_f = zero
                else:
                    d_i = dcv * gg * i * (one - i)
                    d_f = dcv * cp * f * (one - f)
                dcp = kc * dc[b, j] + dcv * f
                if peep:
                    dcp += d_i * w_ch[0, j]
                    dw_ch[0, j] += d_i * cp
                    if not coupled:
                        dcp += d_f * w_ch[1, j]
                        dw_ch[1, j] += d_f * cp
                    dw_ch[2, j] += d_o * ctil[t, b, j]
                dc[b, j] = dcp
                d[j] = d_i
                if not coupled:
                    d[H + j] = d_f
                d[KG * H + j] = d_g
            if ln:  # through the recurrent product's layer norm
                t1, t2 = zero, zero
                for k in range(GH):
                    dn = d[k] * ln_h[k]
                    t1 += dn
                    t2 += dn * xhat[t, b, k]
                rs = stats[t, b, 0]
                for k in range(GH):
                    d_ln_h[k] += d[k] * xhat[t, b, k]
                    d_rec[t, b, k] = rs * (d[k] * ln_h[k] - t1 / GH - xhat[t, b, k] * t2 / GH)
        mm_nt(d_rec[t], n, w_hh_t, dh_rec, 0, P, False)
        for b in range(n):
            for k in range(P):
                v = dh_rec[b, k]
                if rdrop:
                    v *= rmask[b, k]
                dh_rec[b, k] = v + carry[b, k]
