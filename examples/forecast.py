"""Time-series forecaster: a window of past values -> 2-layer LSTM (or GRU) -> the next value.

    python -m examples.forecast [--backend torch|auto|cpp|numba|...] [--epochs N] [--cell LSTM|GRU]
                                [--window W] [--plot PATH] [--device cpu]

The data are the yearly sunspot numbers 1700-2008 that statsmodels ships (``statsmodels.datasets.sunspots``).
The series is split in time: the last fifth is held out for validation, the rest trains; values are
normalized with the training part's mean and deviation. Each example is a window of ``W`` past years and
the target the next year. The report gives the validation RMSE (in sunspot numbers) against two naive
forecasts: the last value, and the value one solar cycle (11 years) earlier. ``--plot PATH`` writes a PNG
of the one-step forecasts against the truth over the held-out years.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn

from .common import BackendError, EpochTimer, add_common_args, batches, progress, rnn_class

CYCLE = 11  # years: the seasonal-naive forecast repeats the value of one solar cycle before


class DataError(Exception):
    """Data that cannot be had: the message says what and how to fix it."""


def load_sunspots():
    """(years, values) as float64 tensors."""
    try:
        from statsmodels.datasets import sunspots
    except ImportError as e:
        raise DataError("the forecaster's data (yearly sunspot numbers) ship in the 'statsmodels' package, which is "
                        "not installed: pip install statsmodels (make examples installs it)") from e
    d = sunspots.load_pandas().data
    return torch.tensor(d["YEAR"].to_numpy()), torch.tensor(d["SUNACTIVITY"].to_numpy())


def windows(series, window, start, stop):
    """Inputs [N, window, 1] and targets [N] for the targets series[start:stop]."""
    idx = torch.arange(max(start, window), stop)
    x = torch.stack([series[i - window:i] for i in idx]).unsqueeze(-1)
    return x, series[idx], idx


def prepare(values, window, held_out=0.2):
    """Normalized float32 training and validation windows, split in time, and the normalization."""
    n = len(values)
    split = n - int(n * held_out)
    mean, std = values[:split].mean(), values[:split].std()
    z = ((values - mean) / std).float()
    train = windows(z, window, 0, split)
    valid = windows(z, window, split, n)
    return train, valid, (float(mean), float(std)), split


class Forecaster(nn.Module):
    def __init__(self, rnn, hidden=64, layers=2):
        super().__init__()
        self.rnn = rnn(1, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1]).squeeze(-1)


def build(cell, backend, seed, device="cpu", **kw):
    rnn = rnn_class(cell, backend, device)
    torch.manual_seed(seed)  # the same initial weights for torch.nn and every fastrnn backend
    return Forecaster(rnn, **kw).to(device)


def rmse(model, x, y, std, device):
    model.eval()
    with torch.no_grad():
        pred = model(x.to(device)).cpu()
    model.train()
    return float(((pred - y) ** 2).mean().sqrt()) * std, pred


def naive_rmse(values, split):
    """Validation RMSE of the last-value and the seasonal-naive (one cycle back) forecasts."""
    truth = values[split:]
    last = values[split - 1:-1]
    seasonal = values[split - CYCLE:len(values) - CYCLE]
    return float(((truth - last) ** 2).mean().sqrt()), float(((truth - seasonal) ** 2).mean().sqrt())


def train(model, train_set, valid_set, std, *, epochs, batch_size=32, lr=3e-3, seed=0, device="cpu", quiet=True,
          max_steps=None, log=None):
    """Adam on the mean squared error. Returns {"losses": per step, "epochs": [(mean loss, validation RMSE,
    seconds)], "timer"}."""
    (x, y, _), (xv, yv, _) = train_set, valid_set
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses, out, timer = [], [], EpochTimer()
    for epoch in range(epochs):
        with timer:
            total = 0.0
            for idx in progress(batches(len(x), batch_size, gen), f"epoch {epoch + 1}/{epochs}", quiet):
                loss = nn.functional.mse_loss(model(x[idx].to(device)), y[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                total += loss.item() * len(idx)
                if max_steps is not None and len(losses) >= max_steps:
                    break
        err, _ = rmse(model, xv, yv, std, device)
        out.append((total / len(x), err, timer.times[-1]))
        if log:
            log(f"epoch {epoch + 1}/{epochs}: loss {out[-1][0]:.4f}, validation RMSE {err:.2f}, {timer.times[-1]:.2f} s")
        if max_steps is not None and len(losses) >= max_steps:
            break
    return {"losses": losses, "epochs": out, "timer": timer}


def plot(path, years, values, valid_idx, pred, mean, std, cell):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(years.numpy(), values.numpy(), color="0.6", lw=1, label="sunspot number")
    ax.plot(years[valid_idx].numpy(), (pred * std + mean).numpy(), color="C3", lw=1.5,
            label=f"{cell} one-step forecast")
    ax.axvline(float(years[valid_idx[0]]), color="k", ls=":", lw=1)
    ax.set_xlabel("year")
    ax.set_title("yearly sunspot numbers: held-out years right of the dotted line")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, epochs=20)
    ap.add_argument("--cell", choices=["LSTM", "GRU"], default="LSTM")
    ap.add_argument("--window", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--plot", help="write a PNG of forecast against truth on the held-out years")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        years, values = load_sunspots()
        rnn_class(args.cell, args.backend, args.device)  # an unavailable backend fails here, with its reason
    except (DataError, BackendError) as e:
        sys.exit(f"error: {e}")
    train_set, valid_set, (mean, std), split = prepare(values, args.window)
    last, seasonal = naive_rmse(values, split)
    print(f"sunspots {int(years[0])}-{int(years[-1])}: {len(train_set[0])} training windows, validation "
          f"{int(years[split])}-{int(years[-1])}; naive RMSE: last value {last:.2f}, one cycle back {seasonal:.2f}")
    model = build(args.cell, args.backend, args.seed, args.device)
    print(f"backend {args.backend}: {type(model.rnn).__module__}.{type(model.rnn).__name__}")
    res = train(model, train_set, valid_set, std, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                device=args.device, quiet=args.quiet, log=print if not args.quiet else None)
    err, pred = rmse(model, valid_set[0], valid_set[1], std, args.device)
    print(f"validation RMSE {err:.2f} (naive: last value {last:.2f}, one cycle back {seasonal:.2f}); time per epoch: "
          f"{res['timer'].summary()}")
    if args.plot:
        plot(args.plot, years, values, valid_set[2], pred, mean, std, args.cell)
        print(f"wrote {args.plot}")
    return res, err, (last, seasonal)


if __name__ == "__main__":
    main()
