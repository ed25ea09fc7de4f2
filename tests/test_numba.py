"""The numba backend specifically: its compiled kernels really run, the multi-threaded step path
matches torch too, and dtypes it does not serve are refused (explicitly) or skipped (automatically)."""
import pytest
import torch

import fastrnn
from fastrnn import dispatch
from conftest import backends_used

numba = pytest.importorskip("numba", reason="numba is not installed: the numba backend is unavailable here")
from fastrnn.backends import numba as nb  # noqa: E402
from fastrnn.backends.numba_kernels import gru, lstm, rnn  # noqa: E402
from test_cells import test_seq_equals_steps  # noqa: E402
from test_parity import _kwargs, compare_module  # noqa: E402

KERNELS = [lstm.lstm_fwd, lstm.lstm_bwd, gru.gru_fwd, gru.gru_bwd, rnn.rnn_fwd, rnn.rnn_bwd]


def test_kernels_are_compiled_nopython():
    assert not numba.config.DISABLE_JIT
    for cls in (fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN):
        m = cls(4, 6, backend="numba")
        m(torch.randn(3, 2, 4, requires_grad=True))[0].sum().backward()
    for k in KERNELS:
        assert isinstance(k, numba.core.registry.CPUDispatcher)
        sigs = k.nopython_signatures
        assert sigs, f"{k.__name__} never compiled"
        assert any(str(s.args[0]).startswith("array(float32") for s in sigs)


@pytest.fixture
def threaded(monkeypatch):
    """Force the parallel step path (hidden units split over threads) even for tiny shapes."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: the parallel path cannot split")
    monkeypatch.setattr(nb, "PARALLEL_MIN_MACS", 0)


@pytest.mark.parametrize("name,proj,kind,H", [
    ("LSTM", 0, "batched", 37), ("LSTM", 3, "packed", 37), ("LSTM", 0, "packed", 20), ("GRU", 0, "batched", 37),
    ("GRU", 0, "packed", 33), ("RNN_tanh", 0, "packed", 37), ("RNN_relu", 0, "batched", 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_threaded_parity(threaded, name, proj, kind, H, dtype, ran):
    kw = _kwargs(name, 2, True, False, True, proj, hidden=H)
    compare_module(name, kw, "numba", dtype, kind, True)
    assert backends_used(ran) == {"numba"}


@pytest.mark.parametrize("family,proj", [("lstm", False), ("lstm", True), ("gru", False), ("rnn", False)])
def test_threaded_seq_equals_steps(threaded, family, proj, ran):
    test_seq_equals_steps("numba", family, proj, True, True, ran)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    m = fastrnn.GRU(4, 6, dtype=dtype, backend="numba")
    with pytest.raises(fastrnn.BackendNotSupportedError, match=r"backend 'numba' cannot run.*dtype"):
        m(torch.randn(3, 2, 4, dtype=dtype))
    assert "numba" not in [n for n in dispatch.PRIORITY["cpu"]
                           if not dispatch.reasons(n, dispatch.Spec("gru", "cpu", dtype))]
    auto = fastrnn.GRU(4, 6, dtype=dtype)
    with dispatch.record_calls() as calls:
        auto(torch.randn(3, 2, 4, dtype=dtype))
    assert backends_used(calls) == {"reference"}


def test_peephole_and_coupled_match_reference():
    """The kernels already carry the LSTM variants: numba equals the reference op for op."""
    g = torch.Generator().manual_seed(0)
    T, B, H = 5, 3, 6
    for coupled in (False, True):
        G = 3 if coupled else 4
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        args = [r(T, B, G * H), r(G * H, H), r(G * H), None, r(3, H), r(B, H), r(B, H)]
        leaves = [a.requires_grad_() for a in args if a is not None]
        outs = {}
        for be in ("reference", "numba"):
            res = torch.ops.fastrnn.lstm_seq_fwd(*args, torch.tensor([5, 3, 2]), True, coupled, True, be)[:3]
            grads = torch.autograd.grad(sum((o * (k + 1)).sum() for k, o in enumerate(res)), leaves)
            outs[be] = list(res) + list(grads)
        for a, b in zip(outs["numba"], outs["reference"]):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
