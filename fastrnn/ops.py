"""torch.library custom ops: how the functional layer reaches a backend.

When nothing intercepts ops (no torch.compile tracing, no dispatch mode, no torch.func transform, no
torch.jit.trace: ``can_skip_ops``), the functional layer skips the op layer: without autograd it calls an
op's implementation (``DIRECT``), with autograd the op's own formula in an autograd.Function of fastrnn's
that calls the same implementation (``with_autograd``, ``_EAGER``; eager training graphs show these
Functions, not ``fastrnn::`` ops). The cells' optional fused inference op is reached the same way.

Twelve ops, ``fastrnn::<family>_<scope>_<pass>`` for family in lstm, gru, rnn, scope in seq, step and
pass in fwd, bwd. Their schemas are generated from ``FAMILIES`` (the argument lists of the backend
contract in ``fastrnn.backends``), each has a fake (meta) implementation for torch.compile, the
forward ops have autograd formulas that call the backward ops on the same backend, and the backward
ops have one too (a double backward, by recomputation on the reference math: ``_double_backward``). The last argument
of every op is the backend's name; the op's implementation calls that backend's method of the same name.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import dispatch

# weights ('?' = optional), state tensors, options: see the table in fastrnn.backends
FAMILIES = {
    "lstm": (("w_hh", "b_hh?", "w_hr?", "w_ch?", "ln_h?", "ln_c?", "ln_c_bias?", "rmask?", "zmask_h?", "zmask_c?"),
             ("h", "c"), ("bool coupled", "float zoneout_h", "float zoneout_c")),
    "gru": (("w_hh", "b_hh?", "ln_h?", "rmask?", "zmask?"), ("h",), ("float zoneout",)),
    "rnn": (("w_hh", "b_hh?"), ("h",), ("str nonlinearity",)),
}
#: the weight arguments that are masks (recurrent dropout, zoneout): inputs without a gradient
MASKS = frozenset({"rmask", "zmask_h", "zmask_c", "zmask"})


def mask_positions(family):
    """Indices (among the family's weight arguments) of its masks."""
    return tuple(k for k, n in enumerate(FAMILIES[family][0]) if n.rstrip("?") in MASKS)


def _tensor_args(names, suffix=""):
    return [f"Tensor{'?' if n.endswith('?') else ''} {n.rstrip('?')}{suffix}" for n in names]


def _schemas(family):
    weights, state, options = FAMILIES[family]
    w = _tensor_args(weights)
    opts = list(options) + ["str backend"]
    fwd_opts = list(options) + ["bool save", "str backend"]  # save: keep what the backward needs
    n_in = 1 + len(weights) + len(state)

    def out(n):
        return "(" + ", ".join(["Tensor"] * n) + ")"

    return {
        "seq_fwd": "(" + ", ".join(["Tensor xw", *w, *_tensor_args(state, "0"), "Tensor? lengths",
                                    "bool reverse", *fwd_opts]) + ") -> " + out(2 + len(state)),
        "seq_bwd": "(" + ", ".join(["Tensor grad_y", *_tensor_args(state, "_n_grad"), "Tensor xw", *w,
                                    *_tensor_args(state, "0"), "Tensor? lengths", "Tensor y", "Tensor ws",
                                    "bool reverse", *opts]) + ") -> " + out(n_in),
        "step_fwd": "(" + ", ".join(["Tensor xw", *w, *_tensor_args(state), *fwd_opts]) + ") -> "
                    + out(1 + len(state)),
        "step_bwd": "(" + ", ".join([*_tensor_args(state, "_new_grad"), "Tensor xw", *w, *_tensor_args(state),
                                     "Tensor ws", *opts]) + ") -> " + out(n_in),
    }


def _call_backend(opname):
    """The implementation of op ``opname``: note the call, run the backend's method of that name."""
    def impl(*args):
        dispatch.note_call(opname, args[-1])
        return getattr(dispatch.get(args[-1]), opname)(*args[:-1])
    return impl


def _like(x, ref, mask=False):
    return ref.new_empty(0) if x is None or mask else torch.empty_like(x)


def _fakes(family, opname):
    weights, state, _ = FAMILIES[family]
    nw, ns = len(weights), len(state)

    def seq_fwd(*a):
        xw, st = a[0], a[1 + nw:1 + nw + ns]
        ws = xw.new_empty(dispatch.get(a[-1]).workspace_numel(opname, *a[:-1]))
        return (xw.new_empty(xw.shape[0], xw.shape[1], st[0].shape[-1]), *map(torch.empty_like, st), ws)

    masks = {1 + k for k in mask_positions(family)}  # positions among (xw, *weights, *state)

    def seq_bwd(*a):
        ins = a[1 + ns:1 + ns + 1 + nw + ns]
        return tuple(_like(x, ins[0], k in masks) for k, x in enumerate(ins))

    def step_fwd(*a):
        st = a[1 + nw:1 + nw + ns]
        ws = a[0].new_empty(dispatch.get(a[-1]).workspace_numel(opname, *a[:-1]))
        return (*map(torch.empty_like, st), ws)

    def step_bwd(*a):
        ins = a[ns:ns + 1 + nw + ns]
        return tuple(_like(x, ins[0], k in masks) for k, x in enumerate(ins))

    return {"seq_fwd": seq_fwd, "seq_bwd": seq_bwd, "step_fwd": step_fwd, "step_bwd": step_bwd}[opname.split("_", 1)[1]]


def _autograd(family, scope, bwd_name):
    weights, state, options = FAMILIES[family]
    nw, ns, no = len(weights), len(state), len(options)
    n_tensors = 1 + nw + ns + (1 if scope == "seq" else 0)  # xw, weights, state(, lengths)
    masks = set(mask_positions(family))

    def setup_context(ctx, inputs, output):
        # grads of unused outputs arrive as None, not as zeros: ws's (never used) would otherwise be a
        # zero-filled tensor of the workspace's size in every backward (8 MiB at LSTM T100 B16 H256)
        ctx.set_materialize_grads(False)
        ctx.opts = tuple(inputs[n_tensors:-2]) + (inputs[-1],)  # (reverse,) + options + (backend,)
        ctx.saved = inputs[-2]
        ctx.absent = [w is None or k in masks for k, w in enumerate(inputs[1:1 + nw])]  # masks: no gradient
        saved = list(inputs[:n_tensors])
        if scope == "seq":
            saved.append(output[0])  # y
        saved.append(output[-1])  # ws
        ctx.save_for_backward(*saved)

    def backward(ctx, *grads):
        if not ctx.saved:
            raise RuntimeError(f"fastrnn::{family}_{scope}_fwd ran with save=False (no grad was needed then), "
                               "so it kept nothing for a backward")
        saved = ctx.saved_tensors
        # the outputs the grads belong to: (y,) + state for seq, state for step; no gradient flows into ws
        like = ((saved[-2],) if scope == "seq" else ()) + tuple(saved[1 + nw:1 + nw + ns])
        strided = scope == "seq" and not torch.is_grad_enabled() and _strided_grad_y(ctx.opts[-1])
        grads = [_incoming(g, o, strided and k == 0) for k, (g, o) in enumerate(zip(grads[:-1], like))]
        # with create_graph the backward op is recorded with its own derivative (_double_backward); without,
        # its implementation runs directly where nothing intercepts ops (its autograd layer is Python)
        if torch.is_grad_enabled():
            bwd = with_autograd(bwd_name)
        else:
            bwd = DIRECT[bwd_name] if can_skip_ops() else getattr(torch.ops.fastrnn, bwd_name).default
        res = list(bwd(*grads, *saved, *ctx.opts))
        for k, absent in enumerate(ctx.absent):
            if absent:
                res[1 + k] = None
        extra = (2 if scope == "seq" else 0) + no + 2  # lengths, reverse (seq), options, save, backend
        return (*res, *([None] * extra))

    return setup_context, backward


def _incoming(g, like, as_it_comes):
    """An incoming gradient as a backward op takes it: contiguous, zeros where none came. ``as_it_comes``
    (grad_y in a first-order backward on a backend that reads it with its strides, ``strided_grad_y``): as
    it is, expanded (a sum's, a mean's; a zero where y had no gradient) or transposed (batch_first's), with
    no [T,B,P] copy."""
    if as_it_comes:
        return like.new_zeros(()).expand(like.shape) if g is None else g
    return torch.zeros_like(like, memory_format=torch.contiguous_format) if g is None else g.contiguous()


def _strided_grad_y(backend):
    """Does ``backend``'s sequence backward read grad_y with any strides (the contract's optional
    ``strided_grad_y``)?"""
    return getattr(dispatch.get(backend), "strided_grad_y", False) is True


def _double_backward(family, scope):
    """The derivative of the backward op ``<family>_<scope>_bwd``, for a double backward (a gradient
    penalty, a Hessian-vector product, the grad of a torch.func.grad): by recomputation on the
    reference backend's math. The backward op computes the vector-Jacobian product ``J(p)^T g`` of the
    cell's forward at the inputs ``p`` (xw, weights, state) with the incoming gradients ``g``; its own
    vector-Jacobian product with ``v`` is ``J(p) v`` for ``g`` and ``d(g . J(p) v)/dp`` for ``p``.
    Both come from differentiating the recomputed forward twice. The forward's outputs (y, ws) that the
    backward op also takes are functions of ``p``: the whole derivative goes to ``p``, none to them.
    A third derivative works too: the recomputation is plain torch ops, recorded when the graph is kept.
    The fused kernels keep the first-order path; this runs only when a backward is differentiated."""
    from .backends import reference

    weights, state, _ = FAMILIES[family]
    nw, ns = len(weights), len(state)
    ng = ns + (1 if scope == "seq" else 0)  # incoming grads: (grad_y,) + state for seq, state for step
    n_in = 1 + nw + ns  # xw, weights, state: the backward op's outputs are their gradients
    masks = {1 + k for k in mask_positions(family)}
    cell = reference.CELLS[family][0]

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        tensors = list(inputs[:ng + n_in])
        if scope == "seq":
            tensors.append(inputs[ng + n_in])  # lengths
            ctx.reverse, ctx.options = inputs[ng + n_in + 3], tuple(inputs[ng + n_in + 4:-1])
        else:
            ctx.options = tuple(inputs[ng + n_in + 1:-1])
        ctx.save_for_backward(*tensors)

    def backward(ctx, *vs):
        saved = ctx.saved_tensors
        g, p = saved[:ng], saved[ng:ng + n_in]
        present = [k for k, t in enumerate(p) if t is not None and k not in masks]  # masks: constants
        lengths = saved[-1] if scope == "seq" else None

        def forward(*q):  # the cell's outputs from the present inputs
            full = list(p)
            for k, t in zip(present, q):
                full[k] = t
            if scope == "seq":
                y, st = reference._seq(family, full[0], full[1:1 + nw], full[1 + nw:], lengths, ctx.reverse,
                                       ctx.options)
                return (y, *st)
            return tuple(cell(*full, *ctx.options))

        def first(gs, q):  # what the backward op computes: the vector-Jacobian product of forward with gs
            return torch.func.vjp(forward, *q)[1](gs)

        # torch.func rather than torch.autograd.grad: it differentiates only along these inputs (the
        # outer graph also links them: a lower layer's incoming grad depends on its xw), and it composes
        # with torch.func transforms and with a further derivative (the results are recorded when the
        # graph is kept)
        cot = tuple(torch.zeros_like(p[k]) if vs[k] is None or not vs[k].numel() else vs[k] for k in present)
        d_g, d_q = torch.func.vjp(first, tuple(g), tuple(p[k] for k in present))[1](cot)
        need = ctx.needs_input_grad
        res = [d if need[k] else None for k, d in enumerate(d_g)] + [None] * (len(need) - ng)
        for k, d in zip(present, d_q):
            if need[ng + k]:
                res[ng + k] = d
        return tuple(res)

    return setup_context, backward


LIB = torch.library.Library("fastrnn", "DEF")


def _forward_through(op):
    def forward(*args):
        return op(*args)
    return forward


def _forward_eager(impl, setup_context):
    """An autograd.Function's forward in the form that takes ``ctx`` (with a separate ``setup_context``,
    ``Function.apply`` binds the arguments through ``inspect.signature``: ~15 us a call)."""
    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        return out
    return forward


def _define_all():
    # Library.define/impl rather than torch.library.custom_op: custom_op wraps each implementation in
    # torch._dynamo.disable, whose first call imports torch._dynamo (~1.5 s of cold start).
    ops, functions, eager = {}, {}, {}
    for family in FAMILIES:
        for kind, schema in _schemas(family).items():
            opname = f"{family}_{kind}"
            LIB.define(opname + schema)
            LIB.impl(opname, _call_backend(opname), "CompositeExplicitAutograd")
            torch.library.register_fake(f"fastrnn::{opname}", _fakes(family, opname), lib=LIB)
            ops[opname] = getattr(torch.ops.fastrnn, opname).default
        for scope in ("seq", "step"):
            for name, (setup_context, backward) in (
                    (f"{family}_{scope}_fwd", _autograd(family, scope, f"{family}_{scope}_bwd")),
                    (f"{family}_{scope}_bwd", _double_backward(family, scope))):
                torch.library.register_autograd(f"fastrnn::{name}", backward, setup_context=setup_context,
                                                lib=LIB)
                # forward through the op itself: under vmap its batching falls back to a loop over the
                # samples (generate_vmap_rule), so every backend sees plain tensors
                functions[name] = type(f"_{name}", (torch.autograd.Function,), {
                    "forward": staticmethod(_forward_through(ops[name])),
                    "setup_context": staticmethod(setup_context), "backward": staticmethod(backward),
                    "generate_vmap_rule": True})
                # and straight to the implementation, for the eager calls that may skip the op layer
                eager[name] = type(f"_{name}_eager", (torch.autograd.Function,), {
                    "forward": staticmethod(_forward_eager(_call_backend(name), setup_context)),
                    "backward": staticmethod(backward)})
    return ops, functions, eager


OPS, _FUNCTIONS, _EAGER = _define_all()


def functorch_active():
    """Is a torch.func transform (grad, vjp, jacrev, ...) active?"""
    return torch._C._are_functorch_transforms_active()


def with_autograd(name):
    """The forward op ``name`` with its autograd formula. Under torch.func transforms the same formula
    as an autograd.Function of our own: the one torch.library.register_autograd generates has no
    setup_context staticmethod, which functorch requires (pytorch/pytorch#168393, open in torch 2.13).
    Where nothing intercepts ops (``can_skip_ops``) the same formula in an autograd.Function that calls
    the op's implementation directly: the op layer's autograd wrapper (its argument binding,
    ``torch._library.utils.fill_defaults``, rebuilds the schema's argument list for each argument) cost
    ~40 us of every training call (benchmarks/NOTES.md, twentieth session)."""
    if functorch_active():
        return _FUNCTIONS[name].apply
    if can_skip_ops():
        return _EAGER[name].apply
    return getattr(torch.ops.fastrnn, name)


def can_skip_ops():
    """May a call skip the op layer (its Python autograd wrapper costs ~25-40 us a call) and run the op's
    implementation directly (``DIRECT``; with autograd through ``with_autograd``'s Function)? Not while
    torch.compile traces, and not under a dispatch mode (FakeTensorMode, tracing), which need the op's fake
    implementation, nor under torch.func transforms (the op layer's autograd and batching), nor while
    torch.jit.trace records (a direct call would leave the recurrence out of the trace)."""
    return (not _is_compiling() and _get_current_dispatch_mode() is None
            and not _functorch_active() and _tracing_state() is None)


# the checks above bound once (a streaming cell call pays them every step: benchmarks/NOTES.md)
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_tracing_state = torch._C._get_tracing_state


#: what each op runs, to call without the op layer when ``can_skip_ops()`` and no gradient is needed
DIRECT = {name: _call_backend(name) for name in OPS}
