// Plain RNN on the cpp backend: h' = act(xw + W_hh h + b_hh), act tanh or relu. Pointwise passes,
// entries and their registration. The forward keeps no workspace: the backward derives act' from y.
#include "cell_train.h"
#include "recurrence.h"

#include <torch/library.h>

namespace fastrnn {
namespace {

template <typename T>
struct FwdPoint {
  int64_t bs, nu, H, ldp;
  const T* pre;   // [bs, ldp]: h @ W_hh^T of the worker's units
  const T* xw;    // the step's projected input of the worker's units: [b * xs + j] (XRows)
  int64_t xs;
  const T* bias;  // b_hh + u0 (zeros when absent)
  T* hdst;        // new h + u0: [b * H + j]
};

template <typename T, bool RELU>
FASTRNN_INLINE void fwd_impl(const FwdPoint<T>& p) {
  for (int64_t b = 0; b < p.bs; ++b) {
    const T* pr = p.pre + b * p.ldp;
    const T* x = p.xw + b * p.xs;
    T* h = p.hdst + b * p.H;
#pragma GCC ivdep
    for (int64_t j = 0; j < p.nu; ++j) {
      const T v = x[j] + pr[j] + p.bias[j];
      // relu as torch's: a NaN stays NaN (the comparison is false)
      h[j] = RELU ? (v < T(0) ? T(0) : v) : tanh_(v);
    }
  }
}

FASTRNN_CLONES void fwd_point(const FwdPoint<float>& p, bool relu) {
  relu ? fwd_impl<float, true>(p) : fwd_impl<float, false>(p);
}
FASTRNN_CLONES void fwd_point(const FwdPoint<double>& p, bool relu) {
  relu ? fwd_impl<double, true>(p) : fwd_impl<double, false>(p);
}

template <typename T>
struct BwdPoint {
  int64_t bs, nu, H, ldh;
  const T* dh;  // [b * ldh + j]
  const T* y;   // h of step t + u0
  T* dxw;       // gradient of xw[t] + u0
};

template <typename T, bool RELU>
FASTRNN_INLINE void bwd_impl(const BwdPoint<T>& p) {
  for (int64_t b = 0; b < p.bs; ++b) {
    const T* y = p.y + b * p.H;
    const T* dh = p.dh + b * p.ldh;
    T* dx = p.dxw + b * p.H;
#pragma GCC ivdep
    for (int64_t j = 0; j < p.nu; ++j) {
      // relu: torch's threshold_backward (zero where the result is <= 0)
      dx[j] = RELU ? (y[j] <= T(0) ? T(0) : dh[j]) : dh[j] * (T(1) - y[j] * y[j]);
    }
  }
}

FASTRNN_CLONES void bwd_point(const BwdPoint<float>& p, bool relu) {
  relu ? bwd_impl<float, true>(p) : bwd_impl<float, false>(p);
}
FASTRNN_CLONES void bwd_point(const BwdPoint<double>& p, bool relu) {
  relu ? bwd_impl<double, true>(p) : bwd_impl<double, false>(p);
}

using Dims = StateDims;

bool is_relu(c10::string_view nonlinearity) {
  TORCH_CHECK(nonlinearity == "tanh" || nonlinearity == "relu", "fastrnn cpp backend: unknown nonlinearity '",
              nonlinearity, "' (tanh or relu)");
  return nonlinearity == "relu";
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> seq_fwd_impl(const Dims& d, const at::Tensor& xw,
                                                            const at::Tensor& w_hh,
                                                            const c10::optional<at::Tensor>& b_hh,
                                                            const at::Tensor& h0,
                                                            const c10::optional<at::Tensor>& lengths, bool reverse,
                                                            bool relu, const InputProj<T>& in = {}) {
  const int64_t T_ = d.T, B = d.B, H = d.H;
  // packed rows (an inference entry's x, or a training call's xw) or [T, B, *] (zeros past a row's end)
  const int64_t* row0 = d.rows().row0;
  Scratch<T> y_scratch(in.cell ? T_ * B * H : 0);
  at::Tensor y = in.cell ? at::Tensor()
                 : row0 ? pool_empty({row0[T_], H}, h0.options())
                 : d.pads(lengths) ? pool_zeros({T_, B, H}, h0.options()) : pool_empty({T_, B, H}, h0.options());
  at::Tensor h_n = at::empty({B, H}, h0.options());
  if (B == 0 || T_ == 0) return {y, h_n, at::empty({0}, h0.options())};
  FwdArgs<T> a{T_, B, H, H, 1, reverse, w_hh.data_ptr<T>(), nullptr, h0.data_ptr<T>(),
               in.cell ? y_scratch.data() : y.data_ptr<T>(), h_n.data_ptr<T>(), nullptr, false,
               batch_sizes(lengths, T_, B), in, xw.defined() ? xw.data_ptr<T>() : nullptr};
  a.in.row0 = row0;
  const PointBias<T> bias(a, data_or_null<T>(b_hh), 1);
  const T* bp = bias.data();
  forward_driver<T>(a, [&](int ph, int w, int64_t t, int64_t bs, int64_t u0, int64_t nu, const T* pre, int64_t ldp, int64_t,
                           const T*, T* hdst, int64_t, const XRows<T>& xr, int64_t) {
    fwd_point(FwdPoint<T>{bs, nu, H, ldp, pre, xr.x, xr.rs, bp + u0, hdst + u0}, relu);
  });
  return {y, h_n, at::empty({0}, h0.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> seq_fwd(const at::Tensor& xw, const at::Tensor& w_hh,
                                                       const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                       const c10::optional<at::Tensor>& lengths, bool reverse,
                                                       c10::string_view nonlinearity, bool save) {
  const Dims d = check_single_state(xw, w_hh, b_hh, h0, lengths, 1);
  const bool relu = is_relu(nonlinearity);
  (void)save;  // nothing to keep: the backward uses y
  return AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "rnn_seq_fwd",
                                    [&] { return seq_fwd_impl<scalar_t>(d, xw, w_hh, b_hh, h0, lengths, reverse, relu); });
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename T>
Grads seq_bwd_impl(const Dims& d, const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& xw,
                   const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                   const c10::optional<at::Tensor>& lengths, const at::Tensor& y, bool reverse, bool relu) {
  const int64_t T_ = d.T, B = d.B, H = d.H, N = d.n();
  const StepRows R = d.rows();
  const bool pad = d.pads(lengths);
  auto new_ = [&] { return pad ? pool_zeros(d.per_step(H), xw.options()) : pool_empty(d.per_step(H), xw.options()); };
  at::Tensor d_xw = new_(), hprev = new_();
  at::Tensor dh0 = grad_h_n.clone(), dh_cur = at::empty({B, H}, xw.options());
  if (B > 0 && T_ > 0) {
    const T* yp = y.data_ptr<T>();
    BwdArgs<T> a{T_, B, H, H, 1, reverse, false, grad_y.data_ptr<T>(), w_hh.data_ptr<T>(), nullptr, h0.data_ptr<T>(),
                 yp, d_xw.data_ptr<T>(), dh0.data_ptr<T>(), dh_cur.data_ptr<T>(), nullptr, hprev.data_ptr<T>(),
                 batch_sizes(lengths, T_, B)};
    a.row0 = R.row0;
    a.read_grad_y(grad_y);
    T* dx = d_xw.data_ptr<T>();
    backward_driver<T>(a, [&](int ph, int w, int64_t t, int64_t bs, int64_t, int64_t, int64_t u0, int64_t nu, const T* dh,
                              int64_t ldh, int64_t b0) {
      bwd_point(BwdPoint<T>{bs, nu, H, ldh, dh, yp + (R(t) + b0) * H + u0, dx + (R(t) + b0) * H + u0}, relu);
    });
  }
  const at::Tensor flat = d_xw.view({N, H});
  at::Tensor d_w_hh = weight_grad(flat, hprev.view({N, H}), d.packed() ? c10::nullopt : lengths, T_, B);
  at::Tensor d_b_hh = opt_ptr(b_hh) ? flat.sum(0) : at::empty({0}, xw.options());
  return {d_xw, d_w_hh, d_b_hh, dh0};
}

Grads seq_bwd(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& xw, const at::Tensor& w_hh,
              const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0, const c10::optional<at::Tensor>& lengths,
              const at::Tensor& y, const at::Tensor& ws, bool reverse, c10::string_view nonlinearity) {
  const Dims d = check_single_state(xw, w_hh, b_hh, h0, lengths, 1);
  const bool relu = is_relu(nonlinearity);
  check_single_state_grads(d, grad_y, grad_h_n, y, xw);
  (void)ws;  // a sequence keeps nothing: act' comes from y
  return AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "rnn_seq_bwd", [&] {
    return seq_bwd_impl<scalar_t>(d, grad_y, grad_h_n, xw, w_hh, b_hh, h0, lengths, y, reverse, relu);
  });
}

// A step keeps its output (the backward's act' needs it) as its workspace.
std::tuple<at::Tensor, at::Tensor> step_fwd(const at::Tensor& xw, const at::Tensor& w_hh,
                                            const c10::optional<at::Tensor>& b_hh, const at::Tensor& h,
                                            c10::string_view nonlinearity, bool save) {
  TORCH_CHECK(xw.dim() == 2, "fastrnn cpp backend: xw must be [B, H], got ", xw.sizes());
  auto r = seq_fwd(xw.unsqueeze(0), w_hh, b_hh, h, c10::nullopt, false, nonlinearity, save);
  at::Tensor h_n = std::get<1>(r);
  return {h_n, save ? h_n.reshape(-1).clone() : std::get<2>(r)};
}

// A cell in inference, input projection included (see InputProj): returns h'.
at::Tensor cell_fwd(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h,
                    c10::string_view nonlinearity) {
  at::Tensor xw = proj_input(x, w_ih, b_ih, h.dim() == 2 ? h.size(1) : 0, false);
  const Dims d = check_single_state(xw, w_hh, b_hh, h, c10::nullopt, 1);
  const bool relu = is_relu(nonlinearity);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnn_cell_fwd", [&] {
    return std::get<1>(seq_fwd_impl<scalar_t>(d, xw, w_hh, b_hh, h, c10::nullopt, false, relu,
                                              input_proj<scalar_t>(x, w_ih, b_ih, xw, true)));
  });
}

// A cell's step in training, projection inside, one autograd node (cell_train.h). act' comes from the
// output as torch's does it: 1 - h'^2, or relu's 0 where h' <= 0 (a NaN passes the gradient, as torch's
// threshold_backward); it is kept apart from h', which the caller may change in place.
struct CellTrain : torch::autograd::Function<CellTrain> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_ih,
                               const at::Tensor& b_ih, const at::Tensor& w_hh, const at::Tensor& b_hh,
                               const at::Tensor& h, bool relu) {
    const bool seq = seq_form(x, {h});
    at::Tensor h1 = cell_fwd(rows(x), w_ih, maybe(b_ih), w_hh, maybe(b_hh), rows(h), relu ? "relu" : "tanh");
    at::Tensor d = at::empty_like(h1);
    AT_DISPATCH_FLOATING_TYPES(h1.scalar_type(), "rnn_cell_train", [&] {
      const scalar_t* y = h1.data_ptr<scalar_t>();
      scalar_t* dp = d.data_ptr<scalar_t>();
      const int64_t n = h1.numel();
      if (relu)
        for (int64_t k = 0; k < n; ++k) dp[k] = y[k] <= scalar_t(0) ? scalar_t(0) : scalar_t(1);
      else
        for (int64_t k = 0; k < n; ++k) dp[k] = scalar_t(1) - y[k] * y[k];
    });
    ctx->save_for_backward({x, w_ih, b_ih, w_hh, b_hh, h, d});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["seq"] = seq;
    return step_outputs({h1}, seq);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list s = ctx->get_saved_variables();
    const bool relu = ctx->saved_data["relu"].toBool(), seq = ctx->saved_data["seq"].toBool();
    variable_list g;
    if (at::GradMode::is_enabled() || !plain_grads(grads)) {
      g = recompute_grads(in_form([&](const variable_list& in) -> variable_list {
            at::Tensor pre = linear(in[kX], in[kWih], in[kBih]) + linear(in[kH], in[kWhh], in[kBhh]);
            return {relu ? at::relu(pre) : at::tanh(pre)};
          }, seq, 1), variable_list(s.begin(), s.begin() + 6), grads);
    } else {
      const at::Tensor dg = state_grads(grads, seq)[0].contiguous().mul(s[6]);  // contiguous: big_mm takes it
      g = step_grads(ctx, dg, dg, rows(s[kX]), s[kWih], s[kBih], s[kWhh], s[kBhh], rows(s[kH]), at::Tensor());
      seq_grads(g, seq, 1);
    }
    g.resize(7);  // relu: no gradient
    return g;
  }
};

// A short sequence in inference, input projection inside (x [T, B, I]): returns (y, h_n).
std::tuple<at::Tensor, at::Tensor> chunk_fwd(const at::Tensor& x, const at::Tensor& w_ih,
                                             const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
                                             const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0, bool reverse,
                                             c10::string_view nonlinearity,
                                             const c10::optional<at::Tensor>& lengths = c10::nullopt) {
  const int64_t GH = h0.dim() == 2 ? h0.size(1) : 0;
  ChunkInput in = chunk_input(x, w_ih, b_ih, GH, lengths);  // packed rows with lengths
  Dims d = in.xw.defined() ? check_single_state(in.xw, w_hh, b_hh, h0, c10::nullopt, 1)
                           : check_single_state(x, in.T, in.B, GH, w_hh, b_hh, h0, lengths, 1);
  d.row0 = std::move(in.row0);
  const bool relu = is_relu(nonlinearity);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnn_chunk_fwd", [&] {
    auto r = seq_fwd_impl<scalar_t>(d, in.xw, w_hh, b_hh, h0, lengths, reverse, relu,
                                    input_proj<scalar_t>(x, w_ih, b_ih, in.xw));
    return std::make_tuple(std::get<0>(r), std::get<1>(r));
  });
}

Grads step_bwd(const at::Tensor& grad_h, const at::Tensor& xw, const at::Tensor& w_hh,
               const c10::optional<at::Tensor>& b_hh, const at::Tensor& h, const at::Tensor& ws,
               c10::string_view nonlinearity) {
  TORCH_CHECK(xw.dim() == 2, "fastrnn cpp backend: xw must be [B, H], got ", xw.sizes());
  TORCH_CHECK(ws.numel() == h.numel(), "fastrnn cpp backend: ws must hold the step's output (", h.numel(),
              " values), got ", ws.numel());
  auto g = seq_bwd(grad_h.unsqueeze(0), at::zeros_like(grad_h), xw.unsqueeze(0), w_hh, b_hh, h, c10::nullopt,
                   ws.view({1, h.size(0), h.size(1)}), ws, false, nonlinearity);
  std::get<0>(g) = std::get<0>(g).squeeze(0);
  return g;
}

}  // namespace

at::Tensor rnn_cell_fwd(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                        const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h,
                        c10::string_view nonlinearity) {
  return cell_fwd(x, w_ih, b_ih, w_hh, b_hh, h, nonlinearity);
}

std::tuple<at::Tensor, at::Tensor> rnn_chunk_fwd(const at::Tensor& x, const at::Tensor& w_ih,
                                                 const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
                                                 const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                 bool reverse, c10::string_view nonlinearity) {
  return chunk_fwd(x, w_ih, b_ih, w_hh, b_hh, h0, reverse, nonlinearity);
}

std::tuple<at::Tensor, at::Tensor> rnn_packed_fwd(const at::Tensor& x, const at::Tensor& w_ih,
                                                  const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
                                                  const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                  bool reverse, c10::string_view nonlinearity,
                                                  const at::Tensor& lengths) {
  return chunk_fwd(x, w_ih, b_ih, w_hh, b_hh, h0, reverse, nonlinearity, lengths);
}

variable_list rnn_cell_train(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                             const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h,
                             c10::string_view nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  return CellTrain::apply(x, w_ih, or_empty(b_ih, x), w_hh, or_empty(b_hh, x), h, relu);
}

TORCH_LIBRARY_IMPL(fastrnn_cpp, CPU, m) {
  m.impl("rnn_packed_fwd", &rnn_packed_fwd);
  m.impl("rnn_seq_fwd", &seq_fwd);
  m.impl("rnn_seq_bwd", &seq_bwd);
  m.impl("rnn_step_fwd", &step_fwd);
  m.impl("rnn_step_bwd", &step_bwd);
  m.impl("rnn_cell_fwd", &cell_fwd);
  m.impl("rnn_chunk_fwd", &rnn_chunk_fwd);
}

}  // namespace fastrnn
