// The GEMM entry points (one per dtype, built per ISA) and the argument checks shared by the cells.
#include "recurrence.h"

namespace fastrnn {

FASTRNN_ISA_BUILDS(gemm_packed, float,
                   (int64_t M, int64_t K, const float* A, int64_t lda, const float* panel, int64_t ncb, float* C,
                    int64_t ldc),
                   (M, K, A, lda, panel, ncb, C, ldc), gemm_packed_impl)
FASTRNN_ISA_BUILDS(gemm_packed, double,
                   (int64_t M, int64_t K, const double* A, int64_t lda, const double* panel, int64_t ncb, double* C,
                    int64_t ldc),
                   (M, K, A, lda, panel, ncb, C, ldc), gemm_packed_impl)

FASTRNN_ISA_BUILDS(gemm_groups, float,
                   (int64_t groups, int64_t M, int64_t K, const float* A, int64_t lda, int64_t sa, const float* panel,
                    int64_t ncb, float* C, int64_t ldc, int64_t sc),
                   (groups, M, K, A, lda, sa, panel, ncb, C, ldc, sc), gemm_groups_impl)
FASTRNN_ISA_BUILDS(gemm_groups, double,
                   (int64_t groups, int64_t M, int64_t K, const double* A, int64_t lda, int64_t sa,
                    const double* panel, int64_t ncb, double* C, int64_t ldc, int64_t sc),
                   (groups, M, K, A, lda, sa, panel, ncb, C, ldc, sc), gemm_groups_impl)

FASTRNN_ISA_BUILDS(pack_cols, float,
                   (const float* src, int64_t ld, bool trans, int64_t K, int64_t ncols, const int64_t* col,
                    float* panel),
                   (src, ld, trans, K, ncols, col, panel), pack_cols_impl)
FASTRNN_ISA_BUILDS(pack_cols, double,
                   (const double* src, int64_t ld, bool trans, int64_t K, int64_t ncols, const int64_t* col,
                    double* panel),
                   (src, ld, trans, K, ncols, col, panel), pack_cols_impl)

FASTRNN_ISA_BUILDS(gemm_rows, float,
                   (int64_t M, int64_t K, const float* A, int64_t lda, const float* W, const ColMap& cm, float* C,
                    int64_t ldc),
                   (M, K, A, lda, W, cm, C, ldc), gemm_rows_impl)
FASTRNN_ISA_BUILDS(gemm_rows, double,
                   (int64_t M, int64_t K, const double* A, int64_t lda, const double* W, const ColMap& cm, double* C,
                    int64_t ldc),
                   (M, K, A, lda, W, cm, C, ldc), gemm_rows_impl)

FASTRNN_CLONES void gemm_cols(int64_t M, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw,
                              int64_t offset, int64_t count, float* C, int64_t ldc) {
  gemm_cols_impl<float>(M, K, A, lda, W, ldw, offset, count, C, ldc);
}

FASTRNN_CLONES void gemm_cols(int64_t M, int64_t K, const double* A, int64_t lda, const double* W, int64_t ldw,
                              int64_t offset, int64_t count, double* C, int64_t ldc) {
  gemm_cols_impl<double>(M, K, A, lda, W, ldw, offset, count, C, ldc);
}

template <typename T>
FASTRNN_INLINE void add_gate_bias_impl(T* c, int64_t ldc, int64_t rows, int64_t G, int64_t U, int64_t nu, const T* bias,
                                       int64_t H) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < G; ++k) {
      T* d = c + r * ldc + k * U;
      const T* b = bias + k * H;
#pragma GCC ivdep
      for (int64_t j = 0; j < nu; ++j) d[j] += b[j];
    }
}

FASTRNN_CLONES void add_gate_bias(float* c, int64_t ldc, int64_t rows, int64_t G, int64_t U, int64_t nu,
                                  const float* bias, int64_t H) {
  add_gate_bias_impl<float>(c, ldc, rows, G, U, nu, bias, H);
}

FASTRNN_CLONES void add_gate_bias(double* c, int64_t ldc, int64_t rows, int64_t G, int64_t U, int64_t nu,
                                  const double* bias, int64_t H) {
  add_gate_bias_impl<double>(c, ldc, rows, G, U, nu, bias, H);
}

namespace {
void check_dtype_device(const at::Tensor& t, const char* what, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "fastrnn cpp backend: ", what, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fastrnn cpp backend: ", what, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fastrnn cpp backend: ", what, " has dtype ", t.scalar_type(),
              " but the input has ", like.scalar_type());
}
}  // namespace

void check_float(const at::Tensor& t, const char* what, const at::Tensor& like) {
  check_dtype_device(t, what, like);
  TORCH_CHECK(t.is_contiguous(), "fastrnn cpp backend: ", what, " must be contiguous");
}

void check_strided(const at::Tensor& t, const char* what, at::IntArrayRef shape, const at::Tensor& like) {
  check_dtype_device(t, what, like);
  check_shape(t, what, shape);
}

void check_shape(const at::Tensor& t, const char* what, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "fastrnn cpp backend: ", what, " must have shape ", shape, ", got ", t.sizes());
}

void check_tensor(const at::Tensor& t, const char* what, at::IntArrayRef shape, const at::Tensor& like) {
  check_float(t, what, like);
  check_shape(t, what, shape);
}

void check_opt(const c10::optional<at::Tensor>& t, const char* what, at::IntArrayRef shape, const at::Tensor& like) {
  if (opt_ptr(t)) check_tensor(*t, what, shape, like);
}

at::Tensor proj_input(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih, int64_t GH,
                      bool steps) {
  check_float(x, "x", x);
  TORCH_CHECK(x.dim() == (steps ? 3 : 2), "fastrnn cpp backend: x must be ", steps ? "[T, B, I]" : "[B, I]", ", got ",
              x.sizes());
  TORCH_CHECK(x.size(-1) > 0, "fastrnn cpp backend: x must have at least one input feature, got ", x.sizes());
  check_tensor(w_ih, "w_ih", {GH, x.size(-1)}, x);
  check_opt(b_ih, "b_ih", {GH}, x);
  if (steps && fused_input(x.size(0), x.size(1))) return at::Tensor();  // the driver projects in blocks
  return steps ? pool_empty({x.size(0), x.size(1), GH}, x.options()) : at::empty({1, x.size(0), GH}, x.options());
}

namespace {
// The T + 1 step offsets of a packed sequence's rows `x` ([N, *], `what` in the messages) from its lengths
std::vector<int64_t> packed_rows(const at::Tensor& x, const at::Tensor& lengths, const char* what) {
  TORCH_CHECK(lengths.device().is_cpu() && lengths.scalar_type() == at::kLong && lengths.dim() == 1 &&
                  lengths.size(0) > 0 && lengths.is_contiguous(),
              "fastrnn cpp backend: lengths must be a contiguous int64 CPU tensor of at least one row");
  const int64_t B = lengths.size(0), T = lengths.data_ptr<int64_t>()[0];
  // every step has a row: a longest length past x's rows is refused before anything is sized by it
  TORCH_CHECK(T >= 1 && T <= x.size(0), "fastrnn cpp backend: lengths[0] = ", T, " but ", what, " has ", x.size(0),
              " rows");
  check_lengths(lengths, T, B);
  const std::vector<int64_t> sizes = batch_sizes(lengths, T, B);
  std::vector<int64_t> row0(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) row0[t + 1] = row0[t] + sizes[t];
  TORCH_CHECK(x.size(0) == row0[T], "fastrnn cpp backend: ", what, " has ", x.size(0),
              " rows but the lengths sum to ", row0[T]);
  return row0;
}

std::vector<int64_t> packed_input(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                                  int64_t GH, const at::Tensor& lengths) {
  check_float(x, "x", x);
  TORCH_CHECK(x.dim() == 2, "fastrnn cpp backend: x must be [N, I] (packed rows), got ", x.sizes());
  TORCH_CHECK(x.size(1) > 0, "fastrnn cpp backend: x must have at least one input feature, got ", x.sizes());
  check_tensor(w_ih, "w_ih", {GH, x.size(1)}, x);
  check_opt(b_ih, "b_ih", {GH}, x);
  return packed_rows(x, lengths, "x");
}
}  // namespace

SeqShape seq_shape(const at::Tensor& xw, const c10::optional<at::Tensor>& lengths, int64_t G) {
  check_float(xw, "xw", xw);
  if (xw.dim() == 2 && opt_ptr(lengths)) {
    std::vector<int64_t> row0 = packed_rows(xw, *lengths, "xw");
    const int64_t T = int64_t(row0.size()) - 1;
    return {T, lengths->size(0), xw.size(1), std::move(row0)};
  }
  TORCH_CHECK(xw.dim() == 3, "fastrnn cpp backend: xw must be [T, B, ", G, "*H] (or with lengths a packed ",
              "sequence's rows [N, ", G, "*H]), got ", xw.sizes());
  return {xw.size(0), xw.size(1), xw.size(2), {}};
}

ChunkInput chunk_input(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih, int64_t GH,
                       const c10::optional<at::Tensor>& lengths) {
  if (!opt_ptr(lengths)) {
    at::Tensor xw = proj_input(x, w_ih, b_ih, GH, true);
    return {xw, {}, x.size(0), x.size(1)};
  }
  std::vector<int64_t> row0 = packed_input(x, w_ih, b_ih, GH, *lengths);
  const int64_t T = int64_t(row0.size()) - 1;
  return {at::Tensor(), std::move(row0), T, lengths->size(0)};
}

StateDims check_single_state(const at::Tensor& xw, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
                             const at::Tensor& h0, const c10::optional<at::Tensor>& lengths, int64_t G) {
  SeqShape s = seq_shape(xw, lengths, G);
  StateDims d = check_single_state(xw, s.T, s.B, s.GH, w_hh, b_hh, h0, lengths, G);
  d.row0 = std::move(s.row0);
  return d;
}

StateDims check_single_state(const at::Tensor& like, int64_t T, int64_t B, int64_t GH, const at::Tensor& w_hh,
                             const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                             const c10::optional<at::Tensor>& lengths, int64_t G) {
  const at::Tensor& xw = like;
  check_float(h0, "h0", xw);
  TORCH_CHECK(h0.dim() == 2, "fastrnn cpp backend: h0 must be [B, H], got ", h0.sizes());
  const StateDims d{{T, B, {}}, h0.size(1), GH};
  TORCH_CHECK(d.GH == G * d.H, "fastrnn cpp backend: xw has ", d.GH, " gate columns, expected ", G, " x ", d.H);
  check_shape(h0, "h0", {d.B, d.H});
  check_tensor(w_hh, "w_hh", {d.GH, d.H}, xw);
  check_opt(b_hh, "b_hh", {d.GH}, xw);
  check_lengths(lengths, d.T, d.B);
  return d;
}

void check_single_state_grads(const StateDims& d, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                              const at::Tensor& y, const at::Tensor& xw) {
  check_strided(grad_y, "grad_y", d.per_step(d.H), xw);
  check_tensor(grad_h_n, "grad_h_n", {d.B, d.H}, xw);
  check_tensor(y, "y", d.per_step(d.H), xw);
}

void check_lengths(const c10::optional<at::Tensor>& lengths, int64_t T, int64_t B) {
  if (!opt_ptr(lengths)) return;
  const at::Tensor& l = *lengths;
  TORCH_CHECK(l.device().is_cpu() && l.scalar_type() == at::kLong && l.dim() == 1 && l.size(0) == B && l.is_contiguous(),
              "fastrnn cpp backend: lengths must be a contiguous int64 CPU tensor of shape [", B, "]");
  const int64_t* len = l.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 1 && len[b] <= T, "fastrnn cpp backend: lengths[", b, "] = ", len[b], " is not in 1..", T);
    TORCH_CHECK(b == 0 || len[b] <= len[b - 1], "fastrnn cpp backend: lengths must be non-increasing");
  }
}

}  // namespace fastrnn
