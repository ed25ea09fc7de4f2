"""python -m fastrnn.info: versions, the machine, and every backend's status with its reasons."""
from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, dispatch


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception as e:  # not installed, or broken
        return f"not available ({type(e).__name__})"


def _cpu_name():
    from .policy import cpuinfo_field
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def report() -> str:
    lines = [
        f"fastrnn {__version__}",
        f"python {sys.version.split()[0]} on {platform.platform()}",
        f"torch {torch.__version__}, numpy {_version('numpy')}, numba {_version('numba')}, "
        f"triton {_version('triton')}",
        f"cpu: {_cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s} "
        f"FASTRNN_BACKEND={os.environ.get('FASTRNN_BACKEND', '')!s}",
        "",
        "backends (automatic order: cpu " + " > ".join(dispatch._priority("cpu")) + "; cuda "
        + " > ".join(dispatch._priority("cuda")) + ")",
    ]
    for name in dispatch.BACKEND_NAMES:
        why = dispatch.reasons(name)
        if why:
            lines.append(f"  {name:10s} unavailable: {'; '.join(why)}")
            continue
        devices = [d for d in ("cpu", "cuda") if name in dispatch.available_backends(d)
                   or (name == "torch" and (d == "cpu" or torch.cuda.is_available()))]
        lines.append(f"  {name:10s} available (serves: {', '.join(devices) or 'no device present here'})")
    from .quantized import kernel_path
    lines += ["", f"quantized products (fastrnn.quantize, cpp): int8 {kernel_path(torch.qint8)}; "
                  f"bfloat16 {kernel_path(torch.bfloat16)}"]
    return "\n".join(lines + [""] + policy_report())


def policy_report() -> list[str]:
    """The policy table of the automatic choice (float32 on CPU): where it came from, and per class the
    backend it picks here (the first of the ranking that is available) and the ranking."""
    from . import policy
    table = policy.current()
    lines = [f"automatic choice, float32 on cpu: policy table from {table['source']}",
             "  (python -m fastrnn.tune measures it on this machine; FASTRNN_POLICY=builtin ignores that)",
             f"  (sequence classes by hidden size: '{policy.NARROW.strip()}', none for H{policy.NARROW_H + 1}-"
             f"{policy.WIDE_H}, '{policy.WIDE.strip()}')"]
    for key in policy.keys():
        ranked = table["rankings"].get("cpu", {}).get(key, ())
        family, scope, cls = key.split(" ", 2)
        pick = next((n for n in ranked if not dispatch.reasons(n, dispatch.Spec(family, "cpu", torch.float32,
                                                                                  scope=scope))), None)
        times = table.get("times_ms", {}).get(key)
        how = " (" + ", ".join(f"{n} {t:.3g} ms" for n, t in times.items()) + ")" if times else ""
        lines.append(f"  {key:31s} -> {pick or 'the static priority'}: {' > '.join(ranked) or '-'}{how}")
    lines.append("  cuda: " + " > ".join(policy.CUDA_RANKING) + " for the plain cells (cuDNN until measured)")
    return lines


if __name__ == "__main__":
    print(report())
