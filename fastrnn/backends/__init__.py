"""The backend contract: what every fastrnn backend implements.

A backend implements the *recurrence only*. Everything around it (argument checks, batch_first,
unbatched input, PackedSequence, layers x directions, inter-layer dropout, the input projection)
lives in ``fastrnn.modules`` / ``fastrnn.functional`` and is shared by all backends.

Notation: T steps, B batch rows, I input size, H hidden size, P output size (P = proj_size for an
LSTM with projection, else H), G gate blocks (LSTM 4, or 3 with coupled gates; GRU 3; RNN 1).
All tensors are contiguous, time-major, of one float dtype and on one device, except ``lengths`` (and
grad_y where a backend declares ``strided_grad_y``, below).
A backend may serve a dtype by computing in a wider one (``Backend.compute_dtypes``, e.g. bfloat16 in
float32): ``fastrnn.functional`` then casts a layer's input, weights and state on entry and its outputs
back (autograd included), so the methods below see only the dtypes the backend's kernels run.

Cell families and their pieces (the order is the op argument order):

=======  ==============  ==========================================  ===========================
family   state           weights                                     options
=======  ==============  ==========================================  ===========================
lstm     h [B,P], c [B,H] w_hh [G*H,P], b_hh [G*H]?, w_hr [P,H]?,    coupled: bool,
                          w_ch [3,H]? (peephole), ln_h [G*H]?,        zoneout_h: float,
                          ln_c [H]?, ln_c_bias [H]?, rmask [B,P]?,    zoneout_c: float
                          zmask_h [T,B,P]?, zmask_c [T,B,H]?
gru      h [B,H]          w_hh [3H,H], b_hh [3H]?, ln_h [3H]?,        zoneout: float
                          rmask [B,H]?, zmask [T,B,H]?
rnn      h [B,H]          w_hh [H,H], b_hh [H]?                       nonlinearity: 'tanh'|'relu'
=======  ==============  ==========================================  ===========================

``?`` marks an optional tensor (``None`` when absent). The cell options (``fastrnn.modules``'
``_CELL_OPTIONS_DOC``): ``ln_h`` is the gain of the recurrent product's layer normalization, ``ln_c``/
``ln_c_bias`` those of c's (LSTM); ``rmask`` the recurrent dropout mask (0 or 1/(1-p), one per row for the
whole sequence); ``zmask_*`` the zoneout masks (1: the unit keeps its previous value), one per step
([B,*] in the step ops); without a mask, ``zoneout_*`` is the keep weight (eval: the probability). The
masks are inputs without a gradient (a backend returns an empty tensor for them). A backend that serves an
option declares its feature ('layer_norm', 'zoneout', 'recurrent_dropout'). The input projection is done
once for all steps outside the backend: ``xw = x @ w_ih.T + b_ih`` of shape [T,B,G*H] (sequence) or [B,G*H] (step), in
torch's gate order (LSTM i,f,g,o, or i,g,o when coupled; GRU r,z,n; RNN one block).

The math, per step (``sigma`` = sigmoid, ``*`` elementwise, ``gh = h @ w_hh.T + b_hh``; with the cell
options ``gh = LN((h * rmask) @ w_hh.T; ln_h) + b_hh``, LN over the G*H columns of a row with eps 1e-5):

- lstm: ``i,f,g,o = split(xw_t + gh)``; with peephole ``i += w_ch[0]*c``, ``f += w_ch[1]*c``;
  ``i,f,g = sigma(i), sigma(f), tanh(g)``, with coupled gates ``f = 1 - i`` (no f block);
  ``c' = f*c + i*g``; with peephole ``o += w_ch[2]*c'``; ``h' = sigma(o)*tanh(c')`` (with ``ln_c``:
  ``tanh(LN(c'; ln_c, ln_c_bias))``, c' carried un-normalized), then ``h' = h' @ w_hr.T`` with projection.
- zoneout (lstm, gru), after the cell: ``h_t = k*h + (1-k)*h'`` with k the step's ``zmask_h`` or else
  ``zoneout_h`` (c likewise with ``zmask_c``/``zoneout_c``); y_t is h_t.
- gru (torch's form, reset after the recurrent product): ``r = sigma(xr + ghr)``,
  ``z = sigma(xz + ghz)``, ``n = tanh(xn + r*ghn)``, ``h' = (1-z)*n + z*h``.
- rnn: ``h' = act(xw_t + gh)``.

Each backend provides, per family ``<f>`` in lstm, gru, rnn, four methods named like the ops:

``<f>_seq_fwd(xw, *weights, *state0, lengths, reverse, *options, save) -> (y, *state_n, ws)``
    xw [T,B,G*H]; state0 as above; ``lengths`` is None (every row runs T steps) or an int64 CPU
    tensor [B] of per-row lengths, non-increasing (rows sorted longest first, as in a PackedSequence),
    each in 1..T. A row takes steps only at ``t < lengths[b]``: no work for rows past their end, so at
    step t only the first ``batch_sizes[t]`` rows are touched. ``reverse`` runs t = T-1 .. 0, so a
    row's reverse pass starts at its own last step. Returns y [T,B,P] (the h of each step; zeros where
    ``t >= lengths[b]``), the final state of each row (its state after its last step) and ``ws``, a 1-D
    tensor whose size and contents are private to the backend (what its backward needs), of
    ``workspace_numel`` elements. With ``save`` False no backward will follow (inference): the backend
    keeps nothing, and ``ws`` may be empty.
``<f>_seq_bwd(grad_y, *grad_state_n, xw, *weights, *state0, lengths, y, ws, reverse, *options)``
    ``-> (d_xw, *d_weights, *d_state0)``. grad_y [T,B,P] (entries past a row's end are ignored);
    xw .. state0, lengths, reverse and options are passed back unchanged from the forward, y and ws
    are its outputs. Returns a gradient for every tensor input: absent optional weights get an empty
    tensor (numel 0). d_xw is zero where ``t >= lengths[b]``.
``<f>_step_fwd(xw, *weights, *state, *options, save) -> (*state_new, ws)``
    One step: xw [B,G*H]. Same math, no lengths.
``<f>_step_bwd(*grad_state_new, xw, *weights, *state, ws, *options) -> (d_xw, *d_weights, *d_state)``

Optional, for inference: ``<f>_cell_fwd(x, w_ih, b_ih, *weights, *state, *options) -> state_new`` (a
tensor for gru and rnn, a tuple (h, c) for lstm): one step of a cell with the input projection inside
the call, x [B,I], w_ih [G*H,I], b_ih [G*H]?. No autograd and no workspace: the cell modules and
``fastrnn.functional`` call it directly (not through an op) only when no gradient can be needed and no
torch.compile tracing or dispatch mode is active (``fastrnn.ops.can_skip_ops``), and use the step ops
otherwise.

Optional, for training: ``<f>_cell_train(x, w_ih, b_ih, w_hh, b_hh, *state, *options) -> state_new``
(``<f>_cell_fwd``'s form; options: rnn its nonlinearity, none for gru and lstm): the same step of the
plain cell (LSTM without w_hr, w_ch or coupled gates) returning tensors that carry their own autograd
node, whose backward gives every input's gradient and is itself differentiable (create_graph). The
cell modules and ``fastrnn.functional`` call it directly for a step (a cell call, each layer-direction
of a one-step sequence) that needs a gradient where nothing intercepts ops (``can_skip_ops``), and the
step ops otherwise. Its sequence form takes x [1,B,I] and each state [1,B,H] (a one-step sequence's
layer-direction as the sequence holds it: no select, unsqueeze or stack recorded around the node) and
returns (y, *state_new), each [1,B,H], y a tensor of its own equal to h_new.

Optional, for inference: ``<f>_chunk_fwd(x, w_ih, b_ih, *weights, *state0, reverse, *options) -> (y, *state_n)``
with the backend attribute ``chunk_max_rows``: a whole dense sequence (x [T,B,I], no lengths) with the
input projection inside the call, as ``<f>_seq_fwd`` with ``save`` False computes it from ``xw``.
``fastrnn.functional`` calls it directly, on the same conditions as ``<f>_cell_fwd``, for a
layer-direction of at most ``chunk_max_rows`` rows (T x B; ``math.inf``: any length): at least the short
chunks of a stream, where one call beats a separate projection and recurrence. y and each state_n are tensors
of their own, sharing no memory, also at T = 1: the functional layer hands state_n out as a view, and a caller
may change y in place before feeding the state back (``test_inplace_on_output_leaves_the_state``).

Optional, for inference: ``<f>_packed_fwd(x, w_ih, b_ih, *weights, *state0, reverse, *options, lengths)
-> (y, *state_n)``: the same for a packed sequence, x [N,I] and y [N,P] its rows in PackedSequence order
and ``lengths`` the rows' lengths (int64 CPU [B], non-increasing); a row's final state is the state after
its own last step in the direction of the call (``reverse``: after t = 0), as torch.nn returns it. ``fastrnn.functional`` calls it on the same conditions for every packed input.

Optional, for training: the backend attribute ``packed_rows`` (True): ``<f>_seq_fwd`` and ``<f>_seq_bwd``
also take a packed sequence's rows as they lie, xw [N,G*H] with ``lengths`` (N their sum), y, grad_y
[N,P] and d_xw [N,G*H] likewise: step t's ``batch_sizes[t]`` rows start at the sum of the earlier steps'
(PackedSequence order). No zoneout masks (theirs is [T,B,*]). ``fastrnn.functional`` passes a
PackedSequence's rows so where nothing intercepts ops (``can_skip_ops``), and [T,B,*] copies otherwise.

Optional, for training: the backend attribute ``strided_grad_y`` (True): ``<f>_seq_bwd`` takes grad_y with
any strides (every other tensor stays contiguous), as autograd hands it in: expanded (the gradient of a
``sum`` or ``mean``; an expanded zero where y had no gradient) or transposed (batch_first). Only in a
first-order backward; with ``create_graph`` grad_y is contiguous as the rest.

Optional: ``empty(shape, dtype) -> Tensor``, an uninitialized contiguous tensor on the call's device
from memory the backend manages (valid as an ``out=`` argument, callable from a backward). On the
direct path above (no torch.compile tracing, no dispatch mode) ``fastrnn.functional`` writes the input
projection ``xw`` into it, and in training also the projection's input gradient. Without it ``xw``
comes from ``F.linear``.

Optional: ``mm(a, ta, b, tb, bias) -> Tensor``, ``A' @ B' (+ bias)`` of contiguous 2-D tensors with
``A' = a.T if ta else a``, ``B' = b.T if tb else b`` and ``bias`` [N] or None, into a fresh tensor as
``empty`` gives. Where the backend has it and ``empty`` too, ``fastrnn.functional`` runs through it the
input projections that go into ``empty``'s buffers (1 MiB and more, on the direct path), and smaller ones
from the backend's optional attribute ``mm_min_macs`` multiply-adds (None or absent: never), and, in a
first-order backward, that projection's input and weight gradients (a ``create_graph`` backward takes
torch's differentiable products).

``workspace_numel(op, *fwd_args) -> int`` gives the size of ``ws`` for a forward call from the
arguments' shapes only (it is used on fake tensors under torch.compile).

The backward runs on the backend that ran the forward: the backend's name is an argument of every op.
A test holds every backend to ``seq == T x step``.

Availability: ``unavailable_reasons()`` (why this machine cannot run it at all: a missing package,
no compiler) and ``not_supported_reasons(spec)`` (why it cannot serve one call: device, dtype, a
feature). Both return a list of strings; empty means yes. ``fastrnn.dispatch`` is the one place that
uses them to choose.

One backend stands apart: ``torch`` (``backends/torchnn.py``) implements none of the methods above. A
module whose call it serves runs torch.nn's own forward on its parameters; it is chosen by name or, for
the shape classes where it is measured fastest, by ``fastrnn.policy``.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: features the modules implement around the ops, so that every backend running the ops serves them
#: (weight dropout: the module hands the ops a dropped W_hh); the ``torch`` backend, which runs torch.nn's
#: forward instead of the ops, refuses them
MODULE_FEATURES = frozenset({"weight_dropout"})


def _name(dtype):
    return str(dtype).replace("torch.", "")


class Backend:
    """Base class: declares what a backend serves. Subclasses add the kernel methods above."""

    name: str = ""
    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = ()
    #: features of ``fastrnn.dispatch.Spec`` this backend can serve (beyond the plain cells)
    features: frozenset[str] = frozenset()
    #: dtypes served by computing in a wider one (storage dtype -> compute dtype): ``fastrnn.functional``
    #: casts the layer's input, weights and state to the compute dtype on entry and its outputs back, so
    #: the backend's methods only ever see the dtypes in ``dtypes``
    compute_dtypes: dict = {}

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype this backend's kernels run a call of ``dtype`` in."""
        return self.compute_dtypes.get(dtype, dtype)

    def unavailable_reasons(self) -> list[str]:
        return []

    def not_supported_reasons(self, spec) -> list[str]:
        reasons = []
        if spec.device not in self.devices:
            reasons.append(f"device '{spec.device}' is not supported (serves {', '.join(self.devices)})")
        if spec.dtype not in self.dtypes and spec.dtype not in self.compute_dtypes:
            names = ", ".join([_name(d) for d in self.dtypes] + [
                f"{_name(d)} (computed in {_name(c)})" for d, c in self.compute_dtypes.items()])
            reasons.append(f"dtype {_name(spec.dtype)} is not supported (serves {names})")
        for feat in sorted(spec.features - self.features - MODULE_FEATURES):
            reasons.append(f"feature '{feat}' is not supported")
        return reasons

    def workspace_numel(self, op: str, *args) -> int:
        return 0
