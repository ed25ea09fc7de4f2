"""The backends' one-step training node (``<family>_cell_train``: cpp's in C++, csrc/cell_train.h; numba's
a Python Function, backends/numba.py): a cell's step in training, or each layer-direction of a one-step
sequence call, as one autograd node. Against torch.nn in float64, with the calls recorded; its own
gradients checked numerically, twice; the variants and the refused calls on the general path."""
from collections import Counter

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fastrnn
from fastrnn import dispatch
from conftest import CPU_BACKENDS, assert_close

F64 = torch.float64
#: the backends with the node (the others run the step ops: tests/test_cells.py)
NODE = ["cpp", "numba"]
CELLS = [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {"nonlinearity": "tanh"}),
         ("RNNCell", {"nonlinearity": "relu"})]


def _family(cls):
    return cls.replace("Cell", "").lower()


@pytest.mark.parametrize("backend", NODE)
@pytest.mark.parametrize("form", ["cell", "seq"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("family,opts", [("lstm", ()), ("gru", ()), ("rnn", ("tanh",)), ("rnn", ("relu",))])
def test_node_gradients_checked_numerically_twice(family, opts, bias, form, backend):
    """gradcheck and gradgradcheck (a double backward recomputes the step with recorded ops), in the
    node's cell form (x [B, I], state [B, H]: the new state) and its sequence form (x [1, B, I], state
    [1, B, H]: y and the new state, y its own tensor equal to h')."""
    torch.manual_seed(0)
    G = {"lstm": 4, "gru": 3, "rnn": 1}[family]
    B, I, H = 3, 4, 5
    lead = (1,) if form == "seq" else ()
    r = lambda *s: torch.randn(*s, dtype=F64, requires_grad=True)  # noqa: E731
    ins = [r(*lead, B, I), r(G * H, I), r(G * H) if bias else None, r(G * H, H), r(G * H) if bias else None,
           r(*lead, B, H)] + ([r(*lead, B, H)] if family == "lstm" else [])
    op = getattr(dispatch.get(backend), f"{family}_cell_train")
    f = lambda *a: op(*a, *opts)  # noqa: E731
    out = f(*ins)
    out = list(out) if isinstance(out, (tuple, list)) else [out]
    assert len(out) == (1 if form == "seq" else 0) + (2 if family == "lstm" else 1)
    assert all(o.shape == (*lead, B, H) for o in out)
    if form == "seq":
        assert torch.equal(out[0], out[1]) and out[0].data_ptr() != out[1].data_ptr()
    assert torch.autograd.gradcheck(f, ins)
    assert torch.autograd.gradgradcheck(f, ins)


@pytest.mark.parametrize("backend", NODE)
def test_node_refuses_mismatched_forms(backend):
    """The sequence form takes x [1, B, I] with every state [1, B, H]; anything else is refused with a
    RuntimeError naming the shapes (the modules then take the general path and its torch.nn errors)."""
    op = dispatch.get(backend).lstm_cell_train
    w = (torch.randn(8, 3), None, torch.randn(8, 2), None)
    for x, h, c in [(torch.randn(1, 4, 3), torch.randn(4, 2), torch.randn(4, 2)),
                    (torch.randn(2, 4, 3), torch.randn(2, 4, 2), torch.randn(2, 4, 2)),
                    (torch.randn(4, 3), torch.randn(1, 4, 2), torch.randn(1, 4, 2))]:
        with pytest.raises(RuntimeError, match=r"\[1, B, I\]"):
            op(x, *w, h, c)


def _copy(ref, cls, backend="cpp", **kw):
    m = getattr(fastrnn, cls)(**kw, backend=backend, dtype=F64)
    m.load_state_dict(ref.state_dict())
    return m


def _params_grads(m):
    return [p.grad for p in m.parameters()]


@pytest.mark.parametrize("backend", NODE)
@pytest.mark.parametrize("cls,kw", CELLS, ids=[c + kw.get("nonlinearity", "") for c, kw in CELLS])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cell_decoder_steps_equal_torch_nn(cls, kw, bias, backend):
    """Four steps of a decoder (the state carried, the input a function of the last output, one backward):
    outputs and every gradient equal to torch.nn's, each step one ``<family>_cell_train`` node."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, cls)(5, 6, bias=bias, dtype=F64, **kw)
    m = _copy(ref, cls, backend, input_size=5, hidden_size=6, bias=bias, **kw)
    proj = torch.randn(6, 5, dtype=F64)
    x0 = torch.randn(3, 5, dtype=F64)

    def run(mod):
        x = x0.clone().requires_grad_()
        h0 = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        state = (h0, h0 * 0.5) if cls == "LSTMCell" else h0
        inp, outs = x, []
        for _ in range(4):
            state = mod(inp, state)
            h = state[0] if cls == "LSTMCell" else state
            outs.append(h)
            inp = torch.tanh(h @ proj)
        loss = sum((o * (k + 1)).sum() for k, o in enumerate(outs)) + (state[1].sum() if cls == "LSTMCell" else 0)
        loss.backward()
        return outs, [x.grad, h0.grad] + _params_grads(mod)

    with dispatch.record_calls() as calls:
        outs, grads = run(m)
    outs_r, grads_r = run(ref)
    for a, b in zip(outs + grads, outs_r + grads_r):
        assert_close(a, b, 1e-10, "decoder")
    assert set(calls) == {(f"{_family(cls)}_cell_train", backend)}
    assert len(calls) == 4


SEQ = [("LSTM", {}), ("GRU", {}), ("RNN", dict(nonlinearity="relu")),
       ("LSTM", dict(num_layers=2)), ("GRU", dict(bidirectional=True)),
       ("LSTM", dict(bidirectional=True, batch_first=True)), ("GRU", dict(num_layers=2, batch_first=True)),
       ("RNN", dict(num_layers=2, bidirectional=True, bias=False))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("cls,kw", SEQ, ids=[f"{c}-{'-'.join(k)}" for c, k in SEQ])
def test_one_step_sequence_calls_equal_torch_nn(cls, kw, unbatched, backend):
    """A sequence module called one step at a time in training (layers, directions, batch_first,
    unbatched input): outputs, final states and gradients equal to torch.nn's, each layer-direction one
    node on a backend that has it (else that backend's sequence ops, forward and backward), the output a
    tensor of its own (an in-place change to it is the caller's, as with torch.nn)."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, cls)(4, 5, dtype=F64, **kw)
    m = _copy(ref, cls, backend, input_size=4, hidden_size=5, **kw)
    D = 2 if kw.get("bidirectional") else 1
    L = kw.get("num_layers", 1)
    shape = (1, 4) if unbatched else ((2, 1, 4) if kw.get("batch_first") else (1, 2, 4))
    xs = [torch.randn(shape, dtype=F64) for _ in range(3)]

    def run(mod):
        xg = [x.clone().requires_grad_() for x in xs]
        state, loss = None, 0
        for k, x in enumerate(xg):
            y, state = mod(x, state)
            y.mul_(k + 1)  # in place on the output, as torch.nn allows
            loss = loss + y.sin().sum()
        hs = state if isinstance(state, tuple) else (state,)
        loss = loss + sum((s * s).sum() for s in hs)
        loss.backward()
        return [y, *hs], [x.grad for x in xg] + _params_grads(mod)

    with dispatch.record_calls() as calls:
        outs, grads = run(m)
    outs_r, grads_r = run(ref)
    for a, b in zip(outs + grads, outs_r + grads_r):
        assert a.shape == b.shape
        assert_close(a, b, 1e-10, "one-step sequence")
    family = cls.lower()
    if backend in NODE:
        assert Counter(calls) == {(f"{family}_cell_train", backend): 3 * L * D}
    else:
        assert Counter(calls) == {(f"{family}_seq_fwd", backend): 3 * L * D, (f"{family}_seq_bwd", backend): 3 * L * D}


@pytest.mark.parametrize("backend", NODE)
def test_variants_and_projections_take_the_general_path(backend):
    """What the node does not serve runs the step and sequence ops as before, with their numbers:
    peepholes and coupled gates against the reference backend (float64), proj_size against torch.nn."""
    torch.manual_seed(0)
    x0 = torch.randn(3, 5, dtype=F64)

    def run(mod, x):
        x = x.clone().requires_grad_()
        out = mod(x)
        out[0].sum().backward()
        return [out[0], x.grad] + _params_grads(mod)

    for kw in (dict(peephole=True), dict(coupled_gates=True)):
        m = fastrnn.LSTMCell(5, 6, backend=backend, dtype=F64, **kw)
        oracle = fastrnn.LSTMCell(5, 6, backend="reference", dtype=F64, **kw)
        oracle.load_state_dict(m.state_dict())
        with dispatch.record_calls() as calls:
            got = run(m, x0)
        assert set(calls) == {("lstm_step_fwd", backend), ("lstm_step_bwd", backend)}, kw
        for a, b in zip(got, run(oracle, x0)):
            assert_close(a, b, 1e-10, f"{kw}")
    ref = torch.nn.LSTM(5, 6, proj_size=3, dtype=F64)
    m = _copy(ref, "LSTM", backend, input_size=5, hidden_size=6, proj_size=3)
    with dispatch.record_calls() as calls:
        got = run(m, x0.unsqueeze(0))
    assert set(calls) == {("lstm_seq_fwd", backend), ("lstm_seq_bwd", backend)}
    for a, b in zip(got, run(ref, x0.unsqueeze(0))):
        assert_close(a, b, 1e-10, "proj_size")


@pytest.mark.parametrize("backend", NODE)
def test_refused_calls_raise_torch_nns_errors(backend):
    """A wrong input size in training: torch.nn's error type and message, the parameters untouched."""
    for cls, x, hx in (("GRUCell", torch.randn(3, 4), torch.randn(3, 6)), ("LSTM", torch.randn(1, 3, 4), None),
                       ("RNNCell", torch.randn(3, 5), torch.randn(2, 6))):
        torch.manual_seed(0)
        ref = getattr(torch.nn, cls)(5, 6)
        m = getattr(fastrnn, cls)(5, 6, backend=backend)
        m.load_state_dict(ref.state_dict())
        before = [p.detach().clone() for p in m.parameters()]
        with pytest.raises(Exception) as want:
            ref(x, hx)
        with pytest.raises(want.type) as got:
            m(x, hx)
        assert str(got.value) == str(want.value), cls
        assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


@pytest.mark.parametrize("backend", NODE)
def test_nan_propagates_as_in_torch(backend):
    """NaN in the input: the same NaN pattern in the outputs and gradients as torch.nn (relu's gradient
    passes where the output is NaN, as torch's threshold_backward)."""
    for cls, kw in CELLS:
        torch.manual_seed(0)
        ref = getattr(torch.nn, cls)(4, 5, dtype=F64, **kw)
        m = _copy(ref, cls, backend, input_size=4, hidden_size=5, **kw)
        x0 = torch.randn(3, 4, dtype=F64)
        x0[1, 2] = float("nan")
        res = []
        for mod in (m, ref):
            x = x0.clone().requires_grad_()
            out = mod(x)
            h = out[0] if isinstance(out, tuple) else out
            h.sum().backward()
            res.append([h, x.grad] + _params_grads(mod))
        for a, b in zip(*res):
            assert torch.equal(a.isnan(), b.isnan()), cls
            assert_close(torch.nan_to_num(a), torch.nan_to_num(b), 1e-10, cls)


@pytest.mark.parametrize("backend", NODE)
def test_checkpointing_and_hooks(backend):
    """Non-reentrant checkpointing (saved-tensor hooks on the node's saved inputs) and a gradient hook on
    the output: the gradients of the plain run."""
    torch.manual_seed(0)
    ref = torch.nn.GRUCell(4, 5, dtype=F64)
    m = _copy(ref, "GRUCell", backend, input_size=4, hidden_size=5)
    x = torch.randn(3, 4, dtype=F64)
    grads = []
    for mod, mode in ((m, "plain"), (m, "checkpoint"), (ref, "plain")):
        mod.zero_grad()
        seen = []
        h = None
        for _ in range(3):
            h = mod(x, h) if mode == "plain" else checkpoint(mod, x, h, use_reentrant=False)
        h.register_hook(lambda g: seen.append(g.clone()))
        h.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in mod.parameters()] + seen)
    for a, b, c in zip(*grads):
        assert_close(a, c, 1e-10, "plain against torch.nn")
        assert_close(b, c, 1e-10, "checkpoint against torch.nn")


@pytest.mark.parametrize("backend", NODE)
@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell", "LSTM", "GRU", "RNN"])
def test_double_backward_through_decoder_steps(cls, backend):
    """create_graph through three steps whose inputs depend on each other (h from the step before, the same
    weights; x a function of h): the first-order gradients (with their graph) and a gradient penalty's
    gradient equal torch.nn's. The recomputation differentiates aliases of the saved inputs, so the paths
    between them are counted once, by the outer backward."""
    torch.manual_seed(0)
    cell = cls.endswith("Cell")
    ref = getattr(torch.nn, cls)(4, 4, dtype=F64)
    m = _copy(ref, cls, backend, input_size=4, hidden_size=4)
    x0 = torch.randn(1 if not cell else 3, 4, dtype=F64) if cell else torch.randn(1, 3, 4, dtype=F64)
    res = []
    for mod in (m, ref):
        x, state = x0.clone().requires_grad_(), None
        for _ in range(3):
            out = mod(x, state)
            state = out if cell else out[1]
            h = (state[0] if isinstance(state, tuple) else state)
            x = torch.tanh(h) if cell else torch.tanh(h[-1:])
        loss = h.pow(2).sum()
        params = list(mod.parameters())
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        second = torch.autograd.grad(penalty, params)
        res.append([*grads, *second])
    for a, b in zip(*res):
        assert_close(a, b, 1e-9, f"{cls} create_graph")


@pytest.mark.parametrize("backend", NODE)
@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell", "RNN"])
def test_unusual_incoming_gradients(cls, backend):
    """Incoming gradients the kernels cannot take as they are: not contiguous (an einsum's), batched
    (``is_grads_batched``: torch.autograd.functional.jacobian's vectorized rows), autograd's zero tensor,
    a negated view: the gradients torch.nn gives."""
    torch.manual_seed(0)
    cell = cls.endswith("Cell")
    ref = getattr(torch.nn, cls)(4, 5, dtype=F64)
    m = _copy(ref, cls, backend, input_size=4, hidden_size=5)
    x0 = torch.randn(3, 4, dtype=F64) if cell else torch.randn(1, 3, 4, dtype=F64)

    def h_of(mod):
        out = mod(x0)
        return (out[0] if cls == "LSTMCell" else out) if cell else out[0][0]

    res = []
    for mod in (m, ref):
        got = []
        h = h_of(mod)
        got += torch.autograd.grad(torch.einsum("bh,kb->hk", h, torch.ones(7, 3, dtype=F64)).sum(),
                                   mod.weight_hh if cell else mod.weight_hh_l0, retain_graph=True)
        got += torch.autograd.grad(h, mod.weight_ih if cell else mod.weight_ih_l0,
                                   torch.eye(15, dtype=F64).view(15, 3, 5), retain_graph=True, is_grads_batched=True)
        got += torch.autograd.grad(h, mod.weight_ih if cell else mod.weight_ih_l0,
                                   torch._efficientzerotensor((3, 5), dtype=F64), retain_graph=True)
        got += torch.autograd.grad(h, mod.weight_ih if cell else mod.weight_ih_l0,
                                   torch._neg_view(torch.ones(3, 5, dtype=F64)))
        res.append([torch.as_tensor(g) if not g._is_zerotensor() else torch.zeros(g.shape, dtype=F64) for g in got])
    for a, b in zip(*res):
        assert_close(a, b, 1e-10, f"{cls} gradients")


@pytest.mark.parametrize("backend", NODE)
def test_no_node_where_nothing_needs_a_gradient(backend):
    """Grad mode on but nothing requiring a gradient (a frozen model evaluated without no_grad): the
    inference op, nothing saved; with one weight requiring it, the node."""
    ref = torch.nn.GRUCell(4, 5, dtype=F64)
    m = _copy(ref, "GRUCell", backend, input_size=4, hidden_size=5)
    m.requires_grad_(False)
    x = torch.randn(3, 4, dtype=F64)
    with dispatch.record_calls() as calls:
        h = m(x)
    assert calls == [("gru_cell_fwd", backend)] and not h.requires_grad
    assert_close(h, ref(x), 1e-12, "frozen")
    m.weight_hh.requires_grad_(True)
    with dispatch.record_calls() as calls:
        h = m(x)
    assert calls == [("gru_cell_train", backend)] and h.requires_grad
    h.sum().backward()
    ref(x).sum().backward()
    assert_close(m.weight_hh.grad, ref.weight_hh.grad, 1e-12, "weight_hh")
