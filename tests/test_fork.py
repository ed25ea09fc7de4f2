"""A process forked after the parent ran fastrnn (DataLoader workers, Hogwild-style training) runs the same
modules, forward and backward, and gets the parent's values. numba's GNU OpenMP threading layer (its
default here) cannot run in a forked child: there the numba backend runs serial twins of its kernels
(``fastrnn.backends.numba._kernel``; the parent runs them too, but only for a call on one thread), and the
parent keeps its parallel ones."""
import multiprocessing as mp
import os
import queue
import pytest
import torch

import fastrnn
from conftest import CPU_BACKENDS

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (POSIX)")
FORK_BACKENDS = [b for b in ("numba", "cpp") if b in CPU_BACKENDS]


def _case(backend):
    torch.manual_seed(0)
    m = fastrnn.LSTM(64, 128, backend=backend)  # a size at which numba splits its calls over threads
    return m, torch.randn(20, 16, 64)


def _child(backend, threads, q):
    try:
        if threads:
            torch.set_num_threads(threads)
        m, x = _case(backend)
        if backend == "numba":  # the twins the parent made for its own one-thread calls: not this child's
            from fastrnn.backends import numba as nb
            nb._SERIAL.clear()
        y, _ = m(x)
        y.sum().backward()  # training too
        serial = None
        if backend == "numba":
            from fastrnn.backends import _common, numba as nb
            torch.set_num_threads(2)  # only to ask how a large step would split here (nothing runs on them)
            serial = (_common.FORKED_UNDER_GNU_OMP, len(nb._SERIAL), nb._parts(16, 1 << 20))
            torch.set_num_threads(threads or 1)
        q.put(("ok", y.detach().numpy(), m.weight_hh_l0.grad.numpy(), serial))  # not shared-memory tensors
    except BaseException as e:  # report, do not hang the parent
        q.put(("error", repr(e), None, None))


# The child sets one torch thread, as DataLoader workers do: with torch's default threads a forked child
# hangs in torch.nn's own LSTM (torch's GNU OpenMP pool does not survive fork), so that is not a case a
# drop-in can serve.
@pytest.mark.parametrize("backend", FORK_BACKENDS)
def test_forked_child_runs_after_parent_used_backend(backend, threads=1):
    m, x = _case(backend)
    y, _ = m(x)
    y.sum().backward()
    if backend == "numba":
        import numba
        from numba.np.ufunc import parallel
        assert parallel._is_initialized  # the parent really launched parallel numba code
        omp = numba.threading_layer() == "omp"
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(backend, threads, q))
    p.start()
    status = None
    for _ in range(120):  # read before joining: a child exits only once its queue's pipe is drained (the
        try:              # results pass 64 KiB); a child that died without a word is reported at once
            status, got, grad, serial = q.get(timeout=1)
            break
        except queue.Empty:
            if not p.is_alive():
                break
    p.join(10)
    if p.is_alive():
        p.kill()
        pytest.fail(f"the forked child hangs on the {backend} backend")
    assert p.exitcode == 0 and status is not None, f"child exit code {p.exitcode}"
    assert status == "ok", got
    if backend == "numba":  # on one thread the child ran the serial twins, forward, backward and (320 rows: the
        # backend's ``mm`` on panels, on AMD CPUs) dW_hh's product; under GNU OpenMP it would never split a step,
        # whatever its threads (the layer cannot run after fork)
        from fastrnn.backends import numba as nb
        split = min(2, numba.config.NUMBA_NUM_THREADS)
        twins = 2 + (nb.NumbaBackend.mm is not None)  # dW_hh's product: panels only where the backend has an mm
        assert serial == ((True, twins, 1) if omp else (False, twins, split))
    # the same values (a serial twin splits no step, so float32 may differ in the last bits)
    torch.testing.assert_close(torch.from_numpy(got), y.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.from_numpy(grad), m.weight_hh_l0.grad, atol=1e-5, rtol=1e-5)
    y2, _ = m(x)  # and the parent still runs
    torch.testing.assert_close(y2, y, atol=0, rtol=0)


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="numba is not available here")
def test_forked_child_after_users_own_parallel_numba():
    """The parent ran parallel numba code of its own (not fastrnn's) before forking: the child's numba
    backend still runs (the fork hook is registered when fastrnn is imported), in a fresh interpreter so
    that fastrnn's numba backend is not loaded before the fork."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import os, sys, numpy as np, numba, torch, fastrnn
        @numba.njit(parallel=True)
        def f(a):
            s = 0.0
            for i in numba.prange(a.shape[0]):
                s += a[i]
            return s
        f(np.ones(1000))
        assert "fastrnn.backends.numba" not in sys.modules
        torch.manual_seed(0)
        m = fastrnn.LSTM(32, 32, backend="numba")
        x = torch.randn(20, 16, 32)
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)
            with torch.no_grad():
                y = m(x)[0]
            np.save(sys.argv[1], y.numpy())
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        with torch.no_grad():
            want = m(x)[0]
        got = torch.from_numpy(np.load(sys.argv[1]))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", script, os.path.join(d, "y.npy")], capture_output=True,
                           text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
