"""The numba backend specifically: its compiled kernels really run in nopython mode (what every fused
backend must do besides is in test_fused.py)."""
import inspect

import pytest
import torch

import fastrnn

numba = pytest.importorskip("numba", reason="numba is not installed: the numba backend is unavailable here")
from fastrnn.backends.numba_kernels import gru, lstm, rnn  # noqa: E402

KERNELS = [lstm.lstm_fwd, lstm.lstm_bwd, gru.gru_fwd, gru.gru_bwd, rnn.rnn_fwd, rnn.rnn_bwd,
           lstm.lstm_seq_at, gru.gru_seq_at, rnn.rnn_seq_at]
# (the entries' <f>_fwd_rows, split by rows, are compiled inside them: njit, nopython)
# split by rows in training: only ever the parallel form (a call on one thread is not split)
ROW_KERNELS = [lstm.lstm_fwd_rows, lstm.lstm_bwd_rows, gru.gru_fwd_rows, gru.gru_bwd_rows, rnn.rnn_fwd_rows,
               rnn.rnn_bwd_rows]


def test_kernels_are_compiled_nopython():
    """Both forms of each kernel: the serial twin (a call on one thread) and, where torch has threads to
    split over, the parallel kernel (every step split, forced here)."""
    from fastrnn.backends import numba as nb
    assert not numba.config.DISABLE_JIT
    split = torch.get_num_threads() > 1
    for min_macs in (1 << 30, 0) if split else (1 << 30,):
        old = nb.BACKEND.set_parallel_min_macs(min_macs)
        try:
            for cls in (fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN):
                m = cls(4, 40, backend="numba")  # 40 units: a team of up to three parts of 16
                m(torch.randn(3, 2, 4, requires_grad=True))[0].sum().backward()
                with torch.no_grad():  # inference: the chunk entry's <f>_seq_at (6 rows), split by units,
                    m(torch.randn(3, 2, 4))  # then (forced) by rows: <f>_fwd_rows
                    nb.ROW_SPLIT = 1
                    m(torch.randn(3, 2, 4))
                nb.ROW_SPLIT = 1  # training by rows: <f>_fwd_rows and <f>_bwd_rows, called by the host
                m(torch.randn(3, 2, 4, requires_grad=True))[0].sum().backward()
                nb.ROW_SPLIT = -1
        finally:
            nb.BACKEND.set_parallel_min_macs(old)
            nb.ROW_SPLIT = -1
    for k in KERNELS:
        for form in (nb._kernel(k, 1), k) if split else (nb._kernel(k, 1),):
            assert isinstance(form, numba.core.registry.CPUDispatcher)
            sigs = form.nopython_signatures
            assert sigs, f"{form.py_func.__qualname__} never compiled"
            # the float32 form: the first argument's type, or the dtype's array (``like``) for the entries by address
            i = 0 if k not in KERNELS[6:] else list(inspect.signature(k.py_func).parameters).index("like")
            assert any(str(s.args[i]).startswith("array(float32") for s in sigs)
    for k in ROW_KERNELS if split else ():
        assert any(str(s.args[0]).startswith("array(float32") for s in k.nopython_signatures), \
            f"{k.py_func.__qualname__} never compiled"


@pytest.mark.parametrize("region", ["one worker at a time", "more parts than threads"])
def test_team_finishes_when_its_workers_do_not_run_together(monkeypatch, region):
    """The sequence forwards split a call over a team that waits between steps (team.py). When the region
    runs its workers one after another (the serial twin with parts > 1: what a call nested in another
    parallel region gets) or has more parts than threads, a waiting worker takes over the parts nobody
    claimed: the call finishes, with torch's values, forward and backward, packed and reversed too."""
    from fastrnn.backends import numba as nb

    def flat_outputs(out):  # output (its data when packed) and final state
        y, st = out
        y = y.data if isinstance(y, torch.nn.utils.rnn.PackedSequence) else y
        return [y, *(st if isinstance(st, tuple) else (st,))]
    from fastrnn.backends.numba_kernels.common import serial_twin
    monkeypatch.setattr(nb, "_parts", lambda *args: 3)
    if region == "one worker at a time":
        monkeypatch.setattr(nb, "_kernel", lambda fn, parts: serial_twin(fn))
    torch.manual_seed(0)
    cases = [(fastrnn.LSTM, torch.nn.LSTM, dict(proj_size=24, bidirectional=True)),
             (fastrnn.LSTM, torch.nn.LSTM, {}), (fastrnn.GRU, torch.nn.GRU, dict(num_layers=2)),
             (fastrnn.RNN, torch.nn.RNN, dict(bidirectional=True))]
    for ours_cls, ref_cls, kw in cases:
        ours = ours_cls(5, 40, backend="numba", **kw)
        ref = ref_cls(5, 40, **kw)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(9, 3, 5)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, [9, 6, 2], enforce_sorted=False)
        for inp in (x, packed):
            with torch.no_grad():
                for a, b in zip(flat_outputs(ours(inp)), flat_outputs(ref(inp))):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            got, want = ours(inp), ref(inp)
            (sum(o.sum() for o in flat_outputs(got))).backward()
            (sum(o.sum() for o in flat_outputs(want))).backward()
            for a, b in zip(flat_outputs(got), flat_outputs(want)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
                torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)
                p.grad = q.grad = None


def test_team_buffers_start_on_a_cache_line():
    """A team's parts write blocks of 16 units of each row of the state and workspace buffers: those the
    kernels make (``common.lines``; numba's np.empty aligns to 32 bytes) and those the host makes
    (``_lines``) start on a 64-byte line, so rows of a multiple of 16 units share no line between parts.
    The values are the array's own: the shape, dtype and C order asked for, writable."""
    import numpy as np
    from fastrnn.backends import numba as nb
    from fastrnn.backends.numba_kernels.common import lines
    for dt, tdt in ((np.float32, torch.float32), (np.float64, torch.float64)):
        for shape in ((1,), (3, 5), (1, 2, 48), (0, 4), (2, 0, 3)):
            for a in [lines(shape, dt) for _ in range(6)] + [nb._lines(*shape, like=torch.empty(0, dtype=tdt))]:
                assert a.shape == shape and a.dtype == dt and a.flags.c_contiguous and a.flags.writeable
                assert a.size == 0 or a.ctypes.data % 64 == 0, (shape, dt, a.ctypes.data % 64)
                a[...] = 7
                assert (a == 7).all()


def test_team_threshold_splits_small_steps():
    """The sequence forwards' teams split a call from TEAM_MIN_MACS multiply-adds a step (an LSTM step at
    H64 and batch 1 has 16384) and TEAM_MIN_CALL_MACS a call; the kernels that open a region a step keep
    PARALLEL_MIN_MACS."""
    from fastrnn.backends import numba as nb
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if threads < 2 or nb._common.FORKED_UNDER_GNU_OMP:
        pytest.skip("one thread here: nothing to split over")
    assert nb._parts(1, 4 * 64 * 64, 64, 100) == min(threads, 4)  # LSTM H64, batch 1, T=100 (4 blocks of 16)
    assert nb._parts(1, 4 * 64 * 64, 64, 10) == 1  # T=10: the region's start is not paid back
    assert nb._parts(1, 4 * 32 * 32, 32, 1000) == 1  # 4096 multiply-adds a step: one thread was faster
    assert nb._parts(1, 3 * 64 * 64, 64, 100) == 1  # GRU H64, batch 1 (12288): the team bought nothing
    assert nb._parts(2, 3 * 64 * 64, 64, 200) == min(threads, 4)  # at batch 2 it does
    assert nb._parts(1, 4 * 64 * 64) == 1  # a region a step: the old threshold
    assert nb._parts(16, 1 << 16) == threads


def test_a_split_sets_numbas_thread_count_whatever_set_it_last():
    """``_parts`` reads numba's thread count through the threading layer's own getter once the layer started
    (``_numba_threads``): it must still see a count the user set in between, and set the split's own back (a
    team with fewer threads than parts would wait for a part that never runs)."""
    from fastrnn.backends import numba as nb
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if threads < 2 or nb._common.FORKED_UNDER_GNU_OMP:
        pytest.skip("one thread here: nothing to split over")
    before = numba.get_num_threads()
    try:
        assert nb._parts(16, 1 << 16) == threads and nb._numba_threads() == numba.get_num_threads() == threads
        numba.set_num_threads(1)
        assert nb._numba_threads() == 1
        assert nb._parts(16, 1 << 16) == threads and numba.get_num_threads() == threads
        numba.set_num_threads(1)
        rows = min(threads, 16 // 8)  # 8 rows a thread or more
        assert nb._row_parts(16, None, threads, 64 * 64, torch.empty(0).numpy()) == rows
        assert numba.get_num_threads() >= rows
    finally:
        numba.set_num_threads(before)


def test_the_disk_cache_of_a_kernel_is_keyed_by_every_file_of_the_kernels(tmp_path):
    """numba keys a cached function by its own file's contents; the kernels inline the other files' functions, so the
    package's functions are keyed by every file of it (numba_kernels._PackageStamp): a change in panel.py alone
    gives lstm.py's kernels a new key. Functions elsewhere keep numba's own locators."""
    import os
    import shutil

    from numba.core import caching

    from fastrnn.backends import numba_kernels
    locator = lstm._cell_units._cache._impl._locator
    assert isinstance(locator, numba_kernels._PackageStamp)
    assert locator.get_source_stamp() == numba_kernels.package_stamp()
    copy = tmp_path / "kernels"
    shutil.copytree(os.path.dirname(numba_kernels.__file__), copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = numba_kernels.package_stamp(str(copy))
    assert before == numba_kernels.package_stamp()
    (copy / "panel.py").write_text((copy / "panel.py").read_text() + "\n# a change in panel.py alone\n")
    assert numba_kernels.package_stamp(str(copy)) != before

    def outside(x):
        return x + 1
    ours = [k for k in caching.CacheImpl._locator_classes if issubclass(k, numba_kernels._PackageStamp)]
    assert len(ours) >= 3
    assert all(k.from_function(outside, __file__) is None for k in ours)


def test_warm_calls_take_every_module_class_and_path():
    """`python -m fastrnn.warm`'s calls: the six classes, inference and training, one thread, a team and rows,
    packed, the variants, the cell options and the quantized modules; float64 only when asked."""
    from fastrnn import warm
    calls = warm.calls(("float32",))
    assert {c[1] for c in calls} == {"LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"}
    assert {c[0] for c in calls} == {"float32"} and {c[0] for c in warm.calls(warm.DTYPES)} == set(warm.DTYPES)
    seq = [c for c in calls if c[1] == "LSTM" and "quantized" not in c[2]]
    assert {c[4] for c in seq} == {False, True} and any(c[5] for c in seq)  # inference, training; packed
    assert {(c[3], c[2].get("hidden_size")) for c in seq} >= {((5, 1), 32), ((40, 1), 64), ((20, 16), 64)}
    assert any(c[2].get("layer_norm") and c[2].get("zoneout") for c in seq)
    assert any(c[2].get("peephole") for c in seq) and any(c[2].get("proj_size") for c in seq)
    assert {c[2].get("quantized") for c in calls} >= {"qint8", "bfloat16"}


def test_warm_runs_its_calls_on_numba(monkeypatch, capsys):
    """Each call runs on the numba backend (the quantized module's too), and main() runs the list in processes
    of its own and says how many ran."""
    from fastrnn import dispatch, warm
    for call in [("float32", "RNN", {"hidden_size": 16}, (4, 2), True, True),
                 ("float64", "GRUCell", {"hidden_size": 16}, (2,), False, False),
                 ("float32", "RNN", {"hidden_size": 16, "quantized": "qint8"}, (4, 2), False, False)]:
        with dispatch.record_calls() as ran:
            assert warm.run(call) >= 0
        assert {b for _, b in ran} == {"numba"}, call
    monkeypatch.setattr(warm, "calls", lambda dtypes: [("float32", "RNN", {"hidden_size": 16}, (4, 1), False,
                                                         False)] * 2)
    assert warm.main(["--jobs", "2"]) == 0
    assert "fastrnn.warm: 2 calls on the numba backend" in capsys.readouterr().out
    # where numba cannot run it says why and compiles nothing
    monkeypatch.setattr(dispatch, "reasons", lambda name: ["numba is not importable (test)"] if name == "numba" else [])
    assert warm.main([]) == 0
    assert "the numba backend is unavailable (numba is not importable (test)); nothing to compile" in \
        capsys.readouterr().out
