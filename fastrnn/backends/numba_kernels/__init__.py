"""Numba kernels of the numba backend: one file per cell family, shared pieces in ``common``.

Every kernel runs the whole time loop of one layer-direction, split over threads by slices of hidden
units: each thread computes the recurrent GEMM rows of its units for all gates (``common.mm_nt``, or in
the sequence forwards from a few rows a step ``panel.gate_products``, on W_hh packed in panels) and then
the fused pointwise pass for those units, so a step reads W_hh once and touches every gate value once. The
sequence forwards run a call in one parallel region (a team, ``team``); the backward kernels and the
cells open one a step. The inference entries project their input first, in the same threads
(``panel.project``). Only ``numba``, ``numpy`` and numba's own ``llvmlite`` are needed (no BLAS from SciPy).
"""
import hashlib
import os

from numba.core import caching


def package_stamp(folder=os.path.dirname(__file__)):
    """A digest of every .py file of ``folder`` (names and contents)."""
    h = hashlib.sha256()
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".py")):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.digest()


class _PackageStamp:
    """numba's disk cache keys a compiled function by its own file's contents, but the kernels inline functions of
    the other files here (``panel``'s products into lstm.py's loops): after a change in panel.py alone, lstm.py's
    kernels loaded their old machine code from the cache (benchmarks/NOTES.md, thirty-fifth and thirty-sixth
    sessions). For the functions of this package the key is every file's contents (``package_stamp``)."""
    _stamp = None

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.dirname(os.path.abspath(py_file)) != os.path.dirname(os.path.abspath(__file__)):
            return None
        return super().from_function(py_func, py_file)

    def get_source_stamp(self):
        if _PackageStamp._stamp is None:
            _PackageStamp._stamp = package_stamp()
        return _PackageStamp._stamp


# ahead of numba's own locators (the same order: NUMBA_CACHE_DIR, then __pycache__ here, then the user's cache)
caching.CacheImpl._locator_classes[:0] = [
    type(f"Package{k.__name__}", (_PackageStamp, k), {})
    for k in (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator)]
