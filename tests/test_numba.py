"""The numba backend specifically: its compiled kernels really run in nopython mode (what every fused
backend must do besides is in test_fused.py)."""
import pytest
import torch

import fastrnn

numba = pytest.importorskip("numba", reason="numba is not installed: the numba backend is unavailable here")
from fastrnn.backends.numba_kernels import gru, lstm, rnn  # noqa: E402

KERNELS = [lstm.lstm_fwd, lstm.lstm_bwd, gru.gru_fwd, gru.gru_bwd, rnn.rnn_fwd, rnn.rnn_bwd,
           lstm.lstm_seq_at, gru.gru_seq_at, rnn.rnn_seq_at]


def test_kernels_are_compiled_nopython():
    """Both forms of each kernel: the serial twin (a call on one thread) and, where torch has threads to
    split over, the parallel kernel (every step split, forced here)."""
    from fastrnn.backends import numba as nb
    assert not numba.config.DISABLE_JIT
    split = torch.get_num_threads() > 1
    for min_macs in (1 << 30, 0) if split else (1 << 30,):
        old = nb.BACKEND.set_parallel_min_macs(min_macs)
        try:
            for cls in (fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN):
                m = cls(4, 6, backend="numba")
                m(torch.randn(3, 2, 4, requires_grad=True))[0].sum().backward()
                with torch.no_grad():  # inference: the chunk entry's <f>_seq_at (6 rows)
                    m(torch.randn(3, 2, 4))
        finally:
            nb.BACKEND.set_parallel_min_macs(old)
    for k in KERNELS:
        for form in (nb._kernel(k, 1), k) if split else (nb._kernel(k, 1),):
            assert isinstance(form, numba.core.registry.CPUDispatcher)
            sigs = form.nopython_signatures
            assert sigs, f"{form.py_func.__qualname__} never compiled"
            # the float32 form: the first argument's type, or the dtype's array for the entries by address
            assert any(str(s.args[0 if k not in KERNELS[6:] else -1]).startswith("array(float32") for s in sigs)
