// A block's residual add and norm in one pass over each token, on CPU. Built with the
// attention kernels by workers/layers/native.py.
// - add_norm (post-LayerNorm encoders): LayerNorm(x + y) in float32, and the same rounded to
//   bfloat16 for the next matmul when asked;
// - rms_norm (Llama): x + y and RMSNorm of it, in the model's dtype, rounded where transformers'
//   ops round (the sum; the normalised row before its weight; the product).
//
// Why: as separate torch ops (a mixed-dtype add, the norm, a copy to bfloat16) they read and
// wrote the [tokens, hidden] stream five times, 8 % of MiniLM's bfloat16 time; a row of 384
// floats stays in L1 from the add to the rounding here. The vectors are GCC/Clang vector
// extensions (vec.h), as in packed_attention.cpp.
#include "vec.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using namespace vec;

template <typename Y, typename C>
void run(const float* x, int64_t sx, const Y* y, int64_t sy, const float* g, const float* b,
         float eps, float* out, C* cast, int64_t rows, int64_t h) {
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const float* xr = x + t * sx;
      const Y* yr = y + t * sy;
      float* o = out + t * h;
      vf sum = {};
      for (int64_t c = 0; c < h; c += W) {
        const vf s = load(xr + c) + load(yr + c);
        store(o + c, s);
        sum += s;
      }
      const float mean = hsum(sum) / h;
      vf sq = {};
      for (int64_t c = 0; c < h; c += W) {
        const vf d = load(o + c) - mean;
        sq += d * d;
      }
      const float rstd = 1.f / std::sqrt(hsum(sq) / h + eps);
      for (int64_t c = 0; c < h; c += W) {
        const vf n = (load(o + c) - mean) * rstd * load(g + c) + load(b + c);
        store(o + c, n);
        if constexpr (!std::is_same_v<C, float>) store(cast + t * h + c, n);
      }
    }
  });
}

template <typename Y>
void dispatch(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& g,
              const torch::Tensor& b, double eps, torch::Tensor& out, torch::Tensor* cast) {
  const auto* yp = reinterpret_cast<const Y*>(y.data_ptr());
  const int64_t rows = x.size(0), h = x.size(1);
  if (cast == nullptr)
    run<Y, float>(x.data_ptr<float>(), x.stride(0), yp, y.stride(0), g.data_ptr<float>(),
                  b.data_ptr<float>(), eps, out.data_ptr<float>(), nullptr, rows, h);
  else
    run<Y, at::BFloat16>(x.data_ptr<float>(), x.stride(0), yp, y.stride(0), g.data_ptr<float>(),
                         b.data_ptr<float>(), eps, out.data_ptr<float>(),
                         reinterpret_cast<at::BFloat16*>(cast->data_ptr()), rows, h);
}


template <typename T>
void run_rms(const T* x, int64_t sx, const T* y, int64_t sy, const T* g, float eps, T* sum,
             T* out, int64_t rows, int64_t h) {
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const T* src = x + t * sx;
      if (y != nullptr) {
        T* s = sum + t * h;
        const T* yr = y + t * sy;
        for (int64_t c = 0; c < h; c += W) store(s + c, load(src + c) + load(yr + c));
        src = s;  // read back as rounded
      }
      vf sq = {};
      for (int64_t c = 0; c < h; c += W) {
        const vf v = load(src + c);
        sq += v * v;
      }
      const float r = 1.f / std::sqrt(hsum(sq) / h + eps);
      T* o = out + t * h;
      for (int64_t c = 0; c < h; c += W) store(o + c, load(g + c) * as<T>(load(src + c) * r));
    }
  });
}

}  // namespace

// x [T, H] float32, y [T, H] float32 or bfloat16 (rows at any stride, each row contiguous),
// weight and bias [H] float32, H a multiple of 16 -> [LayerNorm(x + y) float32, the same in
// `bfloat16` or, when false, that float32 tensor again].
std::vector<torch::Tensor> add_norm(torch::Tensor x, torch::Tensor y, torch::Tensor weight,
                                    torch::Tensor bias, double eps, bool bfloat16) {
  TORCH_CHECK(x.dim() == 2 && y.sizes() == x.sizes(), "add_norm: x and y must be [T, H] alike");
  const int64_t h = x.size(1);
  TORCH_CHECK(h % W == 0, "add_norm: the hidden size must be a multiple of 16");
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "add_norm: x must be float32");
  TORCH_CHECK(y.scalar_type() == torch::kFloat || y.scalar_type() == torch::kBFloat16,
              "add_norm: y must be float32 or bfloat16");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "add_norm: each row must be contiguous");
  weight = weight.to(torch::kFloat).contiguous();
  bias = bias.to(torch::kFloat).contiguous();
  TORCH_CHECK(weight.numel() == h && bias.numel() == h, "add_norm: weight and bias must be [H]");
  auto out = torch::empty(x.sizes(), x.options());
  torch::Tensor cast;
  if (bfloat16) cast = torch::empty(x.sizes(), x.options().dtype(torch::kBFloat16));
  auto* c = bfloat16 ? &cast : nullptr;
  if (y.scalar_type() == torch::kFloat)
    dispatch<float>(x, y, weight, bias, eps, out, c);
  else
    dispatch<at::BFloat16>(x, y, weight, bias, eps, out, c);
  return {out, bfloat16 ? cast : out};
}

// x [T, H] and y [T, H] (or undefined: the norm of x alone), rows at any stride, each row
// contiguous; weight [H]; all float32 or all bfloat16; H a multiple of 16 -> [x + y (x itself
// without y), RMSNorm of that].
std::vector<torch::Tensor> rms_norm(torch::Tensor x, c10::optional<torch::Tensor> y,
                                    torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [T, H], rows contiguous");
  const int64_t h = x.size(1);
  TORCH_CHECK(h % W == 0, "rms_norm: the hidden size must be a multiple of 16");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == torch::kFloat || dt == torch::kBFloat16, "rms_norm: float32 or bfloat16 only");
  weight = weight.contiguous();
  TORCH_CHECK(weight.scalar_type() == dt && weight.numel() == h, "rms_norm: weight must be [H] in x's dtype");
  const bool add = y.has_value() && y->defined();
  if (add)
    TORCH_CHECK(y->sizes() == x.sizes() && y->scalar_type() == dt && y->stride(1) == 1,
                "rms_norm: y must be as x");
  auto out = torch::empty(x.sizes(), x.options());
  auto sum = add ? torch::empty(x.sizes(), x.options()) : x;
  const int64_t sy = add ? y->stride(0) : 0;
  if (dt == torch::kFloat)
    run_rms<float>(x.data_ptr<float>(), x.stride(0), add ? y->data_ptr<float>() : nullptr, sy,
                   weight.data_ptr<float>(), eps, add ? sum.data_ptr<float>() : nullptr,
                   out.data_ptr<float>(), x.size(0), h);
  else
    run_rms<at::BFloat16>(x.data_ptr<at::BFloat16>(), x.stride(0),
                          add ? y->data_ptr<at::BFloat16>() : nullptr, sy,
                          weight.data_ptr<at::BFloat16>(), eps,
                          add ? sum.data_ptr<at::BFloat16>() : nullptr,
                          out.data_ptr<at::BFloat16>(), x.size(0), h);
  return {sum, out};
}
