"""fastrnn: drop-in torch.nn LSTM/GRU/RNN modules backed by fused kernels.

    import fastrnn
    lstm = fastrnn.LSTM(64, 128, num_layers=2)   # same API as torch.nn.LSTM
    model = fastrnn.convert(model)               # or convert a model in place

Backends: see ``fastrnn.available_backends()`` and ``python -m fastrnn.info``.
"""
from . import _compile, ops  # noqa: F401  (ops registers the torch.library ops)
from .backends import _common  # noqa: F401  (its fork hook: see FORKED_UNDER_GNU_OMP)
from .convert import convert
from .cuda_graph import cuda_graphed
from .dispatch import BACKEND_NAMES, BackendNotSupportedError, available_backends, use_backend
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .quantized import quantize

_compile.install()

__version__ = "0.1.0"
__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "available_backends",
           "use_backend", "BackendNotSupportedError", "BACKEND_NAMES", "cuda_graphed", "quantize"]
