// SwiGLU's gating on CPU, silu(gate) * up, in one pass over the merged gate/up projection.
// Built with the other kernels by workers/layers/native.py.
//
// Why: as torch ops (silu, then the product) the [tokens, intermediate] stream was read three
// times and written twice; it is the widest tensor of a Llama block (2.7 x the hidden size).
// Rounded as those ops round: silu's result to the model's dtype, then the product.
#include "vec.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

using namespace vec;

template <typename T>
void run(const T* g, const T* u, int64_t sg, int64_t su, T* out, int64_t rows, int64_t n) {
  const int64_t grain = std::max<int64_t>(1, 16384 / n);  // rows enough to be worth a thread
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const T* gr = g + t * sg;
      const T* ur = u + t * su;
      T* o = out + t * n;
      for (int64_t c = 0; c < n; c += W) {
        const vf a = load(gr + c);
        store(o + c, as<T>(a / (1.f + vexp(-a))) * load(ur + c));
      }
    }
  });
}

}  // namespace

// gate, up [T, I] (rows at any stride, each row contiguous: the halves of one matmul's output),
// float32 or bfloat16 alike, I a multiple of 16 -> silu(gate) * up [T, I].
torch::Tensor silu_and_mul(torch::Tensor gate, torch::Tensor up) {
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes(), "silu_and_mul: gate and up must be [T, I] alike");
  TORCH_CHECK(gate.stride(1) == 1 && up.stride(1) == 1, "silu_and_mul: each row must be contiguous");
  const int64_t n = gate.size(1);
  TORCH_CHECK(n % W == 0, "silu_and_mul: the width must be a multiple of 16");
  const auto dt = gate.scalar_type();
  TORCH_CHECK(up.scalar_type() == dt, "silu_and_mul: gate and up differ in dtype");
  auto out = torch::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  if (dt == torch::kFloat)
    run<float>(gate.data_ptr<float>(), up.data_ptr<float>(), gate.stride(0), up.stride(0),
               out.data_ptr<float>(), gate.size(0), n);
  else {
    TORCH_CHECK(dt == torch::kBFloat16, "silu_and_mul: float32 or bfloat16 only");
    run<at::BFloat16>(gate.data_ptr<at::BFloat16>(), up.data_ptr<at::BFloat16>(), gate.stride(0),
                      up.stride(0), out.data_ptr<at::BFloat16>(), gate.size(0), n);
  }
  return out;
}
