"""Cold start: time to the end of the first call in this (fresh) process. Run by benchmarks.run.

    python -m benchmarks.coldstart PROVIDER CELL   -> prints JSON {"import_s", "first_call_s"}
"""
from __future__ import annotations

import json
import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402

import fastrnn  # noqa: E402

t_import = time.perf_counter() - t0


def main(provider: str, cell: str) -> None:
    from .cases import Case
    from .providers import Workload
    case = Case(cell, "inference", 100, 1, 256)
    work = Workload(case, [provider])
    fn = work.call(provider)
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    print(json.dumps({"import_s": t_import, "first_call_s": first, "torch": torch.__version__,
                      "fastrnn": fastrnn.__version__}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
