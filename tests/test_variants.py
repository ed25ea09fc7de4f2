"""The LSTM variants (issue 7): peephole connections and the coupled input-forget gate, as options of
fastrnn.LSTM and fastrnn.LSTMCell. The reference backend is checked against an independent per-step
formula written here; every other CPU backend is checked against the reference."""

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fastrnn
from conftest import CPU_BACKENDS, TOL, assert_close, backends_used, module_gradcheck

I, H, P, T, B = 5, 7, 3, 6, 4
VARIANTS = [dict(peephole=True), dict(coupled_gates=True), dict(peephole=True, coupled_gates=True)]
VIDS = ["peephole", "coupled", "both"]


def _module(variant, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = fastrnn.LSTM(I, H, dtype=dtype, **variant, **kw)
    with torch.no_grad():  # biases and peephole weights large enough to matter
        for name, p in m.named_parameters():
            if "bias" in name or "weight_ch" in name:
                p.uniform_(-0.5, 0.5)
    return m


def _truth(m, x, h0, c0):
    """The variants' math step by step in float64, from the parameters (independent of fastrnn's code)."""
    D = 2 if m.bidirectional else 1
    sig = torch.sigmoid
    inp, hs, cs = x, [], []
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            p = {n: getattr(m, n + sfx, None) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr",
                                                          "weight_ch")}
            h, c = h0[layer * D + d], c0[layer * D + d]
            ys = [None] * inp.shape[0]
            order = range(inp.shape[0] - 1, -1, -1) if d else range(inp.shape[0])
            for t in order:
                g = inp[t] @ p["weight_ih"].T + h @ p["weight_hh"].T
                if m.bias:
                    g = g + p["bias_ih"] + p["bias_hh"]
                if m.coupled_gates:
                    gi, gg, go = g.split(H, 1)
                else:
                    gi, gf, gg, go = g.split(H, 1)
                if m.peephole:
                    gi = gi + p["weight_ch"][0] * c
                    i = sig(gi)
                    f = 1 - i if m.coupled_gates else sig(gf + p["weight_ch"][1] * c)
                else:
                    i = sig(gi)
                    f = 1 - i if m.coupled_gates else sig(gf)
                c = f * c + i * torch.tanh(gg)
                o = sig(go + p["weight_ch"][2] * c) if m.peephole else sig(go)
                h = o * torch.tanh(c)
                if p["weight_hr"] is not None:
                    h = h @ p["weight_hr"].T
                ys[t] = h
            outs.append(torch.stack(ys))
            hs.append(h)
            cs.append(c)
        inp = torch.cat(outs, 2)
    return inp, torch.stack(hs), torch.stack(cs)


@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("proj", [0, P])
def test_reference_equals_independent_formula(variant, proj, ran):
    m = _module(variant, num_layers=2, bidirectional=True, proj_size=proj, backend="reference")
    Pout = proj or H
    x, h0, c0 = torch.randn(T, B, I, dtype=torch.float64), torch.randn(4, B, Pout, dtype=torch.float64), \
        torch.randn(4, B, H, dtype=torch.float64)
    y, (h, c) = m(x, (h0, c0))
    with torch.no_grad():
        ty, th, tc = _truth(m, x, h0, c0)
    for a, b, what in ((y, ty, "y"), (h, th, "h_n"), (c, tc, "c_n")):
        assert_close(a, b, 1e-12, what)
    assert backends_used(ran) == {"reference"}


def _run(m, kind, dtype, x, h0, c0):
    if kind == "packed":
        seqs = [x[:n, k] for k, n in enumerate((3, 6, 1, 4))]
        y, (h, c) = m(pack_sequence(seqs, enforce_sorted=False), (h0, c0))
        y = y.data
    elif kind == "unbatched":
        y, (h, c) = m(x[:, 0], (h0[:, 0], c0[:, 0]))
    else:
        y, (h, c) = m(x, (h0, c0))
    return y, h, c


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("proj,bidir,kind", [(0, False, "batched"), (P, True, "packed"), (0, True, "unbatched"),
                                             (P, False, "batched")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_backends_match_reference(backend, variant, proj, bidir, kind, dtype, ran):
    """Outputs, final states and every gradient (input, h0, c0, each parameter) equal the reference's."""
    results = {}
    for be in ("reference", backend):
        m = _module(variant, dtype, num_layers=2, bidirectional=bidir, proj_size=proj, backend=be)
        g = torch.Generator().manual_seed(1)
        D = 2 if bidir else 1
        x = torch.randn(T, B, I, generator=g, dtype=dtype).requires_grad_()
        h0 = torch.randn(2 * D, B, proj or H, generator=g, dtype=dtype).requires_grad_()
        c0 = torch.randn(2 * D, B, H, generator=g, dtype=dtype).requires_grad_()
        y, h, c = _run(m, kind, dtype, x, h0, c0)
        loss = y.sum() + (h * 2).sum() + (c * 3).sum()
        grads = torch.autograd.grad(loss, [x, h0, c0, *m.parameters()])
        results[be] = [y, h, c, *grads]
    tol = TOL[dtype]
    for k, (a, b) in enumerate(zip(results[backend], results["reference"])):
        assert_close(a, b, tol["out"] if k < 3 else tol["grad"], f"tensor {k}")
    assert backends_used(ran) == {"reference", backend}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
def test_gradcheck(backend, variant, ran):
    m = _module(variant, proj_size=2, backend=backend)
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    assert module_gradcheck(m, x, backend, lambda out: (out[0], *out[1]))
    assert backends_used(ran) == {backend}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_peephole_weights_equal_a_plain_lstm(backend):
    plain = _module({}, num_layers=2, backend=backend)
    peep = fastrnn.LSTM(I, H, num_layers=2, dtype=torch.float64, peephole=True, backend=backend)
    missing, unexpected = peep.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["weight_ch_l0", "weight_ch_l1"] and not unexpected
    with torch.no_grad():
        peep.weight_ch_l0.zero_()
        peep.weight_ch_l1.zero_()
    x = torch.randn(T, B, I, dtype=torch.float64)
    for a, b in zip(plain(x)[0:1] + plain(x)[1], peep(x)[0:1] + peep(x)[1]):
        # not bit-exact: the GEMMs may round differently for differently aligned buffers
        assert_close(a, b, TOL[torch.float64]["out"], "zero peephole")


def test_parameters_state_dict_and_repr():
    plain = fastrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P)
    torch_keys = list(torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P).state_dict())
    assert list(plain.state_dict()) == torch_keys  # a plain fastrnn.LSTM is torch's, key for key
    assert "peephole" not in repr(plain) and "coupled" not in repr(plain)

    both = fastrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P, peephole=True, coupled_gates=True)
    sd = both.state_dict()
    assert set(sd) == set(torch_keys) | {"weight_ch_l0", "weight_ch_l0_reverse", "weight_ch_l1", "weight_ch_l1_reverse"}
    assert sd["weight_ih_l0"].shape == (3 * H, I) and sd["weight_hh_l1_reverse"].shape == (3 * H, P)
    assert sd["bias_hh_l0"].shape == (3 * H,) and sd["weight_ch_l1"].shape == (3, H)
    bound = 1 / H ** 0.5
    assert all(p.abs().max() <= bound for p in both.parameters())  # torch's init range for every weight
    assert sd["weight_ch_l0"].std() > 0.1 * bound
    assert repr(both) == "LSTM(5, 7, proj_size=3, num_layers=2, bidirectional=True, peephole=True, coupled_gates=True)"

    again = fastrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P, peephole=True, coupled_gates=True)
    again.load_state_dict(sd)  # round trip
    for k, v in again.state_dict().items():
        assert torch.equal(v, sd[k])
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"weight_ch_l0\""):
        fastrnn.LSTM(I, H, peephole=True).load_state_dict(fastrnn.LSTM(I, H).state_dict())
    with pytest.raises(RuntimeError, match=r"size mismatch for weight_ih_l0"):
        fastrnn.LSTM(I, H, coupled_gates=True).load_state_dict(fastrnn.LSTM(I, H).state_dict())
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"weight_ch\""):
        fastrnn.LSTMCell(I, H).load_state_dict(fastrnn.LSTMCell(I, H, peephole=True).state_dict())


@pytest.mark.parametrize("bad", [dict(peephole=1), dict(coupled_gates="yes"), dict(peephole=None)])
def test_options_must_be_bools(bad):
    with pytest.raises(TypeError, match=r"(peephole|coupled_gates) should be a bool, got"):
        fastrnn.LSTM(I, H, **bad)
    with pytest.raises(TypeError, match=r"(peephole|coupled_gates) should be a bool, got"):
        fastrnn.LSTMCell(I, H, **bad)


def test_other_modules_do_not_take_the_options():
    with pytest.raises(TypeError):
        fastrnn.GRU(I, H, peephole=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cell_equals_one_layer_step_by_step(backend, variant, dtype, ran):
    """LSTMCell with an option, stepped T times, equals LSTM with the same parameters (and gradients)."""
    seq = _module(variant, dtype, backend=backend)
    cell = fastrnn.LSTMCell(I, H, dtype=dtype, backend=backend, **variant)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in seq.state_dict().items()})
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    y, (h, c) = seq(x)
    gs = torch.autograd.grad(y.sum() + c.sum(), [x, *seq.parameters()])
    hc, ys = None, []
    for t in range(T):
        hc = cell(x[t], hc)
        ys.append(hc[0])
    yc = torch.stack(ys)
    gc = torch.autograd.grad(yc.sum() + hc[1].sum(), [x, *cell.parameters()])
    tol = TOL[dtype]
    assert_close(yc, y, tol["out"], "y")
    assert_close(hc[1], c[0], tol["out"], "c")
    for k, (a, b) in enumerate(zip(gc, gs)):
        assert_close(a, b, tol["grad"], f"grad {k}")
    assert backends_used(ran) == {backend}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_between_layers(backend):
    """Training mode with dropout: same seed, same masks, same result as the reference."""
    outs = []
    for be in ("reference", backend):
        m = _module(dict(peephole=True, coupled_gates=True), torch.float64, num_layers=3, dropout=0.5, backend=be)
        m.train()
        torch.manual_seed(5)
        outs.append(m(torch.ones(T, B, I, dtype=torch.float64))[0])
    assert_close(outs[1], outs[0], 1e-10, "dropout")
    assert (outs[0] != 0).any()


def test_automatic_choice_serves_the_variants(ran):
    auto = _module(dict(peephole=True, coupled_gates=True), torch.float32)
    ref = _module(dict(peephole=True, coupled_gates=True), torch.float32, backend="reference")
    x = torch.randn(T, B, I)
    with fastrnn.dispatch.record_calls() as auto_ran:
        y = auto(x)[0]
    assert_close(y, ref(x)[0], TOL[torch.float32]["out"], "y")
    assert backends_used(auto_ran) == {CPU_BACKENDS[0]}
    assert backends_used(ran) == {CPU_BACKENDS[0], "reference"}
