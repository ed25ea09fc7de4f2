"""The automatic choice's policy table: for each call shape class, the backends ranked by measured speed.

``fastrnn.dispatch`` consults it for a float32 call of a plain cell on dense input (no proj_size, no
PackedSequence, none of fastrnn's additions: what the table measures) whose shape class the module
passes; every other call follows the static priority lists in ``fastrnn.dispatch``. On CUDA, every dtype. A class
is a short string (``shape_class``): the scope (whole sequences or one cell step), inference or
training (a gradient will follow), and the batch size in four bands (1, 2-7, 8-31, 32+); a sequence call of one step
(in inference the chunks of a stream, in training a decoder's steps) is a class of its own. Sequence classes come in
three hidden-size bands: up to NARROW_H, up to WIDE_H, and above. A ranking lists backend
names fastest first, ``torch`` (torch.nn's own implementation) among them; the automatic choice takes the first that
can serve the call and is allowed (``torch`` is skipped while torch.compile or another tracer records the call), then
the static priority.

Where the table comes from, first match wins:

1. ``FASTRNN_POLICY``: ``builtin`` (the built-in table, whatever is cached), ``static`` (no table: the
   static priority of fastrnn's own backends, never ``torch``; the tests of the kernels run so), or the
   path of a JSON file that ``python -m fastrnn.tune --out`` wrote;
2. the cache that ``python -m fastrnn.tune`` writes for this CPU model (``cache_path()``);
3. ``builtin()``: measured on the machines this project runs on, one table per CPU vendor
   (benchmarks/NOTES.md, "The policy table").

On CUDA the plain cells go to ``torch`` (cuDNN) until the GPU check (``benchmarks/gpu_check.sh``) has
measured triton faster for a case; triton serves what cuDNN lacks.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

FORMAT = 4  # 4: the band H<=NARROW_H; 3: the class 'training T1'; 2: the batch bands B2-7 and B8-31 (1 had B2-31)
FAMILIES = ("lstm", "gru", "rnn")
#: sequences: inference or training x batch band (or a one-step chunk), each for hidden sizes up to
#: WIDE_H and above it (where the weights leave the L2s and the backends' order changes: LSTM B8 H1024,
#: cpp 1.36x torch.nn, against 0.84x at B16 H256; benchmarks/NOTES.md)
WIDE_H = 384
#: and up to this hidden size, where cpp leads the LSTM from batch 8 in training and from 32 in inference while
#: torch.nn's oneDNN leads from H256 (benchmarks/NOTES.md, "A narrow hidden-size band", twenty-seventh session)
NARROW_H = 192
#: batch bands: the LSTM order changes inside 2-31 (cpp ahead at B4, torch.nn's oneDNN from B8 at H=256,
#: benchmarks/NOTES.md, "A hidden-size band in the policy table")
BANDS = ("B1", "B2-7", "B8-31", "B32+")
_SEQ_BASE = (*(f"inference {b}" for b in BANDS), "inference T1", *(f"training {b}" for b in BANDS), "training T1")
#: the suffix of each hidden-size band's classes: up to NARROW_H, up to WIDE_H (none), above WIDE_H
NARROW, WIDE = f" H<={NARROW_H}", f" H>{WIDE_H}"
#: the suffix of a bidirectional module's sequence classes, which the tables do not hold: ``ranking`` reads the
#: class without it, and for the LSTM moves ``cpp`` to just before ``torch``. torch.nn's bidirectional LSTM took
#: 2.8x its one direction in training (T100 B16 H256: 45.4 ms against 16.1; cpp 33.8), so cpp led every
#: bidirectional case measured where the tables rank torch.nn first: training 1.02-1.41x (T25-100, B8-128,
#: H64-512), inference 1.03-1.07x (B32-64, H256-512), on the Zen 5 EPYC; training T100 B16 H256 L2 1.04x on the
#: Zen 4, where one direction reads 0.90x (benchmarks/NOTES.md, twenty-ninth session)
BI = " bi"
SEQ_CLASSES = _SEQ_BASE + tuple(c + NARROW for c in _SEQ_BASE) + tuple(c + WIDE for c in _SEQ_BASE)
STEP_CLASSES = ("inference B1", "inference B2+", "training")


def shape_class(scope: str, grad: bool, B: int, T: int = 0, H: int = 0, bidirectional: bool = False) -> str:
    """The class of a call: ``scope`` 'seq' or 'step', ``grad`` whether it is training (a backward will
    follow, or the module is in training mode: ``_BackendMixin._training_class``), batch B, steps T and
    hidden size H (sequences; 0, not given, counts as the band up to WIDE_H); a bidirectional sequence's class
    ends in ``BI`` (``ranking``)."""
    if scope == "step":
        return "training" if grad else ("inference B1" if B == 1 else "inference B2+")
    width = WIDE if H > WIDE_H else NARROW if 0 < H <= NARROW_H else ""
    bi = BI if bidirectional else ""
    if T == 1:
        return ("training T1" if grad else "inference T1") + width + bi
    band = "B1" if B == 1 else "B2-7" if B < 8 else "B8-31" if B < 32 else "B32+"
    return ("training " if grad else "inference ") + band + width + bi


def keys() -> list[str]:
    """Every key of a CPU table: '<family> <scope> <class>'."""
    return [f"{f} {s} {c}" for f in FAMILIES for s, classes in (("seq", SEQ_CLASSES), ("step", STEP_CLASSES))
            for c in classes]


# The built-in rankings (fastest first), one table per CPU vendor, from measurements on the machines of
# this project (benchmarks/NOTES.md, "The policy table"): AMD from `python -m fastrnn.tune` runs on a Zen 4
# EPYC (three on 2026-12-03 before the batch bands of format 2, two after them and after the chunk op
# took every dense inference sequence); Intel from `make bench` on a Xeon (2026-12-01) for the classes it
# times (sequences at batch 1, 16 and 64, one-step chunks, batch-1 cells) and the AMD ranking for the
# others. A CPU of another vendor gets the Intel table.
def _table(seq_lstm, seq_other, t1, step, t1_train):
    out = {}
    for f in FAMILIES:
        for c in SEQ_CLASSES:
            out[f"{f} seq {c}"] = (t1[f] if c.startswith("inference T1") else t1_train[f] if c.startswith("training T1")
                                   else seq_lstm[c] if f == "lstm" else seq_other)
        for c in STEP_CLASSES:
            out[f"{f} step {c}"] = step[f][c]
    return out


_CNT = ("cpp", "numba", "torch", "reference")
_CTN = ("cpp", "torch", "numba", "reference")
_TCN = ("torch", "cpp", "numba", "reference")
_STEP_T = ("torch", "cpp", "numba", "reference")
_STEP_C = ("cpp", "torch", "numba", "reference")
_STEP_N = ("numba", "cpp", "torch", "reference")
# the LSTM above WIDE_H (tune at H=768, two runs): cpp first in inference B8-31 (22.3 / 23.7 ms against
# torch.nn's 27.7 / 24.4; B32+ was a tie, 42.4 / 40.9 against 42.7 / 42.6: below), torch.nn's oneDNN in
# training from B8 (72.5 vs 80.5 ms at B16). In training at B1 and B2-7 numba led at H=768 (14.9 / 18.6 ms
# at B1 against cpp's 16.4 / 20.9; the GRU too) but not at H=512 (benchmark run at 06bb7bb: LSTM cpp 19.0,
# numba 20.0; GRU cpp 16.8, numba 18.0): cpp stays first until a band tells the two apart (NOTES.md).
# Since the fifteenth session's fused projection and products, cpp also leads in training from B8 (two tune
# runs: B16 61.0 / 60.9 ms against torch.nn's 65.8 / 64.9; B64 119.7 / 114.3 against 122.6 / 128.0).
# Inference B32+ is a tie that the machine's phase decides: at B64 H512 cpp read 0.92-0.97x torch.nn in
# six of seven interleaved measurements of the sixteenth session (one 1.09x), 0.92x in the fifteenth's last
# sitting and 1.04x in its closing run; both run the products at the peak (NOTES.md, sixteenth session):
# torch.nn first, as up to WIDE_H.
_AMD_LSTM_WIDE = {f"{c} H>{WIDE_H}": r for c, r in (
    ("inference B1", _CNT), ("inference B2-7", _CNT), ("inference B8-31", _CTN), ("inference B32+", _TCN),
    ("inference T1", _CNT), ("training B1", _CNT), ("training B2-7", _CTN), ("training B8-31", _CTN),
    ("training B32+", _CTN))}
# cells: numba's fused cell ahead of cpp's from B2 in inference (B16, two tune runs, ms: LSTM 8.5 / 7.3
# against 10.2 / 8.0, GRU 5.6 / 5.4 against 6.1 / 6.1, RNN 2.6 / 3.1 against 2.6 / 4.6). In training cpp
# since its one-step node (cell_train.h; two tune runs, ms, cpp / torch.nn: LSTM 13.3 / 18.3 and 18.5 /
# 18.8, GRU 12.0 / 14.3 and 14.5 / 15.0, RNN 4.1 / 4.8 and 6.5 / 6.8; benchmarks/NOTES.md, twenty-first session)
_AMD_STEP = {f: {"inference B1": _STEP_C, "inference B2+": _STEP_N, "training": _STEP_C} for f in FAMILIES}
# one-step sequences in training (a decoder's steps, the state carried, one backward at the end; the tune's
# call, 16 steps, B16, H64 and H256, ms, geometric mean): cpp since its one-step node runs each
# layer-direction (cell_train.h; two tune runs, cpp / torch.nn: LSTM 9.4 / 17.0 and 8.9 / 14.2, GRU 5.7 / 8.0
# and 8.5 / 9.4, RNN 6.1 / 6.4 and 5.0 / 5.3; H768: LSTM 130 / 215 and 135 / 228, GRU 84 / 97 and 116 / 112,
# RNN 23 / 25 and 32 / 34; benchmarks/NOTES.md, twenty-first session). Before it torch.nn led the GRU and RNN
# (twentieth session). The Intel table takes the AMD ranking (not measured there).
_AMD_T1_TRAIN = dict.fromkeys(FAMILIES, _CTN)
# the LSTM up to WIDE_H, since the fifteenth session (two tune runs, ms, cpp / torch.nn): cpp in inference
# up to B31 (B16: 9.0 / 9.9 and 10.6 / 10.9) and in training at B1-7 (B4: 8.8 / 9.2 and 11.0 / 11.7);
# torch.nn's oneDNN where the two runs split: inference B32+ (17.3 / 18.2, 20.1 / 19.0) and training
# B8-31 (31.6 / 32.5, 38.2 / 36.9). Training B32+ is torch.nn's since the nineteenth session: the tune's
# one shape (B64 H256 T50) read cpp ahead (59.2 / 66.3, 71.7 / 74.4, 55.5 / 62.3 ms), but across the
# band cpp x torch.nn read 0.63-0.87 at H64-128 and T25-50 (B32-128, in every run), 0.88-0.99 at H384 and
# 0.93-1.13 at H256 by the minute; cpp ahead only at H128-256 from T~75 (1.2x). torch.nn can be no
# slower than itself (benchmarks/NOTES.md, "LSTM training at B32+ across the band")
_AMD_LSTM = {"inference B1": _CNT, "inference B2-7": _CTN, "inference B8-31": _CTN, "inference B32+": _TCN,
             "training B1": _CTN, "training B2-7": _CTN, "training B8-31": _TCN, "training B32+": _TCN}
# up to NARROW_H since the row split of the twenty-fifth session, cpp x torch.nn over 37 shapes (T20-200,
# B8-512, H32-192, I16-256; benchmarks/NOTES.md, "A narrow hidden-size band"): inference B32+ 1.04-2.08,
# training B32+ 0.96-1.65 (geometric mean ~1.2; the lows at T20-30) and B8-31 0.98-1.30 (~1.07)
_AMD_LSTM_NARROW = {"inference B32+": _CTN, "training B8-31": _CTN, "training B32+": _CTN}
# AMD without AVX-512 (a Zen 3 EPYC, AVX2: one `python -m fastrnn.tune` run, 2026-12-07, ms, benchmarks/NOTES.md,
# thirty-fifth session): the AMD table but torch.nn's oneDNN first for the LSTM in inference at B8-31 up to WIDE_H
# (torch 26.6 / cpp 31.0; the benchmark's B16 H256: cpp 0.93x torch.nn) and at B32+ up to NARROW_H (11.0 / 11.6),
# and in training at B8-31 above WIDE_H (163 / 173). At B1 above WIDE_H that run had numba first (9.8 / cpp 11.3 /
# torch 13.0), the thirty-sixth session's two runs cpp (10.1 / 12.0 against numba 12.4 / 13.2): cpp, as the AMD
# table, which also spares that class numba's first-call compile. numba led other classes in those two runs by
# 3-40% (B8-31 and B32+ up to NARROW_H, B2-31 above WIDE_H): not taken, for the same compile (NOTES.md,
# thirty-sixth and thirty-seventh sessions)
# Training at B32+ above WIDE_H: torch.nn too (tune at H768 B64 T12, ms, torch / cpp: 243.2 / 261.0, then a tie,
# 239.6 / 238.9; the benchmark's T100 B64 H512: cpp 0.94x and 0.87x torch.nn in the thirty-sixth and thirty-seventh
# sessions, where the AMD table's cpp ran, then 1.09x in the review's run: a tie the machine's phase decides, and
# torch.nn is no slower than itself)
_AMD_AVX2_LSTM = {"inference B8-31": _TCN, f"inference B32+{NARROW}": _TCN, f"training B8-31{WIDE}": _TCN,
                  f"training B32+{WIDE}": _TCN}
_BUILTIN_CPU = {
    "amd": _table({**_AMD_LSTM, **{c + NARROW: _AMD_LSTM_NARROW.get(c, r) for c, r in _AMD_LSTM.items()},
                   **_AMD_LSTM_WIDE},
                  _CNT, dict.fromkeys(FAMILIES, _CTN), _AMD_STEP, _AMD_T1_TRAIN),
    "amd-avx2": _table({**_AMD_LSTM, **{c + NARROW: _AMD_LSTM_NARROW.get(c, r) for c, r in _AMD_LSTM.items()},
                        **_AMD_LSTM_WIDE, **_AMD_AVX2_LSTM},
                       _CNT, dict.fromkeys(FAMILIES, _CTN), _AMD_STEP, _AMD_T1_TRAIN),
    "intel": _table(dict.fromkeys(SEQ_CLASSES, _CTN), _CNT,
                    {"lstm": _CNT, "gru": _CTN, "rnn": _TCN},
                    {"lstm": {**_AMD_STEP["lstm"], "inference B1": _STEP_T}, "gru": _AMD_STEP["gru"],
                     "rnn": {**_AMD_STEP["rnn"], "inference B1": _STEP_T}}, _AMD_T1_TRAIN),
}


def cpuinfo_field(key: str) -> str | None:
    """The value of the first ``key`` line of /proc/cpuinfo ('model name', 'vendor_id', 'flags'), None where
    there is none (another OS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_vendor() -> str:
    """'amd', 'intel' or 'other', from /proc/cpuinfo."""
    return {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(cpuinfo_field("vendor_id"), "other")


def has_avx512() -> bool:
    """Does this CPU have AVX-512 (avx512f in /proc/cpuinfo's flags)?"""
    return "avx512f" in (cpuinfo_field("flags") or "").split()


def builtin(vendor: str | None = None) -> dict:
    """The built-in table for a CPU vendor: 'amd' (AMD with AVX-512), 'amd-avx2' (AMD without it), 'intel' (and
    any other vendor). By default this machine's."""
    if vendor is None:
        vendor = cpu_vendor()
        if vendor == "amd" and not has_avx512():
            vendor = "amd-avx2"
    table = vendor if vendor in ("amd", "amd-avx2") else "intel"
    return {"source": f"built-in default ({table} table{', this CPU: ' + vendor if vendor != table else ''})",
            "rankings": {"cpu": _BUILTIN_CPU[table]}}


#: on CUDA, cuDNN (torch) for the plain cells until measured otherwise (module docstring)
CUDA_RANKING = ("torch", "triton", "reference")

_loaded: dict = {}
#: bumped by ``forget``: the modules' cached choices carry it, so a new table takes effect at once
generation = 0


def cpu_model() -> str:
    from .info import _cpu_name
    return _cpu_name()


def cache_path(model: str | None = None) -> Path:
    """Where ``python -m fastrnn.tune`` stores the table of this CPU model: ``$FASTRNN_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/fastrnn``, else ``~/.cache/fastrnn``; one file per CPU model name."""
    base = os.environ.get("FASTRNN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastrnn")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model or cpu_model()).strip("-").lower() or "unknown-cpu"
    return Path(base) / f"policy-{slug}.json"


def read(path) -> dict:
    """A table file written by ``python -m fastrnn.tune``, checked. Raises ValueError naming what is wrong."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fastrnn policy table of format {FORMAT} (one written by another fastrnn "
                         f"version: python -m fastrnn.tune measures a new one)")
    from .dispatch import BACKEND_NAMES
    rankings = data.get("rankings", {}).get("cpu")
    if not isinstance(rankings, dict) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in rankings.values()):
        raise ValueError(f"{path}: 'rankings.cpu' must map '<family> <scope> <class>' to lists of backend names")
    unknown = sorted({n for v in rankings.values() for n in v} - set(BACKEND_NAMES))
    if unknown:
        raise ValueError(f"{path}: unknown backend name(s) {unknown} (this fastrnn knows {', '.join(BACKEND_NAMES)})")
    data["rankings"] = {"cpu": {k: tuple(v) for k, v in rankings.items()}}
    data["source"] = f"tuned on {data.get('cpu', '?')} at {data.get('date', '?')} ({path})"
    return data


def env_reader(name: str):
    """A function that reads the environment variable ``name`` (None when unset) as ``os.environ.get``
    does, at a tenth of its cost: from os.environ's own mapping with the key encoded once. The public
    lookup (~1 us) is read on every fast-path call, a tenth of a batch-1 cell call."""
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict) or not hasattr(os.environ, "encodekey"):  # another Python: the public way
        return lambda: os.environ.get(name)
    key, decode = os.environ.encodekey(name), os.environ.decodevalue

    def read():
        value = data.get(key)
        return None if value is None else decode(value)
    return read


_policy_env = env_reader("FASTRNN_POLICY")


def env() -> str:
    """The value of FASTRNN_POLICY ('' when unset)."""
    return _policy_env() or ""


def current() -> dict:
    """The table in force (see the module docstring), loaded once per value of ``FASTRNN_POLICY``."""
    env = _policy_env() or ""
    if env not in _loaded:
        if env == "builtin":
            table = builtin()
        elif env == "static":
            table = {"source": "FASTRNN_POLICY=static (no table: the static priority)", "rankings": {}}
        elif env:
            table = read(env)  # named explicitly: a bad file is an error
        else:
            path = cache_path()
            try:
                table = read(path) if path.exists() else builtin()
            except (OSError, ValueError) as e:  # a stale or broken cache must not break the modules
                table = dict(builtin(), source=f"built-in default (the cache {path} was not read: {e})")
        _loaded[env] = table
    return _loaded[env]


def ranking(device: str, family: str, scope: str, cls: str) -> tuple:
    """The backends for a call of this class, fastest first (may be empty); a bidirectional LSTM class (``BI``) in
    training, or in inference from B32, takes its one-direction class's ranking with ``cpp`` moved to just before
    ``torch`` (only cpp was measured against torch.nn bidirectional, and only there: at B16 in inference on a Zen 3
    cpp read 0.92x torch.nn's bidirectional LSTM, benchmarks/NOTES.md, thirty-fifth session)."""
    table = current()
    if device == "cuda":
        return CUDA_RANKING if table.get("rankings") else ()  # FASTRNN_POLICY=static: none on CUDA either
    bi = cls.endswith(BI)
    ranked = table["rankings"].get(device, {}).get(f"{family} {scope} {cls[:-len(BI)] if bi else cls}", ())
    if (bi and family == "lstm" and cls.startswith(("training", "inference B32+")) and "torch" in ranked
            and "cpp" in ranked and ranked.index("torch") < ranked.index("cpp")):
        rest = [n for n in ranked if n != "cpp"]  # cpp to torch's place, the others as they were
        rest.insert(rest.index("torch"), "cpp")
        ranked = tuple(rest)
    return ranked


def forget() -> None:
    """Drop the loaded tables (after ``python -m fastrnn.tune`` wrote a new one, or in tests)."""
    global generation
    _loaded.clear()
    generation += 1
