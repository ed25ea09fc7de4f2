import os

# Two pytest workers on two cores, each with torch's (and the extension's) OpenMP team of two threads: with
# libgomp's default wait policy an idle team thread spins for its next task, on the core the other worker
# needs, and the suite ran 2-4x slower (test_parity's LSTM L2 reference cases: 43-69 s, passive: 17 s).
# Read by libgomp when it loads, so set before torch is imported; a value the caller set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests of fastrnn's kernels run with the automatic choice on the static priority of fastrnn's own
# backends, never a policy table (which hands some shape classes to torch.nn, and which
# `python -m fastrnn.tune` may have cached on this machine): tests/test_policy.py tests the tables and
# the modules served by torch.nn.
os.environ["FASTRNN_POLICY"] = "static"

import fastrnn  # noqa: E402
from fastrnn import dispatch  # noqa: E402

# Backends the CPU tests run on: every backend available here, plus triton when its interpreter is
# on (TRITON_INTERPRET=1 lets it serve CPU tensors). Unavailable backends are listed by
# `python -m fastrnn.info` with their reasons; they have no tests to run here.
CPU_BACKENDS = fastrnn.available_backends("cpu")

TOL = {torch.float64: dict(out=1e-10, grad=1e-10), torch.float32: dict(out=1e-5, grad=1e-4)}


def flat_outputs(out):
    """A sequence module's (output, state) as a list of tensors: [output, *states]."""
    y, st = out
    return [y, *(st if isinstance(st, tuple) else (st,))]


def trained_outputs(m, x):
    """A sequence module's output and final states, its input's gradient and its parameters' gradients after
    one backward of a loss that weighs every output (x: a tensor the call does not change)."""
    xg = x.clone().requires_grad_()
    out = flat_outputs(m(xg))
    (out[0].pow(2).sum() + sum((s * (k + 2)).sum() for k, s in enumerate(out[1:]))).backward()
    return out + [xg.grad] + [p.grad for p in m.parameters()]


# half precision: one rounding of the float32 result (half an ulp of the dtype), plus float32's own error
# over a few steps and its tanh/sigmoid approximations
HALF_ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
F32_ERR = 2e-5


def within_half_ulp(out, truth, dtype):
    """``out`` (in ``dtype``) is the float64 ``truth`` rounded once from float32."""
    assert out.dtype == dtype
    err = (out.double() - truth).abs()
    bound = HALF_ULP[dtype] * truth.abs() + F32_ERR
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3e}"


def assert_close(actual, expected, tol, what=""):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    # the selection tests set FASTRNN_BACKEND themselves; everything else runs with it unset
    monkeypatch.delenv("FASTRNN_BACKEND", raising=False)
    yield


@pytest.fixture
def ran():
    """The list of (op, backend) that ran during the test."""
    with dispatch.record_calls() as calls:
        yield calls


def backends_used(calls):
    return {b for _, b in calls}


def pytest_report_header(config):
    return f"fastrnn backends available on cpu: {', '.join(CPU_BACKENDS)} (torch {torch.__version__}, " \
           f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')})"


# Triton's interpreter runs a kernel some 100x slower than compiled code would (each tl op is numpy
# plus Triton's type checks): a full parametrized grid on it would take most of an hour. On the
# interpreted triton backend the big grids therefore run a pairwise cover of their cases (every pair
# of two axes' values occurs in at least one case); FASTRNN_TRITON_FULL_GRID=1 runs every case.
INTERPRETED = [b for b in CPU_BACKENDS if b == "triton"]
FULL_GRID = os.environ.get("FASTRNN_TRITON_FULL_GRID") == "1"
GRID_BACKENDS = CPU_BACKENDS if FULL_GRID else [b for b in CPU_BACKENDS if b not in INTERPRETED]
COVER_BACKENDS = [] if FULL_GRID else INTERPRETED


def pairwise(params, key=lambda p: p.values):
    """A deterministic subset of ``params`` (pytest.param objects) in which every pair of values of two
    different positions of ``key(param)`` that occurs in ``params`` occurs at least once (greedy)."""
    def pairs(vals):
        return {(i, repr(a), j, repr(b)) for i, a in enumerate(vals) for j, b in enumerate(vals) if i < j}

    todo = set().union(*(pairs(key(p)) for p in params))
    chosen = []
    while todo:
        best = max(params, key=lambda p: len(pairs(key(p)) & todo))
        chosen.append(best)
        todo -= pairs(key(best))
    return chosen


def gradcheck(fn, inputs, backend, **kw):
    """torch.autograd.gradcheck; on the interpreted triton backend in fast mode (it checks v^T J u for
    random u, v instead of the whole Jacobian: a few calls instead of one backward per output element,
    each of which takes seconds in the interpreter)."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=backend in INTERPRETED, **kw)


def module_gradcheck(m, x, backend, outputs=lambda out: out, seed=None, **kw):
    """``gradcheck`` of module ``m`` at input x, in x and every parameter, the outputs ``outputs(m(x))`` (a tuple
    of tensors). The parameters go in as one flat tensor: fast mode takes a pair of forwards per input tensor,
    and in Triton's interpreter an LSTM with layer norm both ways (~15 tensors) took 78 s; slow mode checks
    the same Jacobian entries either way. ``seed``: torch's seed before every call (the same dropout masks)."""
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for p in m.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()]).requires_grad_()

    def f(x, flat):
        ps = torch.split(flat, [s.numel() for s in shapes])
        if seed is not None:
            torch.manual_seed(seed)
        return outputs(torch.func.functional_call(m, {n: p.view(s) for n, p, s in zip(names, ps, shapes)}, (x,)))

    return gradcheck(f, (x, flat), backend, **kw)
