// LSTM on the cpp backend: pointwise passes, entries (argument checks, allocation, weight gradients)
// and their registration. Gate blocks i, f, g, o (i, g, o with coupled gates, f = 1 - i); optional
// projection (w_hr) and peephole weights (w_ch rows for i, f, o). The math is stated in
// fastrnn/backends/__init__.py.
#include "cell_train.h"
#include "recurrence.h"

#include <torch/library.h>

namespace fastrnn {
namespace {

template <typename T>
struct FwdPoint {
  int64_t bs, nu, H, GH, U, ldp, ldd;
  const T* pre;   // [bs, ldp]: h @ W_hh^T of the worker's units, gate k at column k * U + j
  const T* xw;    // the step's projected input of the worker's units: [b * xs + k * xg + j] (XRows)
  int64_t xs, xg;
  const T* bias;  // b_hh + u0 (zeros when absent): [k * H + j]
  const T* wc;    // w_ch + u0 (peephole): [k * H + j]
  T* c;           // cell state + u0: [b * H + j], updated in place
  T* hdst;        // new h + u0: [b * ldd + j]
  T* gates;       // saved activated gates of step t + u0: [b * GH + k * H + j] (save only)
  T* call;        // saved c_t + u0: [b * H + j] (save only)
};

template <typename T, bool PEEP, bool COUPLED, bool SAVE>
FASTRNN_INLINE void fwd_impl(const FwdPoint<T>& p) {
  constexpr int KG = COUPLED ? 1 : 2, KO = COUPLED ? 2 : 3;
  const int64_t H = p.H, U = p.U;
  for (int64_t b = 0; b < p.bs; ++b) {
    const T* pr = p.pre + b * p.ldp;
    const T* x = p.xw + b * p.xs;
    const int64_t X = p.xg;
    T* c = p.c + b * H;
    T* h = p.hdst + b * p.ldd;
#pragma GCC ivdep
    for (int64_t j = 0; j < p.nu; ++j) {
      const T cp = c[j];
      T gi = pr[j] + x[j] + p.bias[j];
      T gg = pr[KG * U + j] + x[KG * X + j] + p.bias[KG * H + j];
      T go = pr[KO * U + j] + x[KO * X + j] + p.bias[KO * H + j];
      T gf = T(0);
      if (!COUPLED) gf = pr[U + j] + x[X + j] + p.bias[H + j];
      if (PEEP) {
        gi += p.wc[j] * cp;
        if (!COUPLED) gf += p.wc[H + j] * cp;
      }
      const T i = sigmoid_(gi);
      const T f = COUPLED ? T(1) - i : sigmoid_(gf);
      const T g = tanh_(gg);
      const T cn = f * cp + i * g;
      if (PEEP) go += p.wc[2 * H + j] * cn;
      const T o = sigmoid_(go);
      c[j] = cn;
      h[j] = o * tanh_(cn);
      if (SAVE) {
        T* s = p.gates + b * p.GH;
        s[j] = i;
        if (!COUPLED) s[H + j] = f;
        s[KG * H + j] = g;
        s[KO * H + j] = o;
        p.call[b * H + j] = cn;
      }
    }
  }
}

template <typename T>
FASTRNN_INLINE void fwd_dispatch(const FwdPoint<T>& p, bool peep, bool coupled) {
  const bool save = p.gates != nullptr;
  const int k = int(peep) * 4 + int(coupled) * 2 + int(save);
  switch (k) {
    case 0: fwd_impl<T, false, false, false>(p); break;
    case 1: fwd_impl<T, false, false, true>(p); break;
    case 2: fwd_impl<T, false, true, false>(p); break;
    case 3: fwd_impl<T, false, true, true>(p); break;
    case 4: fwd_impl<T, true, false, false>(p); break;
    case 5: fwd_impl<T, true, false, true>(p); break;
    case 6: fwd_impl<T, true, true, false>(p); break;
    default: fwd_impl<T, true, true, true>(p); break;
  }
}

FASTRNN_CLONES void fwd_point(const FwdPoint<float>& p, bool peep, bool coupled) { fwd_dispatch(p, peep, coupled); }
FASTRNN_CLONES void fwd_point(const FwdPoint<double>& p, bool peep, bool coupled) { fwd_dispatch(p, peep, coupled); }

template <typename T>
struct BwdPoint {
  int64_t bs, nu, H, GH, ldh, nprev;
  const T* dh;     // dh of the worker's units: [b * ldh + j]
  const T* gates;  // activated gates of step t + u0: [b * GH + k * H + j]
  const T* call;   // c_t + u0: [b * H + j]
  const T* cprev;  // c of the previous step + u0 (rows b < nprev): [b * H + j]
  const T* c0;     // initial c + u0 (rows b >= nprev)
  const T* wc;     // w_ch + u0 (peephole)
  T* dc;           // dc, carried between steps + u0: [b * H + j]
  T* dxw;          // gate gradients of step t + u0: [b * GH + k * H + j]
  T* dwc;          // peephole weight gradients + u0: [k * H + j], accumulated
};

template <typename T, bool PEEP, bool COUPLED>
FASTRNN_INLINE void bwd_impl(const BwdPoint<T>& p) {
  constexpr int KG = COUPLED ? 1 : 2, KO = COUPLED ? 2 : 3;
  const int64_t H = p.H;
  for (int64_t b = 0; b < p.bs; ++b) {
    const T* s = p.gates + b * p.GH;
    const T* cc = p.call + b * H;
    const T* cpv = b < p.nprev ? p.cprev + b * H : p.c0 + b * H;
    const T* dh = p.dh + b * p.ldh;
    T* dc = p.dc + b * H;
    T* dx = p.dxw + b * p.GH;
#pragma GCC ivdep
    for (int64_t j = 0; j < p.nu; ++j) {
      const T i = s[j], g = s[KG * H + j], o = s[KO * H + j];
      const T f = COUPLED ? T(1) - i : s[H + j];
      const T c = cc[j], cp = cpv[j], d = dh[j];
      const T tc = tanh_(c);
      const T d_o = d * tc * o * (T(1) - o);
      T dcv = dc[j] + d * o * (T(1) - tc * tc);
      if (PEEP) dcv += d_o * p.wc[2 * H + j];
      const T d_g = dcv * i * (T(1) - g * g);
      T d_i, d_f = T(0);
      if (COUPLED) {
        d_i = dcv * (g - cp) * i * (T(1) - i);
      } else {
        d_i = dcv * g * i * (T(1) - i);
        d_f = dcv * cp * f * (T(1) - f);
      }
      T dcp = dcv * f;
      if (PEEP) {
        dcp += d_i * p.wc[j];
        p.dwc[j] += d_i * cp;
        if (!COUPLED) {
          dcp += d_f * p.wc[H + j];
          p.dwc[H + j] += d_f * cp;
        }
        p.dwc[2 * H + j] += d_o * c;
      }
      dc[j] = dcp;
      dx[j] = d_i;
      if (!COUPLED) dx[H + j] = d_f;
      dx[KG * H + j] = d_g;
      dx[KO * H + j] = d_o;
    }
  }
}

template <typename T>
FASTRNN_INLINE void bwd_dispatch(const BwdPoint<T>& p, bool peep, bool coupled) {
  if (peep) {
    coupled ? bwd_impl<T, true, true>(p) : bwd_impl<T, true, false>(p);
  } else {
    coupled ? bwd_impl<T, false, true>(p) : bwd_impl<T, false, false>(p);
  }
}

FASTRNN_CLONES void bwd_point(const BwdPoint<float>& p, bool peep, bool coupled) { bwd_dispatch(p, peep, coupled); }
FASTRNN_CLONES void bwd_point(const BwdPoint<double>& p, bool peep, bool coupled) { bwd_dispatch(p, peep, coupled); }

// ---- the cell options: layer norm of the recurrent product and of c, zoneout of c ----------------------
// A second pointwise pair, taken only when one of these is on (the plain passes above stay as they are).
// Layer norm: a row's statistics span all its units, which the workers share out, so the pass runs in
// phases with a barrier between them (forward_driver): each worker writes its units' partial statistics
// (count, mean, sum of squared deviations) and combines everyone's in the next phase (Chan et al.'s
// pairwise update: no cancellation from sums of squares).
constexpr double LN_EPS = 1e-5;  // nn.LayerNorm's

template <typename T>
FASTRNN_INLINE void local_stats(const T* v, int64_t n, int blocks, int64_t block_stride, T* out) {
  T sum = T(0);
  for (int k = 0; k < blocks; ++k) sum += vsum(v + k * block_stride, n);
  const T mean = sum / T(n * blocks);
  T sq = T(0);
  for (int k = 0; k < blocks; ++k) sq += vsqdev(v + k * block_stride, n, mean);
  out[0] = T(n * blocks);
  out[1] = mean;
  out[2] = sq;
}

// mean and 1/sqrt(var + eps) of row b from the partial statistics of `slots` workers ([slot][B][3])
template <typename T>
FASTRNN_INLINE void combine_stats(const T* part, int slots, int64_t B, int64_t b, T& mean, T& rstd) {
  T n = T(0), m = T(0), m2 = T(0);
  for (int w = 0; w < slots; ++w) {
    const T* s = part + (w * B + b) * 3;
    if (s[0] == T(0)) continue;
    const T nn = n + s[0], d = s[1] - m;
    m += d * s[0] / nn;
    m2 += s[2] + d * d * n * s[0] / nn;
    n = nn;
  }
  mean = m;
  rstd = T(1) / std::sqrt(m2 / n + T(LN_EPS));
}

template <typename T>
struct OptPoint {
  const T* ln_h;     // gain of the recurrent product's layer norm + u0: [k * H + j], or null
  const T* ln_c;     // gain and bias of c's layer norm + u0: [j], or null
  const T* ln_cb;
  const T* zmask_c;  // zoneout keep weight of c at step t + u0: [b * zstride + j] (zoneout of c only)
  int64_t zstride;   // H: a mask; 0: one row of the probability (eval)
  T* ctil;           // the cell's new c~ (before zoneout) + u0: [b * H + j] (saved, or scratch)
  T* xhat;           // normalized recurrent product of step t + u0: [b * GH + k * H + j] (save only)
  T* stats;          // step t, per row [b * 3]: rstd of the product, mean and rstd of c~ (save only)
  T* obuf;           // scratch + u0: o of [b * H + j] between the phases
  T* part_h;         // partial statistics [slot][B][3] of the product, and of c~
  T* part_c;
  int slots, w;
  int64_t B, u0;
};

// calls f(std::bool_constant<v>{}): a runtime flag as a template argument. Everything below a
// FASTRNN_CLONES function must be inlined into it (the lambdas too): a function of its own is built for the
// baseline ISA only (SSE2, no FMA), which made the pass 2-4x slower.
template <typename F>
FASTRNN_INLINE void with_flag(bool v, F f) {
  if (v)
    f(std::true_type{});
  else
    f(std::false_type{});
}

template <typename T, bool peep, bool coupled, bool LN, bool ZC, bool SAVE>
FASTRNN_INLINE void fwd_opts_impl(const FwdPoint<T>& p, const OptPoint<T>& q, int ph) {
  constexpr int KG = coupled ? 1 : 2, KO = coupled ? 2 : 3, G = coupled ? 3 : 4;
  const int64_t H = p.H, U = p.U, GH = p.GH, nu = p.nu;
  if (LN && ph == 0) {  // the partial statistics of the worker's columns of the recurrent product
    for (int64_t b = 0; b < p.bs; ++b) local_stats(p.pre + b * p.ldp, nu, G, U, q.part_h + (q.w * q.B + b) * 3);
    return;
  }
  if (LN && ph == 2) {  // h from c~'s layer norm
    for (int64_t b = 0; b < p.bs; ++b) {
      T mc, rc;
      combine_stats(q.part_c, q.slots, q.B, b, mc, rc);
      if (SAVE && q.u0 == 0) {
        q.stats[b * 3 + 1] = mc;
        q.stats[b * 3 + 2] = rc;
      }
      const T* ct = q.ctil + b * H;
      const T* ob = q.obuf + b * H;
      T* h = p.hdst + b * p.ldd;
      for (int64_t j = 0; j < nu; ++j) h[j] = ob[j] * tanh_((ct[j] - mc) * rc * q.ln_c[j] + q.ln_cb[j]);
    }
    return;
  }
  for (int64_t b = 0; b < p.bs; ++b) {
    const T* pr = p.pre + b * p.ldp;
    const T* x = p.xw + b * p.xs;
    const int64_t X = p.xg;
    T* c = p.c + b * H;
    T* h = p.hdst + b * p.ldd;
    T* ct = q.ctil + b * H;
    T* ob = q.obuf + b * H;
    T* xh = SAVE && LN ? q.xhat + b * GH : nullptr;
    const T* zm = ZC ? q.zmask_c + b * q.zstride : nullptr;
    T mh = T(0), rh = T(1);
    if (LN) {
      combine_stats(q.part_h, q.slots, q.B, b, mh, rh);
      if (SAVE && q.u0 == 0) q.stats[b * 3] = rh;
    }
#pragma GCC ivdep
    for (int64_t j = 0; j < nu; ++j) {
      const T cp = c[j];
      T ni = pr[j], ng = pr[KG * U + j], no = pr[KO * U + j], nf = coupled ? T(0) : pr[U + j];
      if (LN) {
        ni = (ni - mh) * rh;
        ng = (ng - mh) * rh;
        no = (no - mh) * rh;
        nf = (nf - mh) * rh;
        if (SAVE) {
          xh[j] = ni;
          xh[KG * H + j] = ng;
          xh[KO * H + j] = no;
          if (!coupled) xh[H + j] = nf;
        }
        ni *= q.ln_h[j];
        ng *= q.ln_h[KG * H + j];
        no *= q.ln_h[KO * H + j];
        if (!coupled) nf *= q.ln_h[H + j];
      }
      T gi = ni + x[j] + p.bias[j];
      T gg = ng + x[KG * X + j] + p.bias[KG * H + j];
      T go = no + x[KO * X + j] + p.bias[KO * H + j];
      T gf = coupled ? T(0) : nf + x[X + j] + p.bias[H + j];
      if (peep) {
        gi += p.wc[j] * cp;
        if (!coupled) gf += p.wc[H + j] * cp;
      }
      const T i = sigmoid_(gi);
      const T f = coupled ? T(1) - i : sigmoid_(gf);
      const T g = tanh_(gg);
      const T cn = f * cp + i * g;
      if (peep) go += p.wc[2 * H + j] * cn;
      const T o = sigmoid_(go);
      const T k = ZC ? zm[j] : T(0);
      const T cnew = ZC ? k * cp + (T(1) - k) * cn : cn;
      c[j] = cnew;
      if (LN || SAVE) ct[j] = cn;
      if (LN)
        ob[j] = o;
      else
        h[j] = o * tanh_(cn);
      if (SAVE) {
        T* s = p.gates + b * GH;
        s[j] = i;
        if (!coupled) s[H + j] = f;
        s[KG * H + j] = g;
        s[KO * H + j] = o;
        p.call[b * H + j] = cnew;
      }
    }
    if (LN) local_stats(ct, nu, 1, 0, q.part_c + (q.w * q.B + b) * 3);
  }
}

// every flag a template argument, so that each combination's loops vectorize (runtime branches in them
// did not: zoneout of c cost 2.3x the plain pass, benchmarks/NOTES.md)
template <typename T>
FASTRNN_INLINE void fwd_opts_dispatch(const FwdPoint<T>& p, const OptPoint<T>& q, int ph, bool peep, bool coupled) {
  const bool ln = q.ln_h != nullptr, zc = q.zmask_c != nullptr, save = p.gates != nullptr;
  with_flag(peep, [&](auto P) FASTRNN_INLINE_LAMBDA {
    with_flag(coupled, [&](auto C) FASTRNN_INLINE_LAMBDA {
      with_flag(ln, [&](auto L) FASTRNN_INLINE_LAMBDA {
        with_flag(zc, [&](auto Z) FASTRNN_INLINE_LAMBDA {
          with_flag(save, [&](auto S) FASTRNN_INLINE_LAMBDA {
            fwd_opts_impl<T, decltype(P)::value, decltype(C)::value, decltype(L)::value, decltype(Z)::value,
                          decltype(S)::value>(p, q, ph);
          });
        });
      });
    });
  });
}

FASTRNN_CLONES void fwd_opts(const FwdPoint<float>& p, const OptPoint<float>& q, int ph, bool peep, bool coupled) {
  fwd_opts_dispatch(p, q, ph, peep, coupled);
}
FASTRNN_CLONES void fwd_opts(const FwdPoint<double>& p, const OptPoint<double>& q, int ph, bool peep, bool coupled) {
  fwd_opts_dispatch(p, q, ph, peep, coupled);
}

template <typename T>
struct OptGrad {
  const T* ln_h;     // as OptPoint (+ u0)
  const T* ln_c;
  const T* ln_cb;
  const T* zmask_c;  // step t + u0, as OptPoint
  int64_t zstride;
  const T* ctil;     // c~ of step t + u0
  const T* xhat;     // step t + u0
  const T* stats;    // step t: [b * 3]
  T* d_rec;          // the gradient of the raw recurrent product of step t + u0 (layer norm of it)
  T* d_ln_h;         // accumulated + u0: [k * H + j]
  T* d_ln_c;         // accumulated + u0: [j]
  T* d_ln_cb;
  T* buf;            // scratch + u0: [2][B][H] (c~'s normalized value, its gradient), between the phases
  T* part;           // partial sums [slot][B][2]: of c~'s layer norm (phase 0), of the product's (phase 1)
  T* part2;
  int slots, w;
  int64_t B;
};

template <typename T, bool peep, bool coupled, bool LN, bool ZC>
FASTRNN_INLINE void bwd_opts_impl(const BwdPoint<T>& p, const OptGrad<T>& q, int ph) {
  constexpr int KG = coupled ? 1 : 2, KO = coupled ? 2 : 3, G = coupled ? 3 : 4;
  const int64_t H = p.H, GH = p.GH, nu = p.nu;
  const int64_t BH = q.B * H;
  if (LN && ph == 0) {  // through h = o tanh(LN(c~)): d_o, the LN gains' gradients, partial sums
    for (int64_t b = 0; b < p.bs; ++b) {
      const T* s = p.gates + b * GH;
      const T* ct = q.ctil + b * H;
      const T* dh = p.dh + b * p.ldh;
      T* dx = p.dxw + b * GH;
      T* chat = q.buf + b * H;
      T* dchat = q.buf + BH + b * H;
      const T mc = q.stats[b * 3 + 1], rc = q.stats[b * 3 + 2];
#pragma GCC ivdep
      for (int64_t j = 0; j < nu; ++j) {
        const T o = s[KO * H + j], d = dh[j];
        const T ch = (ct[j] - mc) * rc;
        const T ta = tanh_(ch * q.ln_c[j] + q.ln_cb[j]);
        dx[KO * H + j] = d * ta * o * (T(1) - o);
        const T da = d * o * (T(1) - ta * ta);
        q.d_ln_c[j] += da * ch;
        q.d_ln_cb[j] += da;
        const T dn = da * q.ln_c[j];
        chat[j] = ch;
        dchat[j] = dn;
      }
      q.part[(q.w * q.B + b) * 2] = vsum(dchat, nu);
      q.part[(q.w * q.B + b) * 2 + 1] = vdot(dchat, chat, nu);
    }
    return;
  }
  if (LN && ph == 2) {  // through the recurrent product's layer norm: d_rec from the gate gradients
    const T inv = T(1) / T(GH);
    for (int64_t b = 0; b < p.bs; ++b) {
      T t1 = T(0), t2 = T(0);
      for (int w = 0; w < q.slots; ++w) {
        t1 += q.part2[(w * q.B + b) * 2];
        t2 += q.part2[(w * q.B + b) * 2 + 1];
      }
      const T rh = q.stats[b * 3];
      const T* dx = p.dxw + b * GH;
      const T* xh = q.xhat + b * GH;
      T* dr = q.d_rec + b * GH;
      const T m1 = t1 * inv, m2 = t2 * inv;
      for (int k = 0; k < G; ++k) {
        const T* dx_k = dx + k * H;
        const T* xh_k = xh + k * H;
        const T* g_k = q.ln_h + k * H;
        T* dg_k = q.d_ln_h + k * H;
        T* dr_k = dr + k * H;
#pragma GCC ivdep
        for (int64_t j = 0; j < nu; ++j) {
          dg_k[j] += dx_k[j] * xh_k[j];
          dr_k[j] = rh * (dx_k[j] * g_k[j] - m1 - xh_k[j] * m2);
        }
      }
    }
    return;
  }
  for (int64_t b = 0; b < p.bs; ++b) {
    const T* s = p.gates + b * GH;
    const T* ct = q.ctil + b * H;
    const T* cpv = b < p.nprev ? p.cprev + b * H : p.c0 + b * H;
    const T* dh = p.dh + b * p.ldh;
    const T* zm = ZC ? q.zmask_c + b * q.zstride : nullptr;
    T* dc = p.dc + b * H;
    T* dx = p.dxw + b * GH;
    T S1 = T(0), S2 = T(0), rc = T(0);
    if (LN) {
      for (int w = 0; w < q.slots; ++w) {
        S1 += q.part[(w * q.B + b) * 2];
        S2 += q.part[(w * q.B + b) * 2 + 1];
      }
      S1 /= T(H);
      S2 /= T(H);
      rc = q.stats[b * 3 + 2];
    }
    const T* chat = q.buf + b * H;
    const T* dchat = q.buf + BH + b * H;
    T t1 = T(0), t2 = T(0);
#pragma GCC ivdep
    for (int64_t j = 0; j < nu; ++j) {
      const T i = s[j], g = s[KG * H + j], o = s[KO * H + j];
      const T f = coupled ? T(1) - i : s[H + j];
      const T cp = cpv[j];
      T dct, d_o;
      if (LN) {
        dct = rc * (dchat[j] - S1 - chat[j] * S2);
        d_o = dx[KO * H + j];
      } else {
        const T tc = tanh_(ct[j]), d = dh[j];
        d_o = d * tc * o * (T(1) - o);
        dct = d * o * (T(1) - tc * tc);
        dx[KO * H + j] = d_o;
      }
      const T k = ZC ? zm[j] : T(0);
      T dcv = dct + (ZC ? (T(1) - k) * dc[j] : dc[j]);
      if (peep) dcv += d_o * p.wc[2 * H + j];
      const T d_g = dcv * i * (T(1) - g * g);
      T d_i, d_f = T(0);
      if (coupled) {
        d_i = dcv * (g - cp) * i * (T(1) - i);
      } else {
        d_i = dcv * g * i * (T(1) - i);
        d_f = dcv * cp * f * (T(1) - f);
      }
      T dcp = (ZC ? k * dc[j] : T(0)) + dcv * f;
      if (peep) {
        dcp += d_i * p.wc[j];
        p.dwc[j] += d_i * cp;
        if (!coupled) {
          dcp += d_f * p.wc[H + j];
          p.dwc[H + j] += d_f * cp;
        }
        p.dwc[2 * H + j] += d_o * ct[j];
      }
      dc[j] = dcp;
      dx[j] = d_i;
      if (!coupled) dx[H + j] = d_f;
      dx[KG * H + j] = d_g;
    }
    if (LN) {  // the partial sums of the product's layer norm over the worker's columns
      const T* xh = q.xhat + b * GH;
      for (int kk = 0; kk < G; ++kk) {
        t1 += vdot(dx + kk * H, q.ln_h + kk * H, nu);
        t2 += vdot3(dx + kk * H, q.ln_h + kk * H, xh + kk * H, nu);
      }
      q.part2[(q.w * q.B + b) * 2] = t1;
      q.part2[(q.w * q.B + b) * 2 + 1] = t2;
    }
  }
}

template <typename T>
FASTRNN_INLINE void bwd_opts_dispatch(const BwdPoint<T>& p, const OptGrad<T>& q, int ph, bool peep, bool coupled) {
  const bool ln = q.ln_h != nullptr, zc = q.zmask_c != nullptr;
  with_flag(peep, [&](auto P) FASTRNN_INLINE_LAMBDA {
    with_flag(coupled, [&](auto C) FASTRNN_INLINE_LAMBDA {
      with_flag(ln, [&](auto L) FASTRNN_INLINE_LAMBDA {
        with_flag(zc, [&](auto Z) FASTRNN_INLINE_LAMBDA {
          bwd_opts_impl<T, decltype(P)::value, decltype(C)::value, decltype(L)::value, decltype(Z)::value>(p, q, ph);
        });
      });
    });
  });
}

FASTRNN_CLONES void bwd_opts(const BwdPoint<float>& p, const OptGrad<float>& q, int ph, bool peep, bool coupled) {
  bwd_opts_dispatch(p, q, ph, peep, coupled);
}
FASTRNN_CLONES void bwd_opts(const BwdPoint<double>& p, const OptGrad<double>& q, int ph, bool peep, bool coupled) {
  bwd_opts_dispatch(p, q, ph, peep, coupled);
}

// The cell options of a call (null / 0 where off), checked against its dims.
struct Opts {
  const at::Tensor *ln_h, *ln_c, *ln_cb, *rmask, *zmask_h, *zmask_c;
  double zh, zc;
  bool ln() const { return ln_h || ln_c; }
  bool zone_c() const { return zmask_c || zc != 0; }
  bool cell() const { return ln() || zone_c(); }  // the options the pointwise pass applies
};

struct Dims : SeqRows {
  int64_t G, H, P, GH;
};

// xw's dims (T, B, G*H) and `like` (the tensor the others' dtype must match): xw itself, or where a chunk's
// projection is fused (no xw) its input x
Dims check_args(const at::Tensor& like, int64_t T, int64_t B, int64_t GH, const at::Tensor& w_hh,
                const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
                const c10::optional<at::Tensor>& w_ch, const at::Tensor& h0, const at::Tensor& c0,
                const c10::optional<at::Tensor>& lengths, bool coupled) {
  const at::Tensor& xw = like;
  Dims d{{T, B, {}}, coupled ? 3 : 4, 0, 0, GH};
  check_float(c0, "c0", xw);
  TORCH_CHECK(c0.dim() == 2, "fastrnn cpp backend: c0 must be [B, H], got ", c0.sizes());
  d.H = c0.size(1);
  check_float(h0, "h0", xw);
  TORCH_CHECK(h0.dim() == 2, "fastrnn cpp backend: h0 must be [B, P], got ", h0.sizes());
  d.P = h0.size(1);
  TORCH_CHECK(d.GH == d.G * d.H, "fastrnn cpp backend: xw has ", d.GH, " gate columns, expected ", d.G, " x ", d.H);
  check_shape(c0, "c0", {d.B, d.H});
  check_shape(h0, "h0", {d.B, d.P});
  check_tensor(w_hh, "w_hh", {d.GH, d.P}, xw);
  check_opt(b_hh, "b_hh", {d.GH}, xw);
  check_opt(w_hr, "w_hr", {d.P, d.H}, xw);
  TORCH_CHECK(opt_ptr(w_hr) || d.P == d.H, "fastrnn cpp backend: h0 has size ", d.P, " but c0 has ", d.H,
              " and there is no projection");
  check_opt(w_ch, "w_ch", {3, d.H}, xw);
  check_lengths(lengths, d.T, d.B);
  return d;
}

Dims check_args(const at::Tensor& xw, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
                const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& w_ch, const at::Tensor& h0,
                const at::Tensor& c0, const c10::optional<at::Tensor>& lengths, bool coupled) {
  SeqShape s = seq_shape(xw, lengths, coupled ? 3 : 4);
  Dims d = check_args(xw, s.T, s.B, s.GH, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, coupled);
  d.row0 = std::move(s.row0);
  return d;
}

using OptT = c10::optional<at::Tensor>;

Opts check_opts(const Dims& d, const at::Tensor& xw, const OptT& ln_h, const OptT& ln_c, const OptT& ln_cb,
                const OptT& rmask, const OptT& zmask_h, const OptT& zmask_c, double zh, double zc) {
  check_opt(ln_h, "ln_h", {d.GH}, xw);
  check_opt(ln_c, "ln_c", {d.H}, xw);
  check_opt(ln_cb, "ln_c_bias", {d.H}, xw);
  TORCH_CHECK(bool(opt_ptr(ln_c)) == bool(opt_ptr(ln_cb)) && bool(opt_ptr(ln_c)) == bool(opt_ptr(ln_h)),
              "fastrnn cpp backend: the layer norm tensors ln_h, ln_c and ln_c_bias go together (all or none)");
  check_opt(rmask, "rmask", {d.B, d.P}, xw);
  check_opt(zmask_h, "zmask_h", {d.T, d.B, d.P}, xw);
  check_opt(zmask_c, "zmask_c", {d.T, d.B, d.H}, xw);
  TORCH_CHECK(!d.packed() || (!opt_ptr(zmask_h) && !opt_ptr(zmask_c)), "fastrnn cpp backend: the zoneout masks ",
              "[T, B, *] need xw as [T, B, G*H], not a packed sequence's rows");
  return Opts{opt_ptr(ln_h), opt_ptr(ln_c), opt_ptr(ln_cb), opt_ptr(rmask), opt_ptr(zmask_h), opt_ptr(zmask_c), zh, zc};
}

const Opts NO_OPTS{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0.0, 0.0};

// the workspace of a saving forward, per (t, b): gates GH, c H, then h_full H (projection), c~ H (zoneout
// of c or layer norm), the normalized recurrent product GH and 3 statistics (layer norm)
int64_t ws_row(const Dims& d, bool proj, const Opts& o) {
  return d.GH + d.H + (proj ? d.H : 0) + (o.cell() ? d.H : 0) + (o.ln() ? d.GH + 3 : 0);
}

template <typename T> const T* tptr(const at::Tensor* t) { return t ? t->data_ptr<T>() : nullptr; }

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> seq_fwd_impl(
    const Dims& d, const at::Tensor& xw, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
    const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& w_ch, const at::Tensor& h0,
    const at::Tensor& c0, const c10::optional<at::Tensor>& lengths, bool reverse, bool coupled, bool save,
    const InputProj<T>& in = {}, const Opts& o = NO_OPTS) {
  const int64_t T_ = d.T, B = d.B, H = d.H, P = d.P, GH = d.GH;
  const bool proj = opt_ptr(w_hr);
  // packed rows (an inference entry's x, or a training call's xw) or [T, B, *]; N: the per-step buffers' rows
  const StepRows R = d.rows();
  const int64_t N = d.n();
  const bool pad = d.pads(lengths);
  Scratch<T> y_scratch(in.cell ? T_ * B * P : 0);
  at::Tensor y = in.cell ? at::Tensor()
                 : d.packed() ? pool_empty({N, P}, h0.options())
                 : pad ? pool_zeros({T_, B, P}, h0.options()) : pool_empty({T_, B, P}, h0.options());
  at::Tensor h_n = at::empty({B, P}, h0.options()), c_n = c0.clone();
  const int64_t ws_numel = save ? N * ws_row(d, proj, o) : 0;
  at::Tensor ws = pad ? pool_zeros({ws_numel}, h0.options()) : pool_empty({ws_numel}, h0.options());
  Scratch<T> hfull_scratch(proj && !save ? B * H : 0);
  if (B == 0 || T_ == 0) return {y, h_n, c_n, ws};
  T* wsp = ws.data_ptr<T>();
  T* gates = save ? wsp : nullptr;
  T* call = save ? wsp + N * GH : nullptr;
  FwdArgs<T> a{T_, B, H, P, d.G, reverse, w_hh.data_ptr<T>(), data_or_null<T>(w_hr), h0.data_ptr<T>(),
               in.cell ? y_scratch.data() : y.data_ptr<T>(), h_n.data_ptr<T>(),
               proj ? (save ? wsp + N * (GH + H) : hfull_scratch.data()) : nullptr, save,
               batch_sizes(lengths, T_, B), in, xw.defined() ? xw.data_ptr<T>() : nullptr};
  a.in.row0 = R.row0;
  a.rmask = tptr<T>(o.rmask);
  a.zmask_h = tptr<T>(o.zmask_h);
  a.zoneout_h = T(o.zh);
  a.phases = o.ln() ? 3 : 1;  // layer norm: statistics of the product, then of c~ (fwd_opts)
  const PointBias<T> bias(a, data_or_null<T>(b_hh), d.G);
  const T* bp = bias.data();
  const T* wc = data_or_null<T>(w_ch);
  T* c = c_n.data_ptr<T>();
  // the cell options' slots of the workspace (or scratch when nothing is saved: c~ of one step), o between
  // the phases, the workers' partial statistics
  const int64_t off_ctil = N * (GH + H + (proj ? H : 0));
  const int slots = at::get_num_threads();
  Scratch<T> scratch(o.cell() ? 2 * B * H : 0), parts(o.ln() ? 2 * slots * B * 3 : 0);
  std::fill_n(parts.data(), o.ln() ? 2 * slots * B * 3 : 0, T(0));
  T* ctil = !o.cell() ? nullptr : save ? wsp + off_ctil : scratch.data();
  T* xhat = save && o.ln() ? wsp + off_ctil + N * H : nullptr;
  T* stats = save && o.ln() ? xhat + N * GH : nullptr;
  T* obuf = o.cell() ? scratch.data() + B * H : nullptr;
  T* part = o.ln() ? parts.data() : nullptr;
  // zoneout of c: the step's mask, or in eval one row of its probability (stride 0)
  Scratch<T> zrow(!o.zmask_c && o.zc != 0 ? H : 0);
  if (!o.zmask_c && o.zc != 0) std::fill_n(zrow.data(), H, T(o.zc));
  const T* zc = o.zmask_c ? tptr<T>(o.zmask_c) : o.zc != 0 ? zrow.data() : nullptr;
  const int64_t zstride = o.zmask_c ? H : 0, zstep = o.zmask_c ? B * H : 0;
  const T* lnh = tptr<T>(o.ln_h), *lnc = tptr<T>(o.ln_c), *lncb = tptr<T>(o.ln_cb);
  a.rows_ok = !o.cell();  // (the options' pass offsets nothing by b0)
  forward_driver<T>(a, [&](int ph, int w, int64_t t, int64_t bs, int64_t u0, int64_t nu, const T* pre, int64_t ldp,
                           int64_t U, const T*, T* hdst, int64_t ldd, const XRows<T>& xr, int64_t b0) {
    const int64_t r = R(t) + b0;  // the worker's first row of step t
    FwdPoint<T> p{bs, nu, H, GH, U, ldp, ldd, pre, xr.x, xr.rs, xr.gs, bp + u0, wc ? wc + u0 : nullptr, c + b0 * H + u0,
                  hdst + u0, save ? gates + r * GH + u0 : nullptr, save ? call + r * H + u0 : nullptr};
    if (!o.cell()) return fwd_point(p, wc != nullptr, coupled);
    const int64_t st = save ? R(t) : 0;  // scratch: one step's slot
    OptPoint<T> q{lnh ? lnh + u0 : nullptr, lnc ? lnc + u0 : nullptr, lncb ? lncb + u0 : nullptr,
                  zc ? zc + t * zstep + u0 : nullptr, zstride, ctil + st * H + u0,
                  xhat ? xhat + R(t) * GH + u0 : nullptr, stats ? stats + R(t) * 3 : nullptr, obuf + u0, part,
                  part ? part + slots * B * 3 : nullptr, slots, w, B, u0};
    fwd_opts(p, q, ph, wc != nullptr, coupled);
  });
  return {y, h_n, c_n, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> seq_fwd(
    const at::Tensor& xw, const at::Tensor& w_hh, const OptT& b_hh, const OptT& w_hr, const OptT& w_ch,
    const OptT& ln_h, const OptT& ln_c, const OptT& ln_cb, const OptT& rmask, const OptT& zmask_h,
    const OptT& zmask_c, const at::Tensor& h0, const at::Tensor& c0, const OptT& lengths, bool reverse, bool coupled,
    double zoneout_h, double zoneout_c, bool save) {
  const Dims d = check_args(xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, coupled);
  const Opts o = check_opts(d, xw, ln_h, ln_c, ln_cb, rmask, zmask_h, zmask_c, zoneout_h, zoneout_c);
  return AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "lstm_seq_fwd", [&] {
    return seq_fwd_impl<scalar_t>(d, xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, reverse, coupled, save, {}, o);
  });
}

// d_xw, the weights' (w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_c_bias; the three masks get empty tensors), d_h0, d_c0
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename T>
Grads seq_bwd_impl(const Dims& d, const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                   const at::Tensor& xw, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
                   const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& w_ch, const at::Tensor& h0,
                   const at::Tensor& c0, const c10::optional<at::Tensor>& lengths, const at::Tensor& y,
                   const at::Tensor& ws, bool reverse, bool coupled, const Opts& o) {
  const int64_t T_ = d.T, B = d.B, H = d.H, P = d.P, GH = d.GH, N = d.n();
  const bool proj = opt_ptr(w_hr);
  const StepRows R = d.rows();
  const bool pad = d.pads(lengths);
  auto new_ = [&](int64_t cols) {
    return pad ? pool_zeros(d.per_step(cols), xw.options()) : pool_empty(d.per_step(cols), xw.options());
  };
  at::Tensor d_xw = new_(GH), hprev = new_(P);
  at::Tensor dh_proj = proj ? new_(P) : at::Tensor();
  at::Tensor dh0 = grad_h_n.clone(), dc0 = grad_c_n.clone();
  at::Tensor dh_cur = at::empty({B, P}, xw.options());
  at::Tensor d_w_ch = opt_ptr(w_ch) ? at::zeros({3, H}, xw.options()) : at::empty({0}, xw.options());
  auto zeros_or_empty = [&](const at::Tensor* t, int64_t n) {
    return t ? at::zeros({n}, xw.options()) : at::empty({0}, xw.options());
  };
  at::Tensor d_ln_h = zeros_or_empty(o.ln_h, GH), d_ln_c = zeros_or_empty(o.ln_c, H), d_ln_cb = zeros_or_empty(o.ln_cb, H);
  // with layer norm of the recurrent product its gradient (for d W_hh and dh) differs from the gates'
  at::Tensor d_rec = o.ln_h ? new_(GH) : d_xw;
  if (B > 0 && T_ > 0) {
    const T* wsp = ws.data_ptr<T>();
    const T* gates = wsp;
    const T* call = wsp + N * GH;
    const T* yp = y.defined() && y.numel() ? y.data_ptr<T>() : nullptr;
    BwdArgs<T> a{T_, B, H, P, d.G, reverse, false, grad_y.data_ptr<T>(), w_hh.data_ptr<T>(), data_or_null<T>(w_hr),
                 h0.data_ptr<T>(), yp, d_rec.data_ptr<T>(), dh0.data_ptr<T>(), dh_cur.data_ptr<T>(),
                 proj ? dh_proj.data_ptr<T>() : nullptr, hprev.data_ptr<T>(), batch_sizes(lengths, T_, B)};
    a.rmask = tptr<T>(o.rmask);
    a.zmask_h = tptr<T>(o.zmask_h);
    a.zoneout_h = T(o.zh);
    a.phases = o.ln() ? 3 : 1;  // layer norm: c~'s, then the product's (bwd_opts)
    a.row0 = R.row0;
    a.read_grad_y(grad_y);
    const int64_t off_ctil = N * (GH + H + (proj ? H : 0));
    const T* ctil = o.cell() ? wsp + off_ctil : nullptr;
    const T* xhat = o.ln() ? wsp + off_ctil + N * H : nullptr;
    const T* stats = o.ln() ? xhat + N * GH : nullptr;
    at::Tensor zrow = !o.zmask_c && o.zc != 0 ? at::full({H}, o.zc, xw.options()) : at::Tensor();
    const T* zc = o.zmask_c ? tptr<T>(o.zmask_c) : zrow.defined() ? zrow.data_ptr<T>() : nullptr;
    const int64_t zstride = o.zmask_c ? H : 0, zstep = o.zmask_c ? B * H : 0;
    const int slots = at::get_num_threads();
    at::Tensor buf = at::empty({o.ln() ? 2 * B * H : 0}, xw.options());
    at::Tensor parts = at::zeros({o.ln() ? 2 * slots * B * 2 : 0}, xw.options());
    T* part = o.ln() ? parts.data_ptr<T>() : nullptr;
    T* bufp = buf.data_ptr<T>();
    const T* lnh = tptr<T>(o.ln_h), *lnc = tptr<T>(o.ln_c), *lncb = tptr<T>(o.ln_cb);
    T* dlnh = o.ln_h ? d_ln_h.data_ptr<T>() : nullptr, *dlnc = o.ln_c ? d_ln_c.data_ptr<T>() : nullptr;
    T* dlncb = o.ln_cb ? d_ln_cb.data_ptr<T>() : nullptr;
    T* dr = d_rec.data_ptr<T>();
    const T* wc = data_or_null<T>(w_ch);
    T* dwc = opt_ptr(w_ch) ? d_w_ch.data_ptr<T>() : nullptr;
    const T* c0p = c0.data_ptr<T>();
    T* dc = dc0.data_ptr<T>();
    T* dx = d_xw.data_ptr<T>();
    a.rows_ok = !o.cell() && !dwc;  // the peephole weights' gradients: each worker's units accumulate their own
    backward_driver<T>(a, [&](int ph, int w, int64_t t, int64_t bs, int64_t nprev, int64_t tprev, int64_t u0, int64_t nu,
                              const T* dh, int64_t ldh, int64_t b0) {
      const int64_t r = R(t) + b0;
      BwdPoint<T> p{bs, nu, H, GH, ldh, nprev, dh, gates + r * GH + u0, call + r * H + u0,
                    tprev >= 0 ? call + (R(tprev) + b0) * H + u0 : nullptr, c0p + b0 * H + u0, wc ? wc + u0 : nullptr,
                    dc + b0 * H + u0, dx + r * GH + u0, dwc ? dwc + u0 : nullptr};
      if (!o.cell()) return bwd_point(p, wc != nullptr, coupled);
      OptGrad<T> q{lnh ? lnh + u0 : nullptr, lnc ? lnc + u0 : nullptr, lncb ? lncb + u0 : nullptr,
                   zc ? zc + t * zstep + u0 : nullptr, zstride, ctil + R(t) * H + u0,
                   xhat ? xhat + R(t) * GH + u0 : nullptr, stats ? stats + R(t) * 3 : nullptr, dr + R(t) * GH + u0,
                   dlnh ? dlnh + u0 : nullptr, dlnc ? dlnc + u0 : nullptr, dlncb ? dlncb + u0 : nullptr,
                   o.ln() ? bufp + u0 : nullptr, part, part ? part + slots * B * 2 : nullptr, slots, w, B};
      bwd_opts(p, q, ph, wc != nullptr, coupled);
    });
  }
  const at::Tensor flat = d_xw.view({N, GH});
  const c10::optional<at::Tensor> ragged = d.packed() ? c10::nullopt : lengths;  // packed rows: no padding rows
  at::Tensor d_w_hh = weight_grad(d_rec.view({N, GH}), hprev.view({N, P}), ragged, T_, B);
  at::Tensor d_b_hh = opt_ptr(b_hh) ? flat.sum(0) : at::empty({0}, xw.options());
  at::Tensor d_w_hr = at::empty({0}, xw.options());
  if (proj) {
    at::Tensor hfull = ws.narrow(0, N * (GH + H), N * H).view({N, H});
    d_w_hr = weight_grad(dh_proj.view({N, P}), hfull, ragged, T_, B);
  }
  auto none = [&] { return at::empty({0}, xw.options()); };  // the masks' (distinct tensors: outputs never alias)
  return {d_xw, d_w_hh, d_b_hh, d_w_hr, d_w_ch, d_ln_h, d_ln_c, d_ln_cb, none(), none(), none(), dh0, dc0};
}

Grads seq_bwd(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& xw,
              const at::Tensor& w_hh, const OptT& b_hh, const OptT& w_hr, const OptT& w_ch, const OptT& ln_h,
              const OptT& ln_c, const OptT& ln_cb, const OptT& rmask, const OptT& zmask_h, const OptT& zmask_c,
              const at::Tensor& h0, const at::Tensor& c0, const OptT& lengths, const at::Tensor& y, const at::Tensor& ws,
              bool reverse, bool coupled, double zoneout_h, double zoneout_c) {
  const Dims d = check_args(xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, coupled);
  const Opts o = check_opts(d, xw, ln_h, ln_c, ln_cb, rmask, zmask_h, zmask_c, zoneout_h, zoneout_c);
  check_strided(grad_y, "grad_y", d.per_step(d.P), xw);
  check_tensor(grad_h_n, "grad_h_n", {d.B, d.P}, xw);
  check_tensor(grad_c_n, "grad_c_n", {d.B, d.H}, xw);
  check_tensor(y, "y", d.per_step(d.P), xw);
  check_tensor(ws, "ws", {d.n() * ws_row(d, opt_ptr(w_hr), o)}, xw);
  return AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "lstm_seq_bwd", [&] {
    return seq_bwd_impl<scalar_t>(d, grad_y, grad_h_n, grad_c_n, xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, y, ws,
                                  reverse, coupled, o);
  });
}

at::Tensor steps1(const OptT& m) { return opt_ptr(m) ? m->unsqueeze(0) : at::Tensor(); }  // a step's mask, T = 1

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_fwd(const at::Tensor& xw, const at::Tensor& w_hh, const OptT& b_hh,
                                                        const OptT& w_hr, const OptT& w_ch, const OptT& ln_h,
                                                        const OptT& ln_c, const OptT& ln_cb, const OptT& rmask,
                                                        const OptT& zmask_h, const OptT& zmask_c, const at::Tensor& h,
                                                        const at::Tensor& c, bool coupled, double zoneout_h,
                                                        double zoneout_c, bool save) {
  TORCH_CHECK(xw.dim() == 2, "fastrnn cpp backend: xw must be [B, G*H], got ", xw.sizes());
  auto r = seq_fwd(xw.unsqueeze(0), w_hh, b_hh, w_hr, w_ch, ln_h, ln_c, ln_cb, rmask, steps1(zmask_h), steps1(zmask_c),
                   h, c, c10::nullopt, false, coupled, zoneout_h, zoneout_c, save);
  return {std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

// A cell in inference, input projection included (see InputProj): returns (h', c').
std::tuple<at::Tensor, at::Tensor> cell_fwd(const at::Tensor& x, const at::Tensor& w_ih,
                                            const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
                                            const c10::optional<at::Tensor>& b_hh,
                                            const c10::optional<at::Tensor>& w_hr,
                                            const c10::optional<at::Tensor>& w_ch, const at::Tensor& h,
                                            const at::Tensor& c, bool coupled) {
  at::Tensor xw = proj_input(x, w_ih, b_ih, (coupled ? 3 : 4) * (c.dim() == 2 ? c.size(1) : 0), false);
  const Dims d = check_args(xw, w_hh, b_hh, w_hr, w_ch, h, c, c10::nullopt, coupled);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_cell_fwd", [&] {
    auto r = seq_fwd_impl<scalar_t>(d, xw, w_hh, b_hh, w_hr, w_ch, h, c, c10::nullopt, false, coupled, false,
                                    input_proj<scalar_t>(x, w_ih, b_ih, xw, true));
    return std::make_tuple(std::get<1>(r), std::get<2>(r));
  });
}

// A cell's step in training, projection inside, one autograd node (cell_train.h), for the plain cell (no
// projection, peepholes or coupled gates): the forward keeps the gates i, f, g, o and c' (the workspace of
// a saving step); the backward's pointwise pass gives the gates' gradients (one tensor: x's and h's
// products are added before the gates) and c's.
template <typename T>
void train_bwd_point(int64_t B, int64_t H, const T* dh1, const T* dc1, const T* ws, const T* c, T* dg, T* dc) {
  const int64_t GH = 4 * H;
  const T* c1 = ws + B * GH;
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* g = ws + b * GH;
      T* d = dg + b * GH;
      for (int64_t j = 0; j < H; ++j) {
        const int64_t k = b * H + j;
        const T i = g[j], f = g[H + j], gg = g[2 * H + j], o = g[3 * H + j];
        const T tc = std::tanh(c1[k]);
        const T dct = dc1[k] + dh1[k] * o * (T(1) - tc * tc);
        d[j] = dct * gg * i * (T(1) - i);
        d[H + j] = dct * c[k] * f * (T(1) - f);
        d[2 * H + j] = dct * i * (T(1) - gg * gg);
        d[3 * H + j] = dh1[k] * tc * o * (T(1) - o);
        dc[k] = dct * f;
      }
    }
  });
}

struct CellTrain : torch::autograd::Function<CellTrain> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_ih,
                               const at::Tensor& b_ih, const at::Tensor& w_hh, const at::Tensor& b_hh,
                               const at::Tensor& h, const at::Tensor& c) {
    const bool seq = seq_form(x, {h, c});
    const at::Tensor x2 = rows(x), h2 = rows(h), c2 = rows(c);
    at::Tensor xw = proj_input(x2, w_ih, maybe(b_ih), 4 * c2.size(1), false);
    const Dims d = check_args(xw, w_hh, maybe(b_hh), c10::nullopt, c10::nullopt, h2, c2, c10::nullopt, false);
    auto r = AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_cell_train", [&] {
      return seq_fwd_impl<scalar_t>(d, xw, w_hh, maybe(b_hh), c10::nullopt, c10::nullopt, h2, c2, c10::nullopt, false,
                                    false, true, input_proj<scalar_t>(x2, w_ih, maybe(b_ih), xw, true));
    });
    ctx->save_for_backward({x, w_ih, b_ih, w_hh, b_hh, h, c, std::get<3>(r)});
    ctx->saved_data["seq"] = seq;
    return step_outputs({std::get<1>(r), std::get<2>(r)}, seq);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list s = ctx->get_saved_variables();
    const bool seq = ctx->saved_data["seq"].toBool();
    if (at::GradMode::is_enabled() || !plain_grads(grads)) {
      return recompute_grads(in_form([](const variable_list& in) -> variable_list {
        auto gates = (linear(in[kX], in[kWih], in[kBih]) + linear(in[kH], in[kWhh], in[kBhh])).chunk(4, 1);
        at::Tensor c1 = at::sigmoid(gates[1]) * in[kH + 1] + at::sigmoid(gates[0]) * at::tanh(gates[2]);
        return {at::sigmoid(gates[3]) * at::tanh(c1), c1};
      }, seq, 2), variable_list(s.begin(), s.begin() + 7), grads);
    }
    const at::Tensor c = rows(s[kH + 1]);
    const int64_t B = c.size(0), H = c.size(1);
    const variable_list sg = state_grads(grads, seq);
    const at::Tensor dh1 = sg[0].contiguous(), dc1 = sg[1].contiguous();
    at::Tensor dg = at::empty({B, 4 * H}, c.options()), dc = at::empty({B, H}, c.options());
    AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "lstm_cell_train_bwd", [&] {
      train_bwd_point<scalar_t>(B, H, dh1.data_ptr<scalar_t>(), dc1.data_ptr<scalar_t>(), s[7].data_ptr<scalar_t>(),
                                c.data_ptr<scalar_t>(), dg.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>());
    });
    variable_list g = step_grads(ctx, dg, dg, rows(s[kX]), s[kWih], s[kBih], s[kWhh], s[kBhh], rows(s[kH]),
                                 at::Tensor());
    g.push_back(ctx->needs_input_grad(kH + 1) ? dc : at::Tensor());
    seq_grads(g, seq, 2);
    return g;
  }
};

// A short sequence in inference, input projection inside (x [T, B, I]): returns (y, h_n, c_n).
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_fwd(
    const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
    const c10::optional<at::Tensor>& w_ch, const at::Tensor& h0, const at::Tensor& c0, bool reverse, bool coupled,
    const OptT& lengths = c10::nullopt) {
  const int64_t GH = (coupled ? 3 : 4) * (c0.dim() == 2 ? c0.size(1) : 0);
  ChunkInput in = chunk_input(x, w_ih, b_ih, GH, lengths);  // packed rows with lengths
  Dims d = in.xw.defined() ? check_args(in.xw, w_hh, b_hh, w_hr, w_ch, h0, c0, c10::nullopt, coupled)
                           : check_args(x, in.T, in.B, GH, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, coupled);
  d.row0 = std::move(in.row0);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_chunk_fwd", [&] {
    auto r = seq_fwd_impl<scalar_t>(d, in.xw, w_hh, b_hh, w_hr, w_ch, h0, c0, lengths, reverse, coupled, false,
                                    input_proj<scalar_t>(x, w_ih, b_ih, in.xw));
    return std::make_tuple(std::get<0>(r), std::get<1>(r), std::get<2>(r));
  });
}

Grads step_bwd(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& xw, const at::Tensor& w_hh,
               const OptT& b_hh, const OptT& w_hr, const OptT& w_ch, const OptT& ln_h, const OptT& ln_c,
               const OptT& ln_cb, const OptT& rmask, const OptT& zmask_h, const OptT& zmask_c, const at::Tensor& h,
               const at::Tensor& c, const at::Tensor& ws, bool coupled, double zoneout_h, double zoneout_c) {
  TORCH_CHECK(xw.dim() == 2, "fastrnn cpp backend: xw must be [B, G*H], got ", xw.sizes());
  // one step: the previous state is (h, c) itself, so y is never read; grad_h enters as grad_y
  auto g = seq_bwd(grad_h.unsqueeze(0), at::zeros_like(grad_h), grad_c, xw.unsqueeze(0), w_hh, b_hh, w_hr, w_ch, ln_h,
                   ln_c, ln_cb, rmask, steps1(zmask_h), steps1(zmask_c), h, c, c10::nullopt,
                   at::zeros({1, h.size(0), h.size(1)}, h.options()), ws, false, coupled, zoneout_h, zoneout_c);
  std::get<0>(g) = std::get<0>(g).squeeze(0);
  return g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lstm_cell_fwd(const at::Tensor& x, const at::Tensor& w_ih, const OptT& b_ih,
                                                 const at::Tensor& w_hh, const OptT& b_hh, const OptT& w_hr,
                                                 const OptT& w_ch, const at::Tensor& h, const at::Tensor& c,
                                                 bool coupled) {
  return cell_fwd(x, w_ih, b_ih, w_hh, b_hh, w_hr, w_ch, h, c, coupled);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_chunk_fwd(const at::Tensor& x, const at::Tensor& w_ih,
                                                              const OptT& b_ih, const at::Tensor& w_hh,
                                                              const OptT& b_hh, const OptT& w_hr, const OptT& w_ch,
                                                              const at::Tensor& h0, const at::Tensor& c0, bool reverse,
                                                              bool coupled) {
  return chunk_fwd(x, w_ih, b_ih, w_hh, b_hh, w_hr, w_ch, h0, c0, reverse, coupled);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_packed_fwd(const at::Tensor& x, const at::Tensor& w_ih,
                                                               const OptT& b_ih, const at::Tensor& w_hh,
                                                               const OptT& b_hh, const OptT& w_hr, const OptT& w_ch,
                                                               const at::Tensor& h0, const at::Tensor& c0,
                                                               bool reverse, bool coupled, const at::Tensor& lengths) {
  return chunk_fwd(x, w_ih, b_ih, w_hh, b_hh, w_hr, w_ch, h0, c0, reverse, coupled, lengths);
}

variable_list lstm_cell_train(const at::Tensor& x, const at::Tensor& w_ih, const OptT& b_ih, const at::Tensor& w_hh,
                              const OptT& b_hh, const at::Tensor& h, const at::Tensor& c) {
  return CellTrain::apply(x, w_ih, or_empty(b_ih, x), w_hh, or_empty(b_hh, x), h, c);
}

TORCH_LIBRARY_IMPL(fastrnn_cpp, CPU, m) {
  m.impl("lstm_packed_fwd", &lstm_packed_fwd);
  m.impl("lstm_seq_fwd", &seq_fwd);
  m.impl("lstm_seq_bwd", &seq_bwd);
  m.impl("lstm_step_fwd", &step_fwd);
  m.impl("lstm_step_bwd", &step_bwd);
  m.impl("lstm_cell_fwd", &cell_fwd);
  m.impl("lstm_chunk_fwd", &lstm_chunk_fwd);
}

}  // namespace fastrnn
