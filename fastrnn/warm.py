"""python -m fastrnn.warm: compile the numba backend's kernels now, ahead of their first calls.

numba compiles a kernel at its first call in a fresh install (the LSTM's inference alone ~60 s on the Zen 3 of
benchmarks/NOTES.md, thirty-seventh session) and keeps the machine code in its disk cache, where every later
process finds it. This makes small calls that take each kernel path (one thread and a team, split by units
and by rows, inference and training, packed and reversed, projected, the variants and cell options, the cells,
the quantized modules) in ``--jobs`` processes at once, so that the compile is paid before the first real call
(an image build, a deploy step), over all the cores. The disk cache is numba's (``numba_kernels`` keys it by the
package's files), so a later process of the same install and CPU loads what this compiled.

    python -m fastrnn.warm [--jobs N] [--dtype float32] [--dtype float64]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import torch

import fastrnn

from . import dispatch

DTYPES = ("float32", "float64")


def calls(dtypes=("float32",)) -> list[tuple]:
    """The calls: (dtype, module class, its keyword arguments, (T, B) or (B,) for a cell, training, packed)."""
    out = []
    for dt in dtypes:
        for cls, extra in (("LSTM", {}), ("GRU", {}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"})):
            for train in (False, True):
                # one thread (T5 B1 H32), a team split by units (T40 B1 H64), split by rows (T20 B16 H64)
                for T, B, H in ((5, 1, 32), (40, 1, 64), (20, 16, 64)):
                    out.append((dt, cls, dict(extra, hidden_size=H), (T, B), train, False))
                out.append((dt, cls, dict(extra, hidden_size=32, bidirectional=True), (6, 3), train, True))
                if cls == "LSTM":
                    out.append((dt, cls, dict(hidden_size=32, proj_size=16), (6, 3), train, False))
                    out.append((dt, cls, dict(hidden_size=32, peephole=True, coupled_gates=True), (6, 3), train,
                                False))
                if cls != "RNN":
                    out.append((dt, cls, dict(hidden_size=32, layer_norm=True, zoneout=0.1, recurrent_dropout=0.1),
                                (6, 3), train, False))
        for cls in ("LSTMCell", "GRUCell", "RNNCell"):
            for train in (False, True):
                for B, H in ((1, 32), (16, 256)):
                    out.append((dt, cls, dict(hidden_size=H), (B,), train, False))
    for cls in ("LSTM", "GRU", "RNN"):
        for q in ("qint8", "bfloat16"):
            out.append(("float32", cls, dict(hidden_size=32, quantized=q), (6, 3), False, False))
    return out


def run(call) -> float:
    """Make one call on the numba backend; its seconds."""
    dt, cls, kw, shape, train, packed = call
    kw = dict(kw)
    q = kw.pop("quantized", None)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    m = getattr(fastrnn, cls)(8, **kw, backend=None if q else "numba").to(getattr(torch, dt))
    if q:
        m = fastrnn.quantize(torch.nn.Sequential(m), getattr(torch, q), backend="numba")
    m.train(train)
    x = torch.randn(*shape, 8, dtype=getattr(torch, dt), requires_grad=train and not packed)
    if packed:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, [shape[0] - k for k in range(shape[1])])
    with torch.set_grad_enabled(train):
        out = m(x)
        y = out[0] if isinstance(out, tuple) else out
        y = y.data if packed else y
        if train:
            y.sum().backward()
    return time.perf_counter() - t0


def _worker(call):
    return call, run(call)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastrnn.warm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: the cores)")
    ap.add_argument("--dtype", action="append", choices=DTYPES, help="float32 (default), float64; repeatable")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each call's seconds")
    args = ap.parse_args(argv)
    why = dispatch.reasons("numba")
    if why:
        print(f"fastrnn.warm: the numba backend is unavailable ({'; '.join(why)}); nothing to compile")
        return 0
    todo = calls(tuple(args.dtype or ("float32",)))
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # a fresh process each: no OpenMP state from a parent
    with ctx.Pool(max(1, args.jobs)) as pool:
        for call, s in pool.imap_unordered(_worker, todo):
            if args.verbose:
                print(f"{s:7.1f} s  {call}", flush=True)
    print(f"fastrnn.warm: {len(todo)} calls on the numba backend in {time.perf_counter() - t0:.0f} s "
          f"({args.jobs} processes); their kernels are in numba's disk cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
