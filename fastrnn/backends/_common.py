"""Small helpers shared by the backends' host code."""
from __future__ import annotations

import os
import sys

import torch

#: set in a process forked after its parent launched parallel numba code under GNU OpenMP (numba's
#: default threading layer where TBB is not installed), which cannot run in a forked child: numba
#: terminates the process at its next parallel launch, or it hangs. The numba backend then runs serial
#: twins of its kernels. Registered when fastrnn is imported, so it also sees numba code of the user's
#: own that ran before fastrnn's numba backend was first loaded.
FORKED_UNDER_GNU_OMP = False


def _after_fork_in_child():
    global FORKED_UNDER_GNU_OMP
    parallel = sys.modules.get("numba.np.ufunc.parallel")  # nothing to do (or import) if numba never ran
    if parallel is not None and parallel._is_initialized and parallel._threading_layer == "omp":
        omppool = sys.modules.get("numba.np.ufunc.omppool")
        FORKED_UNDER_GNU_OMP = getattr(omppool, "openmp_vendor", "GNU") == "GNU"


os.register_at_fork(after_in_child=_after_fork_in_child)


def batch_sizes_from_lengths(lengths, T: int, B: int) -> list[int]:
    """Per-step active row counts from non-increasing per-row lengths (None: all rows, all steps)."""
    if lengths is None:
        return [B] * T
    lens = lengths.tolist()
    sizes = [0] * T
    n = B
    for t in range(T):
        while n > 0 and lens[n - 1] <= t:
            n -= 1
        sizes[t] = n
    return sizes


def empty_grads(grads, like):
    """Turn None gradients (absent optional inputs) into empty tensors, as the ops return them."""
    return tuple(like.new_empty(0) if g is None else g for g in grads)


class autograd_inside_op:
    """Re-enable autograd inside a custom op's implementation.

    torch runs a custom op's implementation with the Autograd dispatch keys excluded, so
    ``torch.autograd.grad`` there sees no graph. The reference backend's backward differentiates its
    own forward math, so it lifts that exclusion (and turns grad mode on) for the block.
    """

    def __enter__(self):
        K = torch._C.DispatchKey
        exclude = torch._C._dispatch_tls_local_exclude_set()
        exclude = exclude.remove(K.AutogradFunctionality).remove(K.ADInplaceOrView)
        self._guard = torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
        self._guard.__enter__()
        self._grad = torch.enable_grad()
        self._grad.__enter__()

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        return self._guard.__exit__(*exc)


def fwd_dims(op: str, args) -> tuple:
    """``(family, scope, T, B, G*H, H, P, proj)`` of a forward op's arguments (``workspace_numel``'s input:
    shapes only, so it works on fake tensors). A step counts as T = 1."""
    family, scope, _ = op.split("_")
    xw = args[0]
    T, B, GH = xw.shape if scope == "seq" else (1, *xw.shape)
    if family == "lstm":  # (xw, w_hh, b_hh, w_hr, w_ch, h, c, ...) for seq and step alike
        return family, scope, T, B, GH, args[6].shape[-1], args[5].shape[-1], args[3] is not None
    H = GH // 3 if family == "gru" else GH
    return family, scope, T, B, GH, H, H, False


class StepsFromSequence:
    """The six step methods of the contract as one-step calls of the backend's sequence methods.

    A step's workspace is the sequence workspace followed by the step's output h (its backward needs
    h_new as the sequence backward needs y), so ``workspace_numel`` of a step op adds B*P to the
    sequence's count.
    """

    def lstm_step_fwd(self, xw, w_hh, b_hh, w_hr, w_ch, h, c, coupled, save):
        y, h_n, c_n, ws = self.lstm_seq_fwd(xw.unsqueeze(0), w_hh, b_hh, w_hr, w_ch, h, c, None, False, coupled,
                                            save)
        return h_n, c_n, _with_output(ws, y, save)

    def lstm_step_bwd(self, grad_h, grad_c, xw, w_hh, b_hh, w_hr, w_ch, h, c, ws, coupled):
        ws, y = _split_output(ws, h)
        g = self.lstm_seq_bwd(grad_h.unsqueeze(0), torch.zeros_like(grad_h), grad_c, xw.unsqueeze(0), w_hh, b_hh,
                              w_hr, w_ch, h, c, None, y, ws, False, coupled)
        return (g[0][0],) + tuple(g[1:])

    def gru_step_fwd(self, xw, w_hh, b_hh, h, save):
        y, h_n, ws = self.gru_seq_fwd(xw.unsqueeze(0), w_hh, b_hh, h, None, False, save)
        return h_n, _with_output(ws, y, save)

    def gru_step_bwd(self, grad_h, xw, w_hh, b_hh, h, ws):
        ws, y = _split_output(ws, h)
        g = self.gru_seq_bwd(grad_h.unsqueeze(0), torch.zeros_like(grad_h), xw.unsqueeze(0), w_hh, b_hh, h, None, y,
                             ws, False)
        return (g[0][0],) + tuple(g[1:])

    def rnn_step_fwd(self, xw, w_hh, b_hh, h, nonlinearity, save):
        y, h_n, ws = self.rnn_seq_fwd(xw.unsqueeze(0), w_hh, b_hh, h, None, False, nonlinearity, save)
        return h_n, _with_output(ws, y, save)

    def rnn_step_bwd(self, grad_h, xw, w_hh, b_hh, h, ws, nonlinearity):
        ws, y = _split_output(ws, h)
        g = self.rnn_seq_bwd(grad_h.unsqueeze(0), torch.zeros_like(grad_h), xw.unsqueeze(0), w_hh, b_hh, h, None,
                             y, ws, False, nonlinearity)
        return (g[0][0],) + tuple(g[1:])


def _with_output(ws, y, save):
    return torch.cat([ws, y.reshape(-1)]) if save else ws


def _split_output(ws, h):
    k = ws.numel() - h.numel()
    return ws[:k], ws[k:].view(1, *h.shape)


def recurrent_weight_grads(d_gh, h_prev, b_hh):
    """(dW_hh, db_hh) after a backward loop: d_ghᵀ·h_prev over all T*B rows as one GEMM, and the column
    sums of d_gh (an empty tensor when there is no b_hh). d_gh [T,B,GH], h_prev [T,B,P]."""
    flat = d_gh.reshape(-1, d_gh.shape[-1])
    d_b = flat.sum(0) if b_hh is not None else flat.new_empty(0)
    return flat.t().mm(h_prev.reshape(-1, h_prev.shape[-1])), d_b
