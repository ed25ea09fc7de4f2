"""Bad input: the exception type torch raises, a message naming what was wrong, parameters untouched.
Batch size 0 works, NaN and inf propagate as in torch."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from conftest import CPU_BACKENDS

SEQ = {"LSTM": (fastrnn.LSTM, torch.nn.LSTM), "GRU": (fastrnn.GRU, torch.nn.GRU), "RNN": (fastrnn.RNN, torch.nn.RNN)}
CELL = {"LSTMCell": (fastrnn.LSTMCell, torch.nn.LSTMCell), "GRUCell": (fastrnn.GRUCell, torch.nn.GRUCell),
        "RNNCell": (fastrnn.RNNCell, torch.nn.RNNCell)}


def _pair(fcls, tcls, backend):
    torch.manual_seed(0)
    t = tcls(4, 8)
    f = fcls(4, 8, backend=backend)
    f.load_state_dict(t.state_dict())
    return f, t


def _hx(name, *shape, **kw):
    h = torch.zeros(*shape, **kw)
    if name in ("LSTM", "LSTMCell"):
        c_shape = shape
        return (h, torch.zeros(*c_shape))
    return h


def expect_same_error(f, t, args, match):
    """fastrnn raises the type torch raises, with a message matching ``match``; f is unchanged."""
    before = {k: v.clone() for k, v in f.state_dict().items()}
    with pytest.raises(Exception) as torch_err:
        t(*args)
    with pytest.raises(torch_err.type, match=match):
        f(*args)
    after = f.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


SEQ_CASES = {
    "feature_size": (lambda n: (torch.randn(5, 3, 5),), r"input.size\(-1\) must be equal to input_size. Expected 4, got 5"),
    "input_1d": (lambda n: (torch.randn(5),), r"Expected input to be 2D or 3D, got 1D"),
    "input_4d": (lambda n: (torch.randn(5, 3, 4, 1),), r"Expected input to be 2D or 3D, got 4D"),
    "input_dtype": (lambda n: (torch.randn(5, 3, 4, dtype=torch.float64),), r"dtype.*float64.*float32"),
    "integer_input": (lambda n: (torch.ones(5, 3, 4, dtype=torch.int64),), r"floating-point.*int64"),
    "zero_length": (lambda n: (torch.randn(0, 3, 4),), r"sequence length to be larger than 0"),
    "zero_length_unbatched": (lambda n: (torch.randn(0, 4),), r"sequence length to be larger than 0"),
    "hx_batch": (lambda n: (torch.randn(5, 3, 4), _hx(n, 1, 2, 8)), r"Expected hidden(\[0\])? size \(1, 3, 8\), got \[1, 2, 8\]"),
    "hx_size": (lambda n: (torch.randn(5, 3, 4), _hx(n, 1, 3, 7)), r"Expected hidden(\[0\])? size \(1, 3, 8\), got \[1, 3, 7\]"),
    "hx_layers": (lambda n: (torch.randn(5, 3, 4), _hx(n, 2, 3, 8)), r"Expected hidden(\[0\])? size \(1, 3, 8\), got \[2, 3, 8\]"),
    "hx_2d_for_batched": (lambda n: (torch.randn(5, 3, 4), _hx(n, 3, 8)), r"For batched 3-D input, hx.*3-D but got"),
    "hx_3d_for_unbatched": (lambda n: (torch.randn(5, 4), _hx(n, 1, 1, 8)), r"For unbatched 2-D input, hx.*2-D but got"),
    "hx_dtype": (lambda n: (torch.randn(5, 3, 4), _hx(n, 1, 3, 8, dtype=torch.float64)), r"hx(\[0\])? has dtype torch.float64"),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(SEQ_CASES))
@pytest.mark.parametrize("name", list(SEQ))
def test_seq_bad_input(backend, name, case):
    f, t = _pair(*SEQ[name], backend)
    make, match = SEQ_CASES[case]
    expect_same_error(f, t, make(name), match)


def test_lstm_cell_state_wrong_shape():
    f, t = _pair(fastrnn.LSTM, torch.nn.LSTM, None)
    args = (torch.randn(5, 3, 4), (torch.zeros(1, 3, 8), torch.zeros(1, 3, 7)))
    expect_same_error(f, t, args, r"Expected hidden\[1\] size \(1, 3, 8\), got \[1, 3, 7\]")


def test_lstm_hx_not_a_pair():
    f, t = _pair(fastrnn.LSTM, torch.nn.LSTM, None)
    expect_same_error(f, t, (torch.randn(5, 3, 4), torch.zeros(1, 3, 8)),
                      r"LSTM: hx must be a tuple \(h_0, c_0\) of two tensors, got Tensor")


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_lstm_hx_forms(grad):
    """torch's forms of an LSTM's hx: batched, a stacked tensor is a TypeError, a tuple of one an
    IndexError, of three a RuntimeError; unbatched, the rows of one tensor are (h_0, c_0)."""
    f, t = _pair(fastrnn.LSTM, torch.nn.LSTM, None)
    x = torch.randn(5, 3, 4)
    with torch.set_grad_enabled(grad):
        for hx, exc, words in (
                (torch.zeros(2, 1, 3, 8), TypeError, r"hx must be a tuple \(h_0, c_0\) of two tensors, got Tensor"),
                ((torch.zeros(1, 3, 8),), IndexError, r"hx must be a tuple \(h_0, c_0\) of two tensors, got 1 items"),
                ((torch.zeros(1, 3, 8),) * 3, RuntimeError, r"lstm expects two hidden states \(h_0, c_0\), got 3")):
            with pytest.raises(exc):
                t(x, hx)
            expect_same_error(f, t, (x, hx), words)
        hx = torch.randn(2, 1, 8)
        got, want = f(x[:, 0], hx), t(x[:, 0], hx)
        for g, w in ((got[0], want[0]), (got[1][0], want[1][0]), (got[1][1], want[1][1])):
            torch.testing.assert_close(g, w)


def test_packed_zero_length_rejected_by_packing():
    # torch rejects it while packing, before any module runs; nothing for fastrnn to add
    with pytest.raises(RuntimeError, match="Length of all samples has to be greater than 0"):
        pack_padded_sequence(torch.randn(5, 3, 4), torch.tensor([5, 0, 2]), enforce_sorted=False)


@pytest.mark.parametrize("name", list(SEQ) + list(CELL))
def test_hx_on_other_device(name):
    """hx on another device than the input: RuntimeError naming both (the meta device stands in for a GPU)."""
    fcls = {**SEQ, **CELL}[name][0]
    f = fcls(4, 8)
    x = torch.randn(5, 3, 4) if name in SEQ else torch.randn(3, 4)
    shape = (1, 3, 8) if name in SEQ else (3, 8)
    h = torch.zeros(*shape, device="meta")
    hx = (h, torch.zeros(*shape, device="meta")) if name.startswith("LSTM") else h
    with pytest.raises(RuntimeError, match="is on device meta but the input is on cpu"):
        f(x, hx)


@pytest.mark.parametrize("name", list(SEQ))
def test_input_on_other_device_than_parameters(name):
    f = SEQ[name][0](4, 8)
    with pytest.raises(RuntimeError, match="input is on device meta but the parameters are on cpu"):
        f(torch.randn(5, 3, 4, device="meta"))


CELL_CASES = {
    "feature_size": (lambda n: (torch.randn(3, 5),), r"input has inconsistent input_size: got 5 expected 4"),
    "input_3d": (lambda n: (torch.randn(3, 3, 4),), r"Expected input to be 1D or 2D, got 3D"),
    "input_0d": (lambda n: (torch.randn(()),), r"Expected input to be 1D or 2D, got 0D"),
    "input_dtype": (lambda n: (torch.randn(3, 4, dtype=torch.float64),), r"dtype torch.float64 does not match weight dtype torch.float32"),
    "integer_input": (lambda n: (torch.ones(3, 4, dtype=torch.int64),), r"floating-point.*int64"),
    "hx_batch": (lambda n: (torch.randn(3, 4), _hx(n, 2, 8)), r"Input batch size 3 doesn't match hidden0 batch size 2"),
    "hx_size": (lambda n: (torch.randn(3, 4), _hx(n, 3, 7)), r"hidden0 has inconsistent hidden_size: got 7, expected 8"),
    "hx_3d": (lambda n: (torch.randn(3, 4), _hx(n, 1, 3, 8)), r"Expected (hidden|hx\[0\]) to be 1D or 2D, got 3D"),
    "hx_dtype": (lambda n: (torch.randn(3, 4), _hx(n, 3, 8, dtype=torch.float64)), r"hx(\[0\])? has dtype torch.float64"),
    # with a state: what the inference fast path (the fused cell op) sees first
    "feature_size_hx": (lambda n: (torch.randn(3, 5), _hx(n, 3, 8)), r"input has inconsistent input_size: got 5 expected 4"),
    "input_3d_hx": (lambda n: (torch.randn(2, 3, 4), _hx(n, 3, 8)), r"Expected input to be 1D or 2D, got 3D"),
    "input_dtype_hx": (lambda n: (torch.randn(3, 4, dtype=torch.float64), _hx(n, 3, 8, dtype=torch.float64)),
                       r"dtype torch.float64 does not match weight dtype torch.float32"),
    "unbatched_input_2d_hx": (lambda n: (torch.randn(4), _hx(n, 3, 8)), r"hidden state must be 1D for 1D input"),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CELL_CASES))
@pytest.mark.parametrize("name", list(CELL))
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_cell_bad_input(backend, name, case, grad):
    """no_grad: a cell call with a state takes the inference fast path first (modules._CellMixin._fast_path)."""
    f, t = _pair(*CELL[name], backend)
    make, match = CELL_CASES[case]
    with torch.set_grad_enabled(grad):
        expect_same_error(f, t, make(name), match)


def test_bad_constructor_arguments_match_torch():
    for fcls, tcls, kw in [(fastrnn.RNN, torch.nn.RNN, dict(nonlinearity="foo")),
                           (fastrnn.GRU, torch.nn.GRU, dict(proj_size=2)),
                           (fastrnn.LSTM, torch.nn.LSTM, dict(proj_size=8)),
                           (fastrnn.LSTM, torch.nn.LSTM, dict(dropout=1.5))]:
        with pytest.raises(ValueError) as e:
            tcls(4, 8, **kw)
        with pytest.raises(ValueError, match=str(e.value)[:20]):
            fcls(4, 8, **kw)


@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN, fastrnn.LSTMCell, fastrnn.GRUCell,
                                 fastrnn.RNNCell])
def test_unknown_backend_name(cls):
    with pytest.raises(ValueError, match="Unknown fastrnn backend 'fast'. Known backends: reference, numba, cpp, triton"):
        cls(4, 8, backend="fast")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(SEQ) + list(CELL))
def test_batch_size_zero(backend, name):
    fcls, tcls = {**SEQ, **CELL}[name]
    f, t = _pair(fcls, tcls, backend)
    x = torch.randn(5, 0, 4) if name in SEQ else torch.randn(0, 4)
    x.requires_grad_()
    out_f, out_t = f(x), t(x)
    flat = lambda o: [o] if torch.is_tensor(o) else [z for y in o for z in flat(y)]  # noqa: E731
    for a, b in zip(flat(out_f), flat(out_t)):
        assert a.shape == b.shape
    sum(o.sum() for o in flat(out_f)).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(SEQ) + list(CELL))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_inf_propagate_like_torch(backend, name, bad):
    """One bad input element (one row, one step): the same NaN and inf as torch.nn's, the other rows finite.
    Sequences with autograd; cells in inference with a state given, so the fast path (a fused op on cpp and
    numba) runs."""
    f, t = _pair(*({**SEQ, **CELL}[name]), backend)
    f.double()
    t.double()
    if name in SEQ:
        x = torch.randn(6, 3, 4, dtype=torch.float64)
        x[2, 1, 0] = bad  # rows 0 and 2 stay finite
        (yf, sf), (yt, st) = f(x), t(x)
        outs = [(yf, yt)] + list(zip(*(s if isinstance(s, tuple) else (s,) for s in (sf, st))))
        good = (slice(None), [0, 2])
    else:
        x = torch.randn(3, 4, dtype=torch.float64)
        x[1, 0] = bad
        hx = tuple(torch.randn(3, 8, dtype=torch.float64) for _ in range(2 if name == "LSTMCell" else 1))
        hx = hx if name == "LSTMCell" else hx[0]
        with torch.no_grad():
            of, ot = f(x, hx), t(x, hx)
        outs = list(zip(*(o if isinstance(o, tuple) else (o,) for o in (of, ot))))
        good = ([0, 2],)
    for a, b in outs:
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, equal_nan=True)
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
    assert torch.isfinite(outs[0][0][good]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("name,args,match", [
    # a batched LSTMCell's state that is one tensor: torch's TypeError
    ("LSTMCell", lambda: (torch.randn(3, 4), torch.zeros(3, 8)), r"hx must be a tuple of Tensors"),
    ("LSTMCell", lambda: (torch.randn(3, 4), (torch.zeros(3, 8),) * 3), r"expects two hidden states"),
    ("GRUCell", lambda: (torch.randn(3, 4), (torch.zeros(3, 8),)), r"'tuple' object has no attribute 'dim'"),
    ("RNNCell", lambda: (torch.randn(3, 4).numpy(), torch.zeros(3, 8)), r"has no attribute 'dim'"),
])
def test_cell_state_of_the_wrong_form(backend, grad, name, args, match):
    f, t = _pair(*CELL[name], backend)
    with torch.set_grad_enabled(grad):
        expect_same_error(f, t, args(), match)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_unbatched_lstm_cell_reads_hx_0_and_1(backend, grad):
    """Unbatched, torch's LSTMCell takes (hx[0], hx[1]): the rows of one tensor, or the first two of
    three states. fastrnn does the same (and its inference fast path leaves such forms to the general path)."""
    f, t = _pair(fastrnn.LSTMCell, torch.nn.LSTMCell, backend)
    x = torch.randn(4)
    for hx in (torch.randn(2, 8), (torch.randn(8), torch.randn(8), torch.randn(8))):
        with torch.set_grad_enabled(grad):
            for a, b in zip(f(x, hx), t(x, hx)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
