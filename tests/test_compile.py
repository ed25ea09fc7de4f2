"""torch.compile(fullgraph=True) over models that use fastrnn modules: no graph break, same numbers."""
import pytest
import torch
import torch._dynamo

import fastrnn
from conftest import CPU_BACKENDS, backends_used


class Net(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.lstm = fastrnn.LSTM(6, 8, num_layers=2, bidirectional=True, proj_size=3, backend=backend)
        self.gru = fastrnn.GRU(6, 5, batch_first=True, backend=backend)
        self.rnn = fastrnn.RNN(5, 5, nonlinearity="relu", backend=backend)
        self.cell = fastrnn.LSTMCell(5, 4, backend=backend)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, tok):
        y, (h, c) = self.lstm(self.emb(tok))
        y, h = self.gru(y.transpose(0, 1))
        y, h = self.rnn(y.transpose(0, 1), h)
        h2, c2 = self.cell(y[-1])
        return self.head(h2) + c.sum()


def _run(model, tok):
    model.zero_grad()
    out = model(tok)
    out.pow(2).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, compiler, ran):
    if compiler == "inductor" and backend != CPU_BACKENDS[0]:
        pytest.skip("inductor compiles C++ (~20 s a model): run for the first backend only to keep CI short")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net(backend)
    tok = torch.randint(0, 10, (7, 3))
    eager_out, eager_grads = _run(model, tok)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    out, grads = _run(compiled, tok)
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert backends_used(ran) == {backend}


def test_torch_own_lstm_still_graph_breaks():
    """fastrnn lifts dynamo's RNN refusal for its own modules only; torch.nn.LSTM is unchanged."""
    torch._dynamo.reset()
    model = torch.nn.LSTM(4, 5)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="RNN, GRU, or LSTM"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(torch.randn(3, 2, 4))


def test_compile_dynamic_shapes(ran):
    """A second sequence length and batch size reuse the compiled graph without errors."""
    torch._dynamo.reset()
    model = fastrnn.GRU(4, 5, num_layers=2)
    ref = torch.nn.GRU(4, 5, num_layers=2)
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for T, B in [(3, 2), (6, 4), (1, 1)]:
        x = torch.randn(T, B, 4)
        torch.testing.assert_close(compiled(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    assert backends_used(ran) == {CPU_BACKENDS[0]}


def test_import_stays_light():
    """import fastrnn does not import torch._dynamo (~2 s): the compile patch waits for torch.compile."""
    import subprocess
    import sys
    code = "import sys, fastrnn; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_fake_tensor_mode(backend, grad):
    """Under FakeTensorMode (shape propagation, non-strict tracing) every module gives torch's shapes:
    calls without autograd may skip the op layer, but not under a dispatch mode, which needs the ops'
    fake implementations."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    cases = [(fastrnn.LSTM(4, 8, proj_size=3, backend=backend), torch.nn.LSTM(4, 8, proj_size=3), (5, 3, 4)),
             (fastrnn.GRU(4, 8, backend=backend), torch.nn.GRU(4, 8), (5, 3, 4)),
             (fastrnn.RNN(4, 8, backend=backend), torch.nn.RNN(4, 8), (5, 3, 4)),
             (fastrnn.LSTMCell(4, 8, backend=backend), torch.nn.LSTMCell(4, 8), (3, 4)),
             (fastrnn.GRUCell(4, 8, backend=backend), torch.nn.GRUCell(4, 8), (3, 4)),
             (fastrnn.RNNCell(4, 8, backend=backend), torch.nn.RNNCell(4, 8), (3, 4))]
    flat = lambda o: [o] if torch.is_tensor(o) else [z for y in o for z in flat(y)]  # noqa: E731
    with FakeTensorMode(allow_non_fake_inputs=True), torch.set_grad_enabled(grad):
        for mod, ref, shape in cases:
            x = torch.randn(*shape)
            state = ref(x)  # torch's outputs give the state shapes too
            for hx in (None, state[1] if isinstance(ref, torch.nn.RNNBase) else state):
                got, want = flat(mod(x, hx)), flat(ref(x, hx))
                assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in want], type(mod).__name__
