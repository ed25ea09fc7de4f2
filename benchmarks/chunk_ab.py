"""Short sequences in inference (the chunks of a stream) with and without the chunk path, against torch.nn,
in one process:

    python -m benchmarks.chunk_ab [--budget S]

For each case (B1 H256, 100 steps fed in chunks of 1, 4, 16 or 32 with the state carried) three providers are
timed in interleaved rounds: torch.nn, cpp, and cpp with the chunk path switched off for its call (the
module's fast path and the functional layer's ``<family>_chunk_fwd``: the projection and the sequence op
as before). See benchmarks/NOTES.md, "Short sequences".
"""
from __future__ import annotations

import argparse

import torch

import fastrnn
from fastrnn import modules
from fastrnn.backends import cpp

from .cases import Case
from .harness import medians_ms
from .providers import Workload


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=2.0, help="measured seconds per case")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastrnn {fastrnn.__version__}; "
          "ms per 100 steps, x = torch's / this")
    fast_path, max_rows = modules._SeqMixin._fast_path, cpp.CppBackend.chunk_max_rows

    def off():
        modules._SeqMixin._fast_path = lambda self, input, hx: None
        cpp.CppBackend.chunk_max_rows = 0

    def on():
        modules._SeqMixin._fast_path = fast_path
        cpp.CppBackend.chunk_max_rows = max_rows

    for cell in ("LSTM", "GRU", "RNN"):
        for layers, chunk in ((2, 1), (1, 1), (2, 4), (1, 16), (1, 32)):
            w = Workload(Case(cell, "chunked", 100, 1, 256, layers=layers), ["torch", "cpp"])

            def loop(m):
                def fn():
                    with torch.no_grad():
                        state = None
                        for t in range(0, w.case.T, chunk):
                            _, state = m(w.x[t:t + chunk], state)
                return fn

            run_cpp = loop(w.modules["cpp"])

            def run_off():
                off()
                try:
                    run_cpp()
                finally:
                    on()

            med = medians_ms({"torch": loop(w.modules["torch"]), "cpp": run_cpp, "off": run_off}, budget_s=args.budget)
            print(f"{cell} {layers} layer(s), chunks of {chunk}: torch {med['torch']:.2f}, cpp {med['cpp']:.2f} "
                  f"({med['torch'] / med['cpp']:.2f}x), without the chunk path {med['off']:.2f} "
                  f"({med['torch'] / med['off']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
