"""torch.func transforms over fastrnn modules, on every CPU backend: grad (torch.func.grad with
functional_call, as in meta-learning) and vmap(grad) (per-sample gradients) against torch.nn. The op
layer's autograd under functorch is an autograd.Function of fastrnn's own (``ops.with_autograd``):
the one torch.library.register_autograd generates lacks the setup_context functorch needs."""
import pytest
import torch
from torch.func import functional_call, grad, vmap

import fastrnn
from fastrnn import dispatch
from conftest import CPU_BACKENDS, backends_used

CASES = [("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(proj_size=3)), ("GRU", dict(num_layers=2)),
         ("RNN", dict(bidirectional=True, nonlinearity="relu"))]


def _loss(m):
    def fn(params, x):
        out = functional_call(m, params, (x,))
        y = out[0] if isinstance(out, tuple) and not isinstance(m, torch.nn.LSTMCell) else out
        return sum(t.pow(2).sum() for t in (y if isinstance(y, tuple) else (y,)))
    return fn


def _pair(name, kw, backend):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(4, 6, dtype=torch.float64, **kw)
    ours = getattr(fastrnn, name)(4, 6, dtype=torch.float64, backend=backend, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, {k: v.detach() for k, v in theirs.named_parameters()}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(kw)}" for n, kw in CASES])
def test_grad(name, kw, backend):
    ours, theirs, params = _pair(name, kw, backend)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with dispatch.record_calls() as ran:
        g = grad(_loss(ours))(params, x)
    assert backends_used(ran) == {backend}
    want = grad(_loss(theirs))(params, x)
    assert set(g) == set(want)
    for k in want:
        torch.testing.assert_close(g[k], want[k], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,kw", CASES[:1] + CASES[2:3], ids=["LSTM-bi", "GRU"])
def test_per_sample_gradients(name, kw, backend):
    """vmap(grad) over the batch: each sample's gradients, as computed one sample at a time."""
    ours, theirs, params = _pair(name, kw, backend)
    x = torch.randn(5, 3, 1, 4, dtype=torch.float64)  # [T, samples, 1, I]
    with dispatch.record_calls() as ran:
        g = vmap(grad(_loss(ours)), in_dims=(None, 1))(params, x)
    assert backends_used(ran) == {backend}
    for b in range(3):
        want = grad(_loss(theirs))(params, x[:, b])
        for k in want:
            torch.testing.assert_close(g[k][b], want[k], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_grad(name, backend):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(4, 6, dtype=torch.float64)
    ours = getattr(fastrnn, name)(4, 6, dtype=torch.float64, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    params = {k: v.detach() for k, v in theirs.named_parameters()}
    x = torch.randn(3, 4, dtype=torch.float64)
    h = torch.randn(3, 6, dtype=torch.float64)
    hx = (h, h.neg()) if name == "LSTMCell" else h

    def loss(m):
        def fn(p, x):
            out = functional_call(m, p, (x, hx))
            return sum(t.pow(2).sum() for t in (out if isinstance(out, tuple) else (out,)))
        return fn

    with dispatch.record_calls() as ran:
        g = grad(loss(ours))(params, x)
    assert backends_used(ran) == {backend}
    want = grad(loss(theirs))(params, x)
    for k in want:
        torch.testing.assert_close(g[k], want[k], atol=1e-10, rtol=1e-10)
