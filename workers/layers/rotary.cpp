// Rotary position embeddings (the rotate-half form) applied in place to a step's queries and
// keys on CPU: one pass over each token's heads. Built with the other kernels by
// workers/layers/native.py.
//
// Why: as torch ops (a concatenation, a negation, two products and a sum, for q and for k) the
// rotation read and wrote the queries and keys five times over, 8 % of a Llama prompt's step.
// Computed in float32 and rounded once, as workers/layers/rotary.py's _rotate.
#include "vec.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

using namespace vec;

// x [T, heads, d] at row stride sx (heads contiguous), half = d / 2 a multiple of W
template <typename T>
void rotate(T* x, int64_t sx, int64_t heads, int64_t d, const float* cos, const float* sin,
            const int64_t* pos, int64_t rows) {
  const int64_t half = d / 2;
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const float* c = cos + pos[t] * d;
      const float* s = sin + pos[t] * d;
      for (int64_t h = 0; h < heads; ++h) {
        T* a = x + t * sx + h * d;
        T* b = a + half;
        for (int64_t e = 0; e < half; e += W) {
          const vf x1 = load(a + e), x2 = load(b + e);
          store(a + e, x1 * load(c + e) - x2 * load(s + e));
          store(b + e, x2 * load(c + half + e) + x1 * load(s + half + e));
        }
      }
    }
  });
}

template <typename T>
void both(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& cos, const torch::Tensor& sin,
          const torch::Tensor& pos) {
  const int64_t d = q.size(2), rows = q.size(0);
  const auto* p = pos.data_ptr<int64_t>();
  rotate<T>(q.data_ptr<T>(), q.stride(0), q.size(1), d, cos.data_ptr<float>(),
            sin.data_ptr<float>(), p, rows);
  rotate<T>(k.data_ptr<T>(), k.stride(0), k.size(1), d, cos.data_ptr<float>(),
            sin.data_ptr<float>(), p, rows);
}

}  // namespace

// q [T, heads, d], k [T, kv_heads, d] (rows at any stride, each row's heads contiguous), float32
// or bfloat16 alike, d / 2 a multiple of 16; cos, sin [positions, d] float32 (each angle twice,
// as Rotary's tables); positions [T] -> q and k rotated in place.
void rotary(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin,
            torch::Tensor positions) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "rotary: q [T, heads, d] and k [T, kv_heads, d]");
  const int64_t d = q.size(2);
  TORCH_CHECK(d % (2 * W) == 0, "rotary: the head size must be a multiple of 32");
  for (const auto* x : {&q, &k})
    TORCH_CHECK(x->stride(2) == 1 && x->stride(1) == d, "rotary: each row's heads must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "rotary: q and k differ in dtype");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == d,
              "rotary: cos and sin must be contiguous float32 [positions, d]");
  positions = positions.to(torch::kLong).contiguous();
  TORCH_CHECK(positions.numel() == q.size(0), "rotary: one position a token");
  if (positions.numel() > 0) {
    const int64_t top = positions.max().item<int64_t>(), low = positions.min().item<int64_t>();
    TORCH_CHECK(low >= 0 && top < cos.size(0), "rotary: a position beyond the tables");
  }
  if (q.scalar_type() == torch::kFloat)
    both<float>(q, k, cos, sin, positions);
  else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "rotary: float32 or bfloat16 only");
    both<at::BFloat16>(q, k, cos, sin, positions);
  }
}
