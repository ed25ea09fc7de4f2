// The parts every cell of the cpp backend shares: SIMD vectors, activations, the packed GEMM, the
// spin barrier, and the two time-loop drivers (forward, backward) that run one layer-direction.
//
// Threads. A team of `nw` workers runs the whole time loop (one at::parallel_for for the sequence).
// Worker w owns a slice of hidden units (all gate rows of those units) and keeps its slice of W_hh,
// packed once per call, in its own cache for the whole sequence; workers meet at a spin barrier once
// per step (twice with a projection, and in the backward). Where the weights are small and the batch has
// rows for every worker, worker w owns a slice of batch rows instead, with all units and its own copy of
// the panels, and the steps need no barrier (Layout). Nothing is allocated inside the loop.
//
// ISA. The hot functions (GEMM, pointwise passes) are built for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and
// baseline x86-64, one of them picked on the CPU at hand. The pointwise passes are scalar loops that GCC
// vectorizes for each (FASTRNN_CLONES: its target_clones). The products and the packing are written in
// vectors of W bytes, a template argument, and built once a width: 64 for AVX-512, 32 for AVX2, 16 for the
// baseline (FASTRNN_ISA_BUILDS). A vector wider than the target's registers has no machine mode: GCC keeps it
// in memory, and the AVX2 build of 64-byte vectors ran the products at ~4 GFLOP/s on a Zen 3 (NOTES.md,
// thirty-fifth session).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <unistd.h>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && !defined(FASTRNN_NO_CLONES)
#define FASTRNN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#include <immintrin.h>
#define FASTRNN_PAUSE() _mm_pause()
#else
#define FASTRNN_CLONES
#define FASTRNN_PAUSE() ((void)0)
#endif
#define FASTRNN_INLINE inline __attribute__((always_inline))

namespace fastrnn {

// ---- SIMD vectors of W bytes (64: 16 floats, 8 doubles), GCC vector extensions -------------------
template <typename T, int W> struct Vec { typedef T type __attribute__((vector_size(W))); };
template <typename T, int W = 64> using V = typename Vec<T, W>::type;
// lanes<T>(): a 64-byte vector's, the unit of the drivers' splits by units (the same on every ISA)
template <typename T, int W = 64> constexpr int lanes() { return W / sizeof(T); }

template <int W = 64, typename T> FASTRNN_INLINE V<T, W> vload(const T* p) { V<T, W> v; std::memcpy(&v, p, sizeof v); return v; }
template <typename T, typename VT> FASTRNN_INLINE void vstore(T* p, VT v) { std::memcpy(p, &v, sizeof v); }

// Per-ISA builds of a product or packing function (FASTRNN_ISA_BUILDS, below): isa_level() is 4 (AVX-512), 3
// (AVX2) or 1 (baseline, and every CPU without the clones), at most the cap that set_isa_cap sets (the tests run
// each build the CPU has).
inline std::atomic<int>& isa_cap() {
  static std::atomic<int> value{4};
  return value;
}
#if defined(__x86_64__) && !defined(FASTRNN_NO_CLONES)
inline int isa_detected() {
  static const int level = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 1;
  }();
  return level;
}
inline int isa_level() { return std::min(isa_detected(), isa_cap().load(std::memory_order_relaxed)); }
#define FASTRNN_ISA_V4 __attribute__((target("arch=x86-64-v4")))
#define FASTRNN_ISA_V3 __attribute__((target("arch=x86-64-v3")))
#else
inline int isa_detected() { return 1; }
inline int isa_level() { return 1; }
#define FASTRNN_ISA_V4
#define FASTRNN_ISA_V3
#endif
// the width of the build for an ISA level (the portable build, without clones, keeps 64-byte vectors)
#if defined(__x86_64__) && !defined(FASTRNN_NO_CLONES)
constexpr int BASE_W = 16;
#else
constexpr int BASE_W = 64;
#endif
// NAME PARAMS built three times, IMPL<T, W> ARGS with W = 64 (AVX-512), 32 (AVX2) and BASE_W, and NAME itself
// running the build for this CPU (a well-predicted branch a call)
#define FASTRNN_ISA_BUILDS(NAME, T, PARAMS, ARGS, IMPL)                     \
  FASTRNN_ISA_V4 static void NAME##_v4 PARAMS { IMPL<T, 64> ARGS; }        \
  FASTRNN_ISA_V3 static void NAME##_v3 PARAMS { IMPL<T, 32> ARGS; }        \
  static void NAME##_v1 PARAMS { IMPL<T, BASE_W> ARGS; }                   \
  void NAME PARAMS {                                                       \
    const int level = isa_level();                                         \
    if (level == 4)                                                        \
      NAME##_v4 ARGS;                                                      \
    else if (level == 3)                                                   \
      NAME##_v3 ARGS;                                                      \
    else                                                                   \
      NAME##_v1 ARGS;                                                      \
  }

// ---- reductions over a row: vector accumulators (GCC does not vectorize a floating-point sum by itself,
// which would reorder it; a scalar chain of adds waits ~4 cycles each). They run inside the target_clones
// builds of the pointwise passes, so in 32-byte vectors: registers on AVX2 and AVX-512 alike ---------------
constexpr int RW = 32;
template <typename T, typename VT>
FASTRNN_INLINE T hsum(VT v) {
  T s = T(0);
  for (int l = 0; l < int(sizeof(VT) / sizeof(T)); ++l) s += v[l];
  return s;
}

// a lambda that must be inlined into a FASTRNN_CLONES function (a function of its own is built for the
// baseline ISA only)
#define FASTRNN_INLINE_LAMBDA __attribute__((always_inline))

// sum_j f(vector at j) over j < n, f taking (offset) and returning a vector; `tail` the scalar form
template <typename T, typename FV, typename FS>
FASTRNN_INLINE T vreduce(int64_t n, FV fv, FS fs) {
  constexpr int N = lanes<T, RW>();
  V<T, RW> a0 = {}, a1 = {};
  int64_t j = 0;
  for (; j + 2 * N <= n; j += 2 * N) {
    a0 += fv(j);
    a1 += fv(j + N);
  }
  for (; j + N <= n; j += N) a0 += fv(j);
  T s = hsum<T>(V<T, RW>(a0 + a1));
  for (; j < n; ++j) s += fs(j);
  return s;
}

template <typename T>
FASTRNN_INLINE T vsum(const T* a, int64_t n) {
  return vreduce<T>(n, [&](int64_t j) FASTRNN_INLINE_LAMBDA { return vload<RW>(a + j); }, [&](int64_t j) FASTRNN_INLINE_LAMBDA { return a[j]; });
}
template <typename T>
FASTRNN_INLINE T vsqdev(const T* a, int64_t n, T mean) {  // sum (a - mean)^2
  const V<T, RW> m = V<T, RW>{} + mean;
  return vreduce<T>(n, [&](int64_t j) FASTRNN_INLINE_LAMBDA { const V<T, RW> d = vload<RW>(a + j) - m; return d * d; },
                    [&](int64_t j) FASTRNN_INLINE_LAMBDA { return (a[j] - mean) * (a[j] - mean); });
}
template <typename T>
FASTRNN_INLINE T vdot(const T* a, const T* b, int64_t n) {
  return vreduce<T>(n, [&](int64_t j) FASTRNN_INLINE_LAMBDA { return vload<RW>(a + j) * vload<RW>(b + j); }, [&](int64_t j) FASTRNN_INLINE_LAMBDA { return a[j] * b[j]; });
}
template <typename T>
FASTRNN_INLINE T vdot3(const T* a, const T* b, const T* c, int64_t n) {
  return vreduce<T>(n, [&](int64_t j) FASTRNN_INLINE_LAMBDA { return vload<RW>(a + j) * vload<RW>(b + j) * vload<RW>(c + j); },
                    [&](int64_t j) FASTRNN_INLINE_LAMBDA { return a[j] * b[j] * c[j]; });
}

// ---- activations ------------------------------------------------------------------------------------
// float32: tanh(x) ~ x P(x^2) / Q(x^2) on [-9, 9] (least-squares fit made for fastrnn, max abs error
// 3.3e-7 in float32; the same coefficients as the numba backend). A NaN fails both clamps and stays
// NaN; +-inf clamp to +-9 and give +-1. float64: libm.
FASTRNN_INLINE float tanh_(float x) {
  x = x > 9.f ? 9.f : x;
  x = x < -9.f ? -9.f : x;
  const float s = x * x;
  const float p = ((((((-8.642440220e-14f * s + 5.329159598e-11f) * s - 2.031272308e-08f) * s + 1.117165808e-05f) * s +
                     3.105340692e-03f) * s + 1.308515589e-01f) * s + 9.999999738e-01f);
  const float q = (((2.548330486e-04f * s + 2.450040609e-02f) * s + 4.641847807e-01f) * s + 1.f);
  return x * p / q;
}
FASTRNN_INLINE float sigmoid_(float x) { return 0.5f * tanh_(0.5f * x) + 0.5f; }
FASTRNN_INLINE double tanh_(double x) { return std::tanh(x); }
FASTRNN_INLINE double sigmoid_(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// ---- the packed GEMM --------------------------------------------------------------------------------
// C[m, n] = sum_k A[m, k] * B(k, n) for m < M, n < NR * ncb, where B is packed in column blocks of
// NR = 128 bytes (32 floats, 16 doubles; the same layout on every ISA): panel[cb][k][NR]. Register blocks of
// MB rows x NR columns (NV = 128 / W vectors a row): 8 rows of 2 vectors with AVX-512's 32 registers, 3 of 4
// with AVX2's 16; a single row uses interleaved accumulator sets so the FMA chains overlap.
template <typename T> constexpr int NR = 128 / sizeof(T);
template <int W> constexpr int MB = W == 64 ? 8 : W == 32 ? 3 : 1;

template <int W, typename T, typename VT>
FASTRNN_INLINE void store_acc(T* C, VT v, bool accumulate) {
  vstore(C, accumulate ? vload<W>(C) + v : v);
}

// A[m, k] at A[m * lda + k], or at A[k * lda + m] with AT (A^T stored: gemm.cpp)
template <typename T, int MR, bool AT = false, int W = 64>
FASTRNN_INLINE void micro(int64_t K, const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc, bool accumulate) {
  constexpr int N = lanes<T, W>(), NV = NR<T> / N;
  V<T, W> acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = V<T, W>{};
  for (int64_t k = 0; k < K; ++k) {
    V<T, W> b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload<W>(Bp + k * NR<T> + v * N);
    for (int m = 0; m < MR; ++m) {
      const T a = AT ? A[k * lda + m] : A[m * lda + k];
      for (int v = 0; v < NV; ++v) acc[m][v] += a * b[v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) store_acc<W>(C + m * ldc + v * N, acc[m][v], accumulate);
}

// one row: S sets of accumulators over k (4 with 2 vectors a row, 2 with 4, 1 with 8)
template <typename T, int W = 64>
FASTRNN_INLINE void micro_row(int64_t K, const T* A, const T* Bp, T* C, bool accumulate) {
  constexpr int N = lanes<T, W>(), NV = NR<T> / N, S = NV <= 2 ? 4 : NV == 4 ? 2 : 1;
  V<T, W> acc[S][NV] = {};
  int64_t k = 0;
  for (; k + S <= K; k += S) {
    for (int s = 0; s < S; ++s) {
      const T a = A[k + s];
      for (int v = 0; v < NV; ++v) acc[s][v] += a * vload<W>(Bp + (k + s) * NR<T> + v * N);
    }
  }
  for (; k < K; ++k)
    for (int v = 0; v < NV; ++v) acc[0][v] += A[k] * vload<W>(Bp + k * NR<T> + v * N);
  for (int v = 0; v < NV; ++v) {
    V<T, W> sum = acc[0][v];
    if constexpr (S == 4) sum = (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]);
    if constexpr (S == 2) sum = acc[0][v] + acc[1][v];
    store_acc<W>(C + v * N, sum, accumulate);
  }
}

// K is cut in blocks of KC so that the KC x NR slice of the panel (32 KiB) stays in L1 while every
// row block uses it; the row blocks of A (h, at most B x KC) come from L2.
constexpr int64_t KC = 256;

// the remainder of r rows (1 <= r < MB) of rows_block: micro<R> for R = r
template <typename T, bool AT, int W, int R>
FASTRNN_INLINE void micro_rest(int64_t r, int64_t K, const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc,
                               bool acc) {
  if constexpr (R >= 2) {
    if (r == R) return micro<T, R, AT, W>(K, A, lda, Bp, C, ldc, acc);
    micro_rest<T, AT, W, R - 1>(r, K, A, lda, Bp, C, ldc, acc);
  } else if (AT) {
    micro<T, 1, true, W>(K, A, lda, Bp, C, ldc, acc);
  } else {
    micro_row<T, W>(K, A, Bp, C, acc);
  }
}

// C rows [0, rows) from A's rows and one KC x NR slice of a panel: register blocks of MB rows, then one
// block of the remainder (a single row of a row-major A through micro_row's interleaved accumulators).
// A[m, k] at A[m * lda + k], or with AT at A[k * lda + m] (gemm.cpp's packed slivers of A^T).
template <typename T, bool AT = false, int W = 64>
FASTRNN_INLINE void rows_block(int64_t rows, int64_t K, const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc,
                               bool acc) {
  auto a_at = [&](int64_t m) FASTRNN_INLINE_LAMBDA { return AT ? A + m : A + m * lda; };
  constexpr int R = MB<W>;
  int64_t m = 0;
  for (; m + R <= rows; m += R) micro<T, R, AT, W>(K, a_at(m), lda, Bp, C + m * ldc, ldc, acc);
  if (m < rows) micro_rest<T, AT, W, R - 1>(rows - m, K, a_at(m), lda, Bp, C + m * ldc, ldc, acc);
}

template <typename T, int W = 64>
FASTRNN_INLINE void gemm_packed_impl(int64_t M, int64_t K, const T* A, int64_t lda, const T* panel, int64_t ncb, T* C,
                                     int64_t ldc) {
  constexpr int nr = NR<T>;
  if (M <= MB<W>) {
    // one register block of rows reuses no slice of the panel: the whole depth a column block, the panel
    // read front to back (by KC slices it was read in K / KC passes, each jumping a column block's K x NR
    // apart: RNN B1 H512, K = 512, ran 5.6 us a step against 3.6 for the LSTM's B1 H256, K = 256, over as
    // many bytes; NOTES.md, thirty-third session)
    for (int64_t cb = 0; cb < ncb; ++cb)
      rows_block<T, false, W>(M, K, A, lda, panel + cb * K * nr, C + cb * nr, ldc, false);
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kl = std::min(KC, K - k0);
    for (int64_t cb = 0; cb < ncb; ++cb)
      rows_block<T, false, W>(M, kl, A + k0, lda, panel + cb * K * nr + k0 * nr, C + cb * nr, ldc, k0 > 0);
  }
}

void gemm_packed(int64_t M, int64_t K, const float* A, int64_t lda, const float* panel, int64_t ncb, float* C,
                 int64_t ldc);
void gemm_packed(int64_t M, int64_t K, const double* A, int64_t lda, const double* panel, int64_t ncb, double* C,
                 int64_t ldc);

// gemm_packed over `groups` blocks of M rows: block s reads A + s * sa and writes C + s * sc (a row split's
// block of steps in the fused input projection: a worker's rows of each step, B rows apart). Each KC x NR
// slice of the panel serves every block from L1, as it would one block of groups * M rows; a gemm_packed a
// block (M <= 8) read the whole panel once a block, from L3 where the panels of W_ih and W_hh together
// exceed the core's L2 (NOTES.md, thirty-fifth session).
template <typename T, int W = 64>
FASTRNN_INLINE void gemm_groups_impl(int64_t groups, int64_t M, int64_t K, const T* A, int64_t lda, int64_t sa,
                                     const T* panel, int64_t ncb, T* C, int64_t ldc, int64_t sc) {
  constexpr int nr = NR<T>;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kl = std::min(KC, K - k0);
    for (int64_t cb = 0; cb < ncb; ++cb)
      for (int64_t s = 0; s < groups; ++s)
        rows_block<T, false, W>(M, kl, A + s * sa + k0, lda, panel + cb * K * nr + k0 * nr, C + s * sc + cb * nr, ldc,
                                k0 > 0);
  }
}

void gemm_groups(int64_t groups, int64_t M, int64_t K, const float* A, int64_t lda, int64_t sa, const float* panel,
                 int64_t ncb, float* C, int64_t ldc, int64_t sc);
void gemm_groups(int64_t groups, int64_t M, int64_t K, const double* A, int64_t lda, int64_t sa, const double* panel,
                 int64_t ncb, double* C, int64_t ldc, int64_t sc);

// 1 (default): the row split's fused projection a block of steps at once (gemm_groups); 0: a gemm_packed a
// step, as before it (the tests and benchmarks.train_ab compare the two)
inline std::atomic<int>& proj_groups_mode() {
  static std::atomic<int> value{1};
  return value;
}

// Unpacked products, for calls too short to pay for packing (a single step reads W once anyway).
// Columns n = g * U + j (g < G, j < count) of C come from row (g * stride + offset + j) of W.
struct ColMap {
  int64_t G, stride, offset, count, U;
};

// dot form: C[m, n] = sum_k A[m, k] * W[row(n) * K + k] (W's rows are contiguous in k). Columns go in
// groups of one vector's lanes (16 floats): one accumulator vector per row of W, then a tree of
// shuffles folds the 16 accumulators into one vector of 16 sums (4 levels, 30 shuffles and 15 adds
// for 16 outputs, instead of a horizontal sum per output).
template <typename T> struct IElt;
template <> struct IElt<float> { typedef int32_t type; };
template <> struct IElt<double> { typedef int64_t type; };
template <typename T, int W = 64> using VI = V<typename IElt<T>::type, W>;

// Level l folds vectors whose rows sit in lane groups of width w = lanes >> l into groups of w / 2:
// out = shuffle(a, b, lo[l]) + shuffle(a, b, hi[l]), a's rows first.
template <typename T, int W>
struct FoldMasks {
  VI<T, W> lo[8], hi[8];
  FoldMasks() {
    constexpr int N = lanes<T, W>();
    int l = 0;
    for (int w = N; w > 1; w /= 2, ++l) {
      const int half = w / 2, rows = N / w;
      for (int L = 0; L < N; ++L) {
        const int j = L / half, m = L % half, src = j < rows ? 0 : 1, jj = j < rows ? j : j - rows;
        lo[l][L] = src * N + jj * w + m;
        hi[l][L] = src * N + jj * w + half + m;
      }
    }
  }
};
template <typename T, int W> const FoldMasks<T, W>& fold_masks() {
  static const FoldMasks<T, W> masks;
  return masks;
}

// acc[r] (r < lanes) -> one vector whose lane r is the sum of acc[r]'s lanes (acc is overwritten)
template <typename T, int W>
FASTRNN_INLINE V<T, W> sum_rows(V<T, W>* acc, const FoldMasks<T, W>& fm) {
  constexpr int N = lanes<T, W>();
  int l = 0;
  for (int n = N; n > 1; n /= 2, ++l)
    for (int i = 0; i < n / 2; ++i)
      acc[i] = __builtin_shuffle(acc[2 * i], acc[2 * i + 1], fm.lo[l]) +
               __builtin_shuffle(acc[2 * i], acc[2 * i + 1], fm.hi[l]);
  return acc[0];
}

template <typename T, int VW = 64>
FASTRNN_INLINE void gemm_rows_impl(int64_t M, int64_t K, const T* A, int64_t lda, const T* W, const ColMap& cm, T* C,
                                   int64_t ldc) {
  constexpr int N = lanes<T, VW>();
  // a second set of accumulators where the registers hold it (AVX-512's 32; AVX2's 16 hold one set of 8)
  constexpr bool two = VW == 64;
  const FoldMasks<T, VW>& fm = fold_masks<T, VW>();
  for (int64_t g = 0; g < cm.G; ++g) {
    int64_t j = 0;
    for (; j + N <= cm.count; j += N) {
      const T* w = W + (g * cm.stride + cm.offset + j) * K;  // N consecutive rows of W
      for (int64_t m = 0; m < M; ++m) {
        const T* a = A + m * lda;
        // two vectors of k a pass, in two sets of accumulators: each row's stream moves a whole line
        // (128 bytes) a pass; at M = 1 (a cell, a step of batch 1) this read W from L2 at 81-92% of a
        // plain sequential read against 66-85% with one vector a pass (NOTES.md, twenty-fourth session)
        V<T, VW> acc[N] = {}, acc2[two ? N : 1] = {};
        int64_t k = 0;
        for (; two && k + 2 * N <= K; k += 2 * N) {
          const V<T, VW> av = vload<VW>(a + k), av2 = vload<VW>(a + k + N);
          for (int r = 0; r < N; ++r) {
            acc[r] += av * vload<VW>(w + r * K + k);
            acc2[two ? r : 0] += av2 * vload<VW>(w + r * K + k + N);
          }
        }
        for (; k + N <= K; k += N) {
          const V<T, VW> av = vload<VW>(a + k);
          for (int r = 0; r < N; ++r) acc[r] += av * vload<VW>(w + r * K + k);
        }
        for (int r = 0; two && r < N; ++r) acc[r] += acc2[two ? r : 0];
        V<T, VW> s = sum_rows<T, VW>(acc, fm);
        for (; k < K; ++k)
          for (int r = 0; r < N; ++r) s[r] += a[k] * w[r * K + k];
        vstore(C + m * ldc + g * cm.U + j, s);
      }
    }
    for (; j < cm.count; ++j) {
      const T* w = W + (g * cm.stride + cm.offset + j) * K;
      for (int64_t m = 0; m < M; ++m) {
        const T* a = A + m * lda;
        V<T, VW> acc[4] = {};
        int64_t k = 0;
        for (; k + 4 * N <= K; k += 4 * N)
          for (int s = 0; s < 4; ++s) acc[s] += vload<VW>(a + k + s * N) * vload<VW>(w + k + s * N);
        for (; k + N <= K; k += N) acc[0] += vload<VW>(a + k) * vload<VW>(w + k);
        const V<T, VW> v = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        T sum = T(0);
        for (int l = 0; l < N; ++l) sum += v[l];
        for (; k < K; ++k) sum += a[k] * w[k];
        C[m * ldc + g * cm.U + j] = sum;
      }
    }
  }
}

// axpy form: C[m, j] = sum_k A[m, k] * W[k * ldw + offset + j] for j < count (G = 1)
template <typename T>
FASTRNN_INLINE void gemm_cols_impl(int64_t M, int64_t K, const T* A, int64_t lda, const T* W, int64_t ldw,
                                   int64_t offset, int64_t count, T* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    T* c = C + m * ldc;
    for (int64_t j = 0; j < count; ++j) c[j] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[m * lda + k];
      const T* w = W + k * ldw + offset;
#pragma GCC ivdep
      for (int64_t j = 0; j < count; ++j) c[j] += a * w[j];
    }
  }
}

void gemm_rows(int64_t M, int64_t K, const float* A, int64_t lda, const float* W, const ColMap& cm, float* C,
               int64_t ldc);
void gemm_rows(int64_t M, int64_t K, const double* A, int64_t lda, const double* W, const ColMap& cm, double* C,
               int64_t ldc);
void gemm_cols(int64_t M, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw, int64_t offset,
               int64_t count, float* C, int64_t ldc);
void gemm_cols(int64_t M, int64_t K, const double* A, int64_t lda, const double* W, int64_t ldw, int64_t offset,
               int64_t count, double* C, int64_t ldc);

// Pack B(k, n) = src[col(n) * ld + k] (trans = false: the rows of src are columns of B, as W_hh in
// h @ W_hh^T) or src[k * ld + col(n)] (trans = true), for n < ncols, into column blocks of NR. col(n)
// < 0 marks a padding column (zeros). trans = false goes through lanes x lanes tiles transposed in
// registers (a butterfly of two-input shuffles); trans = true copies along k.
template <typename T, int W>
struct TransposeMasks {
  VI<T, W> lo[8], hi[8];
  TransposeMasks() {
    constexpr int N = lanes<T, W>();
    int l = 0;
    for (int b = N / 2; b >= 1; b /= 2, ++l)
      for (int j = 0; j < N; ++j) {
        lo[l][j] = (j & b) == 0 ? j : N + j - b;  // row r: its own left half, then row r + b's
        hi[l][j] = (j & b) == 0 ? j + b : N + j;  // row r + b: row r's right half, then its own
      }
  }
};
template <typename T, int W> const TransposeMasks<T, W>& transpose_masks() {
  static const TransposeMasks<T, W> masks;
  return masks;
}

template <typename T, int W = 64>
FASTRNN_INLINE void pack_cols_impl(const T* src, int64_t ld, bool trans, int64_t K, int64_t ncols, const int64_t* col,
                                   T* panel) {
  constexpr int N = lanes<T, W>(), nr = NR<T>;
  const TransposeMasks<T, W>& tm = transpose_masks<T, W>();
  for (int64_t n0 = 0; n0 < ncols; n0 += nr) {
    T* dst = panel + (n0 / nr) * K * nr;
    if (trans) {
      bool run = col[n0] >= 0;  // the block's columns consecutive: a row copy per k
      for (int i = 1; i < nr && run; ++i) run = col[n0 + i] == col[n0] + i;
      if (run) {
        for (int64_t k = 0; k < K; ++k) std::memcpy(dst + k * nr, src + k * ld + col[n0], sizeof(T) * nr);
        continue;
      }
      for (int64_t k = 0; k < K; ++k)
        for (int i = 0; i < nr; ++i) dst[k * nr + i] = col[n0 + i] < 0 ? T(0) : src[k * ld + col[n0 + i]];
      continue;
    }
    for (int q = 0; q < nr / N; ++q) {
      const int64_t* c = col + n0 + q * N;
      int64_t k = 0;
      for (; k + N <= K; k += N) {
        V<T, W> r[N];
#pragma GCC unroll 16
        for (int i = 0; i < N; ++i) r[i] = c[i] < 0 ? V<T, W>{} : vload<W>(src + c[i] * ld + k);
#pragma GCC unroll 4
        for (int l = 0; (N >> (l + 1)) >= 1; ++l) {
          const int b = N >> (l + 1);
#pragma GCC unroll 16
          for (int i = 0; i < N; ++i)
            if ((i & b) == 0 && i + b < N) {  // (i & b) == 0 implies i + b < N; said for GCC's bounds check at N = 2
              const V<T, W> x = __builtin_shuffle(r[i], r[i + b], tm.lo[l]);
              r[i + b] = __builtin_shuffle(r[i], r[i + b], tm.hi[l]);
              r[i] = x;
            }
        }
#pragma GCC unroll 16
        for (int j = 0; j < N; ++j) vstore(dst + (k + j) * nr + q * N, r[j]);
      }
      for (; k < K; ++k)
        for (int i = 0; i < N; ++i) dst[k * nr + q * N + i] = c[i] < 0 ? T(0) : src[c[i] * ld + k];
    }
  }
}

void pack_cols(const float* src, int64_t ld, bool trans, int64_t K, int64_t ncols, const int64_t* col, float* panel);
void pack_cols(const double* src, int64_t ld, bool trans, int64_t K, int64_t ncols, const int64_t* col, double* panel);

template <typename T, typename ColFn>
void pack_panel(const T* src, int64_t ld, bool trans, int64_t K, int64_t ncols, ColFn col, T* panel) {
  TORCH_CHECK(ncols % NR<T> == 0, "fastrnn cpp backend: internal error: panel of ", ncols, " columns");
  std::vector<int64_t> cols(ncols);
  for (int64_t n = 0; n < ncols; ++n) cols[n] = col(n);
  pack_cols(src, ld, trans, K, ncols, cols.data(), panel);
}

// ---- large buffers (pool.cpp) -------------------------------------------------------------------
// Tensors of 1 MiB and more from a cache of blocks whose pages are already mapped (a fresh mmap'ed
// buffer costs a page fault per 4 KiB on first touch); smaller ones from torch's CPU allocator.
at::Tensor pool_empty(at::IntArrayRef sizes, const at::TensorOptions& opts);
at::Tensor pool_zeros(at::IntArrayRef sizes, const at::TensorOptions& opts);
void empty_cache();
// the most idle bytes kept (0: no cache); trim: free the idle blocks when lowering it; returns the old limit
int64_t set_cache_cap(int64_t bytes, bool trim);
std::tuple<int64_t, int64_t, int64_t> cache_info();  // bytes in use, bytes idle, the idle cap

// ---- a call's temporaries ------------------------------------------------------------------------
// Buffers that live only during one call (packed panels, the per-step products, the state's double
// buffer, a cell's projected input) come from a per-thread stack when they are under 1 MiB: a cell call
// at batch 1 made ~14 small allocations through at::empty, about half of its cost (NOTES.md, twelfth
// session). A Scratch takes the next bytes of its thread's block and gives them back when it goes out of
// scope (in reverse order: Scratches are locals). What does not fit comes from malloc, and the block is
// regrown to the largest total seen (up to 8 MiB) the next time it is empty. Buffers of 1 MiB and more
// come from the pool (pool_empty), which keeps their pages mapped.
struct Arena {
  char* block = nullptr;
  size_t cap = 0, top = 0, want = 0;
  ~Arena() { std::free(block); }
};
inline Arena& arena() {
  thread_local Arena a;
  return a;
}

template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) {
    constexpr size_t kMax = size_t(1) << 20, kArenaMax = size_t(8) << 20;
    const size_t bytes = (size_t(std::max<int64_t>(n, 0)) * sizeof(T) + 63) / 64 * 64;
    if (bytes >= kMax) {
      big_ = pool_empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
      p_ = big_.data_ptr<T>();
      return;
    }
    Arena& a = arena();
    if (a.top == 0 && std::min(a.want, kArenaMax) > a.cap) {
      std::free(a.block);
      a.cap = std::min(a.want, kArenaMax);
      a.block = static_cast<char*>(std::aligned_alloc(64, a.cap));
      if (!a.block) a.cap = 0;
    }
    mark_ = a.top;
    a.want = std::max(a.want, a.top + bytes);
    if (a.top + bytes <= a.cap) {
      p_ = reinterpret_cast<T*>(a.block + a.top);
      a.top += bytes;
    } else {
      heap_ = std::aligned_alloc(64, bytes ? bytes : 64);
      TORCH_CHECK(heap_, "fastrnn cpp backend: can't allocate memory: you tried to allocate ", bytes, " bytes");
      p_ = static_cast<T*>(heap_);
    }
  }
  ~Scratch() {
    if (heap_) std::free(heap_);
    else if (!big_.defined()) arena().top = mark_;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() const { return p_; }

 private:
  T* p_ = nullptr;
  void* heap_ = nullptr;
  size_t mark_ = 0;
  at::Tensor big_;
};

// ---- the team -----------------------------------------------------------------------------------
// A sense-counting spin barrier. Each caller arrives with a weight (the number of workers it runs),
// so it cannot deadlock even if at::parallel_for gives one thread several workers.
struct Barrier {
  alignas(64) std::atomic<int> count{0};
  alignas(64) std::atomic<int> gen{0};
  int total;
  explicit Barrier(int n) : total(n) {}
  void arrive(int weight) {
    const int g = gen.load(std::memory_order_acquire);
    if (count.fetch_add(weight, std::memory_order_acq_rel) + weight == total) {
      count.store(0, std::memory_order_relaxed);
      gen.store(g + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; gen.load(std::memory_order_acquire) == g; ++spins) {
      FASTRNN_PAUSE();
      if (spins > 2000) std::this_thread::yield();
    }
  }
};

// How many calls had a late thread join mid-call (a hand-off after the first check point), and how many
// ended before one joined: for the tests, which make threads late and check that both paths ran.
inline std::atomic<int64_t>* team_counts() {
  static std::atomic<int64_t> counts[2] = {{0}, {0}};
  return counts;
}

// A team that does not wait for a late thread. A worker thread that has sat idle can take tens of us to
// start (on these VMs 40-80 us after a few ms idle: NOTES.md, twenty-fourth session), and the first
// barrier would hold the others that long, a third of a batch-1 call at H64. So the first thread in
// (the leader) runs every worker's share, arriving at the barriers for all of them (they pass at once),
// until every thread is in; then, at the start of its next check point, it hands each thread its own
// share (the workers at::parallel_for gave it) and the later threads skip the check points before that.
// The body calls `begin(k)` at check points k = 0, 1, ... in the same order on every thread (the
// drivers: the prologue, then each step) and runs the workers [wb, we) there when it returns true.
struct Team {
  Team(int n, int64_t join_at) : bar(n), nw(n), join_at(join_at) {}
  Barrier bar;
  const int nw;
  const int64_t join_at;                        // team_join_at() when the call started
  alignas(64) std::atomic<int> in{0};           // workers whose thread has started
  alignas(64) std::atomic<int64_t> split{-1};   // the check point from which each thread runs its own share
  std::atomic<int64_t> reached{-1};             // the leader's last check point (team_join_at)
};

class Member {
 public:
  Member(Team& t, int b, int e)
      : bar(t.bar), t_(t), b_(b), e_(e), leader_(t.in.fetch_add(e - b, std::memory_order_acq_rel) == 0) {}
  bool begin(int64_t k) {
    if (own_) return true;
    if (leader_) {
      t_.reached.store(k, std::memory_order_release);
      // at the first check point, a few us for the others (a warm team's threads start within ~1 us)
      for (int spins = 0; k == 0 && spins < 100 && !all_in(); ++spins) FASTRNN_PAUSE();
      // the tests' late threads, let go at check point join_at: waited for there, however late the scheduler
      // runs them, so that the call hands them their shares mid-call every time
      for (int spins = 0; t_.join_at > 0 && k >= t_.join_at && !all_in(); ++spins) {
        FASTRNN_PAUSE();
        if (spins > 2000) std::this_thread::yield();
      }
      if (all_in()) {
        t_.split.store(k, std::memory_order_release);
        if (k > 0) team_counts()[0].fetch_add(1, std::memory_order_relaxed);
        mine();
      } else {
        wb = 0, we = t_.nw;
      }
      return true;
    }
    int64_t s;
    for (int spins = 0; (s = t_.split.load(std::memory_order_acquire)) < 0; ++spins) {
      FASTRNN_PAUSE();
      if (spins > 2000) std::this_thread::yield();
    }
    if (k < s) return false;
    mine();
    return true;
  }
  // the leader, done: a thread still waiting for its share gets none (it comes in after the last step)
  void finish() {
    if (!leader_ || own_) return;
    t_.reached.store(std::numeric_limits<int64_t>::max(), std::memory_order_release);
    t_.split.store(std::numeric_limits<int64_t>::max(), std::memory_order_release);
    team_counts()[1].fetch_add(1, std::memory_order_relaxed);
  }
  int wb = 0, we = 0;
  Barrier& bar;

 private:
  bool all_in() const { return t_.in.load(std::memory_order_acquire) == t_.nw; }
  void mine() {
    own_ = true;
    wb = b_, we = e_;
  }
  Team& t_;
  const int b_, e_;
  const bool leader_;
  bool own_ = false;
};

// For the tests: k > 0 holds the threads other than worker 0's until worker 0's thread, the leader then,
// has reached check point k (or finished the call), and the leader waits for them there, so that a call
// meets a late thread where a test wants it (after its last step: the call ends without them); 0: off.
inline std::atomic<int64_t>& team_join_at() {
  static std::atomic<int64_t> value{0};
  return value;
}

// Runs body(member) on nw workers (one thread: all of them, at once).
template <typename Body>
void run_team(int nw, Body body) {
  const int64_t join_at = team_join_at().load(std::memory_order_relaxed);
  Team team(nw, join_at);
  if (nw == 1) {
    Member m(team, 0, 1);
    body(m);
    return;
  }
  at::parallel_for(0, nw, 1, [&](int64_t b, int64_t e) {
    while (join_at > 0 && b > 0 && team.reached.load(std::memory_order_acquire) < join_at) FASTRNN_PAUSE();
    Member m(team, int(b), int(e));
    body(m);
    m.finish();
  });
}

// Packing costs about one pass over the weights; it pays from a few steps on.
constexpr int64_t PACK_MIN_STEPS = 3;
// The input projection inside a call (InputProj) packs W_ih from this many rows (T x B): the packed
// GEMM's row blocks are 8 rows (NOTES.md, twelfth session).
constexpr int64_t PACK_IN_ROWS = 8;

// How many workers split a call: one unless the work pays for a team. Half the work a step against a
// barrier a step (~0.3 us) and the team's start once a call (~3 us): with C = parallel_min_macs (the
// call's share, default 65536 multiply-adds) a call of T steps splits when macs_per_step > C/8 + C/T.
// A batch-1 cell (T = 1) needs ~74K (an LSTM cell from H ~ 96); a sequence ~8K a step (LSTM and GRU from
// H = 64, RNN from H ~ 96: NOTES.md, twelfth session). Never more workers than torch's threads or
// unit blocks. The threshold is settable (tests force the threaded path on small shapes with 0).
inline std::atomic<int64_t>& parallel_min_macs() {
  static std::atomic<int64_t> value{int64_t(1) << 16};
  return value;
}

inline int team_size(int64_t macs_per_step, int64_t steps, int64_t units, int64_t block) {
  const int64_t c = parallel_min_macs().load(std::memory_order_relaxed);
  if (macs_per_step - c / 8 <= c / steps || at::in_parallel_region()) return 1;  // (no overflow for any C)
  const int64_t blocks = (units + block - 1) / block;
  return int(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks)));
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// How a call is split: by units (the default) or by rows. By units, worker w owns hidden units
// [w*U, min(H, (w+1)*U)) and output columns [w*PU, min(P, (w+1)*PU)) (PU = U without a projection,
// so a worker's units and columns coincide), and whether the weights are packed. U is rounded to half a
// vector's lanes and PU to its lanes (`block`, the drivers' NR = 2 x block), and each worker's panels are
// padded to whole column blocks of NR: units rounded to NR split H=200 over two workers as 128 / 72 (the
// LSTM's step 1.28x the even share; NOTES.md, nineteenth session), lanes as 112 / 88 (an LSTM worker's
// 4 x 112 gate columns 14 blocks of 32), half lanes as 104 / 96 (13 blocks; the GRU's 3 x 104, 10 blocks
// against 11: NOTES.md, twenty-third session).
// By rows (RB > 0), worker w owns the batch rows [w*RB, min(B, (w+1)*RB)) with every unit and column
// (U = H, PU = P), each with its own copy of the panels: a worker's rows need only its own rows of the
// previous step, so the steps have no barrier, where the split by units has one or two a step and
// pointwise passes of a few units. It pays where every worker keeps all the recurrent weights in its own
// L2 and has a register block of rows: measured on a 1 MiB L2, T50 B16-64, the rows against the units
// 1.05-1.8x up to 768 KiB of weights (GRU H256, LSTM H192: 1.01-1.21), level at 1 MiB (LSTM H256: 0.98-1.01;
// NOTES.md, twenty-fifth session); so up to 3/4 of a core's L2 and from 8 rows a worker. Taken only
// where the drivers allow it (`rows_ok`: every row runs every step, no cell option that reduces over a
// row's units, the weights packed, no unfused input projection).
struct Layout {
  int nw;
  int64_t U, PU;
  bool packed;
  int64_t RB;
  // worker w's first unit, first output column and first row, and its rows of a step of `bs` rows
  int64_t u0(int w) const { return RB ? 0 : w * U; }
  int64_t p0(int w) const { return RB ? 0 : w * PU; }
  int64_t b0(int w) const { return RB ? w * RB : 0; }
  int64_t rows(int w, int64_t bs) const { return RB ? std::clamp<int64_t>(bs - w * RB, 0, RB) : bs; }
};

// Does every row run every step (batch sizes all B: a dense batch, the split by rows allowed)?
inline bool every_row(const std::vector<int64_t>& sizes, int64_t B) {
  return std::all_of(sizes.begin(), sizes.end(), [B](int64_t n) { return n == B; });
}

// -1: the rule below; 0 / 1: never / wherever a call allows it (the tests force it on small shapes)
inline std::atomic<int>& row_split_mode() {
  static std::atomic<int> value{-1};
  return value;
}
// calls split by rows (the tests check that the path ran)
inline std::atomic<int64_t>& row_split_count() {
  static std::atomic<int64_t> value{0};
  return value;
}

// a core's L2 in bytes (sysconf, read once; 256 KiB where the system does not say)
inline int64_t l2_bytes() {
  static const int64_t v = [] {
    const long b = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return b > 0 ? int64_t(b) : int64_t(256) << 10;
  }();
  return v;
}

inline Layout layout(int64_t T, int64_t B, int64_t G, int64_t H, int64_t P, bool proj, int64_t block,
                     int64_t input_size = 0, bool rows_ok = false, int64_t elt = 4) {
  // no more workers than column blocks of 2 x block (a part of one block pads to a whole one)
  const int64_t macs = B * G * H * (P + input_size), steps = std::max<int64_t>(T, 1);
  const int nw = team_size(macs, steps, H, 2 * block);
  const bool packed = T >= PACK_MIN_STEPS;
  const int mode = row_split_mode().load(std::memory_order_relaxed);
  if (rows_ok && packed && mode != 0) {
    // by rows: no more workers than whole register blocks of 8 rows, and the weights each worker reads a
    // step within 3/4 of its L2 (W_ih, in a fused projection, once a block of steps: not counted; forced:
    // any rows, any weights)
    const int rw = mode == 1 ? team_size(macs, steps, B, 1) : team_size(macs, steps, B / 8 * 8, 8);
    const int64_t bytes = (G * H * P + (proj ? P * H : 0)) * elt;
    if (rw > 1 && (mode == 1 || bytes * 4 <= l2_bytes() * 3)) {
      const int64_t RB = (B + rw - 1) / rw;
      row_split_count().fetch_add(1, std::memory_order_relaxed);
      return {int((B + RB - 1) / RB), H, P, true, RB};
    }
  }
  const int64_t U = round_up((H + nw - 1) / nw, std::max<int64_t>(1, block / 2));
  return {nw, U, proj ? round_up((P + nw - 1) / nw, block) : U, packed, 0};
}

// Where step t's rows start in a sequence's per-step buffers: [T, B, *] (t * B), or a packed sequence's
// rows [N, *] in PackedSequence order (step t's batch_sizes[t] rows from row0[t]; row0: T + 1 offsets).
struct StepRows {
  const int64_t* row0;
  int64_t B;
  int64_t operator()(int64_t t) const { return row0 ? row0[t] : t * B; }
};

// Per-step active row counts from non-increasing per-row lengths (undefined tensor: all rows).
inline std::vector<int64_t> batch_sizes(const c10::optional<at::Tensor>& lengths, int64_t T, int64_t B) {
  std::vector<int64_t> sizes(T, B);
  if (!lengths.has_value() || !lengths->defined()) return sizes;
  const int64_t* len = lengths->data_ptr<int64_t>();
  int64_t n = B;
  for (int64_t t = 0; t < T; ++t) {
    while (n > 0 && len[n - 1] <= t) --n;
    sizes[t] = n;
  }
  return sizes;
}

// Where the pointwise pass of a step reads its projected input for the worker's units: row b, gate k,
// unit j at x[b * rs + k * gs + j] (xw[t] + u0 with rs = G*H, gs = H; or a worker's block, below).
template <typename T>
struct XRows {
  const T* x;
  int64_t rs, gs;
};

// Cells and short chunks in inference (nothing saved): the input projection runs inside the call. Each
// worker computes xw for its own units, so its rows of W_ih and of W_hh stay in its own core's cache
// from one call to the next (together they exceed one core's L2 at H = 256, which is what a separate
// F.linear and step op cost: ~40 us more per call, NOTES.md). A single step does it just before its
// recurrent product; a chunk of several steps does all its steps' rows first, as one product per
// worker, which reads the worker's W_ih rows once instead of once a step (NOTES.md, seventh session).
// From PACK_IN_ROWS rows (T > 1) the projection is fused (`fused_input`): each worker packs its rows of
// W_ih like its W_hh panel and projects a block of steps at a time, just before them, into a buffer of
// its own in the layout of its recurrent product ([rows, G*U], gate k at column k*U + j), which the
// pointwise pass then reads from L2: no xw buffer [T, B, G*H], and no pass that scatters into one
// (NOTES.md, fifteenth session).
template <typename T>
struct InputProj {
  const T* x = nullptr;     // [T, B, I]
  const T* w_ih = nullptr;  // [G*H, I]
  const T* b_ih = nullptr;  // [G*H] or null
  int64_t I = 0;
  T* xw = nullptr;          // [T, B, G*H], written for the worker's units (null when fused_input)
  bool cell = false;        // a cell call: the caller keeps only the new state, y is scratch
  // packed rows (a PackedSequence's data): x [N, I] and y [N, P] hold step t's rows from row0[t] (T + 1
  // offsets; with x, the projection is then always fused; without, a training call's xw [N, G*H] and the
  // saved workspace hold them too); null: x [T, B, I], y [T, B, P]
  const int64_t* row0 = nullptr;
  // the driver adds b_ih to the gate blocks from this one on; the earlier ones are in the pointwise pass's
  // bias (PointBias)
  int64_t b_ih_from = 0;
};

// Do T steps of B rows project their input in the driver's blocks (no xw buffer; see InputProj)?
inline bool fused_input(int64_t T, int64_t B) { return T > 1 && T * B >= PACK_IN_ROWS; }
// Does this call's driver project the input in its blocks (packed rows always; dense from PACK_IN_ROWS)?
template <typename T>
bool fused_blocks(const InputProj<T>& in, int64_t T_, int64_t B) {
  return in.x && (in.row0 || fused_input(T_, B));
}

// c[r * ldc + k * U + j] += bias[k * H + j] for r < rows, k < G, j < nu (a block of the fused projection)
void add_gate_bias(float* c, int64_t ldc, int64_t rows, int64_t G, int64_t U, int64_t nu, const float* bias,
                   int64_t H);
void add_gate_bias(double* c, int64_t ldc, int64_t rows, int64_t G, int64_t U, int64_t nu, const double* bias,
                   int64_t H);

// ---- the forward time loop ---------------------------------------------------------------------
// One layer-direction. Per step, worker w: gates of its units = h_{t-1} @ W_hh[its rows]^T (packed GEMM
// into `pre`), then the cell's pointwise pass writes the new (full-size) h of its units; with a
// projection a second phase computes its slice of h = h_full @ W_hr^T. The driver writes y and the final
// state of rows that end at this step. `point(phase, w, t, bs, u0, nu, pre, ldp, U, hp, hdst, ldd, xr, b0)`
// for the worker's rows [b0, b0 + bs) of step t (b0 = 0 but when the call is split by rows: Layout): pre,
// hp, hdst and xr (where the step's projected input lies, XRows) start at row b0, the cell's own per-row
// buffers are offset by b0 by the cell. For phase < `phases` with a barrier between phases (a cell whose
// pass reduces over a row's units: layer norm writes each worker's partial statistics in one phase and
// combines them in the next); w: the worker.
template <typename T>
struct FwdArgs {
  int64_t T_, B, H, P, G;
  bool reverse;
  const T* w_hh;  // [G*H, P]
  const T* w_hr;  // [P, H] or null
  const T* h0;    // [B, P]
  T* y;           // [T, B, P]
  T* h_n;         // [B, P]
  T* hfull;       // projection only: [T or 1, B, H] (the unprojected h of each step, or one slot)
  bool hfull_per_step;
  std::vector<int64_t> sizes;
  InputProj<T> in{};  // x == null: xw comes from the caller
  const T* xw = nullptr;  // [T, B, G*H], when given: the driver prefetches the next step's rows of it
  // the cell options the driver applies (fastrnn/backends/__init__.py): recurrent dropout of h_{t-1} in
  // the recurrent product, and zoneout of h (keep k: the 0/1 mask of the step, or the probability in eval)
  const T* rmask = nullptr;    // [B, P], or null
  const T* zmask_h = nullptr;  // [T, B, P], or null
  T zoneout_h = T(0);          // k where zmask_h is null
  int phases = 1;              // of the pointwise pass (see forward_driver)
  bool rows_ok = true;         // the cell's pass allows a split by rows (Layout): false with its own options
};

// The bias the pointwise pass adds: b_hh (zeros without one), and when the driver projects the input in
// fused blocks (InputProj), b_ih of the first `fold` gate blocks too, which the driver then leaves out of
// its blocks: one pass less over each block (NOTES.md, sixteenth session). The LSTM and the RNN fold every
// block (x W^T + b_ih + h W^T + b_hh); the GRU its r and z blocks, not n's b_in, which stays outside
// r * (W_hn h + b_hn).
template <typename T>
class PointBias {
 public:
  PointBias(FwdArgs<T>& a, const T* b_hh, int64_t fold) : buf_(b_hh && !folds(a) ? 0 : a.G * a.H) {
    if (b_hh && !folds(a)) {
      p_ = b_hh;
      return;
    }
    T* s = buf_.data();
    const int64_t GH = a.G * a.H;
    for (int64_t i = 0; i < GH; ++i) s[i] = b_hh ? b_hh[i] : T(0);
    if (folds(a)) {
      for (int64_t i = 0; i < fold * a.H; ++i) s[i] += a.in.b_ih[i];
      a.in.b_ih_from = fold;
    }
    p_ = s;
  }
  const T* data() const { return p_; }

 private:
  static bool folds(const FwdArgs<T>& a) { return a.in.b_ih && fused_blocks(a.in, a.T_, a.B); }
  Scratch<T> buf_;
  const T* p_ = nullptr;
};

// zoneout's keep weight of element (t, b, p) of an [T, B, P] state
template <typename T>
FASTRNN_INLINE T keep_of(const T* mask, T p, int64_t t, int64_t B, int64_t P, int64_t b, int64_t j) {
  return mask ? mask[(t * B + b) * P + j] : p;
}

// Prefetch (into L2) the xw rows the worker's pointwise pass reads at step t, while this step's GEMM
// runs: at small batch nothing else brings them in time (at B=1, H=256 the pass stalled on them,
// perf: a third of its samples). Large slices are left to the hardware: the GEMM dominates there.
template <typename T>
FASTRNN_INLINE void prefetch_xw(const FwdArgs<T>& a, int64_t row, int64_t bs, int64_t u0, int64_t nu) {
  constexpr int64_t per_line = 64 / sizeof(T), max_bytes = 32 * 1024;
  if (!a.xw || bs * a.G * nu * int64_t(sizeof(T)) > max_bytes) return;
  const int64_t GH = a.G * a.H;
  for (int64_t b = 0; b < bs; ++b)
    for (int64_t g = 0; g < a.G; ++g) {
      const T* p = a.xw + (row + b) * GH + g * a.H + u0;
      for (int64_t j = 0; j < nu; j += per_line) __builtin_prefetch(p + j, 0, 2);
      __builtin_prefetch(p + nu - 1, 0, 2);
    }
}

// xw[t] of rows b < bs and the units [u0, u0 + nu) (all gate blocks), from the InputProj
template <typename T>
void project_input(const FwdArgs<T>& a, int64_t t, int64_t bs, int64_t u0, int64_t nu) {
  const int64_t GH = a.G * a.H, I = a.in.I;
  T* xo = a.in.xw + t * a.B * GH + u0;
  gemm_rows(bs, I, a.in.x + t * a.B * I, I, a.in.w_ih, ColMap{a.G, a.H, u0, nu, a.H}, xo, GH);
  if (!a.in.b_ih) return;
  for (int64_t b = 0; b < bs; ++b)
    for (int64_t g = 0; g < a.G; ++g)
      for (int64_t j = 0; j < nu; ++j) xo[b * GH + g * a.H + j] += a.in.b_ih[g * a.H + u0 + j];
}

template <typename T, typename Point>
void forward_driver(const FwdArgs<T>& a, Point point) {
  const int64_t T_ = a.T_, B = a.B, H = a.H, P = a.P;
  const bool proj = a.w_hr != nullptr;
  // by rows: every row runs every step, nothing reduces over a row's units, no unfused projection
  const bool rows_ok = a.rows_ok && !a.in.row0 && every_row(a.sizes, B) && a.phases == 1 && !a.rmask &&
                       !a.zmask_h && a.zoneout_h == T(0) && (!a.in.x || fused_blocks(a.in, T_, B));
  const Layout L = layout(T_, B, a.G, H, P, proj, lanes<T>(), a.in.I, rows_ok, sizeof(T));
  const auto [nw, U, PU, packed, RB] = L;
  // a worker's G*U gate columns (gate k at k*U + j), its panels and products padded to whole column blocks
  const int64_t GU = a.G * U, ncols = round_up(GU, NR<T>), ncb = ncols / NR<T>, PUc = round_up(PU, NR<T>);
  const bool zon = a.zmask_h || a.zoneout_h != T(0);
  // the first row of step t in x, xw, y and the workspace: packed rows (InputProj::row0) or [T, B, *]
  const StepRows row_of{a.in.row0, B};
  // with recurrent dropout the GEMM reads h * rmask from two more buffers (this step's and the next's)
  Scratch<T> hmbuf(a.rmask ? 2 * B * P : 0);
  T* hm = hmbuf.data();
  for (int64_t i = 0; a.rmask && i < B * P; ++i) hm[i] = hm[B * P + i] = a.h0[i] * a.rmask[i];
  // the end of step t for rows [b0, b0 + bs) and columns [p0, p0 + np) of the new h `hn` (h~ from the
  // cell, `src` at row b0): zoneout, then y, the final state of rows that end here, and the masked copy for
  // the next GEMM
  auto finish = [&](int64_t t, int64_t it, int64_t b0, int64_t bs, int64_t bs_next, int64_t p0, int64_t np,
                    const T* hp, T* hn, const T* src, int64_t lds) {
    T* yt = a.y + row_of(t) * P;
    T* hmn = hm + ((it + 1) & 1) * B * P;
    for (int64_t b = b0; b < b0 + bs; ++b) {
      T* h = hn + b * P + p0;
      const T* s = src + (b - b0) * lds;
      if (zon) {
        const T* q = hp + b * P + p0;
        for (int64_t j = 0; j < np; ++j) {
          const T k = keep_of(a.zmask_h, a.zoneout_h, t, B, P, b, p0 + j);
          h[j] = k * q[j] + (T(1) - k) * s[j];
        }
      } else if (s != h) {
        std::memcpy(h, s, sizeof(T) * np);
      }
      std::memcpy(yt + b * P + p0, h, sizeof(T) * np);
      if (b >= bs_next) std::memcpy(a.h_n + b * P + p0, h, sizeof(T) * np);
      if (a.rmask)
        for (int64_t j = 0; j < np; ++j) hmn[b * P + p0 + j] = h[j] * a.rmask[b * P + p0 + j];
    }
  };
  Scratch<T> panel(packed ? nw * P * ncols : 0), pre(nw * B * ncols);
  Scratch<T> panel_r(packed && proj ? nw * H * PUc : 0), pre_r(proj ? nw * B * PUc : 0);
  Scratch<T> hbuf(2 * B * P);
  T* hb = hbuf.data();
  std::memcpy(hb, a.h0, sizeof(T) * B * P);  // both buffers start at h0: a row that joins late reads h0
  std::memcpy(hb + B * P, a.h0, sizeof(T) * B * P);
  T* pan = panel.data(), *prb = pre.data(), *panr = panel_r.data(), *prr = pre_r.data();
  // the input projection inside the call (InputProj): fused from PACK_IN_ROWS rows (a block of S steps at
  // a time into the worker's `xin` [S*B, G*U], plus b_ih), else all steps' rows first into xw (unpacked)
  const int64_t I = a.in.I, GH = a.G * H;
  const bool fused = fused_blocks(a.in, T_, B);  // as the entry decided (chunk_input, proj_input)
  constexpr int64_t IN_ROWS = 128;  // rows a block (the block stays in L2 for its steps)
  const int64_t WB = RB ? RB : B;   // a worker's rows
  const int64_t S = std::max<int64_t>(1, IN_ROWS / WB);
  Scratch<T> panel_in(fused ? nw * I * ncols : 0), xin_buf(fused ? nw * S * WB * ncols : 0);
  T* pin = panel_in.data(), *xin = xin_buf.data();
  const T* xw = a.in.x ? a.in.xw : a.xw;
  const bool groups = proj_groups_mode().load(std::memory_order_relaxed) != 0;

  run_team(nw, [&](Member& m) {
    Barrier& bar = m.bar;
    if (m.begin(0)) {
      const int wb = m.wb, we = m.we;
      for (int w = wb; w < we && packed; ++w) {
        const int64_t u0 = L.u0(w);
        pack_panel(a.w_hh, P, false, P, ncols, [&](int64_t n) {
          const int64_t u = u0 + n % U;
          return n < GU && u < H ? (n / U) * H + u : int64_t(-1);
        }, pan + w * P * ncols);
        if (proj) {
          const int64_t p0 = L.p0(w);
          pack_panel(a.w_hr, H, false, H, PUc, [&](int64_t n) { return n < PU && p0 + n < P ? p0 + n : int64_t(-1); },
                     panr + w * H * PUc);
        }
      }
      for (int w = wb; w < we && fused; ++w) {
        const int64_t u0 = L.u0(w);
        pack_panel(a.in.w_ih, I, false, I, ncols, [&](int64_t n) {
          const int64_t u = u0 + n % U;
          return n < GU && u < H ? (n / U) * H + u : int64_t(-1);
        }, pin + w * I * ncols);
      }
      for (int w = wb; w < we && a.in.x && T_ > 1 && !fused; ++w) {  // a few rows: all steps first (InputProj)
        const int64_t u0 = w * U, nu = std::min(H, u0 + U) - u0;
        if (nu > 0) project_input(a, 0, T_ * B, u0, nu);
      }
    }
    for (int64_t it = 0; it < T_; ++it) {
      if (!m.begin(it + 1)) continue;
      const int wb = m.wb, we = m.we;
      const int64_t t = a.reverse ? T_ - 1 - it : it;
      const int64_t bs = a.sizes[t];
      const int64_t bs_next = it + 1 < T_ ? a.sizes[a.reverse ? t - 1 : t + 1] : 0;
      // the fused projection's block of steps [blk, blk + nb) (in loop order): times [tlo, tlo + nb)
      const int64_t blk = it / S * S, nb = std::min(S, T_ - blk), tlo = a.reverse ? T_ - blk - nb : blk;
      const T* hp = hb + (it & 1) * B * P;
      const T* hg = a.rmask ? hm + (it & 1) * B * P : hp;  // what the GEMM multiplies
      T* hn = hb + ((it + 1) & 1) * B * P;
      T* hdst = proj ? a.hfull + (a.hfull_per_step ? row_of(t) * H : 0) : hn;
      const int64_t ldd = proj ? H : P;
      for (int ph = 0; ph < a.phases; ++ph) {
        if (ph > 0) bar.arrive(we - wb);
        for (int w = wb; w < we; ++w) {
          const int64_t u0 = L.u0(w), nu = std::min(H, u0 + U) - u0, b0 = L.b0(w), bw = L.rows(w, bs);
          if (nu <= 0 || bw == 0) continue;
          T* pw = prb + w * WB * ncols;
          T* xo = xin + w * S * WB * ncols;
          if (ph == 0) {
            if (fused && it == blk) {
              // the block's rows: contiguous in x by units; by rows, the worker's bw rows of each step
              const int64_t r0 = row_of(tlo), n = RB ? nb * bw : row_of(tlo + nb) - r0;
              if (!RB) gemm_packed(n, I, a.in.x + r0 * I, I, pin + w * I * ncols, ncb, xo, ncols);
              else if (groups)
                gemm_groups(nb, bw, I, a.in.x + (r0 + b0) * I, I, B * I, pin + w * I * ncols, ncb, xo, ncols, bw * ncols);
              for (int64_t s = 0; RB && !groups && s < nb; ++s)
                gemm_packed(bw, I, a.in.x + (row_of(tlo + s) + b0) * I, I, pin + w * I * ncols, ncb,
                            xo + s * bw * ncols, ncols);
              const int64_t g0 = a.in.b_ih_from;  // the blocks before g0: in the pointwise pass's bias
              if (a.in.b_ih && g0 < a.G)
                add_gate_bias(xo + g0 * U, ncols, n, a.G - g0, U, nu, a.in.b_ih + g0 * H + u0, H);
            }
            const int64_t bw_next = L.rows(w, bs_next);
            if (bw_next > 0 && !fused) prefetch_xw(a, row_of(a.reverse ? t - 1 : t + 1) + b0, bw_next, u0, nu);
            if (a.in.x && !fused && T_ == 1) project_input(a, t, bs, u0, nu);  // a cell (never by rows)
            if (packed)
              gemm_packed(bw, P, hg + b0 * P, P, pan + w * P * ncols, ncb, pw, ncols);
            else
              gemm_rows(bw, P, hg + b0 * P, P, a.w_hh, ColMap{a.G, H, u0, nu, U}, pw, ncols);
          }
          const XRows<T> xr = fused ? XRows<T>{xo + (RB ? (t - tlo) * bw : row_of(t) - row_of(tlo)) * ncols, ncols, U}
                                    : XRows<T>{xw + (row_of(t) + b0) * GH + u0, GH, H};
          point(ph, w, t, bw, u0, nu, pw, ncols, U, hp + b0 * P, hdst + b0 * ldd, ldd, xr, b0);
          if (!proj && ph == a.phases - 1) finish(t, it, b0, bw, bs_next, u0, nu, hp, hn, hn + b0 * P + u0, P);
        }
      }
      // by rows a worker's next step (or projection) reads only its own rows: no barrier
      if (!RB) bar.arrive(we - wb);
      if (!proj) continue;
      for (int w = wb; w < we; ++w) {
        const int64_t p0 = L.p0(w), np = std::min(P, p0 + PU) - p0, b0 = L.b0(w), bw = L.rows(w, bs);
        if (np <= 0 || bw == 0) continue;
        T* pw = prr + w * WB * PUc;
        if (packed)
          gemm_packed(bw, H, hdst + b0 * H, H, panr + w * H * PUc, PUc / NR<T>, pw, PUc);
        else
          gemm_rows(bw, H, hdst + b0 * H, H, a.w_hr, ColMap{1, 0, p0, np, 0}, pw, PUc);
        finish(t, it, b0, bw, bs_next, p0, np, hp, hn, pw, PUc);
      }
      if (!RB) bar.arrive(we - wb);
    }
  });
}

// ---- the backward time loop --------------------------------------------------------------------
// Steps in the opposite order of the forward. Phase A (worker's units): dh of its units (grad_y +
// the recurrent dh, or with a projection dh_full = dh @ W_hr[:, its units]), then the cell's pointwise
// backward writes the gate gradients; a barrier. Phase B (worker's slice of the P outputs): dh_rec = d_rec @ W_hh
// for the previous step (added to what the pointwise pass left there when `accumulate`), h_prev of the
// step for the weight gradients, and (projection) the next step's dh.
// `point(phase, w, t, bs, nprev, tprev, u0, nu, dh, ldh, b0)` for the worker's rows [b0, b0 + bs) (dh starts at
// row b0; as in the forward): rows b0 + b, b < nprev, had a previous step (at tprev), the others start from
// the initial state; phases as in the forward. Split by rows (Layout), a worker runs both phases for its own
// rows and all units and columns, with no barrier.
template <typename T>
struct BwdArgs {
  int64_t T_, B, H, P, G;
  bool reverse, accumulate;
  const T* grad_y;  // [T, B, P]
  const T* w_hh;    // [G*H, P]
  const T* w_hr;    // [P, H] or null
  const T* h0;      // [B, P]
  const T* y;       // [T, B, P]
  const T* d_rec;   // [T, B, G*H]: the pre-activation gradients that flow through W_hh (written by point)
  T* dh_rec;        // [B, P]: starts as grad of h_n, ends as grad of h0
  T* dh_cur;        // [B, P] scratch (no projection)
  T* dh_proj;       // [T, B, P] with a projection: dh of each step (for d W_hr)
  T* hprev;         // [T, B, P]: h_{t-1} of each row and step (for d W_hh; times rmask)
  std::vector<int64_t> sizes;
  const T* rmask = nullptr;    // as FwdArgs
  const T* zmask_h = nullptr;
  T zoneout_h = T(0);
  int phases = 1;
  bool rows_ok = true;  // as FwdArgs
  // a packed sequence's rows (StepRows): grad_y, y, d_rec, hprev and dh_proj hold step t's rows from
  // row0[t]; null: [T, B, *]
  const int64_t* row0 = nullptr;
  // grad_y's strides in elements (a step's, a row's, a column's; a step's unused with row0), as
  // read_grad_y sets them; gy_step < 0: grad_y is contiguous
  int64_t gy_step = -1, gy_row = 0, gy_col = 0;
  // grad_y read in place with whatever strides it has ([T, B, P], or [N, P] packed rows): a gradient that
  // arrives expanded (a sum's, a mean's, or the zeros of an unused y) or transposed (batch_first's) costs
  // no contiguous copy of [T, B, P] (benchmarks/NOTES.md, thirty-third session)
  void read_grad_y(const at::Tensor& g) {
    grad_y = g.data_ptr<T>();
    const bool steps = g.dim() == 3;
    gy_step = steps ? g.stride(0) : 0;
    gy_row = g.stride(steps ? 1 : 0);
    gy_col = g.stride(steps ? 2 : 1);
  }
};

template <typename T, typename Point>
void backward_driver(const BwdArgs<T>& a, Point point) {
  const int64_t T_ = a.T_, B = a.B, H = a.H, P = a.P, GH = a.G * a.H;
  const bool proj = a.w_hr != nullptr;
  const bool zon = a.zmask_h || a.zoneout_h != T(0);
  const bool rows_ok = a.rows_ok && !a.row0 && every_row(a.sizes, B) && a.phases == 1 && !a.rmask && !zon;
  const Layout L = layout(T_, B, a.G, H, P, proj, lanes<T>(), 0, rows_ok, sizeof(T));
  const auto [nw, U, PU, packed, RB] = L;
  const int64_t WB = RB ? RB : B;  // a worker's rows
  const int64_t Uc = round_up(U, NR<T>), PUc = round_up(PU, NR<T>);  // panels of whole column blocks
  // zoneout: dh_t splits into (1-k) dh_t for the cell's h~ and k dh_t carried to h_{t-1}, which the
  // recurrent product then adds to
  const bool accumulate = a.accumulate || zon;
  Scratch<T> panel_a(packed && proj ? nw * P * Uc : 0), pre_a(proj ? nw * WB * Uc : 0);
  Scratch<T> panel_b(packed ? nw * GH * PUc : 0), pre_b(nw * WB * PUc);
  T* pana = panel_a.data(), *pra = pre_a.data(), *panb = panel_b.data(), *prb = pre_b.data();
  auto tf = [&](int64_t it) { return a.reverse ? T_ - 1 - it : it; };  // forward step it -> time
  const StepRows row_of{a.row0, B};

  // grad_y's strides (BwdArgs::read_grad_y), and where row b of step t starts in it
  const bool gy_dense = a.gy_step < 0;
  const int64_t gy_step = gy_dense ? B * P : a.gy_step, gy_row = gy_dense ? P : a.gy_row, gy_col = gy_dense ? 1 : a.gy_col;
  auto gy_of = [&](int64_t t, int64_t b) {
    return a.grad_y + (a.row0 ? (a.row0[t] + b) * gy_row : t * gy_step + b * gy_row);
  };
  // dh of the step at `it` for the worker's rows [b0, b0 + rows(w, bs)), columns [p0, p0 + np): grad_y + the
  // recurrent part (columns one apart in grad_y: the loop that vectorizes)
  auto make_dh = [&](int64_t it, int w, int64_t p0, int64_t np, T* dst) {
    const int64_t t = tf(it), b0 = L.b0(w), bw = L.rows(w, a.sizes[t]);
    auto rows = [&](auto unit) {
      constexpr bool one = decltype(unit)::value;
      for (int64_t b = b0; b < b0 + bw; ++b) {
        const T* g = gy_of(t, b);
        for (int64_t p = p0; p < p0 + np; ++p) {
          const T full = g[one ? p : p * gy_col] + a.dh_rec[b * P + p];
          if (zon) {
            const T k = keep_of(a.zmask_h, a.zoneout_h, t, B, P, b, p);
            dst[b * P + p] = (T(1) - k) * full;
            a.dh_rec[b * P + p] = k * full;
          } else {
            dst[b * P + p] = full;
          }
        }
      }
    };
    if (gy_col == 1)
      rows(std::true_type{});
    else
      rows(std::false_type{});
  };

  run_team(nw, [&](Member& m) {
    Barrier& bar = m.bar;
    if (m.begin(0)) {
      const int wb = m.wb, we = m.we;
      for (int w = wb; w < we; ++w) {
        const int64_t u0 = L.u0(w), p0 = L.p0(w);
        if (proj && packed)
          pack_panel(a.w_hr, H, true, P, Uc, [&](int64_t n) { return n < U && u0 + n < H ? u0 + n : int64_t(-1); },
                     pana + w * P * Uc);
        if (packed)
          pack_panel(a.w_hh, P, true, GH, PUc, [&](int64_t n) { return n < PU && p0 + n < P ? p0 + n : int64_t(-1); },
                     panb + w * GH * PUc);
        if (proj) make_dh(T_ - 1, w, p0, std::max<int64_t>(0, std::min(P, p0 + PU) - p0), a.dh_proj + row_of(tf(T_ - 1)) * P);
      }
      if (proj && !RB) bar.arrive(we - wb);
    }
    for (int64_t it = T_ - 1; it >= 0; --it) {
      if (!m.begin(T_ - it)) continue;
      const int wb = m.wb, we = m.we;
      const int64_t t = tf(it), bs = a.sizes[t];
      const int64_t tprev = it > 0 ? tf(it - 1) : -1, nprev = it > 0 ? a.sizes[tprev] : 0;
      for (int ph = 0; ph < a.phases; ++ph) {
        if (ph > 0) bar.arrive(we - wb);
        for (int w = wb; w < we; ++w) {
          const int64_t u0 = L.u0(w), nu = std::min(H, u0 + U) - u0, b0 = L.b0(w), bw = L.rows(w, bs);
          const int64_t nprev_w = L.rows(w, nprev);
          if (nu <= 0 || bw == 0) continue;
          if (proj) {
            T* pw = pra + w * WB * Uc;
            if (ph == 0 && packed)
              gemm_packed(bw, P, a.dh_proj + (row_of(t) + b0) * P, P, pana + w * P * Uc, Uc / NR<T>, pw, Uc);
            else if (ph == 0)
              gemm_cols(bw, P, a.dh_proj + (row_of(t) + b0) * P, P, a.w_hr, H, u0, nu, pw, Uc);
            point(ph, w, t, bw, nprev_w, tprev, u0, nu, (const T*)pw, Uc, b0);
          } else {
            if (ph == 0) make_dh(it, w, u0, nu, a.dh_cur);
            point(ph, w, t, bw, nprev_w, tprev, u0, nu, (const T*)(a.dh_cur + b0 * P + u0), P, b0);
          }
        }
      }
      // by rows a worker's products read only the gradients of its own rows: no barrier
      if (!RB) bar.arrive(we - wb);
      for (int w = wb; w < we; ++w) {
        const int64_t p0 = L.p0(w), np = std::min(P, p0 + PU) - p0, b0 = L.b0(w), bw = L.rows(w, bs);
        if (np <= 0) continue;
        T* pw = prb + w * WB * PUc;
        const T* dr = a.d_rec + (row_of(t) + b0) * GH;
        if (bw > 0 && packed) gemm_packed(bw, GH, dr, GH, panb + w * GH * PUc, PUc / NR<T>, pw, PUc);
        if (bw > 0 && !packed) gemm_cols(bw, GH, dr, GH, a.w_hh, P, p0, np, pw, PUc);
        for (int64_t b = b0; b < b0 + bw; ++b) {
          T* d = a.dh_rec + b * P + p0;
          const T* g = pw + (b - b0) * PUc;
          const T* src = b < nprev ? a.y + (row_of(tprev) + b) * P : a.h0 + b * P;
          if (a.rmask) {  // h_{t-1} entered the product times its mask
            const T* m = a.rmask + b * P + p0;
            for (int64_t p = 0; p < np; ++p) d[p] = (accumulate ? d[p] : T(0)) + g[p] * m[p];
            T* hv = a.hprev + (row_of(t) + b) * P + p0;
            for (int64_t p = 0; p < np; ++p) hv[p] = src[p0 + p] * m[p];
            continue;
          }
          if (accumulate) {
            for (int64_t p = 0; p < np; ++p) d[p] += g[p];
          } else {
            std::memcpy(d, g, sizeof(T) * np);
          }
          std::memcpy(a.hprev + (row_of(t) + b) * P + p0, src + p0, sizeof(T) * np);
        }
        if (proj && it > 0) make_dh(it - 1, w, p0, np, a.dh_proj + row_of(tprev) * P);
      }
      // With a projection the next phase A reads every worker's dh_proj columns. Without one a worker's
      // columns are its own units (PU = U), so its next phase A reads only dh_rec columns that its own
      // phase B wrote, and writes step t-1's d_rec while the others may still read step t's: no barrier.
      if (proj && !RB) bar.arrive(we - wb);
    }
  });
}

// ---- the large products of a call (gemm.cpp) ---------------------------------------------------
// A' @ B' (+ bias) into a buffer from the pool: A' = a or a^T (ta), B' = b or b^T (tb), all contiguous;
// the packed kernel split by columns over torch's threads where own_mm says so, else torch's product
bool own_mm(int64_t M, int64_t N, int64_t K);
// -1: own_mm's rule; 0 / 1: never / always the packed kernel (the tests force it on small shapes)
std::atomic<int>& own_mm_mode();
// -1: the rule (gemm.cpp, at_in_place); 0 / 1: an A^T product reads A^T in place / packs its slivers, always
std::atomic<int>& at_pack_mode();
bool at_in_place_f32(int64_t N, int64_t lda);  // the rule for float32, N columns, rows of `a` lda apart
// a weight gradient a^T @ b over the rows [T * B] of a backward: with lengths only the rows b < sizes[t] of
// each step (a ragged batch's padding is zeros in a: a product over it is wasted work), gathered first
at::Tensor weight_grad(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& lengths, int64_t T,
                       int64_t B);
at::Tensor big_mm(const at::Tensor& a, bool ta, const at::Tensor& b, bool tb,
                  const c10::optional<at::Tensor>& bias = c10::nullopt);

// ---- argument checks shared by the entries ------------------------------------------------------
void check_float(const at::Tensor& t, const char* what, const at::Tensor& like);
void check_shape(const at::Tensor& t, const char* what, at::IntArrayRef shape);
// check_float and check_shape together
void check_tensor(const at::Tensor& t, const char* what, at::IntArrayRef shape, const at::Tensor& like);
// check_tensor without the contiguity: a backward's grad_y, which it reads with its strides (read_grad_y)
void check_strided(const at::Tensor& t, const char* what, at::IntArrayRef shape, const at::Tensor& like);
void check_opt(const c10::optional<at::Tensor>& t, const char* what, at::IntArrayRef shape, const at::Tensor& like);

// A sequence op's xw: [T, B, GH], or with lengths a packed sequence's rows [N, GH] (a training call's packed
// rows: the Python backend's `packed_rows`): T, B, GH, and for packed rows the T + 1 offsets of the steps
struct SeqShape {
  int64_t T, B, GH;
  std::vector<int64_t> row0;
};
SeqShape seq_shape(const at::Tensor& xw, const c10::optional<at::Tensor>& lengths, int64_t G);

// The rows of a sequence op's per-step buffers (xw, y, the workspace, their gradients): [T, B, *], or packed
// rows [N, *] where row0 (the steps' T + 1 offsets) is not empty
struct SeqRows {
  int64_t T, B;
  std::vector<int64_t> row0;
  bool packed() const { return !row0.empty(); }
  StepRows rows() const { return {packed() ? row0.data() : nullptr, B}; }
  int64_t n() const { return packed() ? row0.back() : T * B; }  // rows in all
  // a ragged batch in [T, B, *]: its buffers are zero-filled, entries past a row's end being never written
  // and required deterministic (packed rows have no such entries)
  bool pads(const c10::optional<at::Tensor>& lengths) const { return lengths.has_value() && lengths->defined() && !packed(); }
  std::vector<int64_t> per_step(int64_t cols) const {             // a per-step buffer's shape
    return packed() ? std::vector<int64_t>{n(), cols} : std::vector<int64_t>{T, B, cols};
  }
};

// GRU (G = 3) and RNN (G = 1): one state h [B, H], xw [T, B, G*H] (or packed rows), w_hh [G*H, H]
struct StateDims : SeqRows {
  int64_t H, GH;
};
StateDims check_single_state(const at::Tensor& xw, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
                             const at::Tensor& h0, const c10::optional<at::Tensor>& lengths, int64_t G);
// the same with xw absent (a chunk whose projection is fused): its dims, and `like` for the dtype
StateDims check_single_state(const at::Tensor& like, int64_t T, int64_t B, int64_t GH, const at::Tensor& w_hh,
                             const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                             const c10::optional<at::Tensor>& lengths, int64_t G);
// their backward's incoming gradients and forward output
void check_single_state_grads(const StateDims& d, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                              const at::Tensor& y, const at::Tensor& xw);
void check_lengths(const c10::optional<at::Tensor>& lengths, int64_t T, int64_t B);
inline const at::Tensor* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}
template <typename T> const T* data_or_null(const c10::optional<at::Tensor>& t) {
  return opt_ptr(t) ? t->data_ptr<T>() : nullptr;
}

// the input of an entry with the projection inside: x [B, I] (a cell; returns the buffer for xw,
// [1, B, GH]) or, with `steps`, x [T, B, I] (a chunk; [T, B, GH], or an undefined tensor where the
// driver fuses the projection: fused_input)
at::Tensor proj_input(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih, int64_t GH,
                      bool steps);
// The input of a chunk entry (x [T, B, I]) or, with lengths, of a packed one (x [N, I]: a PackedSequence's
// rows, time-major; lengths [B], int64, non-increasing, lengths[0] steps), checked with w_ih and b_ih: xw's
// buffer (undefined where the driver fuses the projection), the steps and rows, and for packed rows the
// first row of each step (T + 1 offsets; empty otherwise).
struct ChunkInput {
  at::Tensor xw;
  std::vector<int64_t> row0;
  int64_t T, B;
};
ChunkInput chunk_input(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih, int64_t GH,
                       const c10::optional<at::Tensor>& lengths);
// (its packed rows, InputProj::row0, come from the call's Dims: the entry moves ChunkInput's into them)
template <typename T>
InputProj<T> input_proj(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                        at::Tensor& xw, bool cell = false) {
  return InputProj<T>{x.data_ptr<T>(), w_ih.data_ptr<T>(), data_or_null<T>(b_ih), x.size(-1),
                      xw.defined() ? xw.data_ptr<T>() : nullptr, cell, nullptr};
}

// The inference entries with the input projection inside (the contract's optional <f>_cell_fwd and
// <f>_chunk_fwd), also bound directly in fastrnn._C: the fast paths call them there when nothing traces
// or needs autograd (ops.can_skip_ops), skipping the dispatcher's boxed call (~3 us of a ~6 us cell call
// at H = 8, NOTES.md). Defined in each cell's file.
std::tuple<at::Tensor, at::Tensor> lstm_cell_fwd(const at::Tensor& x, const at::Tensor& w_ih,
                                                 const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
                                                 const c10::optional<at::Tensor>& b_hh,
                                                 const c10::optional<at::Tensor>& w_hr,
                                                 const c10::optional<at::Tensor>& w_ch, const at::Tensor& h,
                                                 const at::Tensor& c, bool coupled);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_chunk_fwd(
    const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
    const c10::optional<at::Tensor>& w_ch, const at::Tensor& h0, const at::Tensor& c0, bool reverse, bool coupled);
// The same for a packed sequence: x [N, I] the PackedSequence's rows, y [N, P] likewise, `lengths` [B]
// (int64 CPU, non-increasing: packed_input); the state's rows that end early keep their last value.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_packed_fwd(
    const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
    const c10::optional<at::Tensor>& w_ch, const at::Tensor& h0, const at::Tensor& c0, bool reverse, bool coupled,
    const at::Tensor& lengths);
std::tuple<at::Tensor, at::Tensor> gru_packed_fwd(const at::Tensor& x, const at::Tensor& w_ih,
                                                  const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
                                                  const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                  bool reverse, const at::Tensor& lengths);
std::tuple<at::Tensor, at::Tensor> rnn_packed_fwd(const at::Tensor& x, const at::Tensor& w_ih,
                                                  const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
                                                  const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                  bool reverse, c10::string_view nonlinearity,
                                                  const at::Tensor& lengths);
at::Tensor gru_cell_fwd(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                        const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h);
std::tuple<at::Tensor, at::Tensor> gru_chunk_fwd(const at::Tensor& x, const at::Tensor& w_ih,
                                                 const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
                                                 const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                 bool reverse);
at::Tensor rnn_cell_fwd(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                        const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h,
                        c10::string_view nonlinearity);
std::tuple<at::Tensor, at::Tensor> rnn_chunk_fwd(const at::Tensor& x, const at::Tensor& w_ih,
                                                 const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
                                                 const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                 bool reverse, c10::string_view nonlinearity);

}  // namespace fastrnn
