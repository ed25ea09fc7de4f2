"""The cell options (issue 18) against the plain fused layer and the eager LayerNorm-LSTM users write today,
same process, interleaved, median.

    python -m benchmarks.cell_options [--budget S] [--backend cpp] [--out FILE]

(`make bench` runs it after the main job, writing benchmarks/results/cell_options.txt.)

For each shape (T=100; B1 H256, B16 H256, B64 H512), inference (eval, no_grad) and training (train mode,
forward + backward of y.sum()): a plain fastrnn LSTM and GRU, the same with ``layer_norm=True``, the LSTM with
``zoneout=0.1``, ``recurrent_dropout=0.25`` and ``weight_dropout=0.25`` (training only: in eval the last
two are the plain layer), on one backend; and the eager layer-normalized LSTM of torch's own benchmark suite
(a per-step cell over ``F.linear`` and ``nn.LayerNorm``, here with c carried un-normalized as fastrnn's
definition). Prints the medians and the ratios the issue sets targets for: layer norm / plain (<= 1.3),
eager / layer norm (>= 3 at B1 and in training), each dropout or zoneout / plain (<= 1.2), and eager /
plain, the most eager / layer norm can be (a layer norm that cost nothing). Before timing, each fused module
is checked against the same module on the reference backend (eval, so without masks).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastrnn

SHAPES = [(100, 1, 256), (100, 16, 256), (100, 64, 512)]


class EagerLayerNormLSTM(nn.Module):
    """A layer-normalized LSTM as users write it without fastrnn: a Python loop over steps."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.w_ih = nn.Parameter(torch.randn(4 * hidden_size, input_size) / hidden_size ** 0.5)
        self.w_hh = nn.Parameter(torch.randn(4 * hidden_size, hidden_size) / hidden_size ** 0.5)
        self.bias = nn.Parameter(torch.zeros(4 * hidden_size))
        self.ln_ih = nn.LayerNorm(4 * hidden_size, bias=False)
        self.ln_hh = nn.LayerNorm(4 * hidden_size, bias=False)
        self.ln_c = nn.LayerNorm(hidden_size)
        self.hidden_size = hidden_size

    def forward(self, x):
        T, B = x.shape[0], x.shape[1]
        h = x.new_zeros(B, self.hidden_size)
        c = x.new_zeros(B, self.hidden_size)
        ys = []
        for t in range(T):
            gates = self.ln_ih(F.linear(x[t], self.w_ih)) + self.ln_hh(F.linear(h, self.w_hh)) + self.bias
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
            ys.append(h)
        return torch.stack(ys), (h, c)


def modules(H, backend, train):
    mods = {
        "lstm": fastrnn.LSTM(H, H, backend=backend),
        "lstm+ln": fastrnn.LSTM(H, H, backend=backend, layer_norm=True),
        "lstm+zoneout": fastrnn.LSTM(H, H, backend=backend, zoneout=0.1),
        "gru": fastrnn.GRU(H, H, backend=backend),
        "gru+ln": fastrnn.GRU(H, H, backend=backend, layer_norm=True),
        "eager ln-lstm": EagerLayerNormLSTM(H, H),
    }
    if train:
        mods["lstm+recdrop"] = fastrnn.LSTM(H, H, backend=backend, recurrent_dropout=0.25)
        mods["lstm+wdrop"] = fastrnn.LSTM(H, H, backend=backend, weight_dropout=0.25)
    for m in mods.values():
        m.train(train)
    return mods


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def check(mods, x):
    """Each fastrnn module equals itself on the reference backend (eval: no masks), to 1e-4."""
    for name, m in mods.items():
        if not isinstance(m, (fastrnn.LSTM, fastrnn.GRU)):
            continue
        was, backend = m.training, m.backend
        m.eval()
        with torch.no_grad():
            got = m(x)[0]
            m.backend = "reference"
            want = m(x)[0]
        m.backend = backend
        m.train(was)
        err = (got - want).abs().max().item()
        if err > 1e-4:
            raise SystemExit(f"{name}: differs from the reference backend by {err:.2e}")


def _call(m, x, train):
    if train:
        y = m(x)[0]
        y.sum().backward()
    else:
        with torch.no_grad():
            m(x)


def measure(T, B, H, backend, train, budget):
    x = torch.randn(T, B, H, requires_grad=train)
    mods = modules(H, backend, train)
    if not train and B == 1:
        check(mods, x[:20])
    for m in mods.values():
        _call(m, x, train)  # warm-up
    times = {k: [] for k in mods}
    end = time.perf_counter() + budget * len(mods)
    while time.perf_counter() < end or min(len(v) for v in times.values()) < 3:
        for k, m in mods.items():
            t = time.perf_counter()
            _call(m, x, train)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.5, help="measured seconds per module, shape and mode")
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--out", type=Path, help="also write the lines to this file")
    args = ap.parse_args(argv)
    lines = []

    def say(line):
        print(line, flush=True)
        lines.append(line)

    say(f"fastrnn cell options: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"float32, backend {args.backend}; median ms per call (T=100), same process, interleaved")
    for T, B, H in SHAPES:
        for train in (False, True):
            med = measure(T, B, H, args.backend, train, args.budget)
            mode = "training" if train else "inference"
            say(f"B{B:<3d} H{H} {mode:9s}: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
            ratios = [f"lstm ln/plain {med['lstm+ln'] / med['lstm']:.2f}", f"gru ln/plain {med['gru+ln'] / med['gru']:.2f}",
                      f"eager/ln {med['eager ln-lstm'] / med['lstm+ln']:.1f}x "
                      f"(eager/plain {med['eager ln-lstm'] / med['lstm']:.1f}x)",
                      f"zoneout/plain {med['lstm+zoneout'] / med['lstm']:.2f}"]
            if train:
                ratios += [f"recdrop/plain {med['lstm+recdrop'] / med['lstm']:.2f}",
                           f"wdrop/plain {med['lstm+wdrop'] / med['lstm']:.2f}"]
            say("    " + "; ".join(ratios))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
