"""The cpp backend specifically: the extension is loaded and its kernels ran, the raw ops check their
arguments, and a machine that cannot build the extension gets the reason instead of a crash (what every
fused backend must do besides, its threaded path included, is in test_fused.py)."""
import importlib
import sys

import pytest
import torch

import fastrnn
from fastrnn import dispatch
from conftest import CPU_BACKENDS, backends_used

if "cpp" not in CPU_BACKENDS:
    pytest.skip(f"cpp backend unavailable here: {dispatch.reasons('cpp')}", allow_module_level=True)
from fastrnn.backends import cpp  # noqa: E402


def test_extension_loaded_and_ran(ran):
    assert cpp._C is not None and not dispatch.reasons("cpp")
    assert cpp.BACKEND.isa() in ("avx512 (x86-64-v4)", "avx2 (x86-64-v3)", "baseline x86-64")
    assert dispatch.available_backends("cpu")[0] == "cpp"  # the automatic choice on CPU
    torch.manual_seed(0)
    for cls, tcls in ((fastrnn.LSTM, torch.nn.LSTM), (fastrnn.GRU, torch.nn.GRU), (fastrnn.RNN, torch.nn.RNN)):
        ref = tcls(4, 6)
        mod = cls(4, 6)  # automatic choice
        mod.load_state_dict(ref.state_dict())
        x = torch.randn(3, 2, 4, requires_grad=True)
        y = mod(x)[0]
        (gx,) = torch.autograd.grad(y.sum(), x)
        y_ref = ref(x)[0]
        (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    assert backends_used(ran) == {"cpp"}
    assert {op for op, _ in ran} >= {f"{f}_seq_{p}" for f in ("lstm", "gru", "rnn") for p in ("fwd", "bwd")}


def test_raw_ops_check_their_arguments():
    op = torch.ops.fastrnn_cpp
    xw, w, h = torch.randn(3, 2, 12), torch.randn(12, 4), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match=r"w_hh must have shape \[12, 4\], got \[12, 5\]"):
        op.gru_seq_fwd(xw, torch.randn(12, 5), None, h, None, False, False)
    with pytest.raises(RuntimeError, match="xw has dtype Double but the input has Float|h0 has dtype Double"):
        op.gru_seq_fwd(xw, w, None, h.double(), None, False, False)
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 4 is not in 1..3"):
        op.gru_seq_fwd(xw, w, None, h, torch.tensor([3, 4]), False, False)
    with pytest.raises(RuntimeError, match="lengths must be non-increasing"):
        op.gru_seq_fwd(xw, w, None, h, torch.tensor([1, 3]), False, False)
    with pytest.raises(RuntimeError, match="unknown nonlinearity 'gelu'"):
        op.rnn_seq_fwd(torch.randn(3, 2, 4), torch.randn(4, 4), None, h, None, False, "gelu", False)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op.gru_seq_fwd(xw, torch.randn(4, 12).t(), None, h, None, False, False)
    # the inference cells (input projection inside): x [B, I], w_ih [G*H, I]
    x, w_ih = torch.randn(2, 5), torch.randn(12, 5)
    with pytest.raises(RuntimeError, match=r"w_ih must have shape \[12, 5\], got \[12, 6\]"):
        op.gru_cell_fwd(x, torch.randn(12, 6), None, w, None, h)
    with pytest.raises(RuntimeError, match=r"x must be \[B, I\], got \[2, 1, 5\]"):
        op.gru_cell_fwd(x.unsqueeze(1), w_ih, None, w, None, h)
    with pytest.raises(RuntimeError, match=r"b_ih must have shape \[16\], got \[12\]"):
        op.lstm_cell_fwd(x, torch.randn(16, 5), torch.randn(12), torch.randn(16, 4), None, None, None, h, h, False)
    with pytest.raises(RuntimeError, match="h0 must have shape \\[2, 4\\], got \\[3, 4\\]"):
        op.rnn_cell_fwd(x, torch.randn(4, 5), None, torch.randn(4, 4), None, torch.zeros(3, 4), "tanh")


def test_no_compiler_means_unavailable_with_the_reason(monkeypatch):
    """Without a prebuilt extension and with a failing build, the backend reports why; fastrnn works."""
    from torch.utils import cpp_extension

    def fail(*a, **k):
        raise RuntimeError("Error building extension 'fastrnn_C': c++: command not found")

    monkeypatch.setitem(sys.modules, "fastrnn._C", None)  # makes `from .. import _C` raise ImportError
    monkeypatch.delattr(fastrnn, "_C")
    monkeypatch.setattr(cpp_extension, "load", fail)
    try:
        mod = importlib.reload(cpp)
        why = mod.BACKEND.unavailable_reasons()
        assert len(why) == 1 and "building it failed" in why[0] and "command not found" in why[0]
    finally:
        monkeypatch.undo()
        importlib.reload(cpp)
    assert not cpp.BACKEND.unavailable_reasons()
