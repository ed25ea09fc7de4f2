"""Quantized inference on numba (``fastrnn.quantize``, backend "numba"): one layer-direction of an LSTM, GRU
or RNN with int8 or bfloat16 weights, the math of fastrnn/quantized.py's docstring (the reference backend is
its oracle, csrc/quant.cpp the fast kernel).

int8: activations quantized per row as the contract says, integer sums (exact), ``(float(sum) * s_a) * s_w``.
bfloat16: the weights come widened to float32 and the activations are rounded to bfloat16 (round to nearest
even) before the float32 products. The products run over output columns in parallel (prange); the gates'
pass per unit."""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .common import JIT, sigmoid_, tanh_

F127 = np.float32(127.0)
FMAX = np.float32(3.4028235e38)
F0 = np.float32(0.0)
F1 = np.float32(1.0)


@numba.njit(**JIT)
def quant_rows(x, q, s):
    """int8 rows of x [M, K] into q (int32 [M, K]) and their scales s [M] (NaN for a row with a NaN/inf)."""
    M, K = x.shape
    for m in range(M):
        amax = F0
        bad = False
        for k in range(K):
            a = abs(x[m, k])
            if not (a <= FMAX):
                bad = True
            elif a > amax:
                amax = a
        if bad:
            s[m] = np.float32(np.nan)
            inv = F0
        else:
            s[m] = amax / F127
            inv = F127 / amax if amax > F0 else F0
        for k in range(K):
            v = np.rint(x[m, k] * inv)
            if v > F127:
                v = F127
            elif v < -F127:
                v = -F127
            q[m, k] = np.int32(v) if v == v else 0


@numba.njit(**JIT)
def bf16_rows(x, out):
    """x [M, K] rounded to bfloat16 (nearest even), as float32 values, into out."""
    xi = x.view(np.uint32)
    oi = out.view(np.uint32)
    M, K = x.shape
    for m in range(M):
        for k in range(K):
            u = np.int64(xi[m, k])
            if (u & 0x7FFFFFFF) > 0x7F800000:
                oi[m, k] = np.uint32((u | 0x400000) & 0xFFFF0000)
            else:
                oi[m, k] = np.uint32(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16)


@numba.njit(parallel=True, **JIT)
def product_i8(q, sa, w, sw, out):
    """out[m, n] = (float(sum_k q[m,k] w[n,k]) * sa[m]) * sw[n] for the rows of q."""
    M, K = q.shape
    N = w.shape[0]
    for n in prange(N):
        for m in range(M):
            acc = np.int32(0)
            for k in range(K):
                acc += q[m, k] * w[n, k]
            out[m, n] = (np.float32(acc) * sa[m]) * sw[n]


@numba.njit(parallel=True, **JIT)
def product_f32(a, w, out):
    """out[m, n] = sum_k a[m,k] w[n,k] in float32 (bfloat16 values widened)."""
    M, K = a.shape
    N = w.shape[0]
    for n in prange(N):
        for m in range(M):
            acc = F0
            for k in range(K):
                acc += a[m, k] * w[n, k]
            out[m, n] = acc


@numba.njit(**JIT)
def product(a, w, sw, int8, qbuf, sbuf, fbuf, out):
    """The quantized product of activations a [M, K] with weight w (int8 with row scales sw, or float32
    holding bfloat16 values), into out [M, N]; qbuf/sbuf/fbuf: scratch of at least a's shape."""
    M = a.shape[0]
    if int8:
        quant_rows(a, qbuf[:M], sbuf[:M])
        product_i8(qbuf[:M], sbuf[:M], w, sw, out)
    else:
        bf16_rows(a, fbuf[:M])
        product_f32(fbuf[:M], w, out)


@numba.njit(**JIT)
def seq(family, int8, xw, whh, shh, bhn, whr, shr, wch, h0, c0, sizes, reverse, coupled, y, hT, cT):
    """The recurrence of one layer-direction: xw [T, B, G*H] (input products + biases, GRU's b_hn apart in
    bhn), h0 [B, P], c0 [B, H] (LSTM); family 0 LSTM, 1 GRU, 2 RNN tanh, 3 RNN relu. Writes y [T, B, P]
    (zeros past a row's end), hT, cT."""
    T, B = xw.shape[0], xw.shape[1]
    P = h0.shape[1]
    H = c0.shape[1] if family == 0 else P
    GH = whh.shape[0]
    proj = whr.shape[0] > 0
    peep = wch.shape[0] > 0
    h = h0.copy()
    c = c0.copy()
    gh = np.empty((B, GH), np.float32)
    hfull = np.empty((B, H), np.float32)
    K = max(P, H)
    qbuf = np.empty((B, K), np.int32)
    sbuf = np.empty(B, np.float32)
    fbuf = np.empty((B, K), np.float32)
    hbuf = np.empty((B, P), np.float32)
    y[:] = F0
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = sizes[t]
        if n == 0:
            continue
        product(h[:n], whh, shh, int8, qbuf[:, :P], sbuf, fbuf[:, :P], gh[:n])
        for b in range(n):
            x = xw[t, b]
            g = gh[b]
            for u in range(H):
                if family == 0:
                    if coupled:
                        gi, gf, gg, go = x[u] + g[u], F0, x[H + u] + g[H + u], x[2 * H + u] + g[2 * H + u]
                    else:
                        gi, gf = x[u] + g[u], x[H + u] + g[H + u]
                        gg, go = x[2 * H + u] + g[2 * H + u], x[3 * H + u] + g[3 * H + u]
                    cp = c[b, u]
                    if peep:
                        gi = gi + wch[0, u] * cp
                        gf = gf + wch[1, u] * cp
                    i = sigmoid_(gi)
                    f = F1 - i if coupled else sigmoid_(gf)
                    cn = f * cp + i * tanh_(gg)
                    if peep:
                        go = go + wch[2, u] * cn
                    c[b, u] = cn
                    hfull[b, u] = sigmoid_(go) * tanh_(cn)
                elif family == 1:
                    r = sigmoid_(x[u] + g[u])
                    z = sigmoid_(x[H + u] + g[H + u])
                    hn = g[2 * H + u] + bhn[u] if bhn.shape[0] > 0 else g[2 * H + u]
                    nn = tanh_(x[2 * H + u] + r * hn)
                    hfull[b, u] = (F1 - z) * nn + z * h[b, u]
                else:
                    v = x[u] + g[u]
                    if family == 2:
                        hfull[b, u] = tanh_(v)
                    else:
                        hfull[b, u] = v if v > F0 else (F0 if v == v else v)
        if proj:
            product(hfull[:n], whr, shr, int8, qbuf[:, :H], sbuf, fbuf[:, :H], hbuf[:n])
            h[:n] = hbuf[:n]
        else:
            h[:n] = hfull[:n]
        y[t, :n] = h[:n]
    hT[:] = h
    if family == 0:
        cT[:] = c
