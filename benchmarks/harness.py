"""Timing, memory and the machine's peak: the measuring tools of the benchmark suite."""
from __future__ import annotations

import contextlib
import os
import statistics
import time

import torch


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    """p20, p50 (median), p80 of a list of seconds."""
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return q[1], statistics.median(s), q[7]


def _timer(device: str):
    if device == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return timed


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``range(n)`` in which every item comes right after every other one equally often
    (a Williams design: n orders for even n, 2n for odd n). On this machine a call is slower after
    some calls than after others (NOTES.md, "Calls after a pause"), so a plain rotation (A B C, B C A,
    C A B: A follows C in two of three rounds and B in one) would favour some providers."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    orders = [[(x + i) % n for x in first] for i in range(n)]
    return orders + [o[::-1] for o in orders] if n % 2 else orders


def interleaved(fns: dict, device="cpu", warmup_s=0.3, min_warmup=2, budget_s=3.0, min_rounds=5,
                max_rounds=200) -> dict:
    """Time every callable in ``fns`` in rounds whose orders are balanced (``balanced_orders``), so drift
    and what ran just before a call hit all alike.

    Each is first warmed up (JIT compiles and caches stay out of the timings). Rounds continue until
    ``budget_s`` of measured time is spent (at least ``min_rounds``), then on to the end of the current
    set of orders when ``max_rounds`` allows. Returns name -> list of seconds.
    """
    timed = _timer(device)
    for fn in fns.values():
        t_end = time.perf_counter() + warmup_s
        n = 0
        while n < min_warmup or time.perf_counter() < t_end:
            fn()
            n += 1
    names = list(fns)
    orders = balanced_orders(len(names))
    samples = {n: [] for n in names}
    spent = 0.0
    r = 0
    while r < min_rounds or (spent < budget_s and r < max_rounds) or (r % len(orders) and r < max_rounds):
        for name in (names[i] for i in orders[r % len(orders)]):
            t = timed(fns[name])
            samples[name].append(t)
            spent += t
        r += 1
    return samples


def medians_ms(fns: dict, **kwargs) -> dict:
    """``interleaved(fns, **kwargs)`` reduced to each callable's median in milliseconds."""
    return {k: percentiles(v)[1] * 1e3 for k, v in interleaved(fns, **kwargs).items()}


def peak_memory_bytes(fn, device="cpu") -> int:
    """Peak of memory allocated through torch during one call of ``fn`` (above what was held before)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # allocations and frees are attributed to the op that made them (self memory); replaying them in
    # start order gives the peak (transients inside a single op are not seen)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """The CPU profiler logs two lines per use to fd 2 from C++; keep them off the console."""
    import sys
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def measure_peak_gflops(device="cpu", n=2048, repeats=7) -> tuple[float, str]:
    """The machine's fp32 matmul rate through the fastest GEMM torch has here: (GFLOP/s, how)."""
    fn, flops, how = peak_gemm(device, n)
    samples = interleaved({"peak": fn}, device=device, warmup_s=0.5, budget_s=1.0, min_rounds=repeats)["peak"]
    return flops / percentiles(samples)[1] / 1e9, how


def peak_gemm(device="cpu", n=2048):
    """(call, its FLOPs, how): an n x n x n fp32 matmul through the fastest GEMM torch has here."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, n, generator=g).to(device)
    w = torch.randn(n, n, generator=g).to(device)
    if device == "cuda":
        fn, how = (lambda: torch.mm(x, w)), f"torch.mm (cuBLAS) {n}x{n}x{n} fp32, TF32 " \
            f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
    else:
        try:
            wp = torch.ops.mkldnn._reorder_linear_weight(w, n)
            torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], "")
            fn = lambda: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], "")  # noqa: E731
            how = f"oneDNN torch.ops.mkldnn._linear_pointwise, prepacked weight, {n}x{n}x{n} fp32"
        except (RuntimeError, AttributeError):
            fn, how = (lambda: torch.mm(x, w)), f"torch.mm {n}x{n}x{n} fp32"
    return fn, 2 * n ** 3, how
