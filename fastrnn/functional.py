"""Plain functions between the modules and the ops. Time-major from here on.

``rnn_layers`` runs a stack of layers x directions: for each layer-direction it does the input
projection for all steps as one GEMM, then hands the recurrence to the chosen backend through the
``fastrnn::<family>_seq_fwd`` op. ``cell_step`` does the same for one step of a cell.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops  # noqa: F401  (registers torch.ops.fastrnn)


def _op(name):
    return getattr(torch.ops.fastrnn, name)


def rnn_layers(family, x, state0, weights, options, *, num_layers, num_directions, dropout, training,
               lengths, index=None, backend):
    """Run a multi-layer (bi)directional recurrence.

    x: [T,B,I]; state0: tuple of [L*D,B,*] tensors (LSTM (h0, c0), else (h0,));
    weights: per layer-direction ``(w_ih, b_ih, hh)`` with ``hh`` the family's recurrent weights in
    op order; options: the family's op options; lengths: None or int64 CPU [B], non-increasing.
    Returns y [T,B,D*P] (zeros past each row's end) and the final states, each [L*D,B,*].
    """
    seq_fwd = _op(f"{family}_seq_fwd")
    finals = [[] for _ in state0]
    layer_input = x
    for layer in range(num_layers):
        outs = []
        for direction in range(num_directions):
            k = layer * num_directions + direction
            w_ih, b_ih, hh = weights[k]
            xw = F.linear(layer_input, w_ih, b_ih).contiguous()
            res = seq_fwd(xw, *hh, *(s[k].contiguous() for s in state0), lengths, direction == 1,
                          *options, backend)
            outs.append(res[0])
            for acc, s in zip(finals, res[1:-1]):
                acc.append(s)
        layer_input = outs[0] if num_directions == 1 else torch.cat(outs, 2)
        if dropout > 0 and training and layer < num_layers - 1:
            if index is None:
                layer_input = F.dropout(layer_input, dropout, training=True)
            else:
                flat = layer_input.reshape(-1, layer_input.shape[2])
                kept = F.dropout(flat.index_select(0, index), dropout, training=True)
                layer_input = torch.zeros_like(flat).index_copy(0, index, kept).view_as(layer_input)
    return layer_input, tuple(torch.stack(acc) for acc in finals)


def cell_step(family, x, state, w_ih, b_ih, hh, options, backend):
    """One step of a cell: x [B,I], state tuple of [B,*]; returns the new state tuple."""
    xw = F.linear(x, w_ih, b_ih).contiguous()
    res = _op(f"{family}_step_fwd")(xw, *hh, *(s.contiguous() for s in state), *options, backend)
    return tuple(res[:-1])
