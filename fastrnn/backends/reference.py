"""The reference backend: per-step PyTorch math, any device, any float dtype.

It is the oracle for the LSTM variants and the fallback when no fused backend serves a call. The
cell math lives in ``lstm_cell``/``gru_cell``/``rnn_cell`` (one function per family); the sequence
loop and both backward passes are generic over them. The backward recomputes the forward under
autograd and differentiates it, so a new variant needs only its forward math here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import FLOAT_DTYPES, Backend
from ._common import autograd_inside_op, batch_sizes_from_lengths, empty_grads


def lstm_cell(xw, w_hh, b_hh, w_hr, w_ch, h, c, coupled):
    gates = xw + F.linear(h, w_hh, b_hh)
    if coupled:
        i, g, o = gates.chunk(3, 1)
    else:
        i, f, g, o = gates.chunk(4, 1)
    if w_ch is not None:
        i = i + w_ch[0] * c
        if not coupled:
            f = f + w_ch[1] * c
    i = torch.sigmoid(i)
    f = 1 - i if coupled else torch.sigmoid(f)
    c_new = f * c + i * torch.tanh(g)
    if w_ch is not None:
        o = o + w_ch[2] * c_new
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    if w_hr is not None:
        h_new = F.linear(h_new, w_hr)
    return h_new, c_new


def gru_cell(xw, w_hh, b_hh, h):
    xr, xz, xn = xw.chunk(3, 1)
    hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, 1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return ((1 - z) * n + z * h,)


def rnn_cell(xw, w_hh, b_hh, h, nonlinearity):
    pre = xw + F.linear(h, w_hh, b_hh)
    return (torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre),)


# family -> (cell, number of weights, number of state tensors)
CELLS = {"lstm": (lstm_cell, 4, 2), "gru": (gru_cell, 2, 1), "rnn": (rnn_cell, 2, 1)}


def _seq(family, xw, weights, state, lengths, reverse, options):
    cell = CELLS[family][0]
    T, B = xw.shape[0], xw.shape[1]
    sizes = batch_sizes_from_lengths(lengths, T, B)
    ys = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        n = sizes[t]
        if n == B:
            state = cell(xw[t], *weights, *state, *options)
            ys[t] = state[0]
        else:  # rows n.. are past their end: untouched
            new = cell(xw[t, :n], *weights, *(s[:n] for s in state), *options)
            state = tuple(torch.cat([a, s[n:]]) for a, s in zip(new, state))
            ys[t] = torch.cat([new[0], new[0].new_zeros(B - n, new[0].shape[1])])
    if T == 0:
        y = xw.new_zeros(0, B, state[0].shape[1])
    else:
        y = torch.stack(ys)
    return y, state


def _grad(outputs, grads, inputs):
    """d(outputs)/d(inputs) contracted with grads; zeros (or empty) for unused/absent inputs."""
    live = [x for x in inputs if x is not None]
    got = iter(torch.autograd.grad(outputs, live, grads, allow_unused=True))
    res = []
    for x in inputs:
        if x is None:
            res.append(None)
        else:
            g = next(got)
            res.append(torch.zeros_like(x) if g is None else g)
    return res


def _leaf(x):
    return None if x is None else x.detach().requires_grad_(True)


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    dtypes = FLOAT_DTYPES
    features = frozenset({"proj", "peephole", "coupled", "varlen"})

    # ---- generic implementations over CELLS -------------------------------------------------
    def _seq_fwd(self, family, args):
        nw, ns = CELLS[family][1], CELLS[family][2]
        xw, weights, state0 = args[0], args[1:1 + nw], args[1 + nw:1 + nw + ns]
        lengths, reverse, options = args[1 + nw + ns], args[2 + nw + ns], args[3 + nw + ns:-1]  # -1: save
        with torch.no_grad():
            y, state = _seq(family, xw, weights, state0, lengths, reverse, options)
        return (y, *(s.clone() if s is x else s for s, x in zip(state, state0)), xw.new_empty(0))

    def _seq_bwd(self, family, args):
        nw, ns = CELLS[family][1], CELLS[family][2]
        grads, rest = args[:1 + ns], args[1 + ns:]
        xw, weights, state0 = rest[0], rest[1:1 + nw], rest[1 + nw:1 + nw + ns]
        lengths = rest[1 + nw + ns]
        reverse, options = rest[4 + nw + ns], rest[5 + nw + ns:]  # skip y, ws
        inputs = [_leaf(xw), *map(_leaf, weights), *map(_leaf, state0)]
        with autograd_inside_op():
            y, state = _seq(family, inputs[0], inputs[1:1 + nw], inputs[1 + nw:], lengths, reverse, options)
            res = _grad([y, *state], list(grads), inputs)
        return empty_grads(res, xw)

    def _step_fwd(self, family, args):
        nw, ns = CELLS[family][1], CELLS[family][2]
        xw, weights, state = args[0], args[1:1 + nw], args[1 + nw:1 + nw + ns]
        with torch.no_grad():
            new = CELLS[family][0](xw, *weights, *state, *args[1 + nw + ns:-1])  # -1: save
        return (*(s.clone() if s is x else s for s, x in zip(new, state)), xw.new_empty(0))

    def _step_bwd(self, family, args):
        nw, ns = CELLS[family][1], CELLS[family][2]
        grads, rest = args[:ns], args[ns:]
        xw, weights, state = rest[0], rest[1:1 + nw], rest[1 + nw:1 + nw + ns]
        options = rest[2 + nw + ns:]  # skip ws
        inputs = [_leaf(xw), *map(_leaf, weights), *map(_leaf, state)]
        with autograd_inside_op():
            new = CELLS[family][0](*inputs, *options)
            res = _grad(list(new), list(grads), inputs)
        return empty_grads(res, xw)


def _bind(family, kind):
    impl = getattr(ReferenceBackend, "_" + kind)
    return lambda self, *args: impl(self, family, args)


for _family in CELLS:
    for _kind in ("seq_fwd", "seq_bwd", "step_fwd", "step_bwd"):
        setattr(ReferenceBackend, f"{_family}_{_kind}", _bind(_family, _kind))

BACKEND = ReferenceBackend()
