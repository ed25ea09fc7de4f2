"""The custom ops: torch.library.opcheck on all twelve, gradcheck in float64 on each CPU backend."""
import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fastrnn
import fastrnn.backends.cpp
import fastrnn.backends.numba
from conftest import CPU_BACKENDS, backends_used, gradcheck
from test_cells import _op_args

FAMILIES = [("lstm", False), ("lstm", True), ("gru", False), ("rnn", False)]
IDS = ["lstm", "lstm_proj", "gru", "rnn"]


def _args(family, proj, dtype=torch.float64, ragged=True, reverse=False):
    g = torch.Generator().manual_seed(0)
    xw, weights, state, options = _op_args(family, 4, 3, 5, 2, dtype, reverse, None, proj, g)
    lengths = torch.tensor([4, 2, 1]) if ragged else None
    return xw, weights, state, lengths, options


def test_all_ops_registered():
    names = {f"{f}_{s}_{p}" for f in ("lstm", "gru", "rnn") for s in ("seq", "step") for p in ("fwd", "bwd")}
    assert set(fastrnn.ops.OPS) == names
    for n in names:
        assert hasattr(torch.ops.fastrnn, n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family,proj", FAMILIES, ids=IDS)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck(backend, family, proj, requires_grad, ran):
    xw, weights, state, lengths, options = _args(family, proj)
    if requires_grad:
        for t in (xw, *weights, *state):
            if t is not None:
                t.requires_grad_()
    ops = torch.ops.fastrnn
    seq_args = (xw, *weights, *state, lengths, True, *options, True, backend)
    torch.library.opcheck(getattr(ops, f"{family}_seq_fwd"), seq_args)
    step_args = (xw[0], *weights, *state, *options, True, backend)
    torch.library.opcheck(getattr(ops, f"{family}_step_fwd"), step_args)
    # the backward ops, with real forward results as their inputs
    with torch.no_grad():
        d = lambda t: None if t is None else t.detach()  # noqa: E731
        w, s = [d(t) for t in weights], [d(t) for t in state]
        y, *rest = getattr(ops, f"{family}_seq_fwd")(xw.detach(), *w, *s, lengths, True, *options, True, backend)
        finals, ws = rest[:-1], rest[-1]
        grads = [torch.randn_like(y)] + [torch.randn_like(f) for f in finals]
        torch.library.opcheck(getattr(ops, f"{family}_seq_bwd"),
                              (*grads, xw.detach(), *w, *s, lengths, y, ws, True, *options, backend))
        *new, ws1 = getattr(ops, f"{family}_step_fwd")(xw[0].detach(), *w, *s, *options, True, backend)
        torch.library.opcheck(getattr(ops, f"{family}_step_bwd"),
                              (*[torch.randn_like(t) for t in new], xw[0].detach(), *w, *s, ws1, *options, backend))
    assert backends_used(ran) == {backend}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family,proj", FAMILIES, ids=IDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gradcheck_ops(backend, family, proj, reverse, ran):
    xw, weights, state, lengths, options = _args(family, proj, reverse=reverse)
    tensors = [t.requires_grad_() for t in (xw, *weights, *state) if t is not None]
    nw = len(weights)
    present = [i for i, w in enumerate(weights) if w is not None]

    def rebuild(ts):
        w = [None] * nw
        for i, t in zip(present, ts[1:1 + len(present)]):
            w[i] = t
        return ts[0], w, ts[1 + len(present):]

    def seq(*ts):
        x, w, s = rebuild(ts)
        return getattr(torch.ops.fastrnn, f"{family}_seq_fwd")(x, *w, *s, lengths, reverse, *options, True,
                                                               backend)[:-1]

    def step(*ts):
        x, w, s = rebuild(ts)
        return getattr(torch.ops.fastrnn, f"{family}_step_fwd")(x[1], *w, *s, *options, True, backend)[:-1]

    assert gradcheck(seq, tensors, backend)
    assert gradcheck(step, tensors, backend)
    assert backends_used(ran) == {backend}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN], ids=["LSTM", "GRU", "RNN"])
def test_gradcheck_module_packed_bidirectional(backend, cls, ran):
    kw = dict(proj_size=2) if cls is fastrnn.LSTM else {}
    mod = cls(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64, backend=backend, **kw)
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in (2, 4, 1)]
    data = pack_sequence(seqs, enforce_sorted=False)
    x = data.data.clone().requires_grad_()
    params = list(mod.parameters())

    def f(x, *ps):
        out, st = torch.func.functional_call(mod, dict(zip([n for n, _ in mod.named_parameters()], ps)),
                                             (data._replace(data=x),))
        return (out.data, *(st if isinstance(st, tuple) else (st,)))

    assert gradcheck(f, (x, *[p.detach().clone().requires_grad_() for p in params]), backend)
    assert backends_used(ran) == {backend}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family,proj", FAMILIES, ids=IDS)
def test_inference_forward_saves_nothing(backend, family, proj, ran):
    """save=False (no backward will follow): same outputs, an empty workspace; opcheck holds too."""
    xw, weights, state, lengths, options = _args(family, proj)
    for scope, args in (("seq", (xw, *weights, *state, lengths, False, *options)),
                        ("step", (xw[0], *weights, *state, *options))):
        op = getattr(torch.ops.fastrnn, f"{family}_{scope}_fwd")
        kept, lean = op(*args, True, backend), op(*args, False, backend)
        for a, b in zip(kept[:-1], lean[:-1]):
            torch.testing.assert_close(b, a, atol=0, rtol=0)
        assert lean[-1].numel() == 0
        torch.library.opcheck(op, (*args, False, backend))
    assert backends_used(ran) == {backend}


@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN])
def test_modules_save_only_when_a_backward_can_follow(cls):
    m = cls(3, 4, backend="reference")
    x = torch.randn(5, 2, 3)
    for grad_mode, needs, expect in [(False, True, False), (True, False, False), (True, True, True)]:
        for p in m.parameters():
            p.requires_grad_(needs)
        with torch.set_grad_enabled(grad_mode), dispatch_saves() as saves:
            m(x)
        assert saves == [expect]


class dispatch_saves:
    """Record the save flag of every seq_fwd call in the block (through a wrapped backend method)."""

    def __enter__(self):
        from fastrnn import dispatch
        self.backend = dispatch.get("reference")
        self.saves = []
        self.originals = {}
        for fam in ("lstm", "gru", "rnn"):
            name = f"{fam}_seq_fwd"
            orig = getattr(self.backend, name)
            self.originals[name] = orig

            def wrapped(*a, _orig=orig):
                self.saves.append(a[-1])
                return _orig(*a)
            setattr(self.backend, name, wrapped)
        return self.saves

    def __exit__(self, *exc):
        for name in self.originals:
            delattr(self.backend, name)


_UNUSED = [(fastrnn.LSTM, torch.nn.LSTM, u, kw) for u in ("y", "h_n", "c_n")
           for kw in ({}, {"proj_size": 2}, {"bidirectional": True})] + [
    (c, t, u, kw) for c, t in ((fastrnn.GRU, torch.nn.GRU), (fastrnn.RNN, torch.nn.RNN)) for u in ("y", "h_n")
    for kw in ({}, {"bidirectional": True})]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls,tcls,used,kw", _UNUSED,
                         ids=[f"{c.__name__}-{u}-{'-'.join(k) or 'plain'}" for c, _, u, k in _UNUSED])
def test_grads_when_some_outputs_are_unused(backend, cls, tcls, used, kw, ran):
    """The forward ops' unused outputs get no gradient (None, not a zero-filled tensor, reaches the op's
    backward); the backward then stands in zeros for them, so the gradients still equal torch's."""
    torch.manual_seed(5)
    ref = tcls(3, 4, num_layers=2, **kw).double()
    mod = cls(3, 4, num_layers=2, backend=backend, **kw).double()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    res = []
    for m in (mod, ref):
        xi = x.clone().requires_grad_()
        y, st = m(xi)
        st = st if isinstance(st, tuple) else (st,)
        out = {"y": y, "h_n": st[0], "c_n": st[-1]}[used]
        res.append(torch.autograd.grad((out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                       [xi, *m.parameters()]))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert backends_used(ran) == {backend}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cell_grads_when_one_state_is_unused(backend, ran):
    torch.manual_seed(6)
    ref = torch.nn.LSTMCell(3, 4).double()
    mod = fastrnn.LSTMCell(3, 4, backend=backend).double()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, dtype=torch.float64)
    for k in (0, 1):
        res = []
        for m in (mod, ref):
            xi = x.clone().requires_grad_()
            st = m(xi)
            res.append(torch.autograd.grad(st[k].sum(), [xi, *m.parameters()]))
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert backends_used(ran) == {backend}


def _graph_names(t):
    """The class names of every autograd node behind ``t``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN", "LSTMCell"])
def test_eager_training_skips_the_op_layer_with_the_ops_numbers(backend, cls, monkeypatch, ran):
    """In eager training the forward runs the op's implementation in an autograd.Function of fastrnn's own
    (``ops.with_autograd``: the op layer's wrapper cost ~40 us a call), with the op's formula: outputs and
    gradients equal to torch.nn's (float64), and bit for bit those of ``torch.ops.fastrnn`` (taken where a
    tracer records)."""
    # a cell on a backend with the one-step training node takes the node (test_cell_train.py): here without it
    monkeypatch.setattr(fastrnn.backends.cpp, "_DIRECT_NAMES",
                        {n for n in fastrnn.backends.cpp._DIRECT_NAMES if not n.endswith("_cell_train")})
    for family in ("lstm", "gru", "rnn"):
        monkeypatch.delattr(fastrnn.backends.numba.NumbaBackend, f"{family}_cell_train")
    torch.manual_seed(0)
    ref = getattr(torch.nn, cls)(5, 8, dtype=torch.float64)
    m = getattr(fastrnn, cls)(5, 8, backend=backend, dtype=torch.float64)
    m.load_state_dict(ref.state_dict())
    cell = cls.endswith("Cell")
    x = torch.randn(3, 5, dtype=torch.float64) if cell else torch.randn(4, 3, 5, dtype=torch.float64)

    def run(mod):
        mod.zero_grad()
        xg = x.clone().requires_grad_()
        y = mod(xg)[0]  # a sequence's output, an LSTMCell's h
        (y * torch.arange(y.numel()).view(y.shape).sin()).sum().backward()
        return y, [xg.grad] + [p.grad for p in mod.parameters()], _graph_names(y)

    y, grads, names = run(m)
    assert any(n.endswith("_eagerBackward") for n in names), names
    y_ref, grads_ref, _ = run(ref)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    monkeypatch.setattr(fastrnn.ops, "can_skip_ops", lambda: False)  # the op layer, as under a tracer
    y2, grads2, names2 = run(m)
    assert not any(n.endswith("_eagerBackward") for n in names2), names2
    assert torch.equal(y, y2)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)
