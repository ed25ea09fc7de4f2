"""Two benchmark runs side by side: ``python -m benchmarks.compare OLD.json NEW.json``.

Reads the ``latest.json`` files that ``python -m benchmarks.run`` writes and prints, for every case and
provider in either run, its speed against torch.nn in each run (``x torch``: torch's median time over the
provider's, both from the same run) and the change. A drop is flagged when it is larger than the two runs'
own noise: the relative change of the ratio must exceed the sum, over both runs, of the relative p20-p80
spread of the provider's and of torch's times (a ratio of two medians moves by about the sum of their
spreads). The runs may come from different machines; the header says which.

Exit status: 0, or 1 when a drop was flagged (so a script can stop a change that costs speed) or a case
that ran before fails now.
"""
from __future__ import annotations

import argparse
import json
import sys

KEY = ("cell", "mode", "shape", "layers", "bidirectional", "packed", "proj", "dtype")


def _case(r):
    return tuple(r.get(k) for k in KEY)


def _spread(r):
    """The relative p20-p80 spread of a result's time (0 when it has none)."""
    p50 = r.get("p50_ms") or 0.0
    if not p50 or r.get("p20_ms") is None or r.get("p80_ms") is None:
        return 0.0
    return (r["p80_ms"] - r["p20_ms"]) / p50


def _index(run):
    """{(case, provider): result} and {case: torch's result} of one run."""
    by, torch_rows = {}, {}
    for r in run["results"]:
        by[_case(r), r["provider"]] = r
        if r["provider"] == "torch" and not r.get("failure"):
            torch_rows[_case(r)] = r
    return by, torch_rows


def _ratio(r, torch_row):
    if r is None or r.get("failure") or torch_row is None or not r.get("p50_ms"):
        return None
    return torch_row["p50_ms"] / r["p50_ms"]


def compare(old, new):
    """One row per (case, provider) in either run: dict(case, provider, old, new, change, noise, flag), with
    old/new the x-torch ratios (None where the run lacks the case or it failed) and flag one of
    '' (within noise, or better), 'DROP', 'FAILS NOW', 'only old', 'only new'."""
    (o_by, o_torch), (n_by, n_torch) = _index(old), _index(new)
    rows = []
    for key in sorted(set(o_by) | set(n_by), key=lambda k: tuple(str(x) for x in (*k[0], k[1]))):
        case, provider = key
        ro, rn = o_by.get(key), n_by.get(key)
        xo, xn = _ratio(ro, o_torch.get(case)), _ratio(rn, n_torch.get(case))
        noise = None
        change = None
        flag = ""
        if ro is None:
            flag = "only new"
        elif rn is None:
            flag = "only old"
        elif xo is not None and (rn.get("failure") or xn is None) and provider != "torch":
            flag = "FAILS NOW"
        if xo is not None and xn is not None:
            change = xn / xo - 1.0
            noise = _spread(ro) + _spread(rn)
            if provider != "torch":
                noise += _spread(o_torch[case]) + _spread(n_torch[case])
            if -change > noise:
                flag = "DROP"
        rows.append(dict(case=case, provider=provider, old=xo, new=xn, change=change, noise=noise, flag=flag))
    return rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _env(run):
    e = run.get("environment", {})
    return (f"{e.get('hardware', '?')}, {e.get('threads', '?')} threads, torch {e.get('torch', '?')}, "
            f"fastrnn {e.get('git_sha', '?')}, {e.get('date', '?')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="the earlier run's latest.json")
    ap.add_argument("new", help="the later run's latest.json")
    ap.add_argument("--all", action="store_true", help="also print the torch rows (always 1.00x)")
    args = ap.parse_args(argv)
    with open(args.old) as f:
        old = json.load(f)
    with open(args.new) as f:
        new = json.load(f)
    rows = compare(old, new)
    print(f"OLD: {_env(old)}")
    print(f"NEW: {_env(new)}")
    print(f"{'cell':5} {'mode':9} {'shape':16} {'variant':14} {'provider':18} {'old x':>7} {'new x':>7} "
          f"{'change':>7} {'noise':>6}  flag")
    for r in rows:
        if r["provider"] == "torch" and not args.all:
            continue
        cell, mode, shape, layers, bidir, packed, proj, dtype = r["case"]
        variant = f"L{layers}{' bi' if bidir else ''}{' packed' if packed else ''}{f' p{proj}' if proj else ''}"
        print(f"{cell:5} {mode:9} {shape:16} {variant:14} {r['provider']:18} {_fmt(r['old'], '7.2f')} "
              f"{_fmt(r['new'], '7.2f')} {_fmt(r['change'], '+7.1%')} {_fmt(r['noise'], '6.1%')}  {r['flag']}")
    bad = [r for r in rows if r["flag"] in ("DROP", "FAILS NOW")]
    print(f"{len(bad)} case(s) slower than the runs' noise or failing now" if bad else
          "no drop beyond the runs' noise")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
