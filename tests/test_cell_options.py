"""The cell options of issue 18: ``layer_norm``, ``zoneout``, ``recurrent_dropout`` on LSTM, GRU and their
cells. The oracle is an eager implementation written here from the formulas of the modules' docstring
(``fastrnn.modules._CELL_OPTIONS_DOC``), which calls nothing of fastrnn: per-step loops over plain torch
ops, fed the masks the module drew (recorded by a spy on ``_cell_masks``). Outputs, final states and every
gradient (input, initial state, every parameter, the new ones included) in float64 and float32, on every
backend that serves the options (asserting that it ran), packed, bidirectional, 2 layers, proj_size."""
import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn import dispatch
from fastrnn.modules import _BackendMixin
from conftest import CPU_BACKENDS, INTERPRETED, TOL, backends_used, module_gradcheck

FEATURES = ("layer_norm", "zoneout", "recurrent_dropout")
# the backends that serve every cell option here (the others are refused: test_refusals)
SERVING = [b for b in CPU_BACKENDS if set(FEATURES) <= dispatch.get(b).features and b != "reference"]


# ---- the eager oracle ------------------------------------------------------------------------------
def _ln(v, g, b=None):
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    out = (v - mu) / torch.sqrt(var + 1e-5) * g
    return out if b is None else out + b


def _mix(new, old, k):
    return k * old + (1 - k) * new


def _eager_layer(family, x, h, c, P, masks, zps, lengths, reverse, coupled=False, peephole=False):
    """One layer-direction: x [T,B,I] (time-major), h [B,P], c [B,H] or None; P: parameter dict with keys
    w_ih, b_ih, w_hh, b_hh, (w_hr, w_ch), (ln_ih, ln_hh, ln_c, ln_cb); masks (rmask, zmask...) or Nones;
    zps: the zoneout probabilities. Returns y [T,B,*], h_n, c_n."""
    T, B = x.shape[0], x.shape[1]
    gx = x @ P["w_ih"].t()
    if "ln_ih" in P:
        gx = _ln(gx, P["ln_ih"])
    if P.get("b_ih") is not None:
        gx = gx + P["b_ih"]
    rmask, zm = masks[0], masks[1:]
    lens = lengths if lengths is not None else [T] * B
    ys = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        active = torch.tensor([lens[b] > t for b in range(B)]).unsqueeze(1)
        hin = h if rmask is None else h * rmask
        gh = hin @ P["w_hh"].t()
        if "ln_hh" in P:
            gh = _ln(gh, P["ln_hh"])
        if P.get("b_hh") is not None:
            gh = gh + P["b_hh"]
        ks = [zps[j] if zm[j] is None else zm[j][t] for j in range(len(zps))]
        if family == "lstm":
            gates = gx[t] + gh
            if coupled:
                i, g, o = gates.chunk(3, 1)
            else:
                i, f, g, o = gates.chunk(4, 1)
            if peephole:
                i = i + P["w_ch"][0] * c
                if not coupled:
                    f = f + P["w_ch"][1] * c
            i = torch.sigmoid(i)
            f = 1 - i if coupled else torch.sigmoid(f)
            ct = f * c + i * torch.tanh(g)
            if peephole:
                o = o + P["w_ch"][2] * ct
            ca = _ln(ct, P["ln_c"], P["ln_cb"]) if "ln_c" in P else ct
            ht = torch.sigmoid(o) * torch.tanh(ca)
            if "w_hr" in P:
                ht = ht @ P["w_hr"].t()
            h_new, c_new = _mix(ht, h, ks[0]), _mix(ct, c, ks[1])
            c = torch.where(active, c_new, c)
        else:
            xr, xz, xn = gx[t].chunk(3, 1)
            hr, hz, hn = gh.chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h_new = _mix((1 - z) * n + z * h, h, ks[0])
        h = torch.where(active, h_new, h)
        ys[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c


def _params(m, k, sfx):
    """The eager oracle's parameter dict of layer k (suffix '' or '_reverse') of module m."""
    s = f"_l{k}{sfx}" if not isinstance(m, torch.nn.RNNCellBase) else ""
    get = lambda n: getattr(m, n, None)  # noqa: E731
    P = {"w_ih": get("weight_ih" + s), "b_ih": get("bias_ih" + s), "w_hh": get("weight_hh" + s),
         "b_hh": get("bias_hh" + s)}
    if get("weight_hr" + s) is not None:
        P["w_hr"] = get("weight_hr" + s)
    if getattr(m, "peephole", False):
        P["w_ch"] = get("weight_ch" + s)
    if m.layer_norm:
        P["ln_ih"], P["ln_hh"] = get("layer_norm_weight_ih" + s), get("layer_norm_weight_hh" + s)
        if m._family == "lstm":
            P["ln_c"], P["ln_cb"] = get("layer_norm_weight_c" + s), get("layer_norm_bias_c" + s)
    return P


def _zps(m):
    z = m.zoneout
    if m._family == "lstm":
        return tuple(z) if isinstance(z, tuple) else (z, z)
    return (z,)


def eager_seq(m, x, h0, c0, masks, lengths):
    """The eager oracle for a sequence module m (time-major x [T,B,I]); masks: what m drew, per
    layer-direction. Returns y, h_n, c_n (c_n None for a GRU)."""
    D = 2 if m.bidirectional else 1
    zps = _zps(m) if m.training else tuple(p for p in _zps(m))
    inp, hs, cs = x, [], []
    for k in range(m.num_layers):
        outs = []
        for d in range(D):
            idx = k * D + d
            y, h, c = _eager_layer(m._family, inp, h0[idx], None if c0 is None else c0[idx], _params(m, k, "_reverse" if d else ""),
                                   masks[idx], zps, lengths, d == 1, getattr(m, "coupled_gates", False),
                                   getattr(m, "peephole", False))
            outs.append(y)
            hs.append(h)
            cs.append(c)
        inp = torch.cat(outs, 2)
    return inp, torch.stack(hs), (torch.stack(cs) if c0 is not None else None)


@pytest.fixture
def spy(monkeypatch):
    """The masks every _cell_masks call of the test returned, in order."""
    seen = []
    orig = _BackendMixin._cell_masks

    def record(self, *args):
        out = orig(self, *args)
        seen.append(out)
        return out

    monkeypatch.setattr(_BackendMixin, "_cell_masks", record)
    return seen


# ---- module vs oracle ------------------------------------------------------------------------------
def _module(name, dtype, backend, **kw):
    torch.manual_seed(0)
    m = getattr(fastrnn, name)(3, 6, dtype=dtype, backend=backend, **kw)
    with torch.no_grad():  # gains and biases away from their init, so that a mixed-up one shows
        for n, p in m.named_parameters():
            if n.startswith("layer_norm_"):
                p.add_(torch.randn_like(p) * 0.3)
    return m


SEQ_CASES = [
    ("LSTM", dict(layer_norm=True)),
    ("LSTM", dict(layer_norm=True, num_layers=2, bidirectional=True)),
    ("LSTM", dict(layer_norm=True, proj_size=4)),
    ("LSTM", dict(layer_norm=True, peephole=True)),
    ("LSTM", dict(layer_norm=True, coupled_gates=True, zoneout=0.3)),
    ("LSTM", dict(zoneout=(0.2, 0.5), bidirectional=True)),
    ("LSTM", dict(zoneout=0.3, proj_size=4, recurrent_dropout=0.4)),
    ("LSTM", dict(recurrent_dropout=0.5, num_layers=2)),
    ("LSTM", dict(layer_norm=True, zoneout=(0.1, 0.3), recurrent_dropout=0.25, num_layers=2, bidirectional=True,
                  proj_size=4, peephole=True)),
    ("GRU", dict(layer_norm=True)),
    ("GRU", dict(layer_norm=True, num_layers=2, bidirectional=True)),
    ("GRU", dict(zoneout=0.4)),
    ("GRU", dict(recurrent_dropout=0.3, bidirectional=True)),
    ("GRU", dict(layer_norm=True, zoneout=0.2, recurrent_dropout=0.3, num_layers=2)),
]
SEQ_IDS = [f"{n}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for n, kw in SEQ_CASES]


def _seq_case(name, kw, dtype, backend, packed, training, spy):
    m = _module(name, dtype, backend, **kw)
    m.train(training)
    T, B = 7, 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, 3, generator=g, dtype=dtype, requires_grad=True)
    D = 2 if m.bidirectional else 1
    P = m.proj_size or m.hidden_size if name == "LSTM" else m.hidden_size
    h0 = torch.randn(m.num_layers * D, B, P, generator=g, dtype=dtype, requires_grad=True)
    c0 = (torch.randn(m.num_layers * D, B, 6, generator=g, dtype=dtype, requires_grad=True)
          if name == "LSTM" else None)
    lengths = [7, 5, 5, 2] if packed else None
    hx = (h0, c0) if c0 is not None else h0
    with dispatch.record_calls() as ran:
        if packed:
            out, st = m(pack_padded_sequence(x, lengths), hx)
            y = pad_packed_sequence(out)[0]
        else:
            y, st = m(x, hx)
    h_n, c_n = st if c0 is not None else (st, None)
    masks = spy[-1]
    want = eager_seq(m, x, h0, c0, masks, lengths)
    got = [y, h_n, c_n]
    # every gradient: a loss over the output and the final states
    wy = torch.randn(want[0].shape, generator=g, dtype=dtype)
    leaves = [x, h0] + ([c0] if c0 is not None else []) + list(m.parameters())
    names = ["x", "h0"] + (["c0"] if c0 is not None else []) + [n for n, _ in m.named_parameters()]

    def loss(y, h, c, wy=wy):
        return (y * wy).sum() + (h * 1.5).sum() + (0 if c is None else (c * 0.5).sum())

    g_got = torch.autograd.grad(loss(*got), leaves, allow_unused=True)
    g_want = torch.autograd.grad(loss(*want), leaves, allow_unused=True)
    outs = list(zip(got, want, ("y", "h_n", "c_n"))) + list(zip(g_got, g_want, [f"grad {n}" for n in names]))
    if dtype == torch.float64:
        for a, b, what in outs:
            if b is None:
                assert a is None or not a.any(), what
                continue
            tol = TOL[dtype]["grad" if what.startswith("grad") else "out"]
            torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda s: f"{what}: {s}")
        return m, ran
    # float32: against the float64 truth (the oracle on the same values in float64): within float32's house
    # tolerance of it (conftest.TOL, relative to the largest value), or where the float32 oracle itself is
    # further off, at most 2x (outputs) / 3x (gradients) its error (DESIGN.md, section 5)
    m64 = _module(name, torch.float64, "reference", **kw)
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    m64.train(training)
    d = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    x64, h064, c064 = d(x), d(h0), d(c0)
    masks64 = [tuple(None if t is None else t.double() for t in mk) for mk in masks]
    truth = eager_seq(m64, x64, h064, c064, masks64, lengths)
    leaves64 = [x64, h064] + ([c064] if c0 is not None else []) + list(m64.parameters())
    g_truth = torch.autograd.grad(loss(*truth, wy=wy.double()), leaves64, allow_unused=True)
    for (a, b, what), t in zip(outs, list(truth) + list(g_truth)):
        if t is None:
            assert a is None or not a.any(), what
            continue
        ours, theirs = (a.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
        grad = what.startswith("grad")
        bound = max((3 if grad else 2) * theirs, TOL[dtype]["grad" if grad else "out"] * (1 + t.abs().max().item()))
        assert ours <= bound, f"{what}: error {ours:.3e} against float64 (bound {bound:.3e}; float32 oracle {theirs:.3e})"
    return m, ran


@pytest.mark.parametrize("backend", ["reference"] + SERVING)
@pytest.mark.parametrize("name,kw", SEQ_CASES, ids=SEQ_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_seq_matches_eager(backend, name, kw, dtype, spy):
    m, ran = _seq_case(name, kw, dtype, backend, False, True, spy)
    assert backends_used(ran) == {backend}


@pytest.mark.parametrize("backend", ["reference"] + SERVING)
@pytest.mark.parametrize("name,kw", [c for c in SEQ_CASES if len(c[1]) > 2 or "zoneout" in c[1]],
                         ids=[i for c, i in zip(SEQ_CASES, SEQ_IDS) if len(c[1]) > 2 or "zoneout" in c[1]])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_seq_packed_matches_eager(backend, name, kw, training, spy):
    """Packed input (lengths 7, 5, 5, 2): padded steps change nothing; eval: zoneout's expectation."""
    m, ran = _seq_case(name, kw, torch.float64, backend, True, training, spy)
    assert backends_used(ran) == {backend}


CELL_CASES = [("LSTMCell", dict(layer_norm=True)), ("LSTMCell", dict(layer_norm=True, zoneout=(0.3, 0.6))),
              ("LSTMCell", dict(zoneout=0.4, peephole=True)), ("GRUCell", dict(layer_norm=True)),
              ("GRUCell", dict(layer_norm=True, zoneout=0.4))]


@pytest.mark.parametrize("backend", ["reference"] + SERVING)
@pytest.mark.parametrize("name,kw", CELL_CASES, ids=[f"{n}-{'-'.join(kw)}" for n, kw in CELL_CASES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cell_matches_eager(backend, name, kw, training, spy):
    dtype = torch.float64
    m = _module(name, dtype, backend, **kw)
    m.train(training)
    g = torch.Generator().manual_seed(1)
    B = 3
    x = torch.randn(2, B, 3, generator=g, dtype=dtype, requires_grad=True)
    lstm = name == "LSTMCell"
    h0 = torch.randn(B, 6, generator=g, dtype=dtype, requires_grad=True)
    c0 = torch.randn(B, 6, generator=g, dtype=dtype, requires_grad=True) if lstm else None
    with dispatch.record_calls() as ran:
        state = (h0, c0) if lstm else h0
        outs = []
        for t in range(2):  # two calls: each draws its own masks
            state = m(x[t], state)
            outs.append(state)
    assert backends_used(ran) == {backend}
    P = _params(m, 0, "")
    h, c = h0, c0
    want = []
    for t in range(2):
        masks = spy[t][0]
        masks = (masks[0], *(None if z is None else z.unsqueeze(0) for z in masks[1:]))
        _, h, c = _eager_layer(m._family, x[t:t + 1], h, c, P, masks, _zps(m), None, False,
                               getattr(m, "coupled_gates", False), getattr(m, "peephole", False))
        want.append((h, c) if lstm else h)
    flat = lambda o: [t for s in o for t in (s if isinstance(s, tuple) else (s,))]  # noqa: E731
    for a, b in zip(flat(outs), flat(want)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    leaves = [x, h0] + ([c0] if lstm else []) + list(m.parameters())
    ga = torch.autograd.grad(sum((v * (k + 1)).sum() for k, v in enumerate(flat(outs))), leaves)
    gb = torch.autograd.grad(sum((v * (k + 1)).sum() for k, v in enumerate(flat(want))), leaves)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


# ---- gradcheck ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + SERVING)
@pytest.mark.parametrize("name,kw", [
    ("LSTM", dict(layer_norm=True, zoneout=(0.2, 0.4), recurrent_dropout=0.3, proj_size=2, peephole=True)),
    ("LSTM", dict(layer_norm=True, bidirectional=True)),
    ("GRU", dict(layer_norm=True, zoneout=0.3, recurrent_dropout=0.3)),
], ids=["lstm-all", "lstm-ln-bi", "gru-all"])
def test_gradcheck(backend, name, kw, ran):
    """torch.autograd.gradcheck in float64 through the module with fixed masks (a seed before each call)."""
    torch.manual_seed(0)
    m = getattr(fastrnn, name)(2, 3, dtype=torch.float64, backend=backend, **kw)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def outputs(out):
        return (out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],)))

    # Triton's interpreter runs a forward here in about a second: gradcheck's slow mode (two forwards per
    # input element, ~800 here) would take ten minutes, so the interpreted backend takes the fast mode
    # (the same check along random directions)
    assert module_gradcheck(m, x, backend, outputs, seed=5, atol=1e-7)  # the same masks every evaluation
    assert backends_used(ran) == {backend}


# ---- masks and probabilities -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_p_zero_is_the_plain_module(name):
    torch.manual_seed(0)
    plain = getattr(fastrnn, name)(3, 5, num_layers=2)
    opt = getattr(fastrnn, name)(3, 5, num_layers=2, zoneout=0.0, recurrent_dropout=0.0)
    opt.load_state_dict(plain.state_dict())
    x = torch.randn(6, 2, 3)
    for a, b in zip(plain(x), opt(x)):
        a, b = (a, b) if isinstance(a, torch.Tensor) else (torch.cat(a), torch.cat(b))
        assert torch.equal(a, b)
    assert not opt._cell_options()


@pytest.mark.parametrize("name,kw", [("LSTM", dict(zoneout=(0.3, 0.2), recurrent_dropout=0.4, layer_norm=True)),
                                     ("GRU", dict(zoneout=0.3, recurrent_dropout=0.4))])
def test_masks_reproduce_under_a_seed(name, kw):
    m = getattr(fastrnn, name)(3, 5, num_layers=2, **kw)
    x = torch.randn(6, 2, 3)
    torch.manual_seed(7)
    a = m(x)[0]
    b = m(x)[0]
    torch.manual_seed(7)
    c = m(x)[0]
    assert torch.equal(a, c) and not torch.equal(a, b)
    m.eval()  # eval: no masks, no randomness
    assert torch.equal(m(x)[0], m(x)[0])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.85])
def test_mask_statistics(spy, p):
    """On 2 * 200*64*128 zoneout elements and 64*128 recurrent dropout elements the kept share is within 5
    standard deviations of p, and the recurrent dropout mask is scaled by 1/(1-p)."""
    m = fastrnn.LSTM(3, 128, zoneout=p, recurrent_dropout=p)
    m(torch.randn(200, 64, 3))
    rmask, zh, zc = spy[-1][0]
    for z in (zh, zc):
        n = z.numel()
        assert abs(z.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
        assert set(z.unique().tolist()) <= {0.0, 1.0}
    n = rmask.numel()
    kept = (rmask != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.allclose(rmask[rmask != 0], torch.tensor(1 / (1 - p)), rtol=1e-4)


def test_eval_zoneout_is_the_expectation(spy):
    """In eval, zoneout is the expectation: the oracle with p in place of the masks (exactly the formula)."""
    m = _module("GRU", torch.float64, None, zoneout=0.35).eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y, h = m(x)
    assert spy[-1] == [(None, None)]
    want = eager_seq(m, x, torch.zeros(1, 2, 6, dtype=torch.float64), None, [(None, None)], None)
    torch.testing.assert_close(y, want[0], atol=1e-12, rtol=1e-12)


# ---- parameters, state_dict, refusals ------------------------------------------------------------------
def test_layer_norm_parameters():
    m = fastrnn.LSTM(3, 5, num_layers=2, bidirectional=True, layer_norm=True, proj_size=2)
    sd = m.state_dict()
    for sfx in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        assert sd[f"layer_norm_weight_ih{sfx}"].shape == (20,) and bool((sd[f"layer_norm_weight_ih{sfx}"] == 1).all())
        assert sd[f"layer_norm_weight_hh{sfx}"].shape == (20,)
        assert sd[f"layer_norm_weight_c{sfx}"].shape == (5,) and bool((sd[f"layer_norm_weight_c{sfx}"] == 1).all())
        assert sd[f"layer_norm_bias_c{sfx}"].shape == (5,) and not sd[f"layer_norm_bias_c{sfx}"].any()
    m.reset_parameters()  # torch's reset: the gains back to 1, the biases to 0
    assert bool((m.layer_norm_weight_hh_l1 == 1).all()) and not m.layer_norm_bias_c_l0.any()
    m2 = fastrnn.LSTM(3, 5, num_layers=2, bidirectional=True, layer_norm=True, proj_size=2)
    m2.load_state_dict(sd)
    g = fastrnn.GRU(3, 5, layer_norm=True)
    assert [n for n, _ in g.named_parameters()][-2:] == ["layer_norm_weight_ih_l0", "layer_norm_weight_hh_l0"]
    assert g.layer_norm_weight_hh_l0.shape == (15,)
    c = fastrnn.LSTMCell(3, 5, layer_norm=True, coupled_gates=True)
    assert c.layer_norm_weight_ih.shape == (15,) and c.layer_norm_bias_c.shape == (5,)
    assert "layer_norm=True" in repr(m) and "zoneout=(0.1, 0.2)" in repr(fastrnn.LSTM(3, 5, zoneout=(0.1, 0.2)))


@pytest.mark.parametrize("kw,match", [
    (dict(zoneout=1.0), "zoneout should be a number in range"),
    (dict(zoneout=-0.1), "zoneout should be a number in range"),
    (dict(recurrent_dropout=1.0), "recurrent_dropout should be a number in range"),
    (dict(zoneout=(0.1, 0.2, 0.3)), "pair"),
    (dict(zoneout="0.1"), "zoneout should be a number"),
])
def test_bad_probabilities(kw, match):
    with pytest.raises(ValueError, match=match):
        fastrnn.LSTM(3, 5, **kw)


def test_bad_combinations():
    with pytest.raises(ValueError, match="RNN: layer_norm is defined for the gated cells"):
        fastrnn.RNN(3, 5, layer_norm=True)
    with pytest.raises(ValueError, match="zoneout, recurrent_dropout are defined"):
        fastrnn.RNNCell(3, 5, zoneout=0.1, recurrent_dropout=0.2)
    with pytest.raises(ValueError, match="GRU: zoneout takes one probability"):
        fastrnn.GRU(3, 5, zoneout=(0.1, 0.2))
    with pytest.raises(ValueError, match="LSTMCell: recurrent_dropout draws one mask per sequence"):
        fastrnn.LSTMCell(3, 5, recurrent_dropout=0.2)
    with pytest.raises(TypeError, match="layer_norm should be a bool"):
        fastrnn.GRU(3, 5, layer_norm=1)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b not in SERVING and b != "reference"])
@pytest.mark.parametrize("feature,kw", [("layer_norm", dict(layer_norm=True)), ("zoneout", dict(zoneout=0.2)),
                                        ("recurrent_dropout", dict(recurrent_dropout=0.2))])
def test_refusals(backend, feature, kw):
    """A backend that cannot serve an option, asked for by name, refuses naming it; the module and its
    parameters are untouched and the RNG did not move."""
    m = fastrnn.LSTM(3, 5, backend=backend, **kw)
    before = {n: p.clone() for n, p in m.state_dict().items()}
    x = torch.randn(4, 2, 3)
    rng = torch.get_rng_state()
    with pytest.raises(fastrnn.BackendNotSupportedError, match=f"feature '{feature}' is not supported"):
        m(x)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[n], p) for n, p in m.state_dict().items())


@pytest.mark.parametrize("backend", [b for b in ("cpp", "numba") if b in SERVING])
@pytest.mark.parametrize("name,kw", [
    ("LSTM", dict(zoneout=(0.3, 0.2), recurrent_dropout=0.3, bidirectional=True)),
    ("LSTM", dict(zoneout=0.3, recurrent_dropout=0.3, proj_size=20, peephole=True)),
    ("GRU", dict(zoneout=0.4, recurrent_dropout=0.2, bidirectional=True)),
    ("LSTM", dict(layer_norm=True, zoneout=(0.3, 0.2), recurrent_dropout=0.3, bidirectional=True)),
    ("LSTM", dict(layer_norm=True, proj_size=20, peephole=True, coupled_gates=True)),
    ("GRU", dict(layer_norm=True, zoneout=0.4, recurrent_dropout=0.2, bidirectional=True)),
], ids=["lstm", "lstm-proj-peep", "gru", "lstm-ln", "lstm-ln-proj-variants", "gru-ln"])
def test_split_over_threads(backend, name, kw, ran, monkeypatch):
    """The cell options with each step split over two threads, packed (3 rows, then 2, then 1): equal to the
    reference backend with the same masks. cpp splits the units (hidden size 40: two unequal blocks; layer
    norm combines the workers' partial statistics); numba splits the products' columns and the pointwise
    part's rows (each part with its own gradient accumulators)."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: the parallel path cannot split")
    if backend == "cpp":
        impl = dispatch.get("cpp")
        old = impl.set_parallel_min_macs(0)
    else:
        from fastrnn.backends import numba as nb
        monkeypatch.setattr(nb, "PARALLEL_MIN_MACS", 0)
    try:
        outs = {}
        for b in ("reference", backend):
            torch.manual_seed(0)
            m = getattr(fastrnn, name)(3, 40, dtype=torch.float64, backend=b, **kw)
            x = torch.randn(6, 3, 3, dtype=torch.float64, requires_grad=True)
            torch.manual_seed(1)
            out, st = m(pack_padded_sequence(x, [6, 4, 2]))
            y = pad_packed_sequence(out)[0]
            st = st if isinstance(st, tuple) else (st,)
            res = [y, *st]
            outs[b] = res + list(torch.autograd.grad(sum((t * (k + 1)).sum() for k, t in enumerate(res)),
                                                      [x, *m.parameters()]))
        for a, b in zip(outs[backend], outs["reference"]):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    finally:
        if backend == "cpp":
            impl.set_parallel_min_macs(old)
    assert ("lstm_seq_fwd" if name == "LSTM" else "gru_seq_fwd", backend) in ran


def test_benchmark_runs(monkeypatch, tmp_path, capsys):
    """`python -m benchmarks.cell_options` (run by `make bench`) on a tiny shape: every ratio line, the file."""
    from benchmarks import cell_options
    monkeypatch.setattr(cell_options, "SHAPES", [(3, 1, 8)])
    out = tmp_path / "co.txt"
    backend = "cpp" if "cpp" in SERVING else "reference"
    cell_options.main(["--budget", "0.01", "--backend", backend, "--out", str(out)])
    text = out.read_text()
    assert "lstm ln/plain" in text and "recdrop/plain" in text and "eager/plain" in text
    assert len(text.splitlines()) == 5  # the header, then a line of times and one of ratios per mode


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) of a module with every option: equal to eager in eval; in training too
    when inductor draws random numbers as eager does (``fallback_random``: its own generator otherwise
    gives other masks, as for torch's own dropout)."""
    import torch._inductor.config as inductor_config
    with inductor_config.patch(fallback_random=True):
        _compile_case()


def _compile_case():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = fastrnn.LSTM(4, 6, num_layers=2, layer_norm=True, zoneout=(0.1, 0.2), recurrent_dropout=0.2,
                     dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    compiled = torch.compile(m, fullgraph=True)
    torch.manual_seed(1)
    y_c = compiled(x)[0]
    torch.manual_seed(1)
    y_e = m(x)[0]
    torch.testing.assert_close(y_c, y_e, atol=1e-10, rtol=1e-10)
    m.eval()
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x)[0], m(x)[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", SERVING)
@pytest.mark.parametrize("name,kw", [("LSTM", dict(layer_norm=True, zoneout=(0.1, 0.2), recurrent_dropout=0.2)),
                                     ("GRU", dict(layer_norm=True, zoneout=0.1, recurrent_dropout=0.2))])
def test_double_backward(backend, name, kw, ran):
    """A gradient penalty through the options (the masks are constants of the second derivative) equals the
    reference backend's, with the same masks."""
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    res = {}
    for be in ("reference", backend):
        torch.manual_seed(0)
        m = getattr(fastrnn, name)(4, 6, num_layers=2, dtype=torch.float64, backend=be, **kw)
        torch.manual_seed(3)
        y = m(x)[0]
        (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        res[be] = torch.autograd.grad((gx ** 2).sum(), [x, *m.parameters()])
    for a, b in zip(res[backend], res["reference"]):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    assert (f"{name.lower()}_seq_bwd", backend) in ran


@pytest.mark.parametrize("backend", SERVING + ["reference"])
@pytest.mark.parametrize("family", ["lstm", "gru"])
@pytest.mark.parametrize("save", [False, True], ids=["nosave", "save"])
def test_opcheck_with_options(backend, family, save):
    """torch.library.opcheck on the sequence and step ops with every option (the fake's workspace size
    included): layer norm, masks, zoneout probability."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    T, B, H = 4, 3, 5
    mask = lambda *s: (torch.rand(*s, generator=g) < 0.3).double()  # noqa: E731
    if family == "lstm":
        w = (r(4 * H, H), r(4 * H), None, r(3, H), r(4 * H), r(H), r(H), mask(B, H) * 1.5, mask(T, B, H), mask(T, B, H))
        state, opts = (r(B, H), r(B, H)), (False, 0.2, 0.1)
        step_w = w[:8] + (w[8][0], w[9][0])
    else:
        w = (r(3 * H, H), r(3 * H), r(3 * H), mask(B, H) * 1.5, mask(T, B, H))
        state, opts = (r(B, H),), (0.2,)
        step_w = w[:4] + (w[4][0],)
    ops = torch.ops.fastrnn
    xw = r(T, B, w[0].shape[0])
    torch.library.opcheck(getattr(ops, f"{family}_seq_fwd"), (xw, *w, *state, torch.tensor([4, 3, 1]), False, *opts,
                                                               save, backend))
    torch.library.opcheck(getattr(ops, f"{family}_step_fwd"), (xw[0], *step_w, *state, *opts, save, backend))
    if save:
        y, *rest = getattr(ops, f"{family}_seq_fwd")(xw, *w, *state, None, True, *opts, True, backend)
        grads = [torch.randn_like(y)] + [torch.randn_like(f) for f in rest[:-1]]
        torch.library.opcheck(getattr(ops, f"{family}_seq_bwd"),
                              (*grads, xw, *w, *state, None, y, rest[-1], True, *opts, backend))
