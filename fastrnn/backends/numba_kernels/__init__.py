"""Numba kernels of the numba backend: one file per cell family, shared pieces in ``common``.

Every kernel runs the whole time loop of one layer-direction, split over threads by slices of hidden
units: each thread computes the recurrent GEMM rows of its units for all gates (``common.mm_nt``, or in
the sequence forwards from a few rows a step ``panel.gate_products``, on W_hh packed in panels) and then
the fused pointwise pass for those units, so a step reads W_hh once and touches every gate value once. The
sequence forwards run a call in one parallel region (a team, ``team``); the backward kernels and the
cells open one a step. The inference entries project their input first, in the same threads
(``panel.project``). Only ``numba``, ``numpy`` and numba's own ``llvmlite`` are needed (no BLAS from SciPy).
"""
