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


# ---- the cell options (layer norm, zoneout, recurrent dropout): pieces of the row kernels ---------------
# A row kernel's program owns BR whole rows (every unit of every gate block), so a row's layer-norm
# statistics need no other program. Zoneout modes (constexpr Z): 0 none, 1 the step's 0/1 mask (training),
# 2 the probability p as the keep weight (eval).

LN_EPS = tl.constexpr(1e-5)  # nn.LayerNorm's default


@triton.jit
def centered(a, mean, mask):
    """a - mean per row (mean [BR]), zero outside the mask."""
    return tl.where(mask, a - mean[:, None], 0.0)


@triton.jit
def ln_backward(dxh, xh, s1, s2, rstd, N):
    """The input gradient of a layer norm from dxh (the gradient of the normalized values, gain applied),
    the normalized values xh, and the row sums s1 = sum(dxh), s2 = sum(dxh * xh) over its N columns."""
    return rstd[:, None] * (dxh - (s1 / N)[:, None] - xh * (s2 / N)[:, None])


@triton.jit
def keep_weight(zm, p, rows, cols, ld, mask, Z: tl.constexpr, ACC: tl.constexpr):
    """Zoneout's keep weight of a [BR, BC] tile: the mask (Z=1) or p (Z=2); Z=0: 0."""
    if Z == 1:
        k = load_tile(zm, rows, cols, ld, mask, ACC)
    elif Z == 2:
        k = tl.zeros((rows.shape[0], cols.shape[0]), ACC) + p
    else:
        k = tl.zeros((rows.shape[0], cols.shape[0]), ACC)
    return k


@triton.jit
def finish_h(cand, h_state, zm, p, rmask, y, hm, rows, cols, ld, mask,
             Z: tl.constexpr, RMASK: tl.constexpr, ACC: tl.constexpr):
    """The end of a step with the cell options: h_t = zoneout(candidate, h_{t-1}) into the state and y_t,
    and h_t * rmask (the next step's recurrent input) into hm."""
    offs = rows[:, None] * ld + cols[None, :]
    old = load_tile(h_state, rows, cols, ld, mask, ACC)
    h = cand + keep_weight(zm, p, rows, cols, ld, mask, Z, ACC) * (old - cand)
    tl.store(h_state + offs, h, mask=mask)
    tl.store(y + offs, h.to(y.dtype.element_ty), mask=mask)
    if RMASK:
        h = h * load_tile(rmask, rows, cols, ld, mask, ACC)
    tl.store(hm + offs, h, mask=mask)


@triton.jit
def split_dh(gy, dh_state, zm, p, rows, cols, ld, mask, Z: tl.constexpr, ACC: tl.constexpr):
    """A backward step's dh_t = grad_y_t + the recurrent dh (dh_state), split by zoneout into the
    candidate's share (1-k)*dh and the share k*dh that flows straight to h_{t-1}."""
    dh = load_tile(gy, rows, cols, ld, mask, ACC) + load_tile(dh_state, rows, cols, ld, mask, ACC)
    k = keep_weight(zm, p, rows, cols, ld, mask, Z, ACC)
    return dh - k * dh, k * dh


@triton.jit
def finish_step(cand, h_state, zm, p, rmask, y, hm, n, P,
                Z: tl.constexpr, RMASK: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr, PP: tl.constexpr):
    """finish_h as a kernel, for an LSTM with projection (the candidate is W_hr m, a matmul away from
    the cell kernel)."""
    rows, cols, _, _, mask = tile(n, P, BR, PP)
    finish_h(load_tile(cand, rows, cols, P, mask, ACC), h_state, zm, p, rmask, y, hm, rows, cols, P, mask, Z,
             RMASK, ACC)


@triton.jit
def split_step(gy, dh_state, zm, p, dcand, n, P, Z: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr,
               PP: tl.constexpr):
    """split_dh as a kernel (LSTM with projection): the candidate's share into dcand, the rest into
    dh_state."""
    rows, cols, _, _, mask = tile(n, P, BR, PP)
    d, direct = split_dh(gy, dh_state, zm, p, rows, cols, P, mask, Z, ACC)
    offs = rows[:, None] * P + cols[None, :]
    tl.store(dcand + offs, d, mask=mask)
    tl.store(dh_state + offs, direct, mask=mask)


@triton.jit
def add_recurrent_dh(prod, rmask, dh_state, n, P, RMASK: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr,
                     PP: tl.constexpr):
    """dh_state += prod * rmask: the product d_raw @ W_hh of a backward step (through the recurrent
    dropout mask) joins the direct share already in dh_state, making dh_{t-1}."""
    rows, cols, _, _, mask = tile(n, P, BR, PP)
    d = load_tile(prod, rows, cols, P, mask, ACC)
    if RMASK:
        d = d * load_tile(rmask, rows, cols, P, mask, ACC)
    offs = rows[:, None] * P + cols[None, :]
    tl.store(dh_state + offs, load_tile(dh_state, rows, cols, P, mask, ACC) + d, mask=mask)
