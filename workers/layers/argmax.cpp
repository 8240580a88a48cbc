// Greedy sampling's argmax over each row of logits on CPU: the first index of the row's largest
// value (of its first NaN, if any), as torch.max(dim=-1) gives it. Built with the other kernels
// by workers/layers/native.py.
//
// Why: torch's max-with-indices ran at a fifth of the speed of its max without them (1.7 against
// 0.35 ms for 119 rows of a 50,257-word vocabulary), 4 % of a Llama decode step.
#include "vec.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

namespace {

using namespace vec;

// (v, i) comes before (top, best): it outranks it, or ties with it at an earlier index
inline bool before(float v, int64_t i, float top, int64_t best) {
  const bool tie = v == top || (v != v && top != top);
  return above(v, top) || (tie && i < best);
}

template <typename T>
int64_t row_argmax(const T* x, int64_t n) {
  int64_t best = 0;
  float top = to_f(x[0]);
  int64_t j = 0;
  if (n >= W) {
    vf bv = load(x);
    vi bi = vi{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vi at = bi;
    for (j = W; j + W <= n; j += W) {
      at += W;
      const vf v = load(x + j);
      // strictly: within a lane, the earlier index keeps a tie
      const vi up = (v > bv) | ((v != v) & (bv == bv));
      bv = up ? v : bv;
      bi = up ? at : bi;
    }
    top = bv[0];
    best = bi[0];
    for (int l = 1; l < W; ++l)
      if (before(bv[l], bi[l], top, best)) {
        top = bv[l];
        best = bi[l];
      }
  }
  for (; j < n; ++j) {
    const float v = to_f(x[j]);
    if (above(v, top)) {
      top = v;
      best = j;
    }
  }
  return best;
}

template <typename T>
void run(const T* x, int64_t stride, int64_t rows, int64_t n, int64_t* out) {
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) out[r] = row_argmax(x + r * stride, n);
  });
}

}  // namespace

// logits [S, V] float32 or bfloat16 (rows at any stride, each row contiguous) -> [S] int64
torch::Tensor argmax(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0,
              "argmax: logits must be [S, V], rows contiguous");
  auto out = torch::empty({logits.size(0)}, logits.options().dtype(torch::kLong));
  const int64_t rows = logits.size(0), n = logits.size(1), s = logits.stride(0);
  if (logits.scalar_type() == torch::kFloat)
    run<float>(logits.data_ptr<float>(), s, rows, n, out.data_ptr<int64_t>());
  else {
    TORCH_CHECK(logits.scalar_type() == torch::kBFloat16, "argmax: float32 or bfloat16 only");
    run<at::BFloat16>(logits.data_ptr<at::BFloat16>(), s, rows, n, out.data_ptr<int64_t>());
  }
  return out;
}
