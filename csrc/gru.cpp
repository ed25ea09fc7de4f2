// GRU on the cpp backend, torch's form: r and z from x and h, n = tanh(x_n + r * (W_hn h + b_hn)),
// h' = (1 - z) * n + z * h. Pointwise passes, entries and their registration.
#include "cell_train.h"
#include "recurrence.h"

#include <torch/library.h>

namespace fastrnn {
namespace {

template <typename T>
struct FwdPoint {
  int64_t bs, nu, H, U, ldp;
  const T* pre;   // [bs, ldp]: h @ W_hh^T of the worker's units, gate k at column k * U + j
  const T* xw;    // the step's projected input of the worker's units: [b * xs + k * xg + j] (XRows)
  int64_t xs, xg;
  const T* bias;  // b_hh + u0 (zeros when absent)
  const T* hp;    // h_{t-1} + u0: [b * H + j]
  T* hdst;        // new h + u0: [b * H + j]
  T* gates;       // saved r, z, n + u0 (save only)
  T* ghn;         // saved W_hn h + b_hn + u0 (save only)
};

template <typename T, bool SAVE>
FASTRNN_INLINE void fwd_impl(const FwdPoint<T>& p) {
  const int64_t H = p.H, U = p.U;
  for (int64_t b = 0; b < p.bs; ++b) {
    const T* pr = p.pre + b * p.ldp;
    const T* x = p.xw + b * p.xs;
    const int64_t X = p.xg;
    const T* hp = p.hp + b * H;
    T* h = p.hdst + b * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < p.nu; ++j) {
      const T r = sigmoid_(x[j] + pr[j] + p.bias[j]);
      const T z = sigmoid_(x[X + j] + pr[U + j] + p.bias[H + j]);
      const T hn = pr[2 * U + j] + p.bias[2 * H + j];
      const T n = tanh_(x[2 * X + j] + r * hn);
      h[j] = (T(1) - z) * n + z * hp[j];
      if (SAVE) {
        T* s = p.gates + b * 3 * H;
        s[j] = r;
        s[H + j] = z;
        s[2 * H + j] = n;
        p.ghn[b * H + j] = hn;
      }
    }
  }
}

FASTRNN_CLONES void fwd_point(const FwdPoint<float>& p) {
  p.gates ? fwd_impl<float, true>(p) : fwd_impl<float, false>(p);
}
FASTRNN_CLONES void fwd_point(const FwdPoint<double>& p) {
  p.gates ? fwd_impl<double, true>(p) : fwd_impl<double, false>(p);
}

template <typename T>
struct BwdPoint {
  int64_t bs, nu, H, ldh, nprev;
  const T* dh;     // [b * ldh + j]
  const T* gates;  // r, z, n of step t + u0
  const T* ghn;    // W_hn h + b_hn of step t + u0
  const T* hprev;  // h of the previous step + u0 (rows b < nprev)
  const T* h0;     // initial h + u0 (rows b >= nprev)
  T* dxw;          // gradient of xw[t] + u0
  T* dhh;          // gradient of the recurrent pre-activations (n block times r) + u0
  T* dh_direct;    // dh_rec + u0: receives dh * z, the recurrent product is added by the driver
  bool add;        // add dh * z to what dh_rec holds (zoneout: the share of dh_t carried to h_{t-1})
};

template <typename T, bool ADD>
FASTRNN_INLINE void bwd_impl(const BwdPoint<T>& p) {
  const int64_t H = p.H;
  for (int64_t b = 0; b < p.bs; ++b) {
    const T* s = p.gates + b * 3 * H;
    const T* ghn = p.ghn + b * H;
    const T* hp = b < p.nprev ? p.hprev + b * H : p.h0 + b * H;
    const T* dh = p.dh + b * p.ldh;
    T* dx = p.dxw + b * 3 * H;
    T* dr = p.dhh + b * 3 * H;
    T* dd = p.dh_direct + b * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < p.nu; ++j) {
      const T r = s[j], z = s[H + j], n = s[2 * H + j], d = dh[j];
      const T d_n = d * (T(1) - z) * (T(1) - n * n);
      const T d_z = d * (hp[j] - n) * z * (T(1) - z);
      const T d_r = d_n * ghn[j] * r * (T(1) - r);
      dx[j] = d_r;
      dx[H + j] = d_z;
      dx[2 * H + j] = d_n;
      dr[j] = d_r;
      dr[H + j] = d_z;
      dr[2 * H + j] = d_n * r;
      dd[j] = ADD ? dd[j] + d * z : d * z;
    }
  }
}

FASTRNN_CLONES void bwd_point(const BwdPoint<float>& p) { p.add ? bwd_impl<float, true>(p) : bwd_impl<float, false>(p); }
FASTRNN_CLONES void bwd_point(const BwdPoint<double>& p) {
  p.add ? bwd_impl<double, true>(p) : bwd_impl<double, false>(p);
}

// ---- layer norm of the recurrent product (the cell option the pointwise pass applies; zoneout and
// recurrent dropout are the driver's). A row's statistics span all its units, which the workers share
// out: phase 0 writes each worker's partial statistics, phase 1 combines them (forward_driver), as in
// lstm.cpp.
constexpr double LN_EPS = 1e-5;  // nn.LayerNorm's

template <typename T>
struct LnPoint {
  const T* gain;  // + u0: [k * H + j]
  T* xhat;        // normalized product of step t + u0: [b * 3H + k * H + j] (save only)
  T* rstd;        // step t: [b] (save only)
  T* part;        // partial statistics [slot][B][3] (count, mean, squared deviations)
  int slots, w;
  int64_t B, u0;
};

template <typename T, bool SAVE>
FASTRNN_INLINE void fwd_ln_impl(const FwdPoint<T>& p, const LnPoint<T>& q, int ph) {
  const int64_t H = p.H, U = p.U, nu = p.nu;
  if (ph == 0) {
    for (int64_t b = 0; b < p.bs; ++b) {
      const T* pr = p.pre + b * p.ldp;
      T sum = T(0), sq = T(0);
      for (int k = 0; k < 3; ++k) sum += vsum(pr + k * U, nu);
      const T mean = sum / T(3 * nu);
      for (int k = 0; k < 3; ++k) sq += vsqdev(pr + k * U, nu, mean);
      T* o = q.part + (q.w * q.B + b) * 3;
      o[0] = T(3 * nu);
      o[1] = mean;
      o[2] = sq;
    }
    return;
  }
  for (int64_t b = 0; b < p.bs; ++b) {
    const T* pr = p.pre + b * p.ldp;
    const T* x = p.xw + b * p.xs;
    const int64_t X = p.xg;
    const T* hp = p.hp + b * H;
    T* h = p.hdst + b * H;
    T n_ = T(0), m = T(0), m2 = T(0);  // combine the workers' statistics (Chan et al.)
    for (int w = 0; w < q.slots; ++w) {
      const T* s = q.part + (w * q.B + b) * 3;
      if (s[0] == T(0)) continue;
      const T nn = n_ + s[0], d = s[1] - m;
      m += d * s[0] / nn;
      m2 += s[2] + d * d * n_ * s[0] / nn;
      n_ = nn;
    }
    const T rs = T(1) / std::sqrt(m2 / n_ + T(LN_EPS));
    if (SAVE && q.u0 == 0) q.rstd[b] = rs;
    T* xh = SAVE ? q.xhat + b * 3 * H : nullptr;
#pragma GCC ivdep
    for (int64_t j = 0; j < nu; ++j) {
      const T nr = (pr[j] - m) * rs, nz = (pr[U + j] - m) * rs, nn = (pr[2 * U + j] - m) * rs;
      if (SAVE) {
        xh[j] = nr;
        xh[H + j] = nz;
        xh[2 * H + j] = nn;
      }
      const T r = sigmoid_(x[j] + nr * q.gain[j] + p.bias[j]);
      const T z = sigmoid_(x[X + j] + nz * q.gain[H + j] + p.bias[H + j]);
      const T hn = nn * q.gain[2 * H + j] + p.bias[2 * H + j];
      const T n = tanh_(x[2 * X + j] + r * hn);
      h[j] = (T(1) - z) * n + z * hp[j];
      if (SAVE) {
        T* s = p.gates + b * 3 * H;
        s[j] = r;
        s[H + j] = z;
        s[2 * H + j] = n;
        p.ghn[b * H + j] = hn;
      }
    }
  }
}

FASTRNN_CLONES void fwd_ln(const FwdPoint<float>& p, const LnPoint<float>& q, int ph) {
  p.gates ? fwd_ln_impl<float, true>(p, q, ph) : fwd_ln_impl<float, false>(p, q, ph);
}
FASTRNN_CLONES void fwd_ln(const FwdPoint<double>& p, const LnPoint<double>& q, int ph) {
  p.gates ? fwd_ln_impl<double, true>(p, q, ph) : fwd_ln_impl<double, false>(p, q, ph);
}

// phase 0, after bwd_impl wrote the gradient of the normalized product (+ bias) into p.dhh: the partial
// sums over the worker's columns; phase 1: the gain's and the bias's gradients (accumulated, + u0) and the
// gradient of the raw product in place of it
template <typename T>
FASTRNN_INLINE void bwd_ln_impl(const BwdPoint<T>& p, const LnPoint<T>& q, const T* rstd, T* d_gain, T* d_bias, int ph) {
  const int64_t H = p.H, GH = 3 * H, nu = p.nu;
  for (int64_t b = 0; b < p.bs; ++b) {
    T* dr = p.dhh + b * GH;
    const T* xh = q.xhat + b * GH;
    if (ph == 0) {
      T t1 = T(0), t2 = T(0);
      for (int k = 0; k < 3; ++k) {
        t1 += vdot(dr + k * H, q.gain + k * H, nu);
        t2 += vdot3(dr + k * H, q.gain + k * H, xh + k * H, nu);
      }
      q.part[(q.w * q.B + b) * 2] = t1;
      q.part[(q.w * q.B + b) * 2 + 1] = t2;
      continue;
    }
    T t1 = T(0), t2 = T(0);
    for (int w = 0; w < q.slots; ++w) {
      t1 += q.part[(w * q.B + b) * 2];
      t2 += q.part[(w * q.B + b) * 2 + 1];
    }
    const T inv = T(1) / T(GH), rs = rstd[b], m1 = t1 * inv, m2 = t2 * inv;
    for (int k = 0; k < 3; ++k) {
      T* dr_k = dr + k * H;
      T* db_k = d_bias + k * H;
      T* dg_k = d_gain + k * H;
      const T* xh_k = xh + k * H;
      const T* g_k = q.gain + k * H;
#pragma GCC ivdep
      for (int64_t j = 0; j < nu; ++j) {
        const T d = dr_k[j];
        db_k[j] += d;
        dg_k[j] += d * xh_k[j];
        dr_k[j] = rs * (d * g_k[j] - m1 - xh_k[j] * m2);
      }
    }
  }
}

FASTRNN_CLONES void bwd_ln(const BwdPoint<float>& p, const LnPoint<float>& q, const float* rs, float* dg, float* db,
                           int ph) {
  bwd_ln_impl(p, q, rs, dg, db, ph);
}
FASTRNN_CLONES void bwd_ln(const BwdPoint<double>& p, const LnPoint<double>& q, const double* rs, double* dg,
                           double* db, int ph) {
  bwd_ln_impl(p, q, rs, dg, db, ph);
}

using OptT = c10::optional<at::Tensor>;

// the cell options of a call (null / 0 where off)
struct Opts {
  const at::Tensor *ln_h, *rmask, *zmask;
  double z;
};
const Opts NO_OPTS{nullptr, nullptr, nullptr, 0.0};

Opts check_opts(const StateDims& d, const at::Tensor& xw, const OptT& ln_h, const OptT& rmask, const OptT& zmask,
                double z) {
  check_opt(ln_h, "ln_h", {d.GH}, xw);
  check_opt(rmask, "rmask", {d.B, d.H}, xw);
  check_opt(zmask, "zmask", {d.T, d.B, d.H}, xw);
  TORCH_CHECK(!d.packed() || !opt_ptr(zmask), "fastrnn cpp backend: a zoneout mask [T, B, H] needs xw as [T, B, 3*H], ",
              "not a packed sequence's rows");
  return Opts{opt_ptr(ln_h), opt_ptr(rmask), opt_ptr(zmask), z};
}

// the workspace of a saving forward per (t, b): r, z, n 3H, W_hn h + b_hn H; with layer norm the
// normalized recurrent product 3H and its rstd
int64_t ws_row(const StateDims& d, const Opts& o) { return d.GH + d.H + (o.ln_h ? d.GH + 1 : 0); }

template <typename T> const T* tptr(const at::Tensor* t) { return t ? t->data_ptr<T>() : nullptr; }

using Dims = StateDims;

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> seq_fwd_impl(const Dims& d, const at::Tensor& xw,
                                                            const at::Tensor& w_hh,
                                                            const c10::optional<at::Tensor>& b_hh,
                                                            const at::Tensor& h0,
                                                            const c10::optional<at::Tensor>& lengths, bool reverse,
                                                            bool save, const InputProj<T>& in = {},
                                                            const Opts& o = NO_OPTS) {
  const int64_t T_ = d.T, B = d.B, H = d.H, GH = d.GH;
  // packed rows (an inference entry's x, or a training call's xw) or [T, B, *]; N: the per-step buffers' rows
  const StepRows R = d.rows();
  const int64_t N = d.n();
  const bool pad = d.pads(lengths);
  Scratch<T> y_scratch(in.cell ? T_ * B * H : 0);
  at::Tensor y = in.cell ? at::Tensor()
                 : d.packed() ? pool_empty({N, H}, h0.options())
                 : pad ? pool_zeros({T_, B, H}, h0.options()) : pool_empty({T_, B, H}, h0.options());
  at::Tensor h_n = at::empty({B, H}, h0.options());
  const int64_t ws_numel = save ? N * ws_row(d, o) : 0;
  at::Tensor ws = pad ? pool_zeros({ws_numel}, h0.options()) : pool_empty({ws_numel}, h0.options());
  if (B == 0 || T_ == 0) return {y, h_n, ws};
  T* gates = save ? ws.data_ptr<T>() : nullptr;
  T* ghn = save ? gates + N * GH : nullptr;
  FwdArgs<T> a{T_, B, H, H, 3, reverse, w_hh.data_ptr<T>(), nullptr, h0.data_ptr<T>(),
               in.cell ? y_scratch.data() : y.data_ptr<T>(), h_n.data_ptr<T>(), nullptr, false,
               batch_sizes(lengths, T_, B), in, xw.defined() ? xw.data_ptr<T>() : nullptr};
  a.in.row0 = R.row0;
  a.rmask = tptr<T>(o.rmask);
  a.zmask_h = tptr<T>(o.zmask);
  a.zoneout_h = T(o.z);
  a.phases = o.ln_h ? 2 : 1;  // layer norm: partial statistics, then the pass (fwd_ln)
  const PointBias<T> bias(a, data_or_null<T>(b_hh), 2);
  const T* bp = bias.data();
  const T* gain = tptr<T>(o.ln_h);
  T* xhat = save && gain ? ghn + N * H : nullptr;
  T* rstd = save && gain ? xhat + N * GH : nullptr;
  const int slots = at::get_num_threads();
  Scratch<T> parts(gain ? slots * B * 3 : 0);
  std::fill_n(parts.data(), gain ? slots * B * 3 : 0, T(0));
  forward_driver<T>(a, [&](int ph, int w, int64_t t, int64_t bs, int64_t u0, int64_t nu, const T* pre, int64_t ldp, int64_t U,
                           const T* hp, T* hdst, int64_t, const XRows<T>& xr, int64_t b0) {
    const int64_t r = R(t) + b0;  // the worker's first row of step t (layer norm: never split by rows, b0 = 0)
    FwdPoint<T> p{bs, nu, H, U, ldp, pre, xr.x, xr.rs, xr.gs, bp + u0, hp + u0, hdst + u0,
                  save ? gates + r * GH + u0 : nullptr, save ? ghn + r * H + u0 : nullptr};
    if (gain)
      fwd_ln(p, LnPoint<T>{gain + u0, xhat ? xhat + R(t) * GH + u0 : nullptr, rstd ? rstd + R(t) : nullptr,
                           parts.data(), slots, w, B, u0}, ph);
    else
      fwd_point(p);
  });
  return {y, h_n, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> seq_fwd(const at::Tensor& xw, const at::Tensor& w_hh, const OptT& b_hh,
                                                       const OptT& ln_h, const OptT& rmask, const OptT& zmask,
                                                       const at::Tensor& h0, const OptT& lengths, bool reverse,
                                                       double zoneout, bool save) {
  const Dims d = check_single_state(xw, w_hh, b_hh, h0, lengths, 3);
  const Opts o = check_opts(d, xw, ln_h, rmask, zmask, zoneout);
  return AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "gru_seq_fwd", [&] {
    return seq_fwd_impl<scalar_t>(d, xw, w_hh, b_hh, h0, lengths, reverse, save, {}, o);
  });
}

// d_xw, d_w_hh, d_b_hh, d_ln_h, (empty: the masks), d_h0
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename T>
Grads seq_bwd_impl(const Dims& d, const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& xw,
                   const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                   const c10::optional<at::Tensor>& lengths, const at::Tensor& y, const at::Tensor& ws,
                   bool reverse, const Opts& o) {
  const int64_t T_ = d.T, B = d.B, H = d.H, GH = d.GH, N = d.n();
  const StepRows R = d.rows();
  const bool pad = d.pads(lengths);
  auto new_ = [&](int64_t cols) {
    return pad ? pool_zeros(d.per_step(cols), xw.options()) : pool_empty(d.per_step(cols), xw.options());
  };
  at::Tensor d_xw = new_(GH), d_hh = new_(GH), hprev = new_(H);
  at::Tensor dh0 = grad_h_n.clone(), dh_cur = at::empty({B, H}, xw.options());
  const bool ln = o.ln_h != nullptr;
  at::Tensor d_ln = ln ? at::zeros({GH}, xw.options()) : at::empty({0}, xw.options());
  at::Tensor d_bias = ln ? at::zeros({GH}, xw.options()) : at::empty({0}, xw.options());
  if (B > 0 && T_ > 0) {
    const T* gates = ws.data_ptr<T>();
    const T* ghn = gates + N * GH;
    const T* yp = y.data_ptr<T>();
    BwdArgs<T> a{T_, B, H, H, 3, reverse, true, grad_y.data_ptr<T>(), w_hh.data_ptr<T>(), nullptr, h0.data_ptr<T>(),
                 yp, d_hh.data_ptr<T>(), dh0.data_ptr<T>(), dh_cur.data_ptr<T>(), nullptr, hprev.data_ptr<T>(),
                 batch_sizes(lengths, T_, B)};
    a.rmask = tptr<T>(o.rmask);
    a.zmask_h = tptr<T>(o.zmask);
    a.zoneout_h = T(o.z);
    a.phases = ln ? 2 : 1;
    a.row0 = R.row0;
    a.read_grad_y(grad_y);
    const int slots = at::get_num_threads();
    at::Tensor parts = at::zeros({ln ? slots * B * 2 : 0}, xw.options());
    const T* gain = tptr<T>(o.ln_h);
    const T* xhat = ln ? ghn + N * H : nullptr;
    const T* rstd = ln ? xhat + N * GH : nullptr;
    T* dg = ln ? d_ln.data_ptr<T>() : nullptr;
    const bool zon = o.zmask || o.z != 0;
    T* db = ln ? d_bias.data_ptr<T>() : nullptr;
    const T* h0p = h0.data_ptr<T>();
    T* dx = d_xw.data_ptr<T>();
    T* dr = d_hh.data_ptr<T>();
    T* dhr = dh0.data_ptr<T>();
    backward_driver<T>(a, [&](int ph, int w, int64_t t, int64_t bs, int64_t nprev, int64_t tprev, int64_t u0, int64_t nu,
                              const T* dh, int64_t ldh, int64_t b0) {
      const int64_t r = R(t) + b0;
      BwdPoint<T> p{bs, nu, H, ldh, nprev, dh, gates + r * GH + u0, ghn + r * H + u0,
                    tprev >= 0 ? yp + (R(tprev) + b0) * H + u0 : nullptr, h0p + b0 * H + u0, dx + r * GH + u0,
                    dr + r * GH + u0, dhr + b0 * H + u0, zon};
      if (ph == 0) bwd_point(p);
      if (gain)
        bwd_ln(p, LnPoint<T>{gain + u0, const_cast<T*>(xhat) + R(t) * GH + u0, nullptr, parts.data_ptr<T>(), slots,
                             w, B, u0},
               rstd + R(t), dg + u0, db + u0, ph);
    });
  }
  const at::Tensor flat = d_hh.view({N, GH});
  at::Tensor d_w_hh = weight_grad(flat, hprev.view({N, H}), d.packed() ? c10::nullopt : lengths, T_, B);
  // the bias is added after the normalization: its gradient is the normalized product's (accumulated by bwd_ln)
  at::Tensor d_b_hh = !opt_ptr(b_hh) ? at::empty({0}, xw.options()) : ln ? d_bias : flat.sum(0);
  auto none = [&] { return at::empty({0}, xw.options()); };  // the masks' (distinct tensors: outputs never alias)
  return {d_xw, d_w_hh, d_b_hh, d_ln, none(), none(), dh0};
}

Grads seq_bwd(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& xw, const at::Tensor& w_hh,
              const OptT& b_hh, const OptT& ln_h, const OptT& rmask, const OptT& zmask, const at::Tensor& h0,
              const OptT& lengths, const at::Tensor& y, const at::Tensor& ws, bool reverse, double zoneout) {
  const Dims d = check_single_state(xw, w_hh, b_hh, h0, lengths, 3);
  const Opts o = check_opts(d, xw, ln_h, rmask, zmask, zoneout);
  check_single_state_grads(d, grad_y, grad_h_n, y, xw);
  check_tensor(ws, "ws", {d.n() * ws_row(d, o)}, xw);
  return AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "gru_seq_bwd", [&] {
    return seq_bwd_impl<scalar_t>(d, grad_y, grad_h_n, xw, w_hh, b_hh, h0, lengths, y, ws, reverse, o);
  });
}

at::Tensor steps1(const OptT& m) { return opt_ptr(m) ? m->unsqueeze(0) : at::Tensor(); }  // a step's mask, T = 1

std::tuple<at::Tensor, at::Tensor> step_fwd(const at::Tensor& xw, const at::Tensor& w_hh, const OptT& b_hh,
                                            const OptT& ln_h, const OptT& rmask, const OptT& zmask, const at::Tensor& h,
                                            double zoneout, bool save) {
  TORCH_CHECK(xw.dim() == 2, "fastrnn cpp backend: xw must be [B, 3H], got ", xw.sizes());
  auto r = seq_fwd(xw.unsqueeze(0), w_hh, b_hh, ln_h, rmask, steps1(zmask), h, c10::nullopt, false, zoneout, save);
  return {std::get<1>(r), std::get<2>(r)};
}

// A cell in inference, input projection included (see InputProj): returns h'.
at::Tensor cell_fwd(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h) {
  at::Tensor xw = proj_input(x, w_ih, b_ih, 3 * (h.dim() == 2 ? h.size(1) : 0), false);
  const Dims d = check_single_state(xw, w_hh, b_hh, h, c10::nullopt, 3);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_cell_fwd", [&] {
    return std::get<1>(seq_fwd_impl<scalar_t>(d, xw, w_hh, b_hh, h, c10::nullopt, false, false,
                                              input_proj<scalar_t>(x, w_ih, b_ih, xw, true)));
  });
}

// A cell's step in training, projection inside, one autograd node (cell_train.h): the forward keeps
// r, z, n and W_hn h + b_hn (the workspace of a saving step); the backward's pointwise pass gives the
// gates' gradients on the input side (dxw) and the recurrent side (dhw: n's times r) and h's direct part.
template <typename T>
void train_bwd_point(int64_t B, int64_t H, const T* dh1, const T* ws, const T* h, T* dxw, T* dhw, T* dhd) {
  const int64_t GH = 3 * H;
  const T* ghn = ws + B * GH;
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* g = ws + b * GH;
      T* dx = dxw + b * GH;
      T* dr = dhw + b * GH;
      for (int64_t j = 0; j < H; ++j) {
        const T r = g[j], z = g[H + j], n = g[2 * H + j], d = dh1[b * H + j];
        const T dn = d * (T(1) - z) * (T(1) - n * n);
        const T dz = d * (h[b * H + j] - n) * z * (T(1) - z);
        const T drr = dn * ghn[b * H + j] * r * (T(1) - r);
        dx[j] = dr[j] = drr;
        dx[H + j] = dr[H + j] = dz;
        dx[2 * H + j] = dn;
        dr[2 * H + j] = dn * r;
        dhd[b * H + j] = d * z;
      }
    }
  });
}

struct CellTrain : torch::autograd::Function<CellTrain> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_ih,
                               const at::Tensor& b_ih, const at::Tensor& w_hh, const at::Tensor& b_hh,
                               const at::Tensor& h) {
    const bool seq = seq_form(x, {h});
    const at::Tensor x2 = rows(x), h2 = rows(h);
    at::Tensor xw = proj_input(x2, w_ih, maybe(b_ih), 3 * h2.size(1), false);
    const Dims d = check_single_state(xw, w_hh, maybe(b_hh), h2, c10::nullopt, 3);
    auto r = AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_cell_train", [&] {
      return seq_fwd_impl<scalar_t>(d, xw, w_hh, maybe(b_hh), h2, c10::nullopt, false, true,
                                    input_proj<scalar_t>(x2, w_ih, maybe(b_ih), xw, true));
    });
    ctx->save_for_backward({x, w_ih, b_ih, w_hh, b_hh, h, std::get<2>(r)});
    ctx->saved_data["seq"] = seq;
    return step_outputs({std::get<1>(r)}, seq);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list s = ctx->get_saved_variables();
    const bool seq = ctx->saved_data["seq"].toBool();
    if (at::GradMode::is_enabled() || !plain_grads(grads)) {
      return recompute_grads(in_form([](const variable_list& in) -> variable_list {
        auto gi = linear(in[kX], in[kWih], in[kBih]).chunk(3, 1);
        auto gh = linear(in[kH], in[kWhh], in[kBhh]).chunk(3, 1);
        at::Tensor r = at::sigmoid(gi[0] + gh[0]), z = at::sigmoid(gi[1] + gh[1]);
        at::Tensor n = at::tanh(gi[2] + r * gh[2]);
        return {(1 - z) * n + z * in[kH]};
      }, seq, 1), variable_list(s.begin(), s.begin() + 6), grads);
    }
    const at::Tensor h = rows(s[kH]);
    const int64_t B = h.size(0), H = h.size(1);
    const at::Tensor dh1 = state_grads(grads, seq)[0].contiguous();
    at::Tensor dxw = at::empty({B, 3 * H}, h.options()), dhw = at::empty({B, 3 * H}, h.options());
    at::Tensor dhd = at::empty({B, H}, h.options());
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "gru_cell_train_bwd", [&] {
      train_bwd_point<scalar_t>(B, H, dh1.data_ptr<scalar_t>(), s[6].data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                                dxw.data_ptr<scalar_t>(), dhw.data_ptr<scalar_t>(), dhd.data_ptr<scalar_t>());
    });
    variable_list g = step_grads(ctx, dxw, dhw, rows(s[kX]), s[kWih], s[kBih], s[kWhh], s[kBhh], h, dhd);
    seq_grads(g, seq, 1);
    return g;
  }
};

// A short sequence in inference, input projection inside (x [T, B, I]): returns (y, h_n).
std::tuple<at::Tensor, at::Tensor> chunk_fwd(const at::Tensor& x, const at::Tensor& w_ih,
                                             const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
                                             const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0, bool reverse,
                                             const OptT& lengths = c10::nullopt) {
  const int64_t GH = 3 * (h0.dim() == 2 ? h0.size(1) : 0);
  ChunkInput in = chunk_input(x, w_ih, b_ih, GH, lengths);  // packed rows with lengths
  Dims d = in.xw.defined() ? check_single_state(in.xw, w_hh, b_hh, h0, c10::nullopt, 3)
                           : check_single_state(x, in.T, in.B, GH, w_hh, b_hh, h0, lengths, 3);
  d.row0 = std::move(in.row0);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_chunk_fwd", [&] {
    auto r = seq_fwd_impl<scalar_t>(d, in.xw, w_hh, b_hh, h0, lengths, reverse, false,
                                    input_proj<scalar_t>(x, w_ih, b_ih, in.xw));
    return std::make_tuple(std::get<0>(r), std::get<1>(r));
  });
}

Grads step_bwd(const at::Tensor& grad_h, const at::Tensor& xw, const at::Tensor& w_hh, const OptT& b_hh,
               const OptT& ln_h, const OptT& rmask, const OptT& zmask, const at::Tensor& h, const at::Tensor& ws,
               double zoneout) {
  TORCH_CHECK(xw.dim() == 2, "fastrnn cpp backend: xw must be [B, 3H], got ", xw.sizes());
  // one step: the previous state is h itself, so y is never read
  auto g = seq_bwd(grad_h.unsqueeze(0), at::zeros_like(grad_h), xw.unsqueeze(0), w_hh, b_hh, ln_h, rmask,
                   steps1(zmask), h, c10::nullopt, at::zeros({1, h.size(0), h.size(1)}, h.options()), ws, false,
                   zoneout);
  std::get<0>(g) = std::get<0>(g).squeeze(0);
  return g;
}

}  // namespace

at::Tensor gru_cell_fwd(const at::Tensor& x, const at::Tensor& w_ih, const OptT& b_ih, const at::Tensor& w_hh,
                        const OptT& b_hh, const at::Tensor& h) {
  return cell_fwd(x, w_ih, b_ih, w_hh, b_hh, h);
}

std::tuple<at::Tensor, at::Tensor> gru_chunk_fwd(const at::Tensor& x, const at::Tensor& w_ih, const OptT& b_ih,
                                                 const at::Tensor& w_hh, const OptT& b_hh, const at::Tensor& h0,
                                                 bool reverse) {
  return chunk_fwd(x, w_ih, b_ih, w_hh, b_hh, h0, reverse);
}

std::tuple<at::Tensor, at::Tensor> gru_packed_fwd(const at::Tensor& x, const at::Tensor& w_ih, const OptT& b_ih,
                                                  const at::Tensor& w_hh, const OptT& b_hh, const at::Tensor& h0,
                                                  bool reverse, const at::Tensor& lengths) {
  return chunk_fwd(x, w_ih, b_ih, w_hh, b_hh, h0, reverse, lengths);
}

variable_list gru_cell_train(const at::Tensor& x, const at::Tensor& w_ih, const OptT& b_ih, const at::Tensor& w_hh,
                             const OptT& b_hh, const at::Tensor& h) {
  return CellTrain::apply(x, w_ih, or_empty(b_ih, x), w_hh, or_empty(b_hh, x), h);
}

TORCH_LIBRARY_IMPL(fastrnn_cpp, CPU, m) {
  m.impl("gru_packed_fwd", &gru_packed_fwd);
  m.impl("gru_seq_fwd", &seq_fwd);
  m.impl("gru_seq_bwd", &seq_bwd);
  m.impl("gru_step_fwd", &step_fwd);
  m.impl("gru_step_bwd", &step_bwd);
  m.impl("gru_cell_fwd", &cell_fwd);
  m.impl("gru_chunk_fwd", &gru_chunk_fwd);
}

}  // namespace fastrnn
