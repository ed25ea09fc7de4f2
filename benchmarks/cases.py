"""The benchmark cases: cells x modes x shapes, and their FLOP counts."""
from __future__ import annotations

from dataclasses import dataclass

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
TRAINING_MODES = ("training", "decoding")
RAGGED_FRACTIONS = (1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2)  # packed case: lengths as fractions of T


@dataclass(frozen=True)
class Case:
    cell: str  # LSTM | GRU | RNN (RNN = tanh)
    # inference | training | streaming (a cell, T calls) | chunked (a sequence module, T calls of one step) |
    # decoding (training a sequence module called T times on one step each, the state carried: a decoder)
    mode: str
    T: int
    B: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False
    proj: int = 0

    @property
    def I(self) -> int:  # noqa: E743  (input size = hidden size in every case)
        return self.H

    @property
    def shape(self) -> str:
        s = f"T{self.T} B{self.B} H{self.H}"
        if self.layers > 1:
            s += f" L{self.layers}"
        if self.bidirectional:
            s += " bi"
        if self.packed:
            s += " packed"
        if self.proj:
            s += f" P{self.proj}"
        return s

    @property
    def name(self) -> str:
        return f"{self.cell} {self.mode} {self.shape}"

    def lengths(self) -> list[int]:
        """Per-row sequence lengths (all T unless packed: ragged, longest first)."""
        if not self.packed:
            return [self.T] * self.B
        return [max(1, round(self.T * RAGGED_FRACTIONS[b % len(RAGGED_FRACTIONS)])) for b in range(self.B)]

    def flops(self) -> float:
        """FLOPs of one timed call: per layer-direction step 2*G*H*(I_layer + P)*rows forward (plus the
        projection 2*P*H*rows), rows summed over steps; backward counts twice the forward."""
        G = GATES[self.cell]
        P = self.proj or self.H
        D = 2 if self.bidirectional else 1
        rows = sum(self.lengths())  # row-steps
        total = 0.0
        for layer in range(self.layers):
            i_size = self.I if layer == 0 else D * P
            per_row = 2 * G * self.H * (i_size + P) + (2 * P * self.H if self.proj else 0)
            total += D * per_row * rows
        return total * (3 if self.trains else 1)

    @property
    def trains(self) -> bool:
        """Does a timed call run a backward (training, decoding)?"""
        return self.mode in TRAINING_MODES


BASE_SHAPES = [(1, 64), (1, 256), (1, 512), (16, 256), (64, 512)]  # (B, H), T = 100


def all_cases(quick: bool) -> list[Case]:
    cases = []
    cells = ("LSTM", "GRU", "RNN")
    for cell in cells:
        for mode in ("inference", "training"):
            shapes = BASE_SHAPES if not quick else [(1, 256), (16, 256), (64, 512)]
            for B, H in shapes:
                cases.append(Case(cell, mode, 100, B, H))
    # streaming: batch 1, a cell called T times with carried state
    for cell in cells:
        for H in ((256,) if quick else (64, 256, 512)):
            cases.append(Case(cell, "streaming", 100, 1, H))
    # chunked: batch 1, a 2-layer sequence module called T times on one step each, state carried
    for cell in cells:
        cases.append(Case(cell, "chunked", 100, 1, 256, layers=2))
    # decoding: a decoder in training, a sequence module called T times on one step each (the state carried),
    # one backward: the policy's 'training T1' class
    if not quick:
        for cell in cells:
            cases.append(Case(cell, "decoding", 50, 16, 256))
    # the structured cases
    for mode in ("inference", "training"):
        if quick and mode == "training":
            continue
        cases.append(Case("LSTM", mode, 100, 16, 256, layers=2, bidirectional=True))
        cases.append(Case("LSTM", mode, 100, 16, 256, packed=True))
        cases.append(Case("LSTM", mode, 100, 16, 256, proj=128))
        if not quick:
            cases.append(Case("GRU", mode, 100, 16, 256, layers=2, bidirectional=True))
            cases.append(Case("GRU", mode, 100, 16, 256, packed=True))
            # a hidden size that two workers do not split in whole column blocks of 32 (cpp's layout)
            cases.append(Case("LSTM", mode, 100, 16, 200))
            cases.append(Case("GRU", mode, 100, 16, 200))
    # the policy's LSTM training at B32+ away from the grid's H: a short sequence, a small hidden size
    if not quick:
        cases.append(Case("LSTM", "training", 50, 64, 64))
    return cases


def quantized_cases() -> list[Case]:
    """Issue 20's grid for the quantized models: LSTM and GRU inference at T=100, B 1/16/64, H 256/512/1024."""
    return [Case(cell, "inference", 100, B, H) for cell in ("LSTM", "GRU") for H in (256, 512, 1024) for B in (1, 16, 64)]
