"""Exporting models that hold fastrnn modules: torch.jit.trace and torch.onnx's TorchScript exporter
record torch.nn's own ops for them (ONNX maps those to its LSTM/GRU/RNN), torch.jit.script compiles
torch.nn's forward over the same parameters (as with torch.nn's own modules, only the cells come out
callable), torch.export records fastrnn's ops. The LSTM variants, which torch.nn lacks, trace as
fastrnn's ops."""
import io

import numpy as np
import pytest
import torch

import fastrnn
from fastrnn import dispatch
from conftest import CPU_BACKENDS, backends_used, flat_outputs

CASES = [("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(proj_size=3, batch_first=True)),
         ("GRU", dict(num_layers=2)), ("RNN", dict(nonlinearity="relu", bidirectional=True))]
IDS = [f"{n}-{'-'.join(kw)}" for n, kw in CASES]
ATEN = {"LSTM": "aten::lstm", "GRU": "aten::gru", "RNN": "aten::rnn_relu"}


def _module(name, kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(getattr(torch.nn, name)(4, 6, **kw))
    fastrnn.convert(model)
    assert type(model[0]).__module__ == "fastrnn.modules"
    return model[0].eval()


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_jit_trace_records_torch_ops(name, kw):
    m = _module(name, kw)
    x = torch.randn(2, 5, 4) if kw.get("batch_first") else torch.randn(5, 2, 4)
    traced = torch.jit.trace(m, (x,))
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert ATEN[name] in kinds and not any(k.startswith("fastrnn") for k in kinds)
    x2 = torch.randn_like(x)
    with torch.no_grad():
        for a, b in zip(flat_outputs(traced(x2)), flat_outputs(m(x2))):
            torch.testing.assert_close(a, b)


ONNX_CASES = [c for c in CASES if "proj_size" not in c[1]] + [("GRU", dict(batch_first=True))]


@pytest.mark.parametrize("name,kw", ONNX_CASES, ids=[f"{n}-{'-'.join(kw)}" for n, kw in ONNX_CASES])
def test_onnx_export_runs_in_onnxruntime(name, kw):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extras; not installed here")
    m = _module(name, kw)
    x = torch.randn(2, 5, 4) if kw.get("batch_first") else torch.randn(5, 2, 4)
    buf = io.BytesIO()
    torch.onnx.export(m, (x,), buf, dynamo=False)
    sess = ort.InferenceSession(buf.getvalue())
    x2 = torch.randn_like(x)
    got = sess.run(None, {sess.get_inputs()[0].name: x2.numpy()})
    with torch.no_grad():
        want = flat_outputs(m(x2))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-6, rtol=1e-6)


def test_onnx_export_of_a_projected_lstm_fails_as_torchs():
    """torch's exporter has no ONNX form for proj_size (ONNX's LSTM lacks it): the same error as torch.nn."""
    pytest.importorskip("onnx", reason="onnx is in the test extras; not installed here")
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(4, 6, proj_size=3)
    ours = fastrnn.LSTM(4, 6, proj_size=3)
    x = torch.randn(5, 2, 4)
    with pytest.raises(Exception) as want:
        torch.onnx.export(theirs, (x,), io.BytesIO(), dynamo=False)
    with pytest.raises(type(want.value)):
        torch.onnx.export(ours, (x,), io.BytesIO(), dynamo=False)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_trace_and_script(name):
    torch.manual_seed(0)
    m = getattr(fastrnn, name)(4, 6)
    x = torch.randn(3, 4)
    h = torch.randn(3, 6)
    hx = (h, h.neg()) if name == "LSTMCell" else h
    traced = torch.jit.trace(m, (x, hx))
    assert not any(n.kind().startswith("fastrnn") for n in traced.inlined_graph.nodes())
    scripted = torch.jit.script(m)
    with torch.no_grad():
        want = m(x, hx)
        for got in (traced(x, hx), scripted(x, hx)):
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_jit_script_as_torchs(name, kw):
    """torch.jit.script of a sequence module gives what it gives for torch.nn's (in torch 2.13 a script
    module without a callable forward); the cells script and run (test_cells_trace_and_script)."""
    m = _module(name, kw)
    theirs = getattr(torch.nn, name)(4, 6, **kw).eval()
    theirs.load_state_dict(m.state_dict())
    x = torch.randn(2, 5, 4) if kw.get("batch_first") else torch.randn(5, 2, 4)
    outcomes = []
    for mod in (theirs, m):
        try:
            with torch.no_grad():
                outcomes.append(("ok", flat_outputs(torch.jit.script(mod)(x))))
        except Exception as e:  # noqa: BLE001 (the outcome itself is what is compared)
            outcomes.append((type(e).__name__, str(e)))
    assert outcomes[0][0] == outcomes[1][0]
    if outcomes[0][0] == "ok":
        for a, b in zip(outcomes[1][1], outcomes[0][1]):
            torch.testing.assert_close(a, b)
    else:
        assert outcomes[0][1] == outcomes[1][1]
    assert type(m).__module__ == "fastrnn.modules"  # scripting left the module itself as it was


@pytest.mark.parametrize("name,kw", CASES[:1] + CASES[2:3], ids=["LSTM", "GRU"])
def test_torch_export(name, kw):
    m = _module(name, kw)
    x = torch.randn(5, 2, 4)
    ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert f"fastrnn.{name.lower()}_seq_fwd.default" in targets, targets  # the module docstring's claim
    x2 = torch.randn_like(x)
    with torch.no_grad():
        for a, b in zip(flat_outputs(ep.module()(x2)), flat_outputs(m(x2))):  # (eager takes the chunk op here)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_variants_trace_as_fastrnn_ops(backend, grad):
    """torch.nn has no peephole LSTM: tracing records fastrnn's ops (the ONNX exporter cannot map them),
    with and without autograd (without it the call must not skip the op layer, or the trace would miss
    the recurrence); the trace computes new inputs right."""
    torch.manual_seed(0)
    for m in (fastrnn.LSTM(4, 6, peephole=True, backend=backend).eval(),
              fastrnn.LSTMCell(4, 6, coupled_gates=True, backend=backend)):
        seq = isinstance(m, torch.nn.LSTM)
        x = torch.randn(5, 2, 4) if seq else torch.randn(2, 4)
        args = (x,) if seq else (x, (torch.zeros(2, 6), torch.zeros(2, 6)))
        with torch.set_grad_enabled(grad):
            traced = torch.jit.trace(m, args, check_trace=False)
        kinds = {n.kind() for n in traced.inlined_graph.nodes()}
        assert any(k.startswith("fastrnn::lstm_") for k in kinds), kinds
        x2 = torch.randn_like(x)
        args2 = (x2,) if seq else (x2, (torch.randn(2, 6), torch.randn(2, 6)))
        with torch.no_grad():
            with dispatch.record_calls() as ran:
                got = traced(*args2)
            want = m(*args2)
        assert backends_used(ran) == {backend}
        got, want = (flat_outputs(got), flat_outputs(want)) if seq else (list(got), list(want))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_scripting_a_parent():
    """torch.jit.script writes the twin back into the parent: it shares the module's state, computes the
    same, and fastrnn.convert brings the fastrnn class back."""
    torch.manual_seed(0)
    cell = fastrnn.GRUCell(4, 6)
    parent = torch.nn.Sequential(cell)
    scripted = torch.jit.script(parent)
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), cell(x))
        torch.testing.assert_close(parent(x), cell(x))
    assert type(parent[0]) is torch.nn.GRUCell and parent[0].__dict__ is cell.__dict__
    cell.eval()
    assert not parent[0].training
    fastrnn.convert(parent)
    assert type(parent[0]) is fastrnn.GRUCell
