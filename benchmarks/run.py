"""fastrnn's benchmark suite: every backend against torch.nn, side by side, in one process.

    python -m benchmarks.run [--quick | --full] [--device cpu|cuda] [--providers torch,reference,...]
                             [--cells LSTM,GRU,RNN] [--modes inference,training,streaming,chunked,decoding] [--budget S]

Prints a table (median ms, p20-p80, GFLOP/s, % of the machine's peak and % of the case's roofline, both
measured in the same run, speedup vs torch, max abs error against torch.nn float32, peak memory), writes
benchmarks/results/latest.{csv,json} and PNG plots.

Providers: torch (torch.nn), auto (fastrnn's automatic choice; the backend it ran is shown), each fastrnn
backend, and on CPU the peers onnxruntime (torch.nn exported to ONNX) and torch-int8 (torch's dynamic
int8 RNNs) in the inference cases, skipped with a printed reason where they cannot run.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import fastrnn

from .cases import Case, all_cases, quantized_cases
from .harness import interleaved, measure_peak_gflops, peak_gemm, peak_memory_bytes, percentiles
from .providers import AUTO, PEERS, Workload, case_reasons, peer_reasons, provider_names
from .roofline import case_bandwidth, measure_bandwidth, roofline_ms

RESULTS = Path(__file__).parent / "results"
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
TOL_OUT, TOL_GRAD = 1e-4, 1e-3  # max |a-b| / max(1, max |ref|), float32 over 100 steps


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return "n/a"


def environment(device: str) -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        sha = sha + ("-dirty" if dirty else "") if sha else "unknown"
    except OSError:
        sha = "unknown"
    from fastrnn.info import _cpu_name
    hw = torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name()
    return {"device": device, "hardware": hw, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "numba": _version("numba"), "triton": _version("triton"), "fastrnn": fastrnn.__version__,
            "git_sha": sha, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "python": platform.python_version()}


def _rel_err(a, b):
    if a.shape != b.shape:
        return math.inf
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    return ((a.double() - b.double()).abs().max().item() / scale) if b.numel() else 0.0


#: providers whose results are not held to the tolerance (a quantized model): their error is reported
UNCHECKED = ("torch-int8", "onnxruntime-int8", "fastrnn-int8", "fastrnn-bf16")


def check(work: Workload, provider: str, ref_results, tol_out=TOL_OUT, tol_grad=TOL_GRAD) -> tuple:
    """(None if ``provider`` matches torch on this case, else what differs; the max abs error of its
    outputs against torch.nn's; the fastrnn backends that ran, for the automatic choice)."""
    try:
        with fastrnn.dispatch.record_calls() as calls:
            got = work.run(provider)
    except Exception as e:  # a provider that crashes is reported, not timed
        return f"{type(e).__name__}: {e}", None, ""
    ran = "+".join(sorted({b for _, b in calls}))
    n_out = len(ref_results) if not work.case.trains else len(ref_results) - 1 - len(
        list(work.modules[provider].parameters()))
    if len(got) != len(ref_results):
        return f"returned {len(got)} tensors, torch {len(ref_results)}", None, ran
    for k, (a, b) in enumerate(zip(got, ref_results)):
        if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
            return f"tensor {k}: {'missing' if a is None or b is None else f'shape {tuple(a.shape)}'} " \
                   f"(torch: {None if b is None else tuple(b.shape)})", None, ran
    err = max([(a.double() - b.double()).abs().max().item() for a, b in zip(got[:n_out], ref_results[:n_out])
               if a is not None and a.numel()] or [0.0])
    if provider in UNCHECKED:
        return None, err, ran
    for k, (a, b) in enumerate(zip(got, ref_results)):
        if (a is None) != (b is None):
            return f"tensor {k} is missing on {'this provider' if a is None else 'torch'}"
        if a is None:
            continue
        tol = tol_out if k < n_out else tol_grad
        if not _rel_err(a, b) <= tol:
            return (f"{'output' if k < n_out else 'gradient'} {k} differs from torch by {_rel_err(a, b):.2e} "
                    f"(tolerance {tol:.0e})", err, ran)
    return None, err, ran


# A PEAK_N^3 GEMM is timed PEAK_CALLS times right before and right after every case's rounds
PEAK_N, PEAK_CALLS = 1024, 5


def bandwidth_around() -> dict:
    """A shorter reading of the read bandwidths (3 timings of 256 MiB a level, ~30 ms), taken right before
    and right after each case's rounds (``roofline.case_bandwidth``)."""
    return measure_bandwidth(repeats=3, min_bytes=1 << 28)


def case_peak(run_peak: float, in_rounds: float) -> float:
    """The peak a case's % of peak is taken against: the higher of the run's reading (before the cases,
    2048^3) and the GEMM rate measured around the case's own rounds (1024^3, just before and just after
    them). Other tenants of this VM slow everything down by up to ~1.5x for minutes at a time (one run
    read its peak at 180 GFLOP/s, others 210-232): the reading around the rounds sees the machine the
    providers saw, and the higher of the two keeps a low reading from making a provider look faster
    than the machine."""
    return max(run_peak, in_rounds)


def bench_case(case: Case, providers: list[str], device: str, peak: float, budget: float, min_rounds=5,
               bandwidth: dict | None = None) -> list[dict]:
    dtype = torch.float32
    providers = [p for p in providers if not case_reasons(case, p)]
    work = Workload(case, providers, device=device, dtype=dtype)
    ref = work.run("torch")
    rows, fns = [], {}
    for p in providers:
        failure, err, ran = (None, 0.0, "") if p == "torch" else check(work, p, ref)
        if failure is None:
            fns[p] = work.call(p)
        rows.append({"provider": p, "failure": failure, "max_abs_err": err, "ran": ran})
    # the machine's GEMM rate right before and right after the case's rounds (see case_peak); not inside
    # them, where its 12 MiB would clear the caches before the provider that follows it
    gemm, gemm_flops, _ = peak_gemm(device, PEAK_N)

    def gemm_times():
        return interleaved({"gemm": gemm}, device=device, warmup_s=0, min_warmup=1, budget_s=0,
                           min_rounds=PEAK_CALLS)["gemm"]

    # the read bandwidths too (roofline.case_bandwidth), outside the rounds like the GEMM
    around = [bandwidth_around()] if bandwidth else []
    before = gemm_times()
    # the correctness check above already ran every provider once (compiles, caches): one more warm-up call
    samples = interleaved(fns, device=device, budget_s=budget, min_warmup=1, min_rounds=min_rounds)
    peak = case_peak(peak, gemm_flops / percentiles(before + gemm_times())[1] / 1e9)
    if bandwidth:
        bandwidth = case_bandwidth(bandwidth, around + [bandwidth_around()])
    flops = case.flops()
    t_torch = percentiles(samples["torch"])[1]
    roof = roofline_ms(case, peak, bandwidth) if bandwidth else None
    for row in rows:
        p = row["provider"]
        base = {"cell": case.cell, "mode": case.mode, "shape": case.shape, "T": case.T, "B": case.B, "H": case.H,
                "layers": case.layers, "bidirectional": case.bidirectional, "packed": case.packed, "proj": case.proj,
                "dtype": str(dtype).replace("torch.", ""), "flops": flops}
        row.update(base)
        if row["failure"] is not None:
            continue
        p20, p50, p80 = percentiles(samples[p])
        row.update({"p20_ms": p20 * 1e3, "p50_ms": p50 * 1e3, "p80_ms": p80 * 1e3, "rounds": len(samples[p]),
                    "gflops": flops / p50 / 1e9, "case_peak_gflops": peak, "pct_peak": 100 * flops / p50 / 1e9 / peak,
                    "speedup_vs_torch": t_torch / p50,
                    # the peers' memory is not allocated through torch, where the profiler looks
                    "peak_mem_mb": None if p in PEERS else peak_memory_bytes(fns[p], device) / 2 ** 20})
        if roof is not None:
            row.update({"roofline_ms": roof["ms"], "pct_roofline": 100 * roof["ms"] / (p50 * 1e3),
                        "roofline_bound": roof["bound"], "roofline_vs_torch": t_torch * 1e3 / roof["ms"],
                        "weights_level": roof["weights_level"],
                        "case_bandwidth_gbs": {k: bandwidth[k] for k in ("L2", "L3", "DRAM") if k in bandwidth}})
    return rows


def cold_start(providers: list[str], cell="LSTM") -> list[dict]:
    """First call in a fresh process, with empty compile caches and then with the caches warm."""
    rows = []
    for p in providers:
        with tempfile.TemporaryDirectory(prefix="fastrnn-cold-") as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache, TORCH_EXTENSIONS_DIR=cache, TRITON_CACHE_DIR=cache)
            for label in ("empty cache", "warm cache"):
                out = subprocess.run([sys.executable, "-m", "benchmarks.coldstart", p, cell], env=env,
                                     capture_output=True, text=True, cwd=Path(__file__).parent.parent)
                if out.returncode != 0:
                    rows.append({"provider": p, "cache": label, "error": out.stderr.strip().splitlines()[-1:]})
                    break
                res = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"provider": p, "cache": label, "cell": cell, "shape": "T100 B1 H256", **res})
    return rows


def _case_peak_range(rows):
    peaks = [r["case_peak_gflops"] for r in rows if r.get("case_peak_gflops")]
    return f" ({min(peaks):.0f}-{max(peaks):.0f} GFLOP/s over the cases)" if peaks else ""


def _case_bw_range(rows):
    l2 = [r["case_bandwidth_gbs"]["L2"] for r in rows if r.get("case_bandwidth_gbs")]
    return f" (L2 {min(l2):.0f}-{max(l2):.0f} GB/s over the cases)" if l2 else ""


def ceiling_vs_torch(torch_row: dict) -> float:
    """The speedup over torch of a provider that did the case's FLOPs at the peak measured in the run:
    100 / torch's % of peak. No provider can beat it in float32 arithmetic, so a target above it cannot
    be met on this machine (printed on torch's row as "at peak")."""
    return 100.0 / torch_row["pct_peak"] if torch_row["pct_peak"] > 0 else float("inf")


def provider_label(r: dict) -> str:
    """The provider's name; for the automatic choice, with the backend(s) it ran."""
    return f"{r['provider']}:{r['ran']}" if r["provider"] == AUTO and r.get("ran") else r["provider"]


def format_table(env: dict, peak: float, peak_how: str, rows: list[dict], cold: list[dict], bandwidth=None,
                 notes=()) -> str:
    lines = [f"fastrnn benchmark {env['date']} | {env['device']}: {env['hardware']}, {env['threads']} threads | "
             f"torch {env['torch']}, numba {env['numba']}, triton {env['triton']} | commit {env['git_sha']}",
             f"peak fp32 measured in this run: {peak:.0f} GFLOP/s ({peak_how}); % peak: of the higher of that "
             f"and a {PEAK_N}^3 GEMM's rate around the case's rounds{_case_peak_range(rows)}"]
    if bandwidth:
        sz = bandwidth["sizes"]
        lines.append("read bandwidth measured in this run (every core its own block): " + ", ".join(
            f"{lvl} {bandwidth[lvl]:.0f} GB/s" for lvl in ("L2", "L3", "DRAM") if lvl in bandwidth["block_bytes"])
            + f" (L2 {sz['L2'] >> 10} KiB x {sz['cores']} cores, L3 {sz['L3'] >> 20} MiB); each case takes the "
            f"higher of these and a reading around its rounds{_case_bw_range(rows)}")
        lines.append("% roof = the case's roofline time / this median: roofline = max(FLOPs / peak, bytes that "
                     "must move / bandwidth of the level holding them); on torch's row: the roofline's x torch")
    lines += ["float32; ms = median of interleaved calls (p20-p80); x torch = torch's median / this median; "
              "* = fastest; err = max abs output error vs torch.nn fp32; auto:X = fastrnn's automatic choice ran X",
              ""]
    hdr = f"{'cell':5} {'mode':10} {'shape':22} {'provider':16} {'ms':>9} {'p20-p80 ms':>17} {'GFLOP/s':>8} " \
          f"{'% peak':>7} {'% roof':>7} {'x torch':>8} {'err':>8} {'peak MB':>8}"
    lines += [hdr, "-" * len(hdr)]
    key = None
    for r in rows:
        k = (r["cell"], r["mode"], r["shape"])
        group = [x for x in rows if (x["cell"], x["mode"], x["shape"]) == k and x.get("failure") is None]
        best = min(group, key=lambda x: x["p50_ms"])["provider"] if group else None
        lead = f"{r['cell']:5} {r['mode']:10} {r['shape']:22}" if k != key else " " * 39
        if k != key and key is not None:
            lines.append("")
        key = k
        label = provider_label(r)
        if r.get("failure"):
            lines.append(f"{lead} {label:16} FAILED CHECK: {r['failure']}")
            continue
        star = "*" if r["provider"] == best else " "
        roof = f"{r['pct_roofline']:6.1f}%" if r.get("pct_roofline") is not None else f"{'-':>7}"
        err = f"{r['max_abs_err']:8.1e}" if r.get("max_abs_err") else f"{'0':>8}"
        mem = f"{r['peak_mem_mb']:8.2f}" if r.get("peak_mem_mb") is not None else f"{'-':>8}"
        ceiling = ""
        if r["provider"] == "torch":
            ceiling = f"  (at peak: {ceiling_vs_torch(r):.2f}x" + (
                f"; roofline: {r['roofline_vs_torch']:.2f}x, {r['roofline_bound']}-bound, W from "
                f"{r['weights_level']})" if r.get("roofline_vs_torch") else ")")
        lines.append(f"{lead} {label:16} {r['p50_ms']:9.3f}{star}{r['p20_ms']:8.3f}-{r['p80_ms']:<8.3f} "
                     f"{r['gflops']:8.2f} {r['pct_peak']:6.1f}% {roof} {r['speedup_vs_torch']:8.2f} {err} {mem}"
                     f"{ceiling}")
    if notes:
        lines += ["", "not run:"] + [f"  {n}" for n in notes]
    if cold:
        lines += ["", "cold start (fresh process, LSTM T100 B1 H256 inference): import s | first call s"]
        for c in cold:
            if "error" in c:
                lines.append(f"  {c['provider']:10} {c['cache']:12} ERROR {c['error']}")
            else:
                lines.append(f"  {c['provider']:10} {c['cache']:12} {c['import_s']:7.3f} | {c['first_call_s']:7.3f}")
    return "\n".join(lines)


def write_results(out: Path, env: dict, peak: float, peak_how: str, rows: list[dict], cold: list[dict],
                  bandwidth=None, notes=()) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["cell", "provider", "mode", "shape", "T", "B", "H", "layers", "bidirectional", "packed", "proj",
              "dtype", "device", "hardware", "threads", "torch", "numba", "triton", "git_sha", "date", "p20_ms",
              "p50_ms", "p80_ms", "rounds", "flops", "gflops", "pct_peak", "peak_gflops", "case_peak_gflops",
              "speedup_vs_torch", "peak_mem_mb", "max_abs_err", "ran", "roofline_ms", "pct_roofline",
              "roofline_bound", "roofline_vs_torch", "weights_level", "failure"]
    full = [{**r, **env, "peak_gflops": peak} for r in rows]
    with open(out / "latest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(full)
    with open(out / "latest.json", "w") as f:
        json.dump({"environment": env, "peak_gflops": peak, "peak_method": peak_how, "bandwidth_gbs": bandwidth,
                   "not_run": list(notes), "results": full, "cold_start": cold}, f, indent=1)


def plot(out: Path, rows: list[dict], env: dict) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if not r.get("failure")]
    cases = list(dict.fromkeys(f"{r['cell']} {r['mode']} {r['shape']}" for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    paths = []
    for metric, fname, title, log in [("speedup_vs_torch", "speedup.png", "speedup vs torch.nn (higher is better)", True),
                                      ("pct_peak", "percent_peak.png", "% of measured peak fp32 GFLOP/s", False)]:
        provs = [p for p in providers if metric != "speedup_vs_torch" or p != "torch"]
        fig, ax = plt.subplots(figsize=(9, 0.32 * len(cases) * max(1, len(provs)) / 1.5 + 1.5))
        height = 0.8 / max(1, len(provs))
        for k, p in enumerate(provs):
            vals = []
            for c in cases:
                r = next((r for r in ok if r["provider"] == p and f"{r['cell']} {r['mode']} {r['shape']}" == c), None)
                vals.append(r[metric] if r else float("nan"))
            ax.barh([i + k * height for i in range(len(cases))], vals, height=height, label=p)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
        ax.set_yticklabels(cases, fontsize=7)
        ax.invert_yaxis()
        if log:
            from matplotlib.ticker import FuncFormatter
            ax.set_xscale("log")
            ax.axvline(1.0, color="k", lw=0.8)
            fmt = FuncFormatter(lambda v, _: f"{v:g}x")
            ax.xaxis.set_major_formatter(fmt)
            ax.xaxis.set_minor_formatter(fmt)
        ax.set_title(f"{title}\n{env['hardware']}, {env['threads']} threads, commit {env['git_sha']}, {env['date']}",
                     fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        paths.append(out / fname)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a subset of the cases (the default)")
    size.add_argument("--full", action="store_true", help="every case")
    size.add_argument("--quantized", action="store_true",
                      help="the quantized models' cases: LSTM and GRU inference, T=100, B 1/16/64, H 256/512/1024")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--providers", help="comma-separated subset of: torch and the available backends")
    ap.add_argument("--cells", help="comma-separated subset of LSTM,GRU,RNN")
    ap.add_argument("--modes", help="comma-separated subset of inference,training,streaming,chunked,decoding")
    ap.add_argument("--budget", type=float, default=None, help="measured seconds per case (default 1.0 quick, 4 full)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-cold-start", action="store_true")
    args = ap.parse_args(argv)

    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda needs a CUDA GPU and a CUDA build of torch; this machine has "
                  f"torch {torch.__version__} and no usable GPU", file=sys.stderr)
            return 2
        from .gpu import main as gpu_main
        return gpu_main(args)

    quick = not args.full
    budget = args.budget if args.budget is not None else (1.0 if quick else 4.0)
    providers = provider_names(args.device)
    if args.providers:
        wanted = args.providers.split(",")
        unknown = [p for p in wanted if p not in providers]
        if unknown:
            print(f"error: provider(s) {unknown} not available here; available: {providers}", file=sys.stderr)
            return 2
        providers = ["torch"] + [p for p in wanted if p != "torch"]
    cases = quantized_cases() if args.quantized else all_cases(quick)
    if args.cells:
        cases = [c for c in cases if c.cell in args.cells.split(",")]
    if args.modes:
        cases = [c for c in cases if c.mode in args.modes.split(",")]

    env = environment(args.device)
    peak, peak_how = measure_peak_gflops(args.device)
    notes = [f"{p}: {'; '.join(peer_reasons(p))}" for p in PEERS if peer_reasons(p)]
    try:
        bandwidth = measure_bandwidth()
    except ImportError as e:
        bandwidth = None
        notes.append(f"the memory roofline: the bandwidth kernel needs numba ({e})")
    from tqdm import tqdm
    rows = []
    for case in tqdm(cases, desc="benchmark", unit="case", file=sys.stderr):
        rows += bench_case(case, providers, args.device, peak, budget, min_rounds=3 if quick else 5,
                           bandwidth=bandwidth)
    skipped = {}
    for case in cases:
        for p in providers:
            for why in case_reasons(case, p):
                skipped.setdefault(f"{p}: {why}", []).append(case.name)
    notes += [f"{k} ({len(v)} case{'s' if len(v) > 1 else ''})" for k, v in skipped.items()]
    cold = [] if args.no_cold_start else cold_start([p for p in providers if p not in PEERS and p != AUTO])
    table = format_table(env, peak, peak_how, rows, cold, bandwidth, notes)
    print(table)
    write_results(args.out, env, peak, peak_how, rows, cold, bandwidth, notes)
    (args.out / "latest.txt").write_text(table + "\n")
    written = [args.out / "latest.csv", args.out / "latest.json", args.out / "latest.txt"]
    if not args.no_plots:
        written += plot(args.out, rows, env)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
