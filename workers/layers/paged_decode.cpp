// Decode attention over the paged KV cache, on CPU: one query token per sequence against its
// keys, each read once, in place, from its cache block (no gathered copy). Built on first use by
// workers/layers/native.py (torch.utils.cpp_extension) for the machine it runs on.
//
// Each cache slot holds every KV head's vector contiguously ([blocks, block_size, kv_heads, d]),
// so a work item takes one sequence's slots front to back for all its heads: two passes (keys,
// then values) of sequential reads, prefetching ahead across its scattered blocks, with float32
// accumulation whatever the cache's dtype.
#include "vec.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>

// Slots ahead to prefetch: the hardware's prefetchers lose the stream at every block (blocks
// are scattered) and every 4 KB page; asking for the slot 4 ahead (8 KB for GPT-2 8 x 512 in
// float32) took a layer of 128 sequences x 200 keys from 3.3 to 1.9 ms here (2 and 8: slower).
constexpr int64_t AHEAD = 4;

// Calls f(slot, j) for a sequence's keys j < len in order, `slot` pointing at this item's heads
// in cache slot j (its block from `tab`, `bs` slots a block, `row` elements a slot), while
// prefetching the bytes of the slot AHEAD after it (past a block's end: in the next block).
template <typename T, typename F>
static inline void each_slot(const T* cache, const int64_t* tab, int64_t len, int64_t bs,
                             int64_t row, int64_t bytes, F&& f) {
  for (int64_t j0 = 0; j0 < len; j0 += bs) {
    const T* base = cache + tab[j0 / bs] * bs * row;
    const T* next = j0 + bs < len ? cache + tab[j0 / bs + 1] * bs * row : base;
    const int64_t stop = std::min(bs, len - j0);
    for (int64_t t = 0; t < stop; ++t) {
      const int64_t k = t + AHEAD;
      const T* ahead = k < bs ? base + k * row : next + std::min(k - bs, bs - 1) * row;
      for (int64_t c = 0; c < bytes; c += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(ahead) + c);
      f(base + t * row, j0 + t);
    }
  }
}

using namespace vec;

// Which query heads one work item takes: one sequence's KV heads [h0, h0 + part) and their
// `part * rep` query heads. All of a sequence's heads when there are sequences enough to keep
// every thread busy (each slot is then read whole, front to back), else one KV head each.
struct Split {
  int64_t parts, part, heads;
  Split(int64_t n, int64_t kvh, int64_t rep)
      : parts(n >= 2 * at::get_num_threads() ? 1 : kvh), part(kvh / parts), heads(part * rep) {}
};

// D a multiple of W, known when compiled: whole vectors, keys and values held in registers
// while every query head of their KV head uses them; the softmax's exp vectorised too (as a
// scalar loop it was half of this kernel's time for 8 query heads on 2 KV heads).
template <typename T, int D>
static void run_vec(const float* q, const T* kc, const T* vc, const int64_t* blocks,
                    const int64_t* lens, float* out, float* lse, int64_t n, int64_t m,
                    int64_t kvh, int64_t rep, int64_t bs) {
  constexpr int DV = D / W;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t row = kvh * D;
  const Split split(n, kvh, rep);
  at::parallel_for(0, n * split.parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s, inv(split.heads);
    std::vector<vf> acc(split.heads * DV);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w / split.parts, h0 = (w % split.parts) * split.part, len = lens[i];
      const int64_t lp = (len + W - 1) / W * W;  // a row of scores, padded with -inf
      const float* qi = q + (i * kvh + h0) * rep * D;
      const int64_t* tab = blocks + i * m;
      s.assign(split.heads * lp, -INFINITY);
      float* sc = s.data();
      const int64_t bytes = split.part * D * static_cast<int64_t>(sizeof(T));
      each_slot(kc + h0 * D, tab, len, bs, row, bytes, [&](const T* kp, int64_t j) {
        for (int64_t h = 0; h < split.part; ++h) {
          vf k[DV];
          for (int d = 0; d < DV; ++d) k[d] = load(kp + h * D + d * W);
          for (int64_t g = h * rep; g < (h + 1) * rep; ++g) {
            const float* qg = qi + g * D;
            vf dot = load(qg) * k[0];
            for (int d = 1; d < DV; ++d) dot += load(qg + d * W) * k[d];
            sc[g * lp + j] = hsum(dot) * scale;
          }
        }
      });
      for (int64_t g = 0; g < split.heads; ++g) {
        float* sg = sc + g * lp;
        vf top = splat(-INFINITY);
        for (int64_t j = 0; j < lp; j += W) top = vmax(top, load(sg + j));
        const float mx = hmax(top);
        vf sum = {};
        for (int64_t j = 0; j < lp; j += W) {
          const vf p = vexp(load(sg + j) - mx);
          store(sg + j, p);
          sum += p;
        }
        const float z = hsum(sum);
        lse[(i * kvh + h0) * rep + g] = mx + std::log(z);
        inv[g] = 1.f / z;  // applied once to the output, not to every weight
      }
      std::fill(acc.begin(), acc.end(), vf{});
      each_slot(vc + h0 * D, tab, len, bs, row, bytes, [&](const T* vp, int64_t j) {
        for (int64_t h = 0; h < split.part; ++h) {
          vf v[DV];
          for (int d = 0; d < DV; ++d) v[d] = load(vp + h * D + d * W);
          for (int64_t g = h * rep; g < (h + 1) * rep; ++g) {
            const vf p = splat(sc[g * lp + j]);
            vf* a = acc.data() + g * DV;
            for (int d = 0; d < DV; ++d) a[d] += p * v[d];
          }
        }
      });
      float* o = out + (i * kvh + h0) * rep * D;
      for (int64_t g = 0; g < split.heads; ++g)
        for (int d = 0; d < DV; ++d) store(o + g * D + d * W, acc[g * DV + d] * inv[g]);
    }
  });
}

// Any other head size, known at run time: scalar loops the compiler vectorises where it can.
template <typename T>
static void run(const float* q, const T* kc, const T* vc, const int64_t* blocks,
                const int64_t* lens, float* out, float* lse, int64_t n, int64_t m,
                int64_t kvh, int64_t rep, int64_t bs, int64_t D_) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(D_));
  const int64_t row = kvh * D_;  // one cache slot: every KV head's vector, contiguous
  const Split split(n, kvh, rep);
  const int64_t parts = split.parts, part = split.part, heads = split.heads;
  at::parallel_for(0, n * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s, acc(heads * D_);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w / parts, h0 = (w % parts) * part, len = lens[i];
      const float* qi = q + (i * kvh + h0) * rep * D_;  // query head g of the item at g * D_
      const int64_t* tab = blocks + i * m;
      s.resize(heads * len);  // [heads, len]
      float* sp = s.data();
      const int64_t bytes = part * D_ * static_cast<int64_t>(sizeof(T));  // this item's heads
      each_slot(kc + h0 * D_, tab, len, bs, row, bytes, [&](const T* kp, int64_t j) {
        for (int64_t g = 0; g < heads; ++g) {
          const float* qg = qi + g * D_;
          const T* kh = kp + (g / rep) * D_;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t e = 0; e < D_; ++e) dot += qg[e] * to_f(kh[e]);
          sp[g * len + j] = dot * scale;
        }
      });
      for (int64_t g = 0; g < heads; ++g) {
        float* sg = sp + g * len;
        float mx = -INFINITY;
        for (int64_t j = 0; j < len; ++j) mx = std::max(mx, sg[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < len; ++j) { const float p = std::exp(sg[j] - mx); sg[j] = p; sum += p; }
        lse[(i * kvh + h0) * rep + g] = mx + std::log(sum);
        const float inv = 1.f / sum;  // normalised here, so the output needs no pass of its own
        for (int64_t j = 0; j < len; ++j) sg[j] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      each_slot(vc + h0 * D_, tab, len, bs, row, bytes, [&](const T* vp, int64_t j) {
        for (int64_t g = 0; g < heads; ++g) {
          const float p = sp[g * len + j];
          const T* vh = vp + (g / rep) * D_;
          float* a = acc.data() + g * D_;
#pragma omp simd
          for (int64_t e = 0; e < D_; ++e) a[e] += p * to_f(vh[e]);
        }
      });
      std::memcpy(out + (i * kvh + h0) * rep * D_, acc.data(), heads * D_ * sizeof(float));
    }
  });
}

template <typename T>
static void dispatch(int64_t d, const float* q, const T* kc, const T* vc, const int64_t* blocks,
                     const int64_t* lens, float* out, float* lse, int64_t n, int64_t m,
                     int64_t kvh, int64_t rep, int64_t bs) {
  switch (d) {
    case 16: return run_vec<T, 16>(q, kc, vc, blocks, lens, out, lse, n, m, kvh, rep, bs);
    case 32: return run_vec<T, 32>(q, kc, vc, blocks, lens, out, lse, n, m, kvh, rep, bs);
    case 64: return run_vec<T, 64>(q, kc, vc, blocks, lens, out, lse, n, m, kvh, rep, bs);
    case 128: return run_vec<T, 128>(q, kc, vc, blocks, lens, out, lse, n, m, kvh, rep, bs);
    default: return run<T>(q, kc, vc, blocks, lens, out, lse, n, m, kvh, rep, bs, d);
  }
}

// q [n, kv_heads, rep, d] (the query heads of each KV head as its rows); caches [blocks,
// block_size, kv_heads, d], float32 or bfloat16; blocks [n, m] each sequence's blocks (entries past
// its keys are not read); lens [n] its keys. -> (out [n, kv_heads, rep, d] in q's dtype, log-sum-exp
// [n, kv_heads, rep] float32, to merge with other keys' parts).
std::vector<torch::Tensor> paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                        torch::Tensor blocks, torch::Tensor lens) {
  auto qf = q.to(torch::kFloat).contiguous();
  blocks = blocks.to(torch::kLong).contiguous();
  lens = lens.to(torch::kLong).contiguous();
  const int64_t n = q.size(0), kvh = q.size(1), rep = q.size(2), d = q.size(3);
  const int64_t m = blocks.size(1), bs = k_cache.size(1);
  auto out = torch::empty({n, kvh, rep, d}, qf.options());
  auto lse = torch::empty({n, kvh, rep}, qf.options());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_decode: K and V caches differ in dtype");
  if (k_cache.scalar_type() == torch::kFloat) {
    dispatch<float>(d, qf.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
               blocks.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(),
               lse.data_ptr<float>(), n, m, kvh, rep, bs);
  } else {
    TORCH_CHECK(k_cache.scalar_type() == torch::kBFloat16, "paged_decode: cache dtype must be float32 or bfloat16");
    dispatch<at::BFloat16>(d, qf.data_ptr<float>(), k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(),
               blocks.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(),
               lse.data_ptr<float>(), n, m, kvh, rep, bs);
  }
  return {out.to(q.scalar_type()), lse};
}
