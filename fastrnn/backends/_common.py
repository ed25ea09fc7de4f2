"""Small helpers shared by the backends' host code."""
from __future__ import annotations

import glob
import os
import sys

import torch

from .. import policy

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


def packed_positions(lengths):
    """The flat positions in [T*B] (t*B + b) of a packed sequence's rows, in PackedSequence order, from its
    rows' non-increasing lengths (int64 CPU [B]; T = lengths[0])."""
    T = int(lengths[0]) if len(lengths) else 0
    return (torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)).flatten().nonzero().squeeze(1)


def through_padded(lengths):
    """(pad, unpad) between a packed sequence's rows [N, n] (PackedSequence order; ``lengths`` its rows'
    non-increasing lengths) and the padded layout [T, B, n], zeros past each row's end: for code that takes only
    the padded layout (the reference backend's loop, numba's cell options' kernels). Out of place, so that the
    reference backend's recomputation can differentiate through them."""
    T, B = int(lengths[0]), lengths.shape[0]
    rows = packed_positions(lengths)

    def pad(t):
        return t.new_zeros(T * B, t.shape[1]).index_copy(0, rows, t).view(T, B, -1)

    def unpad(t):
        return t.reshape(T * B, -1).index_select(0, rows)

    return pad, unpad


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
    if family == "lstm":  # (xw, w_hh, b_hh, w_hr, w_ch, 6 more weights, h, c, ...) for seq and step alike
        return family, scope, T, B, GH, args[12].shape[-1], args[11].shape[-1], args[3] is not None
    H = GH // 3 if family == "gru" else GH
    return family, scope, T, B, GH, H, H, False


class StepsFromSequence:
    """The six step methods of the contract as one-step calls of the backend's sequence methods.

    A step's workspace is the sequence workspace followed by the step's output h (its backward needs
    h_new as the sequence backward needs y), so ``workspace_numel`` of a step op adds B*P to the
    sequence's count. A step's zoneout masks ([B,*]) become the sequence's ([1,B,*]).
    """

    def lstm_step_fwd(self, xw, *args):
        return _step_fwd(self.lstm_seq_fwd, "lstm", xw, args)

    def lstm_step_bwd(self, grad_h, grad_c, *args):
        return _step_bwd(self.lstm_seq_bwd, "lstm", (grad_h, grad_c), args)

    def gru_step_fwd(self, xw, *args):
        return _step_fwd(self.gru_seq_fwd, "gru", xw, args)

    def gru_step_bwd(self, grad_h, *args):
        return _step_bwd(self.gru_seq_bwd, "gru", (grad_h,), args)

    def rnn_step_fwd(self, xw, *args):
        return _step_fwd(self.rnn_seq_fwd, "rnn", xw, args)

    def rnn_step_bwd(self, grad_h, *args):
        return _step_bwd(self.rnn_seq_bwd, "rnn", (grad_h,), args)


def _seq_weights(family, weights):
    """A step's weight arguments as a one-step sequence's: its per-step masks get a T axis of 1."""
    from .reference import CELLS
    steps = CELLS[family][4]
    return tuple(w.unsqueeze(0) if k in steps and w is not None else w for k, w in enumerate(weights))


def _step_fwd(seq_fwd, family, xw, args):
    from .reference import CELLS
    nw, ns = CELLS[family][1], CELLS[family][2]
    weights, state, options, save = args[:nw], args[nw:nw + ns], args[nw + ns:-1], args[-1]
    res = seq_fwd(xw.unsqueeze(0), *_seq_weights(family, weights), *state, None, False, *options, save)
    return (*res[1:-1], _with_output(res[-1], res[0], save))


def _step_bwd(seq_bwd, family, grads, args):
    from .reference import CELLS
    nw, ns = CELLS[family][1], CELLS[family][2]
    xw, weights, state, ws, options = args[0], args[1:1 + nw], args[1 + nw:1 + nw + ns], args[1 + nw + ns], \
        args[2 + nw + ns:]
    ws, y = _split_output(ws, state[0])
    # one step: grad_h enters as grad_y, the final h's grad is zero
    g = seq_bwd(grads[0].unsqueeze(0), torch.zeros_like(grads[0]), *grads[1:], xw.unsqueeze(0),
                *_seq_weights(family, weights), *state, None, y, ws, False, *options)
    return (g[0][0],) + tuple(g[1:])


def _with_output(ws, y, save):
    return torch.cat([ws, y.reshape(-1)]) if save else ws


def _split_output(ws, h):
    k = ws.numel() - h.numel()
    return ws[:k], ws[k:].view(1, *h.shape)


def recurrent_weight_grads(d_gh, h_prev, b_hh, mm=None):
    """(dW_hh, db_hh) after a backward loop: d_ghᵀ·h_prev over all T*B rows as one GEMM (through ``mm``, the
    contract's, where given), and the column sums of d_gh (an empty tensor when there is no b_hh). d_gh
    [T,B,GH], h_prev [T,B,P]."""
    flat = d_gh.reshape(-1, d_gh.shape[-1])
    d_b = flat.sum(0) if b_hh is not None else flat.new_empty(0)
    h = h_prev.reshape(-1, h_prev.shape[-1])
    if mm is not None:
        return mm(flat, True, h, False, None), d_b
    return flat.t().mm(h), d_b


#: oneDNN's product through torch (``torch.ops.mkldnn._linear_pointwise``), where torch has it; None elsewhere
_DNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
#: from this many multiply-adds (below, at 100 x 64 x 256, the two were level or torch's ahead) and rows of a
DNN_MIN_MACS = 1 << 21
DNN_MIN_ROWS = 512
#: and an AMD CPU, where MKL runs its slow path (measured on the Zen 5; on Intel's torch's product is as fast,
#: NOTES.md "The machine"; other CPUs were not measured)
_DNN_VENDOR = policy.cpu_vendor() == "amd"


def dnn_mm(a, ta, b, tb, bias):
    """The contract's ``mm`` (``A' @ B' (+ bias)``, fastrnn.backends) for a backend without a product of its own,
    through oneDNN for float32 CPU tensors on AMD CPUs, from ``DNN_MIN_MACS``, else torch's.
    torch's ``mm`` runs MKL, whose code path for other vendors' CPUs is the slow one (csrc/gemm.cpp); oneDNN's
    runs AVX-512 there. Zen 5, GFLOP/s, torch / oneDNN, rows x K x N of the forward x @ Wᵀ: 1600 x 256 x 1024:
    x @ Wᵀ 133-192 / 295-422, g @ W 166-195 / 333-422, gᵀ @ x 158-183 / 217-264; 3200 x 64 x 256: 121 / 345,
    176 / 378, 154 / 135. Its operands go as they lie (oneDNN copies the first where it is not contiguous).
    gᵀ @ x over 1024 rows and more runs as (xᵀ @ g)ᵀ and a transposing copy (1600 x 256 x 1024: 2.38 ms
    against 3.19 as it lies and 4.75 by torch). Products of fewer rows of ``a`` than DNN_MIN_ROWS (a sequence's
    T x B) stay torch's: at batch 1 (T100) the training calls read 0.95-0.99x with oneDNN, though its products
    alone were faster, and at 400-500 rows level; from 600-930 rows (T100 B6-8, T50 B12-16, a packed T100 B16)
    numba's training calls took 1.1-1.39x less time with it, one case 0.95-0.97x (GRU T50 B12 H128;
    benchmarks/NOTES.md, twenty-ninth and thirtieth sessions). The result is contiguous."""
    A = a.t() if ta else a
    W = b if tb else b.t()  # linear's weight: [N, K]
    if (_DNN_LINEAR is not None and _DNN_VENDOR and A.dtype == torch.float32 and A.is_cpu
            and torch._C._get_mkldnn_enabled()  # torch.backends.mkldnn.flags(enabled=False) turns it off
            and a.shape[0] >= DNN_MIN_ROWS and A.shape[0] * A.shape[1] * W.shape[0] >= DNN_MIN_MACS):
        if ta and bias is None:  # a long K (a's rows): as (B'ᵀ @ a)ᵀ, copied
            return _DNN_LINEAR(W, a.t(), None, "none", [], "").t().contiguous()
        return _DNN_LINEAR(A, W, bias, "none", [], "")
    return A.mm(W.t()) if bias is None else torch.addmm(bias, A, W.t())


def cache_sizes() -> dict:
    """{'L2': bytes of one core's L2, 'L2_total': all cores' L2s, 'L3': bytes of L3 (all its instances),
    'cores': physical cores (one per L2 instance; SMT siblings share one)} from /sys/devices/system/cpu
    (sizes 0 where the OS does not say)."""
    seen = {2: {}, 3: {}}
    for d in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        try:
            level = int(open(f"{d}/level").read())
            kind = open(f"{d}/type").read().strip()
            if level not in seen or kind not in ("Unified", "Data"):
                continue
            size = open(f"{d}/size").read().strip()
            shared = open(f"{d}/shared_cpu_list").read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
        seen[level][shared] = int(size.rstrip("KMG")) * mult
    l2 = list(seen[2].values())
    return {"L2": min(l2) if l2 else 0, "L2_total": sum(l2), "L3": sum(seen[3].values()),
            "cores": len(l2) or os.cpu_count() or 1}
