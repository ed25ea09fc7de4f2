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
