"""fastrnn.convert: swap torch.nn recurrent modules inside a model for fastrnn's."""
from __future__ import annotations

import torch.nn as nn

from . import dispatch
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

_REPLACEMENT = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell,
                nn.RNNCell: RNNCell}


def convert(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Make every torch.nn LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell in ``model`` (the root included) a fastrnn module.

    The conversion is in place, like ``model.to()``: each module keeps its identity, Parameter
    objects, buffers, hooks, device, dtype and training mode, and only its class changes, so
    optimizers built before the call keep working. Only exact torch classes are converted (a user's
    subclass may override forward); fastrnn modules already in the model are left alone. ``backend``
    is set on each converted module (None: automatic choice). Returns ``model``.
    """
    dispatch.check_name(backend)
    for module in model.modules():
        cls = _REPLACEMENT.get(type(module))
        if cls is not None:
            module.__class__ = cls
            module.backend = backend
    return model
