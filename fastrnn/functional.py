"""Plain functions between the modules and the ops. Time-major from here on.

``rnn_layers`` runs a stack of layers x directions: for each layer-direction it does the input
projection for all steps as one GEMM, then hands the recurrence to the chosen backend through the
``fastrnn::<family>_seq_fwd`` op. ``cell_step`` does the same for one step of a cell.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch, ops
from .backends.reference import LN_EPS


def autocast_dtype(device_type):
    """The lower-precision dtype of an autocast region active on ``device_type``, else None (CPU only:
    what torch.nn does under CUDA autocast is not measured here)."""
    if device_type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return None


def _needs_grad(*tensors):
    """Will a backward follow? Then the forward op must save its workspace."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rnn_layers(family, x, state0, weights, options, *, num_layers, num_directions, dropout, training,
               lengths, index=None, steps=None, backend, fresh_output=True):
    """Run a multi-layer (bi)directional recurrence.

    x: [T,B,I], or for packed input its rows [N,I] in PackedSequence order, with ``index`` the flat
    positions of those rows in [T*B] and ``steps`` = T (the input projection then runs on real rows
    only, and dropout draws its mask over them, as torch does). state0: tuple of [L*D,B,*] tensors
    (LSTM (h0, c0), else (h0,)); weights: per layer-direction ``(w_ih, b_ih, hh)`` or ``(w_ih, b_ih, hh,
    ln_ih)`` with ``hh`` the family's recurrent weights and masks in op order and ``ln_ih`` the gain of the
    input projection's layer normalization (``layer_norm``: ``xw = LN(x @ w_ih.T; ln_ih) + b_ih``, see
    ``_project``); options: the family's op options; lengths: None or int64
    CPU [B], non-increasing. Returns the output in the input's form ([T,B,D*P] with zeros past each
    row's end, or [N,D*P]) and the final states, each [L*D,B,*]. The output is never a tensor the
    backward reads (``fresh_output=False``: the caller makes its own copy of it).
    """
    cdt = _compute_dtype(backend, x.dtype)
    if cdt is not None:  # the backend computes this dtype in a wider one: cast in, run, cast out
        cast = _caster(backend, cdt)
        y, finals = rnn_layers(family, cast(x), tuple(cast(s) for s in state0), _cast_weights(weights, cast),
                               options, num_layers=num_layers, num_directions=num_directions, dropout=dropout,
                               training=training, lengths=lengths, index=index, steps=steps, backend=backend,
                               fresh_output=False)
        return y.to(x.dtype), tuple(s.to(x.dtype) for s in finals)  # y.to: a new tensor
    seq_fwd = ops.with_autograd(f"{family}_seq_fwd")
    direct = ops.can_skip_ops()
    impl = dispatch.get(backend)
    alloc = getattr(impl, "empty", None) if direct else None
    mm = getattr(impl, "mm", None) if direct else None
    mm_min_macs = getattr(impl, "mm_min_macs", None)
    finals = [[] for _ in state0]
    B = state0[0].shape[1]
    packed = index is not None
    T = x.shape[0] if steps is None else steps
    # a one-step call that needs a gradient (a decoder's step): each layer-direction one node, where served
    if direct and T == 1 and not packed and lengths is None:
        res = one_step_layers(family, x, state0, weights, options, num_layers=num_layers,
                              num_directions=num_directions, dropout=dropout, training=training, backend=backend)
        if res is not None:
            return res
    # in inference, one call a layer-direction with the input projection inside, if the backend has it: a
    # dense sequence of up to chunk_max_rows rows (<f>_chunk_fwd), or a packed one on its rows (<f>_packed_fwd)
    dense_chunk = lengths is None and T * B <= getattr(impl, "chunk_max_rows", 0)
    if direct and (packed or dense_chunk):
        tensors = [t for w_ih, b_ih, hh, _ in map(_unpack, weights) for t in (w_ih, b_ih, *hh)]
        op = getattr(impl, f"{family}_{'packed' if packed else 'chunk'}_fwd", None)
        # the gradient question first: a training call stops there, at its first weight
        if (op is not None and not _needs_grad(x, *state0, *tensors)
                and all(plain(family, w, options) for w in weights)):
            return chunk_layers(family, op, x, state0, weights, options, num_layers=num_layers,
                                num_directions=num_directions, dropout=dropout, training=training, backend=backend,
                                lengths=lengths if packed else None)
    # a packed sequence (in training: inference went above) runs on its rows where the backend's sequence
    # ops take them (``packed_rows``), else through copies of xw and y in [T,B,*]
    rows = packed and direct and getattr(impl, "packed_rows", False) and not _zoneout_masks(family, weights)
    layer_input = x
    for layer in range(num_layers):
        outs = []
        for direction in range(num_directions):
            k = layer * num_directions + direction
            w_ih, b_ih, hh, ln_ih = _unpack(weights[k])
            st = [s[k].contiguous() for s in state0]
            save = _needs_grad(layer_input, w_ih, b_ih, ln_ih, *hh, *st)
            xw = _project(layer_input, w_ih, b_ih, alloc, ln_ih, mm, mm_min_macs)
            if packed and not rows:
                xw = _empty(alloc, (steps * B, xw.shape[1]), xw).zero_().index_copy_(0, index, xw).view(steps, B, -1)
            fwd = seq_fwd if save or not direct else ops.DIRECT[f"{family}_seq_fwd"]
            res = fwd(xw.contiguous(), *hh, *st, lengths, direction == 1, *options, save, backend)
            outs.append(res[0])
            for acc, s in zip(finals, res[1:-1]):
                acc.append(s)
        layer_input = outs[0] if num_directions == 1 else torch.cat(outs, -1)
        if packed and not rows:
            layer_input = layer_input.reshape(steps * B, -1).index_select(0, index)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    if fresh_output and save and num_directions == 1 and (rows or not packed):
        # the caller gets a copy of the op's y, which its backward reads: an in-place op on the output
        # (a residual ``out += x``, ``relu_``, in-place dropout) then leaves the saved y intact, as
        # torch.nn allows it (one copy of [T,B,P]: benchmarks/NOTES.md, "In-place ops on the output")
        layer_input = _fresh_output(layer_input)
    return layer_input, tuple(torch.stack(acc) for acc in finals)


# the number of weight arguments and options of each family's plain cell (the contract's optional fused
# inference entries, ``<family>_cell_fwd`` and ``<family>_chunk_fwd``, take only those)
_PLAIN = {"lstm": (4, 1), "gru": (2, 0), "rnn": (2, 1)}


def plain(family, weights, options):
    """Does a layer-direction use none of the cell options (layer norm, zoneout, recurrent dropout)?
    ``weights`` as ``rnn_layers`` takes them."""
    _, _, hh, ln_ih = _unpack(weights)
    nw, no = _PLAIN[family]
    return ln_ih is None and all(t is None for t in hh[nw:]) and not any(options[no:])


def one_step_layers(family, x, state0, weights, options, *, num_layers, num_directions, dropout, training,
                    backend):
    """``rnn_layers`` for a one-step dense call that needs a gradient (a decoder's step in training, x
    [1,B,I]) where the backend's one-step node serves every layer-direction (``train_step``): each one
    node, in its sequence form (the layer's input and state [1,B,*] as they are, so that no select,
    unsqueeze or stack is recorded around it; one layer-direction returns the node's outputs themselves).
    Same results as ``rnn_layers``; None where a layer-direction is not served or nothing needs a gradient
    (the caller then takes the general path). No node saves its output: the caller's output needs no
    copy."""
    if not _needs_grad(x, *state0, *(t for w in weights for t in (w[0], w[1], *w[2]))):
        return None
    steps = [train_step(family, backend, w, options) for w in weights]
    if None in steps:
        return None
    if len(steps) == 1:
        y, *finals = steps[0](x, state0)
        return y, tuple(finals)
    layer_input = x
    finals = [[] for _ in state0]
    for layer in range(num_layers):
        outs = []
        for d in range(num_directions):
            k = layer * num_directions + d
            y, *res = steps[k](layer_input, [s[k:k + 1] for s in state0])
            outs.append(y)
            for acc, st in zip(finals, res):
                acc.append(st)
        layer_input = outs[0] if num_directions == 1 else torch.cat(outs, 2)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    return layer_input, tuple(torch.cat(acc) for acc in finals)


# the options each family's ``<family>_cell_train`` takes (RNN: its nonlinearity)
_TRAIN_OPTIONS = {"lstm": 0, "gru": 0, "rnn": 1}


def train_step(family, backend, weights, options):
    """The backend's one-step training node for a layer-direction (``weights`` as ``rnn_layers`` takes
    them), as a function ``(x [B,I], state [B,H] each) -> new state tuple`` (the node's cell form) or
    ``(x [1,B,I], state [1,B,H] each) -> (y, *new state)`` (its sequence form), or None where the backend has none or it
    does not serve these weights and options. The contract's optional ``<family>_cell_train`` takes the
    plain cell's step with its input projection, records one autograd node, and is called only where
    nothing intercepts ops (``ops.can_skip_ops``) and a gradient is needed (a decoder's step in training:
    torch.nn records four to a dozen nodes, the general path a projection and a step op with a Python
    Function between them; benchmarks/NOTES.md, twenty-first session). LSTM: no projection, peepholes or
    coupled gates."""
    op = getattr(dispatch.get(backend), f"{family}_cell_train", None)
    if op is None or not plain(family, weights, options):
        return None
    w_ih, b_ih, hh, _ = _unpack(weights)
    if family == "lstm" and (hh[2] is not None or hh[3] is not None or options[0]):
        return None
    args = (w_ih.contiguous(), _contiguous(b_ih), hh[0].contiguous(), _contiguous(hh[1]))
    opts = tuple(options[:_TRAIN_OPTIONS[family]])
    name = f"{family}_cell_train"

    def step(x, state):
        res = op(x.contiguous(), *args, *(s.contiguous() for s in state), *opts)
        dispatch.note_call(name, backend)
        return tuple(res) if isinstance(res, (tuple, list)) else (res,)
    return step


def _zoneout_masks(family, weights):
    """Does any layer-direction carry a zoneout mask (per step: [T,B,*], which packed rows do not take)?"""
    pos = [k for k, n in enumerate(ops.FAMILIES[family][0]) if n.startswith("zmask")]
    return any(_unpack(w)[2][k] is not None for w in weights for k in pos)


def _contiguous(t):
    return None if t is None else t.contiguous()


def _unpack(weights):
    """``(w_ih, b_ih, hh, ln_ih)`` of one layer-direction's weights (ln_ih None when absent)."""
    return (*weights, None) if len(weights) == 3 else tuple(weights)


def _fresh_output(y):
    """A copy of a sequence op's output for the caller (``rnn_layers``; ``python -m benchmarks.train_ab
    --variant copy`` times the module without it)."""
    return y.clone()


def chunk_layers(family, op, x, state0, weights, options, *, num_layers, num_directions, dropout, training,
                 backend, lengths=None):
    """``rnn_layers`` for a short dense sequence in inference, each layer-direction one call of a backend's
    ``<family>_chunk_fwd`` (``op``; input projection inside); with ``lengths`` (x the rows of a packed
    sequence) of its ``<family>_packed_fwd``. Same arguments and results as ``rnn_layers``; nothing
    saved. The op checks its arguments and raises (RuntimeError, TypeError) for what it refuses; the
    calls are recorded once all have run."""
    extra = () if lengths is None else (lengths,)
    layer_input = x.contiguous()
    finals = [[] for _ in state0]
    for layer in range(num_layers):
        outs = []
        for d in range(num_directions):
            k = layer * num_directions + d
            w_ih, b_ih, hh = weights[k][:3]
            nw, no = _PLAIN[family]
            res = op(layer_input, w_ih.contiguous(), None if b_ih is None else b_ih.contiguous(), *hh[:nw],
                     *(s[k].contiguous() for s in state0), d == 1, *options[:no], *extra)
            outs.append(res[0])
            for acc, st in zip(finals, res[1:]):
                acc.append(st)
        layer_input = outs[0] if num_directions == 1 else torch.cat(outs, -1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    for _ in range(num_layers * num_directions):
        dispatch.note_call(f"{family}_{'chunk' if lengths is None else 'packed'}_fwd", backend)
    # one layer-direction: its state as [1, B, *] (a view of the op's own tensor, ~2 us less than a stack)
    return layer_input, tuple(acc[0].unsqueeze(0) if len(acc) == 1 else torch.stack(acc) for acc in finals)


def _compute_dtype(backend, dtype):
    """The wider dtype ``backend`` runs ``dtype`` in (``Backend.compute_dtypes``), or None: its own."""
    cdt = dispatch.get(backend).compute_dtype(dtype)
    return None if cdt == dtype else cdt


def _caster(backend, dtype):
    """A function that casts a tensor to ``dtype`` (autograd included). On the direct path the copies go
    into the backend's ``empty`` buffers when it has one: the casts of a call are fresh MiB-sized
    tensors, which malloc hands back to the system and faults in again on the next call (~360 faults,
    ~0.5 ms of a 1.4 ms bfloat16 LSTM call at B1 H256, benchmarks/NOTES.md)."""
    alloc = getattr(dispatch.get(backend), "empty", None) if ops.can_skip_ops() else None
    if alloc is None:
        return lambda t: t.to(dtype)
    size = torch.finfo(dtype).bits // 8
    return lambda t: t.to(dtype) if t.numel() * size < _ALLOC_MIN_BYTES else alloc(list(t.shape), dtype).copy_(t)


def _cast_weights(weights, cast):
    """Per layer-direction ``(w_ih, b_ih, hh)`` with every tensor through ``cast`` (None stays None)."""
    def one(t):
        return None if t is None else cast(t)
    return [(one(w[0]), one(w[1]), tuple(one(t) for t in w[2]), *map(one, w[3:])) for w in weights]


def _empty(alloc, shape, like):
    return like.new_empty(shape) if alloc is None else alloc(list(shape), like.dtype)


def _project(x, w_ih, b_ih, alloc, ln_ih=None, mm=None, mm_min_macs=None):
    """The input projection of all steps, ``x @ w_ih.T + b_ih``; with ``ln_ih`` (``layer_norm``)
    ``LN(x @ w_ih.T; ln_ih) + b_ih``, normalized over its G*H columns per row as ``nn.LayerNorm`` (eps
    1e-5, gain ``ln_ih``, no bias of its own: b_ih follows it). With ``alloc`` (a backend's optional
    ``empty``) it is written into a buffer the backend hands out, from memory it keeps mapped: a fresh
    buffer of tens of MiB costs a page fault per 4 KiB on first touch (~15 ms of a ~120 ms LSTM call at
    T=100 B=64 H=512, benchmarks/NOTES.md); in training through ``_Projection``, whose backward puts
    dx in such a buffer too. With ``mm`` (the backend's optional ``mm``) the products run through it; below
    that size too from ``mm_min_macs`` multiply-adds (the backend's, see the contract in fastrnn.backends)."""
    if ln_ih is not None:  # all steps at once (not on the sequential path); b_ih as the normalization's bias
        return F.layer_norm(_project(x, w_ih, None, alloc, None, mm, mm_min_macs), (w_ih.shape[0],), ln_ih, b_ih,
                            LN_EPS)
    x2 = x.reshape(-1, x.shape[-1])
    rows, K = x2.shape
    G = w_ih.shape[0]
    if alloc is None or (rows * G * x.element_size() < _ALLOC_MIN_BYTES
                         and (mm is None or mm_min_macs is None or rows * G * K < mm_min_macs)):
        return F.linear(x, w_ih, b_ih)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_ih, b_ih)):
        if mm is not None:  # the backend's product takes contiguous tensors
            x2, w_ih, b_ih = x2.contiguous(), w_ih.contiguous(), None if b_ih is None else b_ih.contiguous()
        out = (_Projection if ops.functorch_active() else _ProjectionEager).apply(x2, w_ih, b_ih, alloc, mm)
    elif mm is not None:
        out = mm(x2.contiguous(), False, w_ih.contiguous(), True, None if b_ih is None else b_ih.contiguous())
    else:
        out = _linear_into(alloc([x2.shape[0], w_ih.shape[0]], x.dtype), x2, w_ih, b_ih)
    return out.view(*x.shape[:-1], w_ih.shape[0])


# below this, xw comes from torch's allocator: small buffers do not fault, and a call of the backend's
# ``empty`` op costs ~15 us (a T=1 B=1 H=256 GRU layer: ~80 us in all)
_ALLOC_MIN_BYTES = 1 << 20


def _linear_into(out, x2, w, b):
    return torch.mm(x2, w.t(), out=out) if b is None else torch.addmm(b, x2, w.t(), out=out)


def _projection_fwd(x2, w, b, alloc, mm):
    if mm is not None:
        return mm(x2, False, w, True, b)
    return _linear_into(alloc([x2.shape[0], w.shape[0]], x2.dtype), x2, w, b)


def _projection_ctx(ctx, x2, w, b, alloc, mm):
    ctx.save_for_backward(x2, w)
    ctx.alloc, ctx.mm, ctx.has_bias = alloc, mm, b is not None


class _Projection(torch.autograd.Function):
    """``F.linear`` of a 2-D input with its output, and its backward's dx, in buffers from ``alloc``; with
    ``mm`` (a backend's optional ``mm``) the forward's product and the backward's two through it. This form
    (a separate ``setup_context``) is the one torch.func transforms take; ``_ProjectionEager`` is the same
    node for the other calls: with a ``setup_context``, ``Function.apply`` binds the arguments through
    ``inspect.signature`` (~14 us of every training call's layer-direction, benchmarks/NOTES.md)."""

    @staticmethod
    def forward(x2, w, b, alloc, mm):
        return _projection_fwd(x2, w, b, alloc, mm)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _projection_ctx(ctx, *inputs)

    @staticmethod
    def backward(ctx, g):
        return _projection_bwd(ctx, g)


class _ProjectionEager(torch.autograd.Function):
    """``_Projection`` with the context set in its forward (see there)."""

    @staticmethod
    def forward(ctx, x2, w, b, alloc, mm):
        _projection_ctx(ctx, x2, w, b, alloc, mm)
        return _projection_fwd(x2, w, b, alloc, mm)

    @staticmethod
    def backward(ctx, g):
        return _projection_bwd(ctx, g)


def _projection_bwd(ctx, g):
    x2, w = ctx.saved_tensors
    dx = dw = db = None
    # out= and the backend's product are not differentiable: a double backward (create_graph) takes the
    # plain products
    plain = torch.is_grad_enabled()
    mm = None if plain else ctx.mm
    if mm is not None:
        g = g.contiguous()
    if ctx.needs_input_grad[0]:
        if plain:
            dx = g.mm(w)
        elif mm is not None:
            dx = mm(g, False, w, False, None)
        else:
            dx = torch.mm(g, w, out=ctx.alloc([g.shape[0], w.shape[1]], g.dtype))
    if ctx.needs_input_grad[1]:
        dw = g.t().mm(x2) if mm is None else mm(g, True, x2, False, None)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = g.sum(0)
    return dx, dw, db, None, None


def cell_step(family, x, state, w_ih, b_ih, hh, options, backend, ln_ih=None):
    """One step of a cell: x [B,I], state tuple of [B,*]; returns the new state tuple. ``hh``, ``options``
    and ``ln_ih`` as for ``rnn_layers`` (a step's zoneout masks are [B,*]).

    In inference (no gradient can be needed) on a backend that offers the contract's optional
    ``<family>_cell_fwd``, the input projection runs inside the backend's call and the call skips the
    op's autograd layer: a streaming cell call is short, and both costs are large against it (NOTES.md).
    Without autograd the step op's layer is skipped too; under torch.compile or a dispatch mode the op
    path is kept (``ops.can_skip_ops``). In eager training, the backend's optional ``<family>_cell_train``
    where it serves the cell (``train_step``).
    """
    cdt = _compute_dtype(backend, x.dtype)
    if cdt is not None:  # as in rnn_layers
        cast = _caster(backend, cdt)
        (w_ih, b_ih, hh, ln_ih), = _cast_weights([(w_ih, b_ih, hh, ln_ih)], cast)
        out = cell_step(family, cast(x), [cast(s) for s in state], w_ih, b_ih, hh, options, backend, ln_ih)
        return tuple(s.to(x.dtype) for s in out)
    state = [s.contiguous() for s in state]
    save = _needs_grad(x, w_ih, b_ih, ln_ih, *hh, *state)
    if save and ops.can_skip_ops():
        train = train_step(family, backend, (w_ih, b_ih, hh, ln_ih), options)
        if train is not None:
            return train(x, state)
    direct = not save and ops.can_skip_ops()
    if direct and plain(family, (w_ih, b_ih, hh, ln_ih), options):
        fused = getattr(dispatch.get(backend), f"{family}_cell_fwd", None)
        if fused is not None:
            dispatch.note_call(f"{family}_cell_fwd", backend)
            nw, no = _PLAIN[family]
            res = fused(x.contiguous(), w_ih.contiguous(), b_ih, *hh[:nw], *state, *options[:no])
            return tuple(res) if isinstance(res, (tuple, list)) else (res,)
    xw = _project(x, w_ih, b_ih, None, ln_ih).contiguous()
    step = ops.DIRECT[f"{family}_step_fwd"] if direct else ops.with_autograd(f"{family}_step_fwd")
    res = step(xw, *hh, *state, *options, save, backend)
    return tuple(res[:-1])
