"""python -m fastrnn.warm: compile the numba backend's kernels now, ahead of their first calls.

numba compiles a kernel at its first call in a fresh install (the LSTM's inference alone ~60 s on the Zen 3 of
benchmarks/NOTES.md, thirty-seventh session) and keeps the machine code in its disk cache, where every later
process finds it. This makes small calls that take each kernel path (one thread and a team, split by units
and by rows, inference and training, packed and reversed, projected, the variants and cell options, the cells,
the quantized modules) in ``--jobs`` processes at once, so the compile is paid once, over all the cores. Two
processes that both meet a kernel both compile it: the test suite's workers did (``make test`` runs this first).

    python -m fastrnn.warm [--jobs N] [--dtype float32] [--dtype float64]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

DTYPES = ("float32", "float64")


def calls(dtypes=("float32",)) -> list[tuple]:
    """The calls, largest compile first: (dtype, module class, its keyword arguments, (T, B) or (B,) for a cell,
    training, packed)."""
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
    import torch

    import fastrnn
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
    from .backends import numba as nb
    if nb._IMPORT_ERROR is not None:
        print(f"fastrnn.warm: numba is not importable ({nb._IMPORT_ERROR}); nothing to compile")
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
