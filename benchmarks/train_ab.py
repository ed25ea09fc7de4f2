"""One change to the training path, on and off, against torch.nn, in one process:

    python -m benchmarks.train_ab --variant copy|bwd_op|weight_dropout [--budget S] [--backend cpp]

For the training cases of ``make bench`` (T100: B1 H256, B16 H256, B64 H512; LSTM, GRU, RNN; forward and
backward of one call) three providers are timed in interleaved rounds: torch.nn, the backend as it is
("on"), and the backend with the variant switched ("off"):

- ``copy``: the copy of the sequence op's output that ``rnn_layers`` hands out (``functional._fresh_output``),
  off = no copy (benchmarks/NOTES.md, "In-place ops on the output");
- ``bwd_op``: a first-order backward calling the backward op's implementation directly (``ops.DIRECT``), off =
  through the op and its Python autograd layer, which double backward added;
- ``weight_dropout``: on = ``weight_dropout=0.3`` (a mask over each W_hh per call), off = the plain module
  (NOTES, "Weight dropout"; issue 18's target: on / off <= 1.2).
"""
from __future__ import annotations

import argparse
from unittest import mock

import torch

import fastrnn
from fastrnn import functional, ops

from .cases import Case
from .harness import medians_ms
from .providers import Workload


def _switched(run, patch):
    """``run`` with ``patch`` (a unittest.mock patcher) applied around each call."""
    def fn():
        with patch:
            run()
    return fn


def providers(variant, w, cell, backend):
    """(on, off) callables for one workload."""
    run = w.call(backend)
    if variant == "copy":
        return run, _switched(run, mock.patch.object(functional, "_fresh_output", lambda y: y))
    if variant == "bwd_op":
        name = f"{cell.lower()}_seq_bwd"
        return run, _switched(run, mock.patch.dict(ops.DIRECT, {name: getattr(torch.ops.fastrnn, name).default}))
    plain = w.modules[backend]
    dropped = getattr(fastrnn, cell)(plain.input_size, plain.hidden_size, backend=backend, weight_dropout=0.3)
    dropped.load_state_dict(plain.state_dict())
    w.modules["dropped"] = dropped
    return w.call("dropped"), run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["copy", "bwd_op", "weight_dropout"], required=True)
    ap.add_argument("--budget", type=float, default=2.0, help="measured seconds per case")
    ap.add_argument("--backend", default="cpp")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastrnn {fastrnn.__version__}; "
          f"{args.variant} on / off on {args.backend}; ms per training call (median), x = torch's / this")
    for cell in ("LSTM", "GRU", "RNN"):
        for B, H in ((1, 256), (16, 256), (64, 512)):
            w = Workload(Case(cell, "training", 100, B, H), ["torch", args.backend])
            on, off = providers(args.variant, w, cell, args.backend)
            med = medians_ms({"torch": w.call("torch"), "on": on, "off": off}, budget_s=args.budget)
            print(f"{cell} T100 B{B} H{H}: torch {med['torch']:.2f}, on {med['on']:.2f} ({med['torch'] / med['on']:.2f}x), "
                  f"off {med['off']:.2f} ({med['torch'] / med['off']:.2f}x); on / off {med['on'] / med['off']:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
