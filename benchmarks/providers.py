"""Providers: torch.nn (the baseline), fastrnn's automatic choice and each fastrnn backend, and the peers a
CPU user would pick instead (ONNX Runtime, torch's dynamic int8), built on identical weights and inputs."""
from __future__ import annotations

import io
import warnings

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn

from .cases import Case

TORCH_CLASSES = {"LSTM": (torch.nn.LSTM, torch.nn.LSTMCell), "GRU": (torch.nn.GRU, torch.nn.GRUCell),
                 "RNN": (torch.nn.RNN, torch.nn.RNNCell)}
FASTRNN_CLASSES = {"LSTM": (fastrnn.LSTM, fastrnn.LSTMCell), "GRU": (fastrnn.GRU, fastrnn.GRUCell),
                   "RNN": (fastrnn.RNN, fastrnn.RNNCell)}


#: the peers: inference only (their rows are absent from training cases), each skipped with the printed
#: reason when its package is missing (``peer_reasons``); with them fastrnn's own quantized models
#: (``fastrnn.quantize``), which are inference only too, and ONNX Runtime's quantized model
QUANTIZED = ("fastrnn-int8", "fastrnn-bf16")
PEERS = ("onnxruntime", "torch-int8", "onnxruntime-int8") + QUANTIZED
#: fastrnn's automatic choice (the policy table in force: ``python -m fastrnn.info`` shows it)
AUTO = "auto"


def provider_names(device: str) -> list[str]:
    """'torch' first, then fastrnn's automatic choice, each available fastrnn backend (the eager reference
    last) and, on CPU, the peers whose packages are installed."""
    peers = [p for p in PEERS if not peer_reasons(p)] if device == "cpu" else []
    return ["torch", AUTO] + fastrnn.available_backends(device) + peers


def peer_reasons(peer: str) -> list[str]:
    """Why a peer cannot run here (empty: it can)."""
    if peer in ("onnxruntime", "onnxruntime-int8"):
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            if peer == "onnxruntime-int8":
                import onnxruntime.quantization  # noqa: F401
        except ImportError as e:
            return [f"onnxruntime not installed ({e}); `make bench` installs it (the test extras)"]
    if peer in QUANTIZED:
        from fastrnn import quantized
        if quantized._cpp() is None:
            return [f"the cpp extension is not available: {quantized.kernel_path()}"]
    if peer == "torch-int8":
        try:
            from torch.ao.quantization import quantize_dynamic  # noqa: F401
        except ImportError as e:
            return [f"torch.ao.quantization not available ({e})"]
    return []


def case_reasons(case: Case, provider: str) -> list[str]:
    """Why ``provider`` has no row in ``case`` (empty: it has one)."""
    if provider not in PEERS:
        return []
    if case.trains:
        return ["inference only"]
    if provider in ("onnxruntime", "onnxruntime-int8"):
        if case.packed:
            return ["torch's ONNX exporter has no PackedSequence form"]
        if case.proj:
            return ["ONNX's LSTM has no proj_size"]
        if case.mode == "streaming":
            return ["torch's ONNX exporter has no form for the cells"]
    if provider == "torch-int8":
        if case.cell == "RNN" and case.mode != "streaming":
            return ["quantize_dynamic has no int8 nn.RNN"]
        if case.proj:
            return ["torch's dynamic int8 LSTM has no proj_size"]
    return []


class OrtModule:
    """A torch.nn module exported to ONNX (torch's TorchScript exporter) and run by ONNX Runtime's CPU
    execution provider: intra-op threads = the cores, idle threads not spinning (they would take the cores
    from the provider timed next). Called like the module: ``(x, state) -> (y, state)``, fixed shapes."""

    def __init__(self, module, x, state, quantize=False):
        import onnxruntime as ort
        n_state = 2 if isinstance(module, torch.nn.LSTM) else 1
        flat = tuple(state) if n_state == 2 else (state,)
        names = ["x"] + [f"s{k}" for k in range(n_state)]
        buf = io.BytesIO()
        with warnings.catch_warnings():  # fixed shapes here: the exporter's advice on other batch sizes is moot
            warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
            torch.onnx.export(module, (x, flat if n_state == 2 else flat[0]), buf, dynamo=False, input_names=names,
                              output_names=["y"] + [f"o{k}" for k in range(n_state)])
        model = buf.getvalue()
        if quantize:  # ONNX Runtime's dynamic quantization: int8 weights (its LSTM becomes DynamicQuantizeLSTM)
            import os
            import tempfile
            from onnxruntime.quantization import QuantType, quantize_dynamic
            with tempfile.TemporaryDirectory() as d:
                src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
                with open(src, "wb") as f:
                    f.write(model)
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
                with open(dst, "rb") as f:
                    model = f.read()
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()  # the threads torch.nn and fastrnn run on
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self.names, self.n_state = names, n_state
        self.zeros = [torch.zeros_like(t) for t in flat]
        self.training = False

    def __call__(self, x, state=None):
        flat = self.zeros if state is None else (list(state) if self.n_state == 2 else [state])
        feeds = {n: t.detach().numpy() for n, t in zip(self.names, [x, *flat])}
        outs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        return outs[0], (tuple(outs[1:]) if self.n_state == 2 else outs[1])

    def parameters(self):
        return iter(())

    def train(self, mode=True):
        return self


def _peer(case: Case, provider: str, torch_module, x):
    if provider in QUANTIZED:
        return fastrnn.quantize(torch_module, torch.qint8 if provider == "fastrnn-int8" else torch.bfloat16)
    if provider == "torch-int8":
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(torch.nn.Sequential(torch_module), {torch.nn.LSTM, torch.nn.GRU, torch.nn.LSTMCell,
                                                                    torch.nn.GRUCell, torch.nn.RNNCell},
                                dtype=torch.qint8)[0]
    D = (2 if case.bidirectional else 1) * case.layers
    T = 1 if case.mode == "chunked" else case.T
    h = torch.zeros(D, case.B, case.H)
    state = (h, h.clone()) if case.cell == "LSTM" else h
    return OrtModule(torch_module, x[:T], state, quantize=provider == "onnxruntime-int8")


def _module(case: Case, provider: str, device, dtype):
    seq_cls, cell_cls = (TORCH_CLASSES if provider == "torch" else FASTRNN_CLASSES)[case.cell]
    kw = {} if provider == "torch" else {"backend": None if provider == AUTO else provider}
    if case.mode == "streaming":
        return cell_cls(case.I, case.H, device=device, dtype=dtype, **kw)
    extra = {"proj_size": case.proj} if case.proj else {}
    return seq_cls(case.I, case.H, num_layers=case.layers, bidirectional=case.bidirectional, device=device,
                   dtype=dtype, **extra, **kw)


class Workload:
    """One case for all providers: the same weights and inputs; ``call(provider)`` runs one timed call."""

    def __init__(self, case: Case, providers: list[str], device="cpu", dtype=torch.float32, seed=0):
        self.case = case
        torch.manual_seed(seed)
        self.modules = {}
        state = None
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(case.T, case.B, case.I, generator=g, dtype=dtype).to(device)
        for p in [q for q in providers if q not in PEERS]:
            m = _module(case, p, device, dtype)
            if state is None:
                state = m.state_dict()
            m.load_state_dict(state)
            m.train(case.trains)
            self.modules[p] = m
        for p in [q for q in providers if q in PEERS]:
            self.modules[p] = _peer(case, p, self.modules["torch"], self.x)

    def _input(self, requires_grad=False):
        """(the leaf, the module's input). A packed case's sequence is packed once, outside the timed calls, as
        a model packs its batch before its recurrent layers (torch's pack and its backward took ~2.5 ms of a
        ~22 ms LSTM training call at T100 B16 H256, the same for every provider: benchmarks/NOTES.md,
        twenty-sixth session); in training its rows are the leaf."""
        if not self.case.packed:
            x = self.x.detach().requires_grad_(requires_grad)
            return x, x
        if not hasattr(self, "_packed"):
            self._packed = pack_padded_sequence(self.x, torch.tensor(self.case.lengths()), enforce_sorted=False)
        p = self._packed
        rows = p.data.detach().requires_grad_(requires_grad)
        return rows, PackedSequence(rows, p.batch_sizes, p.sorted_indices, p.unsorted_indices)

    def run(self, provider: str):
        """Outputs (and gradients in training mode) of one call, for the correctness check."""
        m = self.modules[provider]
        if self.case.mode == "streaming":
            with torch.no_grad():
                return [self._stream(m)]
        if self.case.mode == "inference":
            with torch.no_grad():
                out, st = m(self._input()[1])
            return self._flat(out, st)
        if self.case.mode == "chunked":
            with torch.no_grad():
                return self._chunks(m)
        for p in m.parameters():
            p.grad = None
        leaf, x = self._input(True)
        if self.case.mode == "decoding":
            outs = self._chunks(m, x)
            sum(t.sum() for t in outs).backward()
            return outs + [leaf.grad] + [p.grad for p in m.parameters()]
        out, st = m(x)
        self._loss(out, st).backward()
        return self._flat(out, st) + [leaf.grad] + [p.grad for p in m.parameters()]

    def call(self, provider: str):
        """A closure that runs one timed call for ``provider``."""
        m = self.modules[provider]
        mode = self.case.mode
        if mode == "streaming":
            def fn():
                with torch.no_grad():
                    self._stream(m)
        elif mode == "chunked":
            def fn():
                with torch.no_grad():
                    self._chunks(m)
        elif mode == "inference":
            x = self._input()[1]

            def fn():
                with torch.no_grad():
                    m(x)
        elif mode == "decoding":
            params = list(m.parameters())

            def fn():
                for p in params:
                    p.grad = None
                sum(t.sum() for t in self._chunks(m, self._input(True)[1])).backward()
        else:
            params = list(m.parameters())

            def fn():
                for p in params:
                    p.grad = None
                out, st = m(self._input(True)[1])
                self._loss(out, st).backward()
        return fn

    def _stream(self, cell):
        state = None
        for t in range(self.case.T):
            state = cell(self.x[t], state)
        return state[0] if isinstance(state, tuple) else state

    def _chunks(self, module, x=None):
        """A sequence module fed one step at a time (chunks of T=1) of ``x`` (the case's input by default), its
        state carried: streaming with the layer stack of a sequence model, or a decoder in training. Returns
        the outputs of every step and the final state."""
        x = self.x if x is None else x
        state, outs = None, []
        for t in range(self.case.T):
            out, state = module(x[t:t + 1], state)
            outs.append(out)
        return [torch.cat(outs)] + (list(state) if isinstance(state, tuple) else [state])

    @staticmethod
    def _flat(out, st):
        data = out.data if hasattr(out, "batch_sizes") else out
        return [data] + (list(st) if isinstance(st, tuple) else [st])

    @staticmethod
    def _loss(out, st):
        return sum(t.sum() for t in Workload._flat(out, st))
