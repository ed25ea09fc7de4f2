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
from ._common import autograd_inside_op, batch_sizes_from_lengths, empty_grads, through_padded


#: nn.LayerNorm's default eps, used by every layer normalization of the cells
LN_EPS = 1e-5


def _recurrent(h, w_hh, b_hh, ln_h, rmask):
    """The recurrent product ``gh``: h (times its recurrent dropout mask) @ w_hh.T, layer-normalized over
    its G*H columns with gain ``ln_h`` when given, plus b_hh (added after the normalization)."""
    if rmask is not None:
        h = h * rmask
    if ln_h is None:
        return F.linear(h, w_hh, b_hh)
    gh = F.layer_norm(F.linear(h, w_hh), (w_hh.shape[0],), ln_h, None, LN_EPS)
    return gh if b_hh is None else gh + b_hh


def _zoneout(new, old, mask, p):
    """Zoneout: ``k*old + (1-k)*new`` with k the step's 0/1 mask (training) or the probability p (eval)."""
    if mask is not None:
        return torch.lerp(new, old, mask)
    return new if p == 0 else torch.lerp(new, old, torch.full_like(new, p))


def lstm_pointwise(gates, c, w_ch, coupled, ln_c=None, ln_c_bias=None):
    """The LSTM cell after its products (gates = xw + the recurrent product): (h before the projection, c_t).
    Also the quantized modules' oracle (fastrnn/quantized.py)."""
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
    c_out = c_new if ln_c is None else F.layer_norm(c_new, (c_new.shape[1],), ln_c, ln_c_bias, LN_EPS)
    return torch.sigmoid(o) * torch.tanh(c_out), c_new


def lstm_cell(xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_c_bias, rmask, zmask_h, zmask_c, h, c, coupled,
              zoneout_h, zoneout_c):
    h_new, c_new = lstm_pointwise(xw + _recurrent(h, w_hh, b_hh, ln_h, rmask), c, w_ch, coupled, ln_c, ln_c_bias)
    if w_hr is not None:
        h_new = F.linear(h_new, w_hr)
    return _zoneout(h_new, h, zmask_h, zoneout_h), _zoneout(c_new, c, zmask_c, zoneout_c)


def gru_pointwise(xw, gh, h):
    """The GRU cell after its products (xw, and gh = the recurrent product + b_hh): h_t. Also the quantized
    modules' oracle."""
    xr, xz, xn = xw.chunk(3, 1)
    hr, hz, hn = gh.chunk(3, 1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def gru_cell(xw, w_hh, b_hh, ln_h, rmask, zmask, h, zoneout):
    return (_zoneout(gru_pointwise(xw, _recurrent(h, w_hh, b_hh, ln_h, rmask), h), h, zmask, zoneout),)


def rnn_cell(xw, w_hh, b_hh, h, nonlinearity):
    pre = xw + F.linear(h, w_hh, b_hh)
    return (torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre),)


# family -> (cell, number of weights, number of state tensors, weight positions of the per-row masks
# ([B,*] for a sequence), weight positions of the per-step masks ([T,B,*] for a sequence, [B,*] for a step))
CELLS = {"lstm": (lstm_cell, 10, 2, (7,), (8, 9)), "gru": (gru_cell, 5, 1, (3,), (4,)),
         "rnn": (rnn_cell, 2, 1, (), ())}


def _step_weights(family, weights, t, n):
    """The weights of one step of a sequence on its first n rows: the masks cut to that step and those rows."""
    _, _, _, rows, steps = CELLS[family]
    if not rows and not steps:
        return weights
    out = list(weights)
    for k in rows:
        if out[k] is not None:
            out[k] = out[k][:n]
    for k in steps:
        if out[k] is not None:
            out[k] = out[k][t, :n]
    return out


def _seq(family, xw, weights, state, lengths, reverse, options):
    if xw.dim() == 2:  # a packed sequence's rows [N, G*H] (a backend's ``packed_rows``): through [T, B, G*H]
        pad, unpad = through_padded(lengths)
        y, state = _seq(family, pad(xw), weights, state, lengths, reverse, options)
        return unpad(y), state
    cell = CELLS[family][0]
    T, B = xw.shape[0], xw.shape[1]
    sizes = batch_sizes_from_lengths(lengths, T, B)
    ys = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        n = sizes[t]
        w = _step_weights(family, weights, t, n)
        if n == B:
            state = cell(xw[t], *w, *state, *options)
            ys[t] = state[0]
        else:  # rows n.. are past their end: untouched
            new = cell(xw[t, :n], *w, *(s[:n] for s in state), *options)
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


def _leaves(family, xw, weights, state):
    """(the inputs for a recomputation, the ones to differentiate: None for absent inputs and masks)."""
    masks = set(CELLS[family][3]) | set(CELLS[family][4])
    ws = [w.detach() if k in masks and w is not None else _leaf(w) for k, w in enumerate(weights)]
    inputs = [_leaf(xw), *ws, *map(_leaf, state)]
    diff = [None if k - 1 in masks else x for k, x in enumerate(inputs)]
    return inputs, diff


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    dtypes = FLOAT_DTYPES
    features = frozenset({"proj", "peephole", "coupled", "varlen", "layer_norm", "zoneout", "recurrent_dropout"})

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
        inputs, diff = _leaves(family, xw, weights, state0)
        with autograd_inside_op():
            y, state = _seq(family, inputs[0], inputs[1:1 + nw], inputs[1 + nw:], lengths, reverse, options)
            res = _grad([y, *state], list(grads), diff)
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
        inputs, diff = _leaves(family, xw, weights, state)
        with autograd_inside_op():
            new = CELLS[family][0](*inputs, *options)
            res = _grad(list(new), list(grads), diff)
        return empty_grads(res, xw)


def _bind(family, kind):
    impl = getattr(ReferenceBackend, "_" + kind)
    return lambda self, *args: impl(self, family, args)


for _family in CELLS:
    for _kind in ("seq_fwd", "seq_bwd", "step_fwd", "step_bwd"):
        setattr(ReferenceBackend, f"{_family}_{_kind}", _bind(_family, _kind))

BACKEND = ReferenceBackend()
