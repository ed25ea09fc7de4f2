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


# hidden sizes above one column block (cpp: 32 floats / 16 doubles) so that two threads get units, unequally;
# cpp rounds a worker's units to 16 floats / 8 doubles and pads its panels to whole blocks: H=72 splits as
# 48 / 24 units (the GRU's 3 x 48 columns pad to 160, the projection's 35 outputs a worker to 48, then 64)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name,proj,kind,H", [
    ("LSTM", 0, "batched", 37), ("LSTM", 3, "packed", 37), ("LSTM", 0, "packed", 20), ("LSTM", 40, "batched", 50),
    ("GRU", 0, "batched", 37), ("GRU", 0, "packed", 33), ("RNN_tanh", 0, "packed", 37),
    ("RNN_relu", 0, "batched", 40), ("LSTM", 0, "batched", 72), ("LSTM", 70, "packed", 72),
    ("GRU", 0, "batched", 72), ("RNN_tanh", 0, "batched", 72)])
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


# A PackedSequence in inference: the contract's optional <f>_packed_fwd, one call a layer-direction on the
# packed rows as they lie. Each backend keeps the tolerance its own test had (cpp's fused projection sums in
# torch's order; numba's float32 tanh is a rational approximation, 3.3e-7).
PACKED_CASES = {
    "LSTM": dict(), "LSTM-2L-bi": dict(num_layers=2, bidirectional=True),
    "LSTM-proj-bi": dict(proj_size=5, bidirectional=True),
    "LSTM-peephole-coupled": dict(peephole=True, coupled_gates=True),
    "LSTM-nobias": dict(bias=False), "GRU": dict(), "GRU-3L-batch_first": dict(num_layers=3, batch_first=True),
    "GRU-nobias-bi": dict(bias=False, bidirectional=True), "RNN-tanh-bi": dict(bidirectional=True),
    "RNN-relu-2L-nobias": dict(nonlinearity="relu", num_layers=2, bias=False),
}
PACKED_TOL = {"cpp": {torch.float32: 1e-6, torch.float64: 1e-12}, "numba": {torch.float32: 1e-5, torch.float64: 1e-10}}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("threads", ["one", "team"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(PACKED_CASES))
def test_packed_input_in_one_call_a_layer(backend, name, dtype, threads):
    """Each layer-direction is one ``<f>_packed_fwd`` call of the named backend; torch.nn's values (the
    variants: the reference backend's) for the output and every row's final state, sorted and unsorted,
    with and without a state; rows of length 1, a longest row alone in its last steps; on one thread and
    split over a team."""
    from torch.nn.utils.rnn import pack_padded_sequence
    if threads == "team" and torch.get_num_threads() < 2:
        pytest.skip("one thread: the op cannot split (torch.get_num_threads() == 1)")
    cls, kw = name.split("-")[0], PACKED_CASES[name]
    torch.manual_seed(0)
    ours = getattr(fastrnn, cls)(6, 40, dtype=dtype, backend=backend, **kw)
    variant = kw.get("peephole") or kw.get("coupled_gates")
    ref = (getattr(fastrnn, cls)(6, 40, dtype=dtype, backend="reference", **kw) if variant
           else getattr(torch.nn, cls)(6, 40, dtype=dtype, **kw))
    ref.load_state_dict(ours.state_dict())
    fam, D, P = cls.lower(), 2 if ours.bidirectional else 1, getattr(ours, "proj_size", 0) or 40
    tol = PACKED_TOL[backend][dtype]
    impl = dispatch.get(backend)
    old = impl.set_parallel_min_macs(0 if threads == "team" else 1 << 40)
    torch.manual_seed(1)
    try:
        for T, lengths, sort in ((9, [9, 4, 4, 1], True), (20, [3, 20, 1, 7, 20, 11, 2, 5, 13], False),
                                 (1, [1, 1], True), (30, [30] + [2] * 15, True)):
            B = len(lengths)
            x = torch.randn(B, T, 6, dtype=dtype) if ours.batch_first else torch.randn(T, B, 6, dtype=dtype)
            p = pack_padded_sequence(x, torch.tensor(lengths), batch_first=ours.batch_first, enforce_sorted=sort)
            h0 = torch.randn(ours.num_layers * D, B, P, dtype=dtype)
            hx = (h0, torch.randn(ours.num_layers * D, B, 40, dtype=dtype)) if fam == "lstm" else h0
            for state in (None, hx):
                with torch.no_grad():
                    with dispatch.record_calls() as ran:
                        got = ours(p, state)
                    want = ref(p, state)
                assert ran == [(f"{fam}_packed_fwd", backend)] * (ours.num_layers * D)
                torch.testing.assert_close(got[0].data, want[0].data, atol=tol, rtol=tol)
                for a, b in zip(*(s if isinstance(s, tuple) else (s,) for s in (got[1], want[1]))):
                    torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    finally:
        impl.set_parallel_min_macs(old)


@pytest.mark.parametrize("backend", FUSED)
def test_packed_op_checks(backend):
    """The same refusals, with the same messages, from both backends' ``<f>_packed_fwd`` (each backend's
    own message for a state of the wrong batch is in its own tests)."""
    op = dispatch.get(backend).gru_packed_fwd
    w_ih, w_hh, h = torch.randn(30, 6), torch.randn(30, 10), torch.zeros(2, 10)
    x, lengths = torch.randn(5, 6), torch.tensor([3, 2])
    with pytest.raises(RuntimeError, match=r"x must be \[N, I\] \(packed rows\)"):
        op(torch.randn(3, 2, 6), w_ih, None, w_hh, None, h, False, lengths)
    with pytest.raises(RuntimeError, match="x has 4 rows but the lengths sum to 5"):
        op(x[:4], w_ih, None, w_hh, None, h, False, lengths)
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 3 is not in 1..2"):  # the first row is the longest
        op(x, w_ih, None, w_hh, None, h, False, torch.tensor([2, 3]))
    with pytest.raises(RuntimeError, match="lengths must be non-increasing"):
        op(torch.randn(7, 6), w_ih, None, w_hh, None, torch.zeros(3, 10), False, torch.tensor([3, 1, 3]))
    with pytest.raises(RuntimeError, match=r"lengths\[0\] = 4294967296 but x has 5 rows"):  # refused before sizing
        op(x, w_ih, None, w_hh, None, h[:1], False, torch.tensor([2 ** 32]))
    with pytest.raises(RuntimeError, match="lengths must be a contiguous int64 CPU tensor"):
        op(x, w_ih, None, w_hh, None, h, False, lengths.int())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name,kw", [("LSTM", {}), ("LSTM", dict(proj_size=3)), ("GRU", {}),
                                     ("RNN", dict(nonlinearity="relu"))], ids=["LSTM", "LSTM-proj", "GRU", "RNN"])
@pytest.mark.parametrize("threads", ["one", "team"])
def test_packed_training_on_its_rows(backend, name, kw, threads, monkeypatch, ran):
    """A PackedSequence in training: the sequence ops take its rows as they lie (xw and grad_y [N, *], no
    [T, B, *] copies); outputs and every gradient equal torch.nn's (two layers, bidirectional, unsorted
    lengths, a row of one step), on one worker and on a team (every call split: H=20 is two blocks of
    float64 units). Zoneout's masks are [T, B, *]: that call takes the copies. Layer norm takes the rows too
    (numba's options' kernels lay them out padded inside) and equals the reference backend."""
    from torch.nn.utils.rnn import pack_padded_sequence
    family, seen, impl = name.lower(), [], dispatch.get(backend)
    for p in ("fwd", "bwd"):
        op = getattr(impl, f"{family}_seq_{p}")
        monkeypatch.setattr(impl, f"{family}_seq_{p}",
                            lambda *a, op=op, p=p: seen.append((p, tuple(a[0].shape))) or op(*a))
    H = 20 if threads == "team" else 6
    old = impl.set_parallel_min_macs(0) if threads == "team" else None
    try:
        torch.manual_seed(5)
        ref = getattr(torch.nn, name)(5, H, num_layers=2, bidirectional=True, dtype=torch.float64, **kw)
        mod = getattr(fastrnn, name)(5, H, num_layers=2, bidirectional=True, dtype=torch.float64, backend=backend,
                                     **kw)
        mod.load_state_dict(ref.state_dict())
        x = torch.randn(7, 5, 5, dtype=torch.float64)
        lengths = torch.tensor([4, 7, 1, 7, 5])

        def run(m):
            xi = x.clone().requires_grad_(True)
            out, st = m(pack_padded_sequence(xi, lengths, enforce_sorted=False))
            st = st if isinstance(st, tuple) else (st,)
            w = torch.linspace(-1, 1, out.data.numel(), dtype=torch.float64).view_as(out.data)
            loss = (out.data * w).sum() + sum((s * (k + 2)).sum() for k, s in enumerate(st))
            return [out.data, *st, *torch.autograd.grad(loss, [xi, *m.parameters()])]

        for a, b in zip(run(mod), run(ref)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
        G = {"lstm": 4, "gru": 3, "rnn": 1}[family]
        N, P = int(lengths.sum()), kw.get("proj_size", H)
        # four layer-directions, each forward on xw [N, G*H] and backward from grad_y [N, P]
        assert sorted(seen) == [("bwd", (N, P))] * 4 + [("fwd", (N, G * H))] * 4
        if name != "RNN":
            seen.clear()
            zon = getattr(fastrnn, name)(5, H, backend=backend, zoneout=0.3, dtype=torch.float64)
            zon(pack_padded_sequence(x.clone().requires_grad_(True), lengths,
                                     enforce_sorted=False))[0].data.sum().backward()
            assert seen == [("fwd", (7, 5, G * H)), ("bwd", (7, 5, H))]
        if name != "RNN":
            seen.clear()
            ln = getattr(fastrnn, name)(5, H, layer_norm=True, backend=backend, dtype=torch.float64)
            ln_ref = getattr(fastrnn, name)(5, H, layer_norm=True, backend="reference", dtype=torch.float64)
            ln_ref.load_state_dict(ln.state_dict())
            for a, b in zip(run(ln), run(ln_ref)):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
            assert seen == [("fwd", (N, G * H)), ("bwd", (N, H))]
    finally:
        if old is not None:
            impl.set_parallel_min_macs(old)
    assert backends_used(ran) - {"reference"} == {backend}
