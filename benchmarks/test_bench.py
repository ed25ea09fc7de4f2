"""The benchmark cases as pytest-benchmark tests, to compare numbers across commits:

    pytest benchmarks/ --benchmark-autosave            # save a run
    pytest benchmarks/ --benchmark-compare             # compare with the last saved run
    pytest-benchmark compare --group-by=param:case     # side by side

Each provider is checked against torch before it is timed (a provider that differs fails its test).
"""
import pytest
import torch

from benchmarks.cases import all_cases
from benchmarks.providers import Workload, case_reasons, provider_names
from benchmarks.run import check

CASES = all_cases(quick=True)
PROVIDERS = provider_names("cpu")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_bench(benchmark, case, provider):
    why = case_reasons(case, provider)
    if why:
        pytest.skip(f"{provider}: {'; '.join(why)}")
    work = Workload(case, ["torch", provider] if provider != "torch" else ["torch"])
    if provider != "torch":
        failure, _, _ = check(work, provider, work.run("torch"))
        assert failure is None, failure
    benchmark.group = case.name
    benchmark.extra_info.update(flops=case.flops(), threads=torch.get_num_threads())
    fn = work.call(provider)
    benchmark.pedantic(fn, warmup_rounds=2, rounds=5, iterations=1)
