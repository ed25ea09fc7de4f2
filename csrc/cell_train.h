// One step of a cell in training, input projection included, as a single autograd node: the contract's
// optional <family>_cell_train, which the eager training paths call for a one-step call (a decoder's cell,
// a sequence of T = 1) where nothing intercepts ops. torch.nn's step records four to a dozen nodes, and
// fastrnn's general path two (the projection and the step op) with a Python autograd.Function between
// them; here the forward is the cell's fused inference pass with its gates kept, and the backward one
// pointwise pass and the step's products (benchmarks/NOTES.md, twenty-first session). The Function
// structs live in each cell's file; the parts they share are here (cell_train.cpp).
#pragma once

#include <torch/csrc/autograd/custom_function.h>

#include <functional>

#include "recurrence.h"

namespace fastrnn {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// the position of each input of a <family>_cell_train node: x, w_ih, b_ih, w_hh, b_hh, h (then c, LSTM)
enum TrainArg { kX = 0, kWih, kBih, kWhh, kBhh, kH };

// The gradients of a step's inputs from its gates' pre-activation gradients: dxw [B, GH] of
// x @ w_ih^T + b_ih and dhw of h @ w_hh^T + b_hh (the same tensor where the cell adds both before its
// gates); dh_direct [B, H] is the part of h's gradient that does not pass through w_hh (undefined: none).
// Returns {dx, dw_ih, db_ih, dw_hh, db_hh, dh}, each only where ctx needs it (else undefined).
variable_list step_grads(AutogradContext* ctx, const at::Tensor& dxw, const at::Tensor& dhw, const at::Tensor& x,
                         const at::Tensor& w_ih, const at::Tensor& b_ih, const at::Tensor& w_hh,
                         const at::Tensor& b_hh, const at::Tensor& h, const at::Tensor& dh_direct);

// A backward that must itself be differentiable (create_graph: a gradient penalty, a Hessian-vector
// product), or whose incoming gradients the kernels cannot read by address (batched under vmap, as
// is_grads_batched makes them; autograd's zero tensors; negated views): the step recomputed by `fwd`
// (at:: ops, recorded) on aliases of the saved inputs, and its vector-Jacobian product with `grads` taken
// by autograd with respect to those aliases, the graph kept. The aliases keep the paths between the
// inputs themselves (h from an earlier step of the same weights, x from h) out of this product: the
// outer backward follows those. Returns one gradient per input.
variable_list recompute_grads(const std::function<variable_list(const variable_list&)>& fwd,
                              const variable_list& inputs, const variable_list& grads);
// Can the kernels read these incoming gradients by address (plain tensors with storage)?
bool plain_grads(const variable_list& grads);

// An absent bias enters the node as an empty tensor (an autograd node's inputs must be defined tensors)
inline at::Tensor or_empty(const c10::optional<at::Tensor>& t, const at::Tensor& like) {
  return t.has_value() && t->defined() ? *t : at::empty({0}, like.options());
}
inline bool present(const at::Tensor& t) { return t.defined() && t.numel() > 0; }
inline c10::optional<at::Tensor> maybe(const at::Tensor& t) {
  return present(t) ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// the linear part of a recomputed step: x @ w_ih^T + b_ih and h @ w_hh^T + b_hh (recorded ops)
inline at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return present(b) ? at::addmm(b, x, w.t()) : at::mm(x, w.t());
}

// The entries (each cell's file), bound in fastrnn._C with the other direct entries: the arguments of
// the family's <family>_cell_fwd; LSTM without a projection, peepholes or coupled gates.
at::Tensor rnn_cell_train(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                          const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h,
                          c10::string_view nonlinearity);
at::Tensor gru_cell_train(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                          const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h);
std::tuple<at::Tensor, at::Tensor> lstm_cell_train(const at::Tensor& x, const at::Tensor& w_ih,
                                                   const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
                                                   const c10::optional<at::Tensor>& b_hh, const at::Tensor& h,
                                                   const at::Tensor& c);

}  // namespace fastrnn
