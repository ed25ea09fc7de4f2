"""The benchmark's correctness gate: a provider is timed only if it matches torch on the same inputs."""
import pytest

from benchmarks.cases import Case
from benchmarks.providers import Workload
from benchmarks.run import check
from conftest import CPU_BACKENDS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["inference", "training", "streaming"])
def test_check_passes_real_providers_and_catches_wrong_ones(backend, mode):
    work = Workload(Case("GRU", mode, 10, 2, 16), ["torch", backend])
    ref = work.run("torch")
    assert check(work, backend, ref) is None
    wrong = [t.clone() for t in ref]
    wrong[-1] = wrong[-1] + 1e-2  # the last gradient (training) or output
    assert "differs from torch" in check(work, backend, wrong)
    assert "returned" in check(work, backend, ref[:-1])
