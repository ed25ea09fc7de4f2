"""LSTM kernels (with projection, peephole connections and coupled input-forget gate).

Workspace per step t (saved by the forward for the backward): the activated gates [B, G*H]
(i, f, g, o; or i, g, o when coupled), the cell state c_t [B, H], and with a projection the
pre-projection output h~_t = o * tanh(c_t) [B, H].
"""
from __future__ import annotations

import numba
from numba import prange

from .common import JIT, first_step, mm_nt, prev_t, sigmoid_, split, tanh_


@numba.njit(**JIT)
def _pointwise_fwd(t, n, lo, hi, H, xw, gates, b_hh, w_ch, coupled, c, c_all, hout):
    """Gates of units [lo, hi) for rows [0, n): raw recurrent products in gates[t] -> activations;
    updates c in place, writes c_t to c_all[t] and the (pre-projection) output to hout."""
    has_b = b_hh.shape[0] > 0
    peep = w_ch.shape[0] > 0
    for b in range(n):
        g_t = gates[t, b]
        x_t = xw[t, b]
        for u in range(lo, hi):
            cp = c[b, u]
            pi = g_t[u] + x_t[u]
            if coupled:
                pg = g_t[H + u] + x_t[H + u]
                po = g_t[2 * H + u] + x_t[2 * H + u]
            else:
                pf = g_t[H + u] + x_t[H + u]
                pg = g_t[2 * H + u] + x_t[2 * H + u]
                po = g_t[3 * H + u] + x_t[3 * H + u]
            if has_b:
                pi += b_hh[u]
                if coupled:
                    pg += b_hh[H + u]
                    po += b_hh[2 * H + u]
                else:
                    pf += b_hh[H + u]
                    pg += b_hh[2 * H + u]
                    po += b_hh[3 * H + u]
            if peep:
                pi += w_ch[0, u] * cp
                if not coupled:
                    pf += w_ch[1, u] * cp
            i = sigmoid_(pi)
            f = 1 - i if coupled else sigmoid_(pf)
            g = tanh_(pg)
            cn = f * cp + i * g
            if peep:
                po += w_ch[2, u] * cn
            o = sigmoid_(po)
            hout[b, u] = o * tanh_(cn)
            c[b, u] = cn
            c_all[t, b, u] = cn
            g_t[u] = i
            if coupled:
                g_t[H + u] = g
                g_t[2 * H + u] = o
            else:
                g_t[H + u] = f
                g_t[2 * H + u] = g
                g_t[3 * H + u] = o


@numba.njit(parallel=True, **JIT)
def lstm_fwd(xw, w_hh, b_hh, w_hr, w_ch, coupled, h0, c0, sizes, reverse, parts,
             y, h_n, c_n, gates, c_all, hfull, h_a, h_b, c):
    """Whole-sequence forward of one layer-direction; see fastrnn.backends for the contract.

    h_a, h_b: [B, P] state buffers (double-buffered: a step reads one, writes the other);
    c: [B, H] cell state (each unit is read and written by one thread only).
    """
    T, B = xw.shape[0], xw.shape[1]
    H = c0.shape[1]
    P = h0.shape[1]
    G = 3 if coupled else 4
    proj = w_hr.shape[0] > 0
    h_a[:, :] = h0
    h_b[:, :] = h0
    c[:, :] = c0
    src, dst = h_a, h_b
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = sizes[t]
        hout = hfull[t] if proj else dst
        for p in prange(parts):
            lo, hi = split(H, parts, p)
            for k in range(G):
                mm_nt(src, n, w_hh, gates[t], k * H + lo, k * H + hi, False)
            _pointwise_fwd(t, n, lo, hi, H, xw, gates, b_hh, w_ch, coupled, c, c_all, hout)
        if proj:
            for p in prange(parts):
                lo, hi = split(P, parts, p)
                mm_nt(hfull[t], n, w_hr, dst, lo, hi, False)
        for b in range(n):
            for k in range(P):
                y[t, b, k] = dst[b, k]
        src, dst = dst, src
    # final states: the state after each row's last step
    for b in range(B):
        last = 0 if reverse else T - 1
        if not reverse:
            while sizes[last] <= b:
                last -= 1
        for k in range(P):
            h_n[b, k] = y[last, b, k]
        for u in range(H):
            c_n[b, u] = c[b, u]


@numba.njit(**JIT)
def _pointwise_bwd(t, T, n, lo, hi, H, reverse, sizes, dh_rec, grad_y, dhf, proj, gates, c_all, c0, w_ch,
                   coupled, dc, dgates, dw_ch):
    peep = w_ch.shape[0] > 0
    for b in range(n):
        first = first_step(reverse, t, T, b, sizes)
        tp = prev_t(reverse, t)
        g_t = gates[t, b]
        d_t = dgates[t, b]
        for u in range(lo, hi):
            if proj:
                dh = dhf[b, u]
            else:
                dh = dh_rec[b, u] + grad_y[t, b, u]
            cn = c_all[t, b, u]
            cp = c0[b, u] if first else c_all[tp, b, u]
            i = g_t[u]
            if coupled:
                f = 1 - i
                g = g_t[H + u]
                o = g_t[2 * H + u]
            else:
                f = g_t[H + u]
                g = g_t[2 * H + u]
                o = g_t[3 * H + u]
            tc = tanh_(cn)
            dpo = dh * tc * o * (1 - o)
            dct = dc[b, u] + dh * o * (1 - tc * tc)
            if peep:
                dct += dpo * w_ch[2, u]
            if coupled:
                dpi = dct * (g - cp) * i * (1 - i)
                dpf = dct * 0
            else:
                dpi = dct * g * i * (1 - i)
                dpf = dct * cp * f * (1 - f)
            dpg = dct * i * (1 - g * g)
            dcp = dct * f
            if peep:
                dcp += dpi * w_ch[0, u]
                dw_ch[0, u] += dpi * cp
                dw_ch[2, u] += dpo * cn
                if not coupled:
                    dcp += dpf * w_ch[1, u]
                    dw_ch[1, u] += dpf * cp
            dc[b, u] = dcp
            d_t[u] = dpi
            if coupled:
                d_t[H + u] = dpg
                d_t[2 * H + u] = dpo
            else:
                d_t[H + u] = dpf
                d_t[2 * H + u] = dpg
                d_t[3 * H + u] = dpo


@numba.njit(parallel=True, **JIT)
def lstm_bwd(grad_y, grad_h_n, grad_c_n, w_hh_t, w_hr, w_hr_t, w_ch, coupled, h0, c0, sizes, reverse, parts,
             y, gates, c_all, hfull, dgates, h_prev, dh_proj, dh_rec, dhf, dc, dw_ch):
    """Whole-sequence backward of one layer-direction: the gate gradients of every step (dgates, also
    d_xw), the inputs of each step's recurrent product (h_prev, for dW_hh) and with a projection the
    gradient of each step's output (dh_proj, for dW_hr); dh_rec/dc end as d_h0/d_c0.

    w_hh_t = w_hh.T [P, G*H] and w_hr_t = w_hr.T [H, P], contiguous.
    """
    T = grad_y.shape[0]
    H = c0.shape[1]
    P = h0.shape[1]
    proj = w_hr.shape[0] > 0
    dh_rec[:, :] = grad_h_n
    dc[:, :] = grad_c_n
    dw_ch[:, :] = 0
    for s in range(T):
        t = s if reverse else T - 1 - s
        n = sizes[t]
        tp = prev_t(reverse, t)
        for b in range(n):
            first = first_step(reverse, t, T, b, sizes)
            for k in range(P):
                h_prev[t, b, k] = h0[b, k] if first else y[tp, b, k]
        if proj:
            for b in range(n):
                for k in range(P):
                    dh_proj[t, b, k] = dh_rec[b, k] + grad_y[t, b, k]
            for p in prange(parts):
                lo, hi = split(H, parts, p)
                mm_nt(dh_proj[t], n, w_hr_t, dhf, lo, hi, False)
        for p in prange(parts):
            lo, hi = split(H, parts, p)
            _pointwise_bwd(t, T, n, lo, hi, H, reverse, sizes, dh_rec, grad_y, dhf, proj, gates, c_all, c0,
                           w_ch, coupled, dc, dgates, dw_ch)
        for p in prange(parts):
            lo, hi = split(P, parts, p)
            mm_nt(dgates[t], n, w_hh_t, dh_rec, lo, hi, False)
