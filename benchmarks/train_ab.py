"""One change to the training path, on and off, against torch.nn, in one process:

    python -m benchmarks.train_ab --variant copy|bwd_op|weight_dropout|seq_form|packed_rows|row_kernels|
        panel_mm|team_min|grad_y|mm_min|at_in_place|proj_groups [--budget S] [--backend cpp]

For the training cases of ``make bench`` (T100: B1 H256, B16 H256, B64 H512; LSTM, GRU, RNN; forward and
backward of one call) three providers are timed in interleaved rounds: torch.nn, the backend as it is
("on"), and the backend with the variant switched ("off"):

- ``copy``: the copy of the sequence op's output that ``rnn_layers`` hands out (``functional._fresh_output``),
  off = no copy (benchmarks/NOTES.md, "In-place ops on the output");
- ``bwd_op``: a first-order backward calling the backward op's implementation directly (``ops.DIRECT``), off =
  through the op and its Python autograd layer, which double backward added;
- ``weight_dropout``: on = ``weight_dropout=0.3`` (a mask over each W_hh per call), off = the plain module
  (NOTES, "Weight dropout"; issue 18's target: on / off <= 1.2);
- ``seq_form``: the decoding cases (T50: B16 H256, B1 H64; a module called on one step at a time, one
  backward), each one-step call's node in its sequence form as it is, off = in its cell form between a
  select of the layer's input and of each state, an unsqueeze of the output and a stack of the final states
  (``_cell_form_layers``, the one-step path before the sequence form: NOTES, twenty-second session);
- ``packed_rows``: the packed cases (T100 B16 H256 with the benchmark's ragged lengths, one layer and two
  bidirectional), the sequence ops on the PackedSequence's rows as they are, off = on [T,B,*] copies of xw
  and y (the backend's ``packed_rows`` switched off: NOTES, twenty-third session);
- ``row_kernels`` (numba): inference at 1-2 rows (T100: B1 H64, B1 H256, B2 H128), every gate's panel in one
  call below 4 rows as it is, off = ``mm_nt`` below 4 rows (PANEL_MIN_ROWS 4: NOTES, thirty-first session);
- ``panel_mm`` (numba): training at fewer than 512 rows (T100: B1 H256, B2 H256, B1 H512), the products on the
  panels as they are (``numba._mm``, and the projection through it from ``mm_min_macs``), off = torch's product
  below 512 rows and the projection by ``F.linear`` below 1 MiB (NOTES, thirty-second session);
- ``team_min`` (numba): inference at batch 1-2 (T100: B1 H64, B2 H64, B1 H128), the teams from TEAM_MIN_MACS
  as it is, off = from 2^13 (NOTES, thirty-second session);
- ``grad_y`` (cpp): training (T100: B1 H256, B16 H256, B16 H256 two bidirectional layers), the backward reading
  grad_y with its strides (``strided_grad_y``) and the projection's node without ``setup_context``
  (``functional._ProjectionEager``) as they are, off = grad_y made contiguous first and ``_Projection`` (NOTES,
  thirty-third session);
- ``mm_min``: training at batch 1-2 (T100: B1 H128, B1 H256, B2 H256), the projection through the backend's
  ``mm`` from ``mm_min_macs`` as it is, off = from 2^24 (NOTES, thirty-third session);
- ``at_in_place`` (cpp): training (T100: B16 H256, B16 H200, B64 H64; LSTM B16 H256 P128, whose d W_hh has 128
  columns and rows 4 KiB apart), the weight gradients' A^T read in place
  where the rule says (gemm.cpp, ``at_in_place``) as it is, off = its slivers always packed (NOTES,
  thirty-fourth session);
- ``proj_groups`` (cpp): inference (T100: B16 H256, B16 H200, B32 H256; LSTM B16 H256 P128), split by batch rows,
  the fused input projection of a block of steps as one product over the worker's rows of every step
  (recurrence.h, ``gemm_groups``) as it is, off = one product a step (NOTES, thirty-fifth session); LSTM B16
  H256 and B32 H256 split by units (1 MiB of W_hh), the control.
"""
from __future__ import annotations

import argparse
from unittest import mock

import torch

import fastrnn
from fastrnn import dispatch, functional, modules, ops

from .cases import Case
from .harness import medians_ms
from .providers import Workload


def _switched(run, patch):
    """``run`` with ``patch`` (a unittest.mock patcher) applied around each call."""
    def fn():
        with patch:
            run()
    return fn


class _Mode:
    """A C++ switch of the cpp backend (a ``set_...`` binding returning the old value) as a re-entrant context."""

    def __init__(self, setter, value):
        self.setter, self.value = setter, value

    def __enter__(self):
        self.old = self.setter(self.value)

    def __exit__(self, *exc):
        self.setter(self.old)


def _cell_form_layers(family, x, state0, weights, options, *, num_layers, num_directions, dropout, training,
                      backend):
    """``functional.one_step_layers`` with each node in its cell form: the layer's input and each state
    selected ([B, *]), the output unsqueezed and the final states stacked, each a recorded node."""
    if not functional._needs_grad(x, *state0, *(t for w in weights for t in (w[0], w[1], *w[2]))):
        return None
    steps = [functional.train_step(family, backend, w, options) for w in weights]
    if None in steps:
        return None
    layer_input = x[0]
    finals = [[] for _ in state0]
    for layer in range(num_layers):
        outs = []
        for d in range(num_directions):
            k = layer * num_directions + d
            res = steps[k](layer_input, [s[k] for s in state0])
            outs.append(res[0])
            for acc, st in zip(finals, res):
                acc.append(st)
        layer_input = outs[0] if num_directions == 1 else torch.cat(outs, 1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = torch.nn.functional.dropout(layer_input, dropout, training=True)
    return layer_input.unsqueeze(0), tuple(torch.stack(acc) for acc in finals)


def providers(variant, w, cell, backend):
    """(on, off) callables for one workload."""
    run = w.call(backend)
    if variant == "copy":
        return run, _switched(run, mock.patch.object(functional, "_fresh_output", lambda y: y))
    if variant == "bwd_op":
        name = f"{cell.lower()}_seq_bwd"
        return run, _switched(run, mock.patch.dict(ops.DIRECT, {name: getattr(torch.ops.fastrnn, name).default}))
    if variant == "seq_form":  # the modules' fast path calls one_step_layers by this name
        return run, _switched(run, mock.patch.object(modules, "one_step_layers", _cell_form_layers))
    if variant == "packed_rows":
        return run, _switched(run, mock.patch.object(type(dispatch.get(backend)), "packed_rows", False))
    if variant == "at_in_place":  # the cpp product's A^T read in place (gemm.cpp, at_in_place)
        from fastrnn.backends import cpp
        return _switched(run, _Mode(cpp._C.set_at_pack, -1)), _switched(run, _Mode(cpp._C.set_at_pack, 1))
    if variant == "proj_groups":  # the row split's fused projection a block of steps at once (gemm_groups)
        from fastrnn.backends import cpp
        return _switched(run, _Mode(cpp._C.set_proj_groups, 1)), _switched(run, _Mode(cpp._C.set_proj_groups, 0))
    if variant in ("row_kernels", "panel_mm", "team_min", "grad_y", "mm_min"):
        from fastrnn.backends import _common
        from fastrnn.backends import numba as nb
        be = type(dispatch.get(backend))
        target, off = {"row_kernels": (nb, dict(PANEL_MIN_ROWS=4)),
                       "panel_mm": (nb.NumbaBackend, dict(mm=staticmethod(_common.dnn_mm), mm_min_macs=None)),
                       "team_min": (nb, dict(TEAM_MIN_MACS=1 << 13)),
                       "grad_y": (be, dict(strided_grad_y=False)),
                       "mm_min": (be, dict(mm_min_macs=1 << 24))}[variant]
        if variant == "grad_y":  # and the projection's node in its setup_context form
            proj = mock.patch.object(functional, "_ProjectionEager", functional._ProjectionEager)
            proj_off = mock.patch.object(functional, "_ProjectionEager", functional._Projection)
            now = {k: target.__dict__[k] for k in off}
            return (_switched(_switched(run, proj), mock.patch.multiple(target, **now)),
                    _switched(_switched(run, proj_off), mock.patch.multiple(target, **off)))
        # "on" through the same patching, of the values as they are: a patch's enter and exit cost microseconds,
        # a share of a batch-1 inference call
        now = {k: target.__dict__[k] for k in off}
        return (_switched(run, mock.patch.multiple(target, **now)),
                _switched(run, mock.patch.multiple(target, **off)))
    plain = w.modules[backend]
    dropped = getattr(fastrnn, cell)(plain.input_size, plain.hidden_size, backend=backend, weight_dropout=0.3)
    dropped.load_state_dict(plain.state_dict())
    w.modules["dropped"] = dropped
    return w.call("dropped"), run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["copy", "bwd_op", "weight_dropout", "seq_form", "packed_rows",
                                              "row_kernels", "panel_mm", "team_min", "grad_y", "mm_min",
                                              "at_in_place", "proj_groups"],
                    required=True)
    ap.add_argument("--budget", type=float, default=2.0, help="measured seconds per case")
    ap.add_argument("--backend", default="cpp")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastrnn {fastrnn.__version__}; "
          f"{args.variant} on / off on {args.backend}; ms per call (median), x = torch's / this")
    mode, T, shapes = {"seq_form": ("decoding", 50, ((16, 256, {}), (1, 64, {}))),
                       "packed_rows": ("training", 100, ((16, 256, dict(packed=True)),
                                                         (16, 256, dict(packed=True, layers=2, bidirectional=True)))),
                       "row_kernels": ("inference", 100, ((1, 64, {}), (1, 256, {}), (2, 128, {}))),
                       "panel_mm": ("training", 100, ((1, 256, {}), (2, 256, {}), (1, 512, {}))),
                       "team_min": ("inference", 100, ((1, 64, {}), (2, 64, {}), (1, 128, {}))),
                       "grad_y": ("training", 100, ((1, 256, {}), (16, 256, {}),
                                                    (16, 256, dict(layers=2, bidirectional=True)))),
                       "mm_min": ("training", 100, ((1, 128, {}), (1, 256, {}), (2, 256, {}))),
                       "at_in_place": ("training", 100, ((16, 256, {}), (16, 200, {}), (64, 64, {}),
                                                         (16, 256, dict(proj=128)))),
                       "proj_groups": ("inference", 100, ((16, 256, {}), (16, 200, {}), (32, 256, {}),
                                                          (16, 256, dict(proj=128))))
                       }.get(args.variant, ("training", 100, ((1, 256, {}), (16, 256, {}), (64, 512, {}))))
    for cell in ("LSTM", "GRU", "RNN"):
        for B, H, kw in shapes:
            if kw.get("proj") and cell != "LSTM":  # proj_size is the LSTM's alone
                continue
            case = Case(cell, mode, T, B, H, **kw)
            w = Workload(case, ["torch", args.backend])
            on, off = providers(args.variant, w, cell, args.backend)
            med = medians_ms({"torch": w.call("torch"), "on": on, "off": off}, budget_s=args.budget)
            print(f"{cell} {mode} {case.shape}: torch {med['torch']:.2f}, on {med['on']:.2f} ({med['torch'] / med['on']:.2f}x), "
                  f"off {med['off']:.2f} ({med['torch'] / med['off']:.2f}x); on / off {med['on'] / med['off']:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
