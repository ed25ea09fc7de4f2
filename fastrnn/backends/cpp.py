"""The cpp backend: the whole recurrence of a layer-direction in C++ (csrc/), on the CPU.

The kernels are the ops ``torch.ops.fastrnn_cpp.*`` registered by the extension ``fastrnn._C``
(schemas in csrc/ops.cpp, one file per cell). This module only loads the extension and forwards the
contract's methods to those ops. The extension comes from the install (setup.py builds it); when it is
missing, the first use builds it with ninja into torch's extension cache (TORCH_EXTENSIONS_DIR) and
reports how long that took; with no compiler the backend is unavailable with the reason.
"""
from __future__ import annotations

import math
import time

import torch

from .. import _build, policy
from . import Backend
from ._common import fwd_dims

_C = None
_LOAD_ERROR = None
JIT_BUILD_SECONDS = None  # set when this process had to build the extension


def _load():
    global _C, _LOAD_ERROR, JIT_BUILD_SECONDS
    try:
        from .. import _C as ext
    except ImportError as prebuilt_error:
        try:
            from torch.utils import cpp_extension
            start = time.perf_counter()
            ext = cpp_extension.load(name="fastrnn_C", sources=_build.source_paths(),
                                     extra_cflags=_build.cxx_flags(),
                                     extra_ldflags=_build.ld_flags(), verbose=False)
            JIT_BUILD_SECONDS = time.perf_counter() - start
        except Exception as e:  # no compiler, no ninja, a failed build
            _LOAD_ERROR = (f"the C++ extension is not built ({prebuilt_error}) and building it failed: "
                           f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
            return
    try:  # the cache's limit is read from FASTRNN_CPU_CACHE_MB on first use: a bad value is a reason here
        ext.cache_info()
    except RuntimeError as e:
        _LOAD_ERROR = str(e).strip().splitlines()[0]
        return
    _C = ext


_load()
OPS = torch.ops.fastrnn_cpp if _C is not None else None


class CppBackend(Backend):
    name = "cpp"
    devices = ("cpu",)
    dtypes = (torch.float32, torch.float64)
    # this CPU class has no bfloat16/float16 arithmetic worth using for these kernels (no AVX512_BF16 here,
    # and torch's own bf16 RNNs run 1.1-4x slower than its float32 ones: benchmarks/NOTES.md), so half
    # precision modules run in float32: rounded once, at the layer's outputs
    compute_dtypes = {torch.bfloat16: torch.float32, torch.float16: torch.float32}
    # the contract's optional <family>_chunk_fwd serves every dense inference sequence: with its input
    # projection packed per worker (from 8 rows) it beats a separate GEMM and sequence op at every shape
    # measured, B1 to B64, T up to 400 (benchmarks/NOTES.md, twelfth session)
    chunk_max_rows = math.inf
    # the sequence ops take a packed sequence's rows (xw [N,G*H]): a training call on a PackedSequence makes
    # no [T,B,*] copies of xw and y, and its backward no zero-filled padding (benchmarks/NOTES.md,
    # twenty-third session)
    packed_rows = True
    # the sequence backwards read grad_y with its strides (csrc/recurrence.h, BwdArgs::read_grad_y): an
    # expanded or transposed gradient is not copied first
    strided_grad_y = True
    # the cell options: zoneout and recurrent dropout on any number of workers; layer norm (its statistics
    # span a row's units) on one
    features = frozenset({"proj", "peephole", "coupled", "varlen", "layer_norm", "zoneout", "recurrent_dropout"})

    def unavailable_reasons(self):
        return [_LOAD_ERROR] if _LOAD_ERROR else []

    @staticmethod
    def isa() -> str:
        return _C.isa()

    def workspace_numel(self, op, *args):
        if not args[-1]:  # save=False: inference keeps nothing
            return 0
        family, scope, T, B, GH, H, _, proj = fwd_dims(op, args)
        if family == "lstm":  # csrc/lstm.cpp, ws_row: args (xw, w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ..., zmask_c, ...)
            ln = args[5] is not None or args[6] is not None
            cell = ln or args[10] is not None or args[-2] != 0  # zoneout of c: its mask, or p (args[-2])
            return T * B * (GH + H + (H if proj else 0) + (H if cell else 0) + (GH + 3 if ln else 0))
        if family == "gru":  # csrc/gru.cpp, ws_row
            return T * B * (GH + H + (GH + 1 if args[3] is not None else 0))
        return B * GH if scope == "step" else 0  # a plain RNN step keeps its output

    @staticmethod
    def set_parallel_min_macs(value: int) -> int:
        """Set C of the rule that splits a call of T steps over threads when a step's multiply-adds exceed
        C/8 + C/T (csrc/recurrence.h, ``team_size``; 0 splits every call with two unit blocks); returns
        the old value."""
        old = _C.parallel_min_macs()
        _C.set_parallel_min_macs(value)
        return old

    #: from this many multiply-adds the functional layer runs an input projection through ``mm`` below the
    #: cached buffers' size too (the packed kernel's own floor, csrc/gemm.cpp ``own_mm``): training calls at
    #: 2.1-17M multiply-adds a product (T100 B1 H96-H256, T50 B1 H256) took 0.78-0.96 of their time with
    #: torch's product; below it (LSTM B1 H64, 1.6M) 1.04 (benchmarks/NOTES.md, thirty-third session; 2^24
    #: before ``_ProjectionEager``). None on Intel CPUs, where ``mm`` runs torch's product anyway.
    mm_min_macs = None if policy.cpu_vendor() == "intel" else 1 << 21

    @staticmethod
    def mm(a, ta, b, tb, bias):
        """The contract's optional ``mm``: the packed kernel of the cells split over torch's threads by
        columns, where it beats torch's product (not on Intel CPUs, whose MKL path it does not beat; not
        for small products: csrc/gemm.cpp, ``own_mm``), else torch's product, into a buffer as ``empty``'s."""
        return OPS.mm(a, ta, b, tb, bias)

    @staticmethod
    def empty(shape, dtype):
        """The contract's optional ``empty``: an uninitialized CPU tensor from the extension's cache of
        large blocks (csrc/pool.cpp), for the input projection and its gradient."""
        return OPS.empty(shape, dtype)

    @staticmethod
    def cache_info() -> dict:
        """The large-buffer cache: bytes handed out, bytes idle, and the most idle bytes it keeps
        (FASTRNN_CPU_CACHE_MB, default 1024 MiB; 0 turns it off)."""
        in_use, idle, cap = _C.cache_info()
        return {"in_use": in_use, "idle": idle, "cap": cap}

    @staticmethod
    def set_cache_limit(megabytes: int, trim: bool = True) -> int:
        """Set the most idle MiB the large-buffer cache keeps (0 turns it off: buffers then come from
        torch's CPU allocator); with ``trim`` a lower limit frees the idle blocks at once. Returns the
        old limit in MiB."""
        return _C.set_cache_cap(int(megabytes) << 20, trim) >> 20

    @staticmethod
    def empty_cache() -> None:
        """Free the idle blocks of the large-buffer cache (blocks still in use stay)."""
        _C.empty_cache()

    def __getattr__(self, name):
        # the contract's methods are the extension's ops of the same names and arguments; the optional
        # inference entries, which only the fast paths call (nothing traces them there: ops.can_skip_ops),
        # are the extension's direct bindings of the same functions, without the dispatcher's boxed call
        # (~3 us of a cell call, benchmarks/NOTES.md); so is the one-step training node, whose autograd is
        # its own (csrc/cell_train.h)
        if OPS is not None and name in _OP_NAMES:
            return getattr(OPS, name)
        if _C is not None and name in _DIRECT_NAMES:
            return getattr(_C, name)
        raise AttributeError(name)


_OP_NAMES = {f"{f}_{s}_{p}" for f in ("lstm", "gru", "rnn") for s in ("seq", "step") for p in ("fwd", "bwd")}
# the optional ones: the inference entries and the one-step training node
_DIRECT_NAMES = ({f"{f}_{k}_fwd" for f in ("lstm", "gru", "rnn") for k in ("cell", "chunk", "packed")}
                 | {f"{f}_cell_train" for f in ("lstm", "gru", "rnn")})
BACKEND = CppBackend()
