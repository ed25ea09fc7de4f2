// Quantized inference (fastrnn.quantize): one layer-direction of an LSTM, GRU or RNN whose weights are
// int8 (per output row symmetric, float32 scales) or bfloat16, products accumulated in int32 / float32,
// gates, cell state and outputs in float32. Inference only: nothing is saved for a backward.
//
// The int8 product. Activations (x, and h_{t-1} every step) are quantized per row: s = amax / 127,
// q = rint(v * (127 / amax)) in [-127, 127] (0 for an all-zero row; a NaN or inf makes s NaN, so the row's
// products are NaN). out[m, n] = (float(sum_k q[m,k] W[n,k]) * s_x[m]) * s_w[n]. The sum is exact in int32.
// With AVX512-VNNI (vpdpbusd: unsigned x signed bytes, 4 products per int32 lane) q enters as q + 128 and
// 128 * sum_k W[n,k] comes off the sum; the portable path sums q * W directly. Both give the same integers.
//
// The bfloat16 product. Activations are rounded to bfloat16 (round to nearest even) and the products summed
// in float32: vdpbf16ps with AVX512-BF16, else the weights and activations widened to float32.
//
// Layout. The columns of W_ih and W_hh are packed in groups of 16 hidden units: group u holds G vectors of
// 16 columns, vector g lane l is row g*H + 16u + l of W (a unit past H is a zero column), and along k the
// vectors interleave 4 int8 (2 bf16) values per column, one 64-byte line per (group, k-quad, vector). A
// group's G gate vectors of one row block are one register block of the product, so the cell's pointwise
// pass runs on the tile right after its sum. W_hr (proj_size) is packed the same way with G = 1.
//
// Threads. As the float kernels (recurrence.h): a team of workers runs the whole time loop, worker w owns
// a range of unit groups (and of projection groups), and the workers meet at a spin barrier once a step
// (twice with a projection). Each worker quantizes the whole h_{t-1} itself, into its own buffer, so a
// step needs no second barrier for the activations' scales.
#include <torch/extension.h>


#include <limits>

#include "recurrence.h"

// GCC 12 warns of an uninitialized variable inside its own _mm512_setzero / _mm512_set1 headers at -O3
// (a false positive in avx512fintrin.h); nothing here reads uninitialized memory.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fastrnn {
namespace quant {

constexpr int L = 16;  // columns a vector

enum Kind : int64_t { INT8 = 0, BF16 = 1 };
enum Family : int64_t { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

// bytes of one column's k-step (4 int8 or 2 bf16 values) and values a k-step
inline int64_t kstep(Kind kind) { return kind == INT8 ? 4 : 2; }

// ---- which path runs: chosen once from the CPU's flags, settable for the tests ---------------------
std::atomic<int>& isa_override() {  // -1: automatic, 0: portable
  static std::atomic<int> v{-1};
  return v;
}
bool cpu_vnni() {
#if defined(__x86_64__) && !defined(FASTRNN_NO_CLONES)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}
bool cpu_bf16() {
#if defined(__x86_64__) && !defined(FASTRNN_NO_CLONES)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}
bool use_simd(Kind kind) {
  static const bool vnni = cpu_vnni(), bf16 = cpu_bf16();
  if (isa_override().load(std::memory_order_relaxed) == 0) return false;
  return kind == INT8 ? vnni : bf16;
}

std::string path(int64_t kind) {
  if (use_simd(Kind(kind))) return kind == INT8 ? "avx512-vnni" : "avx512-bf16";
  return kind == INT8 ? "portable int32" : "portable (bfloat16 widened to float32)";
}

// ---- activations to int8 / bfloat16, a row at a time ------------------------------------------------
// x [M, K] (row stride ldx) -> out [M, Kp] (Kp = K rounded up to the k-step) and the rows' scales.
FASTRNN_CLONES void quant_rows_i8(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, uint8_t* out,
                                  float* scale) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * ldx;
    // max |x| over the bit patterns (an integer max, which vectorizes; for floats that are not NaN the
    // order of |x|'s bits is the order of |x|): a pattern from 0x7f800000 up is an inf or a NaN
    uint32_t mbits = 0;
    for (int64_t k = 0; k < K; ++k) {
      uint32_t u;
      std::memcpy(&u, r + k, 4);
      mbits = std::max(mbits, u & 0x7fffffffu);
    }
    const bool bad = mbits >= 0x7f800000u;
    float amax;
    std::memcpy(&amax, &mbits, 4);
    if (bad) amax = 0.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    scale[m] = bad ? std::numeric_limits<float>::quiet_NaN() : amax / 127.f;
    uint8_t* o = out + m * Kp;
    for (int64_t k = 0; k < K; ++k) {
      float q = std::nearbyint(r[k] * inv);
      q = q > 127.f ? 127.f : (q < -127.f ? -127.f : q);  // (only NaN or inf rows reach the clamps)
      o[k] = uint8_t(int32_t(q == q ? q : 0.f) + 128);
    }
    for (int64_t k = K; k < Kp; ++k) o[k] = 128;
  }
}

FASTRNN_INLINE uint16_t to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays a (quiet) NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
FASTRNN_INLINE float from_bf16(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

FASTRNN_CLONES void quant_rows_bf16(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, uint16_t* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * ldx;
    uint16_t* o = out + m * Kp;
    for (int64_t k = 0; k < K; ++k) o[k] = to_bf16(r[k]);
    for (int64_t k = K; k < Kp; ++k) o[k] = 0;
  }
}

// ---- the products: rows [mr] x vectors [nv] of one column group -------------------------------------
// out[r, v*16 + l] = product (+ bias[v*16 + l]), r < mr. A: the rows' quantized activations (row stride lda
// elements), P: the group's panel, K4: k-steps. int8 also takes the group's column sums and scales and the
// rows' scales.
struct Prod {
  Kind kind;
  int64_t ks;      // k-steps (K rounded up / 4 or 2)
  const void* A;   // uint8 [rows][lda] or uint16 [rows][lda]
  int64_t lda;     // elements
  const float* sx;  // int8: per row
};

#if defined(__x86_64__) && !defined(FASTRNN_NO_CLONES)
#define FASTRNN_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define FASTRNN_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// The accumulators are arrays of GCC vector types, not of __m512i / __m512: those carry __may_alias__,
// which keeps GCC from putting an array of them in registers (it kept all 24 accumulators on the stack,
// a store and two moves for each dot product: a third of the speed, NOTES.md).
typedef int32_t vi32 __attribute__((vector_size(64)));
typedef float vf32 __attribute__((vector_size(64)));

template <int MR, int NV, int KS>
FASTRNN_VNNI void mk_vnni(int64_t K4, const uint8_t* A, int64_t lda, const int8_t* P, const int32_t* csum,
                          const float* sw, const float* sx, const float* bias, float* out, int64_t ldo) {
  vi32 acc[KS * MR * NV] = {};
  int64_t k = 0;
  for (; k + KS <= K4; k += KS) {
#pragma GCC unroll 8
    for (int s = 0; s < KS; ++s) {
      const int8_t* p = P + (k + s) * NV * 64;
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        int32_t a4;
        std::memcpy(&a4, A + r * lda + (k + s) * 4, 4);
        const __m512i a = _mm512_set1_epi32(a4);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          vi32& c = acc[(s * MR + r) * NV + v];
          c = (vi32)_mm512_dpbusd_epi32((__m512i)c, a, _mm512_loadu_si512(p + v * 64));
        }
      }
    }
  }
  for (; k < K4; ++k) {
    const int8_t* p = P + k * NV * 64;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, A + r * lda + k * 4, 4);
      const __m512i a = _mm512_set1_epi32(a4);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        vi32& c = acc[r * NV + v];
        c = (vi32)_mm512_dpbusd_epi32((__m512i)c, a, _mm512_loadu_si512(p + v * 64));
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512 s_r = _mm512_set1_ps(sx[r]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      vi32 a = acc[r * NV + v];
#pragma GCC unroll 8
      for (int s = 1; s < KS; ++s) a += acc[(s * MR + r) * NV + v];
      const __m512i t = _mm512_sub_epi32((__m512i)a, _mm512_slli_epi32(_mm512_loadu_si512(csum + v * L), 7));
      __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(t), s_r), _mm512_loadu_ps(sw + v * L));
      if (bias) f = _mm512_add_ps(f, _mm512_loadu_ps(bias + v * L));
      _mm512_storeu_ps(out + r * ldo + v * L, f);
    }
  }
}

template <int MR, int NV, int KS>
FASTRNN_BF16 void mk_bf16(int64_t K2, const uint16_t* A, int64_t lda, const uint16_t* P, const float* bias, float* out,
                          int64_t ldo) {
  vf32 acc[KS * MR * NV] = {};
  int64_t k = 0;
  for (; k + KS <= K2; k += KS) {
#pragma GCC unroll 8
    for (int s = 0; s < KS; ++s) {
      const uint16_t* p = P + (k + s) * NV * 32;
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        int32_t a2;
        std::memcpy(&a2, A + r * lda + (k + s) * 2, 4);
        const __m512bh a = (__m512bh)_mm512_set1_epi32(a2);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          vf32& c = acc[(s * MR + r) * NV + v];
          c = (vf32)_mm512_dpbf16_ps((__m512)c, a, (__m512bh)_mm512_loadu_si512(p + v * 32));
        }
      }
    }
  }
  for (; k < K2; ++k) {
    const uint16_t* p = P + k * NV * 32;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t a2;
      std::memcpy(&a2, A + r * lda + k * 2, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(a2);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        vf32& c = acc[r * NV + v];
        c = (vf32)_mm512_dpbf16_ps((__m512)c, a, (__m512bh)_mm512_loadu_si512(p + v * 32));
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      vf32 f = acc[r * NV + v];
#pragma GCC unroll 8
      for (int s = 1; s < KS; ++s) f += acc[(s * MR + r) * NV + v];
      __m512 o = (__m512)f;
      if (bias) o = _mm512_add_ps(o, _mm512_loadu_ps(bias + v * L));
      _mm512_storeu_ps(out + r * ldo + v * L, o);
    }
  }
}

// the instantiation for (mr, nv): a second set of accumulators along k when the block is small, so the
// dot-product chains overlap (latency ~4-5 cycles)
template <int MR, int NV>
void simd_block(Kind kind, int64_t ks, const void* A, int64_t lda, const void* P, const int32_t* csum,
                const float* sw, const float* sx, const float* bias, float* out, int64_t ldo) {
  constexpr int KS = MR * NV <= 2 ? 4 : (MR * NV <= 6 ? 2 : 1);
  if (kind == INT8)
    mk_vnni<MR, NV, KS>(ks, static_cast<const uint8_t*>(A), lda, static_cast<const int8_t*>(P), csum, sw, sx, bias,
                        out, ldo);
  else
    mk_bf16<MR, NV, KS>(ks, static_cast<const uint16_t*>(A), lda, static_cast<const uint16_t*>(P), bias, out, ldo);
}

template <int NV>
void simd_rows(int mr, Kind kind, int64_t ks, const void* A, int64_t lda, const void* P, const int32_t* csum,
               const float* sw, const float* sx, const float* bias, float* out, int64_t ldo) {
  switch (mr) {
    case 1: return simd_block<1, NV>(kind, ks, A, lda, P, csum, sw, sx, bias, out, ldo);
    case 2: return simd_block<2, NV>(kind, ks, A, lda, P, csum, sw, sx, bias, out, ldo);
    case 4: return simd_block<4, NV>(kind, ks, A, lda, P, csum, sw, sx, bias, out, ldo);
    default: return simd_block<(NV >= 4 ? 6 : 8), NV>(kind, ks, A, lda, P, csum, sw, sx, bias, out, ldo);
  }
}
#endif

// the portable products (the same integers for int8; bf16 widened to float32)
FASTRNN_CLONES void portable_i8(int mr, int nv, int64_t K4, const uint8_t* A, int64_t lda, const int8_t* P,
                                const int32_t* csum, const float* sw, const float* sx, const float* bias, float* out,
                                int64_t ldo) {
  for (int r = 0; r < mr; ++r)
    for (int v = 0; v < nv; ++v) {
      int32_t acc[L] = {};
      for (int64_t k = 0; k < K4; ++k) {
        const uint8_t* a = A + r * lda + k * 4;
        const int8_t* p = P + (k * nv + v) * 64;
        for (int l = 0; l < L; ++l)
          for (int j = 0; j < 4; ++j) acc[l] += (int32_t(a[j]) - 128) * int32_t(p[l * 4 + j]);
      }
      (void)csum;
      for (int l = 0; l < L; ++l) {
        float f = (float(acc[l]) * sx[r]) * sw[v * L + l];
        out[r * ldo + v * L + l] = bias ? f + bias[v * L + l] : f;
      }
    }
}

FASTRNN_CLONES void portable_bf16(int mr, int nv, int64_t K2, const uint16_t* A, int64_t lda, const uint16_t* P,
                                  const float* bias, float* out, int64_t ldo) {
  for (int r = 0; r < mr; ++r)
    for (int v = 0; v < nv; ++v) {
      float acc[L] = {};
      for (int64_t k = 0; k < K2; ++k) {
        const uint16_t* a = A + r * lda + k * 2;
        const uint16_t* p = P + (k * nv + v) * 32;
        const float a0 = from_bf16(a[0]), a1 = from_bf16(a[1]);
        for (int l = 0; l < L; ++l) acc[l] += a0 * from_bf16(p[l * 2]) + a1 * from_bf16(p[l * 2 + 1]);
      }
      for (int l = 0; l < L; ++l) out[r * ldo + v * L + l] = bias ? acc[l] + bias[v * L + l] : acc[l];
    }
}

// A packed weight: the panel (ngroups x ks x nv lines of 64 bytes) and, for int8, each packed column's scale
// and sum of its row.
struct Packed {
  Kind kind;
  int64_t nv, ngroups, ks;
  const char* panel;
  const float* scale;   // int8
  const int32_t* csum;  // int8
  const char* group(int64_t g) const { return panel + g * ks * nv * 64; }
};

// rows [0, m) of the product of activations A with group g's columns, in row blocks; out row stride ldo
template <typename F>
void for_row_blocks(int64_t m, int nv, F f) {
  const int big = nv >= 4 ? 6 : 8;  // 24 accumulators (8 for G = 1)
  int64_t r = 0;
  while (r < m) {
    const int64_t left = m - r;
    const int mr = left >= big ? big : (left >= 4 ? 4 : (left >= 2 ? 2 : 1));
    f(r, mr);
    r += mr;
  }
}

void product(const Packed& w, int64_t g, int mr, const void* A, int64_t lda, const float* sx, const float* bias,
             float* out, int64_t ldo) {
  const void* P = w.group(g);
  const float* sw = w.kind == INT8 ? w.scale + g * w.nv * L : nullptr;
  const int32_t* cs = w.kind == INT8 ? w.csum + g * w.nv * L : nullptr;
#if defined(__x86_64__) && !defined(FASTRNN_NO_CLONES)
  if (use_simd(w.kind)) {
    switch (w.nv) {
      case 1: return simd_rows<1>(mr, w.kind, w.ks, A, lda, P, cs, sw, sx, bias, out, ldo);
      case 3: return simd_rows<3>(mr, w.kind, w.ks, A, lda, P, cs, sw, sx, bias, out, ldo);
      case 4: return simd_rows<4>(mr, w.kind, w.ks, A, lda, P, cs, sw, sx, bias, out, ldo);
      default: break;
    }
  }
#endif
  if (w.kind == INT8)
    portable_i8(mr, int(w.nv), w.ks, static_cast<const uint8_t*>(A), lda, static_cast<const int8_t*>(P), cs, sw, sx,
                bias, out, ldo);
  else
    portable_bf16(mr, int(w.nv), w.ks, static_cast<const uint16_t*>(A), lda, static_cast<const uint16_t*>(P), bias, out,
                  ldo);
}

// ---- packing (once, when a module is quantized or loaded) -------------------------------------------
// w: int8 [G*H, K] with scale float32 [G*H], or bfloat16 [G*H, K]. Returns (panel uint8, scale float32
// [Np], colsum int32 [Np], cols int64 [Np]) with Np = ngroups * G * 16 and cols[n] the row of W of
// packed column n (-1: padding).
std::vector<at::Tensor> pack(const at::Tensor& w_in, const c10::optional<at::Tensor>& scale_in, int64_t G, int64_t H) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(0) == G * H, "fastrnn quantized pack: weight of shape ", w_in.sizes(),
              " is not [", G * H, ", K]");
  const Kind kind = w_in.scalar_type() == at::kChar ? INT8 : BF16;
  TORCH_CHECK(kind == INT8 || w_in.scalar_type() == at::kBFloat16, "fastrnn quantized pack: weight dtype ",
              w_in.scalar_type(), " is neither int8 nor bfloat16");
  TORCH_CHECK(kind == BF16 || (scale_in.has_value() && scale_in->numel() == G * H), "fastrnn quantized pack: an int8 "
              "weight needs its row scales");
  const at::Tensor w = w_in.contiguous();
  const int64_t K = w.size(1), step = kstep(kind), ks = (K + step - 1) / step, ngroups = (H + L - 1) / L;
  const int64_t Np = ngroups * G * L;
  at::Tensor panel = at::zeros({ngroups * ks * G * 64}, at::kByte);
  at::Tensor scale = at::zeros({Np}, at::kFloat);
  at::Tensor csum = at::zeros({Np}, at::kInt);
  at::Tensor cols = at::full({Np}, -1, at::kLong);
  const float* sc = kind == INT8 ? scale_in->contiguous().data_ptr<float>() : nullptr;
  const char* src = static_cast<const char*>(w.data_ptr());
  char* dst = static_cast<char*>(panel.data_ptr());
  const int64_t esz = kind == INT8 ? 1 : 2;
  for (int64_t u = 0; u < ngroups; ++u)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t l = 0; l < L; ++l) {
        const int64_t unit = u * L + l, n = (u * G + g) * L + l;
        if (unit >= H) continue;
        const int64_t row = g * H + unit;
        cols.data_ptr<int64_t>()[n] = row;
        if (kind == INT8) {
          scale.data_ptr<float>()[n] = sc[row];
          int32_t s = 0;
          for (int64_t k = 0; k < K; ++k) s += int8_t(src[row * K + k]);
          csum.data_ptr<int32_t>()[n] = s;
        } else {
          scale.data_ptr<float>()[n] = 1.f;
        }
        for (int64_t k = 0; k < K; ++k) {
          const int64_t line = (u * ks + k / step) * G + g;
          std::memcpy(dst + line * 64 + (l * step + k % step) * esz, src + (row * K + k) * esz, esz);
        }
      }
  return {panel, scale, csum, cols};
}

Packed packed_of(const at::Tensor& panel, const at::Tensor& scale, const at::Tensor& csum, Kind kind, int64_t G,
                 int64_t H, int64_t K, const char* what) {
  const int64_t ks = (K + kstep(kind) - 1) / kstep(kind), ngroups = (H + L - 1) / L;
  TORCH_CHECK(panel.scalar_type() == at::kByte && panel.is_contiguous() && panel.numel() == ngroups * ks * G * 64,
              "fastrnn quantized: the packed ", what, " does not match its shape; pack it again");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && csum.scalar_type() == at::kInt &&
                  scale.numel() == ngroups * G * L && csum.numel() == ngroups * G * L,
              "fastrnn quantized: the scales of the packed ", what, " do not match it");
  return {kind, G, ngroups, ks, static_cast<const char*>(panel.data_ptr()), scale.data_ptr<float>(),
          csum.data_ptr<int32_t>()};
}

// Quantized activations of rows [0, m) of x (row stride ldx, K values): the buffer and its row scales.
#if defined(__x86_64__) && !defined(FASTRNN_NO_CLONES)
// The same quantization with AVX-512 (the SIMD paths): the same values (rint is the CPU's round-to-nearest-
// even, as cvtps_epi32 in the default rounding mode). A row with a NaN or inf gets a NaN scale, which makes
// its products NaN whatever its q.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void quant_rows_i8_avx(
    const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, uint8_t* out, float* scale) {
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * ldx;
    __m512i mx = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + L <= K; k += L) mx = _mm512_max_epu32(mx, _mm512_and_si512(_mm512_loadu_si512(r + k), absmask));
    if (k < K) {
      const __mmask16 t = __mmask16((1u << (K - k)) - 1u);
      mx = _mm512_max_epu32(mx, _mm512_and_si512(_mm512_maskz_loadu_epi32(t, r + k), absmask));
    }
    const uint32_t mbits = _mm512_reduce_max_epu32(mx);
    const bool bad = mbits >= 0x7f800000u;
    float amax;
    std::memcpy(&amax, &mbits, 4);
    if (bad) amax = 0.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    scale[m] = bad ? std::numeric_limits<float>::quiet_NaN() : amax / 127.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(128);
    uint8_t* o = out + m * Kp;
    for (k = 0; k < K; k += L) {
      const __mmask16 t = K - k >= L ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1u);
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(t, r + k), vinv));
      q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi), off);
      _mm_mask_storeu_epi8(o + k, t, _mm512_cvtepi32_epi8(q));
    }
    for (k = K; k < Kp; ++k) o[k] = 128;
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void quant_rows_bf16_avx(
    const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, uint16_t* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * ldx;
    uint16_t* o = out + m * Kp;
    for (int64_t k = 0; k < K; k += L) {
      const __mmask16 t = K - k >= L ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1u);
      const __m256bh b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(t, r + k));  // nearest even; NaN stays NaN
      __m256i bi;
      std::memcpy(&bi, &b, sizeof bi);
      _mm256_mask_storeu_epi16(o + k, t, bi);
    }
    for (int64_t k = K; k < Kp; ++k) o[k] = 0;
  }
}
#endif

struct QAct {
  Kind kind;
  int64_t Kp;  // elements a row
  void* data;
  float* scale;
  void fill(const float* x, int64_t ldx, int64_t m0, int64_t m, int64_t K) {
#if defined(__x86_64__) && !defined(FASTRNN_NO_CLONES)
    if (use_simd(kind)) {
      if (kind == INT8)
        quant_rows_i8_avx(x + m0 * ldx, ldx, m, K, Kp, static_cast<uint8_t*>(data) + m0 * Kp, scale + m0);
      else
        quant_rows_bf16_avx(x + m0 * ldx, ldx, m, K, Kp, static_cast<uint16_t*>(data) + m0 * Kp);
      return;
    }
#endif
    if (kind == INT8)
      quant_rows_i8(x + m0 * ldx, ldx, m, K, Kp, static_cast<uint8_t*>(data) + m0 * Kp, scale + m0);
    else
      quant_rows_bf16(x + m0 * ldx, ldx, m, K, Kp, static_cast<uint16_t*>(data) + m0 * Kp);
  }
  const void* row(int64_t m) const {
    return static_cast<const char*>(data) + m * Kp * (kind == INT8 ? 1 : 2);
  }
};

// ---- the cells' pointwise passes on one tile: rows [mr] x units [nl <= 16] of one group -------------
// pre: the recurrent products [mr][G*16]; xw: the projected input (+ biases) rows, stride ldx (its padding
// columns are there to read). Each row runs all 16 lanes with no branch (one AVX-512 vector each) on local
// copies of the state, and stores its nl units.
template <bool COUPLED, bool PEEP>
FASTRNN_CLONES void point_lstm_t(int mr, int nl, const float* pre, const float* xw, int64_t ldx, float* c,
                                 int64_t ldc, const float* wch, int64_t H, float* h, int64_t ldh) {
  constexpr int G = COUPLED ? 3 : 4;
  alignas(64) float w0[L] = {}, w1[L] = {}, w2[L] = {};
  if (PEEP)
    for (int l = 0; l < nl; ++l) {
      w0[l] = wch[l];
      w1[l] = wch[H + l];
      w2[l] = wch[2 * H + l];
    }
  for (int r = 0; r < mr; ++r) {
    const float* p = pre + r * G * L;
    const float* x = xw + r * ldx;
    alignas(64) float cp[L] = {}, cn[L], hn[L];
    std::memcpy(cp, c + r * ldc, sizeof(float) * nl);
    for (int l = 0; l < L; ++l) {
      float gi = p[l] + x[l];
      float gf = COUPLED ? 0.f : p[L + l] + x[L + l];
      const float gg = p[(G - 2) * L + l] + x[(G - 2) * L + l];
      float go = p[(G - 1) * L + l] + x[(G - 1) * L + l];
      if (PEEP) {
        gi = gi + w0[l] * cp[l];
        gf = gf + w1[l] * cp[l];
      }
      const float i = sigmoid_(gi);
      const float f = COUPLED ? 1.f - i : sigmoid_(gf);
      const float cv = f * cp[l] + i * tanh_(gg);
      if (PEEP) go = go + w2[l] * cv;
      cn[l] = cv;
      hn[l] = sigmoid_(go) * tanh_(cv);
    }
    std::memcpy(c + r * ldc, cn, sizeof(float) * nl);
    std::memcpy(h + r * ldh, hn, sizeof(float) * nl);
  }
}

void point_lstm(int mr, int nl, const float* pre, const float* xw, int64_t ldx, float* c, int64_t ldc,
                const float* wch, int64_t H, bool coupled, float* h, int64_t ldh) {
  if (coupled)
    (wch ? point_lstm_t<true, true> : point_lstm_t<true, false>)(mr, nl, pre, xw, ldx, c, ldc, wch, H, h, ldh);
  else
    (wch ? point_lstm_t<false, true> : point_lstm_t<false, false>)(mr, nl, pre, xw, ldx, c, ldc, wch, H, h, ldh);
}

FASTRNN_CLONES void point_gru(int mr, int nl, const float* pre, const float* xw, int64_t ldx, const float* bhn,
                              const float* hp, int64_t ldp, float* h, int64_t ldh) {
  alignas(64) float bn[L] = {};
  if (bhn) std::memcpy(bn, bhn, sizeof(float) * nl);
  for (int r = 0; r < mr; ++r) {
    const float* p = pre + r * 3 * L;
    const float* x = xw + r * ldx;
    alignas(64) float hv[L] = {}, out[L];
    std::memcpy(hv, hp + r * ldp, sizeof(float) * nl);
    for (int l = 0; l < L; ++l) {
      const float rg = sigmoid_(x[l] + p[l]);
      const float z = sigmoid_(x[L + l] + p[L + l]);
      const float n = tanh_(x[2 * L + l] + rg * (p[2 * L + l] + bn[l]));
      out[l] = (1.f - z) * n + z * hv[l];
    }
    std::memcpy(h + r * ldh, out, sizeof(float) * nl);
  }
}

FASTRNN_CLONES void point_rnn(int mr, int nl, const float* pre, const float* xw, int64_t ldx, bool relu, float* h,
                              int64_t ldh) {
  for (int r = 0; r < mr; ++r) {
    alignas(64) float out[L];
    if (relu)
      for (int l = 0; l < L; ++l) {
        const float v = pre[r * L + l] + xw[r * ldx + l];
        out[l] = v > 0.f ? v : (v == v ? 0.f : v);
      }
    else
      for (int l = 0; l < L; ++l) out[l] = tanh_(pre[r * L + l] + xw[r * ldx + l]);
    std::memcpy(h + r * ldh, out, sizeof(float) * nl);
  }
}

// The same passes with AVX-512 intrinsics, for the SIMD paths (their CPUs have AVX-512F): one vector of
// 16 units, 1/q of the activations' rational function by rcp14 and a Newton step (relative error ~1e-8)
// instead of a division, which took ~10 cycles a vector and most of a B=64 step's pointwise time (NOTES).
// A unit past nl is computed and not stored.
#if defined(__x86_64__) && !defined(FASTRNN_NO_CLONES)
#define FASTRNN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
FASTRNN_AVX512 FASTRNN_INLINE __m512 tanh_v(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(9.f), x);  // (a NaN x is the second operand: it stays NaN)
  x = _mm512_max_ps(_mm512_set1_ps(-9.f), x);
  const __m512 s = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(-8.642440220e-14f);
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(5.329159598e-11f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(-2.031272308e-08f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(1.117165808e-05f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(3.105340692e-03f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(1.308515589e-01f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(9.999999738e-01f));
  __m512 q = _mm512_set1_ps(2.548330486e-04f);
  q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(2.450040609e-02f));
  q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(4.641847807e-01f));
  q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(1.f));
  __m512 r = _mm512_rcp14_ps(q);  // q >= 1
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(_mm512_mul_ps(x, p), r);
}
FASTRNN_AVX512 FASTRNN_INLINE __m512 sigmoid_v(__m512 x) {
  const __m512 h = _mm512_set1_ps(0.5f);
  return _mm512_fmadd_ps(h, tanh_v(_mm512_mul_ps(h, x)), h);
}

template <bool COUPLED, bool PEEP>
FASTRNN_AVX512 void point_lstm_avx(int mr, int nl, const float* pre, const float* xw, int64_t ldx, float* c,
                                   int64_t ldc, const float* wch, int64_t H, float* h, int64_t ldh) {
  constexpr int G = COUPLED ? 3 : 4;
  const __mmask16 m = __mmask16((1u << nl) - 1u);
  __m512 w0 = _mm512_setzero_ps(), w1 = w0, w2 = w0;
  if (PEEP) {
    w0 = _mm512_maskz_loadu_ps(m, wch);
    w1 = _mm512_maskz_loadu_ps(m, wch + H);
    w2 = _mm512_maskz_loadu_ps(m, wch + 2 * H);
  }
  for (int r = 0; r < mr; ++r) {
    const float* p = pre + r * G * L;
    const float* x = xw + r * ldx;
    const __m512 cp = _mm512_maskz_loadu_ps(m, c + r * ldc);
    __m512 gi = _mm512_add_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(x));
    __m512 gf = COUPLED ? gi : _mm512_add_ps(_mm512_loadu_ps(p + L), _mm512_loadu_ps(x + L));
    const __m512 gg = _mm512_add_ps(_mm512_loadu_ps(p + (G - 2) * L), _mm512_loadu_ps(x + (G - 2) * L));
    __m512 go = _mm512_add_ps(_mm512_loadu_ps(p + (G - 1) * L), _mm512_loadu_ps(x + (G - 1) * L));
    if (PEEP) {
      gi = _mm512_fmadd_ps(w0, cp, gi);
      gf = _mm512_fmadd_ps(w1, cp, gf);
    }
    const __m512 i = sigmoid_v(gi);
    const __m512 f = COUPLED ? _mm512_sub_ps(_mm512_set1_ps(1.f), i) : sigmoid_v(gf);
    const __m512 cn = _mm512_fmadd_ps(f, cp, _mm512_mul_ps(i, tanh_v(gg)));
    if (PEEP) go = _mm512_fmadd_ps(w2, cn, go);
    _mm512_mask_storeu_ps(c + r * ldc, m, cn);
    _mm512_mask_storeu_ps(h + r * ldh, m, _mm512_mul_ps(sigmoid_v(go), tanh_v(cn)));
  }
}

FASTRNN_AVX512 void point_gru_avx(int mr, int nl, const float* pre, const float* xw, int64_t ldx, const float* bhn,
                                  const float* hp, int64_t ldp, float* h, int64_t ldh) {
  const __mmask16 m = __mmask16((1u << nl) - 1u);
  const __m512 bn = bhn ? _mm512_maskz_loadu_ps(m, bhn) : _mm512_setzero_ps();
  for (int r = 0; r < mr; ++r) {
    const float* p = pre + r * 3 * L;
    const float* x = xw + r * ldx;
    const __m512 rg = sigmoid_v(_mm512_add_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(p)));
    const __m512 z = sigmoid_v(_mm512_add_ps(_mm512_loadu_ps(x + L), _mm512_loadu_ps(p + L)));
    const __m512 hn = _mm512_add_ps(_mm512_loadu_ps(p + 2 * L), bn);
    const __m512 n = tanh_v(_mm512_fmadd_ps(rg, hn, _mm512_loadu_ps(x + 2 * L)));
    const __m512 hv = _mm512_maskz_loadu_ps(m, hp + r * ldp);
    // (1 - z) * n + z * h
    _mm512_mask_storeu_ps(h + r * ldh, m, _mm512_fmadd_ps(_mm512_sub_ps(_mm512_set1_ps(1.f), z), n,
                                                          _mm512_mul_ps(z, hv)));
  }
}

FASTRNN_AVX512 void point_rnn_avx(int mr, int nl, const float* pre, const float* xw, int64_t ldx, bool relu,
                                  float* h, int64_t ldh) {
  const __mmask16 m = __mmask16((1u << nl) - 1u);
  for (int r = 0; r < mr; ++r) {
    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(pre + r * L), _mm512_loadu_ps(xw + r * ldx));
    // relu: max(0, v) keeps a NaN (the second operand)
    const __m512 o = relu ? _mm512_max_ps(_mm512_setzero_ps(), v) : tanh_v(v);
    _mm512_mask_storeu_ps(h + r * ldh, m, o);
  }
}
#endif

// the pass for a tile: the AVX-512 one with the SIMD products, else the portable one
void point_tile(Family family, bool simd, int mr, int nl, const float* pre, const float* xw, int64_t ldx, float* c,
                int64_t ldc, const float* wch, int64_t H, bool coupled, const float* bhn, const float* hp, int64_t ldp,
                float* h, int64_t ldh) {
#if defined(__x86_64__) && !defined(FASTRNN_NO_CLONES)
  if (simd) {
    if (family == LSTM) {
      if (coupled)
        (wch ? point_lstm_avx<true, true> : point_lstm_avx<true, false>)(mr, nl, pre, xw, ldx, c, ldc, wch, H, h, ldh);
      else
        (wch ? point_lstm_avx<false, true> : point_lstm_avx<false, false>)(mr, nl, pre, xw, ldx, c, ldc, wch, H, h,
                                                                            ldh);
    } else if (family == GRU) {
      point_gru_avx(mr, nl, pre, xw, ldx, bhn, hp, ldp, h, ldh);
    } else {
      point_rnn_avx(mr, nl, pre, xw, ldx, family == RNN_RELU, h, ldh);
    }
    return;
  }
#endif
  (void)simd;
  if (family == LSTM)
    point_lstm(mr, nl, pre, xw, ldx, c, ldc, wch, H, coupled, h, ldh);
  else if (family == GRU)
    point_gru(mr, nl, pre, xw, ldx, bhn, hp, ldp, h, ldh);
  else
    point_rnn(mr, nl, pre, xw, ldx, family == RNN_RELU, h, ldh);
}

// ---- one layer-direction ----------------------------------------------------------------------------
// The rows of the input projection a task takes: its quantized rows stay in L2 while every column group
// passes over them (a quarter of this core's L2: recurrence.h, l2_bytes).
int64_t proj_rows(int64_t row_bytes) {
  return std::max<int64_t>(24, (l2_bytes() / 4 / std::max<int64_t>(row_bytes, 1)) / 24 * 24);
}

std::vector<at::Tensor> seq_fwd(int64_t family, int64_t kind_, const at::Tensor& x, const at::Tensor& wih_panel,
                                const at::Tensor& wih_scale, const at::Tensor& wih_sum, const at::Tensor& whh_panel,
                                const at::Tensor& whh_scale, const at::Tensor& whh_sum,
                                const c10::optional<at::Tensor>& whr_panel, const c10::optional<at::Tensor>& whr_scale,
                                const c10::optional<at::Tensor>& whr_sum, const at::Tensor& bias,
                                const c10::optional<at::Tensor>& bias_hn, const c10::optional<at::Tensor>& w_ch,
                                const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                                const c10::optional<at::Tensor>& lengths, bool reverse, bool coupled) {
  const Kind kind = Kind(kind_);
  TORCH_CHECK(kind == INT8 || kind == BF16, "fastrnn quantized: unknown kind ", kind_);
  TORCH_CHECK(family >= LSTM && family <= RNN_RELU, "fastrnn quantized: unknown family ", family);
  const bool lstm = family == LSTM, proj = whr_panel.has_value() && whr_panel->defined();
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "fastrnn quantized: x must be a contiguous float32 CPU tensor [T, B, I], got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(h0.dim() == 2 && h0.scalar_type() == at::kFloat, "fastrnn quantized: h0 must be float32 [B, P]");
  TORCH_CHECK(!lstm || (c0.has_value() && c0->dim() == 2 && c0->scalar_type() == at::kFloat),
              "fastrnn quantized: an LSTM needs c0, float32 [B, H]");
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), P = h0.size(1), H = lstm ? c0->size(1) : P;
  TORCH_CHECK(h0.size(0) == B && (!lstm || c0->size(0) == B), "fastrnn quantized: the state's batch does not match x");
  TORCH_CHECK(proj == (lstm && P != H), "fastrnn quantized: a projection needs W_hr, and W_hr a projection");
  const int64_t G = lstm ? (coupled ? 3 : 4) : (family == GRU ? 3 : 1);
  const Packed wih = packed_of(wih_panel, wih_scale, wih_sum, kind, G, H, I, "W_ih");
  const Packed whh = packed_of(whh_panel, whh_scale, whh_sum, kind, G, H, P, "W_hh");
  const Packed whr = proj ? packed_of(*whr_panel, *whr_scale, *whr_sum, kind, 1, P, H, "W_hr") : Packed{};
  const int64_t ngroups = wih.ngroups, Np = ngroups * G * L, pgroups = proj ? whr.ngroups : 0;
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == Np,
              "fastrnn quantized: the packed bias has ", bias.numel(), " values, expected ", Np);
  const float* bhn = nullptr;
  if (bias_hn.has_value() && bias_hn->defined()) {
    TORCH_CHECK(family == GRU && bias_hn->numel() == ngroups * L && bias_hn->is_contiguous() &&
                bias_hn->scalar_type() == at::kFloat, "fastrnn quantized: bias_hn is the GRU's [ngroups * 16]");
    bhn = bias_hn->data_ptr<float>();
  }
  const float* wch = nullptr;
  if (w_ch.has_value() && w_ch->defined()) {
    TORCH_CHECK(lstm && w_ch->numel() == 3 * H && w_ch->is_contiguous() && w_ch->scalar_type() == at::kFloat,
                "fastrnn quantized: the peephole weights are an LSTM's float32 [3, H]");
    wch = w_ch->data_ptr<float>();
  }
  if (lengths.has_value() && lengths->defined()) check_lengths(lengths, T, B);

  at::Tensor y = at::empty({T, B, P}, x.options());
  at::Tensor hT = at::empty({B, P}, x.options());
  at::Tensor cT = lstm ? c0->contiguous().clone() : at::Tensor();
  if (T == 0 || B == 0) {
    hT.copy_(h0);
    return {y, hT, cT};
  }
  const int64_t step = kstep(kind), esz = kind == INT8 ? 1 : 2;

  // the input projection of every step: xw [T*B, Np] = W_ih x (+ bias), in packed column order
  const int64_t M = T * B, Kp_in = wih.ks * step;
  at::Tensor xw_t = pool_empty({M * Np}, x.options());
  float* xw = xw_t.data_ptr<float>();
  {
    at::Tensor xq_t = pool_empty({M * Kp_in * esz + 64}, at::TensorOptions().dtype(at::kByte));
    Scratch<float> xs(M);
    QAct xq{kind, Kp_in, xq_t.data_ptr(), xs.data()};
    const float* xp = x.data_ptr<float>();
    const float* bp = bias.data_ptr<float>();
    const int64_t threads = at::get_num_threads();
    // chunks of at most proj_rows rows, as many for every thread (7 chunks on 2 threads left one idle
    // for a seventh of the time)
    const int64_t most = proj_rows(Kp_in * esz);
    const int64_t want = round_up((M + most - 1) / most, threads);
    const int64_t mb = round_up((M + want - 1) / want, 8);
    const int64_t chunks = (M + mb - 1) / mb;
    at::parallel_for(0, chunks, 1, [&](int64_t c0_, int64_t c1_) {
      for (int64_t c = c0_; c < c1_; ++c) {
        const int64_t r0 = c * mb, m = std::min(mb, M - r0);
        xq.fill(xp, I, r0, m, I);
        for (int64_t g = 0; g < ngroups; ++g)
          for_row_blocks(m, int(G), [&](int64_t r, int mr) {
            product(wih, g, mr, xq.row(r0 + r), Kp_in, xq.scale + r0 + r, bp + g * G * L, xw + (r0 + r) * Np + g * G * L,
                    Np);
          });
      }
    });
  }

  // the recurrence
  const std::vector<int64_t> sizes = batch_sizes(lengths, T, B);
  const int64_t macs = B * G * H * P + (proj ? B * H * P : 0);
  const int nw = team_size(kind == INT8 ? macs / 4 : macs / 2, T, H, L);
  std::vector<int64_t> gb(nw + 1), pb(nw + 1);
  for (int w = 0; w <= nw; ++w) {
    gb[w] = ngroups * w / nw;
    pb[w] = pgroups * w / nw;
  }
  const int64_t Kp_h = whh.ks * step, Kp_f = proj ? whr.ks * step : 0;
  Scratch<float> hbuf(2 * B * P);
  Scratch<float> hfull(proj ? B * H : 0);
  Scratch<uint8_t> qh(nw * B * Kp_h * esz), qf(nw * B * Kp_f * esz);
  Scratch<float> qhs(nw * B), qfs(nw * B);
  at::Tensor h0c = h0.contiguous();
  std::memcpy(hbuf.data(), h0c.data_ptr<float>(), sizeof(float) * B * P);
  float* c = lstm ? cT.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const bool simd = use_simd(kind);

  run_team(nw, [&](Member& m) {
    Barrier& bar = m.bar;
    alignas(64) float tile[8 * 4 * L];
    for (int64_t s = 0; s < T; ++s) {
      if (!m.begin(s)) continue;
      const int w0 = m.wb, w1 = m.we;
      const int64_t t = reverse ? T - 1 - s : s, bs = sizes[t];
      const float* hp = hbuf.data() + (s & 1) * B * P;
      float* hn = hbuf.data() + ((s + 1) & 1) * B * P;
      float* yt = yp + t * B * P;
      for (int w = w0; w < w1; ++w) {
        QAct qa{kind, Kp_h, qh.data() + w * B * Kp_h * esz, qhs.data() + w * B};
        qa.fill(hp, P, 0, bs, P);
        for (int64_t g = gb[w]; g < gb[w + 1]; ++g) {
          const int64_t u0 = g * L;
          const int nl = int(std::min<int64_t>(L, H - u0));
          for_row_blocks(bs, int(G), [&](int64_t r, int mr) {
            product(whh, g, mr, qa.row(r), Kp_h, qa.scale + r, nullptr, tile, G * L);
            const float* xr = xw + (t * B + r) * Np + g * G * L;
            float* dst = proj ? hfull.data() + r * H + u0 : hn + r * P + u0;
            const int64_t ldd = proj ? H : P;
            point_tile(Family(family), simd, mr, nl, tile, xr, Np, lstm ? c + r * H + u0 : nullptr, H,
                       wch ? wch + u0 : nullptr, H, coupled, bhn ? bhn + u0 : nullptr, hp + r * P + u0, P, dst, ldd);
            if (!proj)
              for (int64_t i = r; i < r + mr; ++i) std::memcpy(yt + i * P + u0, hn + i * P + u0, sizeof(float) * nl);
          });
          if (!proj)
            for (int64_t i = bs; i < B; ++i) {
              std::memcpy(hn + i * P + u0, hp + i * P + u0, sizeof(float) * nl);
              std::memset(yt + i * P + u0, 0, sizeof(float) * nl);
            }
        }
      }
      bar.arrive(w1 - w0);
      if (!proj) continue;
      for (int w = w0; w < w1; ++w) {
        QAct qa{kind, Kp_f, qf.data() + w * B * Kp_f * esz, qfs.data() + w * B};
        qa.fill(hfull.data(), H, 0, bs, H);
        for (int64_t g = pb[w]; g < pb[w + 1]; ++g) {
          const int64_t p0 = g * L;
          const int nl = int(std::min<int64_t>(L, P - p0));
          for_row_blocks(bs, 1, [&](int64_t r, int mr) {
            product(whr, g, mr, qa.row(r), Kp_f, qa.scale + r, nullptr, tile, L);
            for (int i = 0; i < mr; ++i) {
              std::memcpy(hn + (r + i) * P + p0, tile + i * L, sizeof(float) * nl);
              std::memcpy(yt + (r + i) * P + p0, tile + i * L, sizeof(float) * nl);
            }
          });
          for (int64_t i = bs; i < B; ++i) {
            std::memcpy(hn + i * P + p0, hp + i * P + p0, sizeof(float) * nl);
            std::memset(yt + i * P + p0, 0, sizeof(float) * nl);
          }
        }
      }
      bar.arrive(w1 - w0);
    }
  });
  std::memcpy(hT.data_ptr<float>(), hbuf.data() + (T & 1) * B * P, sizeof(float) * B * P);
  return {y, hT, cT};
}

}  // namespace quant
}  // namespace fastrnn

// the bindings (ops.cpp's module)
namespace fastrnn {
void bind_quant(pybind11::module& m) {
  m.def("q_pack", &quant::pack, "pack an int8 (with its row scales) or bfloat16 weight [G*H, K] for the quantized "
        "kernels: (panel, scales, column sums, the source row of each packed column)");
  m.def("q_seq_fwd", &quant::seq_fwd, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "one quantized layer-direction in inference: (y, h_n, c_n)");
  m.def("q_path", &quant::path, "the quantized products' path on this CPU for a kind (0 int8, 1 bfloat16)");
  m.def("q_set_portable", [](bool on) { quant::isa_override().store(on ? 0 : -1); },
        "run the portable products even where the CPU has VNNI / AVX512-BF16 (tests)");
}
}  // namespace fastrnn
