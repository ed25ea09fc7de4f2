"""fastrnn.convert on a small model: embedding, 2-layer bidirectional LSTM, linear head."""
import warnings

import pytest
import torch

import fastrnn
from conftest import CPU_BACKENDS, backends_used


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.lstm = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True, dropout=0.0)
        self.head = torch.nn.Linear(32, 5)
        self.extra = torch.nn.ModuleList([torch.nn.GRUCell(5, 6), torch.nn.RNN(5, 6, nonlinearity="relu")])

    def forward(self, tok):
        y, _ = self.lstm(self.emb(tok))
        return self.head(y)


@pytest.mark.parametrize("backend", [None] + CPU_BACKENDS)
def test_convert_matches_torch(backend, ran):
    torch.manual_seed(0)
    model = Tagger().double()
    ref = Tagger().double()
    ref.load_state_dict(model.state_dict())
    params_before = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()

    out = fastrnn.convert(model, backend=backend)
    assert out is model
    assert type(model.lstm) is fastrnn.LSTM and isinstance(model.lstm, torch.nn.LSTM)
    assert type(model.extra[0]) is fastrnn.GRUCell and type(model.extra[1]) is fastrnn.RNN
    assert model.lstm.backend == backend
    assert not model.training and not model.lstm.training
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert all(p.dtype == torch.float64 for p in model.parameters())

    tok = torch.randint(0, 20, (3, 7))
    y, yr = model(tok), ref.eval()(tok)
    torch.testing.assert_close(y, yr, atol=1e-10, rtol=1e-10)
    g = torch.randn(y.shape, dtype=torch.float64)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    for (n, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters()):
        if pr.grad is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, pr.grad, atol=1e-10, rtol=1e-10, msg=n)
    # the optimizer built before convert still updates the (same) parameters
    w = model.lstm.weight_hh_l0.detach().clone()
    opt.step()
    assert not torch.equal(model.lstm.weight_hh_l0, w)
    assert backends_used(ran) == {backend or CPU_BACKENDS[0]}


def test_convert_root_and_idempotent():
    root = torch.nn.GRU(3, 4)
    assert type(fastrnn.convert(root)) is fastrnn.GRU
    already = fastrnn.LSTM(3, 4, backend="reference")
    fastrnn.convert(torch.nn.Sequential(already))
    assert already.backend == "reference"  # left alone


def test_convert_keeps_user_subclasses():
    class MyLSTM(torch.nn.LSTM):
        pass
    m = torch.nn.Sequential(MyLSTM(3, 4))
    with pytest.warns(UserWarning, match=r"left '0' \(MyLSTM\) as torch.nn runs it: its class .*MyLSTM is a "
                                         r"subclass of torch.nn.LSTM"):
        fastrnn.convert(m)
    assert type(m[0]) is MyLSTM


class _Scale(torch.nn.Module):
    """A custom parametrization: w * exp(s), s a parameter of its own."""

    def __init__(self):
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, w):
        return w * self.s.exp()


P = torch.nn.utils.parametrizations
PARAMETRIZATIONS = {
    "weight_norm": lambda m, n: P.weight_norm(m, n),
    "spectral_norm": lambda m, n: P.spectral_norm(m, n),
    "custom": lambda m, n: torch.nn.utils.parametrize.register_parametrization(m, n, _Scale().double()),
}
PARAM_MODULES = [("LSTM", ("weight_hh_l0", "weight_ih_l1")), ("GRU", ("weight_hh_l0",)),
                 ("RNN", ("weight_ih_l0",)), ("LSTMCell", ("weight_hh",)), ("GRUCell", ("weight_ih", "weight_hh")),
                 ("RNNCell", ("weight_hh",))]


def _param_pair(name, kind, names, when):
    torch.manual_seed(0)
    kw = dict(num_layers=2) if "Cell" not in name else {}
    theirs = getattr(torch.nn, name)(3, 4, dtype=torch.float64, **kw)
    ours = torch.nn.Sequential(getattr(torch.nn, name)(3, 4, dtype=torch.float64, **kw))
    ours[0].load_state_dict(theirs.state_dict())
    if when == "after":
        fastrnn.convert(ours)
    for n in names:
        torch.manual_seed(1)  # spectral_norm's random start vectors: the same on both
        PARAMETRIZATIONS[kind](theirs, n)
        torch.manual_seed(1)
        PARAMETRIZATIONS[kind](ours[0], n)
    originals = [p for p in ours.parameters()]
    if when == "before":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # converted: nothing to warn about
            fastrnn.convert(ours)
    assert all(p is q for p, q in zip(ours.parameters(), originals))
    return ours[0], theirs


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("kind", list(PARAMETRIZATIONS))
@pytest.mark.parametrize("name,names", PARAM_MODULES, ids=[n for n, _ in PARAM_MODULES])
def test_convert_parametrized(name, names, kind, when, ran):
    """A parametrized module (weight_norm, spectral_norm, a custom one; applied before or after convert) is
    a fastrnn module that keeps its parametrizations: outputs and every gradient (the parametrizations'
    own parameters included) equal torch.nn's, and fastrnn's op ran. spectral_norm in eval mode: in
    training its power iteration runs on each evaluation of the weight, and torch.nn evaluates it more
    often than fastrnn (README)."""
    ours, theirs = _param_pair(name, kind, names, when)
    fcls = getattr(fastrnn, name)
    assert isinstance(ours, fcls) and type(ours).__name__ == f"Parametrized{name}"
    assert torch.nn.utils.parametrize.is_parametrized(ours) and set(ours.parametrizations) == set(names)
    if kind == "spectral_norm":
        ours.eval(), theirs.eval()
    torch.manual_seed(2)
    x = torch.randn(*((2, 3) if "Cell" in name else (5, 2, 3)), dtype=torch.float64)
    outs = []
    for m in (ours, theirs):
        out = m(x)
        flat = [out] if isinstance(out, torch.Tensor) else (list(out) if "Cell" in name else [out[0], *out[1]] if
                                                             isinstance(out[1], tuple) else [out[0], out[1]])
        sum(o.pow(2).sum() for o in flat).backward()
        outs.append(flat + [p.grad for p in m.parameters()])
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert backends_used(ran) == {CPU_BACKENDS[0]}
    with pytest.raises(ValueError, match=f"^{name}: Expected input to be"):  # torch's class name, not Parametrized*
        ours(torch.randn(1, 1, 1, 1, 3, dtype=torch.float64))
    for n in names:  # removing the parametrizations gives back the plain fastrnn class
        torch.nn.utils.parametrize.remove_parametrizations(ours, n)
    assert type(ours) is fcls


def test_parametrized_weight_computed_once_per_forward():
    """fastrnn computes a parametrized weight once per forward (torch.nn: 2-4 times; README)."""
    calls = []

    class Counted(torch.nn.Module):
        def forward(self, w):
            calls.append(1)
            return w * 2

    for name, names, x in [("LSTM", ("weight_ih_l0", "weight_hh_l0"), torch.randn(5, 2, 3)),
                           ("GRUCell", ("weight_ih", "weight_hh"), torch.randn(2, 3))]:
        m = getattr(fastrnn, name)(3, 4)
        for n in names:
            torch.nn.utils.parametrize.register_parametrization(m, n, Counted())
        for train in (True, False):  # eval with grad: the fast path asks whether a gradient follows first
            m.train(train)
            for grad_mode in (True, False):
                calls.clear()
                with torch.set_grad_enabled(grad_mode):
                    m(x)
                assert len(calls) == 2, (name, train, grad_mode)


def _weight_drop(module, names, p):
    """The weight-drop helper of torchnlp-style code: raw weights as parameters, the dropped ones set as
    plain attributes by a wrapper captured around the module's bound forward."""
    for n in names:
        w = getattr(module, n)
        del module._parameters[n]
        module.register_parameter(n + "_raw", torch.nn.Parameter(w.detach().clone()))
    inner = module.forward

    def forward(*args, **kwargs):
        for n in names:
            setattr(module, n, torch.nn.functional.dropout(getattr(module, n + "_raw"), p, module.training))
        return inner(*args, **kwargs)
    module.forward = forward
    return module


def test_convert_warns_for_a_captured_forward_and_serves_weight_drop_converted_first(ran):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Sequential(_weight_drop(torch.nn.LSTM(3, 4), ["weight_hh_l0"], 0.5)))
    with pytest.warns(UserWarning, match=r"left '0.0' \(LSTM\) as torch.nn runs it: its instance has a forward "
                                         r"of its own .* convert the module before wrapping its forward"):
        fastrnn.convert(model)
    assert type(model[0][0]) is torch.nn.LSTM
    # converted before the wrapper: fastrnn runs, with the dropped weight, as torch.nn with the same mask
    torch.manual_seed(0)
    ref = _weight_drop(torch.nn.LSTM(3, 4), ["weight_hh_l0"], 0.5)
    torch.manual_seed(0)
    ours = _weight_drop(fastrnn.convert(torch.nn.LSTM(3, 4)), ["weight_hh_l0"], 0.5)
    x = torch.randn(5, 2, 3)
    for m in (ours, ref):
        torch.manual_seed(4)
        m(x)[0].sum().backward()
    torch.testing.assert_close(ours.weight_hh_l0, ref.weight_hh_l0, atol=0, rtol=0)
    torch.testing.assert_close(ours.weight_hh_l0_raw.grad, ref.weight_hh_l0_raw.grad, atol=1e-6, rtol=1e-5)
    assert backends_used(ran) == {CPU_BACKENDS[0]}


def test_convert_rebinds_torchs_own_forward_on_the_instance(ran):
    m = torch.nn.GRU(3, 4)
    m.forward = m.forward  # torch.nn's bound forward, kept on the instance
    fastrnn.convert(m)
    assert type(m) is fastrnn.GRU and "forward" not in m.__dict__
    m(torch.randn(2, 1, 3))
    assert backends_used(ran) == {CPU_BACKENDS[0]}


def test_convert_unknown_backend():
    m = torch.nn.Sequential(torch.nn.LSTM(3, 4))
    with pytest.raises(ValueError, match="Unknown fastrnn backend 'cuda_fast'"):
        fastrnn.convert(m, backend="cuda_fast")
    assert type(m[0]) is torch.nn.LSTM


def test_state_dict_both_ways_and_same_init():
    for fcls, tcls, kw in [(fastrnn.LSTM, torch.nn.LSTM, dict(proj_size=2, num_layers=2, bidirectional=True)),
                           (fastrnn.GRU, torch.nn.GRU, dict(bias=False)), (fastrnn.RNN, torch.nn.RNN, {}),
                           (fastrnn.LSTMCell, torch.nn.LSTMCell, {}), (fastrnn.GRUCell, torch.nn.GRUCell, {}),
                           (fastrnn.RNNCell, torch.nn.RNNCell, dict(nonlinearity="relu"))]:
        torch.manual_seed(3)
        a = fcls(4, 6, **kw)
        torch.manual_seed(3)
        b = tcls(4, 6, **kw)
        assert isinstance(a, tcls)
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
        c = tcls(4, 6, **kw)
        c.load_state_dict(sa)
        d = fcls(4, 6, **kw)
        d.load_state_dict(sb)
        assert all(torch.equal(p, q) for p, q in zip(c.parameters(), d.parameters()))
        assert repr(a) == repr(b)
    assert "backend='reference'" in repr(fastrnn.LSTM(2, 3, backend="reference"))


def test_deepcopy_pickle_and_dtype_moves_keep_working(tmp_path):
    """What users do with a module besides calling it: copy, save/load whole, move dtype, flatten_parameters."""
    import copy
    torch.manual_seed(0)
    model = fastrnn.convert(torch.nn.Sequential(torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True)))
    x = torch.randn(4, 2, 3)
    want = model(x)[0]
    clone = copy.deepcopy(model)
    assert type(clone[0]) is fastrnn.LSTM and clone[0].weight_hh_l0 is not model[0].weight_hh_l0
    torch.testing.assert_close(clone(x)[0], want, atol=0, rtol=0)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert type(loaded[0]) is fastrnn.LSTM
    torch.testing.assert_close(loaded(x)[0], want, atol=0, rtol=0)
    model[0].flatten_parameters()  # torch's no-op on CPU; must not break anything
    d = model.double()
    ref = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True).double()
    ref.load_state_dict(d[0].state_dict())
    torch.testing.assert_close(d(x.double())[0], ref(x.double())[0], atol=1e-10, rtol=1e-10)


class _MatmulScale(torch.nn.Module):
    """A parametrization with a matmul: under autocast it would run in bfloat16."""

    def forward(self, w):
        return 0.5 * (w @ torch.eye(w.shape[1], dtype=w.dtype))


@pytest.mark.parametrize("name", ["LSTM", "GRUCell"])
def test_parametrized_weights_under_autocast_in_the_modules_dtype(name):
    """Under CPU autocast a fastrnn layer runs in its own dtype (README): its parametrized weights too. The
    outputs are the float32 module's, rounded once to the autocast dtype."""
    torch.manual_seed(0)
    m = getattr(fastrnn, name)(3, 4)
    torch.nn.utils.parametrize.register_parametrization(m, "weight_ih_l0" if name == "LSTM" else "weight_ih",
                                                        _MatmulScale())
    x = torch.randn(*((5, 2, 3) if name == "LSTM" else (2, 3)))
    want = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)
    want, got = (want[0], got[0]) if name == "LSTM" else (want, got)
    torch.testing.assert_close(got.float(), want.to(got.dtype).float(), atol=0, rtol=0)
