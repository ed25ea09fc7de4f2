"""GRU kernels, torch's form: n = tanh(x_n + r * (W_hn h + b_hn)), reset applied after the product.

Workspace per step t: the activated gates r, z, n [B, 3H] and the recurrent part of the candidate,
W_hn h + b_hn [B, H] (its gradient needs it, and it cannot be merged with x_n).
"""
from __future__ import annotations

import numba
from numba import prange

from .common import JIT, first_step, mm_nt, prev_t, sigmoid_, split, tanh_


@numba.njit(**JIT)
def _pointwise_fwd(t, n, lo, hi, H, xw, gates, hn_all, b_hh, src, dst):
    has_b = b_hh.shape[0] > 0
    for b in range(n):
        g_t = gates[t, b]
        x_t = xw[t, b]
        for u in range(lo, hi):
            hr = g_t[u]
            hz = g_t[H + u]
            hn = g_t[2 * H + u]
            if has_b:
                hr += b_hh[u]
                hz += b_hh[H + u]
                hn += b_hh[2 * H + u]
            r = sigmoid_(x_t[u] + hr)
            z = sigmoid_(x_t[H + u] + hz)
            nn = tanh_(x_t[2 * H + u] + r * hn)
            dst[b, u] = (1 - z) * nn + z * src[b, u]
            g_t[u] = r
            g_t[H + u] = z
            g_t[2 * H + u] = nn
            hn_all[t, b, u] = hn


@numba.njit(parallel=True, **JIT)
def gru_fwd(xw, w_hh, b_hh, h0, sizes, reverse, parts, y, h_n, gates, hn_all, h_a, h_b):
    T, B = xw.shape[0], xw.shape[1]
    H = h0.shape[1]
    h_a[:, :] = h0
    h_b[:, :] = h0
    src, dst = h_a, h_b
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = sizes[t]
        for p in prange(parts):
            lo, hi = split(H, parts, p)
            for k in range(3):
                mm_nt(src, n, w_hh, gates[t], k * H + lo, k * H + hi, False)
            _pointwise_fwd(t, n, lo, hi, H, xw, gates, hn_all, b_hh, src, dst)
        for b in range(n):
            for k in range(H):
                y[t, b, k] = dst[b, k]
        src, dst = dst, src
    for b in range(B):
        last = 0 if reverse else T - 1
        if not reverse:
            while sizes[last] <= b:
                last -= 1
        for k in range(H):
            h_n[b, k] = y[last, b, k]


@numba.njit(**JIT)
def _pointwise_bwd(t, n, lo, hi, H, dh_rec, grad_y, gates, hn_all, h_prev, d_xw, d_hh, dh_direct):
    for b in range(n):
        g_t = gates[t, b]
        dx = d_xw[t, b]
        dr_ = d_hh[t, b]
        for u in range(lo, hi):
            dh = dh_rec[b, u] + grad_y[t, b, u]
            r = g_t[u]
            z = g_t[H + u]
            nn = g_t[2 * H + u]
            hp = h_prev[t, b, u]
            dpn = dh * (1 - z) * (1 - nn * nn)
            dpz = dh * (hp - nn) * z * (1 - z)
            dpr = dpn * hn_all[t, b, u] * r * (1 - r)
            dx[u] = dpr
            dx[H + u] = dpz
            dx[2 * H + u] = dpn
            dr_[u] = dpr
            dr_[H + u] = dpz
            dr_[2 * H + u] = dpn * r
            dh_direct[b, u] = dh * z


@numba.njit(parallel=True, **JIT)
def gru_bwd(grad_y, grad_h_n, w_hh_t, h0, sizes, reverse, parts, y, gates, hn_all, d_xw, d_hh, h_prev, dh_rec,
            dh_direct):
    """d_xw: gradient of the input projection; d_hh: of the recurrent product (W_hh h + b_hh), for dW_hh
    and db_hh; h_prev: each step's recurrent input; dh_rec ends as d_h0. w_hh_t = w_hh.T [H, 3H]."""
    T = grad_y.shape[0]
    H = h0.shape[1]
    dh_rec[:, :] = grad_h_n
    for s in range(T):
        t = s if reverse else T - 1 - s
        n = sizes[t]
        tp = prev_t(reverse, t)
        for b in range(n):
            first = first_step(reverse, t, T, b, sizes)
            for k in range(H):
                h_prev[t, b, k] = h0[b, k] if first else y[tp, b, k]
        for p in prange(parts):
            lo, hi = split(H, parts, p)
            _pointwise_bwd(t, n, lo, hi, H, dh_rec, grad_y, gates, hn_all, h_prev, d_xw, d_hh, dh_direct)
        for p in prange(parts):
            lo, hi = split(H, parts, p)
            for b in range(n):
                for k in range(lo, hi):
                    dh_rec[b, k] = dh_direct[b, k]
            mm_nt(d_hh[t], n, w_hh_t, dh_rec, lo, hi, True)
