"""torch.compile support for the fastrnn modules.

Dynamo refuses to trace any instance of torch.nn.RNN/GRU/LSTM (it graph-breaks on them unless the
global ``torch._dynamo.config.allow_rnn`` is set), and fastrnn's modules are such instances by
design. Their forward is plain Python around custom ops, which Dynamo traces fine, so fastrnn lifts
that refusal for its own modules only: torch's own RNN modules keep their usual behaviour.

Importing torch._dynamo takes about 2 s, so the patch is applied when Dynamo's module builder is
first imported (by torch.compile), not when fastrnn is.
"""
from __future__ import annotations

import importlib.abc
import sys

_BUILDER = "torch._dynamo.variables.builder"


def _patch(builder_module) -> None:
    from torch._dynamo import config

    from .modules import _SeqMixin

    cls = builder_module.VariableBuilder
    original = cls.wrap_module
    if getattr(original, "_fastrnn", False):
        return

    def wrap_module(self, value):
        if isinstance(value, _SeqMixin) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return original(self, value)
        return original(self, value)

    wrap_module._fastrnn = True
    cls.wrap_module = wrap_module


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of Dynamo's builder module to patch it once loaded."""

    def find_spec(self, name, path, target=None):
        if name != _BUILDER:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            try:
                _patch(module)
            except Exception as e:  # a changed Dynamo must not break torch.compile for everyone
                import warnings
                warnings.warn(f"fastrnn could not enable torch.compile for its modules: {e!r}")

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    if _BUILDER in sys.modules:
        _patch(sys.modules[_BUILDER])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
