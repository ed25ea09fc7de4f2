"""The numba backend specifically: its compiled kernels really run in nopython mode (what every fused
backend must do besides is in test_fused.py)."""
import pytest
import torch

import fastrnn

numba = pytest.importorskip("numba", reason="numba is not installed: the numba backend is unavailable here")
from fastrnn.backends.numba_kernels import gru, lstm, rnn  # noqa: E402

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
