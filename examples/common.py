"""What the examples share: the command-line options, the recurrent class for ``--backend``, a seeded
shuffle, a progress bar and the per-epoch report."""
from __future__ import annotations

import argparse
import time

import torch

import fastrnn


class BackendError(Exception):
    """``--backend`` names a backend that cannot run here: fastrnn's error and its reason."""


def add_common_args(ap: argparse.ArgumentParser, epochs: int) -> argparse.ArgumentParser:
    ap.add_argument("--backend", default="auto",
                    help="torch (torch.nn itself), auto (fastrnn's automatic choice) or a fastrnn backend: "
                         + ", ".join(fastrnn.BACKEND_NAMES))
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def rnn_class(name: str, backend: str, device: str = "cpu"):
    """A constructor for the recurrent layer ``name`` (LSTM, GRU, RNN): torch.nn's for ``torch``, else
    fastrnn's with that backend (``auto``: the automatic choice). A fastrnn backend that cannot run here
    raises fastrnn's own error with the reason, before any training."""
    if backend == "torch":
        return getattr(torch.nn, name)
    chosen = None if backend == "auto" else backend
    dev = torch.device(device).type
    try:
        fastrnn.dispatch.check_name(chosen)
        fastrnn.dispatch.choose(name.lower(), dev, torch.float32, (), chosen)
    except (ValueError, fastrnn.BackendNotSupportedError) as e:  # fastrnn's message, with the reason
        raise BackendError(f"{type(e).__name__}: {e}") from e

    def make(*args, **kwargs):
        return getattr(fastrnn, name)(*args, backend=chosen, **kwargs)
    return make


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Index tensors of a seeded shuffle of range(n), in batches."""
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def progress(iterable, desc: str, quiet: bool):
    if quiet:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety: plain iteration without it
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


class EpochTimer:
    """Wall time of each epoch (the first includes warm-up: compiles, caches)."""

    def __init__(self):
        self.times = []

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.times.append(time.perf_counter() - self._t0)

    def summary(self) -> str:
        t = self.times
        later = sorted(t[1:]) if len(t) > 1 else t
        return f"first epoch {t[0]:.3g} s, median of the rest {later[len(later) // 2]:.3g} s"
