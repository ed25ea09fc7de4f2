"""LSTM kernels with the cell options (layer norm, zoneout, recurrent dropout), forward and backward.

Taken only when a call uses an option (the plain kernels in ``lstm.py`` stay as they are). A step's
matrix products (recurrent, projection, and the backward's) are split over ``parts`` threads by output
columns, its pointwise part by rows (a row's layer norm is its own; the backward's gradient accumulators
get one slice per thread). At batch 1 the pointwise part runs on one thread.
The math: ``fastrnn.backends`` (the contract) and ``fastrnn.modules._CELL_OPTIONS_DOC``.

Workspace per step t: the activated gates [B, G*H], the carried (zoned) c_t [B, H], with a projection the
pre-projection output [B, H], the cell's c~_t before zoneout [B, H], the normalized recurrent product
[B, G*H] and per row (rstd of the product, mean and rstd of c~) [B, 3].
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from .common import JIT, fill_h_prev, final_h, first_step, mm_nt, prev_t, sigmoid_, split, tanh_

EPS = 1e-5  # nn.LayerNorm's


@numba.njit(**JIT)
def _keep(mask, p, t, b, j):
    """Zoneout's keep weight of unit j of row b at step t: the mask's, or the probability (eval)."""
    if mask.shape[0] > 0:
        return mask[t, b, j]
    return p


@numba.njit(**JIT)
def mean_rstd(v):
    """(mean, 1/sqrt(var + eps)) of a row, biased variance as nn.LayerNorm. Every value stays in the row's
    dtype (a division by the int n would make the accumulators float64 for a float32 row, and the loops
    slower)."""
    n = v.dtype.type(v.shape[0])
    s = v.dtype.type(0)
    for k in range(v.shape[0]):
        s += v[k]
    mean = s / n
    q = v.dtype.type(0)
    for k in range(v.shape[0]):
        d = v[k] - mean
        q += d * d
    return mean, v.dtype.type(1) / math.sqrt(q / n + v.dtype.type(EPS))


@numba.njit(**JIT)
def masked(h, hm, rmask, n):
    """The recurrent product's input: h, or h times its recurrent dropout mask (written to hm)."""
    if rmask.shape[0] == 0:
        return h
    for b in range(n):
        for k in range(h.shape[1]):
            hm[b, k] = h[b, k] * rmask[b, k]
    return hm


@numba.njit(**JIT)
def normalize(g, lo, hi, ln_h, xhat, stats):
    """With layer norm (ln_h not empty): rows [lo, hi) of the recurrent product g normalized in place and
    times the gain ln_h; xhat and stats[:, 0] get the normalized rows and their rstd."""
    if ln_h.shape[0] > 0:
        for b in range(lo, hi):
            mean, rs = mean_rstd(g[b])
            stats[b, 0] = rs
            for k in range(g.shape[1]):
                xhat[b, k] = (g[b, k] - mean) * rs
                g[b, k] = xhat[b, k] * ln_h[k]


@numba.njit(**JIT)
def _fwd_rows(lo, hi, t, st, xw, b_hh, w_ch, ln_h, ln_c, ln_cb, zmask_c, zc, coupled, proj, gates, xhat, c, ctil,
              c_all, stats, hfull, hn):
    """The pointwise part of step t for rows [lo, hi): layer norm of the recurrent product, the cell, zoneout
    of c, the layer norm of c~ and the output before the projection (hfull, or hn without projection)."""
    H = c.shape[1]
    G = 3 if coupled else 4
    GH = G * H
    KG, KO = G - 2, G - 1
    peep = w_ch.shape[0] > 0
    ln = ln_h.shape[0] > 0
    has_b = b_hh.shape[0] > 0
    one, zero = xw.dtype.type(1), xw.dtype.type(0)
    normalize(gates[st], lo, hi, ln_h, xhat[st], stats[st])
    # one pass per piece of the cell over a row's units (each loop branch-free, so that it vectorizes)
    for b in range(lo, hi):
        g = gates[st, b]
        x = xw[t, b]
        if has_b:
            for k in range(GH):
                g[k] += x[k] + b_hh[k]
        else:
            for k in range(GH):
                g[k] += x[k]
        gi, gg, go = g[:H], g[KG * H:(KG + 1) * H], g[KO * H:]
        gf = g[H:2 * H]  # (the g block when coupled: not used)
        cb, ct = c[b], ctil[st, b]
        if peep:
            for j in range(H):
                gi[j] += w_ch[0, j] * cb[j]
            if not coupled:
                for j in range(H):
                    gf[j] += w_ch[1, j] * cb[j]
        for j in range(H):
            gi[j] = sigmoid_(gi[j])
        for j in range(H):
            gg[j] = tanh_(gg[j])
        if coupled:
            for j in range(H):
                ct[j] = (one - gi[j]) * cb[j] + gi[j] * gg[j]
        else:
            for j in range(H):
                gf[j] = sigmoid_(gf[j])
            for j in range(H):
                ct[j] = gf[j] * cb[j] + gi[j] * gg[j]
        if peep:
            for j in range(H):
                go[j] += w_ch[2, j] * ct[j]
        for j in range(H):
            go[j] = sigmoid_(go[j])
        if zmask_c.shape[0] > 0:  # zoneout of c: the step's mask (training) or p (eval)
            m = zmask_c[t, b]
            for j in range(H):
                cb[j] = m[j] * cb[j] + (one - m[j]) * ct[j]
        elif zc != zero:
            for j in range(H):
                cb[j] = zc * cb[j] + (one - zc) * ct[j]
        else:
            for j in range(H):
                cb[j] = ct[j]
        ca = c_all[st, b]
        for j in range(H):
            ca[j] = cb[j]
        out = hfull[st, b] if proj else hn[b]
        if ln:
            mc, rc = mean_rstd(ct)
            stats[st, b, 1] = mc
            stats[st, b, 2] = rc
            for j in range(H):
                out[j] = go[j] * tanh_((ct[j] - mc) * rc * ln_c[j] + ln_cb[j])
        else:
            for j in range(H):
                out[j] = go[j] * tanh_(ct[j])


@numba.njit(parallel=True, **JIT)
def lstm_opt_fwd(xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, zmask_h, zmask_c, zh, zc, coupled, h0, c0,
                 sizes, reverse, parts, y, h_n, c_n, gates, c_all, hfull, ctil, xhat, stats, h, hm, hn, c):
    """Whole-sequence forward of one layer-direction. gates .. stats: the workspace, [T, ...] to keep every
    step for the backward or [1, ...] to reuse one slot; h, hm, hn [B, P] and c [B, H]: scratch."""
    T = xw.shape[0]
    H = c0.shape[1]
    P = h0.shape[1]
    GH = (3 if coupled else 4) * H
    proj = w_hr.shape[0] > 0
    one = xw.dtype.type(1)
    zh, zc = xw.dtype.type(zh), xw.dtype.type(zc)
    h[:, :] = h0
    c[:, :] = c0
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = sizes[t]
        st = t if gates.shape[0] == T else 0
        src = masked(h, hm, rmask, n)
        for p in prange(parts):
            lo, hi = split(GH, parts, p)
            mm_nt(src, n, w_hh, gates[st], lo, hi, False)
        rows = min(parts, n)  # the pointwise part: rows split over the threads (a row's layer norm is its own)
        if rows > 1:
            for p in prange(rows):
                _fwd_rows(p * n // rows, (p + 1) * n // rows, t, st, xw, b_hh, w_ch, ln_h, ln_c, ln_cb, zmask_c, zc,
                          coupled, proj, gates, xhat, c, ctil, c_all, stats, hfull, hn)
        else:
            _fwd_rows(0, n, t, st, xw, b_hh, w_ch, ln_h, ln_c, ln_cb, zmask_c, zc, coupled, proj, gates, xhat, c,
                      ctil, c_all, stats, hfull, hn)
        if proj:
            for p in prange(parts):
                lo, hi = split(P, parts, p)
                mm_nt(hfull[st], n, w_hr, hn, lo, hi, False)
        for b in range(n):
            for k in range(P):
                kk = _keep(zmask_h, zh, t, b, k)
                v = kk * h[b, k] + (one - kk) * hn[b, k]
                h[b, k] = v
                y[t, b, k] = v
    final_h(y, sizes, reverse, h_n)
    c_n[:, :] = c


@numba.njit(**JIT)
def _bwd_rows(lo, hi, t, tp, reverse, sizes, w_ch, ln_h, ln_c, ln_cb, zmask_c, zc, coupled, c0, gates, c_all, ctil,
              xhat, stats, dgates, d_rec, dhf, dc, dw_ch, d_ln_h, d_ln_c, d_ln_cb):
    """The pointwise part of backward step t for rows [lo, hi) (from dhf, the gradient of the output before
    the projection, and dc): dgates, d_rec through the layer norm, dc_{t-1}; the peephole and layer-norm
    gradients accumulate into this part's dw_ch, d_ln_h, d_ln_c, d_ln_cb."""
    T = gates.shape[0]
    H = c0.shape[1]
    G = 3 if coupled else 4
    GH = G * H
    KG, KO = G - 2, G - 1
    peep = w_ch.shape[0] > 0
    ln = ln_h.shape[0] > 0
    one, zero = c0.dtype.type(1), c0.dtype.type(0)
    # one pass per piece over a row's units, each branch-free (so that it vectorizes), as in _fwd_rows
    for b in range(lo, hi):
        g = gates[t, b]
        d = dgates[t, b]
        gi, gg, go = g[:H], g[KG * H:(KG + 1) * H], g[KO * H:]
        di, dgg, do = d[:H], d[KG * H:(KG + 1) * H], d[KO * H:]
        gf, df = g[H:2 * H], d[H:2 * H]  # (not used when coupled)
        ct, da, dcb = ctil[t, b], dhf[b], dc[b]
        cp = c0[b] if first_step(reverse, t, T, b, sizes) else c_all[tp, b]
        if ln:  # through h = o * tanh(LN(c~)): da becomes dL/dc~
            mc, rc = stats[t, b, 1], stats[t, b, 2]
            for j in range(H):
                ch = (ct[j] - mc) * rc
                ta = tanh_(ch * ln_c[j] + ln_cb[j])
                do[j] = da[j] * ta * go[j] * (one - go[j])
                a = da[j] * go[j] * (one - ta * ta)
                d_ln_c[j] += a * ch
                d_ln_cb[j] += a
                da[j] = a * ln_c[j]
            s1, s2 = zero, zero
            for j in range(H):
                s1 += da[j]
                s2 += da[j] * (ct[j] - mc) * rc
            for j in range(H):
                da[j] = rc * (da[j] - s1 / H - (ct[j] - mc) * rc * s2 / H)
        else:
            for j in range(H):
                ta = tanh_(ct[j])
                do[j] = da[j] * ta * go[j] * (one - go[j])
                da[j] = da[j] * go[j] * (one - ta * ta)
        # zoneout of c: (1-k) of dc_t joins the cell's, k goes straight to c_{t-1} (left in dcb)
        if zmask_c.shape[0] > 0:
            m = zmask_c[t, b]
            for j in range(H):
                da[j] += (one - m[j]) * dcb[j]
                dcb[j] = m[j] * dcb[j]
        elif zc != zero:
            for j in range(H):
                da[j] += (one - zc) * dcb[j]
                dcb[j] = zc * dcb[j]
        else:
            for j in range(H):
                da[j] += dcb[j]
                dcb[j] = zero
        if peep:
            for j in range(H):
                da[j] += do[j] * w_ch[2, j]
                dw_ch[2, j] += do[j] * ct[j]
        for j in range(H):
            dgg[j] = da[j] * gi[j] * (one - gg[j] * gg[j])
        if coupled:
            for j in range(H):
                di[j] = da[j] * (gg[j] - cp[j]) * gi[j] * (one - gi[j])
                dcb[j] += da[j] * (one - gi[j])
        else:
            for j in range(H):
                di[j] = da[j] * gg[j] * gi[j] * (one - gi[j])
                df[j] = da[j] * cp[j] * gf[j] * (one - gf[j])
                dcb[j] += da[j] * gf[j]
        if peep:
            for j in range(H):
                dcb[j] += di[j] * w_ch[0, j]
                dw_ch[0, j] += di[j] * cp[j]
            if not coupled:
                for j in range(H):
                    dcb[j] += df[j] * w_ch[1, j]
                    dw_ch[1, j] += df[j] * cp[j]
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


@numba.njit(parallel=True, **JIT)
def lstm_opt_bwd(grad_y, grad_h_n, grad_c_n, w_hh_t, w_hr_t, w_ch, ln_h, ln_c, ln_cb, rmask, zmask_h, zmask_c,
                 zh, zc, coupled, h0, c0, sizes, reverse, parts, y, gates, c_all, ctil, xhat, stats, dgates, d_rec,
                 h_prev, dh_proj, dh_rec, dhf, dc, carry, dw_ch, d_ln_h, d_ln_c, d_ln_cb):
    """Whole-sequence backward: dgates (= d_xw) and d_rec (the raw recurrent product's gradient, for dW_hh
    and dh; the same array without layer norm), h_prev (the product's input, masked), dh_proj (projection);
    dh_rec/dc end as d_h0/d_c0; dw_ch and the layer norm's gradients accumulate, one slice per thread
    ([parts, ...]: the caller sums them)."""
    T = grad_y.shape[0]
    H = c0.shape[1]
    P = h0.shape[1]
    proj = w_hr_t.shape[0] > 0
    rdrop = rmask.shape[0] > 0
    one = c0.dtype.type(1)
    zh, zc = c0.dtype.type(zh), c0.dtype.type(zc)
    B = h0.shape[0]
    offs = np.arange(T) * B  # fill_h_prev's rows: step t's from t x B
    y2, h_prev2 = y.reshape((T * B, y.shape[2])), h_prev.reshape((T * B, h_prev.shape[2]))
    dh_rec[:, :] = grad_h_n
    dc[:, :] = grad_c_n
    for s in range(T):
        t = s if reverse else T - 1 - s
        n = sizes[t]
        tp = prev_t(reverse, t)
        fill_h_prev(t, 0, n, reverse, sizes, offs, h0, y2, h_prev2, 0, h_prev2.shape[1])
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
            for p in prange(parts):
                lo, hi = split(H, parts, p)
                mm_nt(dh_proj[t], n, w_hr_t, dhf, lo, hi, False)
        rows = min(parts, n)  # the pointwise part: rows split over the threads, each with its accumulators
        if rows > 1:
            for p in prange(rows):
                _bwd_rows(p * n // rows, (p + 1) * n // rows, t, tp, reverse, sizes, w_ch, ln_h, ln_c, ln_cb, zmask_c,
                          zc, coupled, c0, gates, c_all, ctil, xhat, stats, dgates, d_rec, dhf, dc, dw_ch[p], d_ln_h[p],
                          d_ln_c[p], d_ln_cb[p])
        else:
            _bwd_rows(0, n, t, tp, reverse, sizes, w_ch, ln_h, ln_c, ln_cb, zmask_c, zc, coupled, c0, gates, c_all,
                      ctil, xhat, stats, dgates, d_rec, dhf, dc, dw_ch[0], d_ln_h[0], d_ln_c[0], d_ln_cb[0])
        for p in prange(parts):
            lo, hi = split(P, parts, p)
            mm_nt(d_rec[t], n, w_hh_t, dh_rec, lo, hi, False)
        for b in range(n):
            for k in range(P):
                v = dh_rec[b, k]
                if rdrop:
                    v *= rmask[b, k]
                dh_rec[b, k] = v + carry[b, k]
