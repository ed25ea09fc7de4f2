"""The cell options (issue 18) against the plain fused layer and the eager LayerNorm-LSTM users write today,
same process, interleaved, median.

    python -m benchmarks.cell_options [--budget S] [--backend cpp] [--shapes quick|all]

For each shape (T=100; B1 H256, B16 H256, B64 H512), inference (eval, no_grad) and training (train mode,
forward + backward of y.sum()): a plain fastrnn LSTM and GRU, the same with ``layer_norm=True``, the LSTM with
``zoneout=0.1``, ``recurrent_dropout=0.25`` and ``weight_dropout=0.25`` (training only: in eval the last
two are the plain layer), on one backend; and the eager layer-normalized LSTM of torch's own benchmark suite
(a per-step cell over ``F.linear`` and ``nn.LayerNorm``, here with c carried un-normalized as fastrnn's
definition). Prints the medians and the ratios the issue sets targets for: layer norm / plain (<= 1.3),
eager / layer norm (>= 3 at B1 and in training), each dropout or zoneout / plain (<= 1.2).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

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
    args = ap.parse_args(argv)
    print(f"fastrnn cell options: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32, backend {args.backend}; median ms per call (T=100)")
    for T, B, H in SHAPES:
        for train in (False, True):
            med = measure(T, B, H, args.backend, train, args.budget)
            mode = "training" if train else "inference"
            print(f"B{B:<3d} H{H} {mode:9s}: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
            ratios = [f"lstm ln/plain {med['lstm+ln'] / med['lstm']:.2f}", f"gru ln/plain {med['gru+ln'] / med['gru']:.2f}",
                      f"eager/ln {med['eager ln-lstm'] / med['lstm+ln']:.1f}x",
                      f"zoneout/plain {med['lstm+zoneout'] / med['lstm']:.2f}"]
            if train:
                ratios += [f"recdrop/plain {med['lstm+recdrop'] / med['lstm']:.2f}",
                           f"wdrop/plain {med['lstm+wdrop'] / med['lstm']:.2f}"]
            print("    " + "; ".join(ratios))


if __name__ == "__main__":
    main()
