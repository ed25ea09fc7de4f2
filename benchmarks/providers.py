"""Providers: torch.nn (the baseline) and each fastrnn backend, built on identical weights and inputs."""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

from .cases import Case

TORCH_CLASSES = {"LSTM": (torch.nn.LSTM, torch.nn.LSTMCell), "GRU": (torch.nn.GRU, torch.nn.GRUCell),
                 "RNN": (torch.nn.RNN, torch.nn.RNNCell)}
FASTRNN_CLASSES = {"LSTM": (fastrnn.LSTM, fastrnn.LSTMCell), "GRU": (fastrnn.GRU, fastrnn.GRUCell),
                   "RNN": (fastrnn.RNN, fastrnn.RNNCell)}


def provider_names(device: str) -> list[str]:
    """'torch' first, then each available fastrnn backend (the eager reference last)."""
    return ["torch"] + fastrnn.available_backends(device)


def _module(case: Case, provider: str, device, dtype):
    seq_cls, cell_cls = (TORCH_CLASSES if provider == "torch" else FASTRNN_CLASSES)[case.cell]
    kw = {} if provider == "torch" else {"backend": provider}
    if case.mode == "streaming":
        return cell_cls(case.I, case.H, device=device, dtype=dtype, **kw)
    extra = {"proj_size": case.proj} if case.proj else {}
    return seq_cls(case.I, case.H, num_layers=case.layers, bidirectional=case.bidirectional, device=device,
                   dtype=dtype, **extra, **kw)


class Workload:
    """One case for all providers: the same weights and inputs; ``call(provider)`` runs one timed call."""

    def __init__(self, case: Case, providers: list[str], device="cpu", dtype=torch.float32, seed=0):
        self.case = case
        torch.manual_seed(seed)
        self.modules = {}
        state = None
        for p in providers:
            m = _module(case, p, device, dtype)
            if state is None:
                state = m.state_dict()
            m.load_state_dict(state)
            m.train(case.mode == "training")
            self.modules[p] = m
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(case.T, case.B, case.I, generator=g, dtype=dtype).to(device)

    def _input(self, requires_grad=False):
        x = self.x.detach().requires_grad_(requires_grad)
        if self.case.packed:
            return x, pack_padded_sequence(x, torch.tensor(self.case.lengths()), enforce_sorted=False)
        return x, x

    def run(self, provider: str):
        """Outputs (and gradients in training mode) of one call, for the correctness check."""
        m = self.modules[provider]
        if self.case.mode == "streaming":
            with torch.no_grad():
                return [self._stream(m)]
        if self.case.mode == "inference":
            with torch.no_grad():
                out, st = m(self._input()[1])
            return self._flat(out, st)
        if self.case.mode == "chunked":
            with torch.no_grad():
                return self._chunks(m)
        for p in m.parameters():
            p.grad = None
        leaf, x = self._input(True)
        out, st = m(x)
        self._loss(out, st).backward()
        return self._flat(out, st) + [leaf.grad] + [p.grad for p in m.parameters()]

    def call(self, provider: str):
        """A closure that runs one timed call for ``provider``."""
        m = self.modules[provider]
        mode = self.case.mode
        if mode == "streaming":
            def fn():
                with torch.no_grad():
                    self._stream(m)
        elif mode == "chunked":
            def fn():
                with torch.no_grad():
                    self._chunks(m)
        elif mode == "inference":
            x = self._input()[1]

            def fn():
                with torch.no_grad():
                    m(x)
        else:
            params = list(m.parameters())

            def fn():
                for p in params:
                    p.grad = None
                out, st = m(self._input(True)[1])
                self._loss(out, st).backward()
        return fn

    def _stream(self, cell):
        state = None
        for t in range(self.case.T):
            state = cell(self.x[t], state)
        return state[0] if isinstance(state, tuple) else state

    def _chunks(self, module):
        """A sequence module fed one step at a time (chunks of T=1), its state carried: streaming with the
        layer stack of a sequence model. Returns the outputs of every step and the final state."""
        state, outs = None, []
        for t in range(self.case.T):
            out, state = module(self.x[t:t + 1], state)
            outs.append(out)
        return [torch.cat(outs)] + (list(state) if isinstance(state, tuple) else [state])

    @staticmethod
    def _flat(out, st):
        data = out.data if hasattr(out, "batch_sizes") else out
        return [data] + (list(st) if isinstance(st, tuple) else [st])

    @staticmethod
    def _loss(out, st):
        return sum(t.sum() for t in Workload._flat(out, st))
