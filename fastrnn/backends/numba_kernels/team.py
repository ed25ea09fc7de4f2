"""A team of threads that runs a whole sequence in one parallel region.

A step of a recurrence needs every unit of the step before it, so a kernel that splits a step's units
over threads must wait for all of them between steps. A ``prange`` a step does that by opening a parallel
region a step: ~2-3 us here, more than a whole step at batch 1 and H=64. The team opens one region for
the call instead (``for w in prange(parts)``): worker w computes part w of every step, publishes that it
finished the step (a counter on its own cache line), and waits for the other parts' counters before the
next step: one cache-line transfer a step (~0.3 us), as the C++ backend's barrier.

The team cannot deadlock when the region runs its iterations one after another (a call nested in another
parallel region, numba's serial twin of the kernel, fewer threads than parts): each worker claims its own
part when it starts, and a part still unclaimed after ``STEAL_SPINS`` spins of the first step's wait is
taken over by the waiting worker, which then computes it in every step; its own worker, when it starts,
finds it taken and returns. Past that first wait a worker only waits for parts that running workers own.

The kernel's loop over a step's phases (a phase: what one barrier closes) is::

    sync = team_sync(parts)
    for w in prange(parts):
        if team_claim(sync, w):
            for ph in range(phases):
                p = team_next(sync, parts, w, ph)
                while p >= 0:
                    ... part p of phase ph ...
                    team_done(sync, p, ph)
                    p = team_next(sync, parts, w, ph)
"""
from __future__ import annotations

import platform

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .common import JIT

#: int64 slots between two counters: 128 bytes, so that no two share a line or an adjacent-line prefetch
LINE = 16
#: spins of a wait before each further spin also yields the CPU (a spin pauses, ~25 ns here: ~50 us), as
#: the C++ backend's barrier: a worker whose partner lost its CPU (to torch's spinning threads, or to the
#: host of a virtual machine) gives its own back instead of burning it
YIELD_SPINS = 2000
#: spins of the first phase's wait before a waiting worker takes over a part that nobody has claimed: ~1 ms
#: here with the yields, well past the ~10-100 us an idle thread of the region takes to wake (a worker that
#: starts later than that finds its part taken, and the call runs on fewer threads)
STEAL_SPINS = 1 << 12
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _slot(context, builder, aryty, ary, idx):
    return cgutils.get_item_pointer(context, builder, aryty, context.make_array(aryty)(context, builder, ary), [idx])


def _int64_array(arr):
    return isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1


@intrinsic
def _load_acquire(typingctx, arr, idx):
    """arr[idx], an atomic load with acquire order (what the writer did before its release is visible)."""
    if not _int64_array(arr) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig.args[0], args[0], args[1]), "acquire", 8)
    return types.int64(arr, idx), codegen


@intrinsic
def _store_release(typingctx, arr, idx, val):
    """arr[idx] = val, an atomic store with release order."""
    if not _int64_array(arr) or not isinstance(idx, types.Integer) or not isinstance(val, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(v, _slot(context, builder, sig.args[0], args[0], args[1]), "release", 8)
        return context.get_dummy_value()
    return types.none(arr, idx, val), codegen


@intrinsic
def _compare_exchange(typingctx, arr, idx, expected, new):
    """Atomically: if arr[idx] == expected, arr[idx] = new; returns whether it did."""
    if not _int64_array(arr) or not all(isinstance(t, types.Integer) for t in (idx, expected, new)):
        return None

    def codegen(context, builder, sig, args):
        old = context.cast(builder, args[2], sig.args[2], types.int64)
        new_ = context.cast(builder, args[3], sig.args[3], types.int64)
        res = builder.cmpxchg(_slot(context, builder, sig.args[0], args[0], args[1]), old, new_, "acq_rel",
                              "acquire")
        return builder.extract_value(res, 1)
    return types.boolean(arr, idx, expected, new), codegen


@intrinsic
def _relax(typingctx):
    """One spin of a wait: x86's pause (the spinning core yields its pipeline to a sibling and does not
    flood the line it reads), nothing on other machines."""
    def codegen(context, builder, sig, args):
        if X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def _yield_cpu(typingctx):
    """sched_yield(): the thread gives its CPU to another that is ready to run (libc, found by name)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


@numba.njit(**JIT)
def team_sync(parts):
    """The team's counters: part p's owner (0 while unclaimed, else its worker + 1) and the phases it has
    finished, each on its own line."""
    return np.zeros(2 * LINE * max(parts, 1), np.int64)


@numba.njit(**JIT)
def team_claim(sync, w):
    """Worker w claims its own part; False when a waiting worker has taken it over (w then returns)."""
    return _compare_exchange(sync, 2 * LINE * w, 0, w + 1)


@numba.njit(**JIT)
def team_done(sync, p, ph):
    """Part p has finished phase ph (its writes are visible to whoever sees this)."""
    _store_release(sync, (2 * p + 1) * LINE, ph + 1)


@numba.njit(**JIT)
def team_next(sync, parts, w, ph):
    """The next part that worker w computes in phase ph, or -1 once every part has finished it: first its
    own parts not yet done, then it waits for the others (taking over, in the first phase, a part that no
    worker has claimed after STEAL_SPINS spins)."""
    for q in range(parts):
        if _load_acquire(sync, 2 * LINE * q) == w + 1 and sync[(2 * q + 1) * LINE] <= ph:  # (its own counter:
            return q                                                                       # no other writer)
    for q in range(parts):
        spins = 0
        while _load_acquire(sync, (2 * q + 1) * LINE) <= ph:
            _relax()
            spins += 1
            if spins > YIELD_SPINS:
                _yield_cpu()
            if ph == 0 and spins > STEAL_SPINS and _load_acquire(sync, 2 * LINE * q) == 0:
                if _compare_exchange(sync, 2 * LINE * q, 0, w + 1):
                    return q
    return -1
