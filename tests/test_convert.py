"""fastrnn.convert on a small model: embedding, 2-layer bidirectional LSTM, linear head."""
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
    fastrnn.convert(m)
    assert type(m[0]) is MyLSTM


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
