"""Double backward through fastrnn's recurrence, against torch.nn in float64 on every CPU backend.

The first-order backward runs the backend's fused backward op; when its graph is kept
(``create_graph=True``, torch.func.grad) that op is recorded with a derivative of its own, computed by
recomputation on the reference math (``fastrnn.ops._double_backward``). Covered: a gradient penalty
(the incoming gradient constant, as from ``y.sum()``, or itself requiring grad, as from
``y.pow(2).sum()``), a Hessian-vector product, ``gradgradcheck``, the grad of a torch.func.grad, a third
derivative, packed sequences and the LSTM variants (against an unrolled loop of the reference cell)."""
import pytest
import torch
from torch.func import functional_call, grad
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import dispatch
from fastrnn.backends import reference
from conftest import CPU_BACKENDS, GRID_BACKENDS, backends_used, gradcheck

F64 = torch.float64
SEQ = {"LSTM": dict(num_layers=2, bidirectional=True), "GRU": dict(num_layers=2), "RNN": dict(bidirectional=True)}
CELLS = ("LSTMCell", "GRUCell", "RNNCell")
NAMES = list(SEQ) + list(CELLS)


def _pair(name, backend, **kw):
    torch.manual_seed(0)
    kw = {**SEQ.get(name, {}), **kw}
    theirs = getattr(torch.nn, name)(3, 4, dtype=F64, **kw)
    ours = getattr(fastrnn, name)(3, 4, dtype=F64, backend=backend, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _inputs(name):
    torch.manual_seed(1)
    if name in CELLS:
        h = torch.randn(2, 4, dtype=F64)
        return torch.randn(2, 3, dtype=F64), ((h, 0.5 * h) if name == "LSTMCell" else h)
    return torch.randn(5, 2, 3, dtype=F64), None


def _flat(out, cell):
    """A module's outputs as a list of tensors."""
    if cell:
        return list(out) if isinstance(out, tuple) else [out]
    y, st = out
    return [y, *(st if isinstance(st, tuple) else (st,))]


def _outputs(m, x, hx):
    return _flat(m(x, hx), isinstance(m, torch.nn.RNNCellBase))


def _penalty_grads(m, x, hx, square):
    """The gradients of a gradient penalty ||d loss / d x||^2, with loss the sum of the outputs (the
    incoming gradient a constant) or of their squares (the incoming gradient requires grad)."""
    m.zero_grad()
    xi = x.clone().requires_grad_(True)
    outs = _outputs(m, xi, hx)
    loss = sum((o.pow(2) if square else o).sum() for o in outs)
    (gx,) = torch.autograd.grad(loss, xi, create_graph=True)
    gx.pow(2).sum().backward()
    return [xi.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("square", [False, True], ids=["grad-constant", "grad-requires-grad"])
@pytest.mark.parametrize("name", NAMES)
def test_gradient_penalty(name, square, backend):
    ours, theirs = _pair(name, backend)
    x, hx = _inputs(name)
    with dispatch.record_calls() as ran:
        got = _penalty_grads(ours, x, hx, square)
    assert backends_used(ran) == {backend}
    want = _penalty_grads(theirs, x, hx, square)
    assert all(w is not None and w.abs().sum() > 0 for w in want)  # every gradient takes part
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def _hvp(m, x, hx):
    """Hessian-vector product of a loss over the parameters (and the initial state), v fixed by a seed."""
    params = list(m.parameters())
    loss = sum(o.pow(2).sum() for o in _outputs(m, x, hx))
    gs = torch.autograd.grad(loss, params, create_graph=True)
    torch.manual_seed(2)
    vs = [torch.randn_like(p) for p in params]
    return torch.autograd.grad(sum((g * v).sum() for g, v in zip(gs, vs)), params)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_hessian_vector_product(name, backend):
    ours, theirs = _pair(name, backend)
    x, hx = _inputs(name)
    if hx is not None:  # through the initial state too
        hx = tuple(s.clone().requires_grad_(True) for s in hx) if isinstance(hx, tuple) else hx.clone().requires_grad_(True)
    with dispatch.record_calls() as ran:
        got = _hvp(ours, x, hx)
    assert backends_used(ran) == {backend}
    for g, w in zip(got, _hvp(theirs, x, hx)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_packed_gradient_penalty(name, backend):
    """Ragged rows: a PackedSequence (unsorted lengths) through a 2-layer bidirectional module."""
    ours, theirs = _pair(name, backend, num_layers=2, bidirectional=True)
    torch.manual_seed(3)
    x = torch.randn(5, 3, 3, dtype=F64)
    lengths = torch.tensor([3, 5, 1])

    def run(m):
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        y, _ = m(pack_padded_sequence(xi, lengths, enforce_sorted=False))
        (gx,) = torch.autograd.grad(y.data.pow(2).sum(), xi, create_graph=True)
        gx.pow(2).sum().backward()
        return [xi.grad] + [p.grad for p in m.parameters()]

    with dispatch.record_calls() as ran:
        got = run(ours)
    assert backends_used(ran) == {backend}
    for g, w in zip(got, run(theirs)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", GRID_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_gradgradcheck(name, backend):
    """Second derivatives of the module against finite differences of its fused first-order backward,
    with respect to the input, the state and the recurrent weights."""
    torch.manual_seed(0)
    kw = dict(num_layers=2) if name not in CELLS else {}
    m = getattr(fastrnn, name)(2, 3, dtype=F64, backend=backend, **kw)
    x = torch.randn(*((3, 2) if name in CELLS else (4, 1, 2)), dtype=F64, requires_grad=True)
    h = torch.randn(*((3, 3) if name in CELLS else (2, 1, 3)), dtype=F64, requires_grad=True)
    w = m.weight_hh if name in CELLS else m.weight_hh_l0
    pname = "weight_hh" if name in CELLS else "weight_hh_l0"

    def fn(x_, h_, w_):
        hx = (h_, h_.tanh()) if name.startswith("LSTM") else h_
        return tuple(_flat(functional_call(m, {pname: w_}, (x_, hx), strict=False), name in CELLS))

    inputs = (x, h, w.detach().clone().requires_grad_(True))
    with dispatch.record_calls() as ran:
        assert gradcheck(fn, inputs, backend)
        assert torch.autograd.gradgradcheck(fn, inputs)
    assert backends_used(ran) == {backend}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["LSTM", "GRU", "GRUCell"])
def test_func_grad_of_grad(name, backend):
    """torch.func: the gradient of a gradient norm (meta-learning's second-order term), as torch.nn."""
    ours, theirs = _pair(name, backend)
    x, hx = _inputs(name)

    def outer(m):
        def loss(p, xx):
            return sum(o.pow(2).sum() for o in _flat(functional_call(m, p, (xx, hx)), name in CELLS))

        def penalty(p):
            return grad(loss, argnums=1)(p, x).pow(2).sum()
        return penalty

    params = {k: v.detach() for k, v in theirs.named_parameters()}
    with dispatch.record_calls() as ran:
        got = grad(outer(ours))(params)
    assert backends_used(ran) == {backend}
    want = grad(outer(theirs))(params)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_third_derivative(backend):
    """d^3/dx^3 of a scalar function of a GRU's output, summed: the recomputed second derivative is itself
    differentiable."""
    ours, theirs = _pair("GRU", backend, num_layers=1)

    def third(m):
        x = torch.linspace(-1, 1, 30, dtype=F64).view(5, 2, 3).requires_grad_(True)
        y = m(x)[0].pow(2).sum()
        (g1,) = torch.autograd.grad(y, x, create_graph=True)
        (g2,) = torch.autograd.grad(g1.sin().sum(), x, create_graph=True)
        (g3,) = torch.autograd.grad(g2.pow(2).sum(), x)
        return g3

    with dispatch.record_calls() as ran:
        got = third(ours)
    assert backends_used(ran) == {backend}
    torch.testing.assert_close(got, third(theirs), atol=1e-10, rtol=1e-10)


def _unrolled_variant(m, x, h, c):
    """The LSTM variant as a plain loop of the reference cell: the oracle torch.nn cannot be for it."""
    xw = torch.nn.functional.linear(x, m.weight_ih_l0, m.bias_ih_l0)
    ys = []
    for t in range(x.shape[0]):
        h, c = reference.lstm_cell(xw[t], m.weight_hh_l0, m.bias_hh_l0, None, m.weight_ch_l0, *[None] * 6, h, c,
                                       m.coupled_gates, 0.0, 0.0)
        ys.append(h)
    return torch.stack(ys), h, c


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_variant_gradient_penalty(backend):
    torch.manual_seed(0)
    m = fastrnn.LSTM(3, 4, peephole=True, coupled_gates=True, dtype=F64, backend=backend)
    x = torch.randn(5, 2, 3, dtype=F64)
    h0 = torch.randn(1, 2, 4, dtype=F64)

    def run(fn):
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        outs = fn(xi)
        (gx,) = torch.autograd.grad(sum(o.pow(2).sum() for o in outs), xi, create_graph=True)
        gx.pow(2).sum().backward()
        return [xi.grad] + [p.grad.clone() for p in m.parameters()]

    with dispatch.record_calls() as ran:
        got = run(lambda xi: (lambda o: [o[0], *o[1]])(m(xi, (h0, h0.neg()))))
    assert backends_used(ran) == {backend}
    want = run(lambda xi: list(_unrolled_variant(m, xi, h0[0], h0[0].neg())))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
