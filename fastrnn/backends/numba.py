"""The numba backend: the whole recurrence of a layer-direction in Numba-compiled code on the CPU.

Host side only: allocate outputs and workspaces as torch tensors, hand numpy views of them to the
kernels in ``numba_kernels`` (compiled once, cached on disk), and after the backward loop compute
the weight gradients as large GEMMs with torch. float32 and float64; threads: up to
``torch.get_num_threads()``, split over hidden units when a step has enough work.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import Backend, _common
from ._common import (StepsFromSequence, batch_sizes_from_lengths, dnn_mm, fwd_dims, recurrent_weight_grads,
                      through_padded)

try:
    import numba
    from .numba_kernels import gru as _gru
    from .numba_kernels import gru_options as _gru_opt
    from .numba_kernels import lstm as _lstm
    from .numba_kernels import lstm_options as _lstm_opt
    from .numba_kernels import panel as _panel
    from .numba_kernels import rnn as _rnn
    from .numba_kernels.common import TWINS as _SERIAL, serial_twin
    _IMPORT_ERROR = None
except ImportError as e:  # numba missing or broken: the backend is unavailable, fastrnn still imports
    numba = None
    _SERIAL = {}
    _IMPORT_ERROR = e

# a step's GEMM must have at least this many multiply-adds before a kernel that opens a parallel region a
# step (~2-3 us: the options' kernels, the cells) or a product (``_mm``) splits it over threads. Or a row's
# must have 3/8 of it (a weight matrix of 3/4 MiB in float32): one thread then reads the whole of it each step, and the other
# thread's half of that read pays for the split at batch 1 already (benchmarks/NOTES.md, "numba's split
# threshold", seventeenth session)
PARALLEL_MIN_MACS = 1 << 19
# the same for the teams of the sequence forwards (team.py: one region a call, a wait a step): split from
# 2^14 multiply-adds a step. T100 inference, team / one thread: GRU B1 H64 (12288) 0.985, LSTM B1 H64 and RNN
# B1 H128 (16384) 0.885 and 0.852, GRU B2 H64 0.912, GRU B1 H96 0.784 (benchmarks/NOTES.md, thirty-second
# session; 2^13 on the Zen 4 of the eighteenth, "False sharing in numba's teams"; `python -m benchmarks.train_ab
# --variant team_min --backend numba`: RNN B2 H64 (8192) 0.75). A team waits every step for the other core,
# whatever else runs there: where it buys nothing, one thread
TEAM_MIN_MACS = 1 << 14
# and from 2^19 over the whole call: a team's region starts its worker (~8 us here), which the steps must
# pay back (LSTM H64 batch 1: one thread faster up to T=20, two from T=40)
TEAM_MIN_CALL_MACS = 1 << 19



def _kernel(fn, parts):
    """The compiled kernel ``fn`` (``parallel=True``, or an entry that calls such kernels) for a call split
    in ``parts`` > 1, else its serial twin: the same code compiled without ``parallel`` (each ``prange`` a
    plain loop, the kernels it calls their twins). A ``prange`` over one
    part still opens a parallel region, ~2 us a step: a whole step at batch 1 and H=64 (benchmarks/NOTES.md,
    "numba's sequences on one thread"). In a process forked after its parent ran numba's GNU OpenMP layer
    (``_common.FORKED_UNDER_GNU_OMP``: DataLoader workers, Hogwild-style training) ``_parts`` is always 1,
    so only the twin runs there, which starts no OpenMP region. TBB, numba's fork-safe layer, measured
    10-35% slower here (benchmarks/NOTES.md, "numba after fork"), so the parent keeps OpenMP."""
    if parts > 1 and not _common.FORKED_UNDER_GNU_OMP:
        return fn
    return serial_twin(fn)


def _np(t):
    return None if t is None else t.detach().numpy()


def _rows(t, out=False):
    """numpy view of a [T, B, N] tensor as the forward kernels take it: [T x B, N], a step's rows after the
    step before's. An input that is not contiguous is copied (the kernels only read it); an output must be
    a view (``out``: torch's view raises otherwise)."""
    if out:
        return t.detach().view(-1, t.shape[-1]).numpy()
    return t.detach().numpy().reshape(-1, t.shape[-1])


def _opt(t, ndim, like):
    """numpy view of an optional tensor; an empty array of the right rank when absent."""
    if t is None:
        return np.empty((0,) * ndim, dtype=_np(like).dtype)
    return t.detach().numpy()


def _parts(rows, macs_per_row, units=None, call_rows=0):
    """How many threads split a call: all of torch's threads when a step's GEMM has enough work to pay for
    the split, else one. The split costs a parallel region a step in the kernels that open one a step (the
    options' kernels, the cells: ~2-3 us; PARALLEL_MIN_MACS), and one region a call
    plus a wait a step in the teams of the sequence forwards (team.py; TEAM_MIN_MACS a step and
    TEAM_MIN_CALL_MACS over the ``call_rows`` of the call: the region's start has to be paid back).
    ``units``, given for a team only: its parts are blocks of at least 16 units (``split``) and each waits
    for all the others every step, so a team has no more parts than blocks."""
    if units is not None:
        if rows * macs_per_row < TEAM_MIN_MACS or call_rows * macs_per_row < TEAM_MIN_CALL_MACS:
            return 1
    elif rows * macs_per_row < PARALLEL_MIN_MACS and 8 * macs_per_row < 3 * PARALLEL_MIN_MACS:
        return 1
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if units is not None:
        threads = min(threads, -(-units // 16))
    if threads > 1 and not _common.FORKED_UNDER_GNU_OMP:
        if _numba_threads() != threads:
            numba.set_num_threads(threads)
        return threads
    return 1


#: numba's getter of the thread count, once its threading layer has started (``_numba_threads``)
_THREADS_NOW = None


def _numba_threads():
    """``numba.get_num_threads()``, without its check that the threading layer started (a lock: ~500 ns a call,
    which a cell call at H256, split in two, paid every call) once it has: through the layer's own getter,
    numba's ``parallel._get_num_threads`` (~75 ns; a numba without it: the public call). Called where a split
    follows, which starts the layer anyway (benchmarks/NOTES.md, thirty-second session)."""
    global _THREADS_NOW
    if _THREADS_NOW is None:
        n = numba.get_num_threads()  # starts the layer, which defines the getter
        from numba.np.ufunc import parallel
        _THREADS_NOW = getattr(parallel, "_get_num_threads", None) or numba.get_num_threads
        return n
    return _THREADS_NOW()


#: the products ``_mm`` ran on the panels (the tests check that the path ran)
PANEL_MM_CALLS = 0


def _mm(a, ta, b, tb, bias):
    """The contract's ``mm`` (``A' @ B' (+ bias)``) on AMD CPUs: oneDNN's product from DNN_MIN_ROWS rows of ``a``
    (a sequence's T x B; ``dnn_mm``); below that, from DNN_MIN_MACS, the panels' product on numba's own threads
    (``panel.project``: B' as it lies, Aᵀ copied). At 100 rows (T100 B1) torch's product runs MKL's slow path at
    170-200 GFLOP/s, the panels at 270-470 (x @ Wᵀ, H64-H512). oneDNN's is as fast alone, but numba's training
    calls read no faster with it at these sizes (twenty-ninth session; a guess: torch's threads, woken for it,
    still spinning when numba's next region starts). Module A/B: benchmarks/NOTES.md, thirty-second session."""
    like = _LIKE.get(a.dtype)
    M, K = (a.shape[1], a.shape[0]) if ta else a.shape
    N = b.shape[0] if tb else b.shape[1]
    if (a.shape[0] >= _common.DNN_MIN_ROWS or M * K * N < _common.DNN_MIN_MACS or like is None
            or b.dtype is not a.dtype or not (a.is_cpu and b.is_cpu) or (bias is not None and bias.dtype is not a.dtype)):
        return dnn_mm(a, ta, b, tb, bias)
    if (b.shape[1] if tb else b.shape[0]) != K or (bias is not None and bias.shape != (N,)):
        raise RuntimeError(f"fastrnn numba mm: shapes cannot be multiplied ({M}x{K} and "
                           f"{'x'.join(map(str, b.t().shape if tb else b.shape))}, bias "
                           f"{None if bias is None else tuple(bias.shape)})")
    global PANEL_MM_CALLS
    PANEL_MM_CALLS += 1
    A = a.t().contiguous() if ta else a.contiguous()
    out = torch.empty(M, N, dtype=a.dtype)
    parts = _parts(M, K * N)
    _kernel(_panel.project, parts)(_np(A), _np(b.contiguous()), like if bias is None else _np(bias.contiguous()),
                                   _np(out), parts, not tb)
    return out


@functools.lru_cache(maxsize=None)
def _l2_bytes() -> int:
    """A core's L2 in bytes (sysfs, read once; 256 KiB where it does not say, as the cpp backend's)."""
    return _common.cache_sizes()["L2"] or 256 << 10


#: -1: the rule (``_row_parts``), 0 / 1: never / wherever a call allows it (tests, A/B); ROW_CALLS counts
#: the calls split by rows (the tests check that the path ran)
ROW_SPLIT = -1
ROW_CALLS = 0


def _row_parts(B, ragged, parts, weights, like):
    """Blocks of rows for a sequence's forward or backward (numba_kernels/*_fwd_rows, *_bwd_rows: each thread
    all units of its rows, no wait a step), or 0 for the split by units: for a dense batch (``ragged`` None:
    no lengths or batch sizes) where a team would run (``parts`` > 1), with 8 rows a thread or more and the
    recurrent weights (``weights`` elements) within 3/4 of a core's L2, as the cpp backend's rule
    (csrc/recurrence.h, layout; benchmarks/NOTES.md, twenty-fifth session)."""
    if ragged is not None or parts < 2 or ROW_SPLIT == 0:
        return 0
    rows = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, B if ROW_SPLIT == 1 else B // 8)
    if rows < 2 or (ROW_SPLIT == -1 and 4 * weights * like.itemsize > 3 * _l2_bytes()):
        return 0
    if _numba_threads() < rows:
        numba.set_num_threads(rows)
    global ROW_CALLS
    ROW_CALLS += 1
    return rows


def _bwd_split(B, T, macs_per_row, units, ragged, weights, like, rows_ok=True):
    """(parts, rows) of a sequence's backward: split by rows (``rows`` > 0) where ``_row_parts`` allows it, else
    by units over a team (the backward kernels' steps, a phase or two each, in one region a call as the forwards';
    TEAM_MIN_MACS and TEAM_MIN_CALL_MACS). ``rows_ok`` False: the units only (the LSTM's peephole weights, whose
    gradients sum over rows). At LSTM B16 H64 (2^18 multiply-adds a step) the backward by rows took a T100
    training call from 4.44 to 3.68 ms against one thread (benchmarks/NOTES.md, twenty-sixth session); by units,
    the team against a parallel region a step: benchmarks/NOTES.md, thirty-first session."""
    parts = _parts(B, macs_per_row, units, T * B)
    rows = _row_parts(B, ragged, parts, weights, like) if rows_ok else 0
    return (rows, rows) if rows else (parts, 0)


#: the sequence forwards and backwards run their steps' products on W_hh's panels (numba_kernels/panel.py) from
#: this many rows a step (a part's, split by rows; -1: never; 4: not the forwards' row kernels below 4 rows, as
#: before the thirty-first session; tests and A/B); panel.step_panels and panel.row_panels add their own rules
PANEL_MIN_ROWS = 1


def _lines(*shape, like):
    """An uninitialized numpy buffer of ``like``'s dtype from torch's allocator, which starts it on a 64-byte
    cache line (numpy's own aligns to 16): a team's parts write blocks of 16 units of its rows, and a line
    shared by two parts would go back and forth between the workers every step (common.lines)."""
    return torch.empty(shape, dtype=like.dtype).numpy()


def _sizes(lengths, T, B):
    return np.asarray(batch_sizes_from_lengths(lengths, T, B), dtype=np.int64)


def _alloc(varlen):
    return torch.zeros if varlen else torch.empty


def _through_padded(xw, lengths):
    """``_common.through_padded`` for a sequence op's call on a packed sequence's rows (xw [N, n]); identities for
    xw [T, B, n]."""
    if xw.dim() != 2:
        return (lambda t: t), (lambda t: t)
    return through_padded(lengths)


class _Layout:
    """A sequence op's rows: xw [T, B, G*H] (step t's rows from row t x B; with ``lengths``, the rows past
    their end zero in every per-step array) or, from ``fastrnn.functional`` (``packed_rows``), a packed
    sequence's rows xw [N, G*H] (step t's sizes[t] rows from row offs[t], every one written). ``steps(n)``
    makes a per-step array of n columns in the same layout; ``rows`` is their number (T x B, or N)."""

    def __init__(self, xw, lengths):
        if xw.dim() == 2:
            self.B = lengths.shape[0]
            self.T = int(lengths[0]) if self.B else 0
            self.sizes = _sizes(lengths, self.T, self.B)
            self.offs = np.zeros(self.T, np.int64)
            np.cumsum(self.sizes[:-1], out=self.offs[1:])
            self.lead, self.new, self.rows = (xw.shape[0],), torch.empty, xw.shape[0]
        else:
            self.T, self.B = xw.shape[0], xw.shape[1]
            self.sizes = _sizes(lengths, self.T, self.B)
            self.offs = np.arange(0, self.T * self.B, self.B, dtype=np.int64) if self.B else np.zeros(self.T, np.int64)
            self.lead, self.new, self.rows = (self.T, self.B), _alloc(lengths is not None), self.T * self.B
        self.ragged = lengths

    def steps(self, n, like):
        return self.new(*self.lead, n, dtype=like.dtype)


def _lstm_options_used(ln_h, ln_c, ln_cb, rmask, zmask_h, zmask_c, zh, zc):
    return any(t is not None for t in (ln_h, ln_c, ln_cb, rmask, zmask_h, zmask_c)) or bool(zh) or bool(zc)


class NumbaBackend(StepsFromSequence, Backend):
    name = "numba"
    devices = ("cpu",)
    dtypes = (torch.float32, torch.float64)
    # the cell options run in their own kernels (numba_kernels/*_options.py), on one thread
    features = frozenset({"proj", "peephole", "coupled", "varlen", "layer_norm", "zoneout", "recurrent_dropout"})
    #: the sequence ops also take a packed sequence's rows as they lie (the contract's ``packed_rows``; the plain
    #: kernels run on them, the cell options' kernels through the padded layout: ``_Layout``, ``_through_padded``)
    packed_rows = True

    @staticmethod
    def set_parallel_min_macs(value: int) -> int:
        """Multiply-adds a step needs before it is split over threads (a row's: 3/8 of it) in the kernels that
        open a region a step; the teams' thresholds follow in the defaults' ratios (a step 1/32 of it, a call
        as much); returns the old value."""
        global PARALLEL_MIN_MACS, TEAM_MIN_MACS, TEAM_MIN_CALL_MACS
        old, PARALLEL_MIN_MACS, TEAM_MIN_MACS, TEAM_MIN_CALL_MACS = PARALLEL_MIN_MACS, value, value >> 5, value
        return old

    #: the contract's optional ``mm`` and ``empty``: the general path's input projection (the sequence entries
    #: project inside) and, in training, its gradients and dW_hh's, on AMD CPUs, where torch's MKL path is the
    #: slow one: through oneDNN from DNN_MIN_ROWS rows, below on the panels (``_mm``); the buffers from torch's
    #: allocator. None on other CPUs (on Intel's torch's product is as fast) or without oneDNN.
    mm = mm_min_macs = None
    if _common._DNN_VENDOR and _common._DNN_LINEAR is not None:
        mm = staticmethod(_mm)
        #: the training projection through ``mm`` below the functional layer's buffer size too, from
        #: DNN_MIN_MACS (2^21) multiply-adds, as cpp's: T100 B1 H96-H256 training 0.90-0.98 of the time with
        #: torch's product (benchmarks/NOTES.md, thirty-third session)
        mm_min_macs = _common.DNN_MIN_MACS

        @staticmethod
        def empty(shape, dtype):
            return torch.empty(shape, dtype=dtype)

    def unavailable_reasons(self):
        if _IMPORT_ERROR is not None:
            return [f"numba is not importable ({_IMPORT_ERROR}); install it with pip install numba"]
        return []

    # ---- workspace sizes -------------------------------------------------------------------------
    def workspace_numel(self, op, *args):
        if not args[-1]:  # save=False: inference keeps nothing
            return 0
        family, scope, T, B, GH, H, P, proj = fwd_dims(op, args)
        n = {"lstm": T * B * (GH + H + (H if proj else 0)), "gru": T * B * (GH + H), "rnn": 0}[family]
        # the options' kernels keep more (numba_kernels/*_options.py): args (xw, *weights, *state, ..., save)
        if family == "lstm" and _lstm_options_used(*args[5:11], args[-3], args[-2]):
            n = T * B * (2 * GH + 2 * H + (H if proj else 0) + 3)
        if family == "gru" and (any(t is not None for t in args[3:6]) or bool(args[-2])):
            n = T * B * (2 * GH + H + 1)
        return n + (B * P if scope == "step" else 0)  # a step also keeps its output

    # ---- LSTM ------------------------------------------------------------------------------------
    def _lstm_ws(self, ws, R, GH, H, proj):
        """Views of the workspace as rows: R = every step's (a training forward), or B for the one reused step
        of an inference forward."""
        gates = ws[:R * GH].view(R, GH)
        c_all = ws[R * GH:R * (GH + H)].view(R, H)
        hfull = ws[R * (GH + H):R * (GH + 2 * H)].view(R, H) if proj else ws[:0].view(0, 0)
        return gates, c_all, hfull

    def _lstm_plain_fwd(self, xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, reverse, coupled, save):
        L = _Layout(xw, lengths)
        T, B, GH = L.T, L.B, xw.shape[-1]
        H, P = c0.shape[1], h0.shape[1]
        proj = w_hr is not None
        R = L.rows if save else B  # workspace rows: every step's for the backward, or one step's reused
        ws = (L.new if save else torch.empty)(R * (GH + H + (H if proj else 0)), dtype=xw.dtype)
        gates, c_all, hfull = self._lstm_ws(ws, R, GH, H, proj)
        if not save:
            ws = xw.new_empty(0)
        y = L.steps(P, xw)
        h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
        parts = _parts(B, GH * P, max(H, P), T * B)
        rows = _row_parts(B, L.ragged, parts, GH * P + (P * H if proj else 0), _np(xw))
        if rows:
            _kernel(_lstm.lstm_fwd_rows, rows)(_rows(xw), _np(w_hh), _opt(b_hh, 1, xw), _opt(w_hr, 2, xw),
                                               _opt(w_ch, 2, xw), coupled, _np(h0), _np(c0), T, reverse, rows,
                                               _rows(y, out=True), _np(h_n), _np(c_n), _np(gates), _np(c_all),
                                               _np(hfull), PANEL_MIN_ROWS)
            return y, h_n, c_n, ws
        h_a, h_b, c = _lines(B, P, like=xw), _lines(B, P, like=xw), _lines(B, H, like=xw)
        _kernel(_lstm.lstm_fwd, parts)(_rows(xw), _np(w_hh), _opt(b_hh, 1, xw), _opt(w_hr, 2, xw), _opt(w_ch, 2, xw),
                                       coupled, _np(h0), _np(c0), L.sizes, L.offs, reverse, parts, _rows(y, out=True),
                                       _np(h_n), _np(c_n), _np(gates), _np(c_all), _np(hfull), h_a, h_b, c,
                                       PANEL_MIN_ROWS)
        return y, h_n, c_n, ws

    def _lstm_plain_bwd(self, grad_y, grad_h_n, grad_c_n, xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, y, ws,
                        reverse, coupled):
        L = _Layout(xw, lengths)
        T, B, GH = L.T, L.B, xw.shape[-1]
        H, P = c0.shape[1], h0.shape[1]
        proj = w_hr is not None
        gates, c_all, hfull = self._lstm_ws(ws, L.rows, GH, H, proj)
        dgates, h_prev = L.steps(GH, xw), L.steps(P, xw)
        dh_proj = L.steps(P, xw) if proj else xw.new_empty(0, 0)
        dh0, dc0 = torch.empty_like(h0), torch.empty_like(c0)
        dhf = _lines(B, H, like=xw)
        dw_ch = torch.zeros(3, H, dtype=xw.dtype) if w_ch is not None else xw.new_empty(0, 0)
        parts, rows = _bwd_split(B, T, GH * P, max(H, P), L.ragged, GH * P + (P * H if proj else 0), _np(xw),
                                 rows_ok=w_ch is None)
        _kernel(_lstm.lstm_bwd_rows if rows else _lstm.lstm_bwd, rows or parts)(
            _rows(grad_y), _np(grad_h_n), _np(grad_c_n), _np(w_hh.t().contiguous()), _opt(w_hr, 2, xw),
            _np(w_hr.t().contiguous()) if proj else _opt(None, 2, xw), _opt(w_ch, 2, xw), coupled, _np(h0), _np(c0),
            L.sizes, L.offs, reverse, rows or parts, _rows(y), _np(gates), _np(c_all), _np(hfull),
            _rows(dgates, out=True), _rows(h_prev, out=True), _rows(dh_proj, out=True) if proj else _opt(None, 2, xw),
            _np(dh0), dhf, _np(dc0), _np(dw_ch), PANEL_MIN_ROWS)
        d_w_hh, d_b_hh = recurrent_weight_grads(dgates, h_prev, b_hh, self.mm)
        d_w_hr = dh_proj.view(-1, P).t().mm(hfull) if proj else xw.new_empty(0)
        return dgates, d_w_hh, d_b_hh, d_w_hr, dw_ch if w_ch is not None else xw.new_empty(0), dh0, dc0

    # ---- GRU -------------------------------------------------------------------------------------
    def _gru_plain_fwd(self, xw, w_hh, b_hh, h0, lengths, reverse, save):
        L = _Layout(xw, lengths)
        T, B, GH = L.T, L.B, xw.shape[-1]
        H = h0.shape[1]
        R = L.rows if save else B  # workspace rows: every step's for the backward, or one step's reused
        buf = (L.new if save else torch.empty)(R * (GH + H), dtype=xw.dtype)
        gates, hn_all = buf[:R * GH].view(R, GH), buf[R * GH:].view(R, H)
        ws = buf if save else xw.new_empty(0)
        y = L.steps(H, xw)
        h_n = torch.empty_like(h0)
        parts = _parts(B, GH * H, H, T * B)
        rows = _row_parts(B, L.ragged, parts, GH * H, _np(xw))
        if rows:
            _kernel(_gru.gru_fwd_rows, rows)(_rows(xw), _np(w_hh), _opt(b_hh, 1, xw), _np(h0), T, reverse, rows,
                                             _rows(y, out=True), _np(h_n), _np(gates), _np(hn_all),
                                             PANEL_MIN_ROWS)
            return y, h_n, ws
        h_a, h_b = _lines(B, H, like=xw), _lines(B, H, like=xw)
        _kernel(_gru.gru_fwd, parts)(_rows(xw), _np(w_hh), _opt(b_hh, 1, xw), _np(h0), L.sizes, L.offs, reverse,
                                     parts, _rows(y, out=True), _np(h_n), _np(gates), _np(hn_all), h_a, h_b,
                                     PANEL_MIN_ROWS)
        return y, h_n, ws

    def _gru_plain_bwd(self, grad_y, grad_h_n, xw, w_hh, b_hh, h0, lengths, y, ws, reverse):
        L = _Layout(xw, lengths)
        T, B, GH = L.T, L.B, xw.shape[-1]
        H = h0.shape[1]
        R = L.rows
        gates, hn_all = ws[:R * GH].view(R, GH), ws[R * GH:].view(R, H)
        d_xw, d_hh, h_prev = L.steps(GH, xw), L.steps(GH, xw), L.steps(H, xw)
        dh0 = torch.empty_like(h0)
        parts, rows = _bwd_split(B, T, GH * H, H, L.ragged, GH * H, _np(xw))
        _kernel(_gru.gru_bwd_rows if rows else _gru.gru_bwd, rows or parts)(
            _rows(grad_y), _np(grad_h_n), _np(w_hh.t().contiguous()), _np(h0), L.sizes, L.offs, reverse,
            rows or parts, _rows(y), _np(gates), _np(hn_all), _rows(d_xw, out=True), _rows(d_hh, out=True),
            _rows(h_prev, out=True), _np(dh0), PANEL_MIN_ROWS)
        d_w_hh, d_b_hh = recurrent_weight_grads(d_hh, h_prev, b_hh, self.mm)
        return d_xw, d_w_hh, d_b_hh, dh0

    # ---- the contract's LSTM and GRU methods: the plain kernels, or with a cell option its own ----------
    def lstm_seq_fwd(self, xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, zmask_h, zmask_c, h0, c0, lengths,
                     reverse, coupled, zoneout_h, zoneout_c, save):
        if not _lstm_options_used(ln_h, ln_c, ln_cb, rmask, zmask_h, zmask_c, zoneout_h, zoneout_c):
            return self._lstm_plain_fwd(xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, reverse, coupled, save)
        pad, unpad = _through_padded(xw, lengths)  # the options' kernels take the padded layout
        y, *rest = self._lstm_opt_fwd(pad(xw), w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, zmask_h, zmask_c, h0,
                                      c0, lengths, reverse, coupled, zoneout_h, zoneout_c, save)
        return unpad(y), *rest

    def _lstm_opt_fwd(self, xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, zmask_h, zmask_c, h0, c0, lengths,
                      reverse, coupled, zoneout_h, zoneout_c, save):
        T, B, GH = xw.shape
        H, P = c0.shape[1], h0.shape[1]
        proj = w_hr is not None
        new = _alloc(lengths is not None)
        S = T if save else 1  # workspace slots: every step for the backward, or one reused
        buf = new(S * B * (2 * GH + 2 * H + (H if proj else 0) + 3), dtype=xw.dtype)
        ws = buf if save else xw.new_empty(0)
        gates, c_all, hfull, ctil, xhat, stats = self._lstm_opt_ws(buf, S, B, GH, H, proj)
        y = new(T, B, P, dtype=xw.dtype)
        h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
        d = _np(xw).dtype
        parts = _parts(B, GH * P)
        _kernel(_lstm_opt.lstm_opt_fwd, parts)(
                               _np(xw), _np(w_hh), _opt(b_hh, 1, xw), _opt(w_hr, 2, xw), _opt(w_ch, 2, xw),
                               _opt(ln_h, 1, xw), _opt(ln_c, 1, xw), _opt(ln_cb, 1, xw), _opt(rmask, 2, xw),
                               _opt(zmask_h, 3, xw), _opt(zmask_c, 3, xw), float(zoneout_h), float(zoneout_c), coupled,
                               _np(h0), _np(c0), _sizes(lengths, T, B), reverse, parts, _np(y), _np(h_n),
                               _np(c_n),
                               _np(gates), _np(c_all), _np(hfull), _np(ctil), _np(xhat), _np(stats),
                               np.empty((B, P), d), np.empty((B, P), d), np.empty((B, P), d), np.empty((B, H), d))
        return y, h_n, c_n, ws

    @staticmethod
    def _lstm_opt_ws(buf, S, B, GH, H, proj):
        sizes = [GH, H, H if proj else 0, H, GH, 3]
        views, o = [], 0
        for n in sizes:
            views.append(buf[o:o + S * B * n].view(S, B, n))
            o += S * B * n
        return views

    def lstm_seq_bwd(self, grad_y, grad_h_n, grad_c_n, xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, zmask_h,
                     zmask_c, h0, c0, lengths, y, ws, reverse, coupled, zoneout_h, zoneout_c):
        if not _lstm_options_used(ln_h, ln_c, ln_cb, rmask, zmask_h, zmask_c, zoneout_h, zoneout_c):
            g = self._lstm_plain_bwd(grad_y, grad_h_n, grad_c_n, xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, y, ws,
                                     reverse, coupled)
            return (*g[:5], *(xw.new_empty(0) for _ in range(6)), *g[5:])
        pad, unpad = _through_padded(xw, lengths)
        d_xw, *rest = self._lstm_opt_bwd(pad(grad_y), grad_h_n, grad_c_n, pad(xw), w_hh, b_hh, w_hr, w_ch, ln_h, ln_c,
                                         ln_cb, rmask, zmask_h, zmask_c, h0, c0, lengths, pad(y), ws, reverse, coupled,
                                         zoneout_h, zoneout_c)
        return unpad(d_xw), *rest

    def _lstm_opt_bwd(self, grad_y, grad_h_n, grad_c_n, xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, zmask_h,
                      zmask_c, h0, c0, lengths, y, ws, reverse, coupled, zoneout_h, zoneout_c):
        T, B, GH = xw.shape
        H, P = c0.shape[1], h0.shape[1]
        proj = w_hr is not None
        gates, c_all, hfull, ctil, xhat, stats = self._lstm_opt_ws(ws, T, B, GH, H, proj)
        new = _alloc(lengths is not None)
        dgates = new(T, B, GH, dtype=xw.dtype)
        d_rec = new(T, B, GH, dtype=xw.dtype) if ln_h is not None else dgates
        h_prev = new(T, B, P, dtype=xw.dtype)
        dh_proj = new(T, B, P, dtype=xw.dtype) if proj else xw.new_empty(0, 0, 0)
        dh0, dc0 = torch.empty_like(h0), torch.empty_like(c0)
        d = _np(xw).dtype
        parts = _parts(B, GH * P)
        # per-thread accumulators (the kernel's row parts), summed below
        dw_ch = torch.zeros(parts, *((3, H) if w_ch is not None else (0, 0)), dtype=xw.dtype)
        zeros = lambda t: torch.zeros(parts, t.shape[0] if t is not None else 0, dtype=xw.dtype)  # noqa: E731
        d_ln_h, d_ln_c, d_ln_cb = zeros(ln_h), zeros(ln_c), zeros(ln_cb)
        _kernel(_lstm_opt.lstm_opt_bwd, parts)(
                               _np(grad_y), _np(grad_h_n), _np(grad_c_n), _np(w_hh.t().contiguous()),
                               _np(w_hr.t().contiguous()) if proj else _opt(None, 2, xw), _opt(w_ch, 2, xw),
                               _opt(ln_h, 1, xw), _opt(ln_c, 1, xw), _opt(ln_cb, 1, xw), _opt(rmask, 2, xw),
                               _opt(zmask_h, 3, xw), _opt(zmask_c, 3, xw), float(zoneout_h), float(zoneout_c), coupled,
                               _np(h0), _np(c0), _sizes(lengths, T, B), reverse, parts, _np(y), _np(gates), _np(c_all),
                               _np(ctil), _np(xhat), _np(stats), _np(dgates), _np(d_rec), _np(h_prev), _np(dh_proj),
                               _np(dh0), np.empty((B, H), d), _np(dc0), np.empty((B, P), d), _np(dw_ch), _np(d_ln_h),
                               _np(d_ln_c), _np(d_ln_cb))
        flat = dgates.reshape(T * B, GH)
        d_w_hh = d_rec.reshape(T * B, GH).t().mm(h_prev.reshape(T * B, P))
        d_b_hh = flat.sum(0) if b_hh is not None else xw.new_empty(0)
        d_w_hr = dh_proj.view(T * B, P).t().mm(hfull.reshape(T * B, H)) if proj else xw.new_empty(0)
        none = [xw.new_empty(0) for _ in range(3)]  # the masks'
        acc = lambda a, t: a.sum(0) if t is not None else xw.new_empty(0)  # noqa: E731
        return (dgates, d_w_hh, d_b_hh, d_w_hr, acc(dw_ch, w_ch), acc(d_ln_h, ln_h), acc(d_ln_c, ln_c),
                acc(d_ln_cb, ln_cb), *none, dh0, dc0)

    def gru_seq_fwd(self, xw, w_hh, b_hh, ln_h, rmask, zmask, h0, lengths, reverse, zoneout, save):
        if ln_h is None and rmask is None and zmask is None and not zoneout:
            return self._gru_plain_fwd(xw, w_hh, b_hh, h0, lengths, reverse, save)
        pad, unpad = _through_padded(xw, lengths)
        y, *rest = self._gru_opt_fwd(pad(xw), w_hh, b_hh, ln_h, rmask, zmask, h0, lengths, reverse, zoneout, save)
        return unpad(y), *rest

    def _gru_opt_fwd(self, xw, w_hh, b_hh, ln_h, rmask, zmask, h0, lengths, reverse, zoneout, save):
        T, B, GH = xw.shape
        H = h0.shape[1]
        new = _alloc(lengths is not None)
        S = T if save else 1
        buf = new(S * B * (2 * GH + H + 1), dtype=xw.dtype)
        ws = buf if save else xw.new_empty(0)
        gates, hn_all, xhat, stats = self._gru_opt_ws(buf, S, B, GH, H)
        y = new(T, B, H, dtype=xw.dtype)
        h_n = torch.empty_like(h0)
        d = _np(xw).dtype
        parts = _parts(B, GH * H)
        _kernel(_gru_opt.gru_opt_fwd, parts)(
                             _np(xw), _np(w_hh), _opt(b_hh, 1, xw), _opt(ln_h, 1, xw), _opt(rmask, 2, xw),
                             _opt(zmask, 3, xw), float(zoneout), _np(h0), _sizes(lengths, T, B), reverse,
                             parts, _np(y),
                             _np(h_n), _np(gates), _np(hn_all), _np(xhat), _np(stats), np.empty((B, H), d),
                             np.empty((B, H), d))
        return y, h_n, ws

    @staticmethod
    def _gru_opt_ws(buf, S, B, GH, H):
        views, o = [], 0
        for n in (GH, H, GH, 1):
            views.append(buf[o:o + S * B * n].view(S, B, n))
            o += S * B * n
        return views

    def gru_seq_bwd(self, grad_y, grad_h_n, xw, w_hh, b_hh, ln_h, rmask, zmask, h0, lengths, y, ws, reverse, zoneout):
        if ln_h is None and rmask is None and zmask is None and not zoneout:
            g = self._gru_plain_bwd(grad_y, grad_h_n, xw, w_hh, b_hh, h0, lengths, y, ws, reverse)
            return (*g[:3], *(xw.new_empty(0) for _ in range(3)), g[3])
        pad, unpad = _through_padded(xw, lengths)
        d_xw, *rest = self._gru_opt_bwd(pad(grad_y), grad_h_n, pad(xw), w_hh, b_hh, ln_h, rmask, zmask, h0, lengths,
                                        pad(y), ws, reverse, zoneout)
        return unpad(d_xw), *rest

    def _gru_opt_bwd(self, grad_y, grad_h_n, xw, w_hh, b_hh, ln_h, rmask, zmask, h0, lengths, y, ws, reverse, zoneout):
        T, B, GH = xw.shape
        H = h0.shape[1]
        gates, hn_all, xhat, stats = self._gru_opt_ws(ws, T, B, GH, H)
        new = _alloc(lengths is not None)
        d_xw, d_rec = new(T, B, GH, dtype=xw.dtype), new(T, B, GH, dtype=xw.dtype)
        h_prev, hm_prev = new(T, B, H, dtype=xw.dtype), new(T, B, H, dtype=xw.dtype)
        dh0 = torch.empty_like(h0)
        parts = _parts(B, GH * H)
        # per-thread accumulators (the kernel's row parts), summed below
        d_ln_h = torch.zeros(parts, GH if ln_h is not None else 0, dtype=xw.dtype)
        d_bias = torch.zeros(parts, GH, dtype=xw.dtype)
        _kernel(_gru_opt.gru_opt_bwd, parts)(
                             _np(grad_y), _np(grad_h_n), _np(w_hh.t().contiguous()), _opt(ln_h, 1, xw),
                             _opt(rmask, 2, xw), _opt(zmask, 3, xw), float(zoneout), _np(h0), _sizes(lengths, T, B),
                             reverse, parts, _np(y), _np(gates), _np(hn_all), _np(xhat), _np(stats), _np(d_xw),
                             _np(d_rec),
                             _np(h_prev), _np(hm_prev), _np(dh0), np.empty((B, H), _np(xw).dtype), _np(d_ln_h),
                             _np(d_bias))
        d_w_hh = d_rec.reshape(T * B, GH).t().mm(hm_prev.reshape(T * B, H))
        # b_hh is added after the normalization: with layer norm its gradient is the normalized product's
        d_b_hh = xw.new_empty(0) if b_hh is None else d_bias.sum(0) if ln_h is not None else \
            d_rec.reshape(T * B, GH).sum(0)
        d_ln_h = d_ln_h.sum(0) if ln_h is not None else xw.new_empty(0)
        return d_xw, d_w_hh, d_b_hh, d_ln_h, xw.new_empty(0), xw.new_empty(0), dh0

    # ---- the contract's optional fused inference cells (input projection inside, one kernel call) --------
    def lstm_cell_fwd(self, x, w_ih, b_ih, w_hh, b_hh, w_hr, w_ch, h, c, coupled):
        G = 3 if coupled else 4
        B, I, H, P, like, addr, keep = _lstm_addresses("lstm_cell_fwd", x, w_ih, b_ih, w_hh, b_hh, w_hr, w_ch, h, c,
                                                       coupled)
        h_out, c_out = x.new_empty(B, P), x.new_empty(B, H)
        parts = _parts(B, G * H * (I + P))
        _kernel(_lstm.lstm_cell, parts)(*addr[:7], bool(coupled), *addr[7:], h_out.data_ptr(), c_out.data_ptr(),
                                        B, I, H, P, parts, like)
        return h_out, c_out

    def gru_cell_fwd(self, x, w_ih, b_ih, w_hh, b_hh, h):
        B, I, H, _, like, addr, keep = _gru_checks("gru_cell_fwd", x, w_ih, b_ih, w_hh, b_hh, h)
        h_out = x.new_empty(B, H)
        parts = _parts(B, 3 * H * (I + H))
        _kernel(_gru.gru_cell, parts)(*addr, h_out.data_ptr(), B, I, H, parts, like)
        return h_out

    def rnn_cell_fwd(self, x, w_ih, b_ih, w_hh, b_hh, h, nonlinearity):
        B, I, H, _, like, addr, keep = _rnn_checks("rnn_cell_fwd", x, w_ih, b_ih, w_hh, b_hh, h, nonlinearity)
        h_out = x.new_empty(B, H)
        parts = _parts(B, H * (I + H))
        _kernel(_rnn.rnn_cell, parts)(*addr, h_out.data_ptr(), B, I, H, nonlinearity == "relu", parts, like)
        return h_out

    # ---- the contract's optional one-step training node (fastrnn.functional.train_step) ------------------
    def lstm_cell_train(self, x, w_ih, b_ih, w_hh, b_hh, h, c):
        return _CellTrain.apply("lstm", None, x, w_ih, b_ih, w_hh, b_hh, h, c)

    def gru_cell_train(self, x, w_ih, b_ih, w_hh, b_hh, h):
        return _CellTrain.apply("gru", None, x, w_ih, b_ih, w_hh, b_hh, h)

    def rnn_cell_train(self, x, w_ih, b_ih, w_hh, b_hh, h, nonlinearity):
        return _CellTrain.apply("rnn", nonlinearity, x, w_ih, b_ih, w_hh, b_hh, h)

    # ---- the contract's optional chunk and packed entries: a sequence in inference, one call a layer-direction
    #: ``<f>_chunk_fwd`` takes any dense sequence: up to CELL_ROWS rows (T x B) as one fused cell call a step
    #: (~20 us of host work a step; the sequence kernel's host work and the separate input projection cost
    #: more only below this), beyond them the input projection by torch and the sequence kernel, called
    #: straight from the modules' fast path without the general path's Python (20-50 us of a call at batch
    #: 1, benchmarks/NOTES.md, sixteenth session). ``<f>_packed_fwd`` runs the sequence kernel on a packed
    #: sequence's rows as they lie (no padded copies of the input projection and the output).
    chunk_max_rows = math.inf
    CELL_ROWS = 4

    def _chunk(self, name, cell, check, seq, x, w_ih, b_ih, weights, state, reverse, options):
        """``<f>_chunk_fwd`` (``name``): ``cell``, the fused cell entry, a call a step; ``seq(xw, H, P, like,
        addresses, sizes, T, B, reverse, *options)``: the sequence kernel's results (y, *final state) for the
        projected input, given the addresses of the tensors after w_ih and b_ih, from ``check`` (the cell entry's
        checks, ``check(name, x, ...)``, on x itself: ``seq``)."""
        if x.dim() != 3:
            raise RuntimeError(f"fastrnn numba {name}: x must be [T, B, I], got {tuple(x.shape)}")
        T, B = x.shape[:2]
        if T * B > self.CELL_ROWS:
            _, _, H, P, like, addr, keep = check(name, x, w_ih, b_ih, *weights, *state, *options, seq=True)
            # x [T, B, I] as it is where contiguous (no view made: ~0.7 us each at batch 1), else its rows
            src = _Input(x if x.is_contiguous() else x.reshape(T * B, -1), w_ih, b_ih, addr)
            y, *finals = seq(src, H, P, like, addr[3:], None, T, B, reverse, *options)
            del keep  # the contiguous copies the kernel read
            return (y if y.dim() == 3 else y.view(T, B, P), *finals)
        ys = [None] * T
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            out = cell(x[t], w_ih, b_ih, *weights, *state, *options)
            state = out if isinstance(out, tuple) else (out,)
            ys[t] = state[0]
        # y its own tensor, never h_n's memory (T == 1): streaming code feeds h_n back and may change y in place
        return (torch.stack(ys), *state)

    def _packed(self, name, check, seq, x, w_ih, b_ih, weights, state, reverse, options, lengths):
        """``<f>_packed_fwd``: x [N, I] the rows of a packed sequence, ``lengths`` its rows' lengths (int64 on
        the CPU, non-increasing), the state [B, ...] in the same order; ``check`` and ``seq`` as in ``_chunk``."""
        if x.dim() != 2:
            raise RuntimeError(f"fastrnn numba {name}: x must be [N, I] (packed rows), got {tuple(x.shape)}")
        # cpp's checks and messages (csrc/common.cpp, packed_input), in its order: the longest length is
        # bounded by x's rows before anything is sized by it
        if (lengths.dim() != 1 or lengths.dtype != torch.int64 or not lengths.is_cpu or not len(lengths)
                or not lengths.is_contiguous()):
            raise RuntimeError(f"fastrnn numba {name}: lengths must be a contiguous int64 CPU tensor of at least one "
                               f"row")
        B, T, N = len(lengths), int(lengths[0]), x.shape[0]
        if not 1 <= T <= N:
            raise RuntimeError(f"fastrnn numba {name}: lengths[0] = {T} but x has {N} rows")
        bad = ((lengths < 1) | (lengths > T)).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            raise RuntimeError(f"fastrnn numba {name}: lengths[{i}] = {int(lengths[i])} is not in 1..{T}")
        if B > 1 and bool((lengths[1:] > lengths[:-1]).any()):
            raise RuntimeError(f"fastrnn numba {name}: lengths must be non-increasing")
        sizes = torch.from_numpy(_sizes(lengths, T, B))  # a packed sequence's batch sizes
        if N != int(sizes.sum()):
            raise RuntimeError(f"fastrnn numba {name}: x has {N} rows but the lengths sum to {int(sizes.sum())}")
        _, _, H, P, like, addr, keep = check(name, x[:B], w_ih, b_ih, *weights, *state, *options)
        out = seq(_Input(x, w_ih, b_ih, addr), H, P, like, addr[3:], sizes, T, B, reverse, *options)
        del keep
        return out

    @staticmethod
    def _lstm_rows(src, H, P, like, a, sizes, T, B, reverse, coupled):
        """The LSTM's sequence kernel on the rows of ``src`` (an ``_Input``, or the input projection itself: the
        [rows, G*H] matrix of the call's rows, which the kernel reads by address; a: the addresses of w_hh,
        b_hh, w_hr, w_ch, h0, c0; sizes: a packed sequence's batch sizes, None for dense); (y [rows, P] (or [T,
        B, P] for an input [T, B, I]), h_n, c_n)."""
        GH = 3 * H if coupled else 4 * H
        lead, n = _lead_rows(src)
        parts = _parts(B, GH * P, max(H, P), n)
        rows = _row_parts(B, sizes, parts, GH * P + (P * H if a[2] else 0), like)
        xw, proj = _rows_input(src, GH, like, rows or parts)
        y, h_n, c_n = xw.new_empty(*lead, P), xw.new_empty(B, P), xw.new_empty(B, H)
        _kernel(_lstm.lstm_seq_at, rows or parts)(
            xw.data_ptr(), *a[:4], bool(coupled), *a[4:], y.data_ptr(), h_n.data_ptr(), c_n.data_ptr(),
            0 if sizes is None else sizes.data_ptr(), T, B, H, P, bool(reverse), rows or parts, rows > 0, like, *proj,
            PANEL_MIN_ROWS)
        return y, h_n, c_n

    @staticmethod
    def _gru_rows(src, H, P, like, a, sizes, T, B, reverse):
        """``_lstm_rows`` for the GRU (a: w_hh, b_hh, h0)."""
        lead, n = _lead_rows(src)
        parts = _parts(B, 3 * H * H, H, n)
        rows = _row_parts(B, sizes, parts, 3 * H * H, like)
        xw, proj = _rows_input(src, 3 * H, like, rows or parts)
        y, h_n = xw.new_empty(*lead, H), xw.new_empty(B, H)
        _kernel(_gru.gru_seq_at, rows or parts)(xw.data_ptr(), *a, y.data_ptr(), h_n.data_ptr(),
                                                0 if sizes is None else sizes.data_ptr(), T, B, H, bool(reverse),
                                                rows or parts, rows > 0, like, *proj, PANEL_MIN_ROWS)
        return y, h_n

    @staticmethod
    def _rnn_rows(src, H, P, like, a, sizes, T, B, reverse, nonlinearity):
        """``_lstm_rows`` for the RNN (a: w_hh, b_hh, h0)."""
        lead, n = _lead_rows(src)
        parts = _parts(B, H * H, H, n)
        rows = _row_parts(B, sizes, parts, H * H, like)
        xw, proj = _rows_input(src, H, like, rows or parts)
        y, h_n = xw.new_empty(*lead, H), xw.new_empty(B, H)
        _kernel(_rnn.rnn_seq_at, rows or parts)(xw.data_ptr(), *a, y.data_ptr(), h_n.data_ptr(),
                                                0 if sizes is None else sizes.data_ptr(), T, B, H, bool(reverse),
                                                nonlinearity == "relu", rows or parts, rows > 0, like, *proj,
                                                PANEL_MIN_ROWS)
        return y, h_n

    def lstm_chunk_fwd(self, x, w_ih, b_ih, w_hh, b_hh, w_hr, w_ch, h0, c0, reverse, coupled):
        return self._chunk("lstm_chunk_fwd", self.lstm_cell_fwd, _lstm_addresses, self._lstm_rows, x, w_ih, b_ih,
                           (w_hh, b_hh, w_hr, w_ch), (h0, c0), reverse, (coupled,))

    def gru_chunk_fwd(self, x, w_ih, b_ih, w_hh, b_hh, h0, reverse):
        return self._chunk("gru_chunk_fwd", self.gru_cell_fwd, _gru_checks, self._gru_rows, x, w_ih, b_ih,
                           (w_hh, b_hh), (h0,), reverse, ())

    def rnn_chunk_fwd(self, x, w_ih, b_ih, w_hh, b_hh, h0, reverse, nonlinearity):
        return self._chunk("rnn_chunk_fwd", self.rnn_cell_fwd, _rnn_checks, self._rnn_rows, x, w_ih, b_ih,
                           (w_hh, b_hh), (h0,), reverse, (nonlinearity,))

    def lstm_packed_fwd(self, x, w_ih, b_ih, w_hh, b_hh, w_hr, w_ch, h0, c0, reverse, coupled, lengths):
        return self._packed("lstm_packed_fwd", _lstm_addresses, self._lstm_rows, x, w_ih, b_ih,
                            (w_hh, b_hh, w_hr, w_ch), (h0, c0), reverse, (coupled,), lengths)

    def gru_packed_fwd(self, x, w_ih, b_ih, w_hh, b_hh, h0, reverse, lengths):
        return self._packed("gru_packed_fwd", _gru_checks, self._gru_rows, x, w_ih, b_ih, (w_hh, b_hh), (h0,),
                            reverse, (), lengths)

    def rnn_packed_fwd(self, x, w_ih, b_ih, w_hh, b_hh, h0, reverse, nonlinearity, lengths):
        return self._packed("rnn_packed_fwd", _rnn_checks, self._rnn_rows, x, w_ih, b_ih, (w_hh, b_hh), (h0,),
                            reverse, (nonlinearity,), lengths)

    # ---- RNN -------------------------------------------------------------------------------------
    def rnn_seq_fwd(self, xw, w_hh, b_hh, h0, lengths, reverse, nonlinearity, save):
        L = _Layout(xw, lengths)
        T, B, H = L.T, L.B, xw.shape[-1]
        y = L.steps(H, xw)
        h_n = torch.empty_like(h0)
        parts = _parts(B, H * H, H, T * B)
        rows = _row_parts(B, L.ragged, parts, H * H, _np(xw))
        if rows:
            _kernel(_rnn.rnn_fwd_rows, rows)(_rows(xw), _np(w_hh), _opt(b_hh, 1, xw), _np(h0), T, reverse,
                                             nonlinearity == "relu", rows, _rows(y, out=True), _np(h_n),
                                             PANEL_MIN_ROWS)
            return y, h_n, xw.new_empty(0)
        h_a, h_b = _lines(B, H, like=xw), _lines(B, H, like=xw)
        _kernel(_rnn.rnn_fwd, parts)(_rows(xw), _np(w_hh), _opt(b_hh, 1, xw), _np(h0), L.sizes, L.offs, reverse,
                                     nonlinearity == "relu", parts, _rows(y, out=True), _np(h_n), h_a, h_b,
                                     PANEL_MIN_ROWS)
        return y, h_n, xw.new_empty(0)

    def rnn_seq_bwd(self, grad_y, grad_h_n, xw, w_hh, b_hh, h0, lengths, y, ws, reverse, nonlinearity):
        L = _Layout(xw, lengths)
        T, B, H = L.T, L.B, xw.shape[-1]
        d_xw, h_prev = L.steps(H, xw), L.steps(H, xw)
        dh0 = torch.empty_like(h0)
        parts, rows = _bwd_split(B, T, H * H, H, L.ragged, H * H, _np(xw))
        _kernel(_rnn.rnn_bwd_rows if rows else _rnn.rnn_bwd, rows or parts)(
            _rows(grad_y), _np(grad_h_n), _np(w_hh.t().contiguous()), _np(h0), L.sizes, L.offs, reverse,
            nonlinearity == "relu", rows or parts, _rows(y), _rows(d_xw, out=True), _rows(h_prev, out=True),
            _np(dh0), PANEL_MIN_ROWS)
        d_w_hh, d_b_hh = recurrent_weight_grads(d_xw, h_prev, b_hh, self.mm)
        return d_xw, d_w_hh, d_b_hh, dh0


class _CellTrain(torch.autograd.Function):
    """A cell's step in training with the input projection inside, one autograd node (the contract's
    optional ``<family>_cell_train``): the forward is the fused cell's kernel keeping its gates
    (``<family>_cell_train`` in numba_kernels), the backward a pointwise kernel for the gates' gradients
    and torch's products; a backward under create_graph recomputes the step with recorded ops (the
    reference backend's cell) and differentiates it again. cpp's node is C++ (csrc/cell_train.h); this one
    pays a Python Function's apply and backward (benchmarks/NOTES.md, twenty-first session)."""

    @staticmethod
    def forward(ctx, family, nonlinearity, x, w_ih, b_ih, w_hh, b_hh, *state):
        name = f"{family}_cell_train"
        seq = _seq_form(name, x, state)
        ctx.save_for_backward(x, w_ih, b_ih, w_hh, b_hh, *state)  # ws added below
        if seq:  # the kernels read the 2-D views; the outputs are allocated [1, B, H] (not views: see below)
            x, state = x[0], [s[0] for s in state]
        shape = (1, *state[0].shape) if seq else state[0].shape
        if family == "lstm":
            B, I, H, _, like, addr, keep = _lstm_addresses(name, x, w_ih, b_ih, w_hh, b_hh, None, None, *state, False)
            out = (x.new_empty(shape), x.new_empty(shape))
            ws = x.new_empty(B * 5 * H)
            parts = _parts(B, 4 * H * (I + H))
            _kernel(_lstm.lstm_cell_train, parts)(*addr[:5], *addr[7:], out[0].data_ptr(), out[1].data_ptr(),
                                                   ws.data_ptr(), B, I, H, parts, like)
        elif family == "gru":
            B, I, H, _, like, addr, keep = _gru_checks(name, x, w_ih, b_ih, w_hh, b_hh, *state)
            out, ws = (x.new_empty(shape),), x.new_empty(B * 4 * H)
            parts = _parts(B, 3 * H * (I + H))
            _kernel(_gru.gru_cell_train, parts)(*addr, out[0].data_ptr(), ws.data_ptr(), B, I, H, parts, like)
        else:
            B, I, H, _, like, addr, keep = _rnn_checks(name, x, w_ih, b_ih, w_hh, b_hh, *state, nonlinearity)
            out, ws = (x.new_empty(shape),), x.new_empty(B, H)
            parts = _parts(B, H * (I + H))
            _kernel(_rnn.rnn_cell_train, parts)(*addr, out[0].data_ptr(), ws.data_ptr(), B, I, H,
                                                nonlinearity == "relu", parts, like)
        ctx.family, ctx.nonlinearity, ctx.seq, ctx.ws = family, nonlinearity, seq, ws
        # a custom Function's output that is a view may not be changed in place (torch.nn's may): fresh
        # tensors, y a copy of h' in the sequence form
        return (out[0].clone(), *out) if seq else out if family == "lstm" else out[0]

    @staticmethod
    def backward(ctx, *grads):
        x, w_ih, b_ih, w_hh, b_hh, *state = ctx.saved_tensors
        family, need, seq, ws = ctx.family, ctx.needs_input_grad[2:], ctx.seq, ctx.ws  # need: x, w_ih, ..., *state
        if torch.is_grad_enabled() or not all(map(_by_address, grads)):
            return (None, None, *_recomputed_grads(family, ctx.nonlinearity, (x, w_ih, b_ih, w_hh, b_hh, *state),
                                                   grads, seq))
        if seq:  # y's gradient joins h's; the 2-D views for the kernels
            grads = ((grads[0] + grads[1])[0], *(g[0] for g in grads[2:]))
            x, state = x[0], [s[0] for s in state]
        state = [s.resolve_neg().contiguous() for s in state]
        B, H = state[0].shape
        like = _LIKE[x.dtype]
        dh1 = grads[0].contiguous()
        dh_direct = dc = None
        if family == "rnn":
            dxw = dhw = dh1 * ws.view(B, H)
        elif family == "gru":
            dxw, dhw, dh_direct = x.new_empty(B, 3 * H), x.new_empty(B, 3 * H), x.new_empty(B, H)
            _gru.gru_cell_train_bwd(dh1.data_ptr(), ws.data_ptr(), state[0].data_ptr(), dxw.data_ptr(),
                                    dhw.data_ptr(), dh_direct.data_ptr(), B, H, like)
        else:
            dxw, dc = x.new_empty(B, 4 * H), x.new_empty(B, H)
            dhw = dxw
            dc1 = grads[1].contiguous()  # held while the kernel reads it by address
            _lstm.lstm_cell_train_bwd(dh1.data_ptr(), dc1.data_ptr(), ws.data_ptr(), state[1].data_ptr(),
                                      dxw.data_ptr(), dc.data_ptr(), B, H, like)
        dx = dxw.mm(w_ih) if need[0] else None
        dw_ih = dxw.t().mm(x) if need[1] else None
        db_ih = dxw.sum(0) if b_ih is not None and need[2] else None
        dw_hh = dhw.t().mm(state[0]) if need[3] else None
        db_hh = None
        if b_hh is not None and need[4]:  # a tensor of its own where it equals db_ih (each parameter its .grad)
            db_hh = db_ih.clone() if dhw is dxw and db_ih is not None else dhw.sum(0)
        dh = None
        if need[5]:
            dh = dhw.mm(w_hh) if dh_direct is None else torch.addmm(dh_direct, dhw, w_hh)
        dc = dc if family == "lstm" and need[6] else None
        if seq:
            dx, dh, dc = (None if g is None else g.unsqueeze(0) for g in (dx, dh, dc))
        return None, None, dx, dw_ih, db_ih, dw_hh, db_hh, dh, *((dc,) if family == "lstm" else ())


def _seq_form(name, x, state):
    """Is a ``<family>_cell_train`` call in the sequence form (x [1, B, I] and each state [1, B, H]: a
    one-step sequence's layer-direction as the sequence holds it, so that no select, unsqueeze or stack is
    recorded around the node; it returns (y, *new state), each [1, B, H]) or the cell form (2-D)? As cpp's
    ``seq_form`` (csrc/cell_train.h)."""
    seq = x.dim() == 3
    if (seq and x.shape[0] != 1) or any(s.dim() != x.dim() or (seq and s.shape[0] != 1) for s in state):
        raise RuntimeError(f"fastrnn numba {name}: x and the state must be [B, I] and [B, H], or [1, B, I] and "
                           f"[1, B, H]: got {tuple(x.shape)} and {[tuple(s.shape) for s in state]}")
    return seq


def _by_address(g):
    """Can the backward's kernel read this incoming gradient by address? Not a vmap-batched one
    (is_grads_batched), autograd's zero tensor or a negated view."""
    return torch._C._has_storage(g) and not (g._is_zerotensor() or g.is_neg())


def _recomputed_grads(family, nonlinearity, inputs, grads, seq):
    """``_CellTrain``'s backward where it must itself be differentiable (create_graph) or its kernel cannot
    read the gradients (``_by_address``): the step recomputed with recorded ops (the reference backend's
    cell on the projected input) on aliases of ``inputs``, and its vector-Jacobian product with ``grads``
    with respect to those aliases (the paths between the inputs, h from an earlier step of the same weights,
    are the outer backward's), the graph kept under create_graph. One gradient per input (None where it
    needs none). ``seq``: the sequence form (x and the state [1, B, *], the outputs (y, *new state)). As cpp's
    ``recompute_grads`` (csrc/cell_train.h)."""
    from . import reference

    create = torch.is_grad_enabled()
    with torch.enable_grad():
        inputs = [t.view_as(t) if t is not None and t.requires_grad else t for t in inputs]
        x, w_ih, b_ih, w_hh, b_hh, *state = inputs
        if seq:
            x, state = x[0], [s[0] for s in state]
        xw = torch.nn.functional.linear(x, w_ih, b_ih)
        if family == "lstm":
            outs = reference.lstm_cell(xw, w_hh, b_hh, *([None] * 8), *state, False, 0.0, 0.0)
        elif family == "gru":
            outs = reference.gru_cell(xw, w_hh, b_hh, None, None, None, *state, 0.0)
        else:
            outs = reference.rnn_cell(xw, w_hh, b_hh, *state, nonlinearity)
        if seq:
            outs = [o.unsqueeze(0) for o in (outs[0], *outs)]
    wrt = [k for k, t in enumerate(inputs) if t is not None and t.requires_grad]
    res = [None] * len(inputs)
    if wrt:
        got = torch.autograd.grad(outs, [inputs[k] for k in wrt], grads, create_graph=create, allow_unused=True)
        for k, g in zip(wrt, got):
            res[k] = g
    return res


#: an empty array of each dtype the fused cells take: it gives the kernels their element type
_LIKE = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}
_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def _cell_addresses(name, x, weights, states, G, seq=False):
    """Check a fused cell call's tensors (x; w_ih, b_ih, w_hh, b_hh and an LSTM's w_hr, w_ch, None when
    absent; the state) and return (B, I, H, P, the dtype's empty array, their data addresses (0 for
    None), the contiguous copies made of any that were not, to keep alive during the call). The kernels
    read them by address, unchecked: RuntimeError for what they cannot take (the module's general path
    then raises torch's error). Cheap on purpose: a batch-1 cell call is a few microseconds of kernel
    (benchmarks/NOTES.md), so a tensor that needs nothing costs five attribute reads and no more. ``seq``: a
    chunk's x [T, B, I], checked for its shape only (``_rows_input`` takes it; its address 0 here)."""
    dt = x.dtype
    like = _LIKE.get(dt)
    if like is None:
        raise RuntimeError(f"fastrnn numba {name}: every tensor must be float32 or float64, of one dtype")
    h, c = states[0], states[-1]
    xs, hs = x.shape, h.shape  # each shape read once (a read makes a torch.Size: ~70 ns)
    cs = hs if c is h else c.shape
    if len(xs) != (3 if seq else 2) or len(hs) != 2 or len(cs) != 2:
        raise RuntimeError(f"fastrnn numba {name}: x and the state must be 2-D (x [T, B, I] for a chunk)")
    B, I = xs[-2], xs[-1]
    P, H = hs[1], cs[1]
    GH = G * H
    w_ih, b_ih, w_hh, b_hh = weights[:4]
    if (w_ih.shape != (GH, I) or w_hh.shape != (GH, P) or hs[0] != B or cs[0] != B
            or (b_ih is not None and b_ih.shape != (GH,)) or (b_hh is not None and b_hh.shape != (GH,))):
        raise RuntimeError(f"fastrnn numba {name}: shapes do not fit together: x {tuple(xs)}, w_ih "
                           f"{tuple(w_ih.shape)}, w_hh {tuple(w_hh.shape)}, state {[tuple(s.shape) for s in states]}")
    addr, keep = [0] if seq else [], []  # a chunk's x goes to _rows_input, not by this address
    try:
        for t in (*weights, *states) if seq else (x, *weights, *states):
            if t is None:
                addr.append(0)
            elif t.dtype is dt and t.is_cpu and t.is_contiguous() and not t.is_neg() and (a := t.data_ptr()):
                addr.append(a)
            else:
                addr.append(_address_of_copy(t, dt, keep))
    except (RuntimeError, TypeError) as e:  # a sparse tensor, say
        raise RuntimeError(f"fastrnn numba {name}: {e}") from None
    return B, I, H, P, like, addr, keep


def _project(x, w_ih, b_ih):
    """The input projection of a chunk or packed call's rows, in x's dtype whatever autocast is on (the
    kernels read it by address as that dtype). The modules call without autocast: the context is entered only
    when some autocast is on (it costs a few microseconds of a batch-1 call)."""
    if torch._C._is_any_autocast_enabled():
        with torch.autocast("cpu", enabled=False):
            return torch.nn.functional.linear(x, w_ih, b_ih).contiguous()
    return torch.nn.functional.linear(x, w_ih, b_ih).contiguous()


class _Input(tuple):
    """A chunk or packed call's input before its projection: (x [rows, I] or [T, B, I], w_ih, b_ih, the addresses
    of ``_cell_addresses``), for ``_rows_input``."""
    __slots__ = ()
    shape = property(lambda self: self[0].shape)

    def __new__(cls, x, w_ih, b_ih, addr):
        return tuple.__new__(cls, (x, w_ih, b_ih, addr))


#: -1: the rule (``_rows_input``), 0 / 1: never / wherever a call allows it (tests, A/B); FUSED_CALLS counts the
#: calls that projected inside the kernel (the tests check that the path ran)
FUSE_PROJECTION = -1
FUSED_CALLS = 0
#: on one thread, the entry projects up to this many multiply-adds (torch's product, on all threads, wins
#: above: ~110 GFLOP/s a core for panel.project against ~200 for torch's on two)
FUSE_SERIAL_MACS = 1 << 22


def _lead_rows(src):
    """(the leading dimensions of a sequence entry's input, [T, B] or [rows], and its number of rows)."""
    lead = src.shape[:-1]
    return lead, (lead[0] * lead[1] if len(lead) == 2 else lead[0])


def _rows_input(src, GH, like, parts):
    """(the matrix a sequence entry reads by address, the entry's w_ih and b_ih addresses and I: 0 where the host
    projected): for an ``_Input`` whose
    x is a contiguous matrix of the kernel's dtype, x itself and (w_ih's and b_ih's addresses, I), so that the
    entry projects first in its own threads (panel.project), where the call runs on several (``parts`` > 1) or
    the product is small (FUSE_SERIAL_MACS). Torch's product ran on torch's threads, whose spinning after it
    held up the team's start, and its call costs a few microseconds: the entry's took the calls 1.07-1.27x
    (several threads) and 1.1-1.2x (one; benchmarks/NOTES.md, twenty-eighth session). Else the input
    projection by torch, checked."""
    global FUSED_CALLS
    if not isinstance(src, _Input):
        _check_rows(src, GH, like)
        return src, (0, 0, 0)
    x, w_ih, b_ih, addr = src
    rule = parts > 1 or x.numel() * GH <= FUSE_SERIAL_MACS
    if ((FUSE_PROJECTION == 1 or (FUSE_PROJECTION == -1 and rule)) and x.is_contiguous()
            and x.dtype == _DTYPE[like.dtype.type] and x.is_cpu and not x.is_neg() and x.data_ptr()):
        FUSED_CALLS += 1
        return x, (addr[1], addr[2], x.shape[-1])
    xw = _project(x, w_ih, b_ih)
    _check_rows(xw, GH, like)
    return xw, (0, 0, 0)


def _check_rows(xw, GH, like):
    """Before a sequence kernel reads ``xw`` by address: contiguous rows of G*H of the kernel's dtype ([rows, G*H],
    or [T, B, G*H] from a chunk's input)."""
    if (xw.dim() not in (2, 3) or xw.shape[-1] != GH or not xw.is_contiguous()
            or xw.dtype != _DTYPE[like.dtype.type]):
        raise RuntimeError(f"fastrnn numba: the input projection must be a contiguous [rows, {GH}] (or [T, B, {GH}]) "
                           f"tensor of {_DTYPE[like.dtype.type]}, got {tuple(xw.shape)} {xw.dtype}")


def _address_of_copy(t, dt, keep):
    """``_cell_addresses`` for a tensor the kernels cannot read as it is: another dtype or device (refused),
    non-contiguous or with the negative bit (a contiguous copy of its values), a ZeroTensor (autograd's:
    values without storage; zeros). The copy goes to ``keep``."""
    if t.dtype != dt or not t.is_cpu:
        raise RuntimeError(f"every tensor must be float32 or float64, of one dtype, on the CPU: x is "
                           f"{dt}, another {t.dtype} on {t.device}")
    if t.is_neg() or not t.is_contiguous():  # the kernels read the stored values, as they lie
        t = t.resolve_neg().contiguous()
    if not t.data_ptr() and t.numel():
        t = torch.zeros(t.shape, dtype=dt, device="cpu")
    keep.append(t)
    return t.data_ptr()


def _lstm_addresses(name, x, w_ih, b_ih, w_hh, b_hh, w_hr, w_ch, h, c, coupled, seq=False):
    """``_cell_addresses`` for the LSTM, with its projection and peephole weights checked."""
    out = _cell_addresses(name, x, (w_ih, b_ih, w_hh, b_hh, w_hr, w_ch), (h, c), 3 if coupled else 4, seq)
    H, P = out[2], out[3]
    if (P != H) if w_hr is None else w_hr.shape != (P, H):
        raise RuntimeError(f"fastrnn numba {name}: h is [B, {P}] and c [B, {H}], so w_hr must be "
                           f"[{P}, {H}] (or absent with P == H)")
    if w_ch is not None and w_ch.shape != (3, H):
        raise RuntimeError(f"fastrnn numba {name}: w_ch must be [3, {H}], got {tuple(w_ch.shape)}")
    return out


def _gru_checks(name, x, w_ih, b_ih, w_hh, b_hh, h, seq=False):
    """``_cell_addresses`` for the GRU."""
    return _cell_addresses(name, x, (w_ih, b_ih, w_hh, b_hh), (h,), 3, seq)


def _rnn_checks(name, x, w_ih, b_ih, w_hh, b_hh, h, nonlinearity, seq=False):
    """``_cell_addresses`` for the RNN, with its nonlinearity checked."""
    if nonlinearity not in ("tanh", "relu"):
        raise RuntimeError(f"fastrnn numba {name}: unknown nonlinearity {nonlinearity!r}")
    return _cell_addresses(name, x, (w_ih, b_ih, w_hh, b_hh), (h,), 1, seq)


BACKEND = NumbaBackend()
