// Greedy tokens at int8's speed: each row's argmax over the LM head's own logits (its weight,
// float32 or bfloat16, times the row, products summed in float32), found from logits an int8
// matmul computed and a bound on how far those can be from the head's. Built with the other
// kernels by workers/layers/native.py; the int8 copy and the bound's terms come from
// workers/layers/screen.py.
//
// Why: the LM head is a sixth to a quarter of a decode step (50,257 x 512 per sampled token),
// and oneDNN's int8 matmul (AMX or VNNI) runs it at about twice bfloat16's speed. Greedy
// sampling needs only the largest logit. The matmul scores x^ = s q (the row quantised, a
// scale a row: `quantize_rows`) against w^_j = t_j p_j (each word's row quantised at load, a
// scale a word) exactly in integers, then scales and rounds to bfloat16; the head's logit f_j
// of x and w_j is within
//   E_j = c1 (|a_j| + |b_j|) + |x| r_j + |x - x^| m_j
// of the int8 logit a_j (b_j the bias; r_j = |w_j - w^_j| + g |w_j| and m_j = |w^_j|, Euclidean
// norms from the load: x.w - x^.w^ = x.(w - w^) + (x - x^).w^ and Cauchy-Schwarz; g the float32
// sum's error; c1 the roundings'). A word whose upper bound a_j + b_j + E_j is below the best
// lower bound max_k (a_k + b_k - E_k) cannot be the argmax, so only the rest, 10-20 a row on
// the benchmarks' models, are scored again from the head's weight here, and the best taken.
#include "vec.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using namespace vec;

template <typename T>
inline float dot(const float* x, const T* w, int64_t d) {
  vf acc = splat(0.f);
  int64_t i = 0;
  for (; i + W <= d; i += W) acc += load(x + i) * load(w + i);
  float s = hsum(acc);
  for (; i < d; ++i) s += x[i] * to_f(w[i]);
  return s;
}

template <typename T>
struct Args {
  const at::BFloat16* approx;  // [rows, stride]: q . p_j t_j, the row's scale not yet applied
  int64_t stride;
  const float* scale;   // [rows] s
  const float* nx;      // [rows] |x|
  const float* dx;      // [rows] |x - x^|
  const float* x;       // [rows, d]
  const T* w;           // [n, d] the head's weight
  const float* radius;  // [n] r_j
  const float* size;    // [n] m_j
  const float* bias;    // [n] or null
  int64_t n, d;
  float c1;
  float most_radius, most_size, most_bias;  // the largest r_j, m_j, |b_j|
};

// Two passes over a row's approximate logits: the largest, then the words within reach of it
// (twice the widest E_j), few enough that only their bounds are computed, word by word.
template <typename T, bool Bias>
struct Row {
  const Args<T>& a;
  const at::BFloat16* v;  // approximate logits, unscaled
  float s;

  vf logit(int64_t j) const {
    if constexpr (Bias) return load(v + j) * s + load(a.bias + j);
    return load(v + j) * s;
  }
  float logit1(int64_t j) const { return to_f(v[j]) * s + (Bias ? a.bias[j] : 0.f); }
  // the largest logit
  float most() const {
    vf top = splat(-std::numeric_limits<float>::infinity());
    int64_t j = 0;
    for (; j + W <= a.n; j += W) top = vmax(top, logit(j));
    float m = hmax(top);
    for (; j < a.n; ++j) m = std::max(m, logit1(j));
    return m;
  }
  // appends the words whose logit is at least cut, in order
  void keep(float cut, std::vector<int64_t>& out) const {
    const vf c = splat(cut);
    int64_t j = 0;
    for (; j + 4 * W <= a.n; j += 4 * W) {  // one test for 64 words: few are kept
      const vf y[4] = {logit(j), logit(j + W), logit(j + 2 * W), logit(j + 3 * W)};
      if (!at_least(vmax(vmax(y[0], y[1]), vmax(y[2], y[3])), c)) continue;
      for (int q = 0; q < 4; ++q)
        for (uint32_t in = at_least(y[q], c); in; in &= in - 1)
          out.push_back(j + q * W + __builtin_ctz(in));
    }
    for (; j < a.n; ++j)
      if (logit1(j) >= cut) out.push_back(j);
  }
};

template <typename T, bool Bias>
void row_argmax(const Args<T>& a, int64_t r, std::vector<int64_t>& kept, int64_t* id,
                float* value) {
  const Row<T, Bias> row{a, a.approx + r * a.stride, a.scale[r]};
  const float nx = a.nx[r], dx = a.dx[r];
  auto bound = [&](int64_t j, float y) {
    const float b = Bias ? a.bias[j] : 0.f;
    return a.c1 * (std::fabs(y - b) + std::fabs(b)) + nx * a.radius[j] + dx * a.size[j];
  };
  // E_j at its widest: c1 |a_j| <= c1 (1 + c1) |x^| |w^_j| and |x^| <= |x| + |x - x^|
  const float wide = a.c1 * ((nx + dx) * a.most_size * (1 + a.c1) + a.most_bias) +
                     nx * a.most_radius + dx * a.most_size;
  const float top = row.most();
  // a row or logit not finite (an input's NaN or inf; a logit past float32's range): every
  // word is scored, as the head's own argmax would meet those values too
  const bool all = !std::isfinite(nx) || !std::isfinite(wide) || !std::isfinite(top);
  kept.clear();
  float lo = -std::numeric_limits<float>::infinity();
  if (!all) {
    // the largest logit's word has a lower bound of at least top - wide, so a word below
    // top - 2 wide can neither hold the best lower bound nor reach it (the rest: room for
    // this subtraction's rounding, and the vector and the scalar logit's)
    row.keep(top - 2 * wide * (1 + 1.f / 64) - std::fabs(top) * (1.f / 4096), kept);
    for (const int64_t j : kept) {
      const float y = row.logit1(j);
      lo = std::max(lo, y - bound(j, y));
    }
  }
  const float* x = a.x + r * a.d;
  int64_t best = -1;
  float most = 0.f;
  auto score = [&](int64_t j) {
    const float v = dot(x, a.w + j * a.d, a.d) + (Bias ? a.bias[j] : 0.f);
    if (best < 0 || above(v, most)) {  // ascending j: a tie keeps the earlier word
      best = j;
      most = v;
    }
  };
  if (!all) {
    for (const int64_t j : kept) {
      const float y = row.logit1(j);
      if (y + bound(j, y) >= lo) score(j);
    }
  }
  if (best < 0)  // every word, where the bound cannot screen (and were none kept)
    for (int64_t j = 0; j < a.n; ++j) score(j);
  *id = best;
  *value = most;
}

template <typename T>
void run(const Args<T>& a, int64_t rows, int64_t* ids, float* values) {
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> kept;
    for (int64_t r = lo; r < hi; ++r) {
      if (a.bias)
        row_argmax<T, true>(a, r, kept, ids + r, values + r);
      else
        row_argmax<T, false>(a, r, kept, ids + r, values + r);
    }
  });
}

}  // namespace

// x [S, d] float32 -> (q [S, d] uint8: each value's nearest multiple of its row's scale s, in
// units of s, offset by 128 (the matmul's zero point), within +-127; s [S] (the row's largest
// magnitude / 127; 1 for a zero row); |x| [S]; |x - x^| [S], x^ = s (q - 128), computed in
// float64 (q s is exact there) and rounded up). A row that is not finite gets q = 128 and an
// |x| that is not finite: its caller scores every word.
std::vector<torch::Tensor> quantize_rows(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2,
              "quantize_rows: x must be [S, d] float32, contiguous");
  const int64_t rows = x.size(0), d = x.size(1);
  auto q = torch::empty({rows, d}, x.options().dtype(torch::kByte));
  auto scale = torch::empty({rows}, x.options()), nx = torch::empty({rows}, x.options());
  auto dx = torch::empty({rows}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float *sp = scale.data_ptr<float>(), *np = nx.data_ptr<float>(), *dp = dx.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = xp + r * d;
      uint8_t* qr = qp + r * d;
      double sq = 0.0;
      float top = 0.f;
      for (int64_t i = 0; i < d; ++i) {
        sq += static_cast<double>(xr[i]) * xr[i];
        top = std::max(top, std::fabs(xr[i]));
      }
      np[r] = static_cast<float>(std::sqrt(sq) * (1 + 1e-6));
      if (!std::isfinite(sq)) {  // NaN or inf in the row (or a norm past float64's range)
        std::fill(qr, qr + d, uint8_t{128});
        sp[r] = 1.f;
        dp[r] = 0.f;
        np[r] = std::numeric_limits<float>::infinity();
        continue;
      }
      const float s = top > 0.f ? top / 127.f : 1.f;
      double err = 0.0;
      for (int64_t i = 0; i < d; ++i) {
        const float k = std::min(127.f, std::max(-127.f, std::nearbyint(xr[i] / s)));
        qr[i] = static_cast<uint8_t>(static_cast<int>(k) + 128);
        const double e = static_cast<double>(xr[i]) - static_cast<double>(k) * s;
        err += e * e;
      }
      sp[r] = s;
      dp[r] = static_cast<float>(std::sqrt(err) * (1 + 1e-6));
    }
  });
  return {q, scale, nx, dx};
}

// approx [>= S, >= n] bfloat16 (rows contiguous; the int8 matmul's q . p_j t_j), scale, nx, dx [S]
// (quantize_rows'), x [S, d] float32, w [>= n, d] float32 or bfloat16, radius, size [>= n]
// float32 and their largest values, bias [>= n] float32 or None; n: the words to consider; c1
// the roundings' relative error. -> ([S] int64 ids, [S] float32 logits)
std::vector<torch::Tensor> screen_argmax(torch::Tensor approx, torch::Tensor scale,
                                         torch::Tensor nx, torch::Tensor dx, torch::Tensor x,
                                         torch::Tensor w, torch::Tensor radius, torch::Tensor size,
                                         double most_radius, double most_size,
                                         c10::optional<torch::Tensor> bias, int64_t n, double c1) {
  const int64_t rows = x.size(0);
  TORCH_CHECK(approx.scalar_type() == torch::kBFloat16 && approx.dim() == 2 &&
                  approx.stride(1) == 1 && approx.size(0) >= rows && approx.size(1) >= n && n > 0,
              "screen_argmax: approx must be [>= S, >= n] bfloat16, rows contiguous");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2,
              "screen_argmax: x must be [S, d] float32, contiguous");
  for (const auto& t : {scale, nx, dx})
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.numel() == rows,
                "screen_argmax: scale, nx, dx must be [S] float32");
  TORCH_CHECK((w.scalar_type() == torch::kFloat || w.scalar_type() == torch::kBFloat16) &&
                  w.is_contiguous() && w.dim() == 2 && w.size(0) >= n && w.size(1) == x.size(1),
              "screen_argmax: w must be [>= n, d] float32 or bfloat16, contiguous");
  for (const auto& t : {radius, size})
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.numel() >= n,
                "screen_argmax: radius and size must be [>= n] float32");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() &&
                    bias->numel() >= n,
                "screen_argmax: bias must be [>= n] float32");
    b = bias->data_ptr<float>();
  }
  auto ids = torch::empty({rows}, x.options().dtype(torch::kLong));
  auto values = torch::empty({rows}, x.options());
  // the bias as it is now (the largest r_j and m_j are the caller's: they change with the weight)
  const float most_bias = b ? bias->narrow(0, 0, n).abs().max().item<float>() : 0.f;
  auto args = [&](auto* wp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(wp)>>;
    return Args<T>{approx.data_ptr<at::BFloat16>(), approx.stride(0), scale.data_ptr<float>(),
                   nx.data_ptr<float>(), dx.data_ptr<float>(), x.data_ptr<float>(), wp,
                   radius.data_ptr<float>(), size.data_ptr<float>(), b, n, x.size(1),
                   static_cast<float>(c1), static_cast<float>(most_radius),
                   static_cast<float>(most_size), most_bias};
  };
  if (w.scalar_type() == torch::kFloat)
    run(args(w.data_ptr<float>()), rows, ids.data_ptr<int64_t>(), values.data_ptr<float>());
  else
    run(args(w.data_ptr<at::BFloat16>()), rows, ids.data_ptr<int64_t>(), values.data_ptr<float>());
  return {ids, values};
}
