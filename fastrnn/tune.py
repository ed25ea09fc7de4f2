"""python -m fastrnn.tune: measure the policy table of the automatic backend choice on this machine.

For every class of ``fastrnn.policy`` it times a representative call (float32; hidden size 256 for the
cells; the sequences at two sizes of their hidden-size band, 64 and 192 up to ``policy.NARROW_H``, 256 and
384 up to ``policy.WIDE_H``, and at 768 above) on each candidate backend (fastrnn's CPU backends and
``torch``, torch.nn's own implementation reached through the fastrnn module, as the automatic choice would
run it) in interleaved rounds, ranks them by median (the geometric mean of the medians where a class has
two calls), and writes the table to this CPU model's cache (``fastrnn.policy.cache_path()``), where the
automatic choice finds it from then on. ``python -m fastrnn.info`` shows the table in force.

    python -m fastrnn.tune [--budget SECONDS_PER_CLASS] [--out PATH] [--print]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time

import torch

from . import __version__, dispatch, policy
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

H = 256  # the hidden size of the cells
#: the sequences: each band at two sizes (a band's ends can rank differently: benchmarks/NOTES.md, "LSTM
#: training at B32+ across the band"), the band above WIDE_H at H_WIDE
H_SMALL, H_NARROW = 64, policy.NARROW_H
H_MIDDLE, H_MIDDLE_TOP = 256, policy.WIDE_H
H_WIDE = 768
SEQ = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
CELL = {"lstm": LSTMCell, "gru": GRUCell, "rnn": RNNCell}
# the representative call of each class: (T, B) for sequences (the wide band: shorter), (B, steps) for cells
SEQ_SHAPES = {"inference B1": (100, 1), "inference B2-7": (100, 4), "inference B8-31": (100, 16),
              "inference B32+": (50, 64), "inference T1": (1, 1), "training B1": (100, 1), "training B2-7": (100, 4),
              "training B8-31": (100, 16), "training B32+": (50, 64), "training T1": (1, 16)}
SEQ_SHAPES.update({**{c + policy.NARROW: s for c, s in SEQ_SHAPES.items()},
                   **{c + policy.WIDE: (max(1, T // 4), B) for c, (T, B) in SEQ_SHAPES.items()}})
STEP_SHAPES = {"inference B1": (1, 50), "inference B2+": (16, 50), "training": (16, 20)}
STREAM_CALLS = 50  # calls of one step each in the 'inference T1' class, state carried
DECODER_STEPS = 16  # and in the 'training T1' class (a decoder's steps), then one backward


def widths(cls: str) -> tuple:
    """The hidden sizes a sequence class is timed at."""
    if cls.endswith(policy.WIDE):
        return (H_WIDE,)
    return (H_SMALL, H_NARROW) if cls.endswith(policy.NARROW) else (H_MIDDLE, H_MIDDLE_TOP)


def candidates(scope: str) -> list[str]:
    """Backends to time: torch and fastrnn's CPU backends that serve a plain float32 call (the reference
    only for cells: on sequences it is the slowest by far, ranked last without being timed)."""
    spec = dispatch.Spec("lstm", "cpu", torch.float32, scope=scope)
    names = ["torch"] + [n for n in dispatch.available_backends("cpu") if not dispatch.reasons(n, spec)]
    return [n for n in names if scope == "step" or n != "reference"]


def _seq_call(family, cls, backend, state, x, T, B):
    width = x.shape[-1]
    m = SEQ[family](width, width, backend=backend)
    m.load_state_dict(state)
    training = cls.startswith("training")
    if training:  # the input needs a gradient too, as a layer above another or an embedding's output
        xg = x.detach().requires_grad_()

        def fn():
            for p in m.parameters():
                p.grad = None
            xg.grad = None
            if T == 1:  # a decoder: one step a call, the state carried, one backward for all of them
                st, loss = None, 0
                for t in range(DECODER_STEPS):
                    out, st = m(xg[t:t + 1], st)
                    loss = loss + out.sum()
                loss.backward()
            else:
                out, st = m(xg)
                out.sum().backward()
    elif T == 1:
        def fn():
            with torch.no_grad():
                st = None
                for t in range(STREAM_CALLS):
                    _, st = m(x[t:t + 1], st)
    else:
        def fn():
            with torch.no_grad():
                m(x)
    return fn


def _step_call(family, cls, backend, state, x, B, steps):
    m = CELL[family](H, H, backend=backend)
    m.load_state_dict(state)
    if cls == "training":
        xg = x.detach().requires_grad_()

        def fn():
            for p in m.parameters():
                p.grad = None
            xg.grad = None
            st = None
            for t in range(steps):
                st = m(xg[t], st)
            (st[0] if isinstance(st, tuple) else st).sum().backward()
    else:
        def fn():
            with torch.no_grad():
                st = m(x[0])
                for t in range(1, steps):
                    st = m(x[t], st)
    return fn


def interleaved_medians(fns: dict, budget_s: float, min_rounds=5) -> dict:
    """Median seconds of each callable, timed in rounds that rotate the order (each warmed up twice). A
    small copy of ``benchmarks.harness.interleaved``: the installed package cannot import the repository's
    benchmarks folder."""
    for fn in fns.values():
        fn()
        fn()
    names = list(fns)
    samples = {n: [] for n in names}
    spent, r = 0.0, 0
    while r < min_rounds or spent < budget_s:
        order = names[r % len(names):] + names[:r % len(names)]
        for n in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            dt = time.perf_counter() - t0
            samples[n].append(dt)
            spent += dt
        r += 1
    return {n: statistics.median(v) for n, v in samples.items()}


def measure(budget_s: float = 0.5, log=print) -> dict:
    """The table: {'rankings': {'cpu': {key: [names]}}, 'times_ms': {key: {name: ms}}} plus the machine."""
    rankings, times = {}, {}
    torch.manual_seed(0)
    for key in policy.keys():
        family, scope, cls = key.split(" ", 2)
        names = candidates(scope)
        if scope == "seq":
            T, B = SEQ_SHAPES[cls]
            meds, sizes = [], widths(cls)
            for width in sizes:
                x = torch.randn(max(STREAM_CALLS, DECODER_STEPS) if T == 1 else T, B, width)
                state = SEQ[family](width, width).state_dict()
                fns = {n: _seq_call(family, cls, n, state, x, T, B) for n in names}
                meds.append(interleaved_medians(fns, budget_s / len(sizes)))
            med = {n: math.exp(sum(math.log(m[n]) for m in meds) / len(meds)) for n in names}
        else:
            B, steps = STEP_SHAPES[cls]
            x = torch.randn(steps, B, H)
            state = CELL[family](H, H).state_dict()
            fns = {n: _step_call(family, cls, n, state, x, B, steps) for n in names}
            med = interleaved_medians(fns, budget_s)
        order = sorted(med, key=med.get)
        rest = [n for n in policy.builtin()["rankings"]["cpu"][key] if n not in order]
        rankings[key] = order + rest
        times[key] = {n: round(med[n] * 1e3, 4) for n in order}
        log(f"{key:31s} " + "  ".join(f"{n} {med[n] * 1e3:.3f}" for n in order) + " ms")
    return {"format": policy.FORMAT, "cpu": policy.cpu_model(), "torch": torch.__version__, "fastrnn": __version__,
            "threads": torch.get_num_threads(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "hidden_size": H, "seq_hidden_sizes": {b.strip() or f"H{policy.NARROW_H + 1}-{policy.WIDE_H}": widths(b)
                                                   for b in (policy.NARROW, "", policy.WIDE)},
            "budget_s": budget_s,
            "rankings": {"cpu": rankings}, "times_ms": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=0.5, help="measured seconds per class (default 0.5)")
    ap.add_argument("--out", help="where to write the table (default: this CPU model's cache file)")
    ap.add_argument("--print", action="store_true", help="print the table as JSON too")
    args = ap.parse_args(argv)
    print(f"fastrnn.tune on {policy.cpu_model()}, {torch.get_num_threads()} threads, hidden size {H} (sequences: "
          f"{H_SMALL} and {H_NARROW} up to {policy.NARROW_H}, {H_MIDDLE} and {H_MIDDLE_TOP} up to {policy.WIDE_H}, "
          f"{H_WIDE} above), float32; "
          f"candidates: sequences {', '.join(candidates('seq'))}; cells {', '.join(candidates('step'))}")
    table = measure(args.budget)
    out = args.out or policy.cache_path()
    from pathlib import Path
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(table, f, indent=1)
    policy.forget()
    print(f"wrote {out}")
    if args.print:
        print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
