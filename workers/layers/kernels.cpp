// The Python module of the CPU kernels: one extension, built once per machine by
// workers/layers/native.py, holding each kernel of its own source file.
#include <torch/extension.h>
#include <vector>

std::vector<torch::Tensor> paged_decode(torch::Tensor q, torch::Tensor k_cache,
                                        torch::Tensor v_cache, torch::Tensor blocks,
                                        torch::Tensor lens);
torch::Tensor packed_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor starts, torch::Tensor lens, bool causal);
std::vector<torch::Tensor> add_norm(torch::Tensor x, torch::Tensor y, torch::Tensor weight,
                                    torch::Tensor bias, double eps, bool bfloat16);
std::vector<torch::Tensor> rms_norm(torch::Tensor x, c10::optional<torch::Tensor> y,
                                    torch::Tensor weight, double eps);
torch::Tensor silu_and_mul(torch::Tensor gate, torch::Tensor up);
void rotary(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin,
            torch::Tensor positions);
torch::Tensor argmax(torch::Tensor logits);
std::vector<torch::Tensor> quantize_rows(torch::Tensor x);
std::vector<torch::Tensor> screen_argmax(torch::Tensor approx, torch::Tensor scale,
                                         torch::Tensor nx, torch::Tensor dx, torch::Tensor x,
                                         torch::Tensor w, torch::Tensor radius, torch::Tensor size,
                                         double most_radius, double most_size,
                                         c10::optional<torch::Tensor> bias, int64_t n, double c1);
torch::Tensor mkldnn_view(int64_t ptr, std::vector<int64_t> sizes, torch::ScalarType dtype,
                          torch::Tensor md);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over the paged KV cache");
  m.def("packed_attention", &packed_attention, "attention over packed sequences", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("starts"), py::arg("lens"), py::arg("causal") = false);
  m.def("add_norm", &add_norm, "LayerNorm(x + y), and that in bfloat16");
  m.def("rms_norm", &rms_norm, "x + y and RMSNorm of it", py::arg("x"), py::arg("y"),
        py::arg("weight"), py::arg("eps"));
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("rotary", &rotary, "rotate q and k in place by their positions");
  m.def("argmax", &argmax, "each row's first index of its largest value");
  m.def("quantize_rows", &quantize_rows, "each row in int8, a scale a row, for the screen");
  m.def("screen_argmax", &screen_argmax, "the head's argmax, from int8 logits and a bound");
  m.def("mkldnn_view", &mkldnn_view, "an oneDNN-layout tensor over memory it does not own");
}
