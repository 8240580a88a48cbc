// Attention over packed sequences, on CPU: every sequence of a micro-batch attends over its own
// tokens only (an encoder's texts; causally, a decoder's fresh prompts, with grouped KV heads), in
// one call per layer, with nothing padded to the batch's longest. Built on first use by
// workers/layers/native.py (torch.utils.cpp_extension) for the machine it runs on.
//
// Why not torch's flash kernel, one call per distinct length: at a head size of 32 and the short
// texts embeddings see (a median of ~30 tokens), it ran at ~45 GFLOP/s; its time went to the
// softmax of each key pair and to the calls, not to the two matmuls. Here a work item is one
// sequence, all heads: its keys are transposed once into a buffer, then blocks of R query rows
// take scores against 16 keys at a time held in registers (R x 16 accumulators), a vectorised
// exp, and the values weighted the same way. Float32 accumulation; float32 or bfloat16 in and out.
// The vectors are GCC/Clang vector extensions: one AVX-512 register each where the CPU has it,
// split by the compiler into AVX2 or SSE registers where it has not (no intrinsics): vec.h.
#include "vec.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using namespace vec;

template <typename T, int D>
void run(const T* q, const T* k, const T* v, int64_t sq, int64_t sk, int64_t sv,
         const int64_t* starts, const int64_t* lens, T* out, int64_t so, int64_t n,
         int64_t heads, int64_t kv_heads, bool causal) {
  constexpr int DV = D / W;            // vectors a head
  constexpr int R = 16 / DV;           // query rows a block: R x DV output accumulators = 16
  constexpr int RS = R < 8 ? R : 8;    // ... and R x 1 score accumulators, at most 8
  static_assert(D % W == 0 && R >= 1, "head size: a multiple of 16, at most 256");
  const int64_t kvd = kv_heads * D;      // a key's (value's) row: every KV head
  const int64_t rep = heads / kv_heads;  // query heads a KV head serves
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // Longest first, each thread taking the next sequence when it is free: lengths are skewed (a
  // few long texts among many short), so equal shares of sequences would not be equal work.
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lens[a] > lens[b]; });
  const int64_t longest = n ? lens[order[0]] : 0;
  const int64_t widest = (longest + W - 1) / W * W;
  vf iota;
  for (int c = 0; c < W; ++c) iota[c] = c;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    // keys transposed [kv_heads * D, Lp] (scaled), bfloat16 values widened [L, kv_heads * D],
    // scores
    std::vector<float> kt(kvd * widest), vb(std::is_same_v<T, float> ? 0 : longest * kvd);
    std::vector<float> s(R * widest);
    float qb[R][D];
    for (int64_t w = next++; w < n; w = next++) {
      const int64_t i = order[w], L = lens[i], b = starts[i];
      const int64_t Lp = (L + W - 1) / W * W;
      // a strip of 16 columns at a time, so that the 16 rows it writes stay in cache
      for (int64_t c0 = 0; c0 < kvd; c0 += W)
        for (int64_t j = 0; j < L; ++j) {
          const T* kr = k + (b + j) * sk + c0;
          for (int c = 0; c < W; ++c) kt[(c0 + c) * Lp + j] = to_f(kr[c]) * scale;
        }
      const float* vs = nullptr;
      int64_t vstride = kvd;
      if constexpr (std::is_same_v<T, float>) {
        vs = v + b * sv;  // read in place
        vstride = sv;
      } else {
        for (int64_t j = 0; j < L; ++j)
          for (int64_t c = 0; c < kvd; ++c) vb[j * kvd + c] = to_f(v[(b + j) * sv + c]);
        vs = vb.data();
      }
      for (int64_t h = 0; h < heads; ++h) {
        const float* kh = kt.data() + (h / rep) * D * Lp;
        const float* vh = vs + (h / rep) * D;
        for (int64_t r0 = 0; r0 < L; r0 += R) {
          const int64_t rows = std::min<int64_t>(R, L - r0);
          // causal: no row of the block sees a key past its last row
          const int64_t keys = causal ? std::min<int64_t>(L, r0 + rows) : L;
          const int64_t Lk = (keys + W - 1) / W * W;
          for (int r = 0; r < R; ++r) {  // rows past the end repeat the last (not written out)
            const T* qr = q + (b + r0 + std::min<int64_t>(r, rows - 1)) * sq + h * D;
            for (int e = 0; e < D; ++e) qb[r][e] = to_f(qr[e]);
          }
          vf top[R];
          for (int r = 0; r < R; ++r) top[r] = splat(-INFINITY);
          for (int64_t j0 = 0; j0 < Lk; j0 += W) {
            const vf j = iota + static_cast<float>(j0);
            const vi real = j < static_cast<float>(keys);
            for (int r1 = 0; r1 < R; r1 += RS) {
              vf acc[RS] = {};
              for (int e = 0; e < D; ++e) {
                const vf kk = load(kh + e * Lp + j0);
                for (int r = 0; r < RS; ++r) acc[r] += qb[r1 + r][e] * kk;
              }
              for (int r = 0; r < RS; ++r) {
                const float row = static_cast<float>(r0 + std::min<int64_t>(r1 + r, rows - 1));
                const vi seen = causal ? (real & (j <= row)) : real;
                const vf x = seen ? acc[r] : splat(-INFINITY);
                store(s.data() + (r1 + r) * Lp + j0, x);
                top[r1 + r] = vmax(top[r1 + r], x);
              }
            }
          }
          float inv[R];
          for (int r = 0; r < R; ++r) {
            float* sr = s.data() + r * Lp;
            const float mx = hmax(top[r]);
            vf sum = {};
            for (int64_t j0 = 0; j0 < Lk; j0 += W) {
              const vf p = vexp(load(sr + j0) - mx);
              store(sr + j0, p);
              sum += p;
            }
            inv[r] = 1.f / hsum(sum);
          }
          vf o[R][DV] = {};
          for (int64_t j = 0; j < keys; ++j) {
            vf vv[DV];
            for (int d = 0; d < DV; ++d) vv[d] = load(vh + j * vstride + d * W);
            for (int r = 0; r < R; ++r) {
              const float p = s[r * Lp + j];
              for (int d = 0; d < DV; ++d) o[r][d] += p * vv[d];
            }
          }
          for (int64_t r = 0; r < rows; ++r) {
            T* dst = out + (b + r0 + r) * so + h * D;
            for (int d = 0; d < DV; ++d)
              for (int c = 0; c < W; ++c) put(o[r][d][c] * inv[r], dst + d * W + c);
          }
        }
      }
    }
  });
}

template <typename T>
void dispatch(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
              const torch::Tensor& starts, const torch::Tensor& lens, torch::Tensor& out,
              bool causal) {
  const int64_t d = q.size(2);
  auto f = d == 16 ? run<T, 16> : d == 32 ? run<T, 32> : d == 64 ? run<T, 64> : run<T, 128>;
  f(reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
    reinterpret_cast<const T*>(v.data_ptr()), q.stride(0), k.stride(0), v.stride(0),
    starts.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), reinterpret_cast<T*>(out.data_ptr()),
    out.stride(0), lens.size(0), q.size(1), k.size(1), causal);
}

}  // namespace

// q [T, heads, d], k and v [T, kv_heads, d] (kv_heads dividing heads: grouped-query attention;
// rows at any stride, as views of a fused QKV projection; each row's heads contiguous), float32
// or bfloat16, d 16, 32, 64 or 128; starts, lens [n] int64: sequence i is rows [starts[i], starts[i]
// + lens[i]); `causal`: a row sees its sequence's keys up to its own (a decoder's fresh prompt).
// -> [T, heads, d] in q's dtype; rows of no sequence are left unwritten.
torch::Tensor packed_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor starts, torch::Tensor lens, bool causal) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() &&
                  k.size(0) == q.size(0) && k.size(2) == q.size(2),
              "packed_attention: q must be [T, heads, d] and k, v [T, kv_heads, d] alike");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "packed_attention: the KV heads must divide the query heads");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "packed_attention: q, k, v differ in dtype");
  const int64_t d = q.size(2);
  TORCH_CHECK(d == 16 || d == 32 || d == 64 || d == 128,
              "packed_attention: head size must be 16, 32, 64 or 128");
  for (const auto& t : {q, k, v})
    TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == d, "packed_attention: a row's heads must be contiguous");
  starts = starts.to(torch::kLong).contiguous();
  lens = lens.to(torch::kLong).contiguous();
  auto out = torch::empty(q.sizes(), q.options());
  if (q.scalar_type() == torch::kFloat) {
    dispatch<float>(q, k, v, starts, lens, out, causal);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "packed_attention: dtype must be float32 or bfloat16");
    dispatch<at::BFloat16>(q, k, v, starts, lens, out, causal);
  }
  return out;
}
