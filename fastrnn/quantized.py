"""Quantized inference: ``fastrnn.quantize`` and the modules it makes.

``fastrnn.quantize(model, dtype=torch.qint8)`` is the counterpart of ``torch.ao.quantization.quantize_dynamic``
for recurrent layers: every LSTM, GRU, RNN and cell in ``model`` (fastrnn's or torch.nn's) is replaced by a
quantized module of this file that keeps torch.nn's call signature and semantics (batched and unbatched
input, batch_first, PackedSequence, hx, layers, bidirectional, proj_size, the LSTM variants). They are for
inference: a forward that would need a gradient raises.

The math (the contract every backend follows; the reference backend is its oracle):

- int8 (``torch.qint8``): each weight matrix (W_ih, W_hh, W_hr) is quantized per output row, symmetric:
  ``s_w = amax(|row|) / 127``, ``q_w = round(w * (127 / amax))``. An activation row (x, and h_{t-1} at every
  step) is quantized the same way when it is used (dynamic, per row; 0 for an all-zero row; a row holding
  a NaN or an inf gets a NaN scale, so its products are NaN). A product is ``(float(sum_k q_a q_w) * s_a) *
  s_w``, the sum exact in integers. Per-row scales on both sides keep more of each row's range than
  fbgemm's (torch's) per-tensor weights and 7-bit per-tensor activations.
- bfloat16: weights rounded to bfloat16; activations rounded to bfloat16 where they enter a product; the
  products summed in float32.
- Biases, gates, peephole weights, the cell state and all outputs stay float32.

Buffers (in ``state_dict``): torch's parameter names hold the quantized weights (``weight_ih_l0`` int8 or
bfloat16 ...) with ``<name>_scale`` float32 beside each int8 weight; biases and peephole weights float32.
Backends: ``cpp`` (csrc/quant.cpp: AVX512-VNNI / AVX512-BF16 products where the CPU has them, portable
products elsewhere), ``numba`` (fastrnn/backends/numba_kernels/quant.py) and ``reference`` (PyTorch math,
any CPU). ``backend=None`` takes cpp when its extension loads, else numba, else the reference.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from . import dispatch, ops
from .backends.reference import gru_pointwise, lstm_pointwise
from .modules import _check_state_like, _packed_layout

DTYPES = (torch.qint8, torch.bfloat16)
BACKENDS = ("cpp", "numba", "reference")
_FAMILY_CODE = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}


_EXT = []


def _cpp():
    """The cpp backend's extension module (None when it is not available); looked up once."""
    if not _EXT:
        from .backends import cpp
        _EXT.append(cpp._C)
    return _EXT[0]


def kernel_path(dtype=torch.qint8):
    """Which products the cpp backend runs for ``dtype`` on this CPU (``python -m fastrnn.info`` shows it),
    or why it cannot run."""
    C = _cpp()
    if C is None:
        from .backends import cpp
        return f"unavailable: {cpp._LOAD_ERROR}"
    return C.q_path(0 if dtype is torch.qint8 else 1)


# ---- quantizing weights and activations ------------------------------------------------------------------
def quantize_rows(w):
    """Symmetric per-row int8 of a float32 matrix: ``(q int8, scale float32 [rows])`` with w ~ q * scale."""
    amax = w.abs().amax(1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(w * inv).clamp_(-127, 127).to(torch.int8)
    return q, (amax / 127).squeeze(1)


def _act_rows(x):
    """An activation's rows as int8 values (in float32) and their scales [M, 1] (see the top)."""
    amax = x.abs().amax(1, keepdim=True)
    bad = (x * 0).sum(1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.nan_to_num(torch.round(x * inv).clamp_(-127, 127), nan=0.0)
    return q, amax / 127 + bad


def reference_product(x, w, scale):
    """The reference of one quantized product x @ W^T: x float32 [M, K], W int8 with its row scales or
    bfloat16 (scale None)."""
    if w.dtype == torch.bfloat16:
        return x.to(torch.bfloat16).float() @ w.float().t()
    q, s = _act_rows(x)
    acc = q.double() @ w.double().t()  # exact integer sums
    return (acc.float() * s) * scale


# ---- the kernel as a torch.library op (torch.compile and dispatch modes see it; eager calls go direct) ----
@torch.library.custom_op("fastrnn_quant::seq_fwd", mutates_args=())
def _seq_fwd_op(family: int, kind: int, x: torch.Tensor, wih_panel: torch.Tensor, wih_scale: torch.Tensor,
                wih_sum: torch.Tensor, whh_panel: torch.Tensor, whh_scale: torch.Tensor, whh_sum: torch.Tensor,
                whr_panel: torch.Tensor | None, whr_scale: torch.Tensor | None, whr_sum: torch.Tensor | None,
                bias: torch.Tensor, bias_hn: torch.Tensor | None, w_ch: torch.Tensor | None, h0: torch.Tensor,
                c0: torch.Tensor | None, lengths: torch.Tensor | None, reverse: bool,
                coupled: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, c = _cpp().q_seq_fwd(family, kind, x, wih_panel, wih_scale, wih_sum, whh_panel, whh_scale, whh_sum,
                               whr_panel, whr_scale, whr_sum, bias, bias_hn, w_ch, h0, c0, lengths, reverse, coupled)
    return y, h, (c if c is not None else x.new_empty(0))


@_seq_fwd_op.register_fake
def _(family, kind, x, wih_panel, wih_scale, wih_sum, whh_panel, whh_scale, whh_sum, whr_panel, whr_scale, whr_sum,
      bias, bias_hn, w_ch, h0, c0, lengths, reverse, coupled):
    T, B = x.shape[0], x.shape[1]
    return (x.new_empty(T, B, h0.shape[1]), h0.new_empty(h0.shape),
            c0.new_empty(c0.shape) if c0 is not None else x.new_empty(0))


# ---- the modules --------------------------------------------------------------------------------------------
class _Quantized(nn.Module):
    """What the quantized modules share: the buffers, the packed weights' cache, the checks."""

    _family: str
    _torch_class: type

    def _init_common(self, float_mod, dtype, backend):
        self.qdtype = dtype
        self.backend = _check_backend(backend)
        self.training = float_mod.training
        self.peephole = bool(getattr(float_mod, "peephole", False))
        self.coupled_gates = bool(getattr(float_mod, "coupled_gates", False))

    def _store(self, name, w):
        """Quantize float32 weight ``w`` into buffer ``name`` (and ``name_scale`` for int8)."""
        w = w.detach()
        if self.qdtype is torch.bfloat16:
            self.register_buffer(name, w.to(torch.bfloat16).contiguous())
        else:
            q, s = quantize_rows(w)
            self.register_buffer(name, q.contiguous())
            self.register_buffer(name + "_scale", s.contiguous())

    def _keep(self, name, t):
        self.register_buffer(name, None if t is None else t.detach().clone().float().contiguous())

    def _apply(self, fn, recurse=True):
        """Moves go through (``.to(device)``); dtype casts (``model.double()``, ``.half()``) leave the quantized
        weights, their scales and the float32 biases as they are: the module computes in its own form."""
        dtypes = {n: b.dtype for n, b in self._buffers.items() if b is not None}
        self.__dict__.pop("_args_cache", None)
        super()._apply(fn, recurse)
        for n, dt in dtypes.items():
            b = self._buffers[n]
            if b is not None and b.dtype != dt:
                self._buffers[n] = b.to(dt)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a quantized weight must come in its own dtype: load_state_dict's copy_ would turn int8 values into
        # bfloat16 numbers (or the reverse) without a word
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is not None and buf.dtype in (torch.int8, torch.bfloat16) and key in state_dict \
                    and state_dict[key].dtype != buf.dtype:
                error_msgs.append(f"{key}: the checkpoint holds {state_dict[key].dtype} weights, this quantized "
                                  f"module {buf.dtype} ones (quantize the float model with the checkpoint's dtype)")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._repack()

    def _repack(self):
        """The cpp backend's packed form of every layer-direction (csrc/quant.cpp), as non-persistent buffers
        ``_packed{k}_{j}``: made when the module is made and when a state_dict is loaded into it (not when
        its weight buffers are changed in place). Without the extension there is nothing to pack."""
        if _cpp() is None:
            return
        for k in range(self._count()):
            for j, t in enumerate(self._pack(self._names(k))):
                self.register_buffer(f"_packed{k}_{j}", t, persistent=False)
        self.__dict__.pop("_args_cache", None)

    def _packed_args(self, k):
        """Layer-direction k's packed tensors, from a cache of the buffers (12 attribute lookups cost ~10 us
        a call); remade after a move, a load or a repack."""
        cache = self.__dict__.setdefault("_args_cache", {})
        hit = cache.get(k)
        if hit is None:
            hit = cache[k] = tuple(self._buffers[f"_packed{k}_{j}"] for j in range(12))
        return hit

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_args_cache", None)  # remade from the buffers on first use
        return state

    def _gates(self):
        if self._family == "lstm":
            return 3 if self.coupled_gates else 4
        return 3 if self._family == "gru" else 1

    def _code(self):
        return self._family if self._family != "rnn" else f"rnn_{self.nonlinearity}"

    def _choose(self):
        return choose(self.backend, self._name())

    def _name(self):
        return f"{self._torch_class.__name__} (fastrnn.quantize, {'int8' if self.qdtype is torch.qint8 else 'bfloat16'})"

    def _check_input(self, input, states):
        name = self._name()
        if torch.is_grad_enabled() and (input.requires_grad or any(s.requires_grad for s in states)):
            raise RuntimeError(f"{name}: quantized modules are inference-only (fastrnn.quantize made this one), and "
                               f"{'the input' if input.requires_grad else 'hx'} requires grad; run it under "
                               f"torch.no_grad() or torch.inference_mode(), or train the float module")
        if input.dtype != torch.float32:
            raise RuntimeError(f"{name}: expected a float32 input, got {input.dtype}")
        if input.device.type != "cpu":
            raise RuntimeError(f"{name}: quantized modules run on the CPU; the input is on {input.device}")
        _check_state_like(name, states, input)

    def _pack(self, names):
        w_ih, w_hh, b_ih, b_hh, w_hr, w_ch = (None if n is None else getattr(self, n) for n in names)
        C = _cpp()
        G, H = self._gates(), self.hidden_size
        s_ih = getattr(self, names[0] + "_scale", None)
        s_hh = getattr(self, names[1] + "_scale", None)
        ih = C.q_pack(w_ih, s_ih, G, H)
        hh = C.q_pack(w_hh, s_hh, G, H)
        cols = ih[3]
        b = torch.zeros(G * H)
        if b_ih is not None:
            b = b + b_ih
            if self._family == "gru":
                b[:2 * H] += b_hh[:2 * H]  # b_hn stays inside r * (W_hn h + b_hn)
            else:
                b = b + b_hh
        bias = torch.where(cols >= 0, b[cols.clamp(min=0)], torch.zeros(()))
        bias_hn = None
        if self._family == "gru" and b_hh is not None:
            bias_hn = torch.zeros(ih[1].numel() // G)
            bias_hn[:H] = b_hh[2 * H:]
        hr = (None,) * 3
        if w_hr is not None:
            hr = tuple(C.q_pack(w_hr, getattr(self, names[4] + "_scale", None), 1, w_hr.shape[0])[:3])
        return (*ih[:3], *hh[:3], *hr, bias.contiguous(), bias_hn, None if w_ch is None else w_ch.contiguous())

    def _layer(self, key, names, x, h0, c0, lengths, reverse):
        """One layer-direction on x [T, B, I] (time-major, contiguous float32): (y, h_n, c_n or None)."""
        backend = self._choose()
        dispatch.note_call(f"{self._family}_quantized", backend)
        kind = 0 if self.qdtype is torch.qint8 else 1
        if backend == "cpp":
            args = (_FAMILY_CODE[self._code()], kind, x, *self._packed_args(key), h0.contiguous(),
                    None if c0 is None else c0.contiguous(), lengths, reverse, self.coupled_gates)
            if ops.can_skip_ops():
                y, h, c = _cpp().q_seq_fwd(*args)
            else:
                y, h, c = torch.ops.fastrnn_quant.seq_fwd(*args)
            return y, h, (c if c0 is not None else None)
        if backend == "numba":
            return _numba_layer(self, names, x, h0, c0, lengths, reverse)
        return _reference_layer(self, names, x, h0, c0, lengths, reverse)

def choose(explicit, what):
    """The backend of a quantized module's call: ``explicit`` (the module's ``backend``), else the one
    ``fastrnn.use_backend`` or FASTRNN_BACKEND requests (dispatch.requested, as for every fastrnn module),
    obeyed exactly or refused with BackendNotSupportedError; else the first of cpp, numba, reference that
    can run here. ``what`` names the module in the refusal."""
    name = explicit if explicit is not None else dispatch.requested()
    if name is None:
        return next(n for n in BACKENDS if not dispatch.reasons(n))
    why = [f"the quantized modules run on {', '.join(BACKENDS)}"] if name not in BACKENDS else dispatch.reasons(name)
    if why:
        raise dispatch.BackendNotSupportedError(f"fastrnn backend '{name}' cannot run this {what}: {'; '.join(why)}")
    return name


# a constant for torch.compile, as dispatch.choose (it reads a context variable, which Dynamo cannot trace)
choose._dynamo_marked_constant = True


def _check_backend(backend):
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"fastrnn.quantize: unknown backend {backend!r}; the quantized modules run on "
                         f"{', '.join(BACKENDS)} (or None: automatic)")
    return backend


def _numba_layer(mod, names, x, h0, c0, lengths, reverse):
    """The numba backend's layer-direction (fastrnn/backends/numba_kernels/quant.py)."""
    import numpy as np
    from .backends.numba_kernels import quant as nq
    w_ih, w_hh, b_ih, b_hh, w_hr, w_ch = (None if n is None else getattr(mod, n) for n in names)
    int8 = mod.qdtype is torch.qint8
    f32 = np.float32

    def weight(w, name):
        if int8:
            return w.numpy(), getattr(mod, name + "_scale").numpy()
        return w.float().numpy(), np.zeros(0, f32)

    T, B, I = x.shape
    G, H = mod._gates(), mod.hidden_size
    wih, sih = weight(w_ih, names[0])
    whh, shh = weight(w_hh, names[1])
    K = max(I, 1)
    xw = np.empty((T * B, G * H), f32)
    nq.product(x.reshape(T * B, I).numpy(), wih, sih, int8, np.empty((T * B, K), np.int32), np.empty(T * B, f32),
               np.empty((T * B, K), f32), xw)
    bhn = np.zeros(0, f32)
    if b_ih is not None:
        b = (b_ih + b_hh).numpy().copy()
        if mod._family == "gru":
            b[2 * H:] = b_ih[2 * H:].numpy()
            bhn = b_hh[2 * H:].numpy()
        xw += b
    if w_hr is not None:
        whr, shr = weight(w_hr, names[4])
    else:
        whr, shr = np.zeros((0, 0), np.int8 if int8 else f32), np.zeros(0, f32)
    wch = w_ch.numpy() if w_ch is not None else np.zeros((0, 0), f32)
    P = h0.shape[1]
    sizes = np.full(T, B, np.int64) if lengths is None else (
        (lengths.unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1).numpy())
    c0n = c0.numpy() if c0 is not None else np.zeros((B, 0), f32)
    y, hT, cT = np.empty((T, B, P), f32), np.empty((B, P), f32), np.empty_like(c0n)
    nq.seq(_FAMILY_CODE[mod._code()], int8, xw.reshape(T, B, G * H), whh, shh, bhn, whr, shr, wch,
           h0.contiguous().numpy(), c0n, sizes, reverse, mod.coupled_gates, y, hT, cT)
    return torch.from_numpy(y), torch.from_numpy(hT), (torch.from_numpy(cT) if c0 is not None else None)


def _reference_layer(mod, names, x, h0, c0, lengths, reverse):
    """The oracle: the quantized math of the top, step by step in PyTorch (float64 only for the exact
    integer sums)."""
    w_ih, w_hh, b_ih, b_hh, w_hr, w_ch = (None if n is None else getattr(mod, n) for n in names)
    s_ih, s_hh = (getattr(mod, n + "_scale", None) for n in names[:2])
    s_hr = None if w_hr is None else getattr(mod, names[4] + "_scale", None)
    T, B, _ = x.shape
    fam, coupled = mod._family, mod.coupled_gates
    xw = reference_product(x.reshape(T * B, -1), w_ih, s_ih)
    if b_ih is not None:
        xw = xw + b_ih
    xw = xw.view(T, B, -1)
    sizes = [B] * T if lengths is None else [int((lengths > t).sum()) for t in range(T)]
    h, c = h0.clone(), None if c0 is None else c0.clone()
    y = x.new_zeros(T, B, h0.shape[1])
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        n = sizes[t]
        if n == 0:
            continue
        gh = reference_product(h[:n], w_hh, s_hh)
        if b_hh is not None:
            gh = gh + b_hh
        xt = xw[t, :n]
        if fam == "lstm":
            hn, c[:n] = lstm_pointwise(xt + gh, c[:n], w_ch, coupled)
            if w_hr is not None:
                hn = reference_product(hn, w_hr, s_hr)
        elif fam == "gru":
            hn = gru_pointwise(xt, gh, h[:n])
        else:
            pre = xt + gh
            hn = torch.tanh(pre) if mod.nonlinearity == "tanh" else torch.relu(pre)
        h[:n] = hn
        y[t, :n] = hn
    return y, h, c


class _QuantizedSeq(_Quantized):
    """forward() of the sequence modules: torch.nn's argument handling around the layer loop."""

    def __init__(self, float_mod, dtype, backend=None):
        super().__init__()
        for a in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                  "proj_size", "mode"):
            setattr(self, a, getattr(float_mod, a))
        if self._family == "rnn":
            self.nonlinearity = float_mod.nonlinearity
        self._init_common(float_mod, dtype, backend)
        for k in range(self.num_layers * self._D):
            for n in self._names(k):
                if n is None:
                    continue
                w = getattr(float_mod, n)
                if n.startswith(("weight_ih", "weight_hh", "weight_hr")):
                    self._store(n, w)
                else:
                    self._keep(n, w)
        self._repack()

    def _count(self):
        return self.num_layers * self._D

    @property
    def _D(self):
        return 2 if self.bidirectional else 1

    def _names(self, k):
        """Layer-direction k's (w_ih, w_hh, b_ih, b_hh, w_hr, w_ch) buffer names (None: absent)."""
        sfx = f"_l{k // self._D}{'_reverse' if k % self._D else ''}"
        return (f"weight_ih{sfx}", f"weight_hh{sfx}", f"bias_ih{sfx}" if self.bias else None,
                f"bias_hh{sfx}" if self.bias else None,
                f"weight_hr{sfx}" if getattr(self, "proj_size", 0) > 0 else None,
                f"weight_ch{sfx}" if self.peephole else None)

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        for a, default in (("proj_size", 0), ("num_layers", 1), ("bias", True), ("batch_first", False),
                           ("dropout", 0.0), ("bidirectional", False), ("peephole", False),
                           ("coupled_gates", False)):
            if getattr(self, a, default) != default:
                s += f", {a}={getattr(self, a)}"
        if self._family == "rnn" and self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        return s + f", dtype={self.qdtype}"

    def forward(self, input, hx=None):
        name = self._torch_class.__name__
        packed = isinstance(input, PackedSequence)
        sorted_indices = unsorted_indices = lengths = index = None
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            T, B = batch_sizes.numel(), int(batch_sizes[0]) if batch_sizes.numel() else 0
            batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            data = input
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
            T, B = x.shape[0], x.shape[1]
        if data.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {data.shape[-1]}")
        P = self.proj_size if getattr(self, "proj_size", 0) > 0 else self.hidden_size
        LD = self.num_layers * self._D
        if hx is None:
            states = [data.new_zeros(LD, B, P)] + ([data.new_zeros(LD, B, self.hidden_size)]
                                                    if self._family == "lstm" else [])
        else:
            if self._family == "lstm":
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise TypeError(f"{name}: hx should be a tuple (h_0, c_0) of tensors")
                states = list(hx)
            else:
                if not isinstance(hx, torch.Tensor):
                    raise TypeError(f"{name}: hx should be a tensor, got {type(hx).__name__}")
                states = [hx]
            want = 3 if batched else 2
            if any(s.dim() != want for s in states):
                raise RuntimeError(f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx should also be "
                                   f"{want}-D but got {states[0].dim()}-D tensor")
            if not batched:
                states = [s.unsqueeze(1) for s in states]
            if sorted_indices is not None:
                states = [s.index_select(1, sorted_indices) for s in states]
            for s, size, what in zip(states, (P, self.hidden_size), ("hidden", "cell")):
                expect = (LD, B, size)
                if tuple(s.shape) != expect:
                    raise RuntimeError(f"Expected {what} size {expect}, got {list(s.shape)}")
        self._check_input(data, states)
        if T == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if packed:
            lengths, index = _packed_layout(batch_sizes, data.device)
            x = data.new_zeros(T * B, data.shape[1]).index_copy_(0, index, data).view(T, B, -1)
        layer_input = x.contiguous()
        finals = [[] for _ in states]
        for layer in range(self.num_layers):
            outs = []
            for d in range(self._D):
                k = layer * self._D + d
                res = self._layer(k, self._names(k), layer_input, states[0][k],
                                  states[1][k] if len(states) > 1 else None, lengths, d == 1)
                outs.append(res[0])
                for acc, s in zip(finals, res[1:]):
                    acc.append(s)
            layer_input = outs[0] if self._D == 1 else torch.cat(outs, 2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                # (a packed input's padded steps are zeros in y, and stay zeros)
                layer_input = F.dropout(layer_input, self.dropout, training=True)
            layer_input = layer_input.contiguous()
        out_states = [acc[0].unsqueeze(0) if len(acc) == 1 else torch.stack(acc) for acc in finals]
        if packed:
            out = PackedSequence(layer_input.reshape(T * B, -1).index_select(0, index), batch_sizes, sorted_indices,
                                 unsorted_indices)
            if unsorted_indices is not None:
                out_states = [s.index_select(1, unsorted_indices) for s in out_states]
        else:
            out = layer_input
            if batched and self.batch_first:
                out = out.transpose(0, 1)
            if not batched:
                out = out.squeeze(1)
                out_states = [s.squeeze(1) for s in out_states]
        return out, (tuple(out_states) if self._family == "lstm" else out_states[0])


class _QuantizedCell(_Quantized):
    """forward() of the cells: one step of the layer loop."""

    def __init__(self, float_mod, dtype, backend=None):
        super().__init__()
        for a in ("input_size", "hidden_size", "bias"):
            setattr(self, a, getattr(float_mod, a))
        if self._family == "rnn":
            self.nonlinearity = float_mod.nonlinearity
        self._init_common(float_mod, dtype, backend)
        for n in self._names(0):
            if n is None:
                continue
            w = getattr(float_mod, n)
            if n.startswith(("weight_ih", "weight_hh")):
                self._store(n, w)
            else:
                self._keep(n, w)
        self._repack()

    def _count(self):
        return 1

    def _fast_forward(self, input, hx):
        """A streaming step's fast path: inference (grad off) on a batched contiguous float32 CPU input with
        its state given, on cpp, nothing tracing: straight to the op, without the general forward's checks
        (~15 us, twice the op at B=1, NOTES.md). None when the call is not one of those; the general forward
        then checks it and raises torch's errors."""
        if (torch.is_grad_enabled() or hx is None or type(input) is not torch.Tensor or input.dim() != 2
                or input.dtype is not torch.float32 or not input.is_cpu or not input.is_contiguous()
                or input.shape[1] != self.input_size or self._choose() != "cpp"):
            return None
        lstm = self._family == "lstm"
        if lstm:
            if type(hx) is not tuple or len(hx) != 2:
                return None
            h, c = hx
        else:
            h, c = hx, None
        B, H = input.shape[0], self.hidden_size
        for s in (h, c) if lstm else (h,):
            if (type(s) is not torch.Tensor or s.dtype is not torch.float32 or not s.is_cpu or s.dim() != 2
                    or s.shape[0] != B or s.shape[1] != H):
                return None
        if not ops.can_skip_ops():
            return None
        dispatch.note_call(f"{self._family}_quantized", "cpp")
        _, h, c = _cpp().q_seq_fwd(_FAMILY_CODE[self._code()], 0 if self.qdtype is torch.qint8 else 1,
                                    input.unsqueeze(0), *self._packed_args(0), h, c, None, False, self.coupled_gates)
        return (h, c) if lstm else h

    def _names(self, k):
        return ("weight_ih", "weight_hh", "bias_ih" if self.bias else None, "bias_hh" if self.bias else None, None,
                "weight_ch" if self.peephole else None)

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if self._family == "rnn" and self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        for a in ("peephole", "coupled_gates"):
            if getattr(self, a):
                s += f", {a}=True"
        return s + f", dtype={self.qdtype}"

    def forward(self, input, hx=None):
        out = self._fast_forward(input, hx)
        if out is not None:
            return out
        name = self._torch_class.__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if x.shape[1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected {self.input_size}")
        B = x.shape[0]
        if hx is None:
            states = [x.new_zeros(B, self.hidden_size)] * (2 if self._family == "lstm" else 1)
        else:
            states = list(hx) if self._family == "lstm" else [hx]
            if self._family == "lstm" and len(states) != 2:
                raise TypeError(f"{name}: hx should be a tuple (h_0, c_0) of tensors")
            if any(s.dim() != input.dim() for s in states):
                raise RuntimeError(f"{name}: Expected hidden to be {input.dim()}D, got {states[0].dim()}D instead")
            states = [s if batched else s.unsqueeze(0) for s in states]
            for s in states:
                if tuple(s.shape) != (B, self.hidden_size):
                    raise RuntimeError(f"{name}: hidden size {list(s.shape)} does not match the input's batch "
                                       f"{B} and hidden_size {self.hidden_size}")
        self._check_input(input, states)
        y, h, c = self._layer(0, self._names(0), x.unsqueeze(0).contiguous(), states[0],
                              states[1] if len(states) > 1 else None, None, False)
        if not batched:
            h = h.squeeze(0)
            c = None if c is None else c.squeeze(0)
        return (h, c) if self._family == "lstm" else h


class LSTM(_QuantizedSeq):
    _family, _torch_class = "lstm", nn.LSTM


class GRU(_QuantizedSeq):
    _family, _torch_class = "gru", nn.GRU


class RNN(_QuantizedSeq):
    _family, _torch_class = "rnn", nn.RNN


class LSTMCell(_QuantizedCell):
    _family, _torch_class = "lstm", nn.LSTMCell


class GRUCell(_QuantizedCell):
    _family, _torch_class = "gru", nn.GRUCell


class RNNCell(_QuantizedCell):
    _family, _torch_class = "rnn", nn.RNNCell


_CLASSES = ((nn.LSTM, LSTM), (nn.GRU, GRU), (nn.RNN, RNN), (nn.LSTMCell, LSTMCell), (nn.GRUCell, GRUCell),
            (nn.RNNCell, RNNCell))


def _quantized_class(mod):
    for torch_cls, q_cls in _CLASSES:
        if isinstance(mod, torch_cls):
            return q_cls
    return None


def _check_module(mod, dtype):
    """Why ``mod`` cannot be quantized (raises), before anything changes."""
    name = type(mod).__name__
    weights = [p for n, p in mod.named_parameters(recurse=False)] or [t for n, t in mod.named_buffers(recurse=False)]
    for p in weights:
        if p.dtype != torch.float32:
            raise RuntimeError(f"fastrnn.quantize: {name} has {p.dtype} weights; quantization starts from float32 "
                               f"(call .float() on the model first)")
        if p.device.type != "cpu":
            raise RuntimeError(f"fastrnn.quantize: quantized modules run on the CPU, and {name} is on {p.device} "
                               f"(call .cpu() first)")
    used = [o for o in ("layer_norm", "zoneout", "recurrent_dropout") if getattr(mod, o, False)]
    if used:
        raise ValueError(f"fastrnn.quantize: {name} uses {', '.join(used)}, which the quantized modules do not "
                         f"have; only the plain cells and the LSTM variants (peephole, coupled_gates) quantize")


def quantize(model, dtype=torch.qint8, inplace=False, *, backend=None):
    """Quantize every LSTM, GRU, RNN and cell in ``model`` (fastrnn's or torch.nn's) for inference.

    ``dtype``: ``torch.qint8`` (int8 weights, dynamic int8 activations) or ``torch.bfloat16`` (see the
    module's docstring for the math). ``model`` itself may be one of those modules: its quantized twin is
    returned. With ``inplace=False`` the model is not changed (a copy is quantized); with ``inplace=True`` its
    children are replaced in place. ``backend``: ``"cpp"``, ``"reference"`` or None (automatic)."""
    if dtype not in DTYPES:
        raise RuntimeError(f"fastrnn.quantize: unsupported dtype {dtype}; use torch.qint8 or torch.bfloat16")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastrnn.quantize: expected an nn.Module, got {type(model).__name__}")
    _check_backend(backend)
    targets = [m for m in model.modules() if _quantized_class(m) is not None and not isinstance(m, _Quantized)]
    for m in targets:
        _check_module(m, dtype)
    cls = _quantized_class(model)
    if cls is not None:
        return cls(model, dtype, backend)
    if not inplace:
        model = copy.deepcopy(model)
    _swap(model, dtype, backend)
    return model


def _swap(parent, dtype, backend):
    for name, child in parent.named_children():
        cls = _quantized_class(child)
        if cls is not None:
            setattr(parent, name, cls(child, dtype, backend))
        elif not isinstance(child, _Quantized):
            _swap(child, dtype, backend)
