// What the CPU kernels share: a vector of 16 floats (GCC/Clang vector extensions: one AVX-512
// register where the CPU has it, split by the compiler into AVX2 or SSE registers where it has
// not; no intrinsics but one mask compare, `at_least`) and the widening and rounding between
// float32 and bfloat16.
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <cstring>
#include <type_traits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace vec {

constexpr int W = 16;  // floats a vector
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
// bfloat16 is the top half of a float32: widening is a shift
inline vf load(const at::BFloat16* p) {
  vh h; std::memcpy(&h, p, sizeof h);
  const vu u = __builtin_convertvector(h, vu) << 16;
  vf v; std::memcpy(&v, &u, sizeof v); return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// rounded to nearest, ties to even, as at::BFloat16 does; a NaN stays a (quiet) NaN
inline void store(at::BFloat16* p, vf v) {
  vu u; std::memcpy(&u, &v, sizeof u);
  u = (u + (((u >> 16) & 1) + 0x7fff)) >> 16;
  u = (v != v) ? vu{} + 0x7fc0 : u;
  const vh h = __builtin_convertvector(u, vh);
  std::memcpy(p, &h, sizeof h);
}
inline vf splat(float x) { return vf{} + x; }
// a outranks b as torch's max ranks them: larger, or NaN where b is not (the first NaN wins)
inline bool above(float a, float b) { return a > b || (a != a && b == b); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
// across the lanes by halves: four shuffles, each folding the upper half of the lanes still
// counted onto the lower (a lane-by-lane loop would be a chain of 15 dependent steps)
template <typename F>
inline float reduce(vf v, F&& f) {
  v = f(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = f(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3));
  v = f(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1));
  v = f(v, __builtin_shufflevector(v, v, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0));
  return v[0];
}
inline float hmax(vf v) { return reduce(v, [](vf a, vf b) { return vmax(a, b); }); }
inline float hsum(vf v) { return reduce(v, [](vf a, vf b) { return a + b; }); }
// the lanes where y >= c, as bits (lane l: bit l): one compare into a mask register with
// AVX-512, a loop over the lanes elsewhere
inline uint32_t at_least(vf y, vf c) {
#ifdef __AVX512F__
  return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(y), reinterpret_cast<__m512>(c), _CMP_GE_OQ);
#else
  uint32_t bits = 0;
  for (int l = 0; l < W; ++l) bits |= static_cast<uint32_t>(y[l] >= c[l]) << l;
  return bits;
#endif
}

// exp(x): 2^(x log2 e), the integer part into the exponent bits, the fraction by a degree-6
// polynomial (relative error ~2e-7, as float32's own rounding); 0 below -87 (a padded key's
// score less its row's max is -inf) and exp(88) above 88.
inline vf vexp(vf x) {
  const vi gone = x < -87.f;
  x = vmax(x, splat(-87.f));
  x = x < 88.f ? x : splat(88.f);
  const vf t = x * 1.44269504088896341f;
  vi ti = __builtin_convertvector(t, vi);            // rounds toward zero,
  ti += __builtin_convertvector(ti, vf) > t;         // so one less where that went up: floor
  const vf f = t - __builtin_convertvector(ti, vf);  // in [0, 1)
  vf p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const vf two = (vf)((ti + 127) << 23);  // 2^ti
  return gone ? splat(0.f) : p * two;
}

// v as T holds it: rounded to bfloat16 and back (a torch op in bfloat16 rounds its result so
// before the next op reads it), or v itself for float32
template <typename T>
inline vf as(vf v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    T r[W];
    store(r, v);
    return load(r);
  }
}

// one element: the same widening, which the compiler vectorises in loops; and rounding back
inline float to_f(float x) { return x; }
inline float to_f(at::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline void put(float x, float* d) { *d = x; }
inline void put(float x, at::BFloat16* d) { *d = at::BFloat16(x); }

}  // namespace vec
