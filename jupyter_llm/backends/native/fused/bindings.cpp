// The Python module of the fused CPU ops: decode_ops.cpp (the work between a step's GEMMs)
// and block_ops.cpp (the GEMMs over GGUF's block-quantized weights).
#include <torch/extension.h>

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps);
torch::Tensor add_rms_norm_(torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& w, double eps);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
torch::Tensor token_attention(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                              const torch::Tensor& positions, torch::Tensor& k_cache, torch::Tensor& v_cache,
                              const torch::Tensor& slots, const torch::Tensor& block_tables,
                              const torch::Tensor& row_seqs, int64_t num_heads, double scale);
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                        const torch::Tensor& mins, int64_t out_features, int64_t in_features,
                        const c10::optional<torch::Tensor>& bias);
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                        int64_t out_features, int64_t in_features, const c10::optional<torch::Tensor>& bias);
torch::Tensor q4_rows(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& mins,
                      int64_t out_features, int64_t in_features, const torch::Tensor& ids);
torch::Tensor q8_rows(const torch::Tensor& q, const torch::Tensor& scales, int64_t out_features, int64_t in_features,
                      const torch::Tensor& ids);

// Every op runs without the GIL: a server's event loop and the notebook stay responsive while
// the compute thread is in a GEMM.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, py::call_guard<py::gil_scoped_release>(), "RMSNorm (float32)");
  m.def("add_rms_norm_", &add_rms_norm_, py::call_guard<py::gil_scoped_release>(), "x += delta; RMSNorm(x) (float32)");
  m.def("silu_mul", &silu_mul, py::call_guard<py::gil_scoped_release>(), "silu(gate) * up from a fused gate_up projection (float32)");
  m.def("token_attention", &token_attention, py::call_guard<py::gil_scoped_release>(), "RoPE + KV write + causal attention over the paged cache, one row per token");
  m.def("q4_linear", &q4_linear, py::call_guard<py::gil_scoped_release>(), "x @ W.T for packed Q4_1 block weights (float32 activations)");
  m.def("q8_linear", &q8_linear, py::call_guard<py::gil_scoped_release>(), "x @ W.T for packed Q8_0 block weights (float32 activations)");
  m.def("q4_rows", &q4_rows, py::call_guard<py::gil_scoped_release>(), "float32 rows of a packed Q4_1 block matrix (embedding lookup)");
  m.def("q8_rows", &q8_rows, py::call_guard<py::gil_scoped_release>(), "float32 rows of a packed Q8_0 block matrix (embedding lookup)");
}
