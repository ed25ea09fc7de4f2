"""``weight_dropout=p``: DropConnect on the recurrent weights (issue 18's weight drop), on every module class
and CPU backend. The oracle is torch.nn itself run on the dropped weights, with the masks drawn as the
module documents them (``fastrnn.modules._drop_mask``, written out again here): same seed, same masks,
value for value."""
import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import dispatch
from conftest import CPU_BACKENDS, backends_used

F64 = torch.float64
CASES = [("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(proj_size=3)), ("GRU", dict(num_layers=2)),
         ("RNN", dict(bidirectional=True, nonlinearity="relu")), ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {})]
IDS = [f"{n}-{'-'.join(kw) or 'plain'}" for n, kw in CASES]


def _hh_names(m):
    if isinstance(m, torch.nn.RNNCellBase):
        return ["weight_hh"]
    D = 2 if m.bidirectional else 1
    return [f"weight_hh_l{k}{'_reverse' if d else ''}" for k in range(m.num_layers) for d in range(D)]


def _oracle(theirs, p, x, hx):
    """torch.nn on the dropped recurrent weights: the masks drawn in the module's documented order."""
    params = dict(theirs.named_parameters())
    for n in _hh_names(theirs):
        w = params[n]
        bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((w.numel() + 3) // 4,), dtype=torch.int64)
        c = min(round(p * 65536), 65535)
        keep = bits.view(torch.int16)[:w.numel()].view(w.shape) >= c - 32768
        params[n] = w * (keep.to(w.dtype) * (65536 / (65536 - c)))
    return functional_call(theirs, params, (x, hx))


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out[0], torch.nn.utils.rnn.PackedSequence):
        out = (out[0].data, out[1])
    first, rest = out
    return [first, *(rest if isinstance(rest, tuple) else (rest,))]


def _pair(name, kw, backend, p):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(3, 5, dtype=F64, **kw)
    ours = getattr(fastrnn, name)(3, 5, dtype=F64, backend=backend, weight_dropout=p, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _input(name, packed=False):
    torch.manual_seed(1)
    if "Cell" in name:
        return torch.randn(4, 3, dtype=F64, requires_grad=True), None
    x = torch.randn(6, 4, 3, dtype=F64, requires_grad=True)
    return (pack_padded_sequence(x, torch.tensor([6, 2, 5, 1]), enforce_sorted=False) if packed else x), None


def _grads(m, outs, x):
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=F64).view_as(o)).sum() for o in outs)
    return torch.autograd.grad(loss, [x, *m.parameters()])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_against_torch_on_dropped_weights(name, kw, backend):
    ours, theirs = _pair(name, kw, backend, 0.3)
    x, hx = _input(name)
    torch.manual_seed(7)
    with dispatch.record_calls() as ran:
        got = _flat(ours(x, hx))
    assert backends_used(ran) == {backend}
    torch.manual_seed(7)
    want = _flat(_oracle(theirs, 0.3, x, hx))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)
    for g, w in zip(_grads(ours, got, x), _grads(theirs, want, x)):  # the raw weights' gradients, masked
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_packed_and_inference_without_grad(name, backend):
    """A PackedSequence, and a training-mode call under no_grad (the inference fast paths step aside)."""
    ours, theirs = _pair(name, dict(num_layers=2, bidirectional=True), backend, 0.5)
    x, hx = _input(name, packed=True)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.manual_seed(3)
            got = _flat(ours(x, hx))
            torch.manual_seed(3)
            want = _flat(_oracle(theirs, 0.5, x, hx))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)
    with torch.no_grad():  # a short chunk too (the streaming fast path in plain modules)
        torch.manual_seed(4)
        got = _flat(ours(torch.randn(1, 1, 3, dtype=F64)))
        torch.manual_seed(4)
        want = _flat(_oracle(theirs, 0.5, torch.randn(1, 1, 3, dtype=F64), None))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_zero_and_eval_are_the_plain_module(name, kw):
    plain, _ = _pair(name, kw, None, 0.0)
    dropped, _ = _pair(name, kw, None, 0.6)
    x, hx = _input(name)
    want = _flat(plain(x, hx))
    dropped.eval()
    before = torch.random.get_rng_state()
    got = _flat(dropped(x, hx))
    assert torch.equal(torch.random.get_rng_state(), before)  # nothing drawn in eval
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    assert f"weight_dropout=0.6" in repr(dropped) and "weight_dropout" not in repr(plain)


def test_new_mask_each_call_parameter_untouched_and_rate():
    m = fastrnn.LSTM(8, 512, weight_dropout=0.25)
    w = m.weight_hh_l0.detach().clone()
    seen = []
    orig = type(m)._drop_recurrent

    def spy(self, w_hh):
        out = orig(self, w_hh)
        seen.append(out.detach())
        return out

    type(m)._drop_recurrent = spy
    try:
        for _ in range(2):
            m.zero_grad()
            m(torch.randn(2, 1, 8))[0].sum().backward()
    finally:
        type(m)._drop_recurrent = orig
    assert torch.equal(m.weight_hh_l0, w) and set(m.state_dict()) == set(fastrnn.LSTM(8, 512).state_dict())
    zeros = [(d == 0).double().mean().item() for d in seen]
    n = w.numel()  # 1M elements: the rate within 6 standard deviations of p
    assert all(abs(z - 0.25) < 6 * (0.25 * 0.75 / n) ** 0.5 for z in zeros), zeros
    assert not torch.equal(seen[0] == 0, seen[1] == 0)  # a new mask each call
    kept = seen[0] != 0  # p = 0.25 is a multiple of 2^-16: the scale is exactly 1 / 0.75
    torch.testing.assert_close(seen[0][kept], (w * (1 / 0.75))[kept], atol=1e-6, rtol=1e-6)
    # the gradient reaches the parameter through the mask of the last call: zero where it dropped
    g = m.weight_hh_l0.grad
    assert bool((g[seen[1] == 0] == 0).all()) and bool((g[seen[1] != 0] != 0).any())


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", True, None])
def test_bad_probability(bad):
    with pytest.raises(ValueError, match=r"weight_dropout should be a number in range \[0, 1\)"):
        fastrnn.GRU(3, 4, weight_dropout=bad)
    with pytest.raises(ValueError, match=r"weight_dropout should be a number in range \[0, 1\)"):
        fastrnn.LSTMCell(3, 4, weight_dropout=bad)


def test_compile_and_convert_keep_working():
    torch.manual_seed(0)
    m = fastrnn.GRU(3, 4, weight_dropout=0.3)
    x = torch.randn(5, 2, 3)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    got = compiled(x)[0]
    torch.manual_seed(5)
    want = m(x)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    model = fastrnn.convert(torch.nn.Sequential(torch.nn.GRU(3, 4)))
    assert model[0].weight_dropout == 0.0


@pytest.mark.parametrize("name", ["GRU", "LSTMCell"])
def test_bad_input_draws_no_mask(name):
    """A call refused by the argument checks raises torch's error before any mask is drawn: the RNG state
    is as it was, so a seeded run is not shifted by a caught error."""
    m = getattr(fastrnn, name)(3, 4, weight_dropout=0.5)
    bad = torch.randn(2, 5) if "Cell" in name else torch.randn(5, 2, 7)  # wrong feature size
    before = torch.random.get_rng_state()
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size|inconsistent input_size"):
        m(bad)
    assert torch.equal(torch.random.get_rng_state(), before)
