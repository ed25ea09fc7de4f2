"""The triton backend: fused Triton kernels for CUDA tensors (CPU tensors under TRITON_INTERPRET=1).

Host side only: allocate, choose the path and block sizes, launch the kernels of ``triton_kernels``.

- Forward, H <= SEQ_MAX_H and no projection: one whole-sequence launch per layer-direction
  (``<family>.fwd_seq``): each program owns 16 batch rows, holds W_hh on chip and loops over time.
- Otherwise one ``fwd_step`` launch per time step (plus the projection's matmul for an LSTM with
  proj_size), and always one ``bwd_step`` launch per step in the backward. The weight gradients are
  large matmuls after the loop (cuBLAS through torch).
- Variable lengths: step t launches only over its batch_sizes[t] rows; the sequence kernel ends each
  batch tile's loop at its longest row. float32 (TF32 when torch's ``allow_tf32`` says so), float16 and
  bfloat16 with fp32 accumulation; the cell state between steps and everything saved for the backward
  are fp32 (fp64 for fp64, which the interpreter runs for the parity tests).
- No host synchronisation inside the time loop: the per-step path can be captured in a CUDA graph
  (``fastrnn.cuda_graphed``).
"""
from __future__ import annotations

import os

import torch

from . import Backend, _common
from ._common import StepsFromSequence, batch_sizes_from_lengths, fwd_dims, recurrent_weight_grads

try:
    import triton
    import triton.language as tl
    from .triton_kernels import gru as _gru
    from .triton_kernels import lstm as _lstm
    from .triton_kernels import rnn as _rnn
    _IMPORT_ERROR = None
except ImportError as e:  # triton missing or broken: the backend is unavailable, fastrnn still imports
    triton = tl = None
    _IMPORT_ERROR = e

# the whole-sequence forward kernel serves hidden sizes up to this (W_hh held in registers: larger
# sizes spill on sm_80/sm_90, see benchmarks/NOTES.md "Triton compile check")
SEQ_MAX_H = 64
BB = 16  # batch rows per program (tl.dot needs at least 16)
BK = 32  # reduction block of the step kernels
NUM_WARPS = 4


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _prec(dtype):
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def seq_hp(H):
    """Padded hidden size of the whole-sequence kernel."""
    return max(16, triton.next_power_of_2(H))


def step_bh(n_rows, H):
    """Hidden units per program of a forward step: 16 when the batch is small, so more programs (SMs)
    share the reads of W_hh; 32 otherwise."""
    return 16 if n_rows <= 16 else 32


# warps of the whole-sequence kernel per (family, padded H): (fp32, 16-bit dtypes). The fewest that compile
# without register spills on sm_80 and sm_90 (python -m benchmarks.triton_compile; benchmarks/NOTES.md):
# W_hh lives in registers, so more warps are needed as H grows, and fewer for 16-bit weights.
SEQ_WARPS = {("lstm", 16): (4, 4), ("lstm", 32): (8, 4), ("lstm", 64): (16, 8),
             ("gru", 16): (4, 4), ("gru", 32): (8, 8), ("gru", 64): (8, 8),
             ("rnn", 16): (4, 4), ("rnn", 32): (4, 4), ("rnn", 64): (8, 8)}


def seq_warps(family, HP, dtype):
    return SEQ_WARPS[family, HP][0 if dtype in (torch.float32, torch.float64) else 1]


def _new(varlen):
    return torch.zeros if varlen else torch.empty


def _prev_hist(hist, init, lengths, reverse):
    """[T, B, X]: the state each step started from, given the states after each step (``hist``)."""
    init = init.to(hist.dtype)
    if not reverse:
        return torch.cat([init[None], hist[:-1]])
    prev = torch.cat([hist[1:], init[None]])
    if lengths is not None:  # a row's first reverse step is its last position
        T = hist.shape[0]
        t = torch.arange(T, device=hist.device)[:, None]
        first = (t + 1 >= lengths.to(hist.device)[None, :])[..., None]
        prev = torch.where(first, init[None], prev)
    return prev


def _final_rows(y, lengths, reverse):
    """h_n from y: each row's output at its last step (a view where it can be; the caller copies it)."""
    if reverse:
        return y[0]
    if lengths is None:
        return y[-1]
    return y[(lengths - 1).to(y.device), torch.arange(y.shape[1], device=y.device)]


def _schedule(sizes, T, reverse, backward):
    """Per launched step: (t, n, n_cont, n_last, prev), ``prev`` the step whose outputs it continues
    from (None: from the initial state) in the direction of the pass."""
    sizes = list(sizes) + [0]
    ahead = reverse != backward  # the pass runs t = T-1 .. 0
    order = range(T - 1, -1, -1) if ahead else range(T)
    out = []
    for t in order:
        n = sizes[t]
        if n == 0:
            continue
        if ahead:  # rows [sizes[t+1], n) begin here; continuing rows came from t+1
            n_cont, n_last = sizes[t + 1], (0 if t == 0 else n)
            prev = t + 1 if t + 1 < T and sizes[t + 1] > 0 else None
        else:  # every row continues from t-1 (except at t = 0); rows [sizes[t+1], n) end here
            n_cont, n_last = (0 if t == 0 else n), sizes[t + 1]
            prev = t - 1 if t > 0 else None
        out.append((t, n, n_cont, n_last, prev))
    return out


@_common.without_cell_options
class TritonBackend(StepsFromSequence, Backend):
    name = "triton"
    features = frozenset({"proj", "peephole", "coupled", "varlen"})

    @property
    def devices(self):
        return ("cuda", "cpu") if interpreting() else ("cuda",)

    @property
    def dtypes(self):
        if interpreting():  # the interpreter mis-reads bfloat16 tensors (triton 3.9)
            return (torch.float16, torch.float32, torch.float64)
        return (torch.float16, torch.bfloat16, torch.float32)

    def unavailable_reasons(self):
        if _IMPORT_ERROR is not None:
            return [f"triton is not importable ({_IMPORT_ERROR}); install it with pip install triton"]
        if not interpreting() and not torch.cuda.is_available():
            return ["no CUDA device here (TRITON_INTERPRET=1 runs it on CPU tensors in Triton's interpreter)"]
        return []

    # ---- workspace --------------------------------------------------------------------------------
    def workspace_numel(self, op, *args):
        if not args[-1]:  # save=False: inference keeps nothing
            return 0
        family, scope, T, B, GH, H, P, proj = fwd_dims(op, args)
        n_acc = {"lstm": T * B * (GH + H + (H if proj else 0)), "gru": T * B * 4 * H, "rnn": 0}[family]
        dtype = args[0].dtype
        n = n_acc * (_acc(dtype).itemsize // dtype.itemsize)  # saved values are fp32 for 16-bit dtypes
        return n + (B * P if scope == "step" else 0)  # a step also keeps its output h (xw's dtype)

    @staticmethod
    def _ws(ws, n_acc, dtype):
        """The fp32/fp64 view of the first n_acc saved values of a workspace."""
        acc = _acc(dtype)
        return ws[:n_acc * acc.itemsize // dtype.itemsize].view(acc)

    # ---- LSTM -------------------------------------------------------------------------------------
    def lstm_seq_fwd(self, xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, reverse, coupled, save):
        T, B, GH = xw.shape
        H, P = c0.shape[1], h0.shape[1]
        proj, varlen, dev = w_hr is not None, lengths is not None, xw.device
        acc = _acc(xw.dtype)
        n_acc = T * B * (GH + H + (H if proj else 0))
        # the contract's argument list (no cell options: without_cell_options took them off)
        ws = _new(varlen)(self.workspace_numel("lstm_seq_fwd", xw, w_hh, b_hh, w_hr, w_ch, *[None] * 6, h0, c0, save),
                          dtype=xw.dtype, device=dev)
        saved = self._ws(ws, n_acc, xw.dtype) if save else None
        y = _new(varlen)(T, B, P, dtype=xw.dtype, device=dev)
        h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
        if T == 0:
            return y, h_n.copy_(h0), c_n.copy_(c0), ws
        opts = dict(PEEP=w_ch is not None, COUPLED=coupled, SAVE=save, ACC=_tl_acc(xw.dtype), PREC=_prec(xw.dtype))
        gates = saved[:T * B * GH].view(T, B, GH) if save else xw
        c_all = saved[T * B * GH:T * B * (GH + H)].view(T, B, H) if save else xw
        if not proj and H <= SEQ_MAX_H:
            HP = seq_hp(H)
            lens = lengths.to(dev) if varlen else xw
            _lstm.fwd_seq[(triton.cdiv(B, BB),)](
                xw, w_hh, b_hh if b_hh is not None else xw, w_ch if w_ch is not None else xw, h0, c0, lens, y,
                h_n, c_n, gates, c_all, T, B, H, HAS_LEN=varlen, REVERSE=reverse, HAS_BIAS=b_hh is not None,
                BB=BB, HP=HP, num_warps=seq_warps("lstm", HP, xw.dtype), **opts)
            return y, h_n, c_n, ws
        if not save:  # two c slots used in turn; the unprojected h of the current step
            c_all = torch.empty(2, B, H, dtype=acc, device=dev)
        m_all = saved[T * B * (GH + H):].view(T, B, H) if (save and proj) else \
            torch.empty(1, B, H, dtype=acc, device=dev)
        w_hr_t = w_hr.t().to(acc) if proj else None
        BH = step_bh(B, H)
        slot = {}
        for k, (t, n, n_cont, n_last, prev) in enumerate(_schedule(batch_sizes_from_lengths(lengths, T, B), T,
                                                                   reverse, backward=False)):
            ct = t if save else k % 2
            mt = t if save else 0
            slot[t] = ct
            h_out = m_all[mt] if proj else y[t]
            _lstm.fwd_step[(triton.cdiv(n, BB), triton.cdiv(H, BH))](
                xw[t], w_hh, b_hh if b_hh is not None else xw, w_ch if w_ch is not None else xw,
                y[prev] if prev is not None else h0, h0, c_all[slot[prev]] if prev is not None else c0, c0,
                h_out, c_all[ct], c_n, gates[t] if save else xw, n, n_cont, n_last, H, P,
                HAS_BIAS=b_hh is not None, BB=BB, BH=BH, BK=BK, num_warps=NUM_WARPS, **opts)
            if proj and acc == xw.dtype:
                torch.mm(m_all[mt, :n], w_hr_t, out=y[t, :n])
            elif proj:  # 16-bit: the fp32 product, rounded into y
                y[t, :n] = torch.mm(m_all[mt, :n], w_hr_t)
        h_n.copy_(_final_rows(y, lengths, reverse))
        return y, h_n, c_n, ws

    def lstm_seq_bwd(self, grad_y, grad_h_n, grad_c_n, xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, y, ws,
                     reverse, coupled):
        T, B, GH = xw.shape
        H, P = c0.shape[1], h0.shape[1]
        proj, varlen, dev = w_hr is not None, lengths is not None, xw.device
        acc = _acc(xw.dtype)
        G = GH // H
        saved = self._ws(ws, T * B * (GH + H + (H if proj else 0)), xw.dtype)
        gates = saved[:T * B * GH].view(T, B, GH)
        c_all = saved[T * B * GH:T * B * (GH + H)].view(T, B, H)
        d_gates = _new(varlen)(T, B, GH, dtype=xw.dtype, device=dev)
        rec_h = torch.empty(2, B, P, dtype=acc, device=dev)
        rec_c = torch.empty(2, B, H, dtype=acc, device=dev)
        dh0, dc0 = torch.empty_like(h0), torch.empty_like(c0)
        if proj:
            m_all = saved[T * B * (GH + H):].view(T, B, H)
            w_hr_a = w_hr.to(acc)
            dht_all = _new(varlen)(T, B, P, dtype=acc, device=dev)
            dm = torch.empty(B, H, dtype=acc, device=dev)
        sizes = batch_sizes_from_lengths(lengths, T, B)
        fwd_sched = {t: (n_cont, prev) for t, _, n_cont, _, prev in _schedule(sizes, T, reverse, backward=False)}
        opts = dict(PEEP=w_ch is not None, COUPLED=coupled, ACC=_tl_acc(xw.dtype), PREC=_prec(xw.dtype))
        BP = step_bh(B, P)
        for k, (t, n, n_cont, n_last, _) in enumerate(_schedule(sizes, T, reverse, backward=True)):
            src, dst = rec_h[(k + 1) % 2], rec_h[k % 2]
            csrc, cdst = rec_c[(k + 1) % 2], rec_c[k % 2]
            if proj:  # dh_t of the projected output, then through the projection
                dht = dht_all[t, :n]
                dht.copy_(grad_y[t, :n])
                dht[:n_cont] += src[:n_cont]
                dht[n_cont:] += grad_h_n[n_cont:n]
                torch.mm(dht, w_hr_a, out=dm[:n])
            n_cprev, fprev = fwd_sched[t]
            _lstm.bwd_step[(triton.cdiv(n, BB), triton.cdiv(P, BP))](
                dm if proj else grad_y[t], src, grad_h_n, csrc, grad_c_n, gates[t], c_all[t],
                c_all[fprev] if fprev is not None else c0, c0, w_hh, w_ch if w_ch is not None else xw,
                d_gates[t], dst, cdst, dh0, dc0, n, n_cont, n_cprev, n_last, H, P, ADD_REC_H=not proj,
                BB=BB, BP=BP, BK=BK, num_warps=NUM_WARPS, **opts)
        d_w_hh, d_b_hh = recurrent_weight_grads(d_gates, _prev_hist(y, h0, lengths, reverse), b_hh)
        d_w_hr = dht_all.view(T * B, P).t().mm(m_all.reshape(T * B, H)).to(xw.dtype) if proj else xw.new_empty(0)
        if w_ch is not None:
            dg = d_gates.to(acc)
            c_prev = _prev_hist(c_all, c0, lengths, reverse)
            d_w_ch = torch.stack([(dg[..., :H] * c_prev).sum((0, 1)),
                                  (dg[..., H:2 * H] * c_prev).sum((0, 1)) if G == 4 else c_prev.new_zeros(H),
                                  (dg[..., (G - 1) * H:] * c_all).sum((0, 1))]).to(xw.dtype)
        else:
            d_w_ch = xw.new_empty(0)
        return d_gates, d_w_hh, d_b_hh, d_w_hr, d_w_ch, dh0, dc0

    # ---- GRU --------------------------------------------------------------------------------------
    def gru_seq_fwd(self, xw, w_hh, b_hh, h0, lengths, reverse, save):
        T, B, GH = xw.shape
        H = h0.shape[1]
        varlen, dev = lengths is not None, xw.device
        ws = _new(varlen)(self.workspace_numel("gru_seq_fwd", xw, w_hh, b_hh, h0, save), dtype=xw.dtype, device=dev)
        saved = self._ws(ws, T * B * 4 * H, xw.dtype).view(T, B, 4 * H) if save else None
        y = _new(varlen)(T, B, H, dtype=xw.dtype, device=dev)
        h_n = torch.empty_like(h0)
        if T == 0:
            return y, h_n.copy_(h0), ws
        opts = dict(HAS_BIAS=b_hh is not None, SAVE=save, ACC=_tl_acc(xw.dtype), PREC=_prec(xw.dtype))
        b = b_hh if b_hh is not None else xw
        if H <= SEQ_MAX_H:
            HP = seq_hp(H)
            _gru.fwd_seq[(triton.cdiv(B, BB),)](
                xw, w_hh, b, h0, lengths.to(dev) if varlen else xw, y, h_n, saved if save else xw, T, B, H,
                HAS_LEN=varlen, REVERSE=reverse, BB=BB, HP=HP, num_warps=seq_warps("gru", HP, xw.dtype), **opts)
            return y, h_n, ws
        BH = step_bh(B, H)
        for t, n, n_cont, _, prev in _schedule(batch_sizes_from_lengths(lengths, T, B), T, reverse, False):
            _gru.fwd_step[(triton.cdiv(n, BB), triton.cdiv(H, BH))](
                xw[t], w_hh, b, y[prev] if prev is not None else h0, h0, y[t], saved[t] if save else xw, n, n_cont,
                H, BB=BB, BH=BH, BK=BK, num_warps=NUM_WARPS, **opts)
        h_n.copy_(_final_rows(y, lengths, reverse))
        return y, h_n, ws

    def gru_seq_bwd(self, grad_y, grad_h_n, xw, w_hh, b_hh, h0, lengths, y, ws, reverse):
        T, B, GH = xw.shape
        H = h0.shape[1]
        varlen, dev = lengths is not None, xw.device
        acc = _acc(xw.dtype)
        saved = self._ws(ws, T * B * 4 * H, xw.dtype).view(T, B, 4 * H)
        d_xw = _new(varlen)(T, B, GH, dtype=xw.dtype, device=dev)
        d_gh = _new(varlen)(T, B, GH, dtype=xw.dtype, device=dev)
        h_prev = _prev_hist(y, h0, lengths, reverse)
        rec = torch.empty(2, B, H, dtype=acc, device=dev)
        dh0 = torch.empty_like(h0)
        BP = step_bh(B, H)
        for k, (t, n, n_cont, n_last, _) in enumerate(
                _schedule(batch_sizes_from_lengths(lengths, T, B), T, reverse, backward=True)):
            _gru.bwd_step[(triton.cdiv(n, BB), triton.cdiv(H, BP))](
                grad_y[t], rec[(k + 1) % 2], grad_h_n, saved[t], h_prev[t], w_hh, d_xw[t], d_gh[t], rec[k % 2],
                dh0, n, n_cont, n_last, H, ACC=_tl_acc(xw.dtype), PREC=_prec(xw.dtype), BB=BB, BP=BP, BK=BK,
                num_warps=NUM_WARPS)
        d_w_hh, d_b_hh = recurrent_weight_grads(d_gh, h_prev, b_hh)
        return d_xw, d_w_hh, d_b_hh, dh0

    # ---- RNN --------------------------------------------------------------------------------------
    def rnn_seq_fwd(self, xw, w_hh, b_hh, h0, lengths, reverse, nonlinearity, save):
        T, B, H = xw.shape
        varlen, dev = lengths is not None, xw.device
        y = _new(varlen)(T, B, H, dtype=xw.dtype, device=dev)
        h_n = torch.empty_like(h0)
        if T == 0:
            return y, h_n.copy_(h0), xw.new_empty(0)
        opts = dict(HAS_BIAS=b_hh is not None, RELU=nonlinearity == "relu", ACC=_tl_acc(xw.dtype),
                    PREC=_prec(xw.dtype))
        b = b_hh if b_hh is not None else xw
        if H <= SEQ_MAX_H:
            HP = seq_hp(H)
            _rnn.fwd_seq[(triton.cdiv(B, BB),)](
                xw, w_hh, b, h0, lengths.to(dev) if varlen else xw, y, h_n, T, B, H, HAS_LEN=varlen,
                REVERSE=reverse, BB=BB, HP=HP, num_warps=seq_warps("rnn", HP, xw.dtype), **opts)
            return y, h_n, xw.new_empty(0)
        BH = step_bh(B, H)
        for t, n, n_cont, _, prev in _schedule(batch_sizes_from_lengths(lengths, T, B), T, reverse, False):
            _rnn.fwd_step[(triton.cdiv(n, BB), triton.cdiv(H, BH))](
                xw[t], w_hh, b, y[prev] if prev is not None else h0, h0, y[t], n, n_cont, H, BB=BB, BH=BH, BK=BK,
                num_warps=NUM_WARPS, **opts)
        h_n.copy_(_final_rows(y, lengths, reverse))
        return y, h_n, xw.new_empty(0)

    def rnn_seq_bwd(self, grad_y, grad_h_n, xw, w_hh, b_hh, h0, lengths, y, ws, reverse, nonlinearity):
        T, B, H = xw.shape
        varlen, dev = lengths is not None, xw.device
        d_xw = _new(varlen)(T, B, H, dtype=xw.dtype, device=dev)
        rec = torch.empty(2, B, H, dtype=_acc(xw.dtype), device=dev)
        dh0 = torch.empty_like(h0)
        BP = step_bh(B, H)
        for k, (t, n, n_cont, n_last, _) in enumerate(
                _schedule(batch_sizes_from_lengths(lengths, T, B), T, reverse, backward=True)):
            _rnn.bwd_step[(triton.cdiv(n, BB), triton.cdiv(H, BP))](
                grad_y[t], rec[(k + 1) % 2], grad_h_n, y[t], w_hh, d_xw[t], rec[k % 2], dh0, n, n_cont, n_last, H,
                RELU=nonlinearity == "relu", ACC=_tl_acc(xw.dtype), PREC=_prec(xw.dtype), BB=BB, BP=BP, BK=BK,
                num_warps=NUM_WARPS)
        d_w_hh, d_b_hh = recurrent_weight_grads(d_xw, _prev_hist(y, h0, lengths, reverse), b_hh)
        return d_xw, d_w_hh, d_b_hh, dh0



BACKEND = TritonBackend()
