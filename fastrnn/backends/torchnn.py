"""The ``torch`` backend: torch.nn's own implementation of the plain cells (oneDNN or its native kernels
on CPU, cuDNN on CUDA), for the calls where it is the fastest (``fastrnn.policy``).

It runs whole modules, not the ops of the contract: a module whose call it serves runs torch.nn's
``forward`` on its own parameters (the same state, so the same numbers as torch.nn, with torch.nn's
checks, errors and autograd). It serves exactly what torch.nn serves: the plain cells with proj_size and
PackedSequence input, in any float dtype, and none of fastrnn's additions (the LSTM variants, the cell
options, weight dropout in training). The automatic choice takes it only from the policy table, never
while torch.compile or another tracer records the call (torch.nn's RNNs break a compiled graph;
fastrnn's ops do not); ``backend='torch'`` names it explicitly.
"""
from __future__ import annotations

from . import FLOAT_DTYPES, Backend


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda")
    dtypes = FLOAT_DTYPES
    features = frozenset({"proj", "varlen"})

    def not_supported_reasons(self, spec):
        reasons = super().not_supported_reasons(spec)
        if "weight_dropout" in spec.features:
            reasons.append("feature 'weight_dropout' is not supported")
        return reasons


BACKEND = TorchBackend()
