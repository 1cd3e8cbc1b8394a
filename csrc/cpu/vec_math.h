// Small float vector helpers for the C++ CPU kernels (query_fusion.cpp, distill_loss.cpp), written with GCC
// vector extensions: v16 = 16 floats, one zmm in an AVX-512 clone, two ymm in an AVX2 clone. Everything is
// always_inline so that it is compiled for the ISA of the __attribute__((target_clones(...))) function that uses it.
#pragma once

#include <cstdint>

namespace amfor {
namespace vec {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

__attribute__((always_inline)) inline v16 load16(const float* p) { return *reinterpret_cast<const v16u*>(p); }
__attribute__((always_inline)) inline void store16(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
__attribute__((always_inline)) inline v16 splat16(float x) { return v16{} + x; }

// exp of a float vector (Cephes expf polynomial, ~1 ulp); arguments below -87.3 (and -inf) give exactly 0.
__attribute__((always_inline)) inline v16 vexp16(v16 x) {
  const v16 lo = splat16(-87.3f);
  const v16 xc = x < lo ? lo : x;
  const v16 magic = splat16(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v16 n = (xc * 1.44269504088896341f + magic) - magic;
  v16 r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 y = splat16(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  y = y * (v16)bits;
  return x < lo ? v16{} : y;
}

}  // namespace vec
}  // namespace amfor
