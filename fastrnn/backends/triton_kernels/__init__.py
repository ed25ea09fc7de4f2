"""Triton kernels of the triton backend, one file per cell family (host code: ``fastrnn.backends.triton``).

Each family has three kernels: a forward step (one launch per time step: the recurrent product of
``h_{t-1}`` with a tile of W_hh by ``tl.dot``, then the gate math, the state update and what the backward
needs), a backward step (the gate gradients, fused into the product ``dh_{t-1} = dgates @ W_hh``), and a
whole-sequence forward for small hidden sizes (one launch per layer-direction: each program owns a batch
tile, holds W_hh on chip and loops over time). The cell math lives in one ``@triton.jit`` function per
family, shared by its kernels. With the cell options a step is a cuBLAS product and a row kernel per family
(``fwd_opts_step``/``bwd_opts_step``, whole rows per program for the layer norm), with the zoneout and
recurrent-dropout pieces they share in ``common``.
"""
