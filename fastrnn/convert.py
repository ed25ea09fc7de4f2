"""fastrnn.convert: swap torch.nn recurrent modules inside a model for fastrnn's."""
from __future__ import annotations

import warnings

import torch.nn as nn
from torch.nn.utils import parametrize

from . import dispatch
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

_REPLACEMENT = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell,
                nn.RNNCell: RNNCell}
_FASTRNN = frozenset(_REPLACEMENT.values())


def convert(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Make every torch.nn LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell in ``model`` (the root included) a fastrnn module.

    The conversion is in place, like ``model.to()``: each module keeps its identity, Parameter
    objects, buffers, hooks, parametrizations, device, dtype and training mode, and only its class
    changes, so optimizers built before the call keep working. A parametrized module
    (``torch.nn.utils.parametrize``, ``parametrizations.weight_norm``, ``spectral_norm``) becomes a
    parametrized fastrnn module, which computes each parametrized weight once per forward. A module
    that cannot be converted is left as it is with a warning naming it and the reason: a subclass of a
    torch class (it may override forward), or an instance whose ``forward`` was replaced by a wrapper
    (it would still call torch.nn's forward; convert before wrapping). fastrnn modules already in the
    model are left alone. ``backend`` is set on each converted module (None: automatic choice).
    Returns ``model``.
    """
    dispatch.check_name(backend)
    for path, module in model.named_modules():
        cls = type(module)
        torch_cls = cls.__bases__[0] if parametrize.is_parametrized(module) else cls  # under torch's Parametrized*
        if torch_cls in _FASTRNN:
            continue
        target = _REPLACEMENT.get(torch_cls)
        if target is None:
            base = next((c for c in _REPLACEMENT if isinstance(module, c)), None)
            if base is not None and not isinstance(module, tuple(_FASTRNN)):
                _skip(path, module, f"its class {cls.__qualname__} is a subclass of torch.nn.{base.__name__}, "
                                    "which may override forward; only torch.nn's own classes are converted")
            continue
        own = module.__dict__.get("forward")
        if own is not None:
            if getattr(own, "__self__", None) is module and getattr(own, "__func__", None) is torch_cls.forward:
                del module.__dict__["forward"]  # torch.nn's forward bound on the instance: the class's serves
            else:
                _skip(path, module, "its instance has a forward of its own (a wrapper, such as a weight-drop "
                                    "helper), which would still call torch.nn's forward; convert the module "
                                    "before wrapping its forward")
                continue
        if torch_cls is not cls:  # parametrized: torch's injected class, over fastrnn's class
            attrs = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            target = type(cls.__name__, (target,), attrs)
        module.__class__ = target
        module.backend = backend
    return model


def _skip(path, module, why):
    name = f"'{path}'" if path else "the model itself"
    warnings.warn(f"fastrnn.convert: left {name} ({type(module).__name__}) as torch.nn runs it: {why}",
                  UserWarning, stacklevel=3)
