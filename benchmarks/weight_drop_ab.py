"""``weight_dropout`` against the plain fused layer, in one process:

    python -m benchmarks.weight_drop_ab [--budget S] [--backend cpp]

For the training cases of ``make bench`` (T100: B1 H256, B16 H256, B64 H512; LSTM and GRU; forward and
backward of one call) three providers are timed in interleaved rounds: torch.nn, the backend's plain
module, and the same module with ``weight_dropout=0.3`` (a mask over each W_hh per call). Issue 18's
target: within 1.2x of the plain layer. See benchmarks/NOTES.md, "Weight dropout".
"""
from __future__ import annotations

import argparse

import torch

import fastrnn

from .cases import Case
from .harness import interleaved, percentiles
from .providers import Workload


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=2.0, help="measured seconds per case")
    ap.add_argument("--backend", default="cpp")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastrnn {fastrnn.__version__}; "
          "ms per training call (median), x = torch's / this")
    for cell in ("LSTM", "GRU"):
        for B, H in ((1, 256), (16, 256), (64, 512)):
            w = Workload(Case(cell, "training", 100, B, H), ["torch", args.backend])
            plain = w.modules[args.backend]
            dropped = getattr(fastrnn, cell)(plain.input_size, H, backend=args.backend, weight_dropout=0.3)
            dropped.load_state_dict(plain.state_dict())
            w.modules["dropped"] = dropped
            med = {k: percentiles(v)[1] * 1e3 for k, v in
                   interleaved({"torch": w.call("torch"), "plain": w.call(args.backend), "dropped": w.call("dropped")},
                               budget_s=args.budget).items()}
            print(f"{cell} T100 B{B} H{H}: torch {med['torch']:.2f}, {args.backend} {med['plain']:.2f} "
                  f"({med['torch'] / med['plain']:.2f}x), with weight_dropout=0.3 {med['dropped']:.2f} "
                  f"({med['torch'] / med['dropped']:.2f}x); {med['dropped'] / med['plain']:.3f}x the plain layer",
                  flush=True)


if __name__ == "__main__":
    main()
