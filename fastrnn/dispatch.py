"""The one place that chooses a backend.

Order of precedence for a call: the module's ``backend=`` argument, then the innermost
``fastrnn.use_backend(...)`` context, then the ``FASTRNN_BACKEND`` environment variable, then the
automatic choice: for a float32 call whose shape class the module passes, the ranking of that class in
the policy table (``fastrnn.policy``: measured, ``torch`` among the candidates, skipped while a tracer
records the call), then the device's static priority list; the first backend that can serve the call.
An explicitly named backend that cannot serve a call raises ``BackendNotSupportedError``; only the
automatic choice moves on to the next backend.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from dataclasses import dataclass, field

import torch

from . import policy

BACKEND_NAMES = ("reference", "numba", "cpp", "triton", "torch")

# fastrnn's own backends, best first (``torch`` enters the automatic choice only through the policy
# table). triton is listed on CPU too: it serves CPU tensors only under TRITON_INTERPRET=1 (its own
# `devices` say so), and after the reference, which serves everything, it is reached only when named.
# The cells (single steps) take the same order since numba has a fused inference cell (2026-12-03: batch-1
# streaming, H=256, 100 steps: numba 9.3 / 8.9 / 4.5 ms, reference 21.3 / 22.2 / 8.9 for LSTM / GRU / RNN;
# in training the two are within 10%; benchmarks/NOTES.md).
PRIORITY = {"cpu": ("cpp", "numba", "reference", "triton"), "cuda": ("triton", "reference")}

_MODULES = {name: f"fastrnn.backends.{name}" for name in BACKEND_NAMES}
_MODULES["torch"] = "fastrnn.backends.torchnn"
_loaded: dict = {}
_requested: contextvars.ContextVar = contextvars.ContextVar("fastrnn_backend", default=None)
_recorders: list = []


class BackendNotSupportedError(RuntimeError):
    """An explicitly requested backend cannot serve the call."""


@dataclass(frozen=True)
class Spec:
    """What one call needs: the cell family, device type, dtype and the features it uses."""

    family: str  # 'lstm' | 'gru' | 'rnn'
    device: str
    dtype: torch.dtype
    features: frozenset = field(default_factory=frozenset)  # 'proj', 'peephole', 'coupled', 'varlen'
    scope: str = "seq"  # 'seq' (whole sequences) or 'step' (cells)


def check_name(name):
    """Validate a backend name (None means automatic). Raises ValueError for unknown names."""
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"Unknown fastrnn backend {name!r}. Known backends: {', '.join(BACKEND_NAMES)}")
    return name


class _Unavailable:
    """Stands for a backend whose module could not be loaded on this machine."""

    def __init__(self, name, reason):
        self.name, self.reason = name, reason

    def unavailable_reasons(self):
        return [self.reason]


def get(name: str):
    """The backend object for ``name`` (loaded on first use); may be an unavailable placeholder."""
    check_name(name)
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name]).BACKEND
        except ModuleNotFoundError as e:
            if e.name == _MODULES[name]:
                reason = "not implemented in this version of fastrnn"
            else:
                reason = f"cannot import {e.name!r} ({e})"
            _loaded[name] = _Unavailable(name, reason)
        except Exception as e:  # a broken install must not break `import fastrnn`
            _loaded[name] = _Unavailable(name, f"failed to load: {type(e).__name__}: {e}")
    return _loaded[name]


def reasons(name: str, spec: Spec | None = None) -> list[str]:
    """Why ``name`` cannot serve ``spec`` (or cannot run at all when spec is None); [] means it can."""
    backend = get(name)
    why = backend.unavailable_reasons()
    if not why and spec is not None:
        why = backend.not_supported_reasons(spec)
    return why


def _priority(device: str) -> tuple:
    return PRIORITY.get(device, ("reference",))


def available_backends(device="cpu") -> list[str]:
    """fastrnn's own backends (those that run its ops; not ``torch``) that can run plain cells on
    ``device`` here (in float32 or float64), in the static priority order."""
    dev = torch.device(device).type
    probes = [Spec("lstm", dev, dtype) for dtype in (torch.float32, torch.float64)]
    return [n for n in _priority(dev) if any(not reasons(n, p) for p in probes)]


_backend_env = policy.env_reader("FASTRNN_BACKEND")


def requested() -> str | None:
    """The backend named by the innermost ``use_backend`` context, else by FASTRNN_BACKEND, else None."""
    name = _requested.get()
    if name is None:
        name = _backend_env() or None
        if name is not None and name not in BACKEND_NAMES:
            raise ValueError(f"FASTRNN_BACKEND={name!r} is not a fastrnn backend. "
                             f"Known backends: {', '.join(BACKEND_NAMES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Within the block, modules with ``backend=None`` use ``name`` (None: automatic choice)."""
    token = _requested.set(check_name(name))
    try:
        yield
    finally:
        _requested.reset(token)


def choose(family: str, device: str, dtype: torch.dtype, features: tuple = (), explicit: str | None = None,
           scope: str = "seq", shape: str | None = None, traced: bool = False) -> str:
    """``select`` with plain arguments: what the modules call.

    Under torch.compile the choice is made once, when the graph is traced, and baked into it.
    """
    return select(Spec(family, device, dtype, frozenset(features), scope), explicit, shape, traced)


# what torch._dynamo.assume_constant_result does, without importing torch._dynamo (~2 s) at import
choose._dynamo_marked_constant = True


def select(spec: Spec, explicit: str | None = None, shape: str | None = None, traced: bool = False) -> str:
    """The name of the backend that runs a call described by ``spec``. ``shape``: the call's class in
    the policy table (``policy.shape_class``), None when unknown; ``traced``: a tracer (torch.compile, a
    dispatch mode, a torch.func transform, torch.jit.trace) records the call, so the automatic choice
    never picks ``torch``."""
    name = explicit if explicit is not None else requested()
    if name is not None:
        why = reasons(name, spec)
        if why:
            avail = [n for n in _priority(spec.device) if not reasons(n, spec)]
            raise BackendNotSupportedError(
                f"fastrnn backend '{name}' cannot run this {spec.family.upper()} call "
                f"({spec.device}, {str(spec.dtype).replace('torch.', '')}): {'; '.join(why)}. "
                f"Backends that can: {', '.join(avail) or 'none'}")
        return name
    # the tables rank plain dense float32 calls (measured so); a call with a feature (proj_size and packed
    # input included: torch.nn's LSTM leaves oneDNN for them, benchmarks/NOTES.md) takes the static priority
    ranked = policy.ranking(spec.device, spec.family, spec.scope, shape) \
        if shape is not None and not spec.features and (spec.dtype == torch.float32 or spec.device == "cuda") else ()
    for name in (*ranked, *_priority(spec.device)):
        if name == "torch" and traced:
            continue
        if not reasons(name, spec):
            return name
    raise BackendNotSupportedError(f"no fastrnn backend can run this call: {spec}")


def note_call(opname: str, backend: str) -> None:
    """Called by every op implementation as it runs (see ``record_calls``)."""
    for rec in _recorders:
        rec.append((opname, backend))


@contextlib.contextmanager
def record_calls():
    """Collect ``(op name, backend name)`` for every fastrnn op that runs in the block.

    This is what really ran, as seen by the ops themselves: tests use it to assert the backend.
    """
    calls: list = []
    _recorders.append(calls)
    try:
        yield calls
    finally:  # by identity: list.remove would drop an outer recorder that happens to hold equal calls
        _recorders[:] = [r for r in _recorders if r is not calls]
