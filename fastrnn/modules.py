"""Drop-in replacements for torch.nn.LSTM/GRU/RNN and their cells.

Each class subclasses its torch.nn class: same constructor (plus keyword-only ``backend``), same
parameters, initialization and state_dict, same inputs and outputs. Only ``forward`` differs: it
checks its arguments the way torch does, brings the input to time-major form and runs
``fastrnn.functional`` on the backend that ``fastrnn.dispatch`` picks.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence

from . import dispatch, ops, policy
from .functional import autocast_dtype, cell_step, chunk_layers, one_step_layers, rnn_layers, train_step

# Under CPU autocast a fastrnn layer runs with autocast off, in its own dtype (float32: the input
# projection too, so its xw matches its state; the input and a given state are cast to it first, as
# autocast lets torch.nn take a bfloat16 input or the bfloat16 state it returned), and returns the dtypes
# torch.nn's module returns there (torch 2.13, measured for bfloat16 and float16: benchmarks/NOTES.md):
# the autocast dtype for LSTM (but not with a PackedSequence input, nor c_n with proj_size), RNN and
# RNNCell; for the others (GRU, LSTMCell, GRUCell) the dtype of the given state, else of the input. A
# float64 module is left as it is, as autocast leaves float64 ops.
_NO_CONTEXT = contextlib.nullcontext()
_AUTOCAST_MODULE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _autocast_for(device_type, module_dtype):
    return autocast_dtype(device_type) if module_dtype in _AUTOCAST_MODULE_DTYPES else None


def _no_autocast(input):
    """Autocast off for the block, if CPU autocast is on for ``input``: a layer computes its (parametrized)
    weights and runs in the module's own dtype (see the top)."""
    dev = input.device.type
    return torch.autocast(dev, enabled=False) if autocast_dtype(dev) is not None else _NO_CONTEXT


def _to_float(t, dtype):
    return t.to(dtype) if t.is_floating_point() else t


def _check_float(name, input, exc=ValueError):
    if not torch.is_floating_point(input):
        raise exc(f"{name}: input must be a floating-point tensor, got dtype {str(input.dtype)}")


def _check_state_like(name, states, ref, what="hx"):
    """Hidden state tensors must share the input's dtype and device (torch fails here obscurely)."""
    for k, s in enumerate(states):
        label = f"{what}[{k}]" if len(states) > 1 else what
        if s.dtype != ref.dtype:
            raise RuntimeError(f"{name}: {label} has dtype {str(s.dtype)} but the input has dtype "
                               f"{str(ref.dtype)}; they must match")
        if s.device != ref.device:
            raise RuntimeError(f"{name}: {label} is on device {s.device} but the input is on {ref.device}; "
                               f"they must be on the same device")


def _check_device(name, input, weight):
    if input.device != weight.device:
        raise RuntimeError(f"{name}: input is on device {input.device} but the parameters are on "
                           f"{weight.device}; they must be on the same device")


def _packed_layout(batch_sizes, device):
    """Per-row lengths (int64 CPU, non-increasing) and the flat indices of packed rows in [T*B] (t*B + b,
    in PackedSequence order: ``backends._common.packed_positions``). In numpy: the same in torch ops took
    ~50 us of every packed call (seven small ops), this ~6 (benchmarks/NOTES.md, thirty-third session)."""
    sizes = batch_sizes.numpy()  # a PackedSequence's batch_sizes: int64 on the CPU
    active = np.arange(int(sizes[0]) if len(sizes) else 0) < sizes[:, None]  # [T, B]: row b runs at step t
    lengths = torch.from_numpy(active.sum(0, dtype=np.int64))
    return lengths, torch.from_numpy(np.flatnonzero(active)).to(device)


@functools.lru_cache(maxsize=None)
def _torch_class_of(cls):
    """The torch.nn class a fastrnn class (or torch's ``Parametrized*`` class over one) replaces."""
    return next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn.modules"))


_any_autocast = torch._C._is_any_autocast_enabled  # the cells' fast path leaves autocast to _forward


def _exporting():
    """Is torch.jit.trace (and so torch.onnx's TorchScript exporter, which traces) recording this call?
    Then a module that torch.nn can run runs torch.nn's own forward: the trace gets aten::lstm/gru/rnn
    ops, which the ONNX exporter maps to ONNX's LSTM/GRU/RNN, instead of fastrnn's custom ops, which it
    cannot. (The tracing state itself: ``torch.jit.is_tracing`` costs ~1 us more a call.)"""
    return torch._C._get_tracing_state() is not None


class _BackendMixin:
    """The keyword-only ``backend`` argument every fastrnn module adds to its torch constructor."""

    # class defaults: also what a module pickled before these options had
    weight_dropout = 0.0
    layer_norm = False
    zoneout = 0.0
    recurrent_dropout = 0.0

    def _variant_only(self):
        """Does the module use a feature torch.nn lacks (the LSTM variants, weight dropout, the cell options)?"""
        return bool(getattr(self, "peephole", False) or getattr(self, "coupled_gates", False) or self.weight_dropout
                    or self._cell_options())

    def _cell_options(self):
        """Does the module use one of the cell options (layer norm, zoneout, recurrent dropout)?"""
        z = self.zoneout  # a float, or an LSTM's (p_h, p_c); an RNN has none (0.0)
        return bool(self.layer_norm or self.recurrent_dropout or (any(z) if isinstance(z, tuple) else z))

    def _zoneout_probs(self):
        """The zoneout probabilities in op order: (p_h, p_c) for an LSTM, (p,) for a GRU, () for an RNN."""
        z = self.zoneout
        if self._family == "lstm":
            return tuple(z) if isinstance(z, tuple) else (z, z)
        return () if self._family == "rnn" else (z,)

    def _option_features(self):
        """The options in use that torch.nn lacks, as dispatch features: the cell options, and weight dropout
        in training (which every op backend serves: the module drops W_hh before the ops, see
        ``backends.MODULE_FEATURES``; only the ``torch`` backend refuses it)."""
        return {f for f, on in (("layer_norm", self.layer_norm), ("zoneout", any(self._zoneout_probs())),
                                ("recurrent_dropout", self.recurrent_dropout and self.training),
                                ("weight_dropout", self._dropping_weights())) if on}

    def __prepare_scriptable__(self):
        """torch.jit.script compiles torch.nn's forward over the same module state (a twin of the torch.nn
        class sharing this module's ``__dict__``: parameters, hooks, flags), since fastrnn's Python forward
        is not scriptable. Scripting a parent puts the twin in the parent's place (torch writes back what
        this returns): the parent then runs torch.nn's forward in eager calls too, on the same state, until
        ``fastrnn.convert(parent)``. The variants, which torch.nn lacks, stay as they are (and do not
        script)."""
        if self._variant_only():
            return self
        cls = self._torch_class()
        twin = cls.__new__(cls)
        object.__setattr__(twin, "__dict__", self.__dict__)
        return twin

    def __init__(self, *args, backend: str | None = None, weight_dropout: float = 0.0, layer_norm: bool = False,
                 zoneout=0.0, recurrent_dropout: float = 0.0, **kwargs):
        p = _check_probability("weight_dropout", weight_dropout)
        layer_norm = _check_flag("layer_norm", layer_norm)
        zoneout = self._check_zoneout(zoneout)
        recurrent_dropout = _check_probability("recurrent_dropout", recurrent_dropout)
        cls = self._torch_class().__name__
        if self._family == "rnn":
            used = [n for n, v in (("layer_norm", layer_norm), ("zoneout", zoneout),
                                   ("recurrent_dropout", recurrent_dropout)) if v]
            if used:
                raise ValueError(f"{cls}: {', '.join(used)} {'is' if len(used) == 1 else 'are'} defined for the "
                                 f"gated cells (LSTM, GRU and their cells); {cls} has no gate form for "
                                 f"{'it' if len(used) == 1 else 'them'}")
        if recurrent_dropout and not isinstance(self, _SeqMixin):
            raise ValueError(f"{cls}: recurrent_dropout draws one mask per sequence, and a cell sees one step; "
                             f"use fastrnn.{cls[:-4]} for the whole sequence")
        super().__init__(*args, **kwargs)
        self.backend = dispatch.check_name(backend)
        self.weight_dropout = p
        self.zoneout = zoneout
        self.recurrent_dropout = recurrent_dropout

    def _check_zoneout(self, z):
        """``zoneout``: a probability in [0, 1), or for an LSTM also a pair (p_h, p_c)."""
        if isinstance(z, (tuple, list)):
            if self._family != "lstm":
                raise ValueError(f"{self._torch_class().__name__}: zoneout takes one probability (the cell has one "
                                 f"state), got {z!r}")
            if len(z) != 2:
                raise ValueError(f"zoneout should be a probability or a pair (p_h, p_c) of probabilities, got {z!r}")
            z = tuple(_check_probability("zoneout", p) for p in z)
            return z if z[0] != z[1] else z[0]
        return _check_probability("zoneout", z)

    def _setup_layer_norm(self, layer_norm, groups):
        """``layer_norm=True``: registers the gains (and the LSTM's cell-state bias) of each layer-direction
        ``suffix`` (``_l{k}[_reverse]``, or nothing for a cell), appending the names to ``names`` of each
        (names, suffix) group: ``layer_norm_weight_ih{suffix}`` and ``layer_norm_weight_hh{suffix}`` of
        shape (G*hidden_size,), init 1, and for an LSTM ``layer_norm_weight_c{suffix}`` (init 1) and
        ``layer_norm_bias_c{suffix}`` (init 0) of shape (hidden_size,). The math: ``_CELL_OPTIONS_DOC``."""
        self.layer_norm = layer_norm
        if not layer_norm:
            return
        for names, suffix in groups:
            ref = getattr(self, "weight_hh" + suffix)
            shapes = [("weight_ih", ref.shape[0], 1.0), ("weight_hh", ref.shape[0], 1.0)]
            if self._family == "lstm":
                shapes += [("weight_c", self.hidden_size, 1.0), ("bias_c", self.hidden_size, 0.0)]
            for what, size, value in shapes:
                name = f"layer_norm_{what}{suffix}"
                self.register_parameter(name, nn.Parameter(ref.new_full((size,), value)))
                names.append(name)

    def reset_parameters(self):
        super().reset_parameters()  # torch's: every parameter U(-1/sqrt(H), 1/sqrt(H))
        if self.layer_norm:  # the normalizations' gains start at 1, their biases at 0
            with torch.no_grad():
                for name, p in self.named_parameters(recurse=False):
                    if name.startswith("layer_norm_"):
                        p.fill_(1.0 if name.startswith("layer_norm_weight") else 0.0)

    def _dropping_weights(self):
        return self.weight_dropout > 0 and self.training

    def _cell_masks(self, steps, B, like, count):
        """The masks of the cell options for one call (training only; None where off), per layer-direction
        in op order: (rmask, zmask_h, zmask_c) for an LSTM, (rmask, zmask) for a GRU. rmask [B,P]: the
        recurrent dropout of h_{t-1} on its way into the recurrent product, one mask per sequence row for
        the whole sequence, 0 or 1/(1-p) (scaled). zmask [T,B,*] ([B,*] for a cell, ``steps`` None): 1
        where the unit keeps its previous value (probability p), else 0. Drawn from torch's RNG on the
        weights' device, in that order, one layer-direction after another (``_drop_mask``)."""
        if self._family == "rnn":
            return [()] * count
        P = getattr(self, "proj_size", 0) or self.hidden_size
        sizes = (P, self.hidden_size) if self._family == "lstm" else (P,)
        lead = (B,) if steps is None else (steps, B)
        zs = self._zoneout_probs()
        out = []
        for _ in range(count):
            masks = [None]
            if self.recurrent_dropout and self.training:
                keep, scale = _drop_mask((B, P), like.device, self.recurrent_dropout)
                masks[0] = keep.to(like.dtype) * scale
            for p, size in zip(zs, sizes):
                masks.append((~_drop_mask((*lead, size), like.device, p)[0]).to(like.dtype)
                             if p and self.training else None)
            out.append(tuple(masks))
        return out

    def _drop_recurrent(self, w_hh):
        """``weight_dropout=p`` (DropConnect on the recurrent weights, as in AWD-LSTM): in training each
        element of ``w_hh`` is zeroed with probability p and the others scaled to keep the expectation, with
        a new mask each forward call for the whole sequence; off in eval. The mask multiplies the weight
        outside the kernels, which see a plain weight; the parameter itself is never changed. The masks
        come from torch's RNG on the weight's device, one recurrent matrix after another in layer-direction
        order (``_drop_mask``)."""
        if not self._dropping_weights():
            return w_hh
        keep, scale = _drop_mask(w_hh.shape, w_hh.device, self.weight_dropout)
        return w_hh * (keep.to(w_hh.dtype) * scale)

    def _fast_op(self, input, kind, scope, shape):
        """For the fast paths (nothing tracing; with or without autograd): (backend name, its optional
        ``<family>_<kind>_fwd`` or None, the backend) for a call on ``input`` of policy class ``shape``,
        the choices cached in the module, one per key (dtype, device, class, the module's and the context's
        backend request, the policy table in force; remade when the backend object changes). None when the
        choice raises: ``_forward`` raises it then. A dtype the backend computes in a wider one has no fast
        op (it goes through the functional layer's casts)."""
        slot = f"_{kind}_choice"
        key = (input.dtype, "cpu" if input.is_cpu else input.device.type, shape, self.backend, dispatch.requested(),
               policy.generation, policy.env())
        choices = self.__dict__.get(slot)  # key -> (backend name, backend object, its op)
        if choices is None:
            choices = self.__dict__[slot] = {}
        cached = choices.get(key)
        if cached is None or dispatch._loaded.get(cached[0]) is not cached[1]:
            try:
                name = dispatch.choose(self._family, key[1], key[0], tuple(sorted(self._features())), self.backend,
                                       scope, shape)
            except dispatch.BackendNotSupportedError:
                return None
            impl = dispatch.get(name)
            op = getattr(impl, f"{self._family}_{kind}_fwd", None) if impl.compute_dtype(key[0]) == key[0] else None
            if len(choices) >= 16:  # a few classes a module sees; not a cache that grows without end
                choices.clear()
            cached = choices[key] = (name, impl, op)
        return cached[0], cached[2], cached[1]

    def _torch_checks(self, input, states, weight_name):
        """Before the fast paths hand a call to torch.nn: fastrnn's checks where torch's message is obscure
        (the state's dtype and device, the parameters' device), so the call fails as it would elsewhere.
        The names are made only for a call that fails (a cell call at batch 1 is ~30 us)."""
        weight = self._stored(weight_name)[0]
        dt, dev = input.dtype, input.device
        if weight.device != dev or any(s.dtype != dt or s.device != dev for s in states):
            name = self._torch_name()
            _check_device(name, input, weight)
            _check_state_like(name, states, input)

    def extra_repr(self):
        s = super().extra_repr()
        for name in ("weight_dropout", "layer_norm", "zoneout", "recurrent_dropout"):
            if getattr(self, name):
                s += f", {name}={getattr(self, name)}"
        if getattr(self, "backend", None) is not None:
            s += f", backend={self.backend!r}"
        return s

    def _training_class(self, input, states, weight_name):
        """Is the call in a training class of the policy table? When a backward will follow (the input, a
        state or the first input weight ``weight_name`` needs a gradient; the weight read from the tensors
        behind it, ``_stored``), and whenever the module is in training mode: a forward under no_grad that a
        backward later recomputes with grad (reentrant checkpointing) must take the same backend, whose
        dropout masks and rounding the backward relies on."""
        return self.training or (torch.is_grad_enabled() and (
            input.requires_grad or any(s.requires_grad for s in states)
            or any(t.requires_grad for t in self._stored(weight_name))))

    def _stored(self, name):
        """The tensors behind the weight ``name``, without computing a parametrization of it (the general
        path computes a parametrized weight once a call, README; the fast paths look before it): its
        parameter, or a parametrization's originals and own parameters, else the attribute."""
        p = self._parameters.get(name)
        if p is not None:
            return (p,)
        parametrizations = self._modules.get("parametrizations")
        if parametrizations is not None and name in parametrizations:
            return tuple(parametrizations[name].parameters())
        return (getattr(self, name),)

    def _torch_forward(self, input, hx):
        """What the ``torch`` backend runs: torch.nn's own forward on this module's state (its parameters,
        hooks and flags), with torch.nn's checks, numbers and autograd."""
        if dispatch._recorders:
            dispatch.note_call(f"{self._family}_module", "torch")
        return _torch_class_of(type(self)).forward(self, input, hx)

    def _torch_class(self):
        """The torch.nn class this module replaces (not torch's ``Parametrized*`` class over it)."""
        return _torch_class_of(type(self))

    def _torch_name(self):
        """The name of the torch.nn class this module replaces (it starts torch's error messages)."""
        return self._torch_class().__name__


class _SeqMixin(_BackendMixin):
    """forward() shared by LSTM, GRU and RNN: ``_fast_path`` for the plain dense calls, ``_forward`` for any
    call (torch's checks and messages, packed input, autocast, the cell options). The family's own bits are
    the hooks at the top."""

    _family: str
    _n_state = 1

    # hooks --------------------------------------------------------------------------------------
    def _hh_names(self, k, suffix):
        """Parameter names of layer k's recurrent weights in op order (None: absent)."""
        return (f"weight_hh_l{k}{suffix}", f"bias_hh_l{k}{suffix}" if self.bias else None)

    def _ln_names(self, k, suffix):
        """Parameter names of layer k's recurrent layer-norm tensors in op order (``layer_norm``), and of
        its input projection's gain: ``(hh names, ih name)``."""
        if not self.layer_norm:
            return (None,) * _N_LN[self._family], None
        s = f"_l{k}{suffix}"
        hh = (f"layer_norm_weight_hh{s}",)
        if self._family == "lstm":
            hh += (f"layer_norm_weight_c{s}", f"layer_norm_bias_c{s}")
        return hh, f"layer_norm_weight_ih{s}"

    def _options(self):
        return self._zoneout_probs()

    def _features(self):
        return frozenset(self._option_features())

    def flatten_parameters(self):
        if self.layer_norm or getattr(self, "peephole", False) or getattr(self, "coupled_gates", False):
            return  # cuDNN's weight layout has no place for these; fastrnn never uses it
        super().flatten_parameters()

    def _dim_error(self, d):
        return f"{self._torch_name()}: Expected input to be 2D or 3D, got {d}D instead"

    def _hx_tuple(self, hx, batched=True):
        return (hx,)

    def _autocast_low(self, packed):
        """Which of (output, *final states) torch.nn returns in the autocast dtype (see the top)."""
        low = self._family == "rnn" or (self._family == "lstm" and not packed)
        return (low,) * (1 + self._n_state)

    # state and layout ---------------------------------------------------------------------------
    def _zeros_state(self, x, B):
        """Zero initial states [L*D, B, size] like ``x``: h (proj_size wide when set) and an LSTM's c."""
        LD = self.num_layers * (2 if self.bidirectional else 1)
        sizes = (getattr(self, "proj_size", 0) or self.hidden_size, self.hidden_size)[:self._n_state]
        return tuple(x.new_zeros(LD, B, n) for n in sizes)

    def _hx_out(self, states):
        return tuple(states) if self._n_state == 2 else states[0]

    def _hx_dim_error(self, batched, states):
        form, d = ("batched", 3) if batched else ("unbatched", 2)
        if self._n_state == 1:
            return f"For {form} {d}-D input, hx should also be {d}-D but got {states[0].dim()}-D tensor"
        return (f"For {form} {d}-D input, hx and cx should also be {d}-D but got "
                f"({states[0].dim()}-D, {states[1].dim()}-D) tensors")

    def _time_major(self, input):
        """A dense input as [T, B, I] (a view): batch_first transposed, an unbatched [T, I] one row."""
        if input.dim() == 2:
            return input.unsqueeze(1)
        return input.transpose(0, 1) if self.batch_first else input

    def _caller_layout(self, y, states, batched):
        """(output, h_n or (h_n, c_n)) in the caller's layout, from time-major y [T, B, *] and states
        [L*D, B, *]."""
        if batched:
            return (y.transpose(0, 1) if self.batch_first else y), self._hx_out(states)
        return y.squeeze(1), self._hx_out(tuple(s.squeeze(1) for s in states))

    def _weights(self):
        """Per layer-direction ``(w_ih, b_ih, hh, ln_ih)``, the tensors the functional layer takes (the cell
        options' masks in ``hh`` are None: ``_call_weights`` draws them)."""
        masks = (None,) * _N_MASKS[self._family]
        D = 2 if self.bidirectional else 1
        params = self._parameters
        get = getattr
        out = []
        for layer in range(self.num_layers):
            for d in range(D):
                sfx = "_reverse" if d == 1 else ""
                ln_hh, ln_ih = self._ln_names(layer, sfx)
                names = (f"weight_ih_l{layer}{sfx}", f"bias_ih_l{layer}{sfx}" if self.bias else None, ln_ih,
                         *self._hh_names(layer, sfx), *ln_hh)
                try:  # straight from the parameters' dict (the attribute lookup costs ~1 us each)
                    w = [None if n is None else params[n] for n in names]
                except KeyError:  # a parametrization, or a plain tensor attribute: the general lookup
                    w = [None if n is None else get(self, n) for n in names]
                out.append((w[0], w[1], (*w[3:], *masks), w[2]))
        return out

    def _call_weights(self, weights, T, B, like):
        """``_weights()`` for one call that has passed its checks: W_hh dropped (``weight_dropout``) and the
        cell options' masks drawn, in training."""
        if self._dropping_weights():
            weights = [(w_ih, b_ih, (self._drop_recurrent(hh[0]), *hh[1:]), ln) for w_ih, b_ih, hh, ln in weights]
        n = _N_MASKS[self._family]
        if n:
            masks = self._cell_masks(T, B, like, len(weights))
            weights = [(w_ih, b_ih, (*hh[:-n], *m), ln) for (w_ih, b_ih, hh, ln), m in zip(weights, masks)]
        return weights

    # forward ------------------------------------------------------------------------------------
    def forward(self, input, hx=None):
        if _exporting() and not self._variant_only():
            return super().forward(input, hx)  # torch.nn's own ops, which exporters know
        if isinstance(input, torch.Tensor):
            out = self._fast_path(input, hx)
            if out is not None:
                return out
        return self._forward(input, hx)

    def _fast_states(self, hx, batched):
        """The fast path's states: () for no ``hx``, the tuple of a well-formed one, else None (``_forward``
        raises torch's error for it)."""
        if hx is None:
            return ()
        if self._n_state == 2 and not isinstance(hx, (tuple, list)):
            return None  # (a stacked tensor: torch raises a TypeError for it, _forward too)
        states = tuple(hx) if self._n_state == 2 else (hx,)
        LD = self.num_layers * (2 if self.bidirectional else 1)
        ok = len(states) == self._n_state and all(
            isinstance(s, torch.Tensor) and s.dim() == 2 + batched and s.shape[0] == LD for s in states)
        return states if ok else None

    def _fast_path(self, input, hx):
        """A dense call with a well-formed ``hx``, outside autocast, torch.compile, tracers and dispatch modes
        (``ops.can_skip_ops``), with no dropped weights or cell options, skips ``_forward``'s Python (it
        costs more than a short call's kernel: benchmarks/NOTES.md, "Short sequences"). The backend the
        policy picks for the call's shape class runs it: ``torch`` as torch.nn's forward; with autograd, a
        one-step call as each layer-direction's one-step training node (``one_step_layers``), any other
        through ``_forward``; without, a short sequence (T x B up to ``chunk_max_rows``) as one
        ``<family>_chunk_fwd`` a layer-direction (``chunk_layers``). Anything else, or refused, returns
        None: ``_forward`` serves it or raises torch's error."""
        if (input.dim() not in (2, 3) or not ops.can_skip_ops() or _any_autocast()
                or self._dropping_weights() or self._cell_options()):
            return None
        batched = input.dim() == 3
        states = self._fast_states(hx, batched)  # () for no hx: zeros, made below only for a fastrnn op
        if states is None:
            return None
        grad = torch.is_grad_enabled()
        training = self._training_class(input, states, "weight_ih_l0")
        T, B = (input.shape[1], input.shape[0]) if batched and self.batch_first else \
            (input.shape[0], input.shape[1] if batched else 1)
        choice = self._fast_op(input, "chunk", "seq", policy.shape_class("seq", training, B, T, self.hidden_size,
                                                                             self.bidirectional))
        if choice is None:
            return None
        name, op, impl = choice
        if name == "torch":  # a well-formed call (the others get _forward's checks and messages first)
            self._torch_checks(input, states, "weight_ih_l0")
            return self._torch_forward(input, hx)
        if grad:
            # autograd: a one-step call (a decoder's step), each layer-direction the backend's one-step node
            # (one_step_layers); else the general path on the backend chosen here (its choice costs ~15 us)
            if T != 1 or op is None:
                return self._forward(input, hx, name)
        elif op is None or T == 0 or T * B > impl.chunk_max_rows:
            return None
        x = self._time_major(input)
        if hx is None:
            states = self._zeros_state(x, B)
        elif not batched:
            states = tuple(s.unsqueeze(1) for s in states)
        layers = (functools.partial(one_step_layers, self._family) if grad
                  else functools.partial(chunk_layers, self._family, op))
        try:
            res = layers(x, states, self._weights(), self._options(), num_layers=self.num_layers,
                         num_directions=2 if self.bidirectional else 1, dropout=float(self.dropout),
                         training=self.training, backend=name)
        except (RuntimeError, TypeError):
            return None
        if res is None:  # a layer-direction the node does not serve
            return self._forward(input, hx, name)
        return self._caller_layout(*res, batched)

    def __getstate__(self):
        # the fast path's cached choice holds the backend and its op, which do not pickle (torch.save of
        # a whole module); it is rebuilt on the next call
        state = super().__getstate__()  # torch's RNNBase: a copy of __dict__
        state.pop("_chunk_choice", None)
        return state

    def _forward(self, input, hx=None, backend=None):
        """The general path: torch's argument checks, any backend, autograd. ``backend``: the one
        ``_fast_path`` chose for this call (a dense call outside autocast and tracers), else None."""
        name = self._torch_name()
        given = input, hx  # for the torch backend, which takes them as they came
        packed = isinstance(input, PackedSequence)
        batch_sizes = sorted_indices = unsorted_indices = None
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            batched = True
            B = int(batch_sizes[0]) if batch_sizes.numel() else 0
        else:
            if input.dim() not in (2, 3):
                raise ValueError(self._dim_error(input.dim()))
            batched = input.dim() == 3
            if not batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
            B = input.size(0 if self.batch_first else 1)
        _check_float(name, input)
        with _no_autocast(input):  # once a call: a parametrized weight is computed here, and only here
            weights = self._weights()
        w0 = weights[0][0]
        amp = _autocast_for(input.device.type, w0.dtype)
        if amp is not None:
            # the dtype torch.nn returns the outputs in that do not take the autocast dtype (see the top):
            # the given state's, else the input's
            high = input.dtype
            input = input.to(w0.dtype)

        if hx is None:
            states = self._zeros_state(input, B)
        else:
            states = self._hx_tuple(hx, batched)
            if amp is not None:
                high = states[0].dtype
                states = tuple(_to_float(s, w0.dtype) for s in states)
            if any(s.dim() != 2 + batched for s in states):
                raise RuntimeError(self._hx_dim_error(batched, states))
            if not batched:
                states = tuple(s.unsqueeze(1) for s in states)
            if sorted_indices is not None:
                states = tuple(s.index_select(1, sorted_indices) for s in states)
        self.check_forward_args(input, self._hx_out(states), batch_sizes)
        _check_device(name, input, w0)
        _check_state_like(name, states, input)
        T = batch_sizes.numel() if packed else input.size(1 if self.batch_first else 0)
        if T == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        lengths, index = _packed_layout(batch_sizes, input.device) if packed else (None, None)
        x = input if packed else self._time_major(input)
        if backend is None:
            features = self._features() | ({"varlen"} if packed else set())
            backend = dispatch.choose(self._family, input.device.type, input.dtype, tuple(sorted(features)),
                                      self.backend, "seq", policy.shape_class(
                                          "seq", self._training_class(input, states, "weight_ih_l0"), B, T,
                                          self.hidden_size, self.bidirectional),
                                      amp is not None or not ops.can_skip_ops())
        if backend == "torch":
            return self._torch_forward(*given)

        with torch.autocast(input.device.type, enabled=False) if amp is not None else _NO_CONTEXT:
            y, states = rnn_layers(self._family, x, states, self._call_weights(weights, T, B, w0), self._options(),
                                   num_layers=self.num_layers, num_directions=2 if self.bidirectional else 1,
                                   dropout=float(self.dropout), training=self.training, lengths=lengths,
                                   index=index, steps=T, backend=backend)
        if amp is not None:
            low = self._autocast_low(packed)
            y, states = y.to(amp if low[0] else high), tuple(s.to(amp if k else high) for s, k in zip(states, low[1:]))
        if not packed:
            return self._caller_layout(y, states, batched)
        if unsorted_indices is not None:
            states = tuple(s.index_select(1, unsorted_indices) for s in states)
        return PackedSequence(y, batch_sizes, sorted_indices, unsorted_indices), self._hx_out(states)


# the number of mask arguments of each family's op (recurrent dropout, zoneout), and of its recurrent
# layer-norm tensors
_N_MASKS = {"lstm": 3, "gru": 2, "rnn": 0}
_N_LN = {"lstm": 3, "gru": 1, "rnn": 0}


def _drop_mask(shape, device, p):
    """(keep, scale) for a dropout of probability ``p`` over a tensor of ``shape`` on ``device``: a bool mask
    and the scale of the kept elements. Each element takes 16 random bits, four from one 64-bit draw
    (``torch.randint(-2**63, 2**63 - 1, (ceil(n/4),), dtype=torch.int64)`` viewed as int16), and is dropped
    when they fall below ``c - 32768``, with ``c = min(round(p * 65536), 65535)``: p at a resolution of
    2^-16, and scale = 65536 / (65536 - c) keeps the expectation exact. (torch's ``bernoulli_`` draws once
    per element: 10 ns an element here, 4 ms of a 6 ms LSTM training call at B1 H256; benchmarks/NOTES.md.)"""
    n = math.prod(shape)
    bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    c = min(round(p * 65536), 65535)
    keep = bits.view(torch.int16)[:n].view(shape) >= c - 32768
    return keep, 65536 / (65536 - c)


def _check_probability(name, p):
    """A dropout probability: a number in [0, 1) (torch's dropout message and error type)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Number) or not 0 <= p < 1:
        raise ValueError(f"{name} should be a number in range [0, 1) representing the probability of an element "
                         f"being zeroed, got {p!r}")
    return float(p)


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be a bool, got {type(value).__name__}")
    return value


class _VariantMixin:
    """The LSTM variants torch lacks, as constructor options of LSTM and LSTMCell.

    ``peephole=True``: the input and forget gates also see c_{t-1}, the output gate sees c_t, through
    per-unit weights ``weight_ch`` (LSTMCell) or ``weight_ch_l{k}[_reverse]`` (LSTM), shape
    (3, hidden_size), rows for the i, f, o gates (with coupled gates the f row is unused).
    ``coupled_gates=True``: f = 1 - i, so there is no forget block: the gate blocks are (i, g, o) and
    every input/recurrent weight and bias has 3 * hidden_size rows. The math: fastrnn.backends.
    New and resized parameters are initialized like torch's others, U(-1/sqrt(H), 1/sqrt(H)); a module
    with neither option keeps torch's exact parameters, initialization and state_dict.
    """

    peephole = False  # class defaults: also what a module pickled before these options had
    coupled_gates = False

    def _setup_variants(self, peephole, coupled_gates, weight_groups):
        self.peephole = _check_flag("peephole", peephole)
        self.coupled_gates = _check_flag("coupled_gates", coupled_gates)
        if not (peephole or coupled_gates):
            return
        ref = self.weight_hh_l0 if hasattr(self, "weight_hh_l0") else self.weight_hh
        new = []
        for names, suffix in weight_groups:
            if coupled_gates:  # 3 gate blocks instead of 4
                for n in names:
                    if n.startswith(("weight_ih", "weight_hh", "bias_ih", "bias_hh")):
                        old = getattr(self, n)
                        setattr(self, n, nn.Parameter(old.new_empty(3 * self.hidden_size, *old.shape[1:])))
                        new.append(getattr(self, n))
            if peephole:
                name = "weight_ch" + suffix
                self.register_parameter(name, nn.Parameter(ref.new_empty(3, self.hidden_size)))
                names.append(name)
                new.append(getattr(self, name))
        stdv = 1.0 / self.hidden_size ** 0.5 if self.hidden_size > 0 else 0
        with torch.no_grad():
            for p in new:
                p.uniform_(-stdv, stdv)

    def _variant_features(self):
        return {f for f, on in (("peephole", self.peephole), ("coupled", self.coupled_gates)) if on}

    def extra_repr(self):
        return super().extra_repr() + "".join(f", {n}=True" for n in ("peephole", "coupled_gates") if getattr(self, n))


_VARIANT_DOC = "\n    fastrnn adds ``peephole`` and ``coupled_gates`` (keyword-only): see ``_VariantMixin``.\n"

_CELL_OPTIONS_DOC = r"""
    fastrnn adds the cell options (keyword-only, off by default; with none of them the module is torch's):

    ``layer_norm=True`` (Ba et al. 2016, the supplement's LSTM): with LN(v; a, b) = a * (v - mean(v)) /
    sqrt(var(v) + 1e-5) + b over the G*H gate values of a row (biased variance, as nn.LayerNorm),

    - LSTM: ``gates = LN(x W_ih^T; g_ih) + b_ih + LN(h_{t-1} W_hh^T; g_hh) + b_hh``; i, f, g, o from them as
      usual (peephole and coupled gates too); ``c_t = f*c_{t-1} + i*g`` carried un-normalized;
      ``h_t = o * tanh(LN(c_t; g_c, b_c))`` over the H units (then ``W_hr`` with proj_size).
    - GRU: ``gx = LN(x W_ih^T; g_ih) + b_ih``, ``gh = LN(h_{t-1} W_hh^T; g_hh) + b_hh``, then torch's GRU:
      ``r = sigma(gx_r + gh_r)``, ``z = sigma(gx_z + gh_z)``, ``n = tanh(gx_n + r*gh_n)``,
      ``h_t = (1-z)*n + z*h_{t-1}``.

    Parameters (per layer-direction, torch's suffixes ``_l{k}[_reverse]``; none for a cell):
    ``layer_norm_weight_ih``, ``layer_norm_weight_hh`` (G*hidden_size,) = g_ih, g_hh, init 1; LSTM also
    ``layer_norm_weight_c``, ``layer_norm_bias_c`` (hidden_size,) = g_c, b_c, init 1 and 0.

    ``zoneout=p`` (LSTM: also ``(p_h, p_c)``): with (h~, c~) the cell's new state, in training
    ``h_t = m*h_{t-1} + (1-m)*h~`` with m a 0/1 mask per element and step, 1 with probability p (c_t the
    same with its own mask and p_c); in eval the expectation ``h_t = p*h_{t-1} + (1-p)*h~``. The output
    of a step is its h_t. Padded steps of a packed row change nothing.

    ``recurrent_dropout=p`` (LSTM, GRU; not the cells): in training, ``h_{t-1}`` enters the recurrent
    product as ``h_{t-1} * d`` with d a mask of 0 and 1/(1-p), one per sequence row for the whole sequence
    and layer-direction (Gal and Ghahramani's variational dropout); off in eval. The GRU's ``z*h_{t-1}``
    term and the zoneout of the state see the undropped h.

    ``weight_dropout=p`` (all classes): DropConnect on W_hh, see ``_BackendMixin._drop_recurrent``.

    The masks come from torch's RNG on the module's device (``torch.manual_seed`` reproduces a run; every
    backend sees the same masks).
"""


def _layer_groups(module):
    """(the parameter names of each layer-direction of a sequence module, in torch's ``_all_weights``
    (lists that the variants' setup appends to), and its suffix ``_l{k}[_reverse]``)."""
    D = 2 if module.bidirectional else 1
    return [(module._all_weights[k], f"_l{k // D}{'_reverse' if k % D else ''}")
            for k in range(module.num_layers * D)]


class LSTM(_VariantMixin, _SeqMixin, nn.LSTM):
    __doc__ = (nn.LSTM.__doc__ or "") + _VARIANT_DOC + _CELL_OPTIONS_DOC
    _family = "lstm"
    _n_state = 2

    def __init__(self, *args, peephole: bool = False, coupled_gates: bool = False, layer_norm: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        groups = _layer_groups(self)
        self._setup_variants(peephole, coupled_gates, groups)
        self._setup_layer_norm(_check_flag("layer_norm", layer_norm), groups)
        if peephole or layer_norm:  # the new names join the ones torch's RNNBase keeps in step with the parameters
            self._flat_weights_names = [n for names in self._all_weights for n in names]
            self._init_flat_weights()

    def _hh_names(self, k, suffix):
        return (*super()._hh_names(k, suffix), f"weight_hr_l{k}{suffix}" if self.proj_size > 0 else None,
                f"weight_ch_l{k}{suffix}" if self.peephole else None)

    def _options(self):
        return (self.coupled_gates, *self._zoneout_probs())

    def _autocast_low(self, packed):
        if self.proj_size > 0:  # torch's projected LSTM (packed or not): c_n stays float32
            return (True, True, False)
        return super()._autocast_low(packed)

    def _features(self):
        return frozenset(({"proj"} if self.proj_size > 0 else set()) | self._variant_features()
                         | self._option_features())

    def _hx_tuple(self, hx, batched=True):
        # torch's forms and errors: unbatched, it takes hx[0] and hx[1] (also the rows of one tensor);
        # batched, one tensor is an IndexError from hx[1] when it has fewer than two rows, else a TypeError
        # (lstm()'s argument parsing), a tuple of one an IndexError, of three or more a RuntimeError; same
        # types, clearer words
        if isinstance(hx, torch.Tensor) and not batched:
            return (hx[0], hx[1])
        if not isinstance(hx, (tuple, list)):
            short = isinstance(hx, torch.Tensor) and (hx.dim() == 0 or hx.shape[0] < 2)
            raise (IndexError if short else TypeError)(
                f"LSTM: hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
        if len(hx) < 2:
            raise IndexError(f"LSTM: hx must be a tuple (h_0, c_0) of two tensors, got {len(hx)} items")
        if len(hx) > 2:
            raise RuntimeError(f"LSTM: lstm expects two hidden states (h_0, c_0), got {len(hx)}")
        return tuple(hx)


class GRU(_SeqMixin, nn.GRU):
    __doc__ = (nn.GRU.__doc__ or "") + _CELL_OPTIONS_DOC
    _family = "gru"

    def __init__(self, *args, layer_norm: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        layer_norm = _check_flag("layer_norm", layer_norm)
        self._setup_layer_norm(layer_norm, _layer_groups(self))
        if layer_norm:
            self._flat_weights_names = [n for names in self._all_weights for n in names]
            self._init_flat_weights()


class RNN(_SeqMixin, nn.RNN):
    __doc__ = nn.RNN.__doc__
    _family = "rnn"

    def _options(self):
        return (self.nonlinearity,)

    def _dim_error(self, d):
        return f"RNN: Expected input to be 2D or 3D, got {d}D tensor instead"


class _CellMixin(_BackendMixin):
    """forward() shared by the three cells."""

    _family: str
    _n_state = 1

    def _options(self):
        return self._zoneout_probs()

    def _plain_options(self):
        """The options the fused inference op takes (the plain cell's: none for a GRU)."""
        return ()

    def _hh(self):
        """The recurrent weights and the layer-norm tensors in op order (without the masks)."""
        return (self.weight_hh, self.bias_hh) + ((self.layer_norm_weight_hh if self.layer_norm else None,)
                                                 if self._family == "gru" else ())

    def _features(self):
        return frozenset(self._option_features())

    def _hx_dim_check(self, name, states):
        for s in states:
            if s.dim() not in (1, 2):
                raise ValueError(f"{name}: Expected hidden to be 1D or 2D, got {s.dim()}D instead")

    def forward(self, input, hx=None):
        out = self._fast_path(input, hx)  # never while a trace records (ops.can_skip_ops)
        if out is not None:
            return out
        if _exporting() and not self._variant_only():
            return super().forward(input, hx)  # as in _SeqMixin.forward
        return self._forward(input, hx)

    def _fast_path(self, input, hx):
        """The calls that need none of ``_forward``'s Python checks: a batched input (or an unbatched one
        with its state given) and a well-formed ``hx``, outside autocast, torch.compile, tracing and
        dispatch modes (``ops.can_skip_ops``), with no dropped weights or cell options. A cell call at batch
        1 is short enough that every check costs a share of it (benchmarks/NOTES.md, "The cells' fast path,
        trimmed", and twentieth session). When the automatic choice for the call's class is ``torch`` (with
        or without autograd), torch.nn's forward runs it from here, its checks and autograd included.
        Otherwise, where a gradient is needed, one call of that backend's one-step training node
        (``functional.train_step``: the plain cell's step as one autograd node; where it does not serve the
        cell, ``_forward`` on that backend), else one call of its optional ``<family>_cell_fwd``; both take
        the input projection inside, check shapes, dtypes, devices and contiguity themselves and change no
        input. Whatever does not apply or is refused returns
        None and goes to ``_forward``, which raises torch's error for it (or serves it another way)."""
        if not isinstance(input, torch.Tensor):
            return None
        dim = input.dim()
        if hx is None:
            if dim != 2:
                return None
            given = ()
        elif not self._hx_is_well_formed(hx):
            return None
        else:
            given = tuple(hx) if self._n_state == 2 else (hx,)
            for s in given:  # a loop: any() over a generator costs ~0.4 us of a ~10 us call here
                if s.dim() != dim:
                    return None  # _forward's message names it (torch.nn's names a size)
        if not ops.can_skip_ops() or _any_autocast() or self._dropping_weights() or self._cell_options():
            return None  # autocast: _forward's rules
        grad = torch.is_grad_enabled()
        training = self._training_class(input, given, "weight_ih")
        choice = self._fast_op(input, "cell", "step",
                               policy.shape_class("step", training, input.shape[0] if dim == 2 else 1))
        if choice is None:
            return None
        name, fused, _ = choice
        if name == "torch":
            self._torch_checks(input, given, "weight_ih")
            return self._torch_forward(input, hx)
        if fused is None:  # no fused cell for this backend or dtype (cast in the functional layer)
            return self._forward(input, hx, name) if grad else None
        if hx is None:  # torch's zeros, of the input's batch, dtype and device
            z = input.new_zeros(input.shape[0], self.hidden_size)
            states = (z, z) if self._n_state == 2 else (z,)
        else:
            states = given
        unbatched = dim == 1
        if unbatched:  # its states are 1-D too (checked above)
            input = input.unsqueeze(0)
            states = tuple(s.unsqueeze(0) for s in states)
        names = self._fused_weight_names()
        params = self._parameters
        try:  # the parameters straight from their dict (the attribute lookup costs ~1 us each)
            weights = [None if n is None else params[n] for n in names]
        except KeyError:  # a parametrization, or a plain tensor attribute: the general lookup
            weights = [None if n is None else getattr(self, n) for n in names]
        # the plain cell's options only (the fused ops take no zoneout: the cell options are off here)
        options = self._plain_options()
        if grad and (input.requires_grad or any(t is not None and t.requires_grad for t in (*states, *weights))):
            # a gradient follows: the backend's one-step node where it serves the cell, else the general path
            step = train_step(self._family, name, (weights[0], weights[1], tuple(weights[2:]), None), options)
            if step is None:
                return self._forward(input, hx, name)
            try:
                out = step(input, states)
            except (RuntimeError, TypeError):
                return None
            out = out if self._n_state == 2 else out[0]
        else:
            try:
                out = fused(input, *weights, *states, *options)
            except (RuntimeError, TypeError):
                return None
            if dispatch._recorders:
                dispatch.note_call(f"{self._family}_cell_fwd", name)
        if unbatched:
            out = tuple(s.squeeze(0) for s in out) if self._n_state == 2 else out.squeeze(0)
        return out

    def __getstate__(self):
        # the fast path's cached choice holds the backend and its op, which do not pickle (torch.save of
        # a whole module); it is rebuilt on the next call
        state = self.__dict__.copy()
        state.pop("_cell_choice", None)
        return state

    def _fused_weight_names(self):
        """Parameter names of the fused cell op's weight arguments, in order (None: absent)."""
        return ("weight_ih", "bias_ih", "weight_hh", "bias_hh")

    def _hx_is_well_formed(self, hx):
        return isinstance(hx, torch.Tensor)

    def _hx_states(self, name, hx, batched):
        """The state tensors given as ``hx``, as torch reads them (it raises for a wrong form)."""
        return (hx,)

    def _forward(self, input, hx, backend=None):
        """The general path: torch's argument checks, any backend, autograd. ``backend``: as in
        ``_SeqMixin._forward``."""
        name = self._torch_name()
        given = input, hx  # for the torch backend, which takes them as they came
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        states = None
        batched = input.dim() == 2
        if hx is not None:
            states = self._hx_states(name, hx, batched)
            self._hx_dim_check(name, states)
        if states is not None and any(s.dim() != input.dim() for s in states):
            raise RuntimeError(f"{name}: hidden state must be {input.dim()}D for {input.dim()}D input, got "
                               f"{', '.join(f'{s.dim()}D' for s in states)}")
        if not batched:
            input = input.unsqueeze(0)
            states = None if states is None else tuple(s.unsqueeze(0) for s in states)
        _check_float(name, input, RuntimeError)
        with _no_autocast(input):  # once a call (parametrized weights), as _SeqMixin._forward
            w_ih, b_ih, hh = self.weight_ih, self.bias_ih, self._hh()
            ln_ih = self.layer_norm_weight_ih if self.layer_norm else None
        amp = _autocast_for(input.device.type, w_ih.dtype)
        if amp is not None:  # see the top
            high = states[0].dtype if states is not None else input.dtype
            input = input.to(w_ih.dtype)
            states = None if states is None else tuple(_to_float(s, input.dtype) for s in states)
        if input.dtype != w_ih.dtype:
            raise RuntimeError(f"{name}: input dtype {str(input.dtype)} does not match weight dtype "
                               f"{str(w_ih.dtype)}")
        _check_device(name, input, w_ih)
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        B = input.size(0)
        if states is None:
            states = tuple(input.new_zeros(B, self.hidden_size) for _ in range(self._n_state))
        for k, s in enumerate(states):
            if s.size(0) != B:
                raise RuntimeError(f"Input batch size {B} doesn't match hidden{k} batch size {s.size(0)}")
            if s.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got {s.size(1)}, "
                                   f"expected {self.hidden_size}")
        _check_state_like(name, states, input, "hx")

        if backend is None:
            backend = dispatch.choose(self._family, input.device.type, input.dtype, tuple(sorted(self._features())),
                                      self.backend, "step", policy.shape_class(
                                          "step", self._training_class(input, states, "weight_ih"), B),
                                      amp is not None or not ops.can_skip_ops())
        if backend == "torch":
            return self._torch_forward(*given)
        with torch.autocast(input.device.type, enabled=False) if amp is not None else _NO_CONTEXT:
            hh = (self._drop_recurrent(hh[0]), *hh[1:])  # drawn once the arguments have passed their checks
            hh = (*hh, *self._cell_masks(None, B, w_ih, 1)[0])  # then the zoneout masks
            out = cell_step(self._family, input, states, w_ih, b_ih, hh, self._options(), backend, ln_ih)
        if amp is not None:  # see the top: torch's RNNCell in the autocast dtype, its other cells not
            out = tuple(s.to(amp if self._family == "rnn" else high) for s in out)
        if not batched:
            out = tuple(s.squeeze(0) for s in out)
        return out if self._n_state == 2 else out[0]


class LSTMCell(_VariantMixin, _CellMixin, nn.LSTMCell):
    __doc__ = (nn.LSTMCell.__doc__ or "") + _VARIANT_DOC + _CELL_OPTIONS_DOC
    _family = "lstm"
    _n_state = 2

    def __init__(self, *args, peephole: bool = False, coupled_gates: bool = False, layer_norm: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        self._setup_variants(peephole, coupled_gates, [(names, "")])
        self._setup_layer_norm(_check_flag("layer_norm", layer_norm), [(names, "")])

    def _hh(self):
        ln = ((self.layer_norm_weight_hh, self.layer_norm_weight_c, self.layer_norm_bias_c) if self.layer_norm
              else (None, None, None))
        return (self.weight_hh, self.bias_hh, None, self.weight_ch if self.peephole else None, *ln)

    def _fused_weight_names(self):
        return ("weight_ih", "bias_ih", "weight_hh", "bias_hh", None, "weight_ch" if self.peephole else None)

    def _hx_is_well_formed(self, hx):
        return (isinstance(hx, (tuple, list)) and len(hx) == 2 and isinstance(hx[0], torch.Tensor)
                and isinstance(hx[1], torch.Tensor))

    def _hx_states(self, name, hx, batched):
        # as torch: unbatched, it takes hx[0] and hx[1] (of a tuple, or the rows of one tensor); batched,
        # a TypeError from lstm_cell's argument parsing, or a RuntimeError for another count than two
        if not batched:
            return (hx[0], hx[1])
        if not isinstance(hx, (tuple, list)):
            raise TypeError(f"{name}: hx must be a tuple of Tensors (h_0, c_0), not {type(hx).__name__}")
        if len(hx) != 2:
            raise RuntimeError(f"{name}: lstm_cell expects two hidden states (h_0, c_0), got {len(hx)}")
        return tuple(hx)

    def _options(self):
        return (self.coupled_gates, *self._zoneout_probs())

    def _plain_options(self):
        return (self.coupled_gates,)

    def _features(self):
        return frozenset(self._variant_features() | self._option_features())

    def _hx_dim_check(self, name, states):
        for k, s in enumerate(states):
            if s.dim() not in (1, 2):
                raise ValueError(f"{name}: Expected hx[{k}] to be 1D or 2D, got {s.dim()}D instead")


class GRUCell(_CellMixin, nn.GRUCell):
    __doc__ = (nn.GRUCell.__doc__ or "") + _CELL_OPTIONS_DOC
    _family = "gru"

    def __init__(self, *args, layer_norm: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_layer_norm(_check_flag("layer_norm", layer_norm), [([], "")])


class RNNCell(_CellMixin, nn.RNNCell):
    __doc__ = nn.RNNCell.__doc__
    _family = "rnn"

    def _options(self):
        return (self.nonlinearity,)

    def _plain_options(self):
        return (self.nonlinearity,)
