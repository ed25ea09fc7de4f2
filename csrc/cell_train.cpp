// The parts the cells' one-step training nodes share (cell_train.h): the step's products, and the
// recomputation that a differentiable backward takes.
#include "cell_train.h"

#include <torch/csrc/autograd/autograd.h>

namespace fastrnn {

variable_list step_grads(AutogradContext* ctx, const at::Tensor& dxw, const at::Tensor& dhw, const at::Tensor& x,
                         const at::Tensor& w_ih, const at::Tensor& b_ih, const at::Tensor& w_hh,
                         const at::Tensor& b_hh, const at::Tensor& h, const at::Tensor& dh_direct) {
  variable_list g(6);
  if (ctx->needs_input_grad(kX)) g[kX] = big_mm(dxw, false, w_ih, false);
  if (ctx->needs_input_grad(kWih)) g[kWih] = big_mm(dxw, true, x, false);
  if (present(b_ih) && ctx->needs_input_grad(kBih)) g[kBih] = dxw.sum(0);
  if (ctx->needs_input_grad(kWhh)) g[kWhh] = big_mm(dhw, true, h, false);
  if (present(b_hh) && ctx->needs_input_grad(kBhh)) {
    // the same values as b_ih's where dhw is dxw: a tensor of its own (each parameter keeps its .grad)
    g[kBhh] = dhw.is_same(dxw) && g[kBih].defined() ? g[kBih].clone() : dhw.sum(0);
  }
  if (ctx->needs_input_grad(kH))
    g[kH] = dh_direct.defined() ? at::addmm(dh_direct, dhw, w_hh) : big_mm(dhw, false, w_hh, false);
  return g;
}

bool plain_grads(const variable_list& grads) {
  for (const at::Tensor& g : grads)
    if (g.defined() && (!g.has_storage() || g.is_neg() || g._is_zerotensor())) return false;
  return true;
}

bool seq_form(const at::Tensor& x, const variable_list& state) {
  const bool seq = x.dim() == 3;
  bool ok = !seq || x.size(0) == 1;
  for (const at::Tensor& s : state) ok = ok && s.dim() == x.dim() && (!seq || s.size(0) == 1);
  if (!ok) {
    std::vector<at::IntArrayRef> shapes;
    for (const at::Tensor& s : state) shapes.push_back(s.sizes());
    TORCH_CHECK(false, "fastrnn cpp backend: a one-step node takes x and the state as [B, I] and [B, H], or [1, B, I] "
                "and [1, B, H]: got ", x.sizes(), " and ", shapes);
  }
  return seq;
}

namespace {
// t [B, H] as [1, B, H] on its storage, not a view: an output of a custom Function that is a view may not
// be changed in place, and torch.nn's outputs may
at::Tensor as_step(const at::Tensor& t) {
  at::Tensor o = at::empty({0}, t.options());
  o.set_(t.storage(), t.storage_offset(), {1, t.size(0), t.size(1)}, {t.size(0) * t.stride(0), t.stride(0), t.stride(1)});
  return o;
}
}  // namespace

variable_list step_outputs(const variable_list& state, bool seq) {
  if (!seq) return state;
  variable_list out{state[0].unsqueeze(0).clone(at::MemoryFormat::Contiguous)};
  for (const at::Tensor& s : state) out.push_back(as_step(s));
  return out;
}

variable_list state_grads(const variable_list& grads, bool seq) {
  if (!seq) return grads;
  variable_list g{rows(grads[0] + grads[1])};
  for (size_t k = 2; k < grads.size(); ++k) g.push_back(rows(grads[k]));
  return g;
}

void seq_grads(variable_list& g, bool seq, size_t n_state) {
  if (!seq) return;
  auto lead = [&](size_t k) { if (g[k].defined()) g[k] = g[k].unsqueeze(0); };
  lead(kX);
  for (size_t k = 0; k < n_state; ++k) lead(kH + k);
}

StepFn in_form(StepFn fwd, bool seq, size_t n_state) {
  if (!seq) return fwd;
  return [fwd, n_state](const variable_list& in) {
    variable_list in2(in);
    in2[kX] = rows(in[kX]);
    for (size_t k = 0; k < n_state; ++k) in2[kH + k] = rows(in[kH + k]);
    variable_list outs = fwd(in2), res{outs[0].unsqueeze(0)};
    for (const at::Tensor& o : outs) res.push_back(o.unsqueeze(0));
    return res;
  };
}

variable_list recompute_grads(const std::function<variable_list(const variable_list&)>& fwd,
                              const variable_list& saved, const variable_list& grads) {
  const bool create = at::GradMode::is_enabled();  // create_graph: the product is recorded in turn
  at::AutoGradMode grad_mode(true);                // the recomputation is recorded either way
  variable_list inputs;
  for (const at::Tensor& t : saved)
    inputs.push_back(t.defined() && t.requires_grad() ? t.view_as(t) : t);
  variable_list outs = fwd(inputs), used_outs, used_grads, wrt;
  for (size_t k = 0; k < outs.size(); ++k) {
    if (grads[k].defined()) {
      used_outs.push_back(outs[k]);
      used_grads.push_back(grads[k]);
    }
  }
  std::vector<size_t> pos;
  for (size_t k = 0; k < inputs.size(); ++k) {
    if (inputs[k].defined() && inputs[k].requires_grad()) {
      pos.push_back(k);
      wrt.push_back(inputs[k]);
    }
  }
  variable_list res(inputs.size());
  if (wrt.empty() || used_outs.empty()) return res;
  variable_list g = torch::autograd::grad(used_outs, wrt, used_grads, /*retain_graph=*/create,
                                          /*create_graph=*/create, /*allow_unused=*/true);
  for (size_t k = 0; k < pos.size(); ++k) res[pos[k]] = g[k];
  return res;
}

}  // namespace fastrnn
