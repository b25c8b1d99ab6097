// Python bindings of the native kernels (one extension module).
#include <torch/extension.h>

#include <optional>

torch::Tensor linear(torch::Tensor x, torch::Tensor w_t, std::optional<torch::Tensor> bias);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor moe_experts(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor w_gate_up,
                          torch::Tensor w_down);
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x @ w_t (+ bias) with input-major weights", py::arg("x"), py::arg("w_t"), py::arg("bias") = py::none());
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim; row i uses weight row i % W");
  m.def("moe_experts", &moe_experts, "fused decode-size MoE experts");
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache, in place");
}
