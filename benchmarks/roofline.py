"""The memory side of the roofline: read bandwidth of L2, L3 and DRAM measured in the run, and the bytes
each case must move.

A case's attainable time is max(FLOPs / measured peak, memory time), where the memory time adds up, for
each group of bytes, bytes / the bandwidth of the level that can hold them:

- the recurrent weights (W_hh, and W_hr with proj_size; plus W_ih for the cells and one-step calls,
  whose input projection runs every step) are read every step, from the smallest level that holds one
  layer-direction's share: the sum of the cores' L2s, else L3, else DRAM; training reads them again in
  the backward;
- the rest moves once: the input, W_ih, the input projection (written, then read by the recurrence) and
  the output; training adds the saved workspace (written, read back) and the gradients of the same
  tensors.

The bandwidths are read by ``measure_bandwidth``: every core sums its own block of float32 (a numba
kernel, one thread a core), block sizes set from the cache sizes the OS reports (sysfs), never assumed.
"""
from __future__ import annotations

import functools
import statistics
import time

import numpy as np

from fastrnn.backends._common import cache_sizes  # noqa: F401  (also the tests' import)

from .cases import GATES, Case

F32 = 4


@functools.lru_cache(maxsize=None)
def _kernel():  # compiled once a process (each reading around a case reuses it)
    import numba

    @numba.njit(parallel=True, fastmath=True)
    def read(buf, reps):  # buf [cores, n]: core p sums row p, reps times
        parts, n = buf.shape
        out = np.zeros(parts, np.float32)
        for p in numba.prange(parts):
            s = np.float32(0)
            row = buf[p]
            for _ in range(reps):
                for i in range(n):
                    s += row[i]
            out[p] = s
        return out
    return read


def measure_bandwidth(repeats=7, min_bytes=1 << 30) -> dict:
    """Read bandwidth in GB/s of 'L2', 'L3' and 'DRAM' with every physical core reading its own block (one
    numba thread a core): half its L2; for L3, half its share of L3 when that is at least twice its L2
    (else no L3 reading: no block fits between them); 4x its L3 share. The median of ``repeats`` timings
    of at least ``min_bytes`` each. Raises ImportError without numba."""
    import numba
    sizes = cache_sizes()
    cores = min(sizes["cores"], numba.config.NUMBA_NUM_THREADS)
    read = _kernel()
    l3_share = sizes["L3"] // cores
    blocks = {"L2": sizes["L2"] // 2 or 128 << 10,
              "L3": l3_share // 2 if l3_share // 2 >= 2 * sizes["L2"] else 0,
              "DRAM": 4 * max(l3_share, 8 << 20)}
    saved = numba.get_num_threads()
    numba.set_num_threads(cores)
    out = {"sizes": sizes, "block_bytes": {}}
    for level, block in blocks.items():
        if not block:
            continue
        n = block // F32 // 64 * 64
        buf = _block(cores, n)
        reps = max(1, min_bytes // (cores * n * F32))
        read(buf, 1)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            read(buf, reps)
            times.append(time.perf_counter() - t0)
        out[level] = cores * n * F32 * reps / statistics.median(times) / 1e9
        out["block_bytes"][level] = n * F32
    numba.set_num_threads(saved)
    if "L3" not in out:  # the weights' level then falls back to the DRAM reading (level_for)
        out["L3"] = out["DRAM"]
    return out


@functools.lru_cache(maxsize=3)
def _block(cores: int, n: int):  # the blocks read (one a level), kept for the run's later readings
    return np.ones((cores, n), np.float32)


def case_bandwidth(run_bw: dict, around: list[dict]) -> dict:
    """The bandwidths a case's roofline takes, as ``run.case_peak`` takes the peak: for each level the higher
    of the run's reading (before the cases) and the readings just before and just after the case's rounds.
    A run whose first reading fell in a slow minute (one read L2 273 GB/s against 416-472 in the others, and
    its peak 237 GFLOP/s against 461-484) would otherwise put every memory-bound case's roofline too far away
    and its % of roofline too high (benchmarks/NOTES.md, thirty-third session)."""
    out = dict(run_bw)
    for level in ("L2", "L3", "DRAM"):
        if level in run_bw:
            out[level] = max([run_bw[level]] + [a[level] for a in around if level in a])
    return out


def level_for(nbytes: int, sizes: dict) -> str:
    """The smallest level that holds ``nbytes``: 'L2' (the cores' L2s together), 'L3' or 'DRAM'."""
    if nbytes <= sizes["L2_total"]:
        return "L2"
    if sizes["L3"] and nbytes <= sizes["L3"]:
        return "L3"
    return "DRAM"


def case_bytes(case: Case) -> dict:
    """{'weights_step': bytes read every step by one layer-direction, 'steps': steps x layer-directions
    (x2 in training), 'once': bytes that move once} for one timed call, float32."""
    G, H, I = GATES[case.cell], case.H, case.I
    P = case.proj or H
    D = 2 if case.bidirectional else 1
    rows = sum(case.lengths())
    per_step = G * H * P + (P * H if case.proj else 0)
    per_call_projection = case.mode in ("streaming", "chunked", "decoding")  # the input projection runs every step
    once = 0
    weights_step = 0
    for layer in range(case.layers):
        i_size = I if layer == 0 else D * P
        w_ih = G * H * i_size
        weights_step = max(weights_step, per_step + (w_ih if per_call_projection else 0))
        x, xw, y = rows * i_size, rows * G * H, rows * P
        once += D * ((0 if per_call_projection else w_ih) + 2 * xw + y) + x
    steps = case.T * case.layers * D
    if case.trains:
        ws = D * case.layers * rows * (G + 2) * H  # gates and states saved, written then read back
        once = 3 * once + 2 * ws
        steps *= 2
    return {"weights_step": weights_step * F32, "steps": steps, "once": once * F32}


def roofline_ms(case: Case, peak_gflops: float, bw: dict) -> dict:
    """{'ms': attainable time, 'bound': 'compute' | 'memory', 'memory_ms', 'compute_ms', levels}."""
    b = case_bytes(case)
    sizes = bw["sizes"]
    lw, lo = level_for(b["weights_step"], sizes), level_for(b["once"], sizes)
    mem_s = b["weights_step"] * b["steps"] / (bw[lw] * 1e9) + b["once"] / (bw[lo] * 1e9)
    comp_s = case.flops() / (peak_gflops * 1e9)
    return {"ms": 1e3 * max(mem_s, comp_s), "bound": "memory" if mem_s > comp_s else "compute",
            "memory_ms": 1e3 * mem_s, "compute_ms": 1e3 * comp_s, "weights_level": lw, "once_level": lo}
