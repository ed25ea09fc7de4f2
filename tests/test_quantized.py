"""fastrnn.quantize: int8 and bfloat16 inference (fastrnn/quantized.py, csrc/quant.cpp).

Values asserted against: the float32 module and torch's own dynamic int8 module on the same weights and
inputs (accuracy: ours no worse than torch's); the reference path of the same quantized module (the cpp
kernels, SIMD and portable: equal up to float32 rounding); torch.nn's behaviour for the call forms."""
import io
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import dispatch, quantized
from conftest import pairwise

CPP = quantized._cpp() is not None
NUMBA = not dispatch.reasons("numba")
needs_cpp = pytest.mark.skipif(not CPP, reason="the cpp extension is not built here (fastrnn.info says why)")
BACKENDS = ["reference"] + (["cpp"] if CPP else []) + (["numba"] if NUMBA else [])
KERNELS = (["cpp"] if CPP else []) + (["numba"] if NUMBA else [])  # the backends the reference is the oracle of


def _torch_int8(mod):
    from torch.ao.quantization import quantize_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(nn.Sequential(mod), {type(mod)}, dtype=torch.qint8)[0]


def _errors(got, want):
    """(max abs, relative L2) of each tensor of got against want."""
    return [((g - w).abs().max().item(), ((g - w).norm() / w.norm()).item()) for g, w in zip(got, want)]


def _flat(out):
    y, st = out
    return [y, *(st if isinstance(st, tuple) else (st,))]


# ---- accuracy against the float module, next to torch's int8 -------------------------------------------
ACCURACY = [("LSTM", 100, B, H) for B in (1, 16, 64) for H in (256, 512, 1024)] + \
           [("GRU", 100, B, H) for B in (1, 16, 64) for H in (256, 512, 1024)] + \
           [(f, T, B, H) for f in ("LSTM", "GRU") for T, B, H in ((1, 1, 8), (7, 3, 20), (33, 5, 64), (12, 2, 100))]


@needs_cpp
@pytest.mark.parametrize("family,T,B,H", ACCURACY)
def test_int8_no_less_accurate_than_torch_int8(family, T, B, H):
    """Each benchmark shape on one draw of weights and input; a small shape (a few dozen outputs, where
    one rounding decides a draw: at T=1, B=1, H=8 ours is the closer one in 7 draws of 8) on the mean
    over 8 draws."""
    draws = 1 if H >= 256 else 8
    I = min(H, 256)
    ours, theirs = [], []
    for draw in range(draws):
        torch.manual_seed(T * 1000 + B * 10 + H + draw)
        mod = getattr(nn, family)(I, H).eval()
        x = torch.randn(T, B, I)
        with torch.no_grad():
            want = _flat(mod(x))
            theirs.append(_errors(_flat(_torch_int8(mod)(x)), want))
            with dispatch.record_calls() as ran:
                ours.append(_errors(_flat(fastrnn.quantize(mod, torch.qint8)(x)), want))
        assert ran == [(f"{family.lower()}_quantized", "cpp")]
    for j, what in enumerate(("output", "h_n", "c_n")[:len(ours[0])]):
        o = [sum(e[j][m] for e in ours) / draws for m in (0, 1)]
        t = [sum(e[j][m] for e in theirs) / draws for m in (0, 1)]
        assert o[0] <= t[0] and o[1] <= t[1], (
            f"{what}: fastrnn int8 max abs {o[0]:.3g}, relative L2 {o[1]:.3g}; torch int8 {t[0]:.3g}, {t[1]:.3g}"
            f" (mean over {draws} draws)")


@needs_cpp
@pytest.mark.parametrize("family,T,B,H", [a for a in ACCURACY if a[3] <= 512])
def test_bf16_relative_error(family, T, B, H):
    torch.manual_seed(H + B)
    mod = getattr(nn, family)(min(H, 256), H).eval()
    x = torch.randn(T, B, min(H, 256))
    with torch.no_grad():
        errs = _errors(_flat(fastrnn.quantize(mod, torch.bfloat16)(x)), _flat(mod(x)))
    assert all(rel <= 1e-2 for _, rel in errs), errs


def _pairs(grid):
    """A pairwise cover of a grid given as {name: values}: a list of {name: value} dicts."""
    import itertools
    names = list(grid)
    full = [pytest.param(*vals) for vals in itertools.product(*grid.values())]
    return [dict(zip(names, p.values)) for p in pairwise(full)]


# ---- the kernels equal the reference path ----------------------------------------------------------------
KERNEL_CASES = _pairs(dict(
    family=["LSTM", "GRU", "RNN", "RNN-relu", "LSTM-proj", "LSTM-peephole", "LSTM-coupled"],
    dtype=[torch.qint8, torch.bfloat16],
    form=["dense", "batch_first", "unbatched", "packed"],
    layers=[(1, False), (2, True)],
    kernel=["cpp", "cpp-portable", "numba"],
))


def _make(family, I, H, layers=1, bidirectional=False, batch_first=False, bias=True):
    kw = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    if family == "RNN-relu":
        return nn.RNN(I, H, nonlinearity="relu", **kw)
    if family == "LSTM-proj":
        return nn.LSTM(I, H, proj_size=H // 2 + 1, **kw)
    if family == "LSTM-peephole":
        return fastrnn.LSTM(I, H, peephole=True, **kw)
    if family == "LSTM-coupled":
        return fastrnn.LSTM(I, H, coupled_gates=True, peephole=True, **kw)
    return getattr(nn, family)(I, H, **kw)


def _sequence_input(form, T, B, I):
    x = torch.randn(T, B, I)
    if form == "batch_first":
        return x.transpose(0, 1).contiguous()
    if form == "unbatched":
        return x[:, 0]
    if form == "packed":
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
        return pack_padded_sequence(x, lengths, enforce_sorted=False)
    return x


def _unpack(out):
    y, st = out
    y = y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y
    return [y, *(st if isinstance(st, tuple) else (st,))]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_kernel_equals_reference(case):
    """A sequence: equal up to float32 rounding. A rounding difference in a gate (the kernels' tanh and
    sigmoid are not torch's) can move h_{t-1}'s quantized value by one step in a later step, which moves
    that step's products by about s_h * s_w: hence 2e-3 on the whole and most elements within 1e-5."""
    torch.manual_seed(len(str(case)))
    layers, bidir = case["layers"]
    mod = _make(case["family"], 12, 37, layers, bidir, batch_first=case["form"] == "batch_first").eval()
    x = _sequence_input(case["form"], 9, 6, 12)
    backend = case["kernel"].split("-")[0]
    if backend not in KERNELS:
        pytest.skip(f"the {backend} backend is not available here")
    _portable(case["kernel"] == "cpp-portable")
    try:
        with torch.no_grad():
            kern = fastrnn.quantize(mod, case["dtype"], backend=backend)
            ref = fastrnn.quantize(mod, case["dtype"], backend="reference")
            with dispatch.record_calls() as ran:
                got = _unpack(kern(x))
            want = _unpack(ref(x))
    finally:
        _portable(False)
    assert {b for _, b in ran} == {backend}
    for g, w in zip(got, want):
        assert g.shape == w.shape
        d = (g - w).abs()
        assert d.max() <= 2e-3 and (d > 1e-5).float().mean() <= 0.02, (d.max(), (d > 1e-5).float().mean())


def _portable(on):
    if CPP:
        quantized._cpp().q_set_portable(on)


@pytest.mark.parametrize("family", ["LSTMCell", "GRUCell", "RNNCell", "RNNCell-relu", "LSTMCell-peephole"])
@pytest.mark.parametrize("dtype", [torch.qint8, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["cpp", "cpp-portable", "numba"])
def test_cell_kernel_equals_reference_exactly(family, dtype, kernel):
    """One step from the same state: the same quantized activations and integer sums, so the kernel and the
    reference differ only by float32 rounding of the products and the gates."""
    torch.manual_seed(3)
    if family == "RNNCell-relu":
        mod = nn.RNNCell(20, 35, nonlinearity="relu")
    elif family == "LSTMCell-peephole":
        mod = fastrnn.LSTMCell(20, 35, peephole=True)
    else:
        mod = getattr(nn, family)(20, 35)
    x = torch.randn(7, 20)
    hx = (torch.randn(7, 35), torch.randn(7, 35)) if family.startswith("LSTM") else torch.randn(7, 35)
    backend = kernel.split("-")[0]
    if backend not in KERNELS:
        pytest.skip(f"the {backend} backend is not available here")
    _portable(kernel == "cpp-portable")
    try:
        with torch.no_grad():
            with dispatch.record_calls() as ran:
                got = fastrnn.quantize(mod, dtype, backend=backend)(x, hx)
            want = fastrnn.quantize(mod, dtype, backend="reference")(x, hx)
    finally:
        _portable(False)
    assert ran == [(f"{family.split('-')[0][:-4].lower()}_quantized", backend)]
    for g, w in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-6)


def test_portable_and_simd_paths_named():
    if not CPP:
        assert quantized.kernel_path().startswith("unavailable")
        return
    import fastrnn.info
    for dt in (torch.qint8, torch.bfloat16):
        assert quantized.kernel_path(dt) in ("avx512-vnni", "avx512-bf16", "portable int32",
                                             "portable (bfloat16 widened to float32)")
    assert "quantized" in fastrnn.info.report()


# ---- torch.nn's call forms --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_call_forms_match_the_float_module(backend):
    """Batched, unbatched, batch_first, packed (unsorted), hx given: the same shapes and nearly the same
    numbers as the float module; the packed output's rows are the dense output's rows."""
    torch.manual_seed(0)
    mod = nn.LSTM(5, 16, num_layers=2, bidirectional=True, batch_first=True).eval()
    q = fastrnn.quantize(mod, backend=backend)
    x = torch.randn(4, 7, 5)
    h0 = (torch.randn(4, 4, 16) * 0.5, torch.randn(4, 4, 16) * 0.5)
    with torch.no_grad():
        for args in ((x,), (x, h0), (x[0],), (x[0], tuple(s[:, 0] for s in h0))):
            want = mod(*args)
            with dispatch.record_calls() as ran:
                got = q(*args)
            assert ran == [("lstm_quantized", backend)] * 4  # 2 layers x 2 directions
            for g, w in zip(_flat(got), _flat(want)):
                assert g.shape == w.shape and (g - w).abs().max() < 0.05
        lengths = torch.tensor([7, 2, 5, 3])
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        (py, (ph, pc)), (wy, (wh, wc)) = q(packed, h0), mod(packed, h0)
        assert torch.equal(py.batch_sizes, wy.batch_sizes) and torch.equal(py.unsorted_indices, wy.unsorted_indices)
        assert (py.data - wy.data).abs().max() < 0.05 and (ph - wh).abs().max() < 0.05
        # each sequence alone, unpadded, gives the same final state as in the packed batch
        for b in range(4):
            _, (hb, _) = q(x[b:b + 1, :lengths[b]], tuple(s[:, b:b + 1] for s in h0))
            torch.testing.assert_close(hb[:, 0], ph[:, b], rtol=0, atol=1e-5)


def test_module_replacement_and_types():
    model = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 8), nn.Sequential(fastrnn.GRUCell(8, 8), nn.RNNCell(8, 2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = fastrnn.quantize(model)
    assert type(q[1]) is quantized.LSTM and type(q[2][0]) is quantized.GRUCell and type(q[2][1]) is quantized.RNNCell
    assert type(q[0]) is nn.Linear and type(model[1]) is nn.LSTM  # the original untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sd = q.state_dict()
    assert sd["1.weight_ih_l0"].dtype == torch.int8 and sd["1.weight_ih_l0_scale"].dtype == torch.float32
    assert not any(k.split(".")[-1].startswith("_packed") for k in sd)
    same = fastrnn.quantize(model, inplace=True)
    assert same is model and type(model[1]) is quantized.LSTM
    bare = fastrnn.quantize(nn.GRU(3, 5), torch.bfloat16)
    assert type(bare) is quantized.GRU and bare.weight_hh_l0.dtype == torch.bfloat16


def test_training_code_idioms():
    """What a model around a quantized layer does: a dtype cast of the whole model leaves the quantized layer
    in its form; hooks run; a deepcopy and an in-place op on an output change nothing inside."""
    import copy
    torch.manual_seed(2)
    model = nn.Sequential(nn.GRU(4, 8))
    q = fastrnn.quantize(model)
    x = torch.randn(5, 2, 4)
    with torch.no_grad():
        want, _ = q[0](x)
        q.double()
        assert q[0].weight_ih_l0.dtype == torch.int8 and q[0].bias_ih_l0.dtype == torch.float32
        seen = []
        q[0].register_forward_hook(lambda mod, args, out: seen.append(out[0].shape))
        twin = copy.deepcopy(q)
        y, _ = q[0](x)
        y.add_(1.0)  # the output is the caller's own tensor
        again, _ = twin[0](x)
        after, _ = q[0](x)
    assert torch.equal(again, want) and torch.equal(after, want)
    assert seen == [torch.Size([5, 2, 8])] * 3  # the copy keeps the hook, as deepcopy of any module does


@pytest.mark.parametrize("dtype", [torch.qint8, torch.bfloat16])
def test_state_dict_and_save_round_trip(dtype):
    torch.manual_seed(1)
    q = fastrnn.quantize(nn.LSTM(6, 10, num_layers=2, proj_size=4), dtype)
    other = fastrnn.quantize(nn.LSTM(6, 10, num_layers=2, proj_size=4), dtype)
    x = torch.randn(5, 3, 6)
    with torch.no_grad():
        want = _flat(q(x))
        other.load_state_dict(q.state_dict())  # the packed panels are made again from the loaded weights
        assert all(torch.equal(a, b) for a, b in zip(_flat(other(x)), want))
        other_kind = fastrnn.quantize(nn.LSTM(6, 10, num_layers=2, proj_size=4),
                                      torch.bfloat16 if dtype is torch.qint8 else torch.qint8)
        with pytest.raises(RuntimeError, match="the checkpoint holds"):
            other_kind.load_state_dict(q.state_dict(), strict=False)
        buf = io.BytesIO()
        torch.save(q, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert all(torch.equal(a, b) for a, b in zip(_flat(loaded(x)), want))


# ---- bad input -----------------------------------------------------------------------------------------------
def test_bad_input_errors():
    lstm = nn.LSTM(4, 6)
    with pytest.raises(RuntimeError, match="unsupported dtype torch.float16"):
        fastrnn.quantize(lstm, torch.float16)
    with pytest.raises(RuntimeError, match="torch.float64 weights"):
        fastrnn.quantize(nn.Sequential(nn.LSTM(4, 6).double()))
    with pytest.raises(ValueError, match="layer_norm"):
        fastrnn.quantize(fastrnn.LSTM(4, 6, layer_norm=True))
    with pytest.raises(ValueError, match="unknown backend"):
        fastrnn.quantize(lstm, backend="triton")
    with pytest.raises(TypeError, match="expected an nn.Module"):
        fastrnn.quantize(lstm.weight_ih_l0)
    model = nn.Sequential(lstm, fastrnn.LSTM(6, 6, layer_norm=True))
    with pytest.raises(ValueError):
        fastrnn.quantize(model, inplace=True)
    assert type(model[0]) is nn.LSTM  # refused before anything changed
    q = fastrnn.quantize(nn.LSTM(4, 6))  # in training mode, as the float module was
    assert q.training
    x = torch.randn(3, 2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only.*fastrnn.quantize|fastrnn.quantize.*inference-only"):
        q(x)
    with pytest.raises(RuntimeError, match="float32"):
        q(torch.randn(3, 2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="input_size"):
        q(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="2D or 3D"):
        q(torch.randn(3))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="Expected hidden size"):
            q(torch.randn(3, 2, 4), (torch.zeros(1, 3, 6), torch.zeros(1, 3, 6)))
        y, _ = q(x)  # under no_grad a requires-grad input is fine
    assert not y.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_call_forms(backend):
    """A cell: batched with and without a state, unbatched, a non-contiguous input (the fast path's
    refusals go to the general forward, same numbers), and the general forward's errors for a bad state."""
    torch.manual_seed(4)
    q = fastrnn.quantize(nn.LSTMCell(6, 9), backend=backend)
    x = torch.randn(12, 3)[::2].t().contiguous()  # [3, 6]
    hx = (torch.randn(3, 9), torch.randn(3, 9))
    with torch.no_grad():
        with dispatch.record_calls() as ran:
            want = q(x, hx)
        assert ran == [("lstm_quantized", backend)]
        for got in (q(x.t().contiguous().t(), hx), q(x, tuple(hx)), q(x, [*hx])):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        h1, c1 = q(x[1], tuple(s[1] for s in hx))
        assert torch.equal(h1, want[0][1]) and torch.equal(c1, want[1][1])
        h0, _ = q(x)
        assert torch.equal(h0, q(x, (torch.zeros(3, 9), torch.zeros(3, 9)))[0])
        with pytest.raises(RuntimeError, match="hidden size"):
            q(x, (torch.zeros(2, 9), torch.zeros(2, 9)))
        with pytest.raises(RuntimeError, match="dtype"):
            q(x, (torch.zeros(3, 9, dtype=torch.float64), torch.zeros(3, 9)))
        with pytest.raises(RuntimeError, match="input_size"):
            q(torch.randn(3, 5), hx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_between_layers_in_training_mode(backend):
    """torch's dynamic int8 LSTM drops between layers in training mode too: so do these, with torch's RNG
    (the same seed, the same output), packed input included; eval mode drops nothing."""
    torch.manual_seed(5)
    q = fastrnn.quantize(nn.LSTM(4, 7, num_layers=3, dropout=0.5), backend=backend)
    x = torch.randn(6, 3, 4)
    packed = pack_padded_sequence(x, torch.tensor([6, 2, 4]), enforce_sorted=False)
    with torch.no_grad():
        for inp in (x, packed):
            torch.manual_seed(1)
            with dispatch.record_calls() as ran:
                a = _unpack(q(inp))
            assert ran == [("lstm_quantized", backend)] * 3
            torch.manual_seed(1)
            b = _unpack(q(inp))
            torch.manual_seed(2)
            c = _unpack(q(inp))
            assert all(torch.equal(u, v) for u, v in zip(a, b)) and not torch.equal(a[0], c[0])
        q.eval()
        torch.manual_seed(3)
        e1 = _unpack(q(packed))
        torch.manual_seed(4)
        e2 = _unpack(q(packed))
        assert all(torch.equal(u, v) for u, v in zip(e1, e2))
        _, (h_alone, _) = q(x[:2, 1:2])  # the second sequence (length 2) alone: the same final state
        torch.testing.assert_close(e1[1][:, 1], h_alone[:, 0], rtol=0, atol=1e-5)


def test_requested_backend_obeyed_or_refused(monkeypatch):
    """fastrnn.use_backend and FASTRNN_BACKEND choose the quantized modules' backend as they do every
    module's; a backend that has no quantized kernels (triton, torch) is refused with the reason, and the
    module's own backend= wins over both."""
    q = fastrnn.quantize(nn.GRU(4, 6))
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        for name in BACKENDS:
            with fastrnn.use_backend(name), dispatch.record_calls() as ran:
                q(x)
            assert ran == [("gru_quantized", name)]
        for name in ("triton", "torch"):
            with fastrnn.use_backend(name), pytest.raises(fastrnn.BackendNotSupportedError,
                                                          match="run on cpp, numba, reference"):
                q(x)
        monkeypatch.setenv("FASTRNN_BACKEND", "reference")
        with dispatch.record_calls() as ran:
            q(x)
        assert ran == [("gru_quantized", "reference")]
        mine = fastrnn.quantize(nn.GRU(4, 6), backend=BACKENDS[-1])
        with fastrnn.use_backend("triton"), dispatch.record_calls() as ran:
            mine(x)
        assert ran == [("gru_quantized", BACKENDS[-1])]


def test_nan_propagates():
    torch.manual_seed(0)
    for backend in BACKENDS:
        q = fastrnn.quantize(nn.GRU(4, 8), backend=backend)
        x = torch.randn(5, 2, 4)
        x[2, 1, 0] = float("nan")
        with torch.no_grad(), dispatch.record_calls() as ran:
            y, h = q(x)
        assert ran == [("gru_quantized", backend)]
        assert torch.isnan(y[2:, 1]).all() and not torch.isnan(y[:, 0]).any() and not torch.isnan(y[:2]).any()


# ---- a real task ---------------------------------------------------------------------------------------------
@needs_cpp
def test_text_classifier_accuracy_after_quantization():
    """The examples' name classifier (2-layer bidirectional LSTM, packed batches), trained one epoch: its
    held-out accuracy after quantization is within 1% (relative) of float32's, and int8 loses no more
    than torch's dynamic int8 does."""
    pytest.importorskip("faker", reason="the examples' data package (pip install faker; make test installs it)")
    from examples import text_classify as tc
    texts, labels, classes = tc.load_names()
    vocab, train_set, test_set = tc.prepare(texts, labels, "char", seed=0)
    model = tc.build(len(vocab), len(classes), "auto", seed=0)
    tc.train(model, train_set, test_set, epochs=1)
    base = tc.accuracy(model, test_set, "cpu")
    accs = {dt: tc.accuracy(fastrnn.quantize(model, dt), test_set, "cpu") for dt in (torch.qint8, torch.bfloat16)}
    float_twin = tc.build(len(vocab), len(classes), "torch", seed=0)
    float_twin.load_state_dict(model.state_dict())
    from torch.ao.quantization import quantize_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = tc.accuracy(quantize_dynamic(float_twin, {nn.LSTM}, dtype=torch.qint8), test_set, "cpu")
    for dt, acc in accs.items():
        assert acc >= base * 0.99, (dt, acc, base, theirs)
    assert base - accs[torch.qint8] <= max(base - theirs, 0.0) + 1e-9 or accs[torch.qint8] >= base, \
        (accs, base, theirs)


# ---- torch.compile ---------------------------------------------------------------------------------------------
class _SeqAndCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.lstm = nn.LSTM(5, 8, num_layers=2)
        self.cell = nn.GRUCell(8, 6)

    def forward(self, x):
        y, (h, c) = self.lstm(self.proj(x))
        return y, self.cell(y[-1], torch.zeros(y.shape[1], 6))


@needs_cpp
def test_compile_fullgraph():
    """A quantized sequence module and a quantized cell (whose eager fast path must step aside while
    dynamo traces) in one fullgraph compile: the same numbers as eager."""
    torch.manual_seed(0)
    q = fastrnn.quantize(_SeqAndCell()).eval()
    x = torch.randn(4, 2, 3)
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = q(x)
        got = compiled(x)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
