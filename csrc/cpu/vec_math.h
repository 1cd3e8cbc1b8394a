// Small float vector helpers for the C++ CPU kernels (query_fusion.cpp, distill_loss.cpp), written with GCC
// vector extensions: v16 = 16 floats (one zmm in AVX-512 code, two ymm in AVX2 code), v8 = 8 floats (one ymm).
// Everything is always_inline so that it is compiled for the ISA of the __attribute__((target(...))) function
// that uses it (one per ISA, chosen at run time: the kernels' per-ISA tables). The templates (loadv, storev,
// splatv, vexp) take either width.
#pragma once

#include <cstdint>

namespace amfor {
namespace vec {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));

// The int vector, unaligned alias and width of a float vector type.
template <class V> struct VecTraits;
template <> struct VecTraits<v16> { using I = v16i; using U = v16u; static constexpr int64_t W = 16; };
template <> struct VecTraits<v8> { using I = v8i; using U = v8u; static constexpr int64_t W = 8; };

template <class V>
__attribute__((always_inline)) inline V loadv(const float* p) {
  return *reinterpret_cast<const typename VecTraits<V>::U*>(p);
}
template <class V>
__attribute__((always_inline)) inline void storev(float* p, V x) {
  *reinterpret_cast<typename VecTraits<V>::U*>(p) = x;
}
template <class V>
__attribute__((always_inline)) inline V splatv(float x) { return V{} + x; }

// exp of a float vector (Cephes expf polynomial, ~1 ulp); arguments below -87.3 (and -inf) give exactly 0.
template <class V>
__attribute__((always_inline)) inline V vexp(V x) {
  using I = typename VecTraits<V>::I;
  const V lo = splatv<V>(-87.3f);
  const V xc = x < lo ? lo : x;
  const V magic = splatv<V>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (xc * 1.44269504088896341f + magic) - magic;
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V y = splatv<V>(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  y = y * (V)bits;
  return x < lo ? V{} : y;
}

// The widest instruction set the kernels have a build for on this CPU, read once: each kernel file compiles its
// vector code three times (target("avx512f"), target("avx2,fma"), no target) and picks the build by this.
enum class Isa { portable, avx2_fma, avx512 };

inline Isa cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2_fma;
    return Isa::portable;
  }();
  return isa;
#else
  return Isa::portable;
#endif
}

}  // namespace vec
}  // namespace amfor
