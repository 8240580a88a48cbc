// What the CPU kernels share: a vector of 16 floats (GCC/Clang vector extensions: one AVX-512
// register where the CPU has it, split by the compiler into AVX2 or SSE registers where it has
// not; no intrinsics) and the widening and rounding between float32 and bfloat16.
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <cstring>

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
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < W; ++i) m = std::max(m, v[i]); return m; }
inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < W; ++i) s += v[i]; return s; }

// one element: the same widening, which the compiler vectorises in loops; and rounding back
inline float to_f(float x) { return x; }
inline float to_f(at::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline void put(float x, float* d) { *d = x; }
inline void put(float x, at::BFloat16* d) { *d = at::BFloat16(x); }

}  // namespace vec
