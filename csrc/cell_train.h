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

// The sequence form: a one-step sequence's layer-direction enters the node as the sequence holds it, x
// [1, B, I] and each state [1, B, H], so that no select, unsqueeze or stack is recorded around the node
// (each a node of its own, and 5-10 us of backward a step at B16 H256: benchmarks/NOTES.md, twenty-second
// session). Such a node returns (y, *new state), each [1, B, H], y a tensor of its own (torch.nn's output
// and h_n share no memory); the cell form (x [B, I], states [B, H]) returns the new state. The kernels
// read 2-D views (`rows`). `seq_form` checks the shapes agree and says which form a call is.
bool seq_form(const at::Tensor& x, const variable_list& state);
inline at::Tensor rows(const at::Tensor& t) { return t.dim() == 3 ? t.view({-1, t.size(2)}) : t; }
// the node's outputs from the new state (each [B, H]): itself, or (y, *state) in [1, B, H], not views
variable_list step_outputs(const variable_list& state, bool seq);
// the new state's incoming gradients as [B, H] (the sequence form: y's added to h's)
variable_list state_grads(const variable_list& grads, bool seq);
// the node's gradients (x at kX, n_state states from kH) in the sequence form's shapes
void seq_grads(variable_list& g, bool seq, size_t n_state);
// the recomputed step `fwd` (on 2-D inputs) taking and returning the sequence form's shapes
using StepFn = std::function<variable_list(const variable_list&)>;
StepFn in_form(StepFn fwd, bool seq, size_t n_state);

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
// Each returns the node's outputs (step_outputs): the cell form's new state, or the sequence form's (y, *state).
variable_list rnn_cell_train(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                             const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h,
                             c10::string_view nonlinearity);
variable_list gru_cell_train(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                             const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h);
variable_list lstm_cell_train(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                              const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h,
                              const at::Tensor& c);

}  // namespace fastrnn
