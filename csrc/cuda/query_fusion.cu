// CUDA kernels of query_fusion_attention (see amfor/ops/query_fusion.py for the semantics and
// csrc/cpu/query_fusion.cpp for the same algorithm written plainly).
//
// A block of 8 warps owns 8 query rows (head, query) of one key/value head group of one image; each warp owns
// one row, its q / output / running sums spread over the lanes (lane holds d-columns lane + 32 j, j < DPL).
// The block stages TN tokens of keys and values in shared memory (16-byte loads where rows allow, converted
// to acc_t), so each token is read from global memory once per 8 rows; per token, a score is a lane-split
// dot product closed by a warp shuffle reduction. Forward keeps the online softmax per layer and the
// layer-weighted sum in registers. Backward: dq_kernel (one warp per row, as the forward) writes dq and
// t = dout . o_l; dkdv_kernel gives each block TN tokens of one layer and loops over all rows of the group,
// 8 at a time, each thread owning fixed (token, column) elements of dk and dv: deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <limits>
#include <vector>

#include "../query_fusion.h"

namespace amfor {
namespace {

using query_fusion::LayerView;

constexpr int kWarp = 32;
constexpr int kWarps = 8;  // rows per block: one per warp
constexpr int kThreads = kWarp * kWarps;
constexpr int kMaxLayers = 32;  // per-layer pointers travel by value in the kernel parameters
constexpr int kMaxHeadDim = 1024;

template <typename acc_t>
struct Params {
  const void* k[kMaxLayers];  // layer l's keys [B, Hkv, N, d]
  const void* v[kMaxLayers];  // layer l's values [B, Hkv, N, d]
  int64_t sk_b, sk_h, sk_n, sv_b, sv_h, sv_n;  // strides shared by all layers (unit stride in d)
  int64_t H, Hkv, G, Q, L, N, d, Qm;  // G = H / Hkv; Qm = 1 or Q (mask extent over queries)
  acc_t scale;
  bool vec_k, vec_v;  // 16-byte loads allowed for keys / values
};

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// dst[n][c] (row pitch DP) = tokens n0 + n of `base` (row stride sn), zero beyond N and in columns d..DP.
template <typename scalar_t, typename acc_t, int TN, int DP>
__device__ void load_tile(acc_t* dst, const scalar_t* base, int64_t sn, int64_t n0, int64_t N, int64_t d, bool vec) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  if (vec) {
    const int64_t per_row = d / VEC;
    for (int64_t idx = threadIdx.x; idx < TN * per_row; idx += kThreads) {
      const int64_t n = idx / per_row, c = (idx % per_row) * VEC;
      Pack<scalar_t, VEC> pk;
      if (n0 + n < N) {
        pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(base + (n0 + n) * sn + c);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) pk.v[i] = scalar_t(0);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) dst[n * DP + c + i] = static_cast<acc_t>(pk.v[i]);
    }
  } else {
    for (int64_t idx = threadIdx.x; idx < TN * d; idx += kThreads) {
      const int64_t n = idx / d, c = idx % d;
      dst[n * DP + c] = n0 + n < N ? static_cast<acc_t>(base[(n0 + n) * sn + c]) : acc_t(0);
    }
  }
  for (int64_t idx = threadIdx.x; idx < TN * (DP - d); idx += kThreads) {
    const int64_t n = idx / (DP - d), c = d + idx % (DP - d);
    dst[n * DP + c] = acc_t(0);
  }
}

// Lane-split dot product of a register row (columns lane + 32 j) with shared row `row`, summed over the warp.
template <typename acc_t, int DPL>
__device__ __forceinline__ acc_t row_dot(const acc_t (&reg)[DPL], const acc_t* row, int lane) {
  acc_t part = 0;
#pragma unroll
  for (int j = 0; j < DPL; ++j) part += reg[j] * row[lane + kWarp * j];
  return warp_sum(part);
}

template <typename scalar_t, typename acc_t, int DPL>
__device__ __forceinline__ void load_row(acc_t (&reg)[DPL], const scalar_t* src, int64_t d, int lane, bool ok) {
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    const int64_t c = lane + kWarp * j;
    reg[j] = ok && c < d ? static_cast<acc_t>(src[c]) : acc_t(0);
  }
}

__device__ __forceinline__ const bool* mask_row(const bool* mask, const int64_t b, const int64_t qi, const int64_t l,
                                                 const int64_t Qm, const int64_t L, const int64_t N) {
  return mask == nullptr ? nullptr : mask + ((b * Qm + (Qm > 1 ? qi : 0)) * L + l) * N;
}

// The query row of this warp in a row-block kernel: block = (image b, kv head hk, block of 8 rows of the group's
// G * Q (head, query) rows); grow = the row's flat index in [B, H, Q]; ok = false past the group's last row.
struct WarpRow {
  int64_t b, hk, qi, grow;
  bool ok;
};

template <typename acc_t>
__device__ __forceinline__ WarpRow warp_row(const Params<acc_t>& P) {
  const int64_t GQ = P.G * P.Q, num_m = (GQ + kWarps - 1) / kWarps;
  const int64_t mb = blockIdx.x % num_m, hk = (blockIdx.x / num_m) % P.Hkv, b = blockIdx.x / (num_m * P.Hkv);
  const int64_t r = mb * kWarps + threadIdx.x / kWarp;
  return {b, hk, r % P.Q, (b * P.H + hk * P.G) * P.Q + r, r < GQ};
}

// Forward: grid B * Hkv * ceil(G Q / 8) blocks of 256 threads; dynamic smem 2 * TN * DP acc_t.
template <typename scalar_t, typename acc_t, int DPL, int TN>
__global__ void __launch_bounds__(kThreads) fwd_kernel(Params<acc_t> P,
                                                       const scalar_t* __restrict__ q,  // [B, H, Q, d]
                                                       const acc_t* __restrict__ w,     // [B, Q, L]
                                                       const bool* __restrict__ mask,   // [B, Qm, L, N] or nullptr
                                                       scalar_t* __restrict__ out,      // [B, H, Q, d]
                                                       acc_t* __restrict__ lse) {       // [B, H, Q, L]
  constexpr int DP = kWarp * DPL;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* k_s = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* v_s = k_s + TN * DP;
  const int lane = threadIdx.x % kWarp;
  const auto [b, hk, qi, grow, row_ok] = warp_row(P);
  acc_t qr[DPL], o[DPL], total[DPL];
  load_row<scalar_t, acc_t, DPL>(qr, q + grow * P.d, P.d, lane, row_ok);
#pragma unroll
  for (int j = 0; j < DPL; ++j) total[j] = 0;
  for (int64_t l = 0; l < P.L; ++l) {
    const scalar_t* kb = static_cast<const scalar_t*>(P.k[l]) + b * P.sk_b + hk * P.sk_h;
    const scalar_t* vb = static_cast<const scalar_t*>(P.v[l]) + b * P.sv_b + hk * P.sv_h;
    const bool* mrow = mask_row(mask, b, qi, l, P.Qm, P.L, P.N);
    acc_t m = neg_inf<acc_t>(), lsum = 0;
#pragma unroll
    for (int j = 0; j < DPL; ++j) o[j] = 0;
    for (int64_t n0 = 0; n0 < P.N; n0 += TN) {
      __syncthreads();
      load_tile<scalar_t, acc_t, TN, DP>(k_s, kb, P.sk_n, n0, P.N, P.d, P.vec_k);
      load_tile<scalar_t, acc_t, TN, DP>(v_s, vb, P.sv_n, n0, P.N, P.d, P.vec_v);
      __syncthreads();
      if (!row_ok) continue;
      acc_t s[TN];
      acc_t tile_max = neg_inf<acc_t>();
#pragma unroll
      for (int n = 0; n < TN; ++n) {
        const bool valid = n0 + n < P.N && (mrow == nullptr || mrow[n0 + n]);
        const acc_t dot = row_dot<acc_t, DPL>(qr, k_s + n * DP, lane);
        s[n] = valid ? dot * P.scale : neg_inf<acc_t>();
        tile_max = max(tile_max, s[n]);
      }
      const acc_t m_new = max(m, tile_max);
      const acc_t m_safe = m_new == neg_inf<acc_t>() ? acc_t(0) : m_new;
      const acc_t alpha = ::exp(m - m_safe);
      lsum *= alpha;
#pragma unroll
      for (int j = 0; j < DPL; ++j) o[j] *= alpha;
#pragma unroll
      for (int n = 0; n < TN; ++n) {
        const acc_t p = s[n] == neg_inf<acc_t>() ? acc_t(0) : ::exp(s[n] - m_safe);
        lsum += p;
#pragma unroll
        for (int j = 0; j < DPL; ++j) o[j] += p * v_s[n * DP + lane + kWarp * j];
      }
      m = m_new;
    }
    if (row_ok) {
      const acc_t f = lsum > 0 ? w[(b * P.Q + qi) * P.L + l] / lsum : acc_t(0);
#pragma unroll
      for (int j = 0; j < DPL; ++j) total[j] += f * o[j];
      if (lane == 0) lse[grow * P.L + l] = lsum > 0 ? m + ::log(lsum) : neg_inf<acc_t>();
    }
  }
  if (!row_ok) return;
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    const int64_t c = lane + kWarp * j;
    if (c < P.d) out[grow * P.d + c] = static_cast<scalar_t>(total[j]);
  }
}

// dq and t[row, l] = dout . o_l: grid and smem as fwd_kernel.
template <typename scalar_t, typename acc_t, int DPL, int TN>
__global__ void __launch_bounds__(kThreads) dq_kernel(Params<acc_t> P,
                                                      const scalar_t* __restrict__ grad,  // [B, H, Q, d]
                                                      const scalar_t* __restrict__ q,     // [B, H, Q, d]
                                                      const acc_t* __restrict__ w,        // [B, Q, L]
                                                      const bool* __restrict__ mask,      // [B, Qm, L, N] or nullptr
                                                      const acc_t* __restrict__ lse,      // [B, H, Q, L]
                                                      scalar_t* __restrict__ dq,          // [B, H, Q, d]
                                                      acc_t* __restrict__ t) {            // [B, H, Q, L]
  constexpr int DP = kWarp * DPL;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* k_s = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* v_s = k_s + TN * DP;
  const int lane = threadIdx.x % kWarp;
  const auto [b, hk, qi, grow, row_ok] = warp_row(P);
  acc_t qr[DPL], gr[DPL], a[DPL], kbar[DPL], acc[DPL];
  load_row<scalar_t, acc_t, DPL>(qr, q + grow * P.d, P.d, lane, row_ok);
  load_row<scalar_t, acc_t, DPL>(gr, grad + grow * P.d, P.d, lane, row_ok);
#pragma unroll
  for (int j = 0; j < DPL; ++j) acc[j] = 0;
  for (int64_t l = 0; l < P.L; ++l) {
    const scalar_t* kb = static_cast<const scalar_t*>(P.k[l]) + b * P.sk_b + hk * P.sk_h;
    const scalar_t* vb = static_cast<const scalar_t*>(P.v[l]) + b * P.sv_b + hk * P.sv_h;
    const bool* mrow = mask_row(mask, b, qi, l, P.Qm, P.L, P.N);
    const acc_t lse_l = row_ok ? lse[grow * P.L + l] : neg_inf<acc_t>();
    const bool live = row_ok && lse_l != neg_inf<acc_t>();
    acc_t tl = 0;
#pragma unroll
    for (int j = 0; j < DPL; ++j) a[j] = kbar[j] = 0;
    for (int64_t n0 = 0; n0 < P.N; n0 += TN) {
      __syncthreads();
      load_tile<scalar_t, acc_t, TN, DP>(k_s, kb, P.sk_n, n0, P.N, P.d, P.vec_k);
      load_tile<scalar_t, acc_t, TN, DP>(v_s, vb, P.sv_n, n0, P.N, P.d, P.vec_v);
      __syncthreads();
      if (!live) continue;
#pragma unroll
      for (int n = 0; n < TN; ++n) {
        const bool valid = n0 + n < P.N && (mrow == nullptr || mrow[n0 + n]);
        const acc_t s = row_dot<acc_t, DPL>(qr, k_s + n * DP, lane);
        const acc_t dp = row_dot<acc_t, DPL>(gr, v_s + n * DP, lane);
        const acc_t p = valid ? ::exp(s * P.scale - lse_l) : acc_t(0);
        tl += p * dp;
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
          const acc_t kv = k_s[n * DP + lane + kWarp * j];
          a[j] += p * dp * kv;
          kbar[j] += p * kv;
        }
      }
    }
    if (row_ok) {
      const acc_t wl = w[(b * P.Q + qi) * P.L + l];
#pragma unroll
      for (int j = 0; j < DPL; ++j) acc[j] += wl * (a[j] - tl * kbar[j]);
      if (lane == 0) t[grow * P.L + l] = tl;
    }
  }
  if (!row_ok) return;
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    const int64_t c = lane + kWarp * j;
    if (c < P.d) dq[grow * P.d + c] = static_cast<scalar_t>(acc[j] * P.scale);
  }
}

// dk, dv: grid B * Hkv * L * ceil(N / TN) blocks of 256 threads; dynamic smem (2 TN DP + 2 * 8 DP + 2 * 8 TN) acc_t.
template <typename scalar_t, typename acc_t, int DPL, int TN>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(Params<acc_t> P,
                                                        const scalar_t* __restrict__ grad,  // [B, H, Q, d]
                                                        const scalar_t* __restrict__ q,     // [B, H, Q, d]
                                                        const acc_t* __restrict__ w,        // [B, Q, L]
                                                        const bool* __restrict__ mask,      // [B, Qm, L, N] or nullptr
                                                        const acc_t* __restrict__ lse,      // [B, H, Q, L]
                                                        const acc_t* __restrict__ t,        // [B, H, Q, L]
                                                        scalar_t* __restrict__ dk,          // [B, Hkv, L, N, d]
                                                        scalar_t* __restrict__ dv) {        // [B, Hkv, L, N, d]
  constexpr int DP = kWarp * DPL;
  constexpr int EPT = TN * DP / kThreads;  // (token, column) elements owned by each thread
  static_assert(TN * DP % kThreads == 0, "a tile must split evenly over the threads");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* k_s = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* v_s = k_s + TN * DP;
  acc_t* q_s = v_s + TN * DP;     // [8][DP] the rows of this step
  acc_t* g_s = q_s + kWarps * DP;  // [8][DP] their output gradients
  acc_t* p_s = g_s + kWarps * DP;  // [8][TN] w p
  acc_t* ds_s = p_s + kWarps * TN;  // [8][TN] w p (dp - t)
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t num_nb = (P.N + TN - 1) / TN;
  const int64_t nb = blockIdx.x % num_nb, l = (blockIdx.x / num_nb) % P.L;
  const int64_t hk = (blockIdx.x / (num_nb * P.L)) % P.Hkv, b = blockIdx.x / (num_nb * P.L * P.Hkv);
  const int64_t n0 = nb * TN, GQ = P.G * P.Q;
  const scalar_t* kb = static_cast<const scalar_t*>(P.k[l]) + b * P.sk_b + hk * P.sk_h;
  const scalar_t* vb = static_cast<const scalar_t*>(P.v[l]) + b * P.sv_b + hk * P.sv_h;
  load_tile<scalar_t, acc_t, TN, DP>(k_s, kb, P.sk_n, n0, P.N, P.d, P.vec_k);
  load_tile<scalar_t, acc_t, TN, DP>(v_s, vb, P.sv_n, n0, P.N, P.d, P.vec_v);
  acc_t ak[EPT], av[EPT];
#pragma unroll
  for (int i = 0; i < EPT; ++i) ak[i] = av[i] = 0;
  const int64_t row0 = (b * P.H + hk * P.G) * P.Q;  // the group's rows are contiguous
  for (int64_t r0 = 0; r0 < GQ; r0 += kWarps) {
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < kWarps * DP; idx += kThreads) {
      const int64_t rr = idx / DP, c = idx % DP;
      const bool ok = r0 + rr < GQ && c < P.d;
      q_s[idx] = ok ? static_cast<acc_t>(q[(row0 + r0 + rr) * P.d + c]) : acc_t(0);
      g_s[idx] = ok ? static_cast<acc_t>(grad[(row0 + r0 + rr) * P.d + c]) : acc_t(0);
    }
    __syncthreads();
    const int64_t r = r0 + warp, qi = r % P.Q, grow = row0 + r;
    const acc_t lse_l = r < GQ ? lse[grow * P.L + l] : neg_inf<acc_t>();
    const bool live = r < GQ && lse_l != neg_inf<acc_t>();
    const acc_t wl = live ? w[(b * P.Q + qi) * P.L + l] : acc_t(0);
    const acc_t tl = live ? t[grow * P.L + l] : acc_t(0);
    const bool* mrow = mask_row(mask, b, qi, l, P.Qm, P.L, P.N);
    acc_t qr[DPL], gr[DPL];
#pragma unroll
    for (int j = 0; j < DPL; ++j) {
      qr[j] = q_s[warp * DP + lane + kWarp * j];
      gr[j] = g_s[warp * DP + lane + kWarp * j];
    }
#pragma unroll
    for (int n = 0; n < TN; ++n) {
      acc_t p = 0, ds = 0;
      if (live) {  // uniform over the warp: the shuffles inside row_dot see every lane
        const acc_t s = row_dot<acc_t, DPL>(qr, k_s + n * DP, lane);
        const acc_t dp = row_dot<acc_t, DPL>(gr, v_s + n * DP, lane);
        const bool valid = n0 + n < P.N && (mrow == nullptr || mrow[n0 + n]);
        p = valid ? wl * ::exp(s * P.scale - lse_l) : acc_t(0);
        ds = p * (dp - tl);
      }
      if (lane == 0) {
        p_s[warp * TN + n] = p;
        ds_s[warp * TN + n] = ds;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < EPT; ++i) {
      const int e = threadIdx.x + kThreads * i, n = e / DP, c = e % DP;
#pragma unroll
      for (int rr = 0; rr < kWarps; ++rr) {
        ak[i] += ds_s[rr * TN + n] * q_s[rr * DP + c];
        av[i] += p_s[rr * TN + n] * g_s[rr * DP + c];
      }
    }
  }
  const int64_t out_base = ((b * P.Hkv + hk) * P.L + l) * P.N;
#pragma unroll
  for (int i = 0; i < EPT; ++i) {
    const int e = threadIdx.x + kThreads * i, n = e / DP, c = e % DP;
    if (n0 + n < P.N && c < P.d) {
      dk[(out_base + n0 + n) * P.d + c] = static_cast<scalar_t>(ak[i] * P.scale);
      dv[(out_base + n0 + n) * P.d + c] = static_cast<scalar_t>(av[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side: argument checks (as the CPU file), tile choice, launches
// ---------------------------------------------------------------------------------------------------------
// Limits of the CUDA kernels beyond the shared checks.
void check_cuda_limits(const at::Tensor& q, const LayerView& k) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor");
  TORCH_CHECK(q.size(3) <= kMaxHeadDim, "the cuda kernels support head dims up to ", kMaxHeadDim, ", got ", q.size(3));
  TORCH_CHECK(k.L <= kMaxLayers, "the cuda kernels take at most ", kMaxLayers, " layers, got ", k.L);
}

template <typename acc_t>
Params<acc_t> make_params(const at::Tensor& q, const LayerView& k, const LayerView& v,
                          const std::optional<at::Tensor>& mask, double scale) {
  Params<acc_t> P{};
  for (int64_t l = 0; l < k.L; ++l) {
    P.k[l] = k.ptr[l];
    P.v[l] = v.ptr[l];
  }
  P.sk_b = k.sb, P.sk_h = k.sh, P.sk_n = k.sn, P.sv_b = v.sb, P.sv_h = v.sh, P.sv_n = v.sn;
  P.H = q.size(1), P.Hkv = k.Hkv, P.G = q.size(1) / k.Hkv, P.Q = q.size(2), P.L = k.L, P.N = k.N, P.d = q.size(3);
  P.Qm = mask.has_value() ? mask->size(1) : 1;
  P.scale = static_cast<acc_t>(scale);
  P.vec_k = k.aligned, P.vec_v = v.aligned;
  return P;
}

// Calls fn(std::integral_constant<int, DPL>, std::integral_constant<int, TN>) for head dim d: DPL columns per lane
// (d <= 32 DPL, a power of two) and TN tokens per shared-memory tile (TN * DPL <= 64, at most 32).
template <typename F>
void dispatch_dims(int64_t d, F&& fn) {
  if (d <= 32) return fn(std::integral_constant<int, 1>{}, std::integral_constant<int, 32>{});
  if (d <= 64) return fn(std::integral_constant<int, 2>{}, std::integral_constant<int, 32>{});
  if (d <= 128) return fn(std::integral_constant<int, 4>{}, std::integral_constant<int, 16>{});
  if (d <= 256) return fn(std::integral_constant<int, 8>{}, std::integral_constant<int, 8>{});
  if (d <= 512) return fn(std::integral_constant<int, 16>{}, std::integral_constant<int, 4>{});
  return fn(std::integral_constant<int, 32>{}, std::integral_constant<int, 2>{});
}

// Launch `kernel` with `smem` bytes of dynamic shared memory, raising the opt-in limit above 48 KiB.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t blocks, size_t smem, Args... args) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> query_fusion_attention_cuda(const at::Tensor& q, at::TensorList k, at::TensorList v,
                                                               const at::Tensor& weights,
                                                               const std::optional<at::Tensor>& attn_mask, double scale) {
  check_rank(q, 4, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto kv = query_fusion::layer_view(k, q, "k");
  const auto vv = query_fusion::layer_view(v, q, "v");
  query_fusion::check_inputs(q, kv, vv, weights, attn_mask);
  check_cuda_limits(q, kv);
  auto out = at::empty_like(q);
  if (out.numel() == 0) return {out, query_fusion::empty_head_lse(q, kv, attn_mask, weights.scalar_type())};
  auto lse = at::empty({q.size(0), q.size(1), q.size(2), kv.L}, weights.options());
  const int64_t GQ = (q.size(1) / kv.Hkv) * q.size(2);
  const int64_t blocks = q.size(0) * kv.Hkv * ((GQ + kWarps - 1) / kWarps);
  const bool* mask = attn_mask.has_value() ? attn_mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "query_fusion_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<acc_t>(q, kv, vv, attn_mask, scale);
    dispatch_dims(q.size(3), [&](auto dpl, auto tn) {
      constexpr int DPL = decltype(dpl)::value, TN = decltype(tn)::value;
      const size_t smem = 2 * TN * kWarp * DPL * sizeof(acc_t);
      launch(fwd_kernel<scalar_t, acc_t, DPL, TN>, blocks, smem, P, q.data_ptr<scalar_t>(), weights.data_ptr<acc_t>(),
             mask, out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> query_fusion_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, at::TensorList k, at::TensorList v, const at::Tensor& weights,
    const std::optional<at::Tensor>& attn_mask, double scale, const at::Tensor& lse) {
  check_rank(q, 4, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto kv = query_fusion::layer_view(k, q, "k");
  const auto vv = query_fusion::layer_view(v, q, "v");
  query_fusion::check_inputs(q, kv, vv, weights, attn_mask);
  check_cuda_limits(q, kv);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() && grad_out.is_contiguous(),
              "grad_out must be a contiguous tensor shaped and typed like q");
  check_same_device(q, grad_out, "grad_out");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), kv.L}) &&
              lse.scalar_type() == weights.scalar_type() && lse.is_contiguous(), "lse must be [B, H, Q, L] like the forward's");
  check_same_device(q, lse, "lse");
  const int64_t B = q.size(0), d = q.size(3);
  auto dq = at::empty_like(q);
  auto dk = at::empty({B, kv.Hkv, kv.L, kv.N, d}, q.options());
  auto dv = at::empty({B, kv.Hkv, kv.L, kv.N, d}, q.options());
  auto t = at::zeros({B, q.size(1), q.size(2), kv.L}, weights.options());
  if (q.numel() == 0 || dk.numel() == 0) {
    dk.zero_();
    dv.zero_();
    return {dq.zero_(), dk, dv, t.sum(1)};
  }
  const int64_t GQ = (q.size(1) / kv.Hkv) * q.size(2);
  const bool* mask = attn_mask.has_value() ? attn_mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "query_fusion_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<acc_t>(q, kv, vv, attn_mask, scale);
    dispatch_dims(d, [&](auto dpl, auto tn) {
      constexpr int DPL = decltype(dpl)::value, TN = decltype(tn)::value, DP = kWarp * DPL;
      const int64_t row_blocks = B * kv.Hkv * ((GQ + kWarps - 1) / kWarps);
      launch(dq_kernel<scalar_t, acc_t, DPL, TN>, row_blocks, 2 * TN * DP * sizeof(acc_t), P,
             grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), weights.data_ptr<acc_t>(), mask,
             lse.data_ptr<acc_t>(), dq.data_ptr<scalar_t>(), t.data_ptr<acc_t>());
      const int64_t token_blocks = B * kv.Hkv * kv.L * ((kv.N + TN - 1) / TN);
      const size_t smem = (2 * TN * DP + 2 * kWarps * DP + 2 * kWarps * TN) * sizeof(acc_t);
      launch(dkdv_kernel<scalar_t, acc_t, DPL, TN>, token_blocks, smem, P, grad_out.data_ptr<scalar_t>(),
             q.data_ptr<scalar_t>(), weights.data_ptr<acc_t>(), mask, lse.data_ptr<acc_t>(), t.data_ptr<acc_t>(),
             dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
    });
  });
  return {dq, dk, dv, t.sum(1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(amfor, CUDA, m) {
  m.impl("query_fusion_attention", &query_fusion_attention_cuda);
  m.impl("query_fusion_attention_backward", &query_fusion_attention_backward_cuda);
}

}  // namespace amfor
