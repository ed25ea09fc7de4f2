"""GPU mode of the benchmark suite (``python -m benchmarks.run --device cuda``).

The triton backend (and the reference) against torch.nn on cuDNN, CUDA-event timing, fp32/fp16/bf16,
inference and training, B in {1, 16, 64}, H in {256, 768, 1024}, T = 1024; the streaming case runs its
step loop inside a CUDA graph for every provider. It needs a CUDA device; run.py refuses without one.
"""
from __future__ import annotations

import sys

import torch

from .cases import Case
from .harness import interleaved, measure_peak_gflops, peak_memory_bytes, percentiles
from .providers import Workload, provider_names
from .run import check


def gpu_cases(quick: bool) -> list[Case]:
    Hs = (256, 768) if quick else (256, 768, 1024)
    Bs = (1, 16) if quick else (1, 16, 64)
    cells = ("LSTM",) if quick else ("LSTM", "GRU")
    cases = [Case(c, m, 1024, B, H) for c in cells for m in ("inference", "training") for B in Bs for H in Hs]
    cases += [Case(c, "streaming", 1024, 1, H) for c in cells for H in Hs]
    return cases


def _graphed(fn):
    """Capture ``fn`` (a whole streaming loop) in a CUDA graph; replaying it is the timed call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main(args) -> int:
    quick = not args.full
    peak, how = measure_peak_gflops("cuda")
    providers = provider_names("cuda")
    print(f"GPU benchmark on {torch.cuda.get_device_name(0)}; peak {peak:.0f} GFLOP/s ({how})")
    print(f"{'dtype':9} {'case':34} {'provider':10} {'ms':>9} {'p20-p80':>17} {'x cuDNN':>8} {'peak MB':>8}")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for case in gpu_cases(quick):
            work = Workload(case, providers, device="cuda", dtype=dtype)
            ref = work.run("torch")
            tol = (1e-3, 1e-2) if dtype == torch.float32 else (3e-2, 1e-1)  # TF32 / half precision
            ok = ["torch"]
            for p in providers[1:]:
                failure, err, ran = check(work, p, ref, *tol)
                if failure:
                    print(f"{str(dtype)[6:]:9} {case.name:34} {p:10} FAILED CHECK: {failure}")
                else:
                    ok.append(p)
            fns = {p: work.call(p) for p in ok}
            if case.mode == "streaming":
                fns = {p: _graphed(f) for p, f in fns.items()}
            samples = interleaved(fns, device="cuda", budget_s=args.budget or 2.0)
            base = percentiles(samples["torch"])[1]
            for p in ok:
                p20, p50, p80 = percentiles(samples[p])
                mem = peak_memory_bytes(fns[p], "cuda") / 2 ** 20
                print(f"{str(dtype)[6:]:9} {case.name:34} {p:10} {p50 * 1e3:9.3f} {p20 * 1e3:8.3f}-{p80 * 1e3:<8.3f}"
                      f" {base / p50:8.2f} {mem:8.1f}")
    sys.stdout.flush()
    return 0
