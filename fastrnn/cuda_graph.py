"""``fastrnn.cuda_graphed``: a module's inference forward captured once in a CUDA graph.

The triton backend launches one kernel per time step (per layer-direction) when H is too large for its
whole-sequence kernel, and a streaming cell launches a few kernels per call: at small batch the
launches, not the GPU, set the time. Its time loop does no host synchronisation, so the whole forward
can be captured in a CUDA graph and replayed as one launch.
"""
from __future__ import annotations

import torch


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    if x is None:
        return []
    raise TypeError(f"cuda_graphed: inputs must be tensors, tuples of tensors or None, got {type(x).__name__}")


def cuda_graphed(module: torch.nn.Module, *example_inputs, warmup: int = 2):
    """Capture ``module(*example_inputs)`` (under ``torch.no_grad()``) in a CUDA graph.

    Returns a function taking inputs of the same shapes, dtypes and structure (tensors, tuples of
    tensors such as ``(h0, c0)``, or None) that copies them into the graph's static inputs, replays the
    graph and returns its static outputs: they are overwritten by the next call, so clone what you keep.
    The module's parameters are read in place (updating them in place is seen by later replays).
    PackedSequence inputs are not supported (their lengths are read on the host).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("fastrnn.cuda_graphed needs a CUDA device (torch.cuda.is_available() is False)")
    static = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in example_inputs]
    statics = _tensors(static)
    if any(not t.is_cuda for t in statics):
        raise ValueError("fastrnn.cuda_graphed: every example input must be a CUDA tensor")

    def rebuild(values):  # the example structure with the static tensors in place
        it = iter(values)

        def go(x):
            if isinstance(x, torch.Tensor):
                return next(it)
            if isinstance(x, (tuple, list)):
                return type(x)(go(v) for v in x)
            return x
        return [go(x) for x in static]

    args = rebuild(statics)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(warmup):  # compiles the kernels and fills the allocator's caches outside the capture
            module(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = module(*args)

    def replay(*inputs):
        new = _tensors(list(inputs))
        if len(new) != len(statics):
            raise ValueError(f"cuda_graphed: expected {len(statics)} input tensors as captured, got {len(new)}")
        for dst, src in zip(statics, new):
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"cuda_graphed: input of shape {tuple(src.shape)} and dtype {src.dtype} does not "
                                 f"match the captured {tuple(dst.shape)}, {dst.dtype}")
            dst.copy_(src)
        graph.replay()
        return out

    return replay
