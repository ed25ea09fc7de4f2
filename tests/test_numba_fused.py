"""numba's fused inference entries (the contract's optional ``<family>_cell_fwd``, ``<family>_chunk_fwd`` and
``<family>_packed_fwd``, whose values and shared checks are in test_fused.py):
one kernel call a step with the input projection inside, taken by the modules' fast paths without autograd.
Values against torch.nn (the variants against the reference backend), fp64 and fp32, the fast path alone."""
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import fastrnn
from fastrnn import dispatch
from conftest import CPU_BACKENDS, TOL, backends_used, flat_outputs, trained_outputs

pytestmark = pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="numba is not installed here")

MAX_ROWS = 4
CASES = {"LSTM": {}, "LSTM-2L-bi": dict(num_layers=2, bidirectional=True), "LSTM-proj": dict(proj_size=5),
         "LSTM-peephole-coupled": dict(peephole=True, coupled_gates=True), "GRU-bi": dict(bidirectional=True),
         "GRU-3L-batch_first": dict(num_layers=3, batch_first=True), "RNN-relu-nobias": dict(nonlinearity="relu",
                                                                                            bias=False)}


def _pair(name, dtype):
    cls, kw = name.split("-")[0], CASES[name]
    torch.manual_seed(0)
    ours = getattr(fastrnn, cls)(6, 40, dtype=dtype, backend="numba", **kw)
    variant = kw.get("peephole") or kw.get("coupled_gates")
    ref = (getattr(fastrnn, cls)(6, 40, dtype=dtype, backend="reference", **kw) if variant
           else getattr(torch.nn, cls)(6, 40, dtype=dtype, **kw))
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_chunk_rows():
    nb = dispatch.get("numba")
    assert nb.CELL_ROWS == MAX_ROWS and nb.chunk_max_rows == math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("T,B", [(1, 1), (1, 4), (2, 2), (4, 1), (5, 1), (3, 7)])
@pytest.mark.parametrize("name", list(CASES))
def test_short_sequences(name, T, B, dtype, monkeypatch):
    """Every dense sequence in inference is one chunk call a layer-direction: up to MAX_ROWS rows one fused
    cell call a step, beyond them the sequence kernel on torch's input projection (no cell call); both
    equal torch.nn's module, with and without a state."""
    ours, ref = _pair(name, dtype)
    nb, fam = dispatch.get("numba"), name.split("-")[0].lower()
    cells = []
    cell = getattr(nb, f"{fam}_cell_fwd")
    monkeypatch.setattr(nb, f"{fam}_cell_fwd", lambda *a: cells.append(1) or cell(*a))
    x = torch.randn(B, T, 6, dtype=dtype) if ours.batch_first else torch.randn(T, B, 6, dtype=dtype)
    D = 2 if ours.bidirectional else 1
    P = getattr(ours, "proj_size", 0) or 40
    h0 = torch.randn(ours.num_layers * D, B, P, dtype=dtype)
    hx = (h0, torch.randn(ours.num_layers * D, B, 40, dtype=dtype)) if name.startswith("LSTM") else h0
    for state in (None, hx):
        with torch.no_grad():
            with dispatch.record_calls() as ran:
                got = flat_outputs(ours(x, state))
            want = flat_outputs(ref(x, state))
        assert ran == [(f"{fam}_chunk_fwd", "numba")] * (ours.num_layers * D)
        assert len(cells) == (T * ours.num_layers * D if T * B <= MAX_ROWS else 0)
        cells.clear()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=TOL[dtype]["out"], rtol=TOL[dtype]["out"])


def test_packed_op_state_check():
    """numba's message for a state of the wrong batch (the checks both fused backends share are in
    test_fused.py)."""
    nb = dispatch.get("numba")
    w_ih, w_hh = torch.randn(30, 6), torch.randn(30, 10)
    with pytest.raises(RuntimeError, match="gru_packed_fwd: shapes do not fit"):
        nb.gru_packed_fwd(torch.randn(5, 6), w_ih, None, w_hh, None, torch.zeros(3, 10), False, torch.tensor([3, 2]))


def test_sequence_entries_project_in_the_inputs_dtype_under_autocast():
    """The chunk and packed entries read their input projection by address as x's dtype: under CPU autocast
    (the ops are public; the modules turn autocast off themselves) it is still made in x's dtype, and a
    projection of another dtype or shape is refused before any kernel reads it."""
    nb = dispatch.get("numba")
    g = torch.Generator().manual_seed(0)
    w_ih, w_hh, h = torch.randn(12, 5, generator=g), torch.randn(12, 4, generator=g), torch.zeros(3, 4)
    x, lengths = torch.randn(6, 3, 5, generator=g), torch.tensor([6, 4, 1])
    rows = torch.randn(11, 5, generator=g)
    want = nb.gru_chunk_fwd(x, w_ih, None, w_hh, None, h, False)
    want_packed = nb.gru_packed_fwd(rows, w_ih, None, w_hh, None, h, False, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nb.gru_chunk_fwd(x, w_ih, None, w_hh, None, h, False)
        got_packed = nb.gru_packed_fwd(rows, w_ih, None, w_hh, None, h, False, lengths)
    for a, b in zip((*got, *got_packed), (*want, *want_packed)):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    like = np.empty(0, np.float32)
    for bad in (torch.randn(18, 12).bfloat16(), torch.randn(18, 9), torch.randn(12, 18).t()):
        with pytest.raises(RuntimeError, match="the input projection must be a contiguous"):
            nb._gru_rows(bad, 4, 4, like, [0, 0, 0], None, 6, 3, False)
    # the chunk entry checks x [T, B, I] itself (no address taken); a cell's x must still be 2-D
    with pytest.raises(RuntimeError, match="x and the state must be 2-D"):
        nb.gru_cell_fwd(x, w_ih, None, w_hh, None, h)


def test_the_chunk_path_alone(monkeypatch):
    """The fast path serves it: the module's general path is not reached."""
    ours, ref = _pair("GRU-bi", torch.float64)

    def general(*a):
        raise AssertionError("the general path ran")
    monkeypatch.setitem(ours.__dict__, "_forward", general)
    x = torch.randn(1, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        got, want = flat_outputs(ours(x)), flat_outputs(ref(x))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_bad_shapes_are_refused_not_read():
    """The kernels read unchecked: the host refuses what does not fit, RuntimeError naming the op."""
    nb = dispatch.get("numba")
    x, h = torch.randn(2, 5), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="gru_cell_fwd: shapes do not fit"):
        nb.gru_cell_fwd(x, torch.randn(12, 6), None, torch.randn(12, 4), None, h)
    with pytest.raises(RuntimeError, match="lstm_cell_fwd: every tensor must be float32 or float64, of one dtype"):
        nb.lstm_cell_fwd(x, torch.randn(16, 5), None, torch.randn(16, 4), None, None, None, h.double(), h, False)
    with pytest.raises(RuntimeError, match="w_hr must be"):
        nb.lstm_cell_fwd(x, torch.randn(16, 5), None, torch.randn(16, 3), None, None, None, torch.zeros(2, 3), h,
                         False)
    with pytest.raises(RuntimeError, match="x must be"):
        nb.rnn_chunk_fwd(x, torch.randn(4, 5), None, torch.randn(4, 4), None, h, False, "tanh")
    # a chunk past CELL_ROWS rows (the sequence kernel, which reads unchecked too) gets the cells' checks
    xs = torch.randn(3, 2, 5)
    with pytest.raises(RuntimeError, match="gru_chunk_fwd: shapes do not fit"):
        nb.gru_chunk_fwd(xs, torch.randn(12, 5), None, torch.randn(12, 4), None, torch.zeros(3, 4), False)
    with pytest.raises(RuntimeError, match="lstm_chunk_fwd: h is .B, 3. and c .B, 4., so w_hr must be"):
        nb.lstm_chunk_fwd(xs, torch.randn(16, 5), None, torch.randn(16, 3), None, None, None, torch.zeros(2, 3), h,
                          False, False)
    with pytest.raises(RuntimeError, match="rnn_chunk_fwd: unknown nonlinearity 'gelu'"):
        nb.rnn_chunk_fwd(xs, torch.randn(4, 5), None, torch.randn(4, 4), None, h, False, "gelu")
    with pytest.raises(RuntimeError, match="rnn_chunk_fwd: every tensor must be float32 or float64, of one dtype"):
        nb.rnn_chunk_fwd(xs, torch.randn(4, 5), None, torch.randn(4, 4).double(), None, h, False, "tanh")
    # the cells read their tensors by address: a tensor off the CPU, of another dtype or rank, is refused
    with pytest.raises(RuntimeError, match="rnn_cell_fwd: every tensor must be .* on the CPU"):
        nb.rnn_cell_fwd(x, torch.randn(4, 5, device="meta"), None, torch.randn(4, 4), None, h, "tanh")
    with pytest.raises(RuntimeError, match="rnn_cell_fwd: every tensor must be float32 or float64"):
        nb.rnn_cell_fwd(x.half(), torch.randn(4, 5).half(), None, torch.randn(4, 4).half(), None, h.half(), "tanh")
    with pytest.raises(RuntimeError, match="rnn_cell_fwd: x and the state must be 2-D"):
        nb.rnn_cell_fwd(x, torch.randn(4, 5), None, torch.randn(4, 4), None, h[0], "tanh")
    with pytest.raises(RuntimeError, match="gru_cell_fwd: shapes do not fit"):
        nb.gru_cell_fwd(x, torch.randn(12, 5), torch.randn(11), torch.randn(12, 4), None, h)


def test_cells_by_address_take_views_and_strided_tensors():
    """The fused cells read tensors by data address: a row of a larger tensor (an offset into its storage),
    a transposed weight (copied to a contiguous one first) and absent biases give torch's values."""
    nb = dispatch.get("numba")
    g = torch.Generator().manual_seed(3)
    xs, hs = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 6, generator=g)
    w_ih = torch.randn(5, 18, generator=g).t()  # [18, 5], not contiguous
    w_hh, b_hh = torch.randn(18, 6, generator=g), torch.randn(18, generator=g)
    assert not w_ih.is_contiguous() and xs[2].storage_offset() > 0
    torch.testing.assert_close(nb.gru_cell_fwd(xs[2], w_ih, None, w_hh, b_hh, hs[1]),
                               torch.gru_cell(xs[2], hs[1], w_ih, w_hh, None, b_hh), atol=1e-6, rtol=1e-5)
    w4, r4 = torch.randn(24, 5, generator=g), torch.randn(24, 6, generator=g)
    c = torch.randn(3, 6, generator=g)
    h_out, c_out = nb.lstm_cell_fwd(xs[3], w4, None, r4, None, None, None, hs[0], c, False)
    want = torch.lstm_cell(xs[3], (hs[0], c), w4, r4, None, None)
    torch.testing.assert_close(h_out, want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c_out, want[1], atol=1e-6, rtol=1e-5)
    # a tensor with the negative bit (its storage holds -x) and a ZeroTensor (no storage): their values
    neg, zero = torch._neg_view(-xs[1]), torch._efficientzerotensor((3, 6))
    assert neg.is_neg() and zero.data_ptr() == 0
    torch.testing.assert_close(nb.gru_cell_fwd(neg, w_ih, None, w_hh, b_hh, zero),
                               torch.gru_cell(xs[1], torch.zeros(3, 6), w_ih, w_hh, None, b_hh), atol=1e-6, rtol=1e-5)


def test_one_thread_runs_the_serial_twin(monkeypatch):
    """A call on one thread runs the kernel's serial twin (a prange over one part still opens a parallel
    region, ~2 us a step); a call split over threads the parallel kernel. Both give torch's values."""
    import numba
    from fastrnn.backends import numba as nb
    from fastrnn.backends.numba_kernels import rnn as nb_rnn
    assert nb._kernel(nb_rnn.rnn_fwd, 2) is nb_rnn.rnn_fwd
    twin = nb._kernel(nb_rnn.rnn_fwd, 1)
    assert twin is not nb_rnn.rnn_fwd and twin.py_func.__qualname__ == "rnn_fwd_one_thread"
    assert not twin.targetoptions.get("parallel") and nb_rnn.rnn_fwd.targetoptions["parallel"]
    # an entry that unpacks addresses and calls a parallel kernel: its twin calls that kernel's twin
    entry = nb._kernel(nb_rnn.rnn_seq_at, 1)
    assert entry.py_func.__globals__["rnn_fwd"] is twin and nb_rnn.rnn_seq_at.py_func.__globals__["rnn_fwd"] is \
        nb_rnn.rnn_fwd
    torch.manual_seed(0)
    ours, ref = fastrnn.RNN(6, 40, backend="numba"), torch.nn.RNN(6, 40)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(7, 3, 6)
    ran = []
    real = nb._kernel
    monkeypatch.setattr(nb, "_kernel", lambda fn, parts: ran.append((fn.py_func.__name__, parts)) or real(fn, parts))
    for min_macs, parts in ((1 << 30, 1), (0, 2)):
        threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
        for grad, entry in ((False, "rnn_seq_at"), (True, "rnn_fwd")):  # inference, training
            old = nb.BACKEND.set_parallel_min_macs(min_macs)
            try:
                with torch.set_grad_enabled(grad):
                    got, want = ours(x), ref(x)
            finally:
                nb.BACKEND.set_parallel_min_macs(old)
            assert ran[-1] == (entry, 1 if parts == 1 else threads)
            for a, b in zip(flat_outputs(got), flat_outputs(want)):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_no_serial_twin_holds_parallel_code():
    """A twin replaces every parallel kernel it reaches, through helpers too (``panel.input_rows`` calls
    ``panel.project``): code with a parallel region that numba's cache loads crashed the process where
    numba's threading layer had not started (a batch-2 LSTM's inference entry on one thread). Every kernel
    of the backend's modules that reaches a parallel one: its twin reaches none (numba shows no compiled code
    that its cache loaded, so the check is on the calls)."""
    import numba
    from fastrnn.backends.numba_kernels import common, gru, gru_options, lstm, lstm_options, panel, rnn
    kernels = {v for m in (gru, gru_options, lstm, lstm_options, panel, rnn) for v in vars(m).values()
               if isinstance(v, numba.core.registry.CPUDispatcher) and common._reaches_parallel(v)}
    assert {lstm.lstm_seq_at, gru.gru_seq_at, rnn.rnn_seq_at, panel.input_rows, panel.project} <= kernels
    for k in kernels:
        assert not common._reaches_parallel(common.serial_twin(k)), k.py_func.__name__
    twin = common.serial_twin(rnn.rnn_seq_at)
    assert twin.py_func.__globals__["input_rows"] is common.serial_twin(panel.input_rows)
    # compiled into an empty cache in a process of its own (numba shows no code that its cache loaded, callees
    # included): the helper's parallel region is in the kernel's code and not in its twin's
    script = (
        "import numpy as np\n"
        "from fastrnn.backends.numba_kernels import common, panel\n"
        "x, w, like = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32), np.zeros(1, np.float32)\n"
        "for fn in (panel.input_rows, common.serial_twin(panel.input_rows)):\n"
        "    fn(x.ctypes.data, w.ctypes.data, 0, 3, 4, 5, 2, like)\n"
        "    print(fn.py_func.__name__, 'numba_parallel_for' in fn.inspect_llvm(fn.signatures[0]))\n")
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, NUMBA_CACHE_DIR=cache), check=True).stdout.split()
    assert out == ["input_rows", "True", "input_rows_one_thread", "False"]
    torch.manual_seed(0)
    ours, ref = fastrnn.RNN(4, 4, backend="numba"), torch.nn.RNN(4, 4)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-6, rtol=1e-5)
    assert twin.signatures  # the call ran the twin


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="a split by rows needs two of torch's threads")
@pytest.mark.parametrize("B", [3, 17])
@pytest.mark.parametrize("name", ["LSTM", "LSTM-2L-bi", "LSTM-proj", "LSTM-peephole-coupled", "GRU-bi",
                                  "GRU-3L-batch_first", "RNN-relu-nobias"])
def test_a_dense_sequence_split_by_rows(name, B, monkeypatch):
    """In inference a dense sequence split by batch rows (forced here: numba_kernels/*_fwd_rows, each
    thread every unit of its block of rows, no wait a step; 3 rows over two threads: 2 / 1) equals
    torch.nn's module (the reference backend's for the variants), with and without a state, in float64;
    every layer-direction ran split so."""
    from fastrnn.backends import numba as nb
    ours, ref = _pair(name, torch.float64)
    monkeypatch.setattr(nb, "ROW_SPLIT", 1)
    x = torch.randn(B, 11, 6, dtype=torch.float64) if ours.batch_first else torch.randn(11, B, 6, dtype=torch.float64)
    D = 2 if ours.bidirectional else 1
    P = getattr(ours, "proj_size", 0) or 40
    h0 = torch.randn(ours.num_layers * D, B, P, dtype=torch.float64)
    hx = (h0, torch.randn(ours.num_layers * D, B, 40, dtype=torch.float64)) if name.startswith("LSTM") else h0
    old = nb.BACKEND.set_parallel_min_macs(0)
    try:
        before = nb.ROW_CALLS
        with torch.no_grad():
            got = [flat_outputs(ours(x, state)) for state in (None, hx)]
        by_rows = nb.ROW_CALLS - before
    finally:
        nb.BACKEND.set_parallel_min_macs(old)
    with torch.no_grad():
        want = [flat_outputs(ref(x, state)) for state in (None, hx)]
    assert by_rows == 2 * ours.num_layers * D
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="a split by rows needs two of torch's threads")
@pytest.mark.parametrize("name", ["LSTM", "LSTM-2L-bi", "LSTM-proj", "LSTM-peephole-coupled", "GRU-bi",
                                  "RNN-relu-nobias"])
def test_a_training_call_split_by_rows(name, monkeypatch):
    """A training call split by rows (forced), its saving forward (numba_kernels/*_fwd_rows) and its
    backward (*_bwd_rows; the peephole weights' backward keeps the units: their gradients sum over rows):
    outputs and every gradient equal torch.nn's (the reference backend's for the variants) in float64, with
    a given state; 17 rows (9 / 8)."""
    from fastrnn.backends import numba as nb
    ours, ref = _pair(name, torch.float64)
    monkeypatch.setattr(nb, "ROW_SPLIT", 1)
    D = 2 if ours.bidirectional else 1
    P = getattr(ours, "proj_size", 0) or 40
    x = torch.randn(13, 17, 6, dtype=torch.float64)
    h0 = torch.randn(ours.num_layers * D, 17, P, dtype=torch.float64)
    hx = (h0, torch.randn(ours.num_layers * D, 17, 40, dtype=torch.float64)) if name.startswith("LSTM") else h0

    def run(m):
        xg = x.clone().requires_grad_(True)
        out, st = m(xg, hx)
        st = st if isinstance(st, tuple) else (st,)
        (out.pow(2).sum() + sum((s * (k + 2)).sum() for k, s in enumerate(st))).backward()
        return [out, *st, xg.grad, *(p.grad for p in m.parameters())]

    ran = []
    real = nb._kernel
    monkeypatch.setattr(nb, "_kernel", lambda fn, parts: ran.append(fn.py_func.__name__) or real(fn, parts))
    old = nb.BACKEND.set_parallel_min_macs(0)
    try:
        before = nb.ROW_CALLS
        got = run(ours)
        by_rows = nb.ROW_CALLS - before
    finally:
        nb.BACKEND.set_parallel_min_macs(old)
    want = run(ref)
    family = name.split("-")[0].lower()
    peephole = "peephole" in name
    assert by_rows == ours.num_layers * D * (1 if peephole else 2)
    # which kernels ran: every layer-direction's forward by rows, its backward by rows (by units with peepholes)
    assert ran.count(f"{family}_fwd_rows") == ours.num_layers * D
    assert ran.count(f"{family}_bwd" if peephole else f"{family}_bwd_rows") == ours.num_layers * D
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="a split by rows needs two of torch's threads")
def test_the_split_by_rows_takes_dense_batches_of_whole_blocks():
    """The rule (numba.py, ``_row_parts``): a dense sequence whose team would split, from 8 rows a thread,
    with its recurrent weights within 3/4 of a core's L2 (H64: 64 KiB for the LSTM); not 15 rows, not a
    packed sequence; in training both the forward and the backward."""
    from torch.nn.utils.rnn import pack_padded_sequence
    from fastrnn.backends import numba as nb
    torch.manual_seed(0)
    m, x = fastrnn.LSTM(64, 64, backend="numba"), torch.randn(10, 64, 64)

    def by_rows(inp):
        before = nb.ROW_CALLS
        with torch.no_grad():
            m(inp)
        return nb.ROW_CALLS - before

    assert nb.ROW_SPLIT == -1
    assert by_rows(x) == 1 and by_rows(x[:, :16]) == 1
    assert by_rows(x[:, :15]) == 0
    assert by_rows(pack_padded_sequence(x, torch.tensor([10] * 32 + [6] * 32))) == 0
    # a training call: its saving forward and its backward, at 64 rows and at 16 (2^18 multiply-adds a step:
    # the backward by units would run on one thread, by rows it opens one region a call as the forward)
    for rows in (64, 16):
        before = nb.ROW_CALLS
        m(x[:, :rows].clone().requires_grad_(True))[0].sum().backward()
        assert nb.ROW_CALLS - before == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n,K,N,c0,c1", [(1, 64, 256, 0, 256), (5, 13, 37, 0, 37), (7, 50, 200, 8, 200),
                                         (100, 64, 256, 0, 256), (3, 1, 17, 2, 9), (0, 4, 8, 0, 8),
                                         (9, 300, 70, 0, 70)])
def test_the_panel_product(n, K, N, c0, c1, dtype):
    """panel.mm_panels (explicit vectors on W^T packed in panels): columns c0..c1 of a @ W^T (+ bias) for row
    counts around its block of 4, column counts around its group of panels, float32 (16 lanes) and float64
    (8); nothing written outside those columns."""
    from fastrnn.backends.numba_kernels import panel
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((n, K)).astype(dtype), rng.standard_normal((N, K)).astype(dtype)
    L = panel.lanes_of(w)
    assert L == 64 // np.dtype(dtype).itemsize
    wp = np.empty((panel.panels(c1 - c0, L), K, L), dtype)
    panel.pack(w, c0, c1, wp)
    for bias in (rng.standard_normal(N).astype(dtype), np.empty(0, dtype)):
        out = np.full((n, N + 3), 7, dtype)
        panel.mm_panels(a, n, wp, 0, bias, len(bias) > 0, out, c0, c1 - c0, panel.scratch(w))
        want = a.astype(np.float64) @ w[c0:c1].T.astype(np.float64) + (bias[c0:c1] if len(bias) else 0)
        np.testing.assert_allclose(out[:, c0:c1], want, atol=1e-5 * K if dtype == np.float32 else 1e-12 * K)
        assert (out[:, :c0] == 7).all() and (out[:, c1:] == 7).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_the_panels_start_on_a_cache_line(dtype):
    """Every panel the kernels pack (W_hh by gate, a backward's rows, a projection's part) and the products'
    scratch start on a 64-byte line, so that no 64-byte vector load of a panel straddles two lines (numba's
    np.empty aligns to 32 bytes: 97 of 120 such arrays started half a line off; NOTES.md, thirty-fourth
    session); the packed values are W's."""
    from fastrnn.backends.numba_kernels import panel
    rng = np.random.default_rng(3)
    for H, K in ((64, 64), (40, 33), (256, 17)):
        w = rng.standard_normal((3 * H, K)).astype(dtype)
        L = panel.lanes_of(w)
        gates = panel.pack_gates(w, 3, H)
        rows = panel.row_panels(w, 8, 4)
        for wp in (gates, rows, panel.scratch(w)):
            assert wp.ctypes.data % 64 == 0
        np.testing.assert_array_equal(rows[0, :, :min(L, 3 * H)], w[:L].T)
        np.testing.assert_array_equal(gates[1, 0, :, :min(L, H)], w[H:H + min(L, H)].T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("K,N,j0,j1", [(64, 256, 0, 256), (40, 70, 3, 70), (300, 50, 16, 48), (7, 33, 0, 33),
                                       (16, 16, 0, 16), (1024, 40, 8, 40)])
def test_the_one_row_product(K, N, j0, j1, dtype):
    """common.mm_nt at one row (a cell's step and a backward's at batch 1), = and +=, against float64 numpy, on
    C-contiguous arrays and on a strided w, K and the columns around the 4-row blocks; nothing written outside
    columns [j0, j1)."""
    from fastrnn.backends.numba_kernels import common
    rng = np.random.default_rng(2)
    a, w = rng.standard_normal((1, K)).astype(dtype), rng.standard_normal((N, K)).astype(dtype)
    want = a.astype(np.float64) @ w[j0:j1].T.astype(np.float64)
    tol = dict(rtol=1e-5, atol=1e-5 * K) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12 * K)
    wide = np.zeros((N, 2 * K), dtype)
    wide[:, ::2] = w
    for ww in (w, wide[:, ::2]):
        for acc in (False, True):
            out = rng.standard_normal((1, N + 3)).astype(dtype)
            before = out.copy()
            common.mm_nt(a, 1, ww, out, j0, j1, acc)
            np.testing.assert_allclose(out[:, j0:j1], want + (before[:, j0:j1] if acc else 0), **tol)
            assert (out[:, :j0] == before[:, :j0]).all() and (out[:, j1:] == before[:, j1:]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("acc", [False, True])
def test_a_backward_steps_products_on_panels(acc, dtype):
    """panel.back_products on panel.row_panels (a backward step's product, numba_kernels/*_bwd): rows [r0, r0 +
    n) of out, columns [lo, hi), = or += (``acc``: the GRU's) n rows of a from an element offset @ w[lo:hi]^T,
    against float64 numpy, around the 4-row blocks and with a last part panel (hi - lo not a multiple of the
    lanes); with panels and with mm_nt (row_panels under min_rows); nothing written outside the block."""
    from fastrnn.backends.numba_kernels import panel
    rng = np.random.default_rng(1)
    K, N = 72, 57
    a, w = rng.standard_normal((40, K)).astype(dtype), rng.standard_normal((N, K)).astype(dtype)
    for min_rows, panels in ((4, True), (100, False)):
        wp = panel.row_panels(w, 9, min_rows)
        assert (wp.shape[0] > 0) == panels and (not panels or wp.shape == (panel.panels(N, wp.shape[2]), K,
                                                                             wp.shape[2]))
        for n, t, r0, lo, hi in ((9, 3, 2, 16, 57), (4, 0, 0, 0, 32), (1, 7, 5, 32, 48), (7, 2, 1, 0, 57)):
            out = rng.standard_normal((12, N + 2)).astype(dtype)
            before = out.copy()
            panel.back_products(a, t * K, n, w, wp, out, r0, lo, hi, acc, panel.scratch(w))
            want = a[t:t + n].astype(np.float64) @ w[lo:hi].T.astype(np.float64)
            if acc:
                want += before[r0:r0 + n, lo:hi]
            np.testing.assert_allclose(out[r0:r0 + n, lo:hi], want, atol=1e-4 if dtype == np.float32 else 1e-11)
            mask = np.ones(out.shape, bool)
            mask[r0:r0 + n, lo:hi] = False
            assert (out[mask] == before[mask]).all(), (n, t, r0, lo, hi)


@pytest.mark.parametrize("split", ["units", "rows"])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_the_backward_runs_its_steps_on_panels(name, split, monkeypatch):
    """In training, the numba backward's step products on W_hh^T's panels (from PANEL_MIN_ROWS rows a part,
    forced over two parts, by units or by rows) give torch.nn's outputs and gradients, float32 and float64;
    at H = 40 the parts' last panel is a part one."""
    from fastrnn.backends import numba as nb
    from fastrnn.backends.numba_kernels import panel
    if torch.get_num_threads() < 2:
        pytest.skip("two parts need two of torch's threads")
    made = []
    real = panel.row_panels.py_func
    monkeypatch.setattr(nb, "ROW_SPLIT", 1 if split == "rows" else 0)
    old = nb.BACKEND.set_parallel_min_macs(0)
    try:
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(0)
            ours, ref = getattr(fastrnn, name)(6, 40, backend="numba"), getattr(torch.nn, name)(6, 40)
            ours, ref = ours.to(dtype), ref.to(dtype)
            ref.load_state_dict(ours.state_dict())
            x = torch.randn(9, 16, 6, dtype=dtype)
            with dispatch.record_calls() as ran:
                got = trained_outputs(ours, x)
            assert backends_used(ran) == {"numba"}
            for u, v in zip(got, trained_outputs(ref, x), strict=True):
                torch.testing.assert_close(u, v, **({} if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)))
            w = ours.weight_hh_l0.detach().t().contiguous().numpy()
            rows = 8 if split == "rows" else 16
            assert real(w, rows, nb.PANEL_MIN_ROWS).shape[0] > 0  # the rule the kernels ran takes panels here
    finally:
        nb.BACKEND.set_parallel_min_macs(old)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="a team needs two of torch's threads")
@pytest.mark.parametrize("name", ["LSTM-proj", "LSTM-peephole-coupled", "LSTM-2L-bi", "GRU-bi", "RNN-relu-nobias"])
def test_the_backward_splits_by_units_over_a_team(name, monkeypatch):
    """Training over a team of two parts split by units (the split by rows off, every threshold 0): the backward
    kernels' phases (one a step; two with a projection, by columns of P then units of H; the peephole weights'
    gradients by units), dense and packed with unsorted lengths, float32 and float64: outputs and every gradient
    equal torch.nn's (the reference backend's for the variants), and numba ran."""
    from fastrnn.backends import numba as nb
    monkeypatch.setattr(nb, "ROW_SPLIT", 0)
    old = nb.BACKEND.set_parallel_min_macs(0)
    try:
        for dtype in (torch.float32, torch.float64):
            ours, ref = _pair(name, dtype)
            x = torch.randn(9, 5, 6, dtype=dtype)
            if ours.batch_first:
                x = x.transpose(0, 1).contiguous()
            with dispatch.record_calls() as ran:
                got = trained_outputs(ours, x)
            assert "numba" in backends_used(ran) and backends_used(ran) <= {"numba"}
            for a, b in zip(got, trained_outputs(ref, x), strict=True):
                torch.testing.assert_close(a, b, atol=TOL[dtype]["grad"], rtol=TOL[dtype]["grad"])
            lengths = torch.tensor([9, 4, 7, 1, 3])

            def packed_grads(m):
                xg = x.clone().requires_grad_()
                inp = torch.nn.utils.rnn.pack_padded_sequence(xg.transpose(0, 1) if m.batch_first else xg, lengths,
                                                              batch_first=m.batch_first, enforce_sorted=False)
                out = m(inp)
                y, st = out[0].data, out[1]
                loss = y.pow(2).sum() + sum((s * (k + 2)).sum() for k, s in enumerate(st if isinstance(st, tuple)
                                                                                      else (st,)))
                return [y, *torch.autograd.grad(loss, [xg, *m.parameters()])]
            with dispatch.record_calls() as ran:
                got = packed_grads(ours)
            assert "numba" in backends_used(ran) and backends_used(ran) <= {"numba"}
            for a, b in zip(got, packed_grads(ref), strict=True):
                torch.testing.assert_close(a, b, atol=TOL[dtype]["grad"], rtol=TOL[dtype]["grad"])
    finally:
        nb.BACKEND.set_parallel_min_macs(old)


@pytest.mark.parametrize("threads", [1, 2], ids=["one-thread", "team"])
@pytest.mark.parametrize("name", ["LSTM", "LSTM-2L-bi", "LSTM-proj", "LSTM-peephole-coupled", "GRU-bi",
                                  "GRU-3L-batch_first", "RNN-relu-nobias"])
def test_the_sequence_entries_project_their_input(name, threads, monkeypatch):
    """A chunk or packed call beyond MAX_ROWS rows projects its input inside the sequence entry
    (panel.input_rows: numba's threads, not torch's product), on one thread and split over a team (forced),
    dense and packed, float32 and float64, with torch.nn's values (the reference backend's for the
    variants); an input that is not a contiguous matrix of the kernel's dtype goes through torch's product."""
    from fastrnn.backends import numba as nb
    if threads > torch.get_num_threads():
        pytest.skip("a team needs two of torch's threads")
    monkeypatch.setattr(nb, "FUSE_PROJECTION", -1)
    old = nb.BACKEND.set_parallel_min_macs(0 if threads > 1 else 1 << 40)
    try:
        for dtype in (torch.float32, torch.float64):
            ours, ref = _pair(name, dtype)
            D = 2 if ours.bidirectional else 1
            x = torch.randn(9, 5, 6, dtype=dtype)
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, [9, 7, 7, 3, 1], enforce_sorted=False)
            for inp in (x.transpose(0, 1) if ours.batch_first else x, packed):
                before = nb.FUSED_CALLS
                with torch.no_grad():
                    with dispatch.record_calls() as ran:
                        got = ours(inp)
                    want = ref(inp)
                assert nb.FUSED_CALLS - before == ours.num_layers * D
                assert {b for _, b in ran} == {"numba"}
                if isinstance(inp, torch.nn.utils.rnn.PackedSequence):
                    got, want = (got[0].data, got[1]), (want[0].data, want[1])
                for a, b in zip(flat_outputs(got), flat_outputs(want)):
                    torch.testing.assert_close(a, b, atol=TOL[dtype]["out"], rtol=TOL[dtype]["out"])
        # a strided input: torch's product (the modules hand the ops contiguous inputs; the op alone here)
        nbk = dispatch.get("numba")
        xs = torch.randn(9, 5, 12)[..., ::2]
        w_ih, b_ih, w_hh, b_hh = (0.15 * torch.randn(*s) for s in ((120, 6), (120,), (120, 40), (120,)))
        before = nb.FUSED_CALLS
        y, h = nbk.gru_chunk_fwd(xs, w_ih, b_ih, w_hh, b_hh, torch.zeros(5, 40), False)
        assert nb.FUSED_CALLS == before
        y2, h2 = nbk.gru_chunk_fwd(xs.contiguous(), w_ih, b_ih, w_hh, b_hh, torch.zeros(5, 40), False)
        assert nb.FUSED_CALLS == before + 1
        torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    finally:
        nb.BACKEND.set_parallel_min_macs(old)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("G,H,lo,hi", [(4, 136, 80, 136), (4, 136, 0, 80), (3, 200, 112, 200), (1, 64, 16, 48)])
def test_a_parts_gate_products_on_panels(G, H, lo, hi, dtype):
    """panel.gate_products for the units [lo, hi) of a part (lo a multiple of 16, as common.split makes them):
    each gate's columns from the part's own panels of pack_gates' layout (and by mm_nt), into the step's rows
    of an array laid out as rows (from row 2 here), the float64 product's values, nothing else written; at 1-3
    rows (the row kernels, every gate in one call) and at 5 (a gate a call)."""
    from fastrnn.backends.numba_kernels import panel
    rng = np.random.default_rng(1)
    w, src = rng.standard_normal((G * H, 40)).astype(dtype), rng.standard_normal((6, 40)).astype(dtype)
    wp = panel.pack_gates(w, G, H)
    cols = [g * H + u for g in range(G) for u in range(lo, hi)]
    for n in (1, 2, 3, 5):  # below MR = 4 rows every gate in one call a panel (panel.row_gate_products)
        want = src[:n].astype(np.float64) @ w[cols].astype(np.float64).T  # the float64 product
        for panels in (wp, panel.no_panels(w)):  # and mm_nt's, the same way
            got = np.full((9, G * H), 7, dtype)
            panel.gate_products(src, n, w, panels, got, 2, G, H, lo, hi, panel.scratch(w))
            np.testing.assert_allclose(got[2:2 + n, cols], want, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                       atol=1e-4 if dtype == np.float32 else 1e-12)
            assert (np.delete(got, cols, axis=1) == 7).all() and (got[:2] == 7).all() and (got[2 + n:] == 7).all()


@pytest.mark.parametrize("threads", [1, 2], ids=["one-thread", "team"])
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_steps_of_a_few_rows_run_on_the_row_kernels(cls, threads):
    """At 1-3 rows a step the sequence forwards take W_hh's panels (panel.step_panels says so, whatever the split, K
    up to PANEL_MAX_K) and run each panel of every gate in one call (panel.row_gate_products): torch.nn's outputs
    and gradients, float32 and float64, on one thread and over a team, at H=40 (a part panel at the end) and H=80
    with a packed sequence whose last steps have one or two rows; and at K = 300, past PANEL_MAX_K with AVX-512 (no
    limit without it), at 2 and 5 rows."""
    from fastrnn.backends import numba as nb
    from fastrnn.backends.numba_kernels import panel
    if threads > torch.get_num_threads():
        pytest.skip("a team needs two of torch's threads")
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[cls]
    like = np.empty(0, np.float32)
    for B in (1, 2, 3):
        for parts in (1, 2):
            assert panel.step_panels(np.zeros((G * 40, 40), np.float32), G, 40, B, 2, like, nb.PANEL_MIN_ROWS,
                                     parts, False).shape[0] == G
    assert panel.step_panels(np.zeros((G * 40, 40), np.float32), G, 40, 1, 2, like, 4, 1, False).shape[0] == 0
    # K past PANEL_MAX_K (256 with AVX-512; no limit without it): mm_nt
    wide = panel.step_panels(np.zeros((G * 300, 300), np.float32), G, 300, 1, 2, like, 1, 1, False).shape[0]
    assert wide == (0 if panel.NV > 1 else G)
    old = nb.BACKEND.set_parallel_min_macs(0 if threads > 1 else 1 << 40)
    try:
        for dtype in (torch.float32, torch.float64):
            for H, B in ((40, 1), (40, 3), (80, 2), (80, 1), (300, 2), (300, 5)):
                torch.manual_seed(0)
                ours = getattr(fastrnn, cls)(8, H, dtype=dtype, backend="numba")
                ref = getattr(torch.nn, cls)(8, H, dtype=dtype)
                ref.load_state_dict(ours.state_dict())
                x = torch.randn(7, B, 8, dtype=dtype, requires_grad=True)
                for packed in (False, True) if B == 3 else (False,):
                    def make():
                        return torch.nn.utils.rnn.pack_padded_sequence(x, [7, 5, 2]) if packed else x
                    with dispatch.record_calls() as ran:
                        got = ours(make())
                    assert {b for _, b in ran} == {"numba"}
                    want = ref(make())
                    inp = make()
                    if isinstance(inp, torch.nn.utils.rnn.PackedSequence):
                        got, want = (got[0].data, got[1]), (want[0].data, want[1])
                    for a, b in zip(flat_outputs(got), flat_outputs(want)):
                        torch.testing.assert_close(a, b, atol=TOL[dtype]["out"], rtol=TOL[dtype]["out"])
                    g_ours = torch.autograd.grad(flat_outputs(got)[0].sum(), [x, *ours.parameters()])
                    g_ref = torch.autograd.grad(flat_outputs(want)[0].sum(), [x, *ref.parameters()])
                    for a, b in zip(g_ours, g_ref):
                        torch.testing.assert_close(a, b, atol=TOL[dtype]["grad"], rtol=TOL[dtype]["grad"])
                    with torch.no_grad():
                        with dispatch.record_calls() as ran:
                            got = ours(inp)
                        assert {b for _, b in ran} == {"numba"}
                        want = ref(inp)
                    if isinstance(inp, torch.nn.utils.rnn.PackedSequence):
                        got, want = (got[0].data, got[1]), (want[0].data, want[1])
                    for a, b in zip(flat_outputs(got), flat_outputs(want)):
                        torch.testing.assert_close(a, b, atol=TOL[dtype]["out"], rtol=TOL[dtype]["out"])
    finally:
        nb.BACKEND.set_parallel_min_macs(old)


def test_vec_is_the_slice():
    """common.vec: a row's elements [start, start + m) as the slice has them, written through to the array, for a
    C-contiguous 2-D or 1-D array (a view without an owner) and for a strided one (the slice itself)."""
    from fastrnn.backends.numba_kernels.common import JIT, vec
    import numba

    @numba.njit(**dict(JIT, cache=False))
    def take(a, row, start, m):
        v = vec(a, row, start, m)
        out = np.empty(m, a.dtype)
        for u in range(m):
            out[u] = v[u]
            v[u] = -1.0
        return out

    a = np.arange(120, dtype=np.float32).reshape(6, 20)
    for arr, row, want in ((a.copy(), 2, a[2, 3:7]), (a.copy()[:, ::2], 4, a[4, ::2][3:7]),
                           (a[1].copy(), 0, a[1, 3:7])):
        np.testing.assert_array_equal(take(arr, row, 3, 4), want)
        assert (arr[row, 3:7] if arr.ndim == 2 else arr[3:7]).tolist() == [-1.0] * 4


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="a team needs two of torch's threads")
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_a_team_split_by_units_runs_its_steps_on_panels(cls, monkeypatch):
    """At H=136, 6 rows a step, the sequence forwards split by units (two parts: 80 and 56 units) run their steps'
    products on W_hh's panels (panel.step_panels says so for these arguments), inference and training, float32
    and float64, with torch.nn's outputs and gradients."""
    from fastrnn.backends import numba as nb
    from fastrnn.backends.numba_kernels import panel
    monkeypatch.setattr(nb, "ROW_SPLIT", 0)
    like = np.empty(0, np.float32)
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[cls]
    assert panel.step_panels(np.zeros((G * 136, 136), np.float32), G, 136, 6, 7, like, nb.PANEL_MIN_ROWS, 2,
                             False).shape[0] == G
    old = nb.BACKEND.set_parallel_min_macs(0)
    try:
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(0)
            ours = getattr(fastrnn, cls)(8, 136, dtype=dtype, backend="numba")
            ref = getattr(torch.nn, cls)(8, 136, dtype=dtype)
            ref.load_state_dict(ours.state_dict())
            x = torch.randn(7, 6, 8, dtype=dtype, requires_grad=True)
            with torch.no_grad():
                with dispatch.record_calls() as ran:
                    got = ours(x)
                assert ran == [(f"{cls.lower()}_chunk_fwd", "numba")]
                for a, b in zip(flat_outputs(got), flat_outputs(ref(x))):
                    torch.testing.assert_close(a, b, atol=TOL[dtype]["out"], rtol=TOL[dtype]["out"])
            with dispatch.record_calls() as ran:
                got = ours(x)
            assert {b for _, b in ran} == {"numba"}
            want = ref(x)
            for a, b in zip(flat_outputs(got), flat_outputs(want)):
                torch.testing.assert_close(a, b, atol=TOL[dtype]["out"], rtol=TOL[dtype]["out"])
            g_ours = torch.autograd.grad(got[0].sum(), [x, *ours.parameters()])
            g_ref = torch.autograd.grad(want[0].sum(), [x, *ref.parameters()])
            for a, b in zip(g_ours, g_ref):
                torch.testing.assert_close(a, b, atol=TOL[dtype]["grad"], rtol=TOL[dtype]["grad"])
    finally:
        nb.BACKEND.set_parallel_min_macs(old)


def test_a_chunk_call_takes_an_input_that_no_view_flattens():
    """The backend's chunk entry alone, on a [T, B, I] input whose steps cannot be viewed as rows (batch-first
    transposed): its rows are copied and projected inside, torch.nn's GRU values."""
    nbk = dispatch.get("numba")
    torch.manual_seed(0)
    ref = torch.nn.GRU(6, 40)
    xb = torch.randn(5, 9, 6)  # [B, T, I]
    x = xb.transpose(0, 1)
    assert not x.is_contiguous()
    w = [ref.weight_ih_l0.detach(), ref.bias_ih_l0.detach(), ref.weight_hh_l0.detach(), ref.bias_hh_l0.detach()]
    y, h = nbk.gru_chunk_fwd(x, *w, torch.zeros(5, 40), False)
    with torch.no_grad():
        want, h_want = ref(x)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("rows", [1100, 700, 40])  # 700: from DNN_MIN_ROWS (512), with 2^21 multiply-adds
def test_dnn_mm_is_the_product(ta, tb, rows, monkeypatch):
    """``_common.dnn_mm``, the numba backend's ``mm``: A' @ B' (+ bias) against the float64 product for each
    layout, through oneDNN from DNN_MIN_ROWS rows of ``a`` (counted; the CPU rule forced on, so that it runs
    wherever torch has oneDNN), else torch's; float64 always torch's, and oneDNN turned off by torch's flag
    torch's too."""
    from fastrnn.backends import _common
    calls = []
    monkeypatch.setattr(_common, "_DNN_VENDOR", True)
    if _common._DNN_LINEAR is not None:
        real = _common._DNN_LINEAR
        monkeypatch.setattr(_common, "_DNN_LINEAR", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    M, K, N = (72, rows, 48) if ta else (rows, 48, 72)  # rows: a's, the product's rows or (ta) its long K
    A, B = torch.randn(M, K), torch.randn(K, N)
    a = A.t().contiguous() if ta else A
    b = B.t().contiguous() if tb else B
    for bias in (None, torch.randn(N)) if not ta else (None,):
        want = A.double() @ B.double() + (0 if bias is None else bias.double())
        got = _common.dnn_mm(a, ta, b, tb, bias)
        assert got.shape == (M, N) and got.is_contiguous() and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
        got64 = _common.dnn_mm(a.double(), ta, b.double(), tb, None if bias is None else bias.double())
        torch.testing.assert_close(got64, want, atol=1e-10, rtol=1e-10)
    dnn = _common._DNN_LINEAR is not None and rows >= _common.DNN_MIN_ROWS
    assert len(calls) == ((1 if ta else 2) if dnn else 0)
    with torch.backends.mkldnn.flags(enabled=False):
        torch.testing.assert_close(_common.dnn_mm(a, ta, b, tb, None).double(), A.double() @ B.double(),
                                   atol=1e-4, rtol=1e-4)
    assert len(calls) == ((1 if ta else 2) if dnn else 0)


@pytest.mark.skipif(not getattr(__import__("fastrnn.backends.numba", fromlist=["x"]).NumbaBackend, "mm", None),
                    reason="the numba backend has no mm here (an Intel CPU, or torch without oneDNN)")
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_numba_training_runs_its_products_through_mm(name, monkeypatch):
    """In training the numba backend's input projection (its xw from 1 MiB), its two gradients and dW_hh run
    through its ``mm`` (oneDNN's product from DNN_MIN_ROWS rows, ``_mm``): the outputs and every gradient equal
    torch.nn's."""
    from fastrnn.backends import _common
    from fastrnn.backends import numba as nb
    calls = []
    real = _common._DNN_LINEAR
    monkeypatch.setattr(_common, "_DNN_LINEAR", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    ours, ref = getattr(fastrnn, name)(24, 64, backend="numba"), getattr(torch.nn, name)(24, 64)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(256, 16, 24)
    with dispatch.record_calls() as ran:
        got = trained_outputs(ours, x)
    assert backends_used(ran) == {"numba"}
    assert len(calls) == 4  # the projection, its dx and dW_ih, and dW_hh
    for a, b in zip(got, trained_outputs(ref, x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert nb.NumbaBackend.mm is nb._mm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("M,K,N", [(100, 256, 1024), (37, 65, 129), (300, 100, 48), (100, 1024, 256)])
def test_the_backends_product_on_panels(M, K, N, dtype, monkeypatch):
    """The numba backend's ``mm`` below DNN_MIN_ROWS rows of ``a`` (training products at T x B < 512: the panels'
    product on numba's threads) in its three forms, a @ bᵀ + bias, a @ b and aᵀ @ b, against float64 torch;
    a part panel at the end (N not a multiple of 16), odd K; the result contiguous, and the panel path taken."""
    from fastrnn.backends import _common
    from fastrnn.backends import numba as nb
    if nb.NumbaBackend.mm is None:
        pytest.skip("the numba backend has no product of its own on this CPU (not AMD, or no oneDNN)")
    monkeypatch.setattr(_common, "DNN_MIN_MACS", 1)  # every size here through the panels
    torch.manual_seed(3)
    a, w, bias = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
    g = torch.randn(M, N, dtype=dtype)
    d = torch.float64
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    before = nb.PANEL_MM_CALLS
    got = [nb.BACKEND.mm(a, False, w, True, bias), nb.BACKEND.mm(a, False, w.t().contiguous(), False, None),
           nb.BACKEND.mm(g, True, a, False, None)]
    want = [torch.addmm(bias.to(d), a.to(d), w.to(d).t()), a.to(d) @ w.to(d).t(), g.to(d).t() @ a.to(d)]
    assert nb.PANEL_MM_CALLS == before + 3
    for x, y in zip(got, want):
        assert x.is_contiguous() and x.dtype == dtype
        torch.testing.assert_close(x.to(d), y, **tol)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_training_products_on_panels(name, dtype, monkeypatch):
    """A training call whose products (the input projection, its two gradients and dW_hh) run on the panels
    (the thresholds lowered so that a small call takes them): outputs and every gradient equal torch.nn's."""
    from fastrnn.backends import _common
    from fastrnn.backends import numba as nb
    if nb.NumbaBackend.mm is None:
        pytest.skip("the numba backend has no product of its own on this CPU (not AMD, or no oneDNN)")
    monkeypatch.setattr(_common, "DNN_MIN_MACS", 1)
    monkeypatch.setattr(nb.NumbaBackend, "mm_min_macs", 1)
    torch.manual_seed(4)
    ref = getattr(torch.nn, name)(24, 40, num_layers=2, dtype=dtype)
    ours = getattr(fastrnn, name)(24, 40, num_layers=2, dtype=dtype, backend="numba")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(20, 3, 24, dtype=dtype)
    outs = []
    before = nb.PANEL_MM_CALLS
    for m in (ref, ours):
        xx = x.clone().requires_grad_()
        with dispatch.record_calls() as ran:
            y, h = m(xx)
            (y.square().sum() + (h[0] if name == "LSTM" else h).sum()).backward()
        outs.append([y.detach(), xx.grad] + [p.grad for p in m.parameters()])
    assert backends_used(ran) == {"numba"}
    assert nb.PANEL_MM_CALLS >= before + 2 * 4  # per layer: the projection, dx, dW_ih and dW_hh
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for a, b in zip(outs[1], outs[0]):
        torch.testing.assert_close(a, b, **tol)


def test_the_backends_product_refuses_shapes_that_do_not_fit(monkeypatch):
    """The panels read by address, unchecked: ``mm`` refuses inner sizes or a bias that do not fit (RuntimeError,
    as torch's product), before any kernel runs."""
    from fastrnn.backends import _common
    from fastrnn.backends import numba as nb
    if nb.NumbaBackend.mm is None:
        pytest.skip("the numba backend has no product of its own on this CPU (not AMD, or no oneDNN)")
    monkeypatch.setattr(_common, "DNN_MIN_MACS", 1)
    a = torch.randn(100, 64)
    before = nb.PANEL_MM_CALLS
    for args in ((a, False, torch.randn(96, 63), True, None), (a, False, torch.randn(63, 96), False, None),
                 (a, True, torch.randn(99, 8), False, None), (a, False, torch.randn(96, 64), True, torch.randn(95))):
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            nb.BACKEND.mm(*args)
    assert nb.PANEL_MM_CALLS == before
