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
- The cell options (layer norm, zoneout, recurrent dropout) always take a per-step path of their own:
  the recurrent product by cuBLAS, then one row kernel per step (``<family>.fwd_opts_step``: a program
  owns whole rows, so a row's layer-norm statistics need no other program) that does the normalization,
  the gate math, zoneout and the masked h for the next product; backward likewise (``bwd_opts_step``,
  the product, ``common.add_recurrent_dh``).
"""
from __future__ import annotations

import os

import torch

from . import Backend
from ._common import StepsFromSequence, batch_sizes_from_lengths, fwd_dims, recurrent_weight_grads

try:
    import triton
    import triton.language as tl
    from .triton_kernels import common as _common_k
    from .triton_kernels import gru as _gru
    from .triton_kernels import lstm as _lstm
    from .triton_kernels import rnn as _rnn
    _IMPORT_ERROR = None
except ImportError as e:  # triton missing or broken: the backend is unavailable, fastrnn still imports
    triton = tl = _common_k = None
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


def _zmode(mask, p):
    """The row kernels' zoneout mode: 1 the step's mask (training), 2 the probability (eval), 0 none."""
    return 1 if mask is not None else (2 if p > 0 else 0)


def _empties(like, k):
    """k distinct empty tensors (the gradients of absent inputs and masks: outputs must not alias)."""
    return tuple(like.new_empty(0) for _ in range(k))


def row_block(HP):
    """Rows per program of the cell options' row kernels (every unit of a row in one program)."""
    return 4 if HP <= 64 else (2 if HP <= 256 else 1)


def row_warps(HP):
    return 4 if HP <= 256 else (8 if HP <= 1024 else 16)


class TritonBackend(StepsFromSequence, Backend):
    name = "triton"
    features = frozenset({"proj", "peephole", "coupled", "varlen", "layer_norm", "zoneout", "recurrent_dropout"})

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
        if family == "lstm":  # gates, c', m (proj); with the options c after zoneout, LN's xhat_h, xhat_c, rstds
            zc, ln = args[10] is not None or args[-2] > 0, args[5] is not None
            n_acc = T * B * (GH + H + (H if proj else 0) + (H if zc else 0) + (GH + H + 2 if ln else 0))
        elif family == "gru":  # r, z, n, ghn; with layer norm xhat_h and its rstd
            n_acc = T * B * (4 * H + (3 * H + 1 if args[3] is not None else 0))
        else:
            n_acc = 0
        dtype = args[0].dtype
        n = n_acc * (_acc(dtype).itemsize // dtype.itemsize)  # saved values are fp32 for 16-bit dtypes
        return n + (B * P if scope == "step" else 0)  # a step also keeps its output h (xw's dtype)

    @staticmethod
    def _ws(ws, n_acc, dtype):
        """The fp32/fp64 view of the first n_acc saved values of a workspace."""
        acc = _acc(dtype)
        return ws[:n_acc * acc.itemsize // dtype.itemsize].view(acc)

    # ---- LSTM -------------------------------------------------------------------------------------
    def lstm_seq_fwd(self, xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, zm_h, zm_c, h0, c0, lengths,
                     reverse, coupled, p_h, p_c, save):
        numel = self.workspace_numel("lstm_seq_fwd", xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, zm_h, zm_c,
                                     h0, c0, lengths, reverse, coupled, p_h, p_c, save)
        if ln_h is not None or rmask is not None or _zmode(zm_h, p_h) or _zmode(zm_c, p_c):
            return self._lstm_opts_fwd(xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, zm_h, zm_c, h0, c0,
                                       lengths, reverse, coupled, p_h, p_c, save, numel)
        return self._lstm_plain_fwd(xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, reverse, coupled, save, numel)

    def lstm_seq_bwd(self, grad_y, grad_h_n, grad_c_n, xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, zm_h,
                     zm_c, h0, c0, lengths, y, ws, reverse, coupled, p_h, p_c):
        if ln_h is not None or rmask is not None or _zmode(zm_h, p_h) or _zmode(zm_c, p_c):
            return self._lstm_opts_bwd(grad_y, grad_h_n, grad_c_n, xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb,
                                       rmask, zm_h, zm_c, h0, c0, lengths, y, ws, reverse, coupled, p_h, p_c)
        d_xw, d_w_hh, d_b_hh, d_w_hr, d_w_ch, dh0, dc0 = self._lstm_plain_bwd(
            grad_y, grad_h_n, grad_c_n, xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, y, ws, reverse, coupled)
        return d_xw, d_w_hh, d_b_hh, d_w_hr, d_w_ch, *_empties(xw, 6), dh0, dc0

    def _lstm_plain_fwd(self, xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, reverse, coupled, save, numel):
        T, B, GH = xw.shape
        H, P = c0.shape[1], h0.shape[1]
        proj, varlen, dev = w_hr is not None, lengths is not None, xw.device
        acc = _acc(xw.dtype)
        n_acc = T * B * (GH + H + (H if proj else 0))
        ws = _new(varlen)(numel, dtype=xw.dtype, device=dev)
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

    def _lstm_plain_bwd(self, grad_y, grad_h_n, grad_c_n, xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, y, ws,
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
    def gru_seq_fwd(self, xw, w_hh, b_hh, ln_h, rmask, zm, h0, lengths, reverse, p, save):
        numel = self.workspace_numel("gru_seq_fwd", xw, w_hh, b_hh, ln_h, rmask, zm, h0, lengths, reverse, p, save)
        if ln_h is not None or rmask is not None or _zmode(zm, p):
            return self._gru_opts_fwd(xw, w_hh, b_hh, ln_h, rmask, zm, h0, lengths, reverse, p, save, numel)
        return self._gru_plain_fwd(xw, w_hh, b_hh, h0, lengths, reverse, save, numel)

    def gru_seq_bwd(self, grad_y, grad_h_n, xw, w_hh, b_hh, ln_h, rmask, zm, h0, lengths, y, ws, reverse, p):
        if ln_h is not None or rmask is not None or _zmode(zm, p):
            return self._gru_opts_bwd(grad_y, grad_h_n, xw, w_hh, b_hh, ln_h, rmask, zm, h0, lengths, y, ws, reverse, p)
        d_xw, d_w_hh, d_b_hh, dh0 = self._gru_plain_bwd(grad_y, grad_h_n, xw, w_hh, b_hh, h0, lengths, y, ws, reverse)
        return d_xw, d_w_hh, d_b_hh, *_empties(xw, 3), dh0

    def _gru_plain_fwd(self, xw, w_hh, b_hh, h0, lengths, reverse, save, numel):
        T, B, GH = xw.shape
        H = h0.shape[1]
        varlen, dev = lengths is not None, xw.device
        ws = _new(varlen)(numel, dtype=xw.dtype, device=dev)
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

    def _gru_plain_bwd(self, grad_y, grad_h_n, xw, w_hh, b_hh, h0, lengths, y, ws, reverse):
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

    # ---- the cell options (layer norm, zoneout, recurrent dropout) ---------------------------------
    # Per step: raw = hm @ W_hh^T (cuBLAS, in the accumulation dtype), then one row kernel per family (a
    # program owns whole rows, so the layer norm's statistics are its own); an LSTM with projection adds
    # the W_hr matmul and finish_step. h, c and hm (h * rmask, the next product's input) live in state
    # buffers that a step updates only for its active rows, so a row past its end keeps its final state
    # and a reverse row that has not started keeps its initial one. The backward mirrors it: the row
    # kernel (plus split_step with projection), d_raw @ W_hh, add_recurrent_dh; the weight and gain
    # gradients are reductions over all steps after the loop.
    def _opts_saved(self, family, ws, T, B, GH, H, proj, zc, ln, dtype):
        """Views of a workspace of the options path (see workspace_numel for the layout)."""
        sizes = {"lstm": [("gates", GH), ("c_new", H), ("m", H if proj else 0), ("c_post", H if zc else 0),
                          ("xhat_h", GH if ln else 0), ("xhat_c", H if ln else 0), ("rstd", 2 if ln else 0)],
                 "gru": [("saved", 4 * H), ("xhat_h", GH if ln else 0), ("rstd", 1 if ln else 0)]}[family]
        flat = self._ws(ws, T * B * sum(k for _, k in sizes), dtype)
        out, at = {}, 0
        for name, k in sizes:
            out[name] = flat[at:at + T * B * k].view(T, B, k) if k else None
            at += T * B * k
        return out

    def _lstm_opts_fwd(self, xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, zm_h, zm_c, h0, c0, lengths,
                       reverse, coupled, p_h, p_c, save, numel):
        T, B, GH = xw.shape
        H, P = c0.shape[1], h0.shape[1]
        proj, varlen, dev, acc = w_hr is not None, lengths is not None, xw.device, _acc(xw.dtype)
        ZH, ZC, ln = _zmode(zm_h, p_h), _zmode(zm_c, p_c), ln_h is not None
        ws = _new(varlen)(numel, dtype=xw.dtype, device=dev)
        y = _new(varlen)(T, B, P, dtype=xw.dtype, device=dev)
        h_state, c_state = h0.to(acc, copy=True), c0.to(acc, copy=True)
        hm = h_state * rmask if rmask is not None else h_state.clone()
        sv = self._opts_saved("lstm", ws, T, B, GH, H, proj, ZC != 0, ln, xw.dtype) if save else {}
        w_t, d = w_hh.t().to(acc), xw  # d: the pointer for an absent tensor (never read)
        HP, PP = triton.next_power_of_2(H), triton.next_power_of_2(P)
        raw = torch.empty(B, GH, dtype=acc, device=dev)
        if proj:
            w_hr_t, hc = w_hr.t().to(acc), torch.empty(B, P, dtype=acc, device=dev)
            m_tmp = torch.empty(B, H, dtype=acc, device=dev)
        flags = dict(HAS_BIAS=b_hh is not None, PEEP=w_ch is not None, COUPLED=coupled, LN=ln, ZH=ZH, ZC=ZC,
                     RMASK=rmask is not None, PROJ=proj, SAVE=save, ACC=_tl_acc(xw.dtype), BR=row_block(HP), HP=HP,
                     num_warps=row_warps(HP))
        opt = lambda v, t=None: d if v is None else (v if t is None else v[t])  # noqa: E731
        for t, n, *_ in _schedule(batch_sizes_from_lengths(lengths, T, B), T, reverse, backward=False):
            torch.mm(hm[:n], w_t, out=raw[:n])
            m_out = sv["m"][t] if (save and proj) else (m_tmp if proj else d)
            _lstm.fwd_opts_step[(triton.cdiv(n, row_block(HP)),)](
                xw[t], raw, opt(b_hh), opt(w_ch), opt(ln_h), opt(ln_c), opt(ln_cb), opt(zm_h, t), opt(zm_c, t),
                opt(rmask), float(p_h), float(p_c), h_state, c_state, m_out, y[t], hm, opt(sv.get("gates"), t),
                opt(sv.get("c_new"), t), opt(sv.get("c_post"), t), opt(sv.get("xhat_h"), t),
                opt(sv.get("xhat_c"), t), opt(sv.get("rstd"), t), n, H, **flags)
            if proj:
                torch.mm(m_out[:n], w_hr_t, out=hc[:n])
                _common_k.finish_step[(triton.cdiv(n, row_block(PP)),)](
                    hc, h_state, opt(zm_h, t), float(p_h), opt(rmask), y[t], hm, n, P, Z=ZH, RMASK=rmask is not None,
                    ACC=_tl_acc(xw.dtype), BR=row_block(PP), PP=PP, num_warps=row_warps(PP))
        return y, h_state.to(h0.dtype), c_state.to(c0.dtype), ws

    def _lstm_opts_bwd(self, grad_y, grad_h_n, grad_c_n, xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, zm_h,
                       zm_c, h0, c0, lengths, y, ws, reverse, coupled, p_h, p_c):
        T, B, GH = xw.shape
        H, P = c0.shape[1], h0.shape[1]
        proj, varlen, dev, acc, dt = w_hr is not None, lengths is not None, xw.device, _acc(xw.dtype), xw.dtype
        ZH, ZC, ln = _zmode(zm_h, p_h), _zmode(zm_c, p_c), ln_h is not None
        G = GH // H
        sv = self._opts_saved("lstm", ws, T, B, GH, H, proj, ZC != 0, ln, dt)
        new = _new(varlen)
        c_prev = _prev_hist(sv["c_post"] if ZC else sv["c_new"], c0, lengths, reverse)[:T]
        d_xw = new(T, B, GH, dtype=dt, device=dev)
        dg = new(T, B, GH, dtype=acc, device=dev)
        d_raw = new(T, B, GH, dtype=acc, device=dev) if ln else dg
        dcn = new(T, B, H, dtype=acc, device=dev) if ln else None
        dh_state, dc_state = grad_h_n.to(acc, copy=True), grad_c_n.to(acc, copy=True)
        prod = torch.empty(B, P, dtype=acc, device=dev)
        w_a, d = w_hh.to(acc), xw
        HP, PP = triton.next_power_of_2(H), triton.next_power_of_2(P)
        if proj:
            w_hr_a, dm = w_hr.to(acc), torch.empty(B, H, dtype=acc, device=dev)
            dproj = new(T, B, P, dtype=acc, device=dev)
        tla = _tl_acc(dt)
        pk = dict(ACC=tla, BR=row_block(PP), PP=PP, num_warps=row_warps(PP))
        flags = dict(PEEP=w_ch is not None, COUPLED=coupled, LN=ln, ZH=ZH, ZC=ZC, PROJ=proj, ACC=tla,
                     BR=row_block(HP), HP=HP, num_warps=row_warps(HP))
        opt = lambda v, t=None: d if v is None else (v if t is None else v[t])  # noqa: E731
        for t, n, *_ in _schedule(batch_sizes_from_lengths(lengths, T, B), T, reverse, backward=True):
            if proj:
                _common_k.split_step[(triton.cdiv(n, pk["BR"]),)](grad_y[t], dh_state, opt(zm_h, t), float(p_h),
                                                                   dproj[t], n, P, Z=ZH, **pk)
                torch.mm(dproj[t, :n], w_hr_a, out=dm[:n])
            _lstm.bwd_opts_step[(triton.cdiv(n, row_block(HP)),)](
                grad_y[t], dh_state, dm if proj else d, dc_state, opt(zm_h, t), opt(zm_c, t), float(p_h), float(p_c),
                sv["gates"][t], sv["c_new"][t], c_prev[t], opt(sv["xhat_h"], t), opt(sv["xhat_c"], t),
                opt(sv["rstd"], t), opt(w_ch), opt(ln_h), opt(ln_c), opt(ln_cb), d_xw[t], dg[t], d_raw[t],
                opt(dcn, t), n, H, **flags)
            torch.mm(d_raw[t, :n], w_a, out=prod[:n])
            _common_k.add_recurrent_dh[(triton.cdiv(n, pk["BR"]),)](prod, opt(rmask), dh_state, n, P,
                                                                     RMASK=rmask is not None, **pk)
        e = lambda: xw.new_empty(0)  # noqa: E731  (a fresh one each: outputs must not alias)
        h_prev = _prev_hist(y, h0, lengths, reverse)[:T].to(acc)
        if rmask is not None:
            h_prev = h_prev * rmask
        d_w_hh = recurrent_weight_grads(d_raw, h_prev, None)[0].to(dt)
        d_b_hh = dg.sum((0, 1)).to(dt) if b_hh is not None else e()
        d_w_hr = dproj.view(T * B, P).t().mm(sv["m"].reshape(T * B, H)).to(dt) if proj else e()
        d_w_ch = e()
        if w_ch is not None:
            c_new = sv["c_new"]
            d_w_ch = torch.stack([(dg[..., :H] * c_prev).sum((0, 1)),
                                  (dg[..., H:2 * H] * c_prev).sum((0, 1)) if G == 4 else c_prev.new_zeros(H),
                                  (dg[..., (G - 1) * H:] * c_new).sum((0, 1))]).to(dt)
        d_ln_h = (dg * sv["xhat_h"]).sum((0, 1)).to(dt) if ln else e()
        d_ln_c = (dcn * sv["xhat_c"]).sum((0, 1)).to(dt) if ln else e()
        d_ln_cb = dcn.sum((0, 1)).to(dt) if ln else e()
        return (d_xw, d_w_hh, d_b_hh, d_w_hr, d_w_ch, d_ln_h, d_ln_c, d_ln_cb, *_empties(xw, 3), dh_state.to(h0.dtype),
                dc_state.to(c0.dtype))

    def _gru_opts_fwd(self, xw, w_hh, b_hh, ln_h, rmask, zm, h0, lengths, reverse, p, save, numel):
        T, B, GH = xw.shape
        H = h0.shape[1]
        varlen, dev, acc = lengths is not None, xw.device, _acc(xw.dtype)
        Z, ln = _zmode(zm, p), ln_h is not None
        ws = _new(varlen)(numel, dtype=xw.dtype, device=dev)
        y = _new(varlen)(T, B, H, dtype=xw.dtype, device=dev)
        h_state = h0.to(acc, copy=True)
        hm = h_state * rmask if rmask is not None else h_state.clone()
        sv = self._opts_saved("gru", ws, T, B, GH, H, False, False, ln, xw.dtype) if save else {}
        w_t, d = w_hh.t().to(acc), xw
        HP = triton.next_power_of_2(H)
        raw = torch.empty(B, GH, dtype=acc, device=dev)
        flags = dict(HAS_BIAS=b_hh is not None, LN=ln, Z=Z, RMASK=rmask is not None, SAVE=save,
                     ACC=_tl_acc(xw.dtype), BR=row_block(HP), HP=HP, num_warps=row_warps(HP))
        opt = lambda v, t=None: d if v is None else (v if t is None else v[t])  # noqa: E731
        for t, n, *_ in _schedule(batch_sizes_from_lengths(lengths, T, B), T, reverse, backward=False):
            torch.mm(hm[:n], w_t, out=raw[:n])
            _gru.fwd_opts_step[(triton.cdiv(n, row_block(HP)),)](
                xw[t], raw, opt(b_hh), opt(ln_h), opt(zm, t), opt(rmask), float(p), h_state, y[t], hm,
                opt(sv.get("saved"), t), opt(sv.get("xhat_h"), t), opt(sv.get("rstd"), t), n, H, **flags)
        return y, h_state.to(h0.dtype), ws

    def _gru_opts_bwd(self, grad_y, grad_h_n, xw, w_hh, b_hh, ln_h, rmask, zm, h0, lengths, y, ws, reverse, p):
        T, B, GH = xw.shape
        H = h0.shape[1]
        varlen, dev, acc, dt = lengths is not None, xw.device, _acc(xw.dtype), xw.dtype
        Z, ln = _zmode(zm, p), ln_h is not None
        sv = self._opts_saved("gru", ws, T, B, GH, H, False, False, ln, dt)
        new = _new(varlen)
        h_prev = _prev_hist(y, h0, lengths, reverse)[:T]
        d_xw = new(T, B, GH, dtype=dt, device=dev)
        dg = new(T, B, GH, dtype=acc, device=dev)
        d_raw = new(T, B, GH, dtype=acc, device=dev) if ln else dg
        dh_state = grad_h_n.to(acc, copy=True)
        prod = torch.empty(B, H, dtype=acc, device=dev)
        w_a, d = w_hh.to(acc), xw
        HP = triton.next_power_of_2(H)
        tla = _tl_acc(dt)
        opt = lambda v, t=None: d if v is None else (v if t is None else v[t])  # noqa: E731
        for t, n, *_ in _schedule(batch_sizes_from_lengths(lengths, T, B), T, reverse, backward=True):
            _gru.bwd_opts_step[(triton.cdiv(n, row_block(HP)),)](
                grad_y[t], dh_state, opt(zm, t), float(p), sv["saved"][t], h_prev[t], opt(sv["xhat_h"], t),
                opt(sv["rstd"], t), opt(ln_h), d_xw[t], dg[t], d_raw[t], n, H, LN=ln, Z=Z, ACC=tla,
                BR=row_block(HP), HP=HP, num_warps=row_warps(HP))
            torch.mm(d_raw[t, :n], w_a, out=prod[:n])
            _common_k.add_recurrent_dh[(triton.cdiv(n, row_block(HP)),)](
                prod, opt(rmask), dh_state, n, H, RMASK=rmask is not None, ACC=tla, BR=row_block(HP), PP=HP,
                num_warps=row_warps(HP))
        hm_prev = h_prev.to(acc) * rmask if rmask is not None else h_prev.to(acc)
        d_w_hh = recurrent_weight_grads(d_raw, hm_prev, None)[0].to(dt)
        d_b_hh = dg.sum((0, 1)).to(dt) if b_hh is not None else xw.new_empty(0)
        d_ln_h = (dg * sv["xhat_h"]).sum((0, 1)).to(dt) if ln else xw.new_empty(0)
        return d_xw, d_w_hh, d_b_hh, d_ln_h, *_empties(xw, 2), dh_state.to(h0.dtype)

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
