"""Half-precision modules (bfloat16, float16) on the CPU: torch.nn against fastrnn's cpp backend, in one process:

    python -m benchmarks.lowp [--budget S] [--dtypes bfloat16,float16] [--cells LSTM,GRU,RNN] [--modes inference,training]

For each case four providers are timed in interleaved rounds: torch.nn and cpp in the half dtype, and
torch.nn and cpp in float32 on the same weights (what the half-precision model costs against keeping it
in float32). The cpp backend computes half precision in float32 (``Backend.compute_dtypes``); the
columns ``err`` give each half provider's largest output error against a float64 run on the same
(rounded) weights and inputs.
"""
from __future__ import annotations

import argparse

import torch

import fastrnn
from fastrnn import dispatch

from .cases import Case
from .harness import interleaved, percentiles
from .providers import Workload

SHAPES = ((1, 256), (16, 256), (64, 512))
MODES = ("inference", "training")


def _truth_error(w: Workload, provider: str, case: Case) -> float:
    """max |output - float64 output| for the inference call of ``provider`` (weights and input as stored)."""
    m = w.modules[provider]
    ref = getattr(torch.nn, case.cell)(case.I, case.H, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    with torch.no_grad():
        y = m(w.x)[0].double()
        return (y - ref(w.x.double())[0]).abs().max().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1.5, help="measured seconds per case")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--cells", default="LSTM,GRU,RNN")
    ap.add_argument("--modes", default=",".join(MODES), help="torch's float16 training takes ~20 s a call at B64")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastrnn {fastrnn.__version__}; "
          "x = torch.nn in the same dtype / this median")
    print(f"{'case':30s} {'dtype':9s} {'torch ms':>9s} {'cpp ms':>8s} {'x torch':>7s} {'torch32':>8s}"
          f" {'cpp32':>7s} {'cpp/cpp32':>9s} {'err torch':>9s} {'err cpp':>8s}")
    for dt_name in args.dtypes.split(","):
        dt = getattr(torch, dt_name)
        for cell in args.cells.split(","):
            for mode in args.modes.split(","):
                for B, H in SHAPES:
                    case = Case(cell, mode, 100, B, H)
                    half = Workload(case, ["torch", "cpp"], dtype=dt)
                    full = Workload(case, ["torch", "cpp"], dtype=torch.float32)
                    for p in ("torch", "cpp"):  # float32 on the half model's weights and input
                        full.modules[p].load_state_dict({k: v.float() for k, v in half.modules["torch"].state_dict().items()})
                    full.x = half.x.float()
                    with dispatch.record_calls() as ran:
                        half.call("cpp")()
                    assert {b for _, b in ran} == {"cpp"}, ran
                    fns = {"torch": half.call("torch"), "cpp": half.call("cpp"),
                           "torch32": full.call("torch"), "cpp32": full.call("cpp")}
                    med = {k: percentiles(v)[1] * 1e3 for k, v in interleaved(fns, budget_s=args.budget).items()}
                    err = ({p: _truth_error(half, p, case) for p in ("torch", "cpp")} if mode == "inference"
                           else {"torch": float("nan"), "cpp": float("nan")})
                    print(f"{case.name:30s} {dt_name:9s} {med['torch']:9.3f} {med['cpp']:8.3f} "
                          f"{med['torch'] / med['cpp']:7.2f} {med['torch32']:8.3f} {med['cpp32']:7.3f} "
                          f"{med['cpp'] / med['cpp32']:9.2f} {err['torch']:9.2e} {err['cpp']:8.2e}", flush=True)


if __name__ == "__main__":
    main()
