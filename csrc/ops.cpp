// The schemas of the cpp backend's ops, defined once. Each cell file registers its implementations
// (TORCH_LIBRARY_IMPL) beside its kernels. The argument lists are those of the backend contract in
// fastrnn/backends/__init__.py, without the trailing backend name; <f>_cell_fwd and <f>_chunk_fwd are
// the contract's optional inference entries with the input projection inside the call.
#include <torch/extension.h>
#include <torch/library.h>

#include "cell_train.h"
#include "recurrence.h"

TORCH_LIBRARY(fastrnn_cpp, m) {
#define LSTM_W "Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor? w_ch, Tensor? ln_h, Tensor? ln_c, Tensor? ln_c_bias, " \
               "Tensor? rmask, Tensor? zmask_h, Tensor? zmask_c, "
#define LSTM_O "bool coupled, float zoneout_h, float zoneout_c"
#define LSTM_G "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
  m.def("lstm_seq_fwd(Tensor xw, " LSTM_W "Tensor h0, Tensor c0, Tensor? lengths, bool reverse, " LSTM_O
        ", bool save) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_seq_bwd(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor xw, " LSTM_W "Tensor h0, Tensor c0, "
        "Tensor? lengths, Tensor y, Tensor ws, bool reverse, " LSTM_O ") -> " LSTM_G);
  m.def("lstm_step_fwd(Tensor xw, " LSTM_W "Tensor h, Tensor c, " LSTM_O ", bool save) -> (Tensor, Tensor, Tensor)");
  m.def("lstm_step_bwd(Tensor grad_h, Tensor grad_c, Tensor xw, " LSTM_W "Tensor h, Tensor c, Tensor ws, " LSTM_O
        ") -> " LSTM_G);
#define GRU_W "Tensor w_hh, Tensor? b_hh, Tensor? ln_h, Tensor? rmask, Tensor? zmask, "
#define GRU_G "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
  m.def("gru_seq_fwd(Tensor xw, " GRU_W "Tensor h0, Tensor? lengths, bool reverse, float zoneout, bool save) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("gru_seq_bwd(Tensor grad_y, Tensor grad_h_n, Tensor xw, " GRU_W "Tensor h0, Tensor? lengths, Tensor y, "
        "Tensor ws, bool reverse, float zoneout) -> " GRU_G);
  m.def("gru_step_fwd(Tensor xw, " GRU_W "Tensor h, float zoneout, bool save) -> (Tensor, Tensor)");
  m.def("gru_step_bwd(Tensor grad_h, Tensor xw, " GRU_W "Tensor h, Tensor ws, float zoneout) -> " GRU_G);
  m.def("rnn_seq_fwd(Tensor xw, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? lengths, bool reverse, "
        "str nonlinearity, bool save) -> (Tensor, Tensor, Tensor)");
  m.def("rnn_seq_bwd(Tensor grad_y, Tensor grad_h_n, Tensor xw, Tensor w_hh, Tensor? b_hh, Tensor h0, "
        "Tensor? lengths, Tensor y, Tensor ws, bool reverse, str nonlinearity) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rnn_step_fwd(Tensor xw, Tensor w_hh, Tensor? b_hh, Tensor h, str nonlinearity, bool save) "
        "-> (Tensor, Tensor)");
  m.def("rnn_step_bwd(Tensor grad_h, Tensor xw, Tensor w_hh, Tensor? b_hh, Tensor h, Tensor ws, "
        "str nonlinearity) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_cell_fwd(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor? w_ch, "
        "Tensor h, Tensor c, bool coupled) -> (Tensor, Tensor)");
  m.def("gru_cell_fwd(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h) -> Tensor");
  m.def("rnn_cell_fwd(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h, "
        "str nonlinearity) -> Tensor");
  // a short sequence in inference, input projection inside the call (x [T, B, I]): (y, *state_n)
  m.def("lstm_chunk_fwd(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, "
        "Tensor? w_ch, Tensor h0, Tensor c0, bool reverse, bool coupled) -> (Tensor, Tensor, Tensor)");
  m.def("gru_chunk_fwd(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h0, bool reverse) "
        "-> (Tensor, Tensor)");
  m.def("rnn_chunk_fwd(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h0, bool reverse, "
        "str nonlinearity) -> (Tensor, Tensor)");
  // the same for a packed sequence: x [N, I] and y [N, P] a PackedSequence's rows, lengths [B] (int64,
  // non-increasing)
  m.def("lstm_packed_fwd(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, "
        "Tensor? w_ch, Tensor h0, Tensor c0, bool reverse, bool coupled, Tensor lengths) -> (Tensor, Tensor, Tensor)");
  m.def("gru_packed_fwd(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h0, bool reverse, "
        "Tensor lengths) -> (Tensor, Tensor)");
  m.def("rnn_packed_fwd(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h0, bool reverse, "
        "str nonlinearity, Tensor lengths) -> (Tensor, Tensor)");
  // an uninitialized CPU tensor from the large-buffer cache (csrc/pool.cpp)
  m.def("empty(int[] size, ScalarType dtype) -> Tensor");
  // C = A' @ B' (+ bias): A' = a or a^T (ta), B' = b or b^T (tb); the large products of a call (gemm.cpp)
  m.def("mm(Tensor a, bool ta, Tensor b, bool tb, Tensor? bias) -> Tensor");
}

namespace fastrnn {
void bind_quant(pybind11::module& m);  // quant.cpp: the quantized inference kernels
}

namespace {

// Which build of the FASTRNN_CLONES functions runs on this CPU (GCC's resolver takes the best one the
// CPU supports, in this order).
std::string isa() {
#if defined(__x86_64__) && !defined(FASTRNN_NO_CLONES)
  const int level = fastrnn::isa_detected();  // the products' builds (recurrence.h); target_clones picks alike
  if (level == 4) return "avx512 (x86-64-v4)";
  if (level == 3) return "avx2 (x86-64-v3)";
  return "baseline x86-64";
#else
  return "portable (no ISA clones)";
#endif
}

bool debug_build() {
#ifdef FASTRNN_DEBUG
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrnn's C++ kernels; the ops live in torch.ops.fastrnn_cpp";
  m.def("isa", &isa, "the instruction set the kernels were dispatched to on this CPU");
  m.def("debug_build", &debug_build, "whether this is a debug build (FASTRNN_DEBUG_BUILD=1)");
  m.def("parallel_min_macs", []() { return fastrnn::parallel_min_macs().load(); },
        "C of the team rule: a call of T steps splits over threads when a step's multiply-adds exceed "
        "C/8 + C/T (recurrence.h, team_size)");
  m.def("set_parallel_min_macs", [](int64_t v) { fastrnn::parallel_min_macs().store(v); },
        "set C (0: always split when there are at least two unit blocks)");
  m.def("set_team_join_at", [](int64_t k) { return fastrnn::team_join_at().exchange(k); },
        "for the tests: k > 0 holds a team's threads other than the first worker's until that one has "
        "reached check point k (a step) or the end of the call (0: off); returns the old value");
  m.def("team_counts", []() { return std::make_pair(fastrnn::team_counts()[0].load(), fastrnn::team_counts()[1].load()); },
        "for the tests: (calls whose late threads joined mid-call, calls that ended before they joined)");
  m.def("set_row_split", [](int v) { return fastrnn::row_split_mode().exchange(v); },
        "-1: the rule, 0 / 1: never / wherever a call allows it, a sequence's steps split by batch rows "
        "instead of units (recurrence.h, Layout); returns the old mode");
  m.def("set_proj_groups", [](int v) { return fastrnn::proj_groups_mode().exchange(v); },
        "1: split by rows, the fused input projection of a block of steps as one product (gemm_groups), 0: one "
        "a step; returns the old mode");
  m.def("isa_level", []() { return fastrnn::isa_level(); },
        "the build of the products and packing that runs: 4 (AVX-512, 64-byte vectors), 3 (AVX2, 32), 1 (baseline)");
  m.def("isa_detected", []() { return fastrnn::isa_detected(); }, "the highest build this CPU can run (as isa_level)");
  m.def("set_isa_cap", [](int v) { return fastrnn::isa_cap().exchange(v); },
        "for the tests: run the products and packing in no higher build than this level; returns the old cap");
  m.def("row_split_count", []() { return fastrnn::row_split_count().load(); },
        "for the tests: how many driver calls were split by rows");
  m.def("own_mm", &fastrnn::own_mm, "whether fastrnn_cpp::mm runs a product of M x N x K on its packed kernel");
  m.def("set_own_mm", [](int v) { return fastrnn::own_mm_mode().exchange(v); },
        "-1: own_mm's rule, 0 / 1: never / always the packed kernel in fastrnn_cpp::mm; returns the old mode");
  m.def("at_in_place", &fastrnn::at_in_place_f32,
        "whether a float32 A^T product of N columns, a's rows lda apart, reads A^T in place (gemm.cpp)");
  m.def("set_at_pack", [](int v) { return fastrnn::at_pack_mode().exchange(v); },
        "-1: the rule, 0 / 1: an A^T product of fastrnn_cpp::mm reads A^T in place / packs its slivers first, "
        "always (gemm.cpp, at_in_place); returns the old mode");
  m.def("cache_info", &fastrnn::cache_info,
        "the large-buffer cache: (bytes handed out, bytes idle, most idle bytes kept)");
  m.def("empty_cache", &fastrnn::empty_cache, "free the large-buffer cache's idle blocks");
  // the inference entries, bound directly (recurrence.h): same arguments and results as the ops of the
  // same names, for the fast paths only (no dispatcher: nothing traces, records or differentiates them)
  m.def("lstm_cell_fwd", &fastrnn::lstm_cell_fwd, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lstm_chunk_fwd", &fastrnn::lstm_chunk_fwd, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gru_cell_fwd", &fastrnn::gru_cell_fwd, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gru_chunk_fwd", &fastrnn::gru_chunk_fwd, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rnn_cell_fwd", [](const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                           const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h,
                           const std::string& nonlinearity) {
    return fastrnn::rnn_cell_fwd(x, w_ih, b_ih, w_hh, b_hh, h, nonlinearity);
  }, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rnn_chunk_fwd", [](const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                            const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                            bool reverse, const std::string& nonlinearity) {
    return fastrnn::rnn_chunk_fwd(x, w_ih, b_ih, w_hh, b_hh, h0, reverse, nonlinearity);
  }, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lstm_packed_fwd", &fastrnn::lstm_packed_fwd, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gru_packed_fwd", &fastrnn::gru_packed_fwd, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rnn_packed_fwd", [](const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                             const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                             bool reverse, const std::string& nonlinearity, const at::Tensor& lengths) {
    return fastrnn::rnn_packed_fwd(x, w_ih, b_ih, w_hh, b_hh, h0, reverse, nonlinearity, lengths);
  }, pybind11::call_guard<pybind11::gil_scoped_release>());
  // a cell's step in training as one autograd node (cell_train.h), for the eager training fast paths
  m.def("lstm_cell_train", &fastrnn::lstm_cell_train, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gru_cell_train", &fastrnn::gru_cell_train, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rnn_cell_train", [](const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                             const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h,
                             const std::string& nonlinearity) {
    return fastrnn::rnn_cell_train(x, w_ih, b_ih, w_hh, b_hh, h, nonlinearity);
  }, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("set_cache_cap", &fastrnn::set_cache_cap, pybind11::arg("bytes"), pybind11::arg("trim") = true,
        "set the most idle bytes the large-buffer cache keeps (0 turns it off; trim: free the idle blocks "
        "when lowering it); returns the old limit");
  fastrnn::bind_quant(m);
}
