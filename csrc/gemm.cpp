// The large products of a training call (the input projection, its gradients, d W_hh): C = A' @ B' over
// all T x B rows, on the packed micro kernel of recurrence.h, split over torch's threads by columns, or
// by rows where that loses (the weight gradients' A^T products, and columns that do not split evenly).
//
// Why not torch.mm: on the Zen 4 EPYC of these sessions MKL's sgemm (its code path for other vendors'
// CPUs) ran the projection and its input gradient at 0.72-0.89x the speed of this kernel, and the weight
// gradients (A^T, packed here) about even (NOTES.md, fifteenth session). `own_mm` is the rule; the
// op falls back to torch's product where it says no.
#include "recurrence.h"

#include <torch/library.h>

namespace fastrnn {
namespace {

constexpr int64_t MC = 128;  // rows of C a block

// A^T's MC x KC block packed into slivers of 8 rows, k-major ([m / 8][k][8], zeros past `rows`), so the
// kernel reads each k's 8 values from one line (read in place, a k step is a row of `a` apart: 4 KiB
// strides that all fall in one set of L1)
template <typename T>
FASTRNN_INLINE void pack_a_slivers(int64_t rows, int64_t K, const T* A, int64_t lda, T* abuf) {
  const int64_t full = rows / 8 * 8;
  for (int64_t k = 0; k < K; ++k) {  // a row of `a` at a time, read along its line
    const T* src = A + k * lda;
    for (int64_t s = 0; s < full; s += 8)
      for (int64_t m = 0; m < 8; ++m) abuf[s * K + k * 8 + m] = src[s + m];
    for (int64_t m = 0; full < rows && m < 8; ++m) abuf[full * K + k * 8 + m] = full + m < rows ? src[full + m] : T(0);
  }
}
// One block of a worker's product: rows [m0, m0 + mc) and k [k0, k0 + kl) of A' against every column
// block of its panel [ncb][K][NR], into C (the first `full` blocks) or `tail` [mc][NR] (a partial last
// block). A' = A^T (A [K, M], the block packed into `abuf` [MC * KC] once for all column blocks, or read in
// place where `abuf` is null: `at_in_place`) or A ([M, K], read in place). The panel slice KC x NR stays in
// L1 while the block's rows use it.
template <typename T, bool AT, int W>
FASTRNN_INLINE void gemm_block(int64_t m0, int64_t mc, int64_t k0, int64_t kl, const T* A, int64_t lda,
                               const T* panel, int64_t K, int64_t ncb, int64_t full, T* C, int64_t ldc, T* tail,
                               T* abuf) {
  constexpr int nr = NR<T>;
  if (AT && abuf) pack_a_slivers(mc, kl, A + k0 * lda + m0, lda, abuf);
  for (int64_t cb = 0; cb < ncb; ++cb) {
    const bool partial = cb >= full;
    T* Cb = partial ? tail : C + m0 * ldc + cb * nr;
    const int64_t ldb = partial ? nr : ldc;
    const T* Bp = panel + cb * K * nr + k0 * nr;
    if (!AT) {
      rows_block<T, false, W>(mc, kl, A + m0 * lda + k0, lda, Bp, Cb, ldb, k0 > 0);
      continue;
    }
    for (int64_t m = 0; m < mc; m += 8) {
      const int64_t rows = std::min<int64_t>(8, mc - m);
      if (abuf)
        rows_block<T, true, W>(rows, kl, abuf + m * kl, 8, Bp, Cb + m * ldb, ldb, k0 > 0);
      else
        rows_block<T, true, W>(rows, kl, A + k0 * lda + m0 + m, lda, Bp, Cb + m * ldb, ldb, k0 > 0);
    }
  }
}

template <typename T, int W>
FASTRNN_INLINE void gemm_block_at(bool at, int64_t m0, int64_t mc, int64_t k0, int64_t kl, const T* A, int64_t lda,
                                  const T* panel, int64_t K, int64_t ncb, int64_t full, T* C, int64_t ldc, T* tail,
                                  T* abuf) {
  at ? gemm_block<T, true, W>(m0, mc, k0, kl, A, lda, panel, K, ncb, full, C, ldc, tail, abuf)
     : gemm_block<T, false, W>(m0, mc, k0, kl, A, lda, panel, K, ncb, full, C, ldc, tail, abuf);
}

// a block, in the build for this CPU: the one function of this file built per ISA, so that each build holds
// the kernels once (gemm_part built per ISA held them once for each of its loops, and GCC took ~20 minutes
// over this file on a Zen 3, against ~2.5 for this form: NOTES.md, thirty-fifth session)
FASTRNN_ISA_BUILDS(gemm_block_f, float,
                   (bool at, int64_t m0, int64_t mc, int64_t k0, int64_t kl, const float* A, int64_t lda,
                    const float* panel, int64_t K, int64_t ncb, int64_t full, float* C, int64_t ldc, float* tail,
                    float* abuf),
                   (at, m0, mc, k0, kl, A, lda, panel, K, ncb, full, C, ldc, tail, abuf), gemm_block_at)
FASTRNN_ISA_BUILDS(gemm_block_f, double,
                   (bool at, int64_t m0, int64_t mc, int64_t k0, int64_t kl, const double* A, int64_t lda,
                    const double* panel, int64_t K, int64_t ncb, int64_t full, double* C, int64_t ldc, double* tail,
                    double* abuf),
                   (at, m0, mc, k0, kl, A, lda, panel, K, ncb, full, C, ldc, tail, abuf), gemm_block_at)

// Rows [0, rows) of C [*, N] done: the partial last column block from `tail` [rows][NR], then the bias
template <typename T>
FASTRNN_INLINE void finish_rows(int64_t rows, T* C, int64_t ldc, int64_t N, int64_t full_cols, const T* tail,
                                const T* bias) {
  constexpr int nr = NR<T>;
  if (full_cols == N && !bias) return;
  for (int64_t m = 0; m < rows; ++m) {
    T* c = C + m * ldc;
    for (int64_t j = full_cols; j < N; ++j) c[j] = tail[m * nr + j - full_cols];
    if (bias)
#pragma GCC ivdep
      for (int64_t j = 0; j < N; ++j) c[j] += bias[j];
  }
}

// One worker's part of C [M, N] = A' @ B' (+ bias) from its panel of N columns, in blocks of MC rows x KC.
// Rows outermost (`kouter` false; a worker's columns, the column split): the A block stays in L2 while
// the worker's whole panel streams by, and the rows are done one block at a time (`tail` [MC][NR]). K
// outermost (the row split): the panel's KC rows (ncb x 32 KiB) stay in L2 while every row block uses
// them, C accumulating (`tail` [M][NR]); a panel of all K, 1.6 MiB at K = 1600 and N = 256, would stream
// from L3 once a row block. Rows outermost keeps C out of the loop over k: at M = 6400 and K = 2048
// (B64 H512) it ran at 219-225 GFLOP/s against 203-204 with K outermost (NOTES.md, twenty-third session).
template <typename T, bool AT>
FASTRNN_INLINE void gemm_part(bool kouter, int64_t M, int64_t K, const T* A, int64_t lda, const T* panel, int64_t N,
                              T* C, int64_t ldc, const T* bias, T* tail, T* abuf) {
  constexpr int nr = NR<T>;
  const int64_t ncb = (N + nr - 1) / nr, full = N / nr;  // column blocks, those written in place
  if (kouter) {
    for (int64_t k0 = 0; k0 < K; k0 += KC)
      for (int64_t m0 = 0; m0 < M; m0 += MC)
        gemm_block_f(AT, m0, std::min(MC, M - m0), k0, std::min(KC, K - k0), A, lda, panel, K, ncb, full, C, ldc,
                     tail + m0 * nr, abuf);
    finish_rows(M, C, ldc, N, full * nr, tail, bias);
    return;
  }
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t mc = std::min(MC, M - m0);
    for (int64_t k0 = 0; k0 < K; k0 += KC)
      gemm_block_f(AT, m0, mc, k0, std::min(KC, K - k0), A, lda, panel, K, ncb, full, C, ldc, tail, abuf);
    finish_rows(mc, C + m0 * ldc, ldc, N, full * nr, tail, bias);
  }
}

void gemm_part_f(bool at, bool kouter, int64_t M, int64_t K, const float* A, int64_t lda,
                                const float* panel, int64_t N, float* C, int64_t ldc, const float* bias, float* tail,
                                float* abuf) {
  at ? gemm_part<float, true>(kouter, M, K, A, lda, panel, N, C, ldc, bias, tail, abuf)
     : gemm_part<float, false>(kouter, M, K, A, lda, panel, N, C, ldc, bias, tail, abuf);
}
void gemm_part_f(bool at, bool kouter, int64_t M, int64_t K, const double* A, int64_t lda,
                                const double* panel, int64_t N, double* C, int64_t ldc, const double* bias,
                                double* tail, double* abuf) {
  at ? gemm_part<double, true>(kouter, M, K, A, lda, panel, N, C, ldc, bias, tail, abuf)
     : gemm_part<double, false>(kouter, M, K, A, lda, panel, N, C, ldc, bias, tail, abuf);
}

// Does an A^T product read A^T's 8-row slivers in place (a k step a row of `a` apart) rather than pack each
// block of them first? Packing pays only where a sliver serves many column blocks and a row of `a` is a
// multiple of 4 KiB (every k step of a sliver then falls in the same few sets of L1); in place, a block of 8
// rows reads half a line a k. One core, a worker's 128 rows x K 1600 of a weight gradient, best of three,
// packed / in place, us: 64 columns 166-170 / 112-131 at rows of 1-8 KiB apart; 128 columns 281-291 / 223-225 at
// 1 and 3 KiB, 278-285 / 256-259 at 4 and 8 KiB; 256 columns 497-502 / 440-443 at 1 and 3 KiB, 499-504 / 519-521
// at 4 and 8 KiB (NOTES.md, thirty-fourth session).
template <typename T>
bool at_in_place(int64_t nblocks, int64_t lda) {
  const int mode = at_pack_mode().load(std::memory_order_relaxed);
  if (mode >= 0) return mode == 0;
  return nblocks <= 4 || (lda * int64_t(sizeof(T))) % 4096 != 0;
}

// C [M, N] = A' @ B' (+ bias [N]): A' = a ([M, K]) or a^T (a [K, M]); B' = b ([K, N]) or b^T (b [N, K]).
template <typename T>
void mm_impl(const at::Tensor& a, bool ta, const at::Tensor& b, bool tb, const T* bias, at::Tensor& c) {
  constexpr int nr = NR<T>;
  const int64_t M = c.size(0), N = c.size(1), K = ta ? a.size(0) : a.size(1);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    c.zero_();
    if (bias) c.add_(at::from_blob(const_cast<T*>(bias), {N}, c.options()));
    return;
  }
  const int64_t nblocks = (N + nr - 1) / nr;
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  T* cp = c.data_ptr<T>();
  const int64_t lda = a.size(1), ldb = b.size(1);
  const bool pack_at = ta && !at_in_place<T>(nblocks, lda);  // A^T's slivers packed (else read in place)
  // Split by rows of C (gemm_part, K outermost) where the column split loses: an A^T product of many k (a weight
  // gradient, K the sequence's rows: split by columns, each worker's panel, K x its columns, 800 KiB at
  // K = 1600 and 128 columns, streams through L2 once a row block of 128 beside the A^T block it packs,
  // ~175 GFLOP/s against ~205 for the A @ B' products of the same size), or columns that do not split
  // evenly (N = 200: 7 blocks of 32, 4 / 3). Not for wide products, whose panel slice of KC rows would
  // not stay in L2 (NOTES.md, twenty-third session).
  const int64_t rows8 = (M + 7) / 8;  // the workers' rows in register blocks of 8
  const bool narrow = N * KC * int64_t(sizeof(T)) <= (int64_t(512) << 10);
  if (threads > 1 && rows8 >= 2 * threads && narrow &&
      ((ta && K > KC) || nblocks % threads != 0)) {
    const int nw = threads;
    const int64_t Mw = (rows8 + nw - 1) / nw * 8;  // rows a worker
    Scratch<T> panel(nblocks * nr * K), tails(nw * Mw * nr), abufs(pack_at ? nw * MC * KC : 0);
    T* pan = panel.data();
    at::parallel_for(0, nblocks, 1, [&](int64_t cb0, int64_t cb1) {
      pack_panel(bp, ldb, !tb, K, (cb1 - cb0) * nr, [&](int64_t n) { return cb0 * nr + n < N ? cb0 * nr + n : int64_t(-1); },
                 pan + cb0 * K * nr);
    });
    at::parallel_for(0, nw, 1, [&](int64_t wb, int64_t we) {
      for (int64_t w = wb; w < we; ++w) {
        const int64_t m0 = w * Mw, mc = std::min(M, m0 + Mw) - m0;
        if (mc <= 0) continue;
        gemm_part_f(ta, true, mc, K, ta ? ap + m0 : ap + m0 * lda, lda, pan, N, cp + m0 * N, N, bias,
                    tails.data() + w * Mw * nr, pack_at ? abufs.data() + w * MC * KC : nullptr);
      }
    });
    return;
  }
  const int nw = int(std::max<int64_t>(1, std::min<int64_t>(threads, nblocks)));
  const int64_t per = (nblocks + nw - 1) / nw;  // column blocks a worker
  Scratch<T> panels(nw * per * nr * K), tails(nw * MC * nr), abufs(pack_at ? nw * MC * KC : 0);
  auto body = [&](int64_t wb, int64_t we) {
    for (int64_t w = wb; w < we; ++w) {
      const int64_t n0 = w * per * nr, nc = std::min(N, (w + 1) * per * nr) - n0;
      if (nc <= 0) continue;
      const int64_t ncb = (nc + nr - 1) / nr;
      T* pan = panels.data() + w * per * nr * K;
      // B'(k, n) = b[n * ldb + k] (tb: b is [N, K]) or b[k * ldb + n]: pack_cols' trans is the latter
      pack_panel(bp, ldb, !tb, K, ncb * nr, [&](int64_t n) { return n < nc ? n0 + n : int64_t(-1); }, pan);
      gemm_part_f(ta, false, M, K, ap, lda, pan, nc, cp + n0, N, bias ? bias + n0 : nullptr, tails.data() + w * MC * nr,
                  pack_at ? abufs.data() + w * MC * KC : nullptr);
    }
  };
  if (nw == 1)
    body(0, 1);
  else
    at::parallel_for(0, nw, 1, body);
}

}  // namespace

std::atomic<int>& at_pack_mode() {
  static std::atomic<int> mode{-1};
  return mode;
}

bool at_in_place_f32(int64_t N, int64_t lda) { return at_in_place<float>((N + NR<float> - 1) / NR<float>, lda); }

// Is the packed kernel the one to run a product of M x N x K? Not on Intel CPUs, where MKL's own kernels
// run these shapes (MKL's path on other vendors is the slow one); not for small products or few columns
// (a block of 32 columns is the kernel's unit: fewer waste its lanes).
std::atomic<int>& own_mm_mode() {
  static std::atomic<int> mode{-1};
  return mode;
}

bool own_mm(int64_t M, int64_t N, int64_t K) {
  const int mode = own_mm_mode().load(std::memory_order_relaxed);
  if (mode >= 0) return mode == 1;
#if defined(__x86_64__)
  static const bool intel = __builtin_cpu_is("intel");
#else
  static const bool intel = true;
#endif
  return !intel && N >= 32 && M >= 16 && K >= 16 && M * N * K >= (int64_t(1) << 21);
}

// out [M, N] = A' @ B' (+ bias): the op behind CppBackend.mm (torch's product where own_mm says no)
at::Tensor big_mm(const at::Tensor& a, bool ta, const at::Tensor& b, bool tb, const c10::optional<at::Tensor>& bias) {
  check_float(a, "a", a);
  check_float(b, "b", a);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "fastrnn cpp backend: mm takes 2-D tensors, got ", a.sizes(), " and ",
              b.sizes());
  const int64_t M = ta ? a.size(1) : a.size(0), K = ta ? a.size(0) : a.size(1);
  const int64_t Kb = tb ? b.size(1) : b.size(0), N = tb ? b.size(0) : b.size(1);
  TORCH_CHECK(K == Kb, "fastrnn cpp backend: mm of [", M, ", ", K, "] and [", Kb, ", ", N, "]");
  check_opt(bias, "bias", {N}, a);
  at::Tensor c = pool_empty({M, N}, a.options());
  if (!own_mm(M, N, K)) {
    const at::Tensor A = ta ? a.t() : a, B = tb ? b.t() : b;
    return opt_ptr(bias) ? at::addmm_out(c, *bias, A, B) : at::mm_out(c, A, B);
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastrnn_mm",
                             [&] { mm_impl<scalar_t>(a, ta, b, tb, data_or_null<scalar_t>(bias), c); });
  return c;
}

at::Tensor weight_grad(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& lengths, int64_t T,
                       int64_t B) {
  if (!opt_ptr(lengths)) return big_mm(a, true, b, false);
  const std::vector<int64_t> sizes = batch_sizes(lengths, T, B);
  std::vector<int64_t> rows;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < sizes[t]; ++r) rows.push_back(t * B + r);
  if (int64_t(rows.size()) == T * B) return big_mm(a, true, b, false);
  const at::Tensor idx = at::tensor(rows, at::TensorOptions().dtype(at::kLong));
  return big_mm(a.index_select(0, idx), true, b.index_select(0, idx), false);
}

TORCH_LIBRARY_IMPL(fastrnn_cpp, CPU, m) { m.impl("mm", &big_mm); }

}  // namespace fastrnn
