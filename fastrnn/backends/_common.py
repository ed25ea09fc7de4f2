"""Small helpers shared by the backends' host code."""
from __future__ import annotations

import torch


def batch_sizes_from_lengths(lengths, T: int, B: int) -> list[int]:
    """Per-step active row counts from non-increasing per-row lengths (None: all rows, all steps)."""
    if lengths is None:
        return [B] * T
    lens = lengths.tolist()
    sizes = [0] * T
    n = B
    for t in range(T):
        while n > 0 and lens[n - 1] <= t:
            n -= 1
        sizes[t] = n
    return sizes


def empty_grads(grads, like):
    """Turn None gradients (absent optional inputs) into empty tensors, as the ops return them."""
    return tuple(like.new_empty(0) if g is None else g for g in grads)


class autograd_inside_op:
    """Re-enable autograd inside a custom op's implementation.

    torch runs a custom op's implementation with the Autograd dispatch keys excluded, so
    ``torch.autograd.grad`` there sees no graph. The reference backend's backward differentiates its
    own forward math, so it lifts that exclusion (and turns grad mode on) for the block.
    """

    def __enter__(self):
        K = torch._C.DispatchKey
        exclude = torch._C._dispatch_tls_local_exclude_set()
        exclude = exclude.remove(K.AutogradFunctionality).remove(K.ADInplaceOrView)
        self._guard = torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
        self._guard.__enter__()
        self._grad = torch.enable_grad()
        self._grad.__enter__()

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        return self._guard.__exit__(*exc)
