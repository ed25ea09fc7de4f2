"""The cpp backend's large-buffer cache (csrc/pool.cpp) on and off, against torch.nn, in one process:

    python -m benchmarks.cache_ab [--budget S]

For each case, three providers are timed in interleaved rounds: torch.nn, cpp with the cache, and cpp
with the cache turned off for its call (``set_cache_limit(0, trim=False)``: buffers from torch's CPU
allocator, while the idle blocks wait for the next cached call).
Also printed: the minor page faults of one call (median over the rounds), which is what the cache
removes: a fresh mmap'ed buffer costs a fault per 4 KiB page on first touch.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import fastrnn
from fastrnn.backends import cpp

from .harness import interleaved, percentiles
from .providers import Workload
from .cases import Case

CASES = [Case(cell, mode, 100, B, H) for cell in ("LSTM", "GRU") for mode in ("inference", "training")
         for B, H in ((1, 256), (16, 256), (64, 512))]


def _faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=2.0, help="measured seconds per case")
    args = ap.parse_args(argv)
    limit = cpp.BACKEND.cache_info()["cap"] >> 20
    if limit == 0:
        raise SystemExit("the cache is off (FASTRNN_CPU_CACHE_MB=0): nothing to compare")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastrnn {fastrnn.__version__}, "
          f"cache limit {limit} MiB")
    print(f"{'case':32s} {'torch ms':>9s} {'cache ms':>9s} {'off ms':>9s} {'x torch':>8s} {'off x':>6s}"
          f" {'faults torch/cache/off':>24s}")
    for case in CASES:
        w = Workload(case, ["torch", "cpp"])
        torch_fn, cpp_fn = w.call("torch"), w.call("cpp")
        faults = {"torch": [], "cache": [], "off": []}
        times = {"torch": [], "cache": [], "off": []}

        def counted(name, fn, before=None, after=None):
            # times only fn, not the switch
            def run():
                if before:
                    before()
                f0, t0 = _faults(), time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                faults[name].append(_faults() - f0)
                if after:
                    after()
            return run

        def off_on():
            cpp.BACKEND.set_cache_limit(0, trim=False)  # the idle blocks stay for the next cached call

        def back_on():
            cpp.BACKEND.set_cache_limit(limit)

        samples = interleaved({"torch": counted("torch", torch_fn), "cache": counted("cache", cpp_fn),
                               "off": counted("off", cpp_fn, off_on, back_on)},
                              budget_s=args.budget, min_rounds=5)
        # the timed rounds are the last len(samples[k]) calls (the first ones were the warm-up)
        med = {k: percentiles(v[-len(samples[k]):])[1] * 1e3 for k, v in times.items()}
        fl = "/".join(str(int(statistics.median(faults[k][-len(samples[k]):]))) for k in ("torch", "cache", "off"))
        print(f"{case.name:32s} {med['torch']:9.3f} {med['cache']:9.3f} {med['off']:9.3f} "
              f"{med['torch'] / med['cache']:8.2f} {med['torch'] / med['off']:6.2f} {fl:>24s}")


if __name__ == "__main__":
    main()
