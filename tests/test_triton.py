"""The triton backend specifically. Without a GPU it is verified two ways:

- compiled: every kernel, at the block sizes the backend launches, compiled by Triton for sm_80 and
  sm_90 and assembled by ptxas, with no register spills (runs without TRITON_INTERPRET);
- interpreted: with TRITON_INTERPRET=1 the backend serves CPU tensors and the shared test files run it
  (parity, cells, seq == T x step, ops, variants, bad input); here the cases those small shapes miss:
  several programs per step and several reduction blocks, both forward paths, half precision.
"""
import os

import pytest
import torch

import fastrnn
from fastrnn import dispatch
from conftest import backends_used
from test_parity import _kwargs, compare_module

pytest.importorskip("triton", reason="triton is not installed: the triton backend is unavailable here")
from fastrnn.backends import triton as tb  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
compiled_only = pytest.mark.skipif(INTERPRET, reason="under TRITON_INTERPRET=1 the kernels are Python functions: "
                                                     "nothing to compile (run without it)")
interpreted_only = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 to run the kernels on CPU "
                                                            "tensors (make test runs these in a second pass)")


# ---- compiled for real GPUs, no GPU needed -------------------------------------------------------------
@compiled_only
@pytest.mark.parametrize("dtype,arch", [("fp32", 90), ("bf16", 80)])
def test_kernels_compile_for_gpu_without_spills(dtype, arch):
    """(python -m benchmarks.triton_compile prints the full table, every dtype on both architectures.)"""
    from benchmarks.triton_compile import run

    results = run(archs=(arch,), dtypes=(dtype,))
    kernels = {r.kernel for r in results}
    assert kernels == {f"{f}.{k}" for f in ("lstm", "gru", "rnn") for k in ("fwd_step", "bwd_step", "fwd_seq")} | \
        {f"{f}.{k}" for f in ("lstm", "gru") for k in ("fwd_opts_step", "bwd_opts_step")} | \
        {"common.finish_step", "common.split_step", "common.add_recurrent_dh"}
    seq_blocks = {r.config.split()[0] for r in results if r.kernel == "lstm.fwd_seq"}
    assert seq_blocks == {"HP=16", "HP=32", "HP=64"}  # every padded size up to SEQ_MAX_H
    for r in results:
        assert 0 < r.registers <= 255, r
        assert r.spill_stores == 0 and r.spill_loads == 0, r
        assert r.shared_bytes <= 99 * 1024, r  # what sm_80/sm_86 programs may use


@compiled_only
def test_unavailable_without_gpu_names_the_reason():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the backend is available")
    why = dispatch.reasons("triton")
    assert why and "no CUDA device" in why[0] and "TRITON_INTERPRET=1" in why[0]
    with pytest.raises(dispatch.BackendNotSupportedError, match="triton"):
        fastrnn.LSTM(3, 4, backend="triton")(torch.randn(2, 1, 3))


# ---- interpreted on CPU tensors ---------------------------------------------------------------------------
@pytest.fixture
def launches(monkeypatch):
    """Kernel launches by name ('lstm.fwd_seq', ...) during the test."""
    seen = []
    for fam in ("lstm", "gru", "rnn"):
        mod = getattr(tb, f"_{fam}")
        for k in ("fwd_seq", "fwd_step", "bwd_step"):
            kernel = getattr(mod, k)

            class Recorder:
                def __init__(self, kernel, name):
                    self.kernel, self.name = kernel, name

                def __getitem__(self, grid):
                    seen.append(self.name)
                    return self.kernel[grid]

            monkeypatch.setattr(mod, k, Recorder(kernel, f"{fam}.{k}"))
    return seen


@interpreted_only
@pytest.mark.parametrize("name,proj,kind,H,B,path,dtype", [
    ("LSTM", 0, "batched", 37, 3, "steps", torch.float32), ("LSTM", 20, "packed", 37, 3, "steps", torch.float64),
    ("LSTM", 0, "packed", 50, 20, "seqkernel", torch.float32), ("GRU", 0, "packed", 37, 20, "steps", torch.float64),
    ("RNN_relu", 0, "batched", 40, 3, "steps", torch.float32),
    ("RNN_tanh", 0, "packed", 64, 20, "seqkernel", torch.float64)],
    ids=lambda v: {torch.float32: "f32", torch.float64: "f64"}.get(v, str(v)))
def test_multiblock_parity(name, proj, kind, H, B, path, dtype, ran, launches, monkeypatch):
    """Hidden sizes over several unit blocks (16 or 32) and reduction blocks (32), batches over one row tile
    (16): several programs per step, masked tails; both forward paths, bidirectional, ragged. (Few and short
    cases: the interpreter takes ~0.3 s per program here.)"""
    if path == "steps":
        monkeypatch.setattr(tb, "SEQ_MAX_H", 0)
    kw = _kwargs(name, 1, True, False, True, proj, hidden=H)
    compare_module(name, kw, "triton", dtype, kind, True, steps=3, batch=B)
    assert backends_used(ran) == {"triton"}
    fam = name.split("_")[0].lower()
    fwd = {k for k in launches if k.startswith(fam) and "fwd" in k}
    assert fwd == ({f"{fam}.fwd_seq"} if path == "seqkernel" else {f"{fam}.fwd_step"})
    assert f"{fam}.bwd_step" in launches


@interpreted_only
@pytest.mark.parametrize("H,proj,expected", [(64, 0, "fwd_seq"), (65, 0, "fwd_step"), (8, 4, "fwd_step")])
def test_forward_path_choice(H, proj, expected, launches):
    """One whole-sequence launch per layer-direction up to SEQ_MAX_H without projection; else one per step."""
    m = fastrnn.LSTM(3, H, proj_size=proj, bidirectional=True, backend="triton")
    with torch.no_grad():
        m(torch.randn(5, 2, 3))
    assert launches == [f"lstm.{expected}"] * (2 if expected == "fwd_seq" else 10)


@interpreted_only
@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN])
def test_float16_error_within_twice_torchs(cls):
    """float16 (fp32 accumulation, fp32 cell state): error against a float64 truth at most 2x torch's own
    float16 error for outputs and 3x for gradients (flash-attention's rule)."""
    torch.manual_seed(0)
    tcls = getattr(torch.nn, cls.__name__)
    truth = tcls(8, 40, num_layers=2, bidirectional=True, dtype=torch.float64)
    half_t = tcls(8, 40, num_layers=2, bidirectional=True, dtype=torch.float16)
    ours = cls(8, 40, num_layers=2, bidirectional=True, dtype=torch.float16, backend="triton")
    half_t.load_state_dict(truth.state_dict())
    ours.load_state_dict(truth.state_dict())
    x = torch.randn(6, 3, 8, dtype=torch.float64)

    def run(m, dtype):
        xi = x.detach().to(dtype).clone().requires_grad_()
        y, _ = m(xi)
        y.float().pow(2).sum().backward()
        return y.double(), [xi.grad.double()] + [p.grad.double() for p in m.parameters()]

    y64, g64 = run(truth, torch.float64)
    yt, gt = run(half_t, torch.float16)
    yo, go = run(ours, torch.float16)
    assert (yo - y64).abs().max() <= 2 * (yt - y64).abs().max()
    for k, (a, b, ref) in enumerate(zip(go, gt, g64)):
        assert (a - ref).abs().max() <= 3 * (b - ref).abs().max() + 1e-6, f"gradient {k}"


@interpreted_only
def test_bfloat16_refused_under_the_interpreter():
    """Triton 3.9's interpreter mis-reads bfloat16 tensors, so the CPU (interpreted) backend does not serve
    bf16; the compile check covers the bf16 kernels."""
    why = dispatch.reasons("triton", dispatch.Spec("lstm", "cpu", torch.bfloat16))
    assert why == ["dtype bfloat16 is not supported (serves float16, float32, float64)"]


def test_cuda_graphed_needs_cuda():
    """fastrnn.cuda_graphed captures an inference forward in a CUDA graph; without CUDA it says so."""
    if torch.cuda.is_available():
        m = fastrnn.LSTM(8, 96, backend="triton").cuda()  # 96 > SEQ_MAX_H: the per-step path is captured
        x = torch.randn(20, 2, 8, device="cuda")
        run = fastrnn.cuda_graphed(m, x)
        x2 = torch.randn(20, 2, 8, device="cuda")
        with torch.no_grad():
            expected = m(x2)[0]
        torch.testing.assert_close(run(x2)[0], expected)
        return
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        fastrnn.cuda_graphed(fastrnn.LSTM(3, 4), torch.randn(2, 1, 3))
