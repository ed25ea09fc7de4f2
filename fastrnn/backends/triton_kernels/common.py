"""Pieces shared by the kernels: activations and the state loads of a step."""
import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # 2*sigmoid(2x) - 1: exact at +-inf, NaN stays NaN, fp32/fp64 alike (no libdevice call)
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def load_prev(prev_ptr, init_ptr, rows, cols, ld, n_cont, mask, ACC: tl.constexpr):
    """A [rows, cols] tile of the state a step starts from, in ACC: rows below ``n_cont`` continue from
    ``prev_ptr`` (the previous step's output), the others start from ``init_ptr`` (h0/c0, or the gradient
    of the final state in a backward). Both are row-major with leading dimension ``ld``."""
    offs = rows[:, None] * ld + cols[None, :]
    cont = rows[:, None] < n_cont
    a = tl.load(prev_ptr + offs, mask=mask & cont, other=0.0).to(ACC)
    b = tl.load(init_ptr + offs, mask=mask & (rows[:, None] >= n_cont), other=0.0).to(ACC)
    return tl.where(cont, a, b)


@triton.jit
def load_tile(ptr, rows, cols, ld, mask, ACC: tl.constexpr):
    return tl.load(ptr + rows[:, None] * ld + cols[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def load_wt(w_ptr, row0, units, ks, ld, umask, kmask):
    """The transposed tile W[row0 + units, ks]^T, shape [len(ks), len(units)], for ``h @ W^T``."""
    return tl.load(w_ptr + (row0 + units)[None, :] * ld + ks[:, None], mask=umask[None, :] & kmask[:, None],
                   other=0.0)


@triton.jit
def load_w(w_ptr, row0, units, cols, ld, umask, cmask):
    """The tile W[row0 + units, cols], shape [len(units), len(cols)], for ``dgates @ W``."""
    return tl.load(w_ptr + (row0 + units)[:, None] * ld + cols[None, :], mask=umask[:, None] & cmask[None, :],
                   other=0.0)


@triton.jit
def load_vec(ptr, offs, mask, ACC: tl.constexpr):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def tile(n_rows, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    """This program's [BR, BC] tile (program ids 0 and 1): row and column indices, their masks, the 2-D mask."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    rmask = rows < n_rows
    cmask = cols < n_cols
    return rows, cols, rmask, cmask, rmask[:, None] & cmask[None, :]


@triton.jit
def first_col_tile(rows):
    """[BR, 1] mask: true in the programs of column tile 0 (a vector: the interpreter rejects a scalar in a mask)."""
    return ((rows * 0 + tl.program_id(1)) == 0)[:, None]


@triton.jit
def row_lengths(lengths, rows, rmask, T, HAS_LEN: tl.constexpr, BB: tl.constexpr):
    """A sequence kernel's per-row step counts and its loop's trip count (the tile's longest row)."""
    if HAS_LEN:
        lens = tl.load(lengths + rows, mask=rmask, other=0).to(tl.int32)
        steps = tl.max(lens, axis=0)
    else:
        lens = tl.full((BB,), T, tl.int32)
        steps = T
    return lens, steps


@triton.jit
def time_index(s, steps, REVERSE: tl.constexpr):
    """The time step of loop iteration s (t = steps-1 .. 0 when REVERSE: each row's reverse pass starts at its
    own last step, since a row is active only at t < its length)."""
    if REVERSE:
        t = steps - 1 - s
    else:
        t = s
    return t
