"""In-place ops on a module's output, as training code writes them (a residual ``out += x``, ``relu_``,
``nn.ReLU(inplace=True)``, in-place dropout), then a backward: gradients equal to torch.nn's (float64,
where torch.nn allows all of them; float32 against the same ops out of place, since torch.nn's own
float32 LSTM refuses them) on every CPU backend. The sequence ops' backward reads the output y they
returned: the modules hand out a copy (``fastrnn.functional.rnn_layers``)."""
import pytest
import torch
import torch.nn.functional as F

import fastrnn
from fastrnn import dispatch
from conftest import CPU_BACKENDS, backends_used

NAMES = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]


def _residual(o, x):
    o += x
    return o


OPS = {
    "residual": _residual,
    "relu_": lambda o, x: o.relu_(),
    "ReLU-inplace": lambda o, x: torch.nn.ReLU(inplace=True)(o),
    "dropout-inplace": lambda o, x: F.dropout(o, 0.5, training=True, inplace=True),
    "mul_-then-tanh_": lambda o, x: o.mul_(2).tanh_(),
}


def _run(m, name, op, dtype, batch_first=False, inplace=True):
    """loss of the op applied to the output (and to h_n: also handed out), and every gradient."""
    torch.manual_seed(1)
    cell = "Cell" in name
    shape = (2, 4) if cell else ((2, 5, 4) if batch_first else (5, 2, 4))
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    out = m(x)
    o = (out[0] if isinstance(out, tuple) else out) if cell else out[0]
    res = x[..., :o.shape[-1]]
    torch.manual_seed(2)  # the same dropout mask for both modules
    o = OPS[op](o if inplace else o.clone(), res.detach())
    loss = o.pow(2).sum()
    if not cell:
        hn = out[1][0] if isinstance(out[1], tuple) else out[1]
        loss = loss + hn.relu_().sum()
    m.zero_grad()
    loss.backward()
    return [o.detach(), x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("name", NAMES)
def test_inplace_on_output_float64(name, op, backend):
    kw = {} if "Cell" in name else dict(num_layers=2)
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(4, 4, dtype=torch.float64, **kw)
    ours = getattr(fastrnn, name)(4, 4, dtype=torch.float64, backend=backend, **kw)
    ours.load_state_dict(theirs.state_dict())
    # torch.nn's RNNCell (its tanh saves the output) refuses the in-place ops: against the out-of-place run
    ref = _run(ours, name, op, torch.float64, inplace=False) if name == "RNNCell" else _run(theirs, name, op, torch.float64)
    with dispatch.record_calls() as ran:
        got = _run(ours, name, op, torch.float64)
    assert backends_used(ran) == {backend}
    for g, w in zip(got, ref):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,kw", [("LSTM", dict(batch_first=True)), ("LSTM", dict(proj_size=2)),
                                     ("GRU", dict(batch_first=True)), ("RNN", dict(nonlinearity="relu"))],
                         ids=["LSTM-batch_first", "LSTM-proj", "GRU-batch_first", "RNN-relu"])
def test_inplace_on_output_float32(name, kw, backend):
    """float32 (torch.nn's LSTM refuses in-place ops on its output there: oneDNN saves it): the in-place
    run equals the same ops on a copy, to the bit."""
    torch.manual_seed(0)
    ours = getattr(fastrnn, name)(4, 4, backend=backend, **kw)
    bf = kw.get("batch_first", False)
    with dispatch.record_calls() as ran:
        got = _run(ours, name, "residual", torch.float32, bf)
    assert backends_used(ran) == {backend}
    want = _run(ours, name, "residual", torch.float32, bf, inplace=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("T,B", [(1, 1), (1, 3), (2, 2), (1, 8)])
def test_inplace_on_output_leaves_the_state(name, T, B, backend):
    """Streaming code feeds h_n back and may change y in place meanwhile (``y.relu_()``): y and h_n are separate
    tensors, as torch.nn's, whatever path the call takes (one step of a few rows runs the fused cell: numba's
    chunk entry handed out h_n's own memory as y there)."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(4, 4)
    ours = getattr(fastrnn, name)(4, 4, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    xs = torch.randn(3, T, B, 4)
    state_t = state_o = None
    with torch.no_grad(), dispatch.record_calls() as ran:
        for x in xs:
            y_t, state_t = theirs(x, state_t)
            y_o, state_o = ours(x, state_o)
            y_t.mul_(-2).relu_()
            y_o.mul_(-2).relu_()
            torch.testing.assert_close(y_o, y_t, atol=1e-6, rtol=1e-5)
            for a, b in zip(state_o if name == "LSTM" else (state_o,), state_t if name == "LSTM" else (state_t,)):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert backends_used(ran) == {backend}
