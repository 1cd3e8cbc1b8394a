// CUDA kernels of the masked_patches ops (masked_gather, masked_scatter, masked_gather_backward).
//
// One warp moves one output row of D values with 16-byte vector loads and stores (when the row length and
// the pointers allow), adding the position-embedding row in float. The x-gradient of masked_gather sums
// the rows of each token's segment (the k with index[b, k] == n, in increasing k) in one warp: deterministic,
// no atomics, repeated indices allowed. Offsets are int32 when every tensor fits, int64 otherwise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../masked_patches.h"

namespace amfor {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // one warp per row, 256 threads a block

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// out[row] = (src_row >= 0 ? src[b, src_row] : fill) + pos[pos_row] for every output row (b, r).
template <typename scalar_t, typename index_t, typename offset_t, int VEC>
__global__ void gather_rows_kernel(scalar_t* __restrict__ out,           // [B, R, D]
                                   const scalar_t* __restrict__ src,     // [B, S, D]
                                   const index_t* __restrict__ rows,     // [B, R]: source row, -1 = fill
                                   const scalar_t* __restrict__ fill,    // [D] or nullptr
                                   const scalar_t* __restrict__ pos,     // [P, D] or nullptr
                                   bool pos_by_output,                   // pos row r (scatter) or rows[b, r] (gather)
                                   offset_t total_rows, offset_t R, offset_t S, offset_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const offset_t row = static_cast<offset_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= total_rows) return;
  const offset_t b = row / R, r = row % R;
  const index_t raw = rows[row];  // range-checked before narrowing to offset_t
  const bool has_src = raw >= 0 && static_cast<int64_t>(raw) < static_cast<int64_t>(S);
  const offset_t s = has_src ? static_cast<offset_t>(raw) : offset_t(-1);
  const scalar_t* in = has_src ? src + (b * S + s) * D : fill;
  const scalar_t* p = pos == nullptr ? nullptr : pos + (pos_by_output ? r : s) * D;
  const bool pos_ok = p != nullptr && (pos_by_output || has_src);
  scalar_t* o = out + row * D;
  for (offset_t d = static_cast<offset_t>(threadIdx.x) * VEC; d < D; d += kWarp * VEC) {
    pack_t val;
    if (in != nullptr) {
      val = *reinterpret_cast<const pack_t*>(in + d);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) val.v[i] = scalar_t(0);
    }
    if (pos_ok) {
      const pack_t add = *reinterpret_cast<const pack_t*>(p + d);
#pragma unroll
      for (int i = 0; i < VEC; ++i) val.v[i] = static_cast<scalar_t>(static_cast<acc_t>(val.v[i]) + static_cast<acc_t>(add.v[i]));
    }
    *reinterpret_cast<pack_t*>(o + d) = val;
  }
}

// out[b, n] = sum_{j in [starts[b, n], starts[b, n + 1])} grad[b, perm[b, j]]: one warp per output row.
template <typename scalar_t, typename offset_t, int VEC>
__global__ void segment_sum_rows_kernel(scalar_t* __restrict__ out,            // [B, N, D]
                                        const scalar_t* __restrict__ grad,     // [B, K, D]
                                        const int64_t* __restrict__ perm,      // [B, K]: k ordered by (index, k)
                                        const int64_t* __restrict__ starts,    // [B, N + 1]: segment bounds in perm
                                        offset_t total_rows, offset_t N, offset_t K, offset_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const offset_t row = static_cast<offset_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= total_rows) return;
  const offset_t b = row / N, n = row % N;
  const int64_t begin = starts[b * (N + 1) + n], end = starts[b * (N + 1) + n + 1];
  for (offset_t d = static_cast<offset_t>(threadIdx.x) * VEC; d < D; d += kWarp * VEC) {
    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
    for (int64_t j = begin; j < end; ++j) {
      const offset_t k = static_cast<offset_t>(perm[b * K + j]);
      const pack_t g = *reinterpret_cast<const pack_t*>(grad + (b * K + k) * D + d);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += static_cast<acc_t>(g.v[i]);
    }
    pack_t res;
#pragma unroll
    for (int i = 0; i < VEC; ++i) res.v[i] = static_cast<scalar_t>(acc[i]);
    *reinterpret_cast<pack_t*>(out + row * D + d) = res;
  }
}

// inverse[b, index[b, k]] = k for every index value in [0, N); values out of range are skipped (a direct call of the
// op with a bad index must not trip a device-side assert, which would poison the CUDA context: the Python layer
// raises first, and the kernels read rows that no index names as mask tokens). inverse starts filled with -1.
template <typename index_t>
__global__ void inverse_index_kernel(int64_t* __restrict__ inverse,       // [B, N]
                                     const index_t* __restrict__ index,   // [B, K]
                                     int64_t B, int64_t K, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * K) return;
  const int64_t b = i / K, n = static_cast<int64_t>(index[i]);
  if (n >= 0 && n < N) inverse[b * N + n] = i % K;
}

at::Tensor inverse_index(const at::Tensor& index, int64_t N) {
  const int64_t B = index.size(0), K = index.size(1);
  auto idx = index.contiguous();
  auto inverse = at::full({B, N}, -1, idx.options().dtype(at::kLong));
  if (B * K == 0 || N == 0) return inverse;
  constexpr int kThreadsPerBlock = 256;
  const auto blocks = static_cast<unsigned>((B * K + kThreadsPerBlock - 1) / kThreadsPerBlock);
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "masked_scatter_inverse_index", [&] {
    inverse_index_kernel<index_t><<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        inverse.data_ptr<int64_t>(), idx.data_ptr<index_t>(), B, K, N);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return inverse;
}

// Elements per 16-byte vector when the row length and every pointer allow it, else 1.
template <typename scalar_t>
int vector_width(int64_t D, std::initializer_list<const void*> ptrs) {
  constexpr int vec = 16 / sizeof(scalar_t);
  if (D % vec != 0) return 1;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return vec;
}

// Whether int32 offsets are safe: every size, with a margin for the last block's rows and vector steps.
bool fits_int32(std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes) {
    if (s > std::numeric_limits<int32_t>::max() - 4096) return false;
  }
  return true;
}

template <typename scalar_t, typename index_t, typename offset_t, int VEC>
void launch_gather_rows(const at::Tensor& src, const at::Tensor& rows, const scalar_t* fill, const scalar_t* pos,
                        bool pos_by_output, at::Tensor& out) {
  const int64_t total = out.size(0) * out.size(1);
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((total + kRowsPerBlock - 1) / kRowsPerBlock));
  gather_rows_kernel<scalar_t, index_t, offset_t, VEC><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<scalar_t>(), src.data_ptr<scalar_t>(), rows.data_ptr<index_t>(), fill, pos, pos_by_output,
      static_cast<offset_t>(total), static_cast<offset_t>(out.size(1)), static_cast<offset_t>(src.size(1)),
      static_cast<offset_t>(out.size(2)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Dispatch on the vector width and the offset type.
template <typename scalar_t, typename index_t>
void gather_rows(const at::Tensor& src, const at::Tensor& rows, const at::Tensor& fill, const at::Tensor& pos,
                 bool pos_by_output, at::Tensor& out) {
  const scalar_t* fill_p = fill.defined() ? fill.data_ptr<scalar_t>() : nullptr;
  const scalar_t* pos_p = pos.defined() ? pos.data_ptr<scalar_t>() : nullptr;
  const int vec = vector_width<scalar_t>(out.size(2), {src.data_ptr(), out.data_ptr(), fill_p, pos_p});
  const bool small = fits_int32({src.numel(), out.numel(), pos.defined() ? pos.numel() : 0});
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (small && vec == kVec) return launch_gather_rows<scalar_t, index_t, int32_t, kVec>(src, rows, fill_p, pos_p, pos_by_output, out);
  if (small) return launch_gather_rows<scalar_t, index_t, int32_t, 1>(src, rows, fill_p, pos_p, pos_by_output, out);
  if (vec == kVec) return launch_gather_rows<scalar_t, index_t, int64_t, kVec>(src, rows, fill_p, pos_p, pos_by_output, out);
  launch_gather_rows<scalar_t, index_t, int64_t, 1>(src, rows, fill_p, pos_p, pos_by_output, out);
}

template <typename scalar_t, typename offset_t, int VEC>
void launch_segment_sum(const at::Tensor& grad, const at::Tensor& perm, const at::Tensor& starts, at::Tensor& out) {
  const int64_t total = out.size(0) * out.size(1);
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((total + kRowsPerBlock - 1) / kRowsPerBlock));
  segment_sum_rows_kernel<scalar_t, offset_t, VEC><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
      static_cast<offset_t>(total), static_cast<offset_t>(out.size(1)), static_cast<offset_t>(grad.size(1)),
      static_cast<offset_t>(out.size(2)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void segment_sum(const at::Tensor& grad, const at::Tensor& perm, const at::Tensor& starts, at::Tensor& out) {
  const int vec = vector_width<scalar_t>(out.size(2), {grad.data_ptr(), out.data_ptr()});
  const bool small = fits_int32({grad.numel(), out.numel(), starts.numel()});
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (small && vec == kVec) return launch_segment_sum<scalar_t, int32_t, kVec>(grad, perm, starts, out);
  if (small) return launch_segment_sum<scalar_t, int32_t, 1>(grad, perm, starts, out);
  if (vec == kVec) return launch_segment_sum<scalar_t, int64_t, kVec>(grad, perm, starts, out);
  launch_segment_sum<scalar_t, int64_t, 1>(grad, perm, starts, out);
}

at::Tensor masked_gather_cuda(const at::Tensor& x, const at::Tensor& index, const std::optional<at::Tensor>& pos_embed) {
  masked_patches::check_gather_args(x, index);
  const c10::cuda::CUDAGuard guard(x.device());
  auto pos = masked_patches::flat_pos(pos_embed, x.size(1), x);
  auto out = at::empty({x.size(0), index.size(1), x.size(2)}, x.options());
  if (out.numel() == 0) return out;
  auto xc = x.contiguous();
  auto idx = index.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_gather_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "masked_gather_cuda_index", [&] {
      gather_rows<scalar_t, index_t>(xc, idx, at::Tensor(), pos, false, out);
    });
  });
  return out;
}

at::Tensor masked_scatter_cuda(const at::Tensor& y, const at::Tensor& index, int64_t num_tokens,
                               const at::Tensor& mask_token, const std::optional<at::Tensor>& pos_embed) {
  masked_patches::check_scatter_args(y, index, num_tokens, mask_token);
  const int64_t B = y.size(0), D = y.size(2), N = num_tokens;
  const c10::cuda::CUDAGuard guard(y.device());
  auto pos = masked_patches::flat_pos(pos_embed, N, y);
  auto out = at::empty({B, N, D}, y.options());
  if (out.numel() == 0) return out;
  // inverse[b, n] = k where index[b, k] == n, else -1 (indices are unique per row; the Python layer checks).
  auto inverse = inverse_index(index, N);
  auto yc = y.contiguous();
  auto fill = mask_token.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "masked_scatter_cuda", [&] {
    gather_rows<scalar_t, int64_t>(yc, inverse, fill, pos, true, out);
  });
  return out;
}

at::Tensor masked_gather_backward_cuda(const at::Tensor& grad, const at::Tensor& index, int64_t num_tokens) {
  masked_patches::check_backward_args(grad, index);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t B = grad.size(0), N = num_tokens;
  auto out = at::empty({B, N, grad.size(2)}, grad.options());
  if (out.numel() == 0) return out;
  auto sorted = at::sort(index.to(at::kLong), /*stable=*/true, /*dim=*/1, /*descending=*/false);
  auto bounds = at::arange(N + 1, index.options().dtype(at::kLong)).expand({B, N + 1}).contiguous();
  auto starts = at::searchsorted(std::get<0>(sorted).contiguous(), bounds);
  auto perm = std::get<1>(sorted).contiguous();
  auto g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "masked_gather_backward_cuda", [&] {
    segment_sum<scalar_t>(g, perm, starts, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(amfor, CUDA, m) {
  m.impl("masked_gather", &masked_gather_cuda);
  m.impl("masked_scatter", &masked_scatter_cuda);
  m.impl("masked_gather_backward", &masked_gather_backward_cuda);
}

}  // namespace amfor
