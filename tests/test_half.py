"""Half-precision modules (bfloat16, float16) on the cpp backend, which computes them in float32
(``Backend.compute_dtypes``): the layer's input, weights and state are cast on entry and its outputs
cast back, so an output is the float32 result rounded once. Checked against a float64 run on the same
(rounded) weights and inputs: every output element within half a unit in the last place of its dtype
(plus float32's own error), and every gradient within 3x torch.nn's own half-precision error."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import dispatch
from conftest import CPU_BACKENDS, backends_used, flat_outputs, within_half_ulp

pytestmark = pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the cpp backend is not available here")

# relative half-ulp of a round-to-nearest: 8 significant bits (bfloat16), 11 (float16)
DTYPES = [torch.bfloat16, torch.float16]
IDS = ["bf16", "f16"]

CASES = {
    "LSTM": dict(),
    "LSTM-2L-bi": dict(num_layers=2, bidirectional=True),
    "LSTM-proj": dict(proj_size=5),
    "LSTM-peephole-coupled": dict(peephole=True, coupled_gates=True),
    "GRU": dict(),
    "GRU-2L-bi": dict(num_layers=2, bidirectional=True),
    "RNN-tanh": dict(),
    "RNN-relu-2L": dict(nonlinearity="relu", num_layers=2),
}


def _modules(name, kw, dtype, I=8, H=12):
    """fastrnn's module in ``dtype`` and a float64 copy with the same (rounded) weights: torch.nn's class,
    or fastrnn's reference backend for the variants torch lacks."""
    cls = name.split("-")[0]
    torch.manual_seed(0)
    ours = getattr(fastrnn, cls)(I, H, dtype=dtype, **kw)
    if "peephole" in kw:
        truth = getattr(fastrnn, cls)(I, H, dtype=torch.float64, backend="reference", **kw)
    else:
        truth = getattr(torch.nn, cls)(I, H, dtype=torch.float64, **kw)
    truth.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours, truth


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_rounded_once(name, dtype):
    ours, truth = _modules(name, CASES[name], dtype)
    x = torch.randn(12, 3, 8).to(dtype)  # 36 rows: the chunk op (inference), its projection packed
    h0 = None
    if not name.startswith("LSTM"):  # with a given initial state too
        D = 2 if ours.bidirectional else 1
        h0 = torch.randn(ours.num_layers * D, 3, ours.hidden_size).to(dtype)
    with torch.no_grad():
        with dispatch.record_calls() as ran:
            y, st = ours(x, h0)
        y64, st64 = truth(x.double(), None if h0 is None else h0.double())
    assert backends_used(ran) == {"cpp"} and {op for op, _ in ran} == {f"{name.split('-')[0].lower()}_chunk_fwd"}
    within_half_ulp(y, y64, dtype)
    for s, s64 in zip(st if isinstance(st, tuple) else (st,), st64 if isinstance(st64, tuple) else (st64,)):
        within_half_ulp(s, s64, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", ["LSTM-2L-bi", "LSTM-proj", "GRU-2L-bi", "RNN-relu-2L"])
def test_gradients_within_3x_torchs_error(name, dtype):
    """Training in half precision: gradients come back in the parameters' dtype, and their error against
    float64 is at most 3x torch.nn's own in that dtype (flash-attention's rule for low precision)."""
    ours, truth = _modules(name, CASES[name], dtype)
    theirs = getattr(torch.nn, name.split("-")[0])(8, 12, dtype=dtype, **CASES[name])
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(7, 3, 8).to(dtype).double()

    def grads(m, dt):
        xi = x.detach().to(dt).requires_grad_()
        y, _ = m(xi)
        y.float().pow(2).sum().backward()
        return [xi.grad] + [p.grad for p in m.parameters()]

    with dispatch.record_calls() as ran:
        g_ours = grads(ours, dtype)
    assert backends_used(ran) == {"cpp"}
    assert {g.dtype for g in g_ours} == {dtype}
    g_theirs, g64 = grads(theirs, dtype), grads(truth, torch.float64)
    for k, (a, b, ref) in enumerate(zip(g_ours, g_theirs, g64)):
        assert (a.double() - ref).abs().max() <= 3 * (b.double() - ref).abs().max() + 1e-6, f"gradient {k}"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_packed_sequence(dtype):
    ours, truth = _modules("LSTM", dict(bidirectional=True), dtype)
    x = torch.randn(6, 4, 8).to(dtype)
    lengths = torch.tensor([6, 2, 5, 3])
    with torch.no_grad(), dispatch.record_calls() as ran:
        y, (h, c) = ours(pack_padded_sequence(x, lengths, enforce_sorted=False))
        y64, (h64, c64) = truth(pack_padded_sequence(x.double(), lengths, enforce_sorted=False))
    assert backends_used(ran) == {"cpp"}
    assert torch.equal(y.batch_sizes, y64.batch_sizes)
    for a, b in ((y.data, y64.data), (h, h64), (c, c64)):
        within_half_ulp(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_cells(cls, dtype, grad):
    """Cells in half precision: the cast path of ``fastrnn.functional.cell_step`` (the streaming fast path
    of the module serves the backend's own dtypes only), the state in the cell's dtype."""
    torch.manual_seed(0)
    ours = getattr(fastrnn, cls)(8, 12, dtype=dtype)
    truth = getattr(torch.nn, cls)(8, 12, dtype=torch.float64)
    truth.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(3, 8).to(dtype)
    hx = torch.randn(3, 12).to(dtype)
    state = (hx, hx.neg()) if cls == "LSTMCell" else hx
    state64 = tuple(s.double() for s in state) if cls == "LSTMCell" else hx.double()
    with torch.set_grad_enabled(grad), dispatch.record_calls() as ran:
        out = ours(x, state)
        out64 = truth(x.double(), state64)
    assert backends_used(ran) == {"cpp"}
    # on the float32 casts, the fused cell op (input projection inside) without autograd, its one-step
    # training node with autograd
    assert {op for op, _ in ran} == {f"{cls[:-4].lower()}_cell_{'train' if grad else 'fwd'}"}
    for a, b in zip(out if isinstance(out, tuple) else (out,), out64 if isinstance(out64, tuple) else (out64,)):
        within_half_ulp(a.detach(), b.detach(), dtype)


def test_nan_and_inf_propagate():
    """A NaN in the input reaches the outputs as in torch, an inf in a float16 weight too."""
    ours, _ = _modules("GRU", {}, torch.bfloat16)
    theirs = torch.nn.GRU(8, 12, dtype=torch.bfloat16)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 8).bfloat16()
    x[2, 1, 3] = float("nan")
    with torch.no_grad():
        y, h = ours(x)
        yt, ht = theirs(x)
    assert torch.equal(y.isnan(), yt.isnan()) and bool(y[2:, 1].isnan().all()) and not bool(y[:, 0].isnan().any())
    ours16, _ = _modules("RNN-tanh", {}, torch.float16)
    with torch.no_grad():
        ours16.weight_ih_l0[0, 0] = float("inf")
        y, _ = ours16(torch.ones(3, 1, 8, dtype=torch.float16))
    assert y[0, 0, 0].item() == 1.0  # tanh(inf) = 1, as torch
    assert not bool(y.isnan().any())


def test_named_backend_reasons():
    """cpp names what it serves; numba refuses half precision (issue 4: float32 and float64)."""
    spec = dispatch.Spec("lstm", "cpu", torch.bfloat16)
    assert dispatch.reasons("cpp", spec) == []
    if "numba" in CPU_BACKENDS:
        assert dispatch.reasons("numba", spec) == ["dtype bfloat16 is not supported (serves float32, float64)"]
    why = dispatch.get("cpp").not_supported_reasons(dispatch.Spec("lstm", "cpu", torch.int32))
    assert why == ["dtype int32 is not supported (serves float32, float64, bfloat16 (computed in float32), "
                   "float16 (computed in float32))"]


# ---- CPU autocast ----------------------------------------------------------------------------------
# torch.nn's output dtypes under torch.autocast("cpu") (torch 2.13, bfloat16 and float16, measured):
# the autocast dtype for LSTM (float32 with a PackedSequence; c_n float32 with proj_size), RNN and
# RNNCell; float32 for GRU, LSTMCell and GRUCell. (torch's float16 LSTM without packing fails in oneDNN:
# "could not create a primitive descriptor", and so does its bfloat16 one on a CPU without AVX-512: those
# cases are compared with the float32 module's rounding only.)
AMP_CASES = [  # name, kwargs, packed, dtypes of (output, *states)
    ("LSTM", {}, False, "lll"), ("LSTM", {}, True, "fff"), ("LSTM", dict(proj_size=5), False, "llf"),
    ("LSTM", dict(proj_size=5), True, "llf"), ("LSTM", dict(num_layers=2, bidirectional=True), False, "lll"),
    ("GRU", {}, False, "ff"), ("GRU", dict(num_layers=2, bidirectional=True), True, "ff"),
    ("RNN", {}, False, "ll"), ("RNN", dict(nonlinearity="relu", num_layers=2), True, "ll"),
]


def _amp_run(m, x, packed, amp, grad):
    inp = pack_padded_sequence(x, torch.tensor([6, 4, 3]), enforce_sorted=False) if packed else x
    with torch.autocast("cpu", dtype=amp), torch.set_grad_enabled(grad):
        out, st = m(inp)
    return [out.data if packed else out] + list(st if isinstance(st, tuple) else (st,))


@pytest.mark.parametrize("amp", DTYPES, ids=IDS)
@pytest.mark.parametrize("name,kw,packed,want", AMP_CASES, ids=[f"{c[0]}-{c[1]}-{'packed' if c[2] else 'dense'}"
                                                                 for c in AMP_CASES])
def test_autocast_dtypes_and_values(name, kw, packed, want, amp):
    """Under CPU autocast: torch.nn's output dtypes; the values are the float32 module's rounded once
    (the layer runs with autocast off, its projection included), and close to torch's own autocast run;
    training works and gives float32 gradients close to torch's."""
    torch.manual_seed(0)
    ours = getattr(fastrnn, name)(8, 12, **kw)
    theirs = getattr(torch.nn, name)(8, 12, **kw)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 3, 8)
    with dispatch.record_calls() as ran:
        got = _amp_run(ours, x, packed, amp, False)
    assert backends_used(ran) == {"cpp"}
    assert [t.dtype for t in got] == [amp if c == "l" else torch.float32 for c in want]
    with torch.no_grad():
        inp = pack_padded_sequence(x, torch.tensor([6, 4, 3]), enforce_sorted=False) if packed else x
        out, st = ours(inp)
        full = [out.data if packed else out] + list(st if isinstance(st, tuple) else (st,))
    for g, f in zip(got, full):
        assert torch.equal(g, f.to(g.dtype))
    try:
        theirs_got = _amp_run(theirs, x, packed, amp, False)
    except RuntimeError as e:
        # torch.nn's dense LSTM without a projection runs oneDNN's low-precision LSTM under autocast, which fails
        # where oneDNN has none: float16 on every CPU so far, bfloat16 on a Zen 3 (AVX2, no AVX-512)
        assert "could not create a primitive descriptor" in str(e) and name == "LSTM" and not packed, e
        assert "proj_size" not in kw, e
        theirs_got = []
    for g, t in zip(got, theirs_got, strict=bool(theirs_got)):
        assert g.dtype == t.dtype
        torch.testing.assert_close(g.float(), t.float(), atol=1e-2, rtol=1e-2)
    # training: the loss through the autocast outputs, float32 gradients for the float32 parameters
    y = _amp_run(ours, x, packed, amp, True)[0]
    y.float().pow(2).sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())
    ref = getattr(fastrnn, name)(8, 12, **kw)
    ref.load_state_dict(ours.state_dict())
    inp = pack_padded_sequence(x, torch.tensor([6, 4, 3]), enforce_sorted=False) if packed else x
    out = ref(inp)[0]
    (out.data if packed else out).to(y.dtype).float().pow(2).sum().backward()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)
    if theirs_got:
        # and against float64: the error of the gradients at most 3x torch.nn's own under autocast
        truth = getattr(torch.nn, name)(8, 12, dtype=torch.float64, **kw)
        truth.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
        x64 = x.double()
        inp64 = pack_padded_sequence(x64, torch.tensor([6, 4, 3]), enforce_sorted=False) if packed else x64
        out64 = truth(inp64)[0]
        (out64.data if packed else out64).pow(2).sum().backward()
        theirs.zero_grad()
        _amp_run(theirs, x, packed, amp, True)[0].float().pow(2).sum().backward()
        for k, (a, b, t) in enumerate(zip(ours.parameters(), theirs.parameters(), truth.parameters())):
            err, bound = (a.grad.double() - t.grad).abs().max(), 3 * (b.grad.double() - t.grad).abs().max() + 1e-6
            assert err <= bound, (k, float(err), float(bound))


@pytest.mark.parametrize("amp", DTYPES, ids=IDS)
@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_autocast_cells(cls, amp, grad):
    """Cells under CPU autocast, with and without a state and autograd (with autograd they used to fail:
    the autocast projection gave a bfloat16 xw for a float32 state): torch.nn's dtypes, its values
    within half precision."""
    torch.manual_seed(0)
    ours = getattr(fastrnn, cls)(8, 12)
    theirs = getattr(torch.nn, cls)(8, 12)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 8)
    for hx in (None, (torch.randn(3, 12), torch.randn(3, 12)) if cls == "LSTMCell" else torch.randn(3, 12)):
        with torch.autocast("cpu", dtype=amp), torch.set_grad_enabled(grad):
            with dispatch.record_calls() as ran:
                got = ours(x, hx)
            want = theirs(x, hx)
        assert backends_used(ran) == {"cpp"}
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for g, w in zip(got, want):
            assert g.dtype == w.dtype == (amp if cls == "RNNCell" else torch.float32)
            torch.testing.assert_close(g.float(), w.float(), atol=1e-2, rtol=1e-2)
        if grad:
            sum(g.float().sum() for g in got).backward()
            assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())


def test_autocast_under_torch_compile():
    """The autocast rules trace: a fullgraph-compiled LSTM under CPU autocast gives the eager result."""
    torch.manual_seed(0)
    m = fastrnn.LSTM(8, 12)
    x = torch.randn(5, 2, 8)
    compiled = torch.compile(m, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, eager = compiled(x), m(x)
    for g, e in zip([got[0], *got[1]], [eager[0], *eager[1]]):
        assert g.dtype == torch.bfloat16 and torch.equal(g, e)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("T", [2, 40], ids=["short", "long"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_autocast_other_inputs(name, T, grad):
    """Under autocast torch.nn also takes a bfloat16 module, a bfloat16 input for a float32 module, and
    the bfloat16 state it returned fed back (streaming under autocast); so does fastrnn, with torch's
    dtypes and values within half precision."""
    torch.manual_seed(0)
    amp = torch.bfloat16
    for mdt in (torch.float32, torch.bfloat16):
        ours = getattr(fastrnn, name)(6, 10, num_layers=2, dtype=mdt)
        theirs = getattr(torch.nn, name)(6, 10, num_layers=2, dtype=mdt)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(T, 1, 6).to(amp)
        with torch.autocast("cpu", dtype=amp), torch.set_grad_enabled(grad):
            with dispatch.record_calls() as ran:
                y, st = ours(x)
                y2, st2 = ours(x, st)  # the returned state fed back
            yt, stt = theirs(x)
            yt2, stt2 = theirs(x, stt)
        assert backends_used(ran) == {"cpp"}
        for a, b in [*zip(flat_outputs((y, st)), flat_outputs((yt, stt))), *zip(flat_outputs((y2, st2)), flat_outputs((yt2, stt2)))]:
            assert a.dtype == b.dtype, (mdt, a.dtype, b.dtype)
            torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)
        if grad:
            y2.float().sum().backward()
            assert all(p.grad is not None and p.grad.dtype == mdt for p in ours.parameters())


def _states(st):
    return st if isinstance(st, tuple) else (st,)


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
def test_autocast_cells_other_inputs(cls):
    """Cells under autocast: a bfloat16 input for a float32 cell, its returned state fed back."""
    torch.manual_seed(0)
    ours = getattr(fastrnn, cls)(6, 10)
    theirs = getattr(torch.nn, cls)(6, 10)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16), dispatch.record_calls() as ran:
        s, st = ours(x), theirs(x)
        out, want = ours(x, s), theirs(x, st)
    assert backends_used(ran) == {"cpp"}
    for a, b in [*zip(_states(s), _states(st)), *zip(_states(out), _states(want))]:  # both calls
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)
