"""The triton backend on CUDA tensors against torch.nn on cuDNN (and against the reference backend for what
cuDNN lacks). These run only where a CUDA GPU is present: `benchmarks/gpu_check.sh` runs them on a lent GPU
machine; CI and this project's development machines have none, so here every test is skipped with that
reason. The CPU tests of the same kernels run under TRITON_INTERPRET=1 (`make test`)."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import dispatch
from conftest import backends_used, flat_outputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these on one)")

SEQ = {"LSTM": (fastrnn.LSTM, torch.nn.LSTM), "GRU": (fastrnn.GRU, torch.nn.GRU), "RNN": (fastrnn.RNN, torch.nn.RNN)}
CELLS = {"LSTMCell": (fastrnn.LSTMCell, torch.nn.LSTMCell), "GRUCell": (fastrnn.GRUCell, torch.nn.GRUCell),
         "RNNCell": (fastrnn.RNNCell, torch.nn.RNNCell)}
# fp32 with TF32 off on both sides; cuDNN's and triton's sums differ in order only
TOL = {torch.float32: (2e-5, 2e-4), torch.float64: (1e-10, 1e-10)}

# a pairwise cover of (T, B, H, layers, bidirectional, batch_first, packed)
SHAPES = [(1, 1, 32, 1, False, False, False), (17, 3, 64, 2, True, False, True), (50, 16, 256, 1, True, True, False),
          (8, 64, 128, 2, False, True, True), (33, 5, 512, 1, False, False, True), (5, 2, 1024, 2, True, True, False)]


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pair(classes, dtype, *args, **kw):
    torch.manual_seed(0)
    ours = classes[0](*args, backend="triton", device="cuda", dtype=dtype, **kw)
    theirs = classes[1](*args, device="cuda", dtype=dtype, **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _close(got, want, tol, what):
    for k, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=lambda m: f"{what} tensor {k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[0]}B{s[1]}H{s[2]}L{s[3]}" for s in SHAPES])
@pytest.mark.parametrize("name", list(SEQ))
def test_sequences_against_cudnn(name, shape, dtype):
    T, B, H, L, bi, bf, packed = shape
    I = 24
    ours, theirs = _pair(SEQ[name], dtype, I, H, num_layers=L, bidirectional=bi, batch_first=bf)
    x = torch.randn(B, T, I, device="cuda", dtype=dtype) if bf else torch.randn(T, B, I, device="cuda", dtype=dtype)
    if packed:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
        inp = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False)
    else:
        inp = x
    tol_out, tol_grad = TOL[dtype]
    with torch.no_grad():
        with dispatch.record_calls() as ran:
            got = ours(inp)
        want = theirs(inp)
    assert backends_used(ran) == {"triton"}
    unpack = (lambda o: [o[0].data, *flat_outputs(o)[1:]]) if packed else flat_outputs
    _close(unpack(got), unpack(want), tol_out, "inference")
    got, want = ours(inp), theirs(inp)
    sum((t.float() * (k + 1)).sum() for k, t in enumerate(unpack(got))).backward()
    sum((t.float() * (k + 1)).sum() for k, t in enumerate(unpack(want))).backward()
    _close(unpack(got), unpack(want), tol_out, "training forward")
    _close([p.grad for p in ours.parameters()], [p.grad for p in theirs.parameters()], tol_grad, "weight gradients")


@pytest.mark.parametrize("name", list(CELLS))
def test_cells_against_cudnn(name):
    ours, theirs = _pair(CELLS[name], torch.float32, 24, 256)
    x = torch.randn(16, 24, device="cuda", requires_grad=True)
    hx_o = hx_t = None
    outs_o, outs_t = [], []
    with dispatch.record_calls() as ran:
        for t in range(5):
            hx_o = ours(x, hx_o)
            outs_o.append(hx_o[0] if isinstance(hx_o, tuple) else hx_o)
    for t in range(5):
        hx_t = theirs(x, hx_t)
        outs_t.append(hx_t[0] if isinstance(hx_t, tuple) else hx_t)
    assert backends_used(ran) == {"triton"}
    _close(outs_o, outs_t, TOL[torch.float32][0], "cell outputs")
    g_o = torch.autograd.grad(sum(o.sum() for o in outs_o), [x, *ours.parameters()])
    g_t = torch.autograd.grad(sum(o.sum() for o in outs_t), [x, *theirs.parameters()])
    _close(g_o, g_t, TOL[torch.float32][1], "cell gradients")


@pytest.mark.parametrize("kw", [{"peephole": True}, {"coupled_gates": True}, {"layer_norm": True},
                                {"zoneout": 0.2}, {"recurrent_dropout": 0.3}, {"proj_size": 48, "layer_norm": True}],
                            ids=["peephole", "coupled", "layer_norm", "zoneout", "recdrop", "proj-ln"])
def test_what_cudnn_lacks_against_the_reference(kw):
    """The variants and cell options on triton against the reference backend on the same GPU, float64, with
    the masks the module drew (same seed)."""
    torch.manual_seed(0)
    ours = fastrnn.LSTM(24, 256, num_layers=2, bidirectional=True, backend="triton", device="cuda",
                        dtype=torch.float64, **kw)
    ref = fastrnn.LSTM(24, 256, num_layers=2, bidirectional=True, backend="reference", device="cuda",
                       dtype=torch.float64, **kw)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(30, 8, 24, device="cuda", dtype=torch.float64)
    outs = []
    for m in (ours, ref):
        torch.manual_seed(1)
        with dispatch.record_calls() as ran:
            y = flat_outputs(m(x))
            sum(t.sum() for t in y).backward()
        assert backends_used(ran) == {m.backend}
        outs.append(y + [p.grad for p in m.parameters()])
    _close(outs[0], outs[1], 1e-9, "triton vs reference")


def test_automatic_choice_on_cuda_is_cudnn_for_plain_cells_and_triton_for_the_rest():
    x = torch.randn(10, 4, 24, device="cuda")
    with dispatch.record_calls() as ran:
        fastrnn.GRU(24, 64, device="cuda")(x)
    assert backends_used(ran) == {"torch"}
    with dispatch.record_calls() as ran:
        fastrnn.LSTM(24, 64, peephole=True, device="cuda")(x)
    assert backends_used(ran) == {"triton"}
