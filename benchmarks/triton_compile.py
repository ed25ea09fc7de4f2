"""Compile every triton kernel for sm_80 and sm_90 without a GPU and report registers, spills and
shared memory (``python -m benchmarks.triton_compile [--quick]``).

Each kernel is compiled by Triton's own compiler (``triton.compile`` with a ``GPUTarget``) at the block
sizes the backend launches it with (``fastrnn.backends.triton``), in its heaviest flag combination
(peephole + saving for the LSTM, varlen + reverse for the sequence kernels), and the PTX is assembled by
``ptxas -v`` for the same architecture. Must run without TRITON_INTERPRET (the interpreter replaces the
kernels by Python functions).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ARCHS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16")
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class Result:
    kernel: str
    config: str
    dtype: str
    arch: int
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int  # Triton's dynamic shared memory (layout conversions, dot operands)


def _configs():
    """(kernel, config name, pointer args by name -> dtype role, scalar args, constexprs, num_warps: an int
    or a function of the dtype name)."""
    import torch
    import triton.language as tl

    from fastrnn.backends import triton as tb
    from fastrnn.backends.triton_kernels import gru, lstm, rnn

    d, a = "D", "A"  # pointer roles: the data dtype, or the fp32 accumulation/saved dtype
    out = []
    step = dict(ACC=tl.float32, BB=tb.BB, BK=tb.BK)
    for BH in (16, 32):
        ptr = dict(xw=d, w_hh=d, b_hh=d, w_ch=d, h_prev=d, h0=d, c_prev=a, c0=d, h_out=d, c_out=a, c_fin=d, gates=a)
        out.append((lstm.fwd_step, f"BH={BH} peephole save", ptr, ("n", "n_cont", "n_last", "H", "P"),
                    dict(step, HAS_BIAS=True, PEEP=True, COUPLED=False, SAVE=True, BH=BH), tb.NUM_WARPS))
        ptr = dict(gy=a, rec_h=a, gn_h=d, rec_c=a, gn_c=d, gates=a, c_cur=a, c_prev=a, c0=d, w_hh=d, w_ch=d,
                   d_gates=d, dh_out=a, dc_out=a, dh_fin=d, dc_fin=d)
        out.append((lstm.bwd_step, f"BP={BH} peephole", ptr, ("n", "n_cont", "n_cprev", "n_last", "H", "P"),
                    dict(step, ADD_REC_H=True, PEEP=True, COUPLED=False, BP=BH), tb.NUM_WARPS))
        ptr = dict(xw=d, w_hh=d, b_hh=d, h_prev=d, h0=d, h_out=d, saved=a)
        out.append((gru.fwd_step, f"BH={BH} save", ptr, ("n", "n_cont", "H"),
                    dict(step, HAS_BIAS=True, SAVE=True, BH=BH), tb.NUM_WARPS))
        ptr = dict(gy=d, rec_h=a, gn_h=d, saved=a, h_prev=d, w_hh=d, d_xw=d, d_gh=d, dh_out=a, dh_fin=d)
        out.append((gru.bwd_step, f"BP={BH}", ptr, ("n", "n_cont", "n_last", "H"), dict(step, BP=BH), tb.NUM_WARPS))
        ptr = dict(xw=d, w_hh=d, b_hh=d, h_prev=d, h0=d, h_out=d)
        out.append((rnn.fwd_step, f"BH={BH}", ptr, ("n", "n_cont", "H"),
                    dict(step, HAS_BIAS=True, RELU=False, BH=BH), tb.NUM_WARPS))
        ptr = dict(gy=d, rec_h=a, gn_h=d, y_t=d, w_hh=d, d_xw=d, dh_out=a, dh_fin=d)
        out.append((rnn.bwd_step, f"BP={BH}", ptr, ("n", "n_cont", "n_last", "H"),
                    dict(step, RELU=False, BP=BH), tb.NUM_WARPS))
    # the cell options' row kernels (every option on) at the padded hidden sizes of H = 64, 512, 1024
    from fastrnn.backends.triton_kernels import common
    for HP in (64, 512, 1024):
        rows = dict(ACC=tl.float32, BR=tb.row_block(HP), HP=HP)
        p2 = {"n": "i32", "H": "i32", "p_h": "fp32", "p_c": "fp32"}
        ptr = dict(xw=d, raw=a, b_hh=d, w_ch=d, ln_h=d, ln_c=d, ln_cb=d, zm_h=d, zm_c=d, rmask=d, h_state=a,
                   c_state=a, m_out=a, y=d, hm=a, gates=a, c_new_out=a, c_post=a, xhat_h=a, xhat_c=a, rstd=a)
        out.append((lstm.fwd_opts_step, f"HP={HP} all options", ptr, p2,
                    dict(rows, HAS_BIAS=True, PEEP=True, COUPLED=False, LN=True, ZH=1, ZC=1, RMASK=True, PROJ=False,
                         SAVE=True), tb.row_warps(HP)))
        ptr = dict(gy=d, dh_state=a, dm=a, dc_state=a, zm_h=d, zm_c=d, gates=a, c_new_in=a, c_prev=a, xhat_h=a,
                   xhat_c=a, rstd=a, w_ch=d, ln_h=d, ln_c=d, ln_cb=d, d_xw=d, dg=a, d_raw=a, dcn_out=a)
        out.append((lstm.bwd_opts_step, f"HP={HP} all options", ptr, p2,
                    dict(rows, PEEP=True, COUPLED=False, LN=True, ZH=1, ZC=1, PROJ=False), tb.row_warps(HP)))
        p1 = {"n": "i32", "H": "i32", "p": "fp32"}
        ptr = dict(xw=d, raw=a, b_hh=d, ln_h=d, zm=d, rmask=d, h_state=a, y=d, hm=a, saved=a, xhat_h=a, rstd=a)
        out.append((gru.fwd_opts_step, f"HP={HP} all options", ptr, p1,
                    dict(rows, HAS_BIAS=True, LN=True, Z=1, RMASK=True, SAVE=True), tb.row_warps(HP)))
        ptr = dict(gy=d, dh_state=a, zm=d, saved=a, h_prev=d, xhat_h=a, rstd=a, ln_h=d, d_xw=d, dg=a, d_raw=a)
        out.append((gru.bwd_opts_step, f"HP={HP} all options", ptr, p1, dict(rows, LN=True, Z=1), tb.row_warps(HP)))
        pp = dict(ACC=tl.float32, BR=tb.row_block(HP), PP=HP)
        ptr = dict(cand=a, h_state=a, zm=d, rmask=d, y=d, hm=a)
        out.append((common.finish_step, f"PP={HP}", ptr, {"n": "i32", "P": "i32", "p": "fp32"},
                    dict(pp, Z=1, RMASK=True), tb.row_warps(HP)))
        ptr = dict(gy=d, dh_state=a, zm=d, dcand=a)
        out.append((common.split_step, f"PP={HP}", ptr, {"n": "i32", "P": "i32", "p": "fp32"}, dict(pp, Z=1),
                    tb.row_warps(HP)))
        ptr = dict(prod=a, rmask=d, dh_state=a)
        out.append((common.add_recurrent_dh, f"PP={HP}", ptr, ("n", "P"), dict(pp, RMASK=True), tb.row_warps(HP)))
    seq = dict(HAS_LEN=True, REVERSE=True, HAS_BIAS=True, ACC=tl.float32, BB=tb.BB)
    for HP in sorted({tb.seq_hp(h) for h in range(1, tb.SEQ_MAX_H + 1)}):
        def warps(family, HP=HP):  # the sequence kernel's warps depend on the dtype
            return lambda dtype: tb.seq_warps(family, HP, getattr(torch, TORCH_DTYPES[dtype]))
        ptr = dict(xw=d, w_hh=d, b_hh=d, w_ch=d, h0=d, c0=d, lengths="i64", y=d, h_n=d, c_n=d, gates=a, c_all=a)
        out.append((lstm.fwd_seq, f"HP={HP} peephole save", ptr, ("T", "B", "H"),
                    dict(seq, PEEP=True, COUPLED=False, SAVE=True, HP=HP), warps("lstm")))
        ptr = dict(xw=d, w_hh=d, b_hh=d, h0=d, lengths="i64", y=d, h_n=d, saved=a)
        out.append((gru.fwd_seq, f"HP={HP} save", ptr, ("T", "B", "H"), dict(seq, SAVE=True, HP=HP), warps("gru")))
        ptr = dict(xw=d, w_hh=d, b_hh=d, h0=d, lengths="i64", y=d, h_n=d)
        out.append((rnn.fwd_seq, f"HP={HP}", ptr, ("T", "B", "H"), dict(seq, RELU=False, HP=HP), warps("rnn")))
    return out


def _ptxas(ptx: str, arch: int) -> tuple[int, int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True)
    info = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return regs, int(spills.group(1)), int(spills.group(2))


def compile_one(fn, ptr_roles, scalars, constexprs, dtype: str, arch: int, num_warps: int):
    """PTX of one kernel specialization for sm_<arch> and ptxas's register/spill report of it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "PREC" in fn.arg_names:  # torch's default: allow_tf32 is False for matmuls
        constexprs = {"PREC": "ieee", **constexprs}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in scalars:  # a tuple of int32 names, or a dict name -> type
            sig[name] = scalars[name] if isinstance(scalars, dict) else "i32"
        else:
            role = ptr_roles[name]
            sig[name] = "*" + {"D": dtype, "A": "fp32"}.get(role, role)
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs))
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    regs, st, ld = _ptxas(k.asm["ptx"], arch)
    return regs, st, ld, k.metadata.shared


def run(archs=ARCHS, dtypes=DTYPES, only=None) -> list[Result]:
    results = []
    for fn, cfg, ptr, scalars, consts, warps in _configs():
        name = f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}"
        if only and not only(name, cfg):
            continue
        for dtype in dtypes:
            for arch in archs:
                nw = warps(dtype) if callable(warps) else warps
                regs, st, ld, shared = compile_one(fn, ptr, scalars, consts, dtype, arch, nw)
                results.append(Result(name, cfg, dtype, arch, nw, regs, st, ld, shared))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fp32 and bf16 only")
    args = ap.parse_args(argv)
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    import triton

    print(f"triton {triton.__version__}; registers / spill bytes (stores+loads) / Triton shared memory per kernel")
    print(f"{'kernel':16} {'config':22} {'dtype':5} {'arch':6} {'warps':>5} {'regs':>5} {'spill':>7} {'smem B':>7}")
    worst = 0
    for r in run(dtypes=("fp32", "bf16") if args.quick else DTYPES):
        spill = r.spill_stores + r.spill_loads
        worst = max(worst, spill)
        print(f"{r.kernel:16} {r.config:22} {r.dtype:5} sm_{r.arch:<3} {r.num_warps:5d} {r.registers:5d} "
              f"{spill:7d} {r.shared_bytes:7d}")
    print("no spills" if worst == 0 else f"SPILLS: up to {worst} bytes")
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
