"""Short sequences in inference (the chunks of a stream): the cpp backend's optional ``<family>_chunk_fwd``
(input projection inside the call), taken by the sequence modules' fast path and by
``fastrnn.functional`` up to ``chunk_max_rows`` rows (T x B) per layer-direction."""
import contextlib
import io

import math

import pytest
import torch

import fastrnn
from fastrnn import dispatch
from conftest import CPU_BACKENDS, flat_outputs, within_half_ulp

pytestmark = pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the cpp backend is not available here")

MAX_ROWS = fastrnn.backends.cpp.CppBackend.chunk_max_rows

CASES = {
    "LSTM": dict(),
    "LSTM-2L-bi": dict(num_layers=2, bidirectional=True),
    "LSTM-proj-bi": dict(proj_size=5, bidirectional=True),
    "LSTM-peephole-coupled": dict(peephole=True, coupled_gates=True),
    "LSTM-nobias": dict(bias=False),
    "GRU": dict(),
    "GRU-3L-batch_first": dict(num_layers=3, batch_first=True),
    "GRU-nobias-bi": dict(bias=False, bidirectional=True),
    "RNN-tanh-bi": dict(bidirectional=True),
    "RNN-relu-2L-nobias": dict(nonlinearity="relu", num_layers=2, bias=False),
}


def _pair(name, dtype=torch.float64, hidden=10):
    """fastrnn's module (automatic backend) and the same weights in torch.nn's module (for the variants,
    which torch.nn lacks, in fastrnn's on the reference backend)."""
    cls, kw = name.split("-")[0], CASES[name]
    torch.manual_seed(0)
    ours = getattr(fastrnn, cls)(6, hidden, dtype=dtype, **kw)
    if kw.get("peephole") or kw.get("coupled_gates"):
        ref = getattr(fastrnn, cls)(6, hidden, dtype=dtype, backend="reference", **kw)
    else:
        ref = getattr(torch.nn, cls)(6, hidden, dtype=dtype, **kw)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float64: dict(atol=1e-12, rtol=1e-12)}


@contextlib.contextmanager
def fast_path_only(m):
    """Within the block the module's general path raises: what runs is the fast path."""
    def general(*args, **kwargs):
        raise AssertionError("the general path ran")
    m.__dict__["_forward"] = general
    try:
        yield
    finally:
        del m.__dict__["_forward"]


def _state(m, B, dtype, batched=True):
    D = 2 if m.bidirectional else 1
    shape = (m.num_layers * D, B) if batched else (m.num_layers * D,)
    P = getattr(m, "proj_size", 0) or m.hidden_size
    h = torch.randn(*shape, P, dtype=dtype)
    return (h, torch.randn(*shape, m.hidden_size, dtype=dtype)) if isinstance(m, torch.nn.LSTM) else h


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("T,B", [(1, 1), (4, 1), (1, 3), (2, 8), (16, 1), (32, 1), (5, 6)])
@pytest.mark.parametrize("name", list(CASES))
def test_values_and_op(name, T, B, with_state, dtype):
    ours, ref = _pair(name, dtype)
    x = torch.randn(B, T, 6, dtype=dtype) if ours.batch_first else torch.randn(T, B, 6, dtype=dtype)
    hx = _state(ours, B, dtype) if with_state else None
    with torch.no_grad():
        with dispatch.record_calls() as ran, fast_path_only(ours):
            got = flat_outputs(ours(x, hx))
        want = flat_outputs(ref(x, hx))
    fam = name.split("-")[0].lower()
    D = 2 if ours.bidirectional else 1
    assert ran == [(f"{fam}_chunk_fwd", "cpp")] * (ours.num_layers * D)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("name", ["LSTM-2L-bi", "GRU-3L-batch_first", "RNN-tanh-bi"])
def test_unbatched(name):
    ours, ref = _pair(name)
    x = torch.randn(5, 6, dtype=torch.float64)
    for hx in (None, _state(ours, 1, torch.float64, batched=False)):
        with torch.no_grad():
            with dispatch.record_calls() as ran, fast_path_only(ours):
                got = flat_outputs(ours(x, hx))
            want = flat_outputs(ref(x, hx))
        assert set(ran) == {(f"{name.split('-')[0].lower()}_chunk_fwd", "cpp")}
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_when_the_path_is_not_taken():
    """cpp's chunk op serves dense inference sequences of any length (``chunk_max_rows`` is unbounded;
    numba's bound is in test_numba_fused.py), and a PackedSequence its packed op; with autograd, or on a
    backend without the ops: the general path (projection, then the sequence op)."""
    assert MAX_ROWS == math.inf
    torch.manual_seed(0)
    m = fastrnn.GRU(6, 10, num_layers=2, dropout=0.5)
    m.eval()
    cases = [(torch.randn(300, 1, 6), "no_grad"), (torch.randn(4, 4, 6), "no_grad"),
             (torch.randn(1, 70, 6), "no_grad"), (torch.randn(2, 2, 6), "grad")]
    for x, mode in cases:
        with torch.set_grad_enabled(mode == "grad"), dispatch.record_calls() as ran:
            m(x)
        want = "gru_chunk_fwd" if mode == "no_grad" else "gru_seq_fwd"
        assert set(ran) == {(want, "cpp")}, (x.shape, mode)
    # training mode with dropout: still the op per layer, with the dropout drawn between the layers
    x = torch.randn(2, 2, 6)
    with torch.no_grad():
        y_eval = m(x)[0]
        m.train()
        with dispatch.record_calls() as ran:
            y_train = m(x)[0]
    assert ran == [("gru_chunk_fwd", "cpp")] * 2
    assert not torch.equal(y_train, y_eval)
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 6), torch.tensor([3, 1]))
    m.eval()
    with torch.no_grad(), dispatch.record_calls() as ran:
        m(packed)
    assert ran == [("gru_packed_fwd", "cpp")] * 2
    with dispatch.record_calls() as ran:
        m(torch.nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 6, requires_grad=True), torch.tensor([3, 1])))
    assert set(ran) == {("gru_seq_fwd", "cpp")}
    with torch.no_grad(), dispatch.record_calls() as ran, fastrnn.use_backend("reference"):
        m(torch.randn(2, 2, 6))  # a backend without the op: its sequence op
    assert set(ran) == {("gru_seq_fwd", "reference")}


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_bad_input_gets_torchs_errors(name):
    """What the fast path refuses goes to the general path, which raises torch.nn's error; the module is
    left as it was."""
    torch.manual_seed(0)
    ours = getattr(fastrnn, name)(6, 10, num_layers=2)
    theirs = getattr(torch.nn, name)(6, 10, num_layers=2)
    theirs.load_state_dict(ours.state_dict())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(3, 2, 6)
    lstm = name == "LSTM"

    def st(*shape, dtype=torch.float32):
        h = torch.zeros(*shape, dtype=dtype)
        return (h, h.clone()) if lstm else h

    hid = r"Expected hidden\[0\] size" if lstm else "Expected hidden size"
    bad = [
        (torch.randn(3, 2, 5), None, "input.size\\(-1\\) must be equal to input_size. Expected 6, got 5"),
        (x, st(1, 2, 10), hid + r" \(2, 2, 10\), got \[1, 2, 10\]"),  # one layer's state for two layers
        (x, st(3, 2, 10), hid + r" \(2, 2, 10\), got \[3, 2, 10\]"),  # three
        (x, st(2, 3, 10), hid + r" \(2, 2, 10\), got \[2, 3, 10\]"),  # batch
        (x, st(2, 2, 9), hid + r" \(2, 2, 10\), got \[2, 2, 9\]"),    # hidden size
        (x, st(2, 2, 10, dtype=torch.float64), "has dtype torch.float64 but the input has dtype torch.float32"),
        (x.double(), None, r"input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)"),
        (torch.randn(3, 6), st(2, 2, 10), "For unbatched 2-D input, hx .*should also be 2-D"),
        (torch.randn(0, 2, 6), None, "Expected sequence length to be larger than 0"),
    ]
    if lstm:
        bad.append((x, (torch.zeros(2, 2, 10),), r"hx must be a tuple \(h_0, c_0\) of two tensors, got 1 items"))
        bad.append((x, torch.zeros(2, 2, 2, 10), r"hx must be a tuple \(h_0, c_0\) of two tensors, got Tensor"))
    for inp, hx, words in bad:
        with torch.no_grad():
            with pytest.raises(Exception) as theirs_err:
                theirs(inp, hx)
            with pytest.raises(type(theirs_err.value), match=words):
                ours(inp, hx)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k])


def test_non_contiguous_input_state_and_bias():
    """A non-contiguous input, state or bias parameter runs on the op (``functional.chunk_layers`` makes
    them contiguous), with the same values."""
    ours, ref = _pair("LSTM-2L-bi")
    x = torch.randn(2, 3, 6, dtype=torch.float64).transpose(0, 1)  # [3, 2, 6], not contiguous
    h, c = torch.randn(4, 2, 10, dtype=torch.float64), torch.randn(4, 2, 10, dtype=torch.float64)
    for state in ((h, c), (h.transpose(0, 1).contiguous().transpose(0, 1), c)):  # the second: [4, 2, 10] strided
        with torch.no_grad():
            with dispatch.record_calls() as ran, fast_path_only(ours):
                got = flat_outputs(ours(x, state))
            want = flat_outputs(ref(x, state))
        assert set(ran) == {("lstm_chunk_fwd", "cpp")}
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[torch.float64])
    torch.manual_seed(0)
    gru, theirs = fastrnn.GRU(6, 10), torch.nn.GRU(6, 10)
    gru.bias_ih_l0 = torch.nn.Parameter(torch.randn(60)[::2])
    theirs.load_state_dict(gru.state_dict())
    x = torch.randn(2, 1, 6)
    with torch.no_grad(), dispatch.record_calls() as ran, fast_path_only(gru):
        got = gru(x)
    assert set(ran) == {("gru_chunk_fwd", "cpp")}
    for g, w in zip(flat_outputs(got), flat_outputs(theirs(x))):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_parametrized_weight():
    """A parametrized weight (not in the module's parameter dict) is read through the attribute."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    ours = fastrnn.GRU(6, 10)
    theirs = torch.nn.GRU(6, 10)
    theirs.load_state_dict(ours.state_dict())
    parametrize.register_parametrization(ours, "weight_hh_l0", Double())
    with torch.no_grad():
        theirs.weight_hh_l0.mul_(2)
        x = torch.randn(3, 2, 6)
        with dispatch.record_calls() as ran, fast_path_only(ours):
            got = ours(x)
        want = theirs(x)
    assert set(ran) == {("gru_chunk_fwd", "cpp")}
    for g, w in zip(flat_outputs(got), flat_outputs(want)):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_half_precision_module():
    """A bfloat16 module's short call: the casts, then the op in float32."""
    torch.manual_seed(0)
    ours = fastrnn.LSTM(6, 10, dtype=torch.bfloat16)
    truth = torch.nn.LSTM(6, 10, dtype=torch.float64)
    truth.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(4, 2, 6).bfloat16()
    with torch.no_grad():
        with dispatch.record_calls() as ran:
            got = flat_outputs(ours(x))
        want = flat_outputs(truth(x.double()))
    assert ran == [("lstm_chunk_fwd", "cpp")]
    for g, w in zip(got, want):
        within_half_ulp(g, w, torch.bfloat16)


def test_pickles_after_a_call():
    """The fast path caches its choice in the module; torch.save of the whole module still works."""
    m = fastrnn.GRU(6, 10)
    with torch.no_grad():
        m(torch.randn(2, 1, 6))
    assert "_chunk_choice" in m.__dict__
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    assert "_chunk_choice" not in m2.__dict__
    with torch.no_grad():
        x = torch.randn(2, 1, 6)
        torch.testing.assert_close(m2(x)[0], m(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("T,B", [(1, 1), (3, 5), (16, 1)])
def test_functional_layer_takes_it(T, B):
    """``fastrnn.functional.rnn_layers`` on the direct path uses the op too (``steps`` may be left out for
    dense input), with torch.nn's values; not with per-row ``lengths``, which match torch.nn's packed
    sequence."""
    torch.manual_seed(0)
    m, theirs = fastrnn.LSTM(6, 10, num_layers=2), torch.nn.LSTM(6, 10, num_layers=2)
    theirs.load_state_dict(m.state_dict())
    x = torch.randn(T, B, 6)
    h = torch.randn(2, B, 10)
    kw = dict(num_layers=2, num_directions=1, dropout=0.0, training=False, backend="cpp")
    with torch.no_grad():
        with dispatch.record_calls() as ran:
            y, (h_n, c_n) = fastrnn.functional.rnn_layers("lstm", x, (h, h), m._weights(), m._options(),
                                                          lengths=None, **kw)
        assert ran == [("lstm_chunk_fwd", "cpp")] * 2
        y_ref, (h_ref, c_ref) = theirs(x, (h, h))
        for g, w in ((y, y_ref), (h_n, h_ref), (c_n, c_ref)):
            torch.testing.assert_close(g, w, **TOL[torch.float32])
        lengths = torch.tensor([T] + [max(1, T - 1)] * (B - 1))
        with dispatch.record_calls() as ran:
            y_len, (h_len, c_len) = fastrnn.functional.rnn_layers("lstm", x, (h, h), m._weights(), m._options(),
                                                                  lengths=lengths, **kw)
        assert ran == [("lstm_seq_fwd", "cpp")] * 2
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
        out, (h_ref, c_ref) = theirs(packed, (h, h))
        y_ref = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)[0]  # zeros past each row's end
        for g, w in ((y_len, y_ref), (h_len, h_ref), (c_len, c_ref)):
            torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_raw_op_checks():
    O = torch.ops.fastrnn_cpp
    w_ih, w_hh, h = torch.randn(30, 6), torch.randn(30, 10), torch.zeros(2, 10)
    with pytest.raises(RuntimeError, match=r"x must be \[T, B, I\]"):
        O.gru_chunk_fwd(torch.randn(2, 6), w_ih, None, w_hh, None, h, False)
    with pytest.raises(RuntimeError, match=r"w_ih must have shape \[30, 7\], got \[30, 6\]"):
        O.gru_chunk_fwd(torch.randn(3, 2, 7), w_ih, None, w_hh, None, h, False)
    with pytest.raises(RuntimeError, match=r"h0 must have shape \[2, 10\], got \[3, 10\]"):
        O.gru_chunk_fwd(torch.randn(3, 2, 6), w_ih, None, w_hh, None, torch.zeros(3, 10), False)


@pytest.mark.parametrize("biases", ["ih", "hh", "both"])
@pytest.mark.parametrize("T,B", [(2, 2), (5, 3)], ids=["unfused", "fused"])
def test_raw_op_one_bias(T, B, biases):
    """The chunk op with only one of b_ih and b_hh (a module has both or neither): with the projection fused
    into the loop (from 8 rows) b_ih goes into the pointwise pass's bias, except the GRU's n block
    (csrc/recurrence.h, PointBias); each equals torch's own cells step by step (float64)."""
    torch.manual_seed(0)
    O, I, H = torch.ops.fastrnn_cpp, 6, 10
    x, h0, c0 = torch.randn(T, B, I, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64), \
        torch.randn(B, H, dtype=torch.float64)
    for G, op, cell in ((4, O.lstm_chunk_fwd, torch.lstm_cell), (3, O.gru_chunk_fwd, torch.gru_cell),
                        (1, O.rnn_chunk_fwd, torch.rnn_tanh_cell)):
        w_ih, w_hh = torch.randn(G * H, I, dtype=torch.float64), torch.randn(G * H, H, dtype=torch.float64)
        b_ih = torch.randn(G * H, dtype=torch.float64) if biases in ("ih", "both") else None
        b_hh = torch.randn(G * H, dtype=torch.float64) if biases in ("hh", "both") else None
        state = (h0, c0) if G == 4 else h0
        args = {4: (None, None, h0, c0, False, False), 3: (h0, False), 1: (h0, False, "tanh")}[G]
        got = op(x, w_ih, b_ih, w_hh, b_hh, *args)
        ys = []
        for t in range(T):
            state = cell(x[t], state, w_ih, w_hh, b_ih, b_hh)
            ys.append(state[0] if G == 4 else state)
        torch.testing.assert_close(got[0], torch.stack(ys), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got[1], ys[-1], atol=1e-12, rtol=1e-12)
        if G == 4:
            torch.testing.assert_close(got[2], state[1], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["LSTM-2L-bi", "LSTM-proj-bi", "LSTM-peephole-coupled", "GRU", "RNN-tanh-bi"])
def test_threaded_chunks(name, dtype):
    """The chunk op split over torch's threads (each worker projects its own units' rows: below 8 rows
    all steps first, from 8 rows packed and fused, a block of 128 // B steps at a time just before them,
    one step a block past 128 rows): torch.nn's values, at a hidden size that leaves the last worker a
    partial block, with blocks that do not divide T (3 x 50: 2 + 1 steps; 20 x 16: 8 + 8 + 4), in both
    directions. Forced on small shapes by dropping the split threshold."""
    from fastrnn.backends import cpp
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: the chunk op cannot split (torch.get_num_threads() == 1)")
    cls = name.split("-")[0]
    ours, ref = _pair(name, dtype, hidden=40)
    old = cpp.BACKEND.set_parallel_min_macs(0)
    try:
        for T, B in ((1, 2), (2, 3), (7, 3), (40, 1), (3, 50), (20, 16), (3, 130)):
            x = torch.randn(T, B, 6, dtype=dtype)
            hx = _state(ours, B, dtype)
            with torch.no_grad():
                with dispatch.record_calls() as ran, fast_path_only(ours):
                    got = flat_outputs(ours(x, hx))
                want = flat_outputs(ref(x, hx))
            assert set(ran) == {(f"{cls.lower()}_chunk_fwd", "cpp")}
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **TOL[dtype])
    finally:
        cpp.BACKEND.set_parallel_min_macs(old)


def test_packed_op_state_check():
    """cpp's own message for a state of the wrong batch (the checks both fused backends share are in
    test_fused.py)."""
    O = torch.ops.fastrnn_cpp
    w_ih, w_hh = torch.randn(30, 6), torch.randn(30, 10)
    with pytest.raises(RuntimeError, match=r"h0 must have shape \[2, 10\], got \[3, 10\]"):
        O.gru_packed_fwd(torch.randn(5, 6), w_ih, None, w_hh, None, torch.zeros(3, 10), False, torch.tensor([3, 2]))