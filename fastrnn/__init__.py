"""fastrnn: drop-in torch.nn LSTM/GRU/RNN modules backed by fused kernels."""
from . import ops  # noqa: F401  (registers the torch.library ops)
from .dispatch import BackendNotSupportedError, available_backends, use_backend

__version__ = "0.1.0"
