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
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        "backends (automatic order: cpu " + " > ".join(dispatch._priority("cpu")) + " (cells: "
        + " > ".join(dispatch._priority("cpu", "step")) + "); cuda " + " > ".join(dispatch._priority("cuda")) + ")",
    ]
    for name in dispatch.BACKEND_NAMES:
        why = dispatch.reasons(name)
        if why:
            lines.append(f"  {name:10s} unavailable: {'; '.join(why)}")
            continue
        devices = [d for d in ("cpu", "cuda") if name in dispatch.available_backends(d)]
        lines.append(f"  {name:10s} available (serves: {', '.join(devices) or 'no device present here'})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
