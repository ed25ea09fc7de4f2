"""The automatic choice's policy table and the ``torch`` backend (torch.nn's own implementation).

A module served by ``torch`` must give torch.nn's numbers exactly (the same computation on the same
parameters), its gradients too; the automatic choice must never hand torch a call while torch.compile
traces it, nor a module with a feature torch.nn lacks."""
import json

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import dispatch, policy, tune
from conftest import backends_used, flat_outputs, trained_outputs

TORCH_FIRST = ("torch", "cpp", "numba", "reference")
KERNEL_FIRST = ("cpp", "numba", "reference", "torch")


def _write_table(path, ranking):
    table = {"format": policy.FORMAT, "cpu": "test CPU", "date": "today",
             "rankings": {"cpu": {k: list(ranking) for k in policy.keys()}}}
    path.write_text(json.dumps(table))
    return path


@pytest.fixture
def use_table(monkeypatch, tmp_path):
    """``use_table(ranking)``: every class ranked so, through FASTRNN_POLICY (a file, as tune writes)."""
    def use(ranking):
        monkeypatch.setenv("FASTRNN_POLICY", str(_write_table(tmp_path / f"p{len(policy._loaded)}.json", ranking)))
        policy.forget()
    yield use
    policy.forget()


def test_shape_classes():
    sc = policy.shape_class
    assert [sc("seq", False, 1, 100), sc("seq", False, 2, 100), sc("seq", False, 7, 100), sc("seq", False, 8, 100),
            sc("seq", False, 31, 2), sc("seq", False, 32, 2), sc("seq", False, 64, 1), sc("seq", True, 1, 2),
            sc("seq", True, 4, 10), sc("seq", True, 40, 100), sc("seq", True, 16, 1)] == \
        ["inference B1", "inference B2-7", "inference B2-7", "inference B8-31", "inference B8-31", "inference B32+",
         "inference T1", "training B1", "training B2-7", "training B32+", "training T1"]
    assert [sc("step", False, 1), sc("step", False, 2), sc("step", True, 1)] == \
        ["inference B1", "inference B2+", "training"]
    assert [sc("seq", False, 8, 50, 384), sc("seq", False, 8, 50, 385), sc("seq", True, 1, 1, 1024),
            sc("seq", False, 1, 1, 1024), sc("step", False, 1, 1, 1024)] == \
        ["inference B8-31", "inference B8-31 H>384", "training T1 H>384", "inference T1 H>384", "inference B1"]
    assert [sc("seq", False, 64, 50, 192), sc("seq", True, 8, 50, 193), sc("seq", True, 32, 20, 64),
            sc("seq", False, 1, 1, 32), sc("seq", True, 1, 1, 100)] == \
        ["inference B32+ H<=192", "training B8-31", "training B32+ H<=192", "inference T1 H<=192",
         "training T1 H<=192"]
    assert [sc("seq", True, 16, 100, 256, True), sc("seq", False, 1, 1, 32, True), sc("step", True, 1, 0, 0, True)] \
        == ["training B8-31 bi", "inference T1 H<=192 bi", "training"]
    assert len(policy.keys()) == 3 * (3 * 10 + 3)


def test_a_bidirectional_class_puts_torch_after_cpp(monkeypatch, tmp_path):
    """A bidirectional LSTM class reads its one-direction ranking with cpp moved to just before torch.nn
    (torch.nn's bidirectional LSTM is slower than cpp's where its one direction is not: ``policy.BI``); the
    others keep their order, and the other families their rankings."""
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": policy.FORMAT, "cpu": "test CPU", "date": "today", "rankings": {"cpu": {
        "lstm seq training B8-31": ["torch", "numba", "cpp", "reference"],
        "lstm seq inference B1": ["numba", "cpp", "torch", "reference"],
        "gru seq training B8-31": ["torch", "cpp", "reference"]}}}))
    monkeypatch.setenv("FASTRNN_POLICY", str(path))
    policy.forget()
    assert policy.ranking("cpu", "lstm", "seq", "training B8-31 bi") == ("cpp", "torch", "numba", "reference")
    assert policy.ranking("cpu", "lstm", "seq", "training B8-31") == ("torch", "numba", "cpp", "reference")
    assert policy.ranking("cpu", "lstm", "seq", "inference B1 bi") == ("numba", "cpp", "torch", "reference")
    assert policy.ranking("cpu", "gru", "seq", "training B8-31 bi") == ("torch", "cpp", "reference")
    assert policy.ranking("cpu", "rnn", "seq", "training B8-31 bi") == ()
    policy.forget()


@pytest.mark.parametrize("vendor", ["amd", "amd-avx2", "intel", "other"])
def test_builtin_tables_rank_every_class(vendor):
    table = policy.builtin(vendor)
    assert f"({'intel' if vendor == 'other' else vendor} table" in table["source"]
    rankings = table["rankings"]["cpu"]
    assert set(rankings) == set(policy.keys())
    for key, ranked in rankings.items():
        assert sorted(ranked) == ["cpp", "numba", "reference", "torch"], key


def test_amd_table_leaves_lstm_at_large_batch_to_torch_from_h193():
    """The LSTM from batch 8 in training and 32 in inference: torch.nn's oneDNN from H193 up to H384 (cpp
    0.89-0.99x in training at H256-384 and B16-32 on the Zen 4 EPYC), cpp up to NARROW_H since its row
    split (benchmarks/NOTES.md, "A narrow hidden-size band"); cpp keeps batch 1-7 and the GRU and RNN
    everywhere. A module's call takes its class from its hidden size."""
    rankings = policy.builtin("amd")["rankings"]["cpu"]
    for cls in ("training B32+", "training B8-31", "inference B32+"):
        assert rankings[f"lstm seq {cls}"][0] == "torch", cls
        assert rankings[f"lstm seq {cls} H<={policy.NARROW_H}"][:2] == ("cpp", "torch"), cls
    assert rankings["lstm seq training B2-7"][0] == "cpp"
    assert rankings["gru seq training B32+"][0] == "cpp" and rankings["rnn seq training B32+"][0] == "cpp"


def test_an_amd_cpu_without_avx512_takes_its_own_table(monkeypatch):
    """AMD without AVX-512 (a Zen 3, AVX2; benchmarks/NOTES.md, thirty-fifth session): torch.nn's oneDNN first for
    the LSTM in inference at B8-31 and B32+ up to NARROW_H and in training from B8 above WIDE_H; every other class
    as the AMD table (cpp at B1 above WIDE_H, where one run had put numba: thirty-seventh session). A
    bidirectional LSTM in inference below B32 keeps its one-direction ranking (cpp read 0.92x torch.nn there);
    in training cpp still goes before torch.nn."""
    monkeypatch.setattr(policy, "cpu_vendor", lambda: "amd")
    monkeypatch.setattr(policy, "has_avx512", lambda: False)
    assert "(amd-avx2 table" in policy.builtin()["source"]
    monkeypatch.setattr(policy, "has_avx512", lambda: True)
    assert "(amd table" in policy.builtin()["source"]
    amd, avx2 = (policy.builtin(v)["rankings"]["cpu"] for v in ("amd", "amd-avx2"))
    changed = {k for k in amd if amd[k] != avx2[k]}
    assert changed == {"lstm seq inference B8-31", f"lstm seq inference B32+{policy.NARROW}",
                       f"lstm seq training B8-31{policy.WIDE}", f"lstm seq training B32+{policy.WIDE}"}
    assert all(avx2[k][0] == "torch" for k in changed)
    assert avx2[f"lstm seq inference B1{policy.WIDE}"][0] == "cpp"
    monkeypatch.setenv("FASTRNN_POLICY", "builtin")
    monkeypatch.setattr(policy, "has_avx512", lambda: False)
    policy.forget()
    try:
        assert policy.ranking("cpu", "lstm", "seq", "inference B8-31 bi")[0] == "torch"
        assert policy.ranking("cpu", "lstm", "seq", "training B8-31 bi")[0] == "cpp"
        assert policy.ranking("cpu", "lstm", "seq", "inference B32+ bi")[0] == "cpp"
    finally:
        policy.forget()


# (hidden size, bidirectional, batch, the backend the built-in AMD table picks in training)
_AMD_TRAINING_PICKS = {
    # the hidden-size band: cpp up to NARROW_H at batch 32, torch.nn from NARROW_H + 1
    "H192": (policy.NARROW_H, False, 32, "cpp"), "H193": (policy.NARROW_H + 1, False, 32, "torch"),
    # batch 16, H=256: torch.nn with one direction, cpp with two (policy.BI)
    "H256": (256, False, 16, "torch"), "H256-bi": (256, True, 16, "cpp"),
}


@pytest.mark.parametrize("case", list(_AMD_TRAINING_PICKS))
def test_the_amd_tables_pick_in_training(case, monkeypatch):
    """Under the built-in AMD table an LSTM in training runs the backend its class ranks first (its hidden-size
    band; a bidirectional module's class), with torch.nn's outputs and gradients either way."""
    if "cpp" not in dispatch.available_backends("cpu"):
        pytest.skip("the cpp backend is not built here (make ext)")
    H, bi, B, want = _AMD_TRAINING_PICKS[case]
    monkeypatch.setattr(policy, "cpu_vendor", lambda: "amd")
    monkeypatch.setenv("FASTRNN_POLICY", "builtin")
    policy.forget()
    try:
        torch.manual_seed(0)
        m, ref = fastrnn.LSTM(4, H, bidirectional=bi), torch.nn.LSTM(4, H, bidirectional=bi)
        ref.load_state_dict(m.state_dict())
        x = torch.randn(3, B, 4)
        with dispatch.record_calls() as ran:
            got = trained_outputs(m, x)
        assert backends_used(ran) == {want}
        for a, b in zip(got, trained_outputs(ref, x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    finally:
        policy.forget()


def test_select_follows_the_ranking_and_skips_torch_when_traced(use_table):
    spec = dispatch.Spec("lstm", "cpu", torch.float32)
    use_table(TORCH_FIRST)
    assert dispatch.select(spec, shape="inference B1") == "torch"
    assert dispatch.select(spec, shape="inference B1", traced=True) == dispatch.available_backends("cpu")[0]
    assert dispatch.select(spec) == dispatch.available_backends("cpu")[0]  # no class: the static priority
    # float64: the static priority (the tables are measured in float32)
    assert dispatch.select(dispatch.Spec("lstm", "cpu", torch.float64), shape="inference B1") != "torch"
    # a feature torch.nn lacks
    for feat in ("peephole", "coupled", "layer_norm", "zoneout", "recurrent_dropout", "weight_dropout"):
        assert dispatch.select(dispatch.Spec("lstm", "cpu", torch.float32, frozenset({feat})),
                               shape="inference B1") != "torch", feat
    # proj_size or packed input: torch.nn's LSTM leaves oneDNN there, and the tables measure dense plain calls
    for feat in ("proj", "varlen"):
        assert dispatch.select(dispatch.Spec("lstm", "cpu", torch.float32, frozenset({feat})),
                               shape="training B1") == dispatch.available_backends("cpu")[0]
    assert dispatch.select(dispatch.Spec("lstm", "cpu", torch.float32, frozenset({"proj", "varlen"})), "torch",
                           shape="training B1") == "torch"  # named: obeyed
    use_table(KERNEL_FIRST)
    assert dispatch.select(spec, shape="inference B1") == dispatch.available_backends("cpu")[0]


def test_cuda_plain_cells_go_to_cudnn_until_measured(monkeypatch):
    spec = dispatch.Spec("gru", "cuda", torch.float32)
    assert dispatch.select(spec, shape="training B32+") != "torch"  # FASTRNN_POLICY=static (the tests'): none
    monkeypatch.setenv("FASTRNN_POLICY", "builtin")
    assert dispatch.select(spec, shape="training B32+") == "torch"
    assert dispatch.select(spec, shape="training B32+", traced=True) != "torch"
    assert dispatch.select(dispatch.Spec("lstm", "cuda", torch.float32, frozenset({"peephole"})),
                           shape="inference B1") != "torch"


SEQ = {"LSTM": (fastrnn.LSTM, torch.nn.LSTM), "GRU": (fastrnn.GRU, torch.nn.GRU), "RNN": (fastrnn.RNN, torch.nn.RNN)}
CELLS = {"LSTMCell": (fastrnn.LSTMCell, torch.nn.LSTMCell), "GRUCell": (fastrnn.GRUCell, torch.nn.GRUCell),
         "RNNCell": (fastrnn.RNNCell, torch.nn.RNNCell)}


def _pair(classes, **kw):
    torch.manual_seed(0)
    ours, theirs = classes[0](5, 8, **kw), classes[1](5, 8, **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


KWARGS = {"plain": {}, "L2-bi": {"num_layers": 2, "bidirectional": True}, "batch_first": {"batch_first": True}}


@pytest.mark.parametrize("kw", list(KWARGS))
@pytest.mark.parametrize("name", list(SEQ))
def test_torch_served_sequences_equal_torch_nn(name, kw, use_table):
    """Inference (the fast path and the general one), training with gradients and unbatched input: the
    numbers of torch.nn, bit for bit, and the record says torch ran; named explicitly, torch also serves
    packed input (which the automatic choice leaves to the kernels)."""
    kw = KWARGS[kw]
    # a bidirectional LSTM puts torch.nn after cpp (policy.BI): here a ranking without cpp keeps torch.nn first
    use_table(("torch", "numba", "reference") if name == "LSTM" and kw.get("bidirectional") else TORCH_FIRST)
    ours, theirs = _pair(SEQ[name], **kw)
    fam = name.lower()
    x = torch.randn(7, 4, 5)
    for inp in (x, x[:1], x[:, 0]):  # a sequence, a one-step chunk, unbatched
        with torch.no_grad():
            with dispatch.record_calls() as ran:
                got = flat_outputs(ours(inp))
            want = flat_outputs(theirs(inp))
        assert ran == [(f"{fam}_module", "torch")]
        _equal(got, want)
    packed = pack_padded_sequence(x, torch.tensor([7, 3, 5, 1]), enforce_sorted=False)
    with dispatch.record_calls() as ran:
        ours(packed)
    assert backends_used(ran) == {dispatch.available_backends("cpu")[0]}
    ours.backend = "torch"
    with dispatch.record_calls() as ran:
        out_o = ours(packed)
    ours.backend = None
    assert ran == [(f"{fam}_module", "torch")]
    out_t = theirs(packed)
    _equal([out_o[0].data, *flat_outputs(out_o)[1:]], [out_t[0].data, *flat_outputs(out_t)[1:]])
    xr = x.clone().requires_grad_()
    xs = x.clone().requires_grad_()
    sum(t.sum() for t in flat_outputs(ours(xr))).backward()
    sum(t.sum() for t in flat_outputs(theirs(xs))).backward()
    _equal([xr.grad] + [p.grad for p in ours.parameters()], [xs.grad] + [p.grad for p in theirs.parameters()])


@pytest.mark.parametrize("name", list(CELLS))
def test_torch_served_cells_equal_torch_nn(name, use_table):
    use_table(TORCH_FIRST)
    ours, theirs = _pair(CELLS[name])
    fam = name[:-4].lower()
    x = torch.randn(3, 5)
    with torch.no_grad():
        for hx in (None, ours(x)):  # the general path, then the fast path (a state given)
            with dispatch.record_calls() as ran:
                got = ours(x, hx)
            assert ran == [(f"{fam}_module", "torch")]
            _equal(got if isinstance(got, tuple) else (got,),
                   (lambda r: r if isinstance(r, tuple) else (r,))(theirs(x, hx)))
    xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_o, out_t = ours(xr), theirs(xs)
    sum(t.sum() for t in (out_o if isinstance(out_o, tuple) else (out_o,))).backward()
    sum(t.sum() for t in (out_t if isinstance(out_t, tuple) else (out_t,))).backward()
    _equal([xr.grad] + [p.grad for p in ours.parameters()], [xs.grad] + [p.grad for p in theirs.parameters()])


def test_torch_backend_keeps_fastrnn_errors_first_and_leaves_the_module_untouched(use_table):
    """A malformed call gets fastrnn's (torch-typed, more precise) message before torch.nn runs."""
    use_table(TORCH_FIRST)
    lstm = fastrnn.LSTM(5, 8)
    before = {k: v.clone() for k, v in lstm.state_dict().items()}
    with torch.no_grad(), pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\) of two tensors"):
        lstm(torch.randn(4, 3, 5), torch.zeros(2, 1, 3, 8))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        lstm(torch.randn(1, 4, 3, 5))
    assert all(torch.equal(v, lstm.state_dict()[k]) for k, v in before.items())


def test_features_torch_lacks_never_fall_to_torch(use_table):
    use_table(TORCH_FIRST)
    x = torch.randn(6, 2, 5)
    kernel = dispatch.available_backends("cpu")[0]
    for m in (fastrnn.LSTM(5, 8, proj_size=3), fastrnn.LSTM(5, 8, peephole=True), fastrnn.LSTM(5, 8, coupled_gates=True),
              fastrnn.GRU(5, 8, layer_norm=True), fastrnn.LSTM(5, 8, zoneout=0.1),
              fastrnn.GRU(5, 8, recurrent_dropout=0.2), fastrnn.LSTM(5, 8, weight_dropout=0.3)):
        with dispatch.record_calls() as ran:
            m(x)
        assert backends_used(ran) == {kernel}, m
    # weight dropout is off in eval: torch.nn's forward computes the same
    m = fastrnn.LSTM(5, 8, weight_dropout=0.3).eval()
    with dispatch.record_calls() as ran:
        m(x)
    assert backends_used(ran) == {"torch"}
    with pytest.raises(fastrnn.BackendNotSupportedError, match="feature 'peephole' is not supported"):
        fastrnn.LSTM(5, 8, peephole=True, backend="torch")(x)
    with pytest.raises(fastrnn.BackendNotSupportedError, match="feature 'weight_dropout' is not supported"):
        fastrnn.LSTM(5, 8, weight_dropout=0.3, backend="torch")(x)


def test_never_torch_under_compile(use_table):
    use_table(TORCH_FIRST)
    m = fastrnn.GRU(5, 8)
    x = torch.randn(6, 2, 5)
    want = torch.nn.GRU(5, 8)
    want.load_state_dict(m.state_dict())
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    with dispatch.record_calls() as ran:
        y = compiled(x)[0]
    assert backends_used(ran) == {dispatch.available_backends("cpu")[0]}
    torch.testing.assert_close(y, want(x)[0], atol=1e-5, rtol=1e-5)
    with dispatch.record_calls() as ran:  # and eagerly, the same module goes to torch
        m(x)
    assert backends_used(ran) == {"torch"}


def test_tune_writes_a_table_the_choice_uses(monkeypatch, tmp_path):
    """A small tune (hidden size 8, short calls) writes every class; FASTRNN_POLICY reads it back and
    python -m fastrnn.info says where the table came from."""
    for name, width in (("H", 8), ("H_SMALL", 4), ("H_NARROW", 6), ("H_MIDDLE", 8), ("H_MIDDLE_TOP", 10),
                        ("H_WIDE", 12)):
        monkeypatch.setattr(tune, name, width)
    monkeypatch.setattr(tune, "SEQ_SHAPES", {k: (1 if "T1" in k else 3, 2 if "B2" in k else 1)
                                             for k in tune.SEQ_SHAPES})
    monkeypatch.setattr(tune, "STEP_SHAPES", {k: (1, 2) for k in tune.STEP_SHAPES})
    monkeypatch.setattr(tune, "STREAM_CALLS", 2)
    monkeypatch.setattr(tune, "DECODER_STEPS", 2)
    out = tmp_path / "policy.json"
    assert tune.main(["--budget", "0", "--out", str(out)]) == 0
    table = policy.read(out)
    assert set(table["rankings"]["cpu"]) == set(policy.keys())
    for key, ranked in table["rankings"]["cpu"].items():
        assert set(ranked) >= set(tune.candidates(key.split()[1])) | {"torch"}
        assert set(table["times_ms"][key]) == set(tune.candidates(key.split()[1]))
    monkeypatch.setenv("FASTRNN_POLICY", str(out))
    policy.forget()
    try:
        assert policy.current()["source"].startswith(f"tuned on {policy.cpu_model()}")
        from fastrnn.info import policy_report
        report = "\n".join(policy_report())
        assert str(out) in report and "lstm seq inference B1" in report
    finally:
        policy.forget()


def test_tune_ranks_a_class_by_both_ends_of_its_band(monkeypatch):
    """A sequence class is timed at both ends of its hidden-size band (H_SMALL and H_NARROW up to NARROW_H,
    H_MIDDLE and H_MIDDLE_TOP up to WIDE_H) and ranked by the geometric mean: a backend ahead at one end only
    (cpp up to WIDE_H: 1.0 against 1.5 ms at H_MIDDLE_TOP, 2.0 against 1.0 at H_MIDDLE) is not first. The
    band above WIDE_H is timed at H_WIDE alone."""
    widths = []  # the hidden size of each sequence call made; measure() times a width's calls right after
    ms = {tune.H_SMALL: {"cpp": 1.0, "torch": 1.2}, tune.H_NARROW: {"cpp": 1.1, "torch": 1.0},
          tune.H_MIDDLE: {"cpp": 2.0, "torch": 1.0}, tune.H_MIDDLE_TOP: {"cpp": 1.0, "torch": 1.5},
          tune.H_WIDE: {"cpp": 1.0, "torch": 1.5}}

    def seq_call(family, cls, backend, state, x, T, B):
        widths.append(x.shape[-1])
        return lambda: None

    def medians(fns, budget_s, min_rounds=5):  # the width of the calls just made; numba 3.0 at every width
        return {n: ms[widths[-1]].get(n, 3.0) for n in fns}
    monkeypatch.setattr(tune, "_seq_call", seq_call)
    monkeypatch.setattr(tune, "_step_call", lambda *a: (lambda: None))
    monkeypatch.setattr(tune, "interleaved_medians", medians)
    table = tune.measure(0, log=lambda *a: None)
    ranked, times = table["rankings"]["cpu"], table["times_ms"]
    assert ranked["lstm seq training B32+"][:2] == ["torch", "cpp"]
    assert times["lstm seq training B32+"]["torch"] == pytest.approx(1e3 * 1.5 ** 0.5)
    assert times["lstm seq training B32+"]["cpp"] == pytest.approx(1e3 * 2.0 ** 0.5)
    assert ranked[f"lstm seq training B32+{policy.NARROW}"][:2] == ["cpp", "torch"]
    assert times[f"lstm seq training B32+{policy.NARROW}"]["cpp"] == pytest.approx(1e3 * 1.1 ** 0.5)
    assert ranked[f"lstm seq training B32+{policy.WIDE}"][:2] == ["cpp", "torch"]  # timed at H_WIDE only
    assert times[f"lstm seq training B32+{policy.WIDE}"]["torch"] == pytest.approx(1.5e3)
    assert set(widths) == {tune.H_SMALL, tune.H_NARROW, tune.H_MIDDLE, tune.H_MIDDLE_TOP, tune.H_WIDE}


def test_bad_tables(monkeypatch, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 99}))
    monkeypatch.setenv("FASTRNN_POLICY", str(bad))
    policy.forget()
    try:
        with pytest.raises(ValueError, match="not a fastrnn policy table"):
            policy.current()
        # a broken cache (not named explicitly) falls back to the built-in table, saying why
        monkeypatch.delenv("FASTRNN_POLICY")
        monkeypatch.setenv("FASTRNN_CACHE_DIR", str(tmp_path))
        policy.forget()
        policy.cache_path().write_text("{not json")
        assert policy.current()["source"].startswith("built-in default (the cache")
        assert policy.current()["rankings"] == policy.builtin()["rankings"]
    finally:
        policy.forget()


def test_a_table_naming_an_unknown_backend_is_refused(monkeypatch, tmp_path):
    path = _write_table(tmp_path / "p.json", ("cpp", "fastest"))
    with pytest.raises(ValueError, match=r"unknown backend name\(s\) \['fastest'\]"):
        policy.read(path)


def test_the_fast_paths_follow_a_new_table_at_once(use_table):
    """The modules cache their fast-path choice; a new table (tune, FASTRNN_POLICY) takes effect at once."""
    m = fastrnn.GRUCell(5, 8)
    x, h = torch.randn(1, 5), torch.zeros(1, 8)
    kernel = dispatch.available_backends("cpu")[0]
    with torch.no_grad():
        for ranking, want in ((TORCH_FIRST, "torch"), (KERNEL_FIRST, kernel), (TORCH_FIRST, "torch")):
            use_table(ranking)
            with dispatch.record_calls() as ran:
                m(x, h)
            assert backends_used(ran) == {want}


def test_training_mode_takes_the_training_class(use_table, tmp_path, monkeypatch):
    """A module in training mode takes the training class even under no_grad (a reentrant checkpoint's
    forward, recomputed with grad in the backward, must run the same backend), and autocast never goes
    to torch (torch.nn would compute in the autocast dtype; fastrnn keeps the module's)."""
    table = {k: (TORCH_FIRST if "training" in k else KERNEL_FIRST) for k in policy.keys()}
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps({"format": policy.FORMAT, "rankings": {"cpu": table}}))
    monkeypatch.setenv("FASTRNN_POLICY", str(path))
    policy.forget()
    m = fastrnn.LSTM(5, 8, num_layers=2, dropout=0.5)
    x = torch.randn(6, 3, 5)
    for train, grad, want in ((True, False, "torch"), (True, True, "torch"), (False, False, None),
                              (False, True, "torch")):
        m.train(train)
        with torch.set_grad_enabled(grad), dispatch.record_calls() as ran:
            m(x.requires_grad_(grad) if grad else x.detach())
        assert backends_used(ran) == {want or dispatch.available_backends("cpu")[0]}, (train, grad)
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16), dispatch.record_calls() as ran:
        y = m(x)[0]
    assert backends_used(ran) == {dispatch.available_backends("cpu")[0]} and y.dtype == torch.bfloat16


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_torch_served_fast_paths_keep_fastrnns_state_checks(use_table, grad):
    """Where the fast paths hand a call to torch.nn (with autograd too: the cells in training, a decoder's
    steps), the calls torch.nn words obscurely still get fastrnn's messages."""
    use_table(TORCH_FIRST)
    cell, seq = fastrnn.GRUCell(5, 8), fastrnn.GRU(5, 8)
    with torch.set_grad_enabled(grad):
        with pytest.raises(RuntimeError, match="hx has dtype torch.float64 but the input has dtype torch.float32"):
            cell(torch.randn(2, 5), torch.zeros(2, 8, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="hx has dtype torch.float64 but the input has dtype torch.float32"):
            seq(torch.randn(1, 2, 5), torch.zeros(1, 2, 8, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="GRUCell: hidden state must be 1D for 1D input, got 2D"):
            cell(torch.randn(5), torch.zeros(3, 8))


def test_one_step_training_calls_have_their_own_class(tmp_path, monkeypatch):
    """A decoder's steps in training (a sequence module called one step at a time, the state carried, one
    backward) are the class 'training T1': torch.nn there, a kernel for the same module's longer calls; the
    gradients are torch.nn's either way."""
    table = {k: (TORCH_FIRST if "training T1" in k else KERNEL_FIRST) for k in policy.keys()}
    path = tmp_path / "t1.json"
    path.write_text(json.dumps({"format": policy.FORMAT, "rankings": {"cpu": table}}))
    monkeypatch.setenv("FASTRNN_POLICY", str(path))
    policy.forget()
    try:
        torch.manual_seed(0)
        ref = torch.nn.GRU(5, 8)
        m = fastrnn.GRU(5, 8)
        m.load_state_dict(ref.state_dict())
        x = torch.randn(4, 3, 5)
        for T, want in ((1, "torch"), (2, dispatch.available_backends("cpu")[0])):
            grads = []
            for mod in (ref, m):
                mod.zero_grad()
                h, loss = None, 0
                with dispatch.record_calls() as ran:
                    for t in range(0, 4, T):
                        y, h = mod(x[t:t + T], h)
                        loss = loss + (y * y).sum()
                loss.backward()
                grads.append([p.grad for p in mod.parameters()])
            assert backends_used(ran) == {want}, T
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b)
    finally:
        policy.forget()


def test_builtin_tables_send_one_step_training_to_cpps_node():
    """Decoders trained step by step (cells, one-step sequences): cpp's one-step node first, torch.nn next."""
    for vendor in ("amd", "intel"):
        ranks = policy.builtin(vendor)["rankings"]["cpu"]
        for f in policy.FAMILIES:
            assert ranks[f"{f} step training"][:2] == ("cpp", "torch")
            for wide in ("", policy.NARROW, policy.WIDE):
                assert ranks[f"{f} seq training T1{wide}"][:2] == ("cpp", "torch")


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_torch_hand_over_with_autograd_is_torch_nn(use_table, name):
    """Training calls the table sends to torch.nn run its forward from the fast path, before fastrnn's own
    checks: the same outputs and gradients as torch.nn's module, and for bad input the same error type
    (fastrnn's message where torch.nn's is obscure: test_torch_served_fast_paths_keep_fastrnns_state_checks)."""
    use_table(TORCH_FIRST)
    torch.manual_seed(0)
    cell = name.endswith("Cell")
    ref = getattr(torch.nn, name)(5, 8)
    m = getattr(fastrnn, name)(5, 8)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5) if cell else torch.randn(4, 3, 5)
    results = []
    for mod in (ref, m):
        xg = x.clone().requires_grad_()
        with dispatch.record_calls() as ran:
            out = mod(xg)
        y = (out[0] if isinstance(out, tuple) else out) if cell else out[0]
        (y * y).sum().backward()
        results.append([y.detach(), xg.grad] + [p.grad for p in mod.parameters()])
    assert backends_used(ran) == {"torch"}
    for a, b in zip(*results):
        assert torch.equal(a, b)
    bad = [torch.randn(3, 4)] if cell else [torch.randn(4, 3, 4), torch.randn(4, 3, 5, 1)]
    for xb in bad:
        with pytest.raises(Exception) as theirs:
            ref(xb.requires_grad_())
        with pytest.raises(type(theirs.value)):
            m(xb)
