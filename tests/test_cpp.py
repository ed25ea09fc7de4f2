"""The cpp backend specifically: the extension is loaded and its kernels ran, the multi-threaded path
(hidden units split over a team with a barrier per step) matches torch, the raw ops check their
arguments, and a machine that cannot build the extension gets the reason instead of a crash."""
import importlib
import sys

import pytest
import torch

import fastrnn
from fastrnn import dispatch
from conftest import CPU_BACKENDS, backends_used
from test_cells import test_seq_equals_steps
from test_parity import _kwargs, compare_module

if "cpp" not in CPU_BACKENDS:
    pytest.skip(f"cpp backend unavailable here: {dispatch.reasons('cpp')}", allow_module_level=True)
from fastrnn.backends import cpp  # noqa: E402


def test_extension_loaded_and_ran(ran):
    assert cpp._C is not None and not dispatch.reasons("cpp")
    assert cpp.BACKEND.isa() in ("avx512 (x86-64-v4)", "avx2 (x86-64-v3)", "baseline x86-64")
    assert dispatch.available_backends("cpu")[0] == "cpp"  # the automatic choice on CPU
    for cls in (fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN):
        cls(4, 6)(torch.randn(3, 2, 4, requires_grad=True))[0].sum().backward()
    assert backends_used(ran) == {"cpp"}
    assert {op for op, _ in ran} >= {f"{f}_seq_{p}" for f in ("lstm", "gru", "rnn") for p in ("fwd", "bwd")}


@pytest.fixture
def threaded():
    """Split every call over the team, however small (the default needs 65536 multiply-adds a step)."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: the team cannot split")
    old = cpp._C.parallel_min_macs()
    cpp._C.set_parallel_min_macs(0)
    yield
    cpp._C.set_parallel_min_macs(old)


# hidden sizes above one unit block (32 floats / 16 doubles) so two workers get units, the second fewer
@pytest.mark.parametrize("name,proj,kind,H", [
    ("LSTM", 0, "batched", 37), ("LSTM", 3, "packed", 37), ("LSTM", 0, "packed", 20), ("LSTM", 40, "batched", 50),
    ("GRU", 0, "batched", 37), ("GRU", 0, "packed", 33), ("RNN_tanh", 0, "packed", 37),
    ("RNN_relu", 0, "batched", 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_threaded_parity(threaded, name, proj, kind, H, dtype, ran):
    kw = _kwargs(name, 2, True, False, True, proj, hidden=H)
    compare_module(name, kw, "cpp", dtype, kind, True)
    assert backends_used(ran) == {"cpp"}


@pytest.mark.parametrize("family,proj", [("lstm", False), ("lstm", True), ("gru", False), ("rnn", False)])
def test_threaded_seq_equals_steps(threaded, family, proj, ran):
    test_seq_equals_steps("cpp", family, proj, True, True, ran)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes_go_elsewhere(dtype):
    with pytest.raises(fastrnn.BackendNotSupportedError, match=r"backend 'cpp' cannot run.*dtype"):
        fastrnn.GRU(4, 6, dtype=dtype, backend="cpp")(torch.randn(3, 2, 4, dtype=dtype))
    with dispatch.record_calls() as calls:
        fastrnn.GRU(4, 6, dtype=dtype)(torch.randn(3, 2, 4, dtype=dtype))
    assert backends_used(calls) == {"reference"}


@pytest.mark.parametrize("H", [6, 40])
def test_peephole_and_coupled_match_reference(H, threaded):
    """The kernels carry the LSTM variants: cpp equals the reference op for op (ragged, reverse)."""
    g = torch.Generator().manual_seed(0)
    T, B = 5, 3
    for coupled in (False, True):
        G = 3 if coupled else 4
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        args = [r(T, B, G * H), r(G * H, H), r(G * H), None, r(3, H), r(B, H), r(B, H)]
        leaves = [a.requires_grad_() for a in args if a is not None]
        outs = {}
        for be in ("reference", "cpp"):
            res = torch.ops.fastrnn.lstm_seq_fwd(*args, torch.tensor([5, 3, 2]), True, coupled, True, be)[:3]
            grads = torch.autograd.grad(sum((o * (k + 1)).sum() for k, o in enumerate(res)), leaves)
            outs[be] = list(res) + list(grads)
        for a, b in zip(outs["cpp"], outs["reference"]):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


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
