"""The LSTM variants against the plain LSTM and the eager per-step loop, same process, interleaved.

    python -m benchmarks.variants [--budget S]

For each benchmark shape (T=100; B1 H256, B16 H256, B64 H512; inference and training) and each fused CPU
backend: the median time of a plain LSTM, of peephole, coupled and both, and of the same variant on the
reference backend (per-step PyTorch ops). Prints variant/plain and reference/variant.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastrnn

SHAPES = [(100, 1, 256), (100, 16, 256), (100, 64, 512)]
VARIANTS = {"plain": {}, "peephole": dict(peephole=True), "coupled": dict(coupled_gates=True),
            "both": dict(peephole=True, coupled_gates=True)}


def _call(m, x, train):
    if train:
        y, (h, c) = m(x)
        y.sum().backward()
    else:
        with torch.no_grad():
            m(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1.0, help="measured seconds per shape and mode")
    args = ap.parse_args(argv)
    backends = [b for b in fastrnn.available_backends("cpu") if b != "reference"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; median ms per call")
    for T, B, H in SHAPES:
        for train in (False, True):
            x = torch.randn(T, B, H, requires_grad=train)
            mods = {(be, v): fastrnn.LSTM(H, H, backend=be, **kw) for be in backends + ["reference"]
                    for v, kw in VARIANTS.items() if be != "reference" or v != "plain"}
            for m in mods.values():
                _call(m, x, train)  # warm-up
            times = {k: [] for k in mods}
            end = time.perf_counter() + args.budget * len(mods)
            while time.perf_counter() < end or min(len(v) for v in times.values()) < 3:
                for k, m in mods.items():
                    t = time.perf_counter()
                    _call(m, x, train)
                    times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            mode = "training" if train else "inference"
            for be in backends:
                row = [f"{v} {med[(be, v)]:.2f}" for v in VARIANTS]
                ratios = [f"{v}/plain {med[(be, v)] / med[(be, 'plain')]:.2f}, reference/{v} "
                          f"{med[('reference', v)] / med[(be, v)]:.1f}x" for v in VARIANTS if v != "plain"]
                print(f"T{T} B{B} H{H} {mode:9s} {be:5s}: " + ", ".join(row) + " | " + "; ".join(ratios))


if __name__ == "__main__":
    main()
