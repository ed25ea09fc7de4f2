"""The cost of handing out a copy of the sequence op's output in training (so that an in-place op on the
output leaves the y its backward reads intact), in one process:

    python -m benchmarks.inplace_ab [--budget S] [--backend cpp]

For each training case of ``make bench`` (T100: B1 H256, B16 H256, B64 H512; LSTM, GRU, RNN; forward and
backward of one call) three providers are timed in interleaved rounds: torch.nn, the backend, and the
backend with the copy switched off for its call (``fastrnn.functional._fresh_output``). See
benchmarks/NOTES.md, "In-place ops on the output".
"""
from __future__ import annotations

import argparse

import torch

import fastrnn
from fastrnn import functional

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
    fresh = functional._fresh_output
    for cell in ("LSTM", "GRU", "RNN"):
        for B, H in ((1, 256), (16, 256), (64, 512)):
            w = Workload(Case(cell, "training", 100, B, H), ["torch", args.backend])
            run = w.call(args.backend)

            def run_off():
                functional._fresh_output = lambda y: y
                try:
                    run()
                finally:
                    functional._fresh_output = fresh

            med = {k: percentiles(v)[1] * 1e3 for k, v in
                   interleaved({"torch": w.call("torch"), "with": run, "without": run_off},
                               budget_s=args.budget).items()}
            print(f"{cell} T100 B{B} H{H}: torch {med['torch']:.2f}, {args.backend} with the copy {med['with']:.2f} "
                  f"({med['torch'] / med['with']:.2f}x), without {med['without']:.2f} "
                  f"({med['torch'] / med['without']:.2f}x); copy costs {100 * (med['with'] / med['without'] - 1):+.1f}%",
                  flush=True)


if __name__ == "__main__":
    main()
