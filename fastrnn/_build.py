"""How the C++ extension (csrc/) is built: by setup.py at install time, or on first use.

One source of truth for the sources and flags, used by setup.py and by the just-in-time build in
``fastrnn.backends.cpp``. Flags: -O3; -g0 (no debug info); -ffp-contract=fast lets GCC fuse multiply-adds (no
-ffast-math: NaN and inf must propagate as in torch); the hot functions are built per ISA by target_clones in the
source, so no -march flag is needed; -fopenmp makes at::parallel_for (an inline template) parallel
in our code, on torch's own OpenMP runtime. FASTRNN_DEBUG_BUILD=1 gives a debug build (-O0 -g, FASTRNN_DEBUG).
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
# longest build first, so that ninja starts it first and the others fill the other cores around it (one core,
# -O3: lstm.cpp 154 s, quant.cpp 61, gemm.cpp 28, common.cpp 23, pool.cpp 19: benchmarks/NOTES.md, thirty-seventh
# session); the order of the objects does not matter to the extension (its registrations are by name)
SOURCES = ("lstm.cpp", "quant.cpp", "gru.cpp", "rnn.cpp", "gemm.cpp", "ops.cpp", "common.cpp", "cell_train.cpp",
           "pool.cpp")


def debug() -> bool:
    return os.environ.get("FASTRNN_DEBUG_BUILD", "") not in ("", "0")


def cxx_flags() -> list[str]:
    # -fopenmp: at::parallel_for is an inline template; without it, it runs serially in our code
    if debug():
        return ["-O0", "-g", "-DFASTRNN_DEBUG", "-fopenmp"]
    # -g0: no debug info (Python's own flags carry -g): lstm.cpp built in 105 s against 144 (NOTES.md,
    # thirty-fourth session)
    return ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi", "-fopenmp", "-g0"]


def ld_flags() -> list[str]:
    # links libgomp.so.1, which resolves to the copy torch has already loaded (same soname)
    return ["-fopenmp"]


def source_paths(root: Path = CSRC) -> list[str]:
    return [str(root / s) for s in SOURCES]
