"""The benchmark's correctness gate: a provider is timed only if it matches torch on the same inputs."""
import pytest

from benchmarks.cases import Case
from benchmarks.providers import Workload
from benchmarks.run import check
from conftest import CPU_BACKENDS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["inference", "training", "streaming", "chunked"])
def test_check_passes_real_providers_and_catches_wrong_ones(backend, mode):
    work = Workload(Case("GRU", mode, 10, 2, 16), ["torch", backend])
    ref = work.run("torch")
    assert check(work, backend, ref) is None
    wrong = [t.clone() for t in ref]
    wrong[-1] = wrong[-1] + 1e-2  # the last gradient (training) or output
    assert "differs from torch" in check(work, backend, wrong)
    assert "returned" in check(work, backend, ref[:-1])


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
