"""torch.compile support for the fastrnn modules.

Dynamo refuses to trace any instance of torch.nn.RNN/GRU/LSTM (it graph-breaks on them unless the
global ``torch._dynamo.config.allow_rnn`` is set), and fastrnn's modules are such instances by
design. Their forward is plain Python around custom ops, which Dynamo traces fine, so fastrnn lifts
that refusal for its own modules only: torch's own RNN modules keep their usual behaviour.
"""
from __future__ import annotations

import torch


def _is_fastrnn_module(value) -> bool:
    from .modules import _SeqMixin
    return isinstance(value, _SeqMixin)


def install() -> None:
    try:
        from torch._dynamo import config
        from torch._dynamo.variables.builder import VariableBuilder
    except Exception:  # no dynamo in this torch build: nothing to do
        return
    original = VariableBuilder.wrap_module
    if getattr(original, "_fastrnn", False):
        return

    def wrap_module(self, value):
        if _is_fastrnn_module(value) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return original(self, value)
        return original(self, value)

    wrap_module._fastrnn = True
    VariableBuilder.wrap_module = wrap_module


__all__ = ["install", "torch"]
