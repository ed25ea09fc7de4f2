"""What every fused CPU backend (numba, cpp) must do beyond the shared parity grid: its multi-threaded
path (hidden units split over threads, forced here on small odd shapes) matches torch.nn and equals T of
its own steps, the LSTM variants equal the reference op for op, and dtypes it does not serve are refused
when named and skipped by the automatic choice."""
import pytest
import torch

import fastrnn
from fastrnn import dispatch
from conftest import CPU_BACKENDS, backends_used
import test_cells  # the module, not the test function: an imported test would be collected here again
from test_parity import _kwargs, compare_module

FUSED = [b for b in ("numba", "cpp") if b in CPU_BACKENDS]
pytestmark = pytest.mark.skipif(not FUSED, reason="no fused CPU backend is available here")


@pytest.fixture
def threaded(backend):
    """Split every step over the threads, however small (by default it takes hundreds of thousands of
    multiply-adds)."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: the parallel path cannot split")
    impl = dispatch.get(backend)
    old = impl.set_parallel_min_macs(0)
    yield
    impl.set_parallel_min_macs(old)


# hidden sizes above one unit block (cpp: 32 floats / 16 doubles) so that two threads get units, unequally
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name,proj,kind,H", [
    ("LSTM", 0, "batched", 37), ("LSTM", 3, "packed", 37), ("LSTM", 0, "packed", 20), ("LSTM", 40, "batched", 50),
    ("GRU", 0, "batched", 37), ("GRU", 0, "packed", 33), ("RNN_tanh", 0, "packed", 37),
    ("RNN_relu", 0, "batched", 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_threaded_parity(backend, threaded, name, proj, kind, H, dtype, ran):
    kw = _kwargs(name, 2, True, False, True, proj, hidden=H)
    compare_module(name, kw, backend, dtype, kind, True)
    assert backends_used(ran) == {backend}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("family,proj", [("lstm", False), ("lstm", True), ("gru", False), ("rnn", False)])
def test_threaded_seq_equals_steps(backend, threaded, family, proj, ran):
    test_cells.test_seq_equals_steps(backend, family, proj, True, True, ran)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("H", [6, 40])
def test_peephole_and_coupled_match_reference(backend, threaded, H):
    """The kernels carry the LSTM variants: equal to the reference op for op (ragged, reverse, float64)."""
    g = torch.Generator().manual_seed(0)
    T, B = 5, 3
    for coupled in (False, True):
        G = 3 if coupled else 4
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        args = [r(T, B, G * H), r(G * H, H), r(G * H), None, r(3, H), *[None] * 6, r(B, H), r(B, H)]
        leaves = [a.requires_grad_() for a in args if a is not None]
        outs = {}
        for be in ("reference", backend):
            res = torch.ops.fastrnn.lstm_seq_fwd(*args, torch.tensor([5, 3, 2]), True, coupled, 0.0, 0.0, True, be)[:3]
            grads = torch.autograd.grad(sum((o * (k + 1)).sum() for k, o in enumerate(res)), leaves)
            outs[be] = list(res) + list(grads)
        for a, b in zip(outs[backend], outs["reference"]):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="numba is not available here")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    """numba serves float32 and float64 only (issue 4): named, it raises; the automatic choice skips it
    (cpp serves half precision in float32: tests/test_half.py)."""
    with pytest.raises(fastrnn.BackendNotSupportedError,
                       match=rf"backend 'numba' cannot run.*dtype {str(dtype)[6:]} is not supported \(serves float32, float64\)"):
        fastrnn.GRU(4, 6, dtype=dtype, backend="numba")(torch.randn(3, 2, 4, dtype=dtype))
    assert "numba" not in [n for n in dispatch.PRIORITY["cpu"]
                           if not dispatch.reasons(n, dispatch.Spec("gru", "cpu", dtype))]
    with dispatch.record_calls() as calls:
        fastrnn.GRU(4, 6, dtype=dtype)(torch.randn(3, 2, 4, dtype=dtype))
    assert backends_used(calls) == {"cpp" if "cpp" in CPU_BACKENDS else "reference"}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("B", [8, 14, 15, 21])
@pytest.mark.parametrize("name", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_row_blocks(backend, B, name, dtype, ran):
    """Batches past one register block of rows (cpp's GEMM takes 8 rows at a time): an exact multiple and
    the tails 6, 7 and 5 after full blocks, forward and backward (the backward's dh GEMM has B rows too)."""
    kw = _kwargs(name, 1, False, False, True, 0, hidden=40)
    compare_module(name, kw, backend, dtype, "batched", True, steps=5, batch=B)
    assert backends_used(ran) == {backend}
