"""The examples (examples/): each is also a check. Same seed, same initial weights: torch.nn and every CPU
backend give the same loss trajectory over the first steps (relative 1e-4, float32); a short training beats
the baseline; the loaders for users' own data; data-parallel training equals single-process training on the
whole batch; bad input gets one clear message."""

import pytest
import torch

import fastrnn
from fastrnn import dispatch
from conftest import CPU_BACKENDS, backends_used

from examples import ddp_train, forecast
from examples import text_classify as tc

pytest.importorskip("faker", reason="the examples' data package (pip install faker; make test installs it)")
pytest.importorskip("statsmodels", reason="the examples' data package (pip install statsmodels; make test installs it)")


def _rel(a, b):
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def names():
    texts, labels, classes = tc.load_names()
    return tc.prepare(texts, labels, "char", seed=0), classes


def _classifier_losses(names, backend, steps=8):
    (vocab, train_set, test_set), classes = names
    model = tc.build(len(vocab), len(classes), backend, seed=0)
    return tc.train(model, train_set, test_set, epochs=1, max_steps=steps)["losses"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_text_classifier_same_losses_as_torch(names, backend):
    want = _classifier_losses(names, "torch")
    with dispatch.record_calls() as ran:
        got = _classifier_losses(names, backend)
    assert backends_used(ran) == {backend}
    assert len(got) == len(want) == 8
    assert _rel(got, want) <= 1e-4, (got, want)


def test_text_classifier_learns(names):
    """One epoch (automatic backend) on the names: held-out accuracy well above the majority class."""
    (vocab, train_set, test_set), classes = names
    majority = max(torch.bincount(torch.tensor([y for _, y in test_set]))).item() / len(test_set)
    model = tc.build(len(vocab), len(classes), "auto", seed=0)
    assert type(model.rnn) is fastrnn.LSTM
    acc = tc.train(model, train_set, test_set, epochs=1)["epochs"][-1][1]
    assert 0.25 < majority < 0.4 and acc > majority + 0.2, (acc, majority)


@pytest.fixture(scope="module")
def sunspots():
    years, values = forecast.load_sunspots()
    train_set, valid_set, (mean, std), split = forecast.prepare(values, 24)
    return values, train_set, valid_set, std, split


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forecaster_same_losses_as_torch(sunspots, backend, cell):
    values, train_set, valid_set, std, _ = sunspots

    def losses(b):
        model = forecast.build(cell, b, seed=0)
        return forecast.train(model, train_set, valid_set, std, epochs=2, max_steps=10)["losses"]

    want = losses("torch")
    with dispatch.record_calls() as ran:
        got = losses(backend)
    assert backends_used(ran) == {backend}
    assert len(got) == 10 and _rel(got, want) <= 1e-4, (got, want)


def test_forecaster_beats_the_naive_forecasts(sunspots, tmp_path):
    values, train_set, valid_set, std, split = sunspots
    last, seasonal = forecast.naive_rmse(values, split)
    model = forecast.build("LSTM", "auto", seed=0)
    res = forecast.train(model, train_set, valid_set, std, epochs=20)
    err = res["epochs"][-1][1]
    assert err < 0.85 * min(last, seasonal), (err, last, seasonal)
    # the command line end to end, with the plot
    path = tmp_path / "f.png"
    forecast.main(["--epochs", "1", "--quiet", "--plot", str(path), "--cell", "GRU"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loaders_for_users_data(tmp_path, capsys):
    csv = tmp_path / "d.csv"
    rows = [("a great film, loved it", "pos"), ("dull and far too long", "neg")] * 20
    csv.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows), encoding="utf-8")
    texts, labels, classes = tc.load_csv(csv)
    assert classes == ["neg", "pos"] and len(texts) == 40 and texts[0] == rows[0][0] and labels[:2] == [1, 0]
    root = tmp_path / "imdb"
    for k, (t, y) in enumerate(rows):
        (root / y).mkdir(parents=True, exist_ok=True)
        (root / y / f"{k}.txt").write_text(t, encoding="utf-8")
    (root / "pos" / "notes.md").write_text("not an example")
    dtexts, dlabels, dclasses = tc.load_dir(root)
    assert dclasses == ["neg", "pos"] and sorted(dtexts) == sorted(texts)
    for argv in (["--csv", str(csv)], ["--dir", str(root)]):
        res = tc.main(argv + ["--epochs", "3", "--quiet", "--batch-size", "8"])
        assert res["epochs"][-1][1] == 1.0  # word-level, two separable classes
    assert "word tokens" in capsys.readouterr().out


@pytest.mark.parametrize("content,match", [
    ("words,label\nhi,a\n", r"header row naming the columns 'text' and 'label'.*got columns \['label', 'words'\]"),
    ("", r"header row naming the columns 'text' and 'label'"),
    ("text,label\nhi\n", r"rows \[2\] have fewer fields"),
])
def test_bad_csv(tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(tc.DataError, match=match):
        tc.load_csv(p)
    with pytest.raises(SystemExit, match="^error: .*bad.csv"):
        tc.main(["--csv", str(p)])


def test_missing_files_and_dirs(tmp_path):
    with pytest.raises(tc.DataError, match=r"cannot read the CSV file .*nope.csv"):
        tc.load_csv(tmp_path / "nope.csv")
    with pytest.raises(tc.DataError, match="is not a directory"):
        tc.load_dir(tmp_path / "nope")
    (tmp_path / "one" / "a").mkdir(parents=True)
    with pytest.raises(tc.DataError, match="at least two sub-directories"):
        tc.load_dir(tmp_path / "one")


def test_missing_data_packages(monkeypatch):
    import builtins
    real = builtins.__import__

    def no(name, *a, **k):
        if name.startswith(("faker", "statsmodels")):
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no)
    monkeypatch.setattr(tc.importlib, "import_module", lambda n: no(n))
    with pytest.raises(SystemExit, match=r"'faker' package, which is not installed: pip install faker"):
        tc.main([])
    with pytest.raises(SystemExit, match=r"'statsmodels' package, which is not installed: pip install statsmodels"):
        forecast.main([])


def test_unavailable_backend_gets_fastrnns_error():
    with pytest.raises(SystemExit, match=r"^error: BackendNotSupportedError: fastrnn backend 'cpp' cannot run .*"
                                         r"device 'cuda' is not supported"):
        tc.main(["--backend", "cpp", "--device", "cuda"])
    with pytest.raises(SystemExit, match=r"^error: ValueError: Unknown fastrnn backend 'fast'"):
        forecast.main(["--backend", "fast"])
    with pytest.raises(SystemExit, match=r"^error: BackendNotSupportedError: .*'numba' cannot run .*device 'cuda'"):
        ddp_train.main(["--backend", "numba", "--device", "cuda"])


def test_ddp_equals_single_process_training(tmp_path):
    """2 processes (gloo), 3 steps of global batches of 64 on 600 names: the parameters equal one process
    trained on the whole batches (relative 1e-5). SGD: Adam's first step is lr * sign(g), which turns a
    rounding difference in a near-zero gradient (the processes sum in another order) into a step of 2 lr."""
    args = ddp_train.parser().parse_args(["--quiet", "--optimizer", "sgd"])
    out = tmp_path / "ddp.pt"
    ddp_train.launch(2, args, max_steps=3, subset=600, out=str(out))
    got = torch.load(out)
    want = ddp_train.run(0, 1, args, max_steps=3, subset=600)
    texts, labels, classes = tc.load_names()
    vocab = tc.prepare(texts[:600], labels[:600], "char", 0)[0]
    start = tc.build(len(vocab), len(classes), "auto", 0).state_dict()
    assert set(got) == set(want) == set(start)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=1e-5, msg=k)
        assert not torch.equal(want[k], start[k]), k  # every parameter trained
