"""The benchmark's correctness gate: a provider is timed only if it matches torch on the same inputs."""
import pytest

from benchmarks.cases import Case
from benchmarks.providers import Workload
from benchmarks.run import check
from conftest import CPU_BACKENDS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["inference", "training", "streaming", "chunked", "decoding"])
def test_check_passes_real_providers_and_catches_wrong_ones(backend, mode):
    work = Workload(Case("GRU", mode, 10, 2, 16), ["torch", backend])
    ref = work.run("torch")
    failure, err, ran = check(work, backend, ref)
    assert failure is None and 0 <= err < 1e-5 and ran == backend
    wrong = [t.clone() for t in ref]
    wrong[-1] = wrong[-1] + 1e-2  # the last gradient (training) or output
    assert "differs from torch" in check(work, backend, wrong)[0]
    assert "returned" in check(work, backend, ref[:-1])[0]


@pytest.mark.parametrize("mode", ["inference", "chunked", "streaming"])
def test_peers_and_the_automatic_choice(mode):
    """ONNX Runtime fp32 passes the check; torch's int8 is not held to it, its error is reported (the
    tolerance would fail it); the automatic choice says which backend it ran."""
    from benchmarks.providers import case_reasons, peer_reasons
    case = Case("LSTM", mode, 12, 3, 32)
    peers = [p for p in ("onnxruntime", "torch-int8", "onnxruntime-int8", "fastrnn-int8", "fastrnn-bf16")
             if not peer_reasons(p) and not case_reasons(case, p)]
    work = Workload(case, ["torch", "auto", *peers])
    ref = work.run("torch")
    failure, err, ran = check(work, "auto", ref)
    assert failure is None and err < 1e-5 and ran in CPU_BACKENDS
    if "onnxruntime" in peers:
        failure, err, _ = check(work, "onnxruntime", ref)
        assert failure is None and 0 <= err < 1e-5
    if "torch-int8" in peers:
        failure, err, _ = check(work, "torch-int8", ref)
        assert failure is None and 1e-4 < err < 0.2  # int8 weights: far past the float tolerance, still close
    for p, low, high in (("onnxruntime-int8", 1e-4, 0.2), ("fastrnn-int8", 1e-4, 0.2), ("fastrnn-bf16", 1e-5, 0.05)):
        if p in peers:  # quantized models: reported, not held to the float tolerance
            failure, err, _ = check(work, p, ref)
            assert failure is None and low < err < high, (p, failure, err)
    assert case_reasons(Case("LSTM", "training", 5, 1, 8), "fastrnn-int8") == ["inference only"]
    assert case_reasons(Case("LSTM", "training", 5, 1, 8), "onnxruntime") == ["inference only"]
    assert case_reasons(Case("RNN", "inference", 5, 1, 8), "torch-int8") == ["quantize_dynamic has no int8 nn.RNN"]


def test_roofline_bytes_levels_and_time():
    """The bytes a case must move, the level that holds the weights, and max(compute, memory) time."""
    from benchmarks.roofline import case_bytes, level_for, roofline_ms
    sizes = {"L2": 1 << 20, "L2_total": 2 << 20, "L3": 32 << 20, "cores": 2}
    c = Case("LSTM", "inference", 100, 1, 256)
    b = case_bytes(c)
    assert b["weights_step"] == 4 * 1024 * 256 and b["steps"] == 100  # W_hh (4 gates x H rows), once a step
    # x, W_ih, xw written then read, y
    assert b["once"] == 4 * (100 * 256 + 1024 * 256 + 2 * 100 * 1024 + 100 * 256)
    assert level_for(b["weights_step"], sizes) == "L2" and level_for(8 << 20, sizes) == "L3"
    assert level_for(64 << 20, sizes) == "DRAM"
    assert case_bytes(Case("LSTM", "training", 100, 1, 256))["steps"] == 200  # the backward reads W again
    s = case_bytes(Case("GRU", "streaming", 100, 1, 256))
    assert s["weights_step"] == 4 * 2 * 768 * 256  # W_ih too: the projection runs every step
    bw = {"sizes": sizes, "L2": 100.0, "L3": 50.0, "DRAM": 10.0}
    r = roofline_ms(c, 200.0, bw)
    mem = 1e3 * (b["weights_step"] * 100 / 100e9 + b["once"] / 100e9)  # all of it fits in the L2s
    assert r["memory_ms"] == pytest.approx(mem) and r["compute_ms"] == pytest.approx(1e3 * c.flops() / 200e9)
    assert r["ms"] == pytest.approx(max(mem, r["compute_ms"])) and r["bound"] == "memory"


def test_bandwidth_is_measured_per_level():
    pytest.importorskip("numba", reason="the bandwidth kernel is a numba kernel (test extras)")
    from benchmarks.roofline import cache_sizes, measure_bandwidth
    if not cache_sizes()["L2"]:
        pytest.skip("this OS reports no cache sizes in /sys/devices/system/cpu (the blocks are sized from them)")
    # the median of three: one reading of a few ms, taken while another test process runs on the other core, read
    # 0.35 GB/s for L2 once (a Zen 3 under load)
    bw = measure_bandwidth(repeats=3, min_bytes=1 << 22)
    assert bw["sizes"]["L2"] > 0 and bw["L2"] > 1.0 and bw["DRAM"] > 0.1
    assert bw["block_bytes"]["L2"] <= bw["sizes"]["L2"]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_interleaved_orders_are_balanced(n):
    """Every provider comes right after every other one equally often within the rounds' orders."""
    from collections import Counter

    from benchmarks.harness import balanced_orders, interleaved
    orders = balanced_orders(n)
    assert len(orders) == (n if n % 2 == 0 else 2 * n) and all(sorted(o) == list(range(n)) for o in orders)
    follows = Counter((a, b) for o in orders for a, b in zip(o, o[1:]))
    assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(follows.values())) <= 1
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in range(n)}
    samples = interleaved(fns, warmup_s=0, min_warmup=0, budget_s=0, min_rounds=1)
    assert len(calls) == n * len(orders)  # whole sets of orders only
    assert all(len(v) == len(orders) for v in samples.values())


def test_report_prints_the_ceiling_on_torchs_row():
    """torch's row says what a provider at the measured peak would reach: 100 / torch's % of peak."""
    from benchmarks.run import ceiling_vs_torch, format_table
    env = dict(date="d", device="cpu", hardware="h", threads=2, torch="t", numba="n", triton="-", git_sha="g")
    base = dict(cell="GRU", mode="inference", shape="T100 B64 H512", p20_ms=1.0, p80_ms=1.0, peak_mem_mb=0.0)
    rows = [dict(base, provider="torch", p50_ms=10.0, gflops=116.0, pct_peak=40.0, speedup_vs_torch=1.0),
            dict(base, provider="cpp", p50_ms=5.0, gflops=232.0, pct_peak=80.0, speedup_vs_torch=2.0)]
    assert ceiling_vs_torch(rows[0]) == 2.5
    lines = format_table(env, 290.0, "how", rows, []).splitlines()
    torch_line = next(line for line in lines if " torch " in line and "10.000" in line)
    cpp_line = next(line for line in lines if " cpp " in line)
    assert torch_line.endswith("(at peak: 2.50x)") and "at peak" not in cpp_line


def test_each_case_takes_its_peak_from_around_its_rounds_when_that_is_higher():
    """% of peak is taken against the higher of the run's reading and a GEMM timed around the case's rounds."""
    from benchmarks.run import bench_case, case_peak
    assert case_peak(180.0, 212.0) == 212.0 and case_peak(232.0, 150.0) == 232.0
    rows = bench_case(Case("RNN", "inference", 5, 1, 8), ["torch", "reference"], "cpu", 1e-3, 0.0, min_rounds=1)
    assert [r["provider"] for r in rows] == ["torch", "reference"]  # the GEMM is not a provider row
    for r in rows:
        assert r["case_peak_gflops"] > 1.0  # a real GEMM rate, not the 1e-3 passed in
        assert abs(r["pct_peak"] - 100 * r["gflops"] / r["case_peak_gflops"]) < 1e-9


def test_each_case_takes_its_bandwidth_from_around_its_rounds_when_that_is_higher():
    """The roofline's bandwidths are, level by level, the higher of the run's reading and the readings taken
    right before and after the case's rounds: a slow first reading leaves no case's roofline too far away."""
    pytest.importorskip("numba", reason="the bandwidth kernel is a numba kernel (test extras)")
    from benchmarks.roofline import cache_sizes, case_bandwidth, roofline_ms
    from benchmarks.run import bench_case
    run = {"sizes": {"L2": 1}, "L2": 100.0, "L3": 50.0, "DRAM": 10.0}
    got = case_bandwidth(run, [{"L2": 80.0, "L3": 60.0, "DRAM": 9.0}, {"L2": 120.0, "L3": 40.0, "DRAM": 11.0}])
    assert (got["L2"], got["L3"], got["DRAM"], got["sizes"]) == (120.0, 60.0, 11.0, {"L2": 1})
    if not cache_sizes()["L2"]:
        pytest.skip("this OS reports no cache sizes in /sys/devices/system/cpu (the blocks are sized from them)")
    sizes = dict(cache_sizes(), L2_total=2 * cache_sizes()["L2"])
    slow = {"sizes": sizes, "block_bytes": {"L2": 1, "L3": 1, "DRAM": 1}, "L2": 1e-3, "L3": 1e-3, "DRAM": 1e-3}
    case = Case("RNN", "inference", 5, 1, 8)
    rows = bench_case(case, ["torch", "reference"], "cpu", 1e-3, 0.0, min_rounds=1, bandwidth=slow)
    for r in rows:
        bw = r["case_bandwidth_gbs"]
        assert bw["L2"] > 1.0 and bw["DRAM"] > 0.1  # real readings, not the 1e-3 GB/s passed in
        want = roofline_ms(case, r["case_peak_gflops"], dict(bw, sizes=sizes))["ms"]
        assert r["roofline_ms"] == pytest.approx(want)


def _run(rows, sha):
    """A latest.json-like run: rows of (provider, shape, p20, p50, p80, failure)."""
    results = [dict(provider=p, failure=f, cell="LSTM", mode="inference", shape=s, layers=1, bidirectional=False,
                    packed=False, proj=0, dtype="float32", p20_ms=a, p50_ms=b, p80_ms=c) for p, s, a, b, c, f in rows]
    return {"environment": {"hardware": "cpu-x", "threads": 2, "torch": "t", "git_sha": sha, "date": "d"},
            "results": results}


def test_compare_flags_drops_beyond_the_noise_only(tmp_path, capsys):
    """benchmarks.compare: x-torch side by side; a drop beyond the summed p20-p80 spreads is flagged (exit 1),
    one within them is not; a failure that ran before is flagged; cases in one run only are listed."""
    import json

    from benchmarks import compare
    old = _run([("torch", "A", 9.9, 10.0, 10.1, None), ("cpp", "A", 4.95, 5.0, 5.05, None),
                ("torch", "B", 9.9, 10.0, 10.1, None), ("cpp", "B", 4.95, 5.0, 5.05, None),
                ("numba", "B", 4.95, 5.0, 5.05, None), ("cpp", "C", 1, 1, 1, None)], "old")
    new = _run([("torch", "A", 9.9, 10.0, 10.1, None), ("cpp", "A", 5.95, 6.0, 6.05, None),
                ("torch", "B", 9.9, 10.0, 10.1, None), ("cpp", "B", 4.98, 5.03, 5.08, None),
                ("numba", "B", 0, 0, 0, "crashed"), ("cpp", "D", 1, 1, 1, None)], "new")
    rows = {(r["case"][2], r["provider"]): r for r in compare.compare(old, new)}
    a = rows["A", "cpp"]
    assert a["old"] == pytest.approx(2.0) and a["new"] == pytest.approx(10 / 6)
    # the spreads: cpp 1% then 1.7%, torch 2% in each run
    assert a["change"] == pytest.approx(10 / 6 / 2 - 1) and a["noise"] == pytest.approx(0.02 + 0.1 / 6 + 0.04)
    assert a["flag"] == "DROP"  # 16.7% slower against 7.7% of noise
    b = rows["B", "cpp"]
    assert b["flag"] == "" and -b["change"] < b["noise"]  # 0.6% slower within 8% of noise
    assert rows["B", "numba"]["flag"] == "FAILS NOW"
    assert rows["C", "cpp"]["flag"] == "only old" and rows["D", "cpp"]["flag"] == "only new"
    po, pn = tmp_path / "old.json", tmp_path / "new.json"
    po.write_text(json.dumps(old))
    pn.write_text(json.dumps(new))
    assert compare.main([str(po), str(pn)]) == 1
    out = capsys.readouterr().out
    assert "OLD: cpu-x, 2 threads" in out and "DROP" in out and "FAILS NOW" in out
    po.write_text(json.dumps(old))
    assert compare.main([str(po), str(po)]) == 0
    assert "no drop beyond the runs' noise" in capsys.readouterr().out
