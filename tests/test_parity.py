"""Every module class on every available backend against torch.nn holding the same state_dict:
outputs, final states, and the gradients of input, hx and every parameter."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fastrnn
from conftest import COVER_BACKENDS, CPU_BACKENDS, GRID_BACKENDS, TOL, assert_close, backends_used, pairwise

I, H, P, T, B = 5, 7, 3, 6, 4
RAGGED = (3, 6, 1, 4)  # unsorted, one of length 1

CLASSES = {"LSTM": (fastrnn.LSTM, torch.nn.LSTM), "GRU": (fastrnn.GRU, torch.nn.GRU),
           "RNN_tanh": (fastrnn.RNN, torch.nn.RNN), "RNN_relu": (fastrnn.RNN, torch.nn.RNN)}


def _grid():
    for name in CLASSES:
        for layers, bidir, bf, bias, proj, hx, kind, dtype in itertools.product(
                (1, 2), (False, True), (False, True), (True, False), (0, P), (False, True),
                ("batched", "unbatched", "packed"), (torch.float32, torch.float64)):
            if proj and name != "LSTM":
                continue
            dt = "f32" if dtype == torch.float32 else "f64"
            ident = f"{name}-L{layers}-{'bi' if bidir else 'uni'}-{'bf' if bf else 'tm'}-" \
                    f"{'bias' if bias else 'nobias'}-proj{proj}-{'hx' if hx else 'nohx'}-{kind}-{dt}"
            yield pytest.param(name, layers, bidir, bf, bias, proj, hx, kind, dtype, id=ident)


def _kwargs(name, layers, bidir, bf, bias, proj, hidden=H):
    kw = dict(input_size=I, hidden_size=hidden, num_layers=layers, bidirectional=bidir, batch_first=bf, bias=bias)
    if name == "LSTM":
        kw["proj_size"] = proj
    if name.startswith("RNN"):
        kw["nonlinearity"] = name.split("_")[1]
    return kw


def _loss(out, state, weights):
    data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    parts = [data] + (list(state) if isinstance(state, tuple) else [state])
    return sum((p * w).sum() for p, w in zip(parts, weights))


def compare_module(name, kw, backend, dtype, kind, hx_given, steps=T, batch=B):
    T, B, H = steps, batch, kw["hidden_size"]
    fcls, tcls = CLASSES[name]
    torch.manual_seed(0)
    ref = tcls(**kw, dtype=dtype)
    with torch.no_grad():  # no zero biases: b_hn in particular must matter
        for pname, p in ref.named_parameters():
            if "bias" in pname:
                p.uniform_(-0.5, 0.5)
    mod = fcls(**kw, dtype=dtype, backend=backend)
    mod.load_state_dict(ref.state_dict())
    D = 2 if kw["bidirectional"] else 1
    L = kw["num_layers"]
    Pout = kw.get("proj_size") or H
    bf = kw["batch_first"]

    if kind == "packed":
        seqs = [torch.randn(n, I, dtype=dtype) for n in RAGGED]
        x_ref = pack_sequence(seqs, enforce_sorted=False)
        x_mod = pack_sequence(seqs, enforce_sorted=False)
        xdata_r = x_ref.data.detach().clone().requires_grad_()
        xdata_m = xdata_r.detach().clone().requires_grad_()
        x_ref = x_ref._replace(data=xdata_r)
        x_mod = x_mod._replace(data=xdata_m)
        leaves = [xdata_r, xdata_m]
        nb = len(RAGGED)
    else:
        shape = (T, I) if kind == "unbatched" else ((B, T, I) if bf else (T, B, I))
        xr = torch.randn(*shape, dtype=dtype, requires_grad=True)
        xm = xr.detach().clone().requires_grad_()
        x_ref, x_mod, leaves = xr, xm, [xr, xm]
        nb = B

    hx_ref = hx_mod = None
    hx_leaves = []
    if hx_given:
        hshape = (L * D, Pout) if kind == "unbatched" else (L * D, nb, Pout)
        cshape = hshape[:-1] + (H,)
        shapes = [hshape, cshape] if name == "LSTM" else [hshape]
        hr = [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]
        hm = [h.detach().clone().requires_grad_() for h in hr]
        hx_leaves = list(zip(hr, hm))
        hx_ref = tuple(hr) if name == "LSTM" else hr[0]
        hx_mod = tuple(hm) if name == "LSTM" else hm[0]

    out_r, st_r = ref(x_ref, hx_ref)
    out_m, st_m = mod(x_mod, hx_mod)
    tol = TOL[dtype]
    if isinstance(out_r, torch.nn.utils.rnn.PackedSequence):
        assert isinstance(out_m, torch.nn.utils.rnn.PackedSequence)
        assert torch.equal(out_m.batch_sizes, out_r.batch_sizes)
        assert torch.equal(out_m.unsorted_indices, out_r.unsorted_indices)
        assert_close(out_m.data, out_r.data, tol["out"], "output")
    else:
        assert out_m.shape == out_r.shape
        assert_close(out_m, out_r, tol["out"], "output")
    st_r_t = st_r if isinstance(st_r, tuple) else (st_r,)
    st_m_t = st_m if isinstance(st_m, tuple) else (st_m,)
    assert len(st_m_t) == len(st_r_t)
    for k, (a, b) in enumerate(zip(st_m_t, st_r_t)):
        assert a.shape == b.shape
        assert_close(a, b, tol["out"], f"final state {k}")

    g = torch.Generator().manual_seed(1)
    out_shape = (out_r.data if kind == "packed" else out_r).shape
    weights = [torch.randn(out_shape, generator=g, dtype=dtype)] + \
              [torch.randn(s.shape, generator=g, dtype=dtype) for s in st_r_t]
    _loss(out_r, st_r, weights).backward()
    _loss(out_m, st_m, weights).backward()
    assert_close(leaves[1].grad, leaves[0].grad, tol["grad"], "grad input")
    for k, (a, b) in enumerate(hx_leaves):
        assert_close(b.grad, a.grad, tol["grad"], f"grad hx[{k}]")
    for (pn, pr), (_, pm) in zip(ref.named_parameters(), mod.named_parameters()):
        assert_close(pm.grad, pr.grad, tol["grad"], f"grad {pn}")


@pytest.mark.parametrize("backend", GRID_BACKENDS)
@pytest.mark.parametrize("name,layers,bidir,bf,bias,proj,hx,kind,dtype", list(_grid()))
def test_module_parity(backend, name, layers, bidir, bf, bias, proj, hx, kind, dtype, ran):
    compare_module(name, _kwargs(name, layers, bidir, bf, bias, proj), backend, dtype, kind, hx)
    assert backends_used(ran) == {backend}
    assert {op.split("_", 1)[1] for op, _ in ran} == {"seq_fwd", "seq_bwd"}


def _cover():
    """The grid's pairwise cover per class, crossed with the triton forward path (sequence kernel or steps)."""
    for name in CLASSES:
        cases = [pytest.param(*p.values, path, id=f"{p.id}-{path}") for p in _grid() if p.values[0] == name
                 for path in ("seqkernel", "steps")]
        yield from pairwise(cases, key=lambda p: p.values[1:])


@pytest.mark.parametrize("backend", COVER_BACKENDS)
@pytest.mark.parametrize("name,layers,bidir,bf,bias,proj,hx,kind,dtype,path", list(_cover()))
def test_module_parity_cover(backend, name, layers, bidir, bf, bias, proj, hx, kind, dtype, path, ran, monkeypatch):
    """The grid above on the interpreted triton backend (see conftest.pairwise), on both forward paths."""
    if path == "steps":
        monkeypatch.setattr("fastrnn.backends.triton.SEQ_MAX_H", 0)
    test_module_parity(backend, name, layers, bidir, bf, bias, proj, hx, kind, dtype, ran)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("T_,B_,H_", [(1, 1, 1), (2, 3, 20), (63, 3, 100)])
def test_odd_sizes(backend, name, T_, B_, H_, ran):
    """Odd shapes from DESIGN.md: T in {1, 2, 63}, B in {1, 3}, H in {1, 20, 100}."""
    if backend in COVER_BACKENDS and T_ == 63:
        pytest.skip("63 steps at H=100 take minutes in Triton's interpreter (FASTRNN_TRITON_FULL_GRID=1 runs it); "
                    "test_triton.py's multiblock cases cover several unit and reduction blocks")
    kw = _kwargs(name, 1, True, False, True, 0, hidden=H_)
    compare_module(name, kw, backend, torch.float64, "batched", True, steps=T_, batch=B_)
    assert backends_used(ran) == {backend}
