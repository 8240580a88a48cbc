// Greedy float32 tokens at bfloat16's speed: each row's argmax over float32 logits, found from
// logits the LM head computed in bfloat16 and a bound on how far those can be from float32's.
// Built with the other kernels by workers/layers/native.py.
//
// Why: in float32 the LM head is a quarter of a decode step (50,257 x 512 per sampled token),
// and a CPU with AMX or AVX-512 BF16 runs the same matmul 3x faster in bfloat16. Greedy
// sampling needs only the largest logit, and a_j + b_j is within E_j of float32's logit:
//   E_j = c1 (|a_j| + |b_j|) + c2 |x| |w_j|
// (a_j the bfloat16 matmul's logit, b_j the bias, |x| and |w_j| Euclidean norms: Cauchy-Schwarz
// bounds sum_i |x_i w_ji| by |x| |w_j|; the constants, from the roundings, are the caller's,
// embedding.bounds). A word whose upper bound a_j + b_j + E_j is below the best lower bound
// max_k (a_k + b_k - E_k) cannot be float32's argmax, so only the rest, a handful a row on the
// benchmarks' models, are scored again in float32 here, and the best of them taken.
#include "vec.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using namespace vec;

inline float dot(const float* x, const float* w, int64_t d) {
  vf acc = splat(0.f);
  int64_t i = 0;
  for (; i + W <= d; i += W) acc += load(x + i) * load(w + i);
  float s = hsum(acc);
  for (; i < d; ++i) s += x[i] * w[i];
  return s;
}

struct Args {
  const at::BFloat16* approx;  // [rows, stride]
  int64_t stride;
  const float* x;     // [rows, d]
  const float* w;     // [n, d]
  const float* norm;  // [n]
  const float* bias;  // [n] or null
  int64_t n, d;
  float c1, c2;
};

inline vf bias_at(const Args& a, int64_t j) { return a.bias ? load(a.bias + j) : splat(0.f); }
inline float bias_of(const Args& a, int64_t j) { return a.bias ? a.bias[j] : 0.f; }

// E_j, for a vector of words and for one word (the loops' tails)
inline vf bound(const Args& a, vf v, vf b, vf nw, float nx) {
  return splat(a.c1) * (vmax(v, -v) + vmax(b, -b)) + splat(a.c2 * nx) * nw;
}
inline float bound(const Args& a, float v, float b, int64_t j, float nx) {
  return a.c1 * (std::fabs(v) + std::fabs(b)) + a.c2 * nx * a.norm[j];
}

// the best lower bound of the row; NaN where a logit (bias included) is not finite: then every
// word is scored, as float32's argmax would meet that logit too
float floor_of(const Args& a, const at::BFloat16* row, float nx) {
  vf lo = splat(-std::numeric_limits<float>::infinity());
  vf finite = splat(0.f);  // stays 0 while every a - a is 0
  int64_t j = 0;
  for (; j + W <= a.n; j += W) {
    const vf v = load(row + j), b = bias_at(a, j);
    finite += (v + b) - (v + b);
    lo = vmax(lo, v + b - bound(a, v, b, load(a.norm + j), nx));
  }
  float top = hmax(lo);
  bool ok = hsum(finite) == 0.f;
  for (; j < a.n; ++j) {
    const float v = to_f(row[j]), b = bias_of(a, j);
    ok = ok && std::isfinite(v + b);
    top = std::max(top, v + b - bound(a, v, b, j, nx));
  }
  return ok ? top : std::numeric_limits<float>::quiet_NaN();
}

void row_argmax(const Args& a, int64_t r, int64_t* id, float* value) {
  const at::BFloat16* row = a.approx + r * a.stride;
  const float* x = a.x + r * a.d;
  const float nx = std::sqrt(dot(x, x, a.d));
  const float lo = floor_of(a, row, nx);
  const bool all = !(lo == lo) || !std::isfinite(nx);
  int64_t best = -1;
  float top = 0.f;
  auto score = [&](int64_t j) {
    const float v = dot(x, a.w + j * a.d, a.d) + bias_of(a, j);
    if (best < 0 || above(v, top)) {  // ascending j: a tie keeps the earlier word
      best = j;
      top = v;
    }
  };
  int64_t j = 0;
  for (; j + W <= a.n; j += W) {
    const vf v = load(row + j), b = bias_at(a, j);
    const vi in = (v + b + bound(a, v, b, load(a.norm + j), nx)) >= splat(lo);
    if (!all && hmax(__builtin_convertvector(-in, vf)) == 0.f) continue;  // lanes: -1 in, 0 out
    for (int l = 0; l < W; ++l)
      if (all || in[l]) score(j + l);
  }
  for (; j < a.n; ++j) {
    const float v = to_f(row[j]), b = bias_of(a, j);
    if (all || v + b + bound(a, v, b, j, nx) >= lo) score(j);
  }
  *id = best;
  *value = top;
}

}  // namespace

// approx [S, >= n] bfloat16 (rows contiguous), x [S, d] and w [>= n, d] float32, norm [>= n]
// (|w_j|), bias [>= n] or None; n: the words to consider. -> ([S] int64 ids, [S] float32 logits)
std::vector<torch::Tensor> screen_argmax(torch::Tensor approx, torch::Tensor x, torch::Tensor w,
                                         torch::Tensor norm, c10::optional<torch::Tensor> bias,
                                         int64_t n, double c1, double c2) {
  TORCH_CHECK(approx.scalar_type() == torch::kBFloat16 && approx.dim() == 2 &&
                  approx.stride(1) == 1 && approx.size(1) >= n && n > 0,
              "screen_argmax: approx must be [S, >= n] bfloat16, rows contiguous");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2 &&
                  x.size(0) == approx.size(0),
              "screen_argmax: x must be [S, d] float32, contiguous");
  TORCH_CHECK(w.scalar_type() == torch::kFloat && w.is_contiguous() && w.dim() == 2 &&
                  w.size(0) >= n && w.size(1) == x.size(1),
              "screen_argmax: w must be [>= n, d] float32, contiguous");
  TORCH_CHECK(norm.scalar_type() == torch::kFloat && norm.is_contiguous() && norm.numel() >= n,
              "screen_argmax: norm must be [>= n] float32");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() &&
                    bias->numel() >= n,
                "screen_argmax: bias must be [>= n] float32");
    b = bias->data_ptr<float>();
  }
  const int64_t rows = x.size(0);
  auto ids = torch::empty({rows}, x.options().dtype(torch::kLong));
  auto values = torch::empty({rows}, x.options());
  const Args a{approx.data_ptr<at::BFloat16>(), approx.stride(0), x.data_ptr<float>(),
               w.data_ptr<float>(), norm.data_ptr<float>(), b, n, x.size(1),
               static_cast<float>(c1), static_cast<float>(c2)};
  int64_t* out = ids.data_ptr<int64_t>();
  float* val = values.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) row_argmax(a, r, out + r, val + r);
  });
  return {ids, values};
}
