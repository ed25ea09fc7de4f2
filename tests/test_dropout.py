"""Inter-layer dropout in training mode draws the same mask as torch.nn (same RNG use), so outputs
and gradients match torch exactly under the same seed; eval mode and the last layer have none."""
import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fastrnn
from conftest import CPU_BACKENDS, TOL, assert_close, backends_used

CASES = [(fastrnn.LSTM, torch.nn.LSTM, {}), (fastrnn.LSTM, torch.nn.LSTM, {"proj_size": 2, "bidirectional": True}),
         (fastrnn.GRU, torch.nn.GRU, {"bidirectional": True}), (fastrnn.RNN, torch.nn.RNN, {"batch_first": True})]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_dropout_matches_torch(backend, packed, case, ran):
    fcls, tcls, kw = CASES[case]
    torch.manual_seed(0)
    ref = tcls(5, 7, num_layers=3, dropout=0.4, dtype=torch.float64, **kw)
    mod = fcls(5, 7, num_layers=3, dropout=0.4, dtype=torch.float64, backend=backend, **kw)
    mod.load_state_dict(ref.state_dict())
    if packed:
        x = pack_sequence([torch.randn(n, 5, dtype=torch.float64) for n in (3, 6, 1)], enforce_sorted=False)
    else:
        x = torch.randn(4, 6, 5, dtype=torch.float64)
    outs = []
    for m in (ref, mod):
        torch.manual_seed(5)
        y = m(x)[0]
        y = y.data if packed else y
        y.pow(2).sum().backward()
        outs.append(y)
    assert_close(outs[1], outs[0], TOL[torch.float64]["out"], "output")
    for (n, a), (_, b) in zip(ref.named_parameters(), mod.named_parameters()):
        assert_close(b.grad, a.grad, TOL[torch.float64]["grad"], n)
    # dropout really acted: a different seed gives a different output
    torch.manual_seed(6)
    y2 = mod(x)[0]
    assert not torch.allclose(y2.data if packed else y2, outs[1])
    # eval mode: deterministic, equal to torch's eval output
    ref.eval()
    mod.eval()
    a, b = ref(x)[0], mod(x)[0]
    assert_close(b.data if packed else b, a.data if packed else a, TOL[torch.float64]["out"], "eval output")
    assert backends_used(ran) == {backend}
