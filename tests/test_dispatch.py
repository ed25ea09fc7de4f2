"""Backend selection: one place chooses; explicit requests never fall back silently."""
import subprocess
import sys

import pytest
import torch

import fastrnn
from fastrnn import dispatch
from fastrnn.backends import Backend
from conftest import CPU_BACKENDS, backends_used


class Float64Only(Backend):
    """A stand-in backend for the tests: serves cpu float64 only, by running the reference kernels."""
    name = "numba"
    devices = ("cpu",)
    dtypes = (torch.float64,)

    def __getattr__(self, op):
        return getattr(dispatch.get("reference"), op)


@pytest.fixture
def fake_numba(monkeypatch):
    """numba serves float64 only, and the backend ranked above it (cpp) is out of the way."""
    monkeypatch.setitem(dispatch._loaded, "numba", Float64Only())
    monkeypatch.setitem(dispatch._loaded, "cpp", dispatch._Unavailable("cpp", "hidden by this test"))


def test_reference_always_available():
    # (under TRITON_INTERPRET=1 the interpreted triton backend comes after it: reached only when named)
    assert [b for b in fastrnn.available_backends("cpu") if b != "triton"][-1] == "reference"
    assert "reference" in fastrnn.available_backends("cuda")
    assert dispatch.reasons("reference") == []


def test_automatic_choice_takes_best_that_serves(fake_numba):
    assert dispatch.select(dispatch.Spec("lstm", "cpu", torch.float64)) == "numba"
    assert dispatch.select(dispatch.Spec("lstm", "cpu", torch.float32)) == "reference"  # skips numba
    assert fastrnn.available_backends("cpu")[:2] == ["numba", "reference"]


def test_explicit_backend_that_cannot_serve_raises(fake_numba):
    lstm = fastrnn.LSTM(3, 4, backend="numba")
    before = {k: v.clone() for k, v in lstm.state_dict().items()}
    with pytest.raises(fastrnn.BackendNotSupportedError,
                       match=r"backend 'numba' cannot run this LSTM call \(cpu, float32\): dtype float32 is not "
                             r"supported \(serves float64\)\. Backends that can: reference"):
        lstm(torch.randn(2, 1, 3))
    assert all(torch.equal(v, lstm.state_dict()[k]) for k, v in before.items())
    with dispatch.record_calls() as ran:
        lstm.double()(torch.randn(2, 1, 3, dtype=torch.float64))
    assert backends_used(ran) == {"numba"}


def test_unimplemented_or_missing_backend_explains_why():
    for name in dispatch.BACKEND_NAMES:
        if name in CPU_BACKENDS or name == "torch":
            continue
        why = dispatch.reasons(name)
        assert why and all(isinstance(r, str) and r for r in why)
        with pytest.raises(fastrnn.BackendNotSupportedError, match=f"backend '{name}' cannot run"):
            fastrnn.GRU(3, 4, backend=name)(torch.randn(2, 1, 3))


def test_environment_variable(monkeypatch, fake_numba):
    gru = fastrnn.GRU(3, 4, dtype=torch.float64)
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    with dispatch.record_calls() as ran:
        gru(x)
    assert backends_used(ran) == {"numba"}  # automatic: the best
    monkeypatch.setenv("FASTRNN_BACKEND", "reference")
    with dispatch.record_calls() as ran:
        gru(x)
    assert backends_used(ran) == {"reference"}
    monkeypatch.setenv("FASTRNN_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTRNN_BACKEND='nope' is not a fastrnn backend"):
        gru(x)


def test_precedence_argument_context_environment(monkeypatch, fake_numba):
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    auto = fastrnn.RNN(3, 4, dtype=torch.float64)
    pinned = fastrnn.RNN(3, 4, dtype=torch.float64, backend="numba")
    monkeypatch.setenv("FASTRNN_BACKEND", "numba")
    with fastrnn.use_backend("reference"):
        with dispatch.record_calls() as ran:
            auto(x)
        assert backends_used(ran) == {"reference"}  # context beats environment
        with dispatch.record_calls() as ran:
            pinned(x)
        assert backends_used(ran) == {"numba"}  # argument beats context
        with fastrnn.use_backend(None):  # back to the environment
            with dispatch.record_calls() as ran:
                auto(x)
            assert backends_used(ran) == {"numba"}
    with pytest.raises(ValueError, match="Unknown fastrnn backend"):
        with fastrnn.use_backend("fastest"):
            pass


def test_cells_follow_the_same_selection(fake_numba):
    cell = fastrnn.LSTMCell(3, 4, backend="numba")
    with pytest.raises(fastrnn.BackendNotSupportedError, match="'numba'"):
        cell(torch.randn(2, 3))
    with dispatch.record_calls() as ran:
        fastrnn.GRUCell(3, 4, backend="numba").double()(torch.randn(2, 3, dtype=torch.float64))
    assert backends_used(ran) == {"numba"}
    # automatic choice for single steps: numba (its fused inference cell) before the reference (measured, see
    # dispatch.PRIORITY)
    with dispatch.record_calls() as ran:
        fastrnn.GRUCell(3, 4).double()(torch.randn(2, 3, dtype=torch.float64))
    assert backends_used(ran) == {"numba"}
    assert dispatch._priority("cpu").index("numba") < dispatch._priority("cpu").index("reference")


def test_reference_serves_half_precision():
    """Any float dtype on the reference backend: bf16 error vs a float64 truth within 2x torch's own."""
    torch.manual_seed(0)
    ref64 = torch.nn.GRU(8, 16, dtype=torch.float64)
    x = torch.randn(10, 3, 8, dtype=torch.float64)
    truth = ref64(x)[0]
    t16 = torch.nn.GRU(8, 16, dtype=torch.bfloat16)
    t16.load_state_dict(ref64.state_dict())
    f16 = fastrnn.GRU(8, 16, dtype=torch.bfloat16, backend="reference")
    f16.load_state_dict(ref64.state_dict())
    err_t = (t16(x.bfloat16())[0].double() - truth).abs().max()
    err_f = (f16(x.bfloat16())[0].double() - truth).abs().max()
    assert err_f <= 2 * err_t + 1e-3


def test_info_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "fastrnn.info"], capture_output=True, text=True, check=True).stdout
    assert f"torch {torch.__version__}" in out
    for name in dispatch.BACKEND_NAMES:
        line = next(l for l in out.splitlines() if l.startswith(f"  {name} "))
        if name in CPU_BACKENDS or name == "torch":
            assert "available (serves: cpu" in line and "unavailable" not in line, line
        else:
            reasons = line.split("unavailable:", 1)
            assert len(reasons) == 2 and reasons[1].strip() == "; ".join(dispatch.reasons(name)), line


def test_record_calls_nests():
    """An inner recorder sees only its block, the outer sees everything, even when their lists are equal."""
    m = fastrnn.GRU(3, 4, backend="reference")
    with dispatch.record_calls() as outer:
        with dispatch.record_calls() as inner:
            m(torch.randn(2, 1, 3))
        assert inner == outer == [("gru_seq_fwd", "reference")]
        m(torch.randn(2, 1, 3))
    assert len(outer) == 2 and len(inner) == 1
    assert not dispatch._recorders
