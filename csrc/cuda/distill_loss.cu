// CUDA kernel of the distill_kl_loss op: per-row T^2 * KL(p_t || p_s) and, in the same launch, the row gradients
// (see amfor/ops/distill_loss.py for the semantics, csrc/ops.cpp for the schema, csrc/cpu/distill_loss.cpp for the
// CPU twin). One block per row of [R, C], three sweeps over the row (maxima; sums of the shifted exponentials; the
// gradients), block reductions by warp shuffles and shared memory. Loads and stores are 16-byte vectors over the
// aligned body of each row (scalar head and tail) whenever the student, teacher and gradient rows share the same
// alignment; accumulation is float (double for double). The gradients are written in the logits dtype, float for
// float16 logits (distill::grad_dtype; stored one by one there, the loads stay vectorised).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "../distill_loss.h"

namespace amfor {
namespace {

constexpr int kMaxThreads = 512;

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// Reduces N values per thread over the block (warp shuffles, then one warp over the warps' results); every
// thread gets the results. Safe to call repeatedly: it synchronises before reusing its shared memory.
template <typename acc_t, int N, typename Op>
__device__ void block_reduce(acc_t (&v)[N], Op op, acc_t identity) {
  __shared__ acc_t shared[N][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = (blockDim.x + 31) / 32;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    for (int offset = 16; offset > 0; offset /= 2) v[i] = op(v[i], __shfl_xor_sync(0xffffffffu, v[i], offset));
  }
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) shared[i][warp] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      v[i] = lane < num_warps ? shared[i][lane] : identity;
      for (int offset = 16; offset > 0; offset /= 2) v[i] = op(v[i], __shfl_xor_sync(0xffffffffu, v[i], offset));
    }
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) shared[i][0] = v[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = shared[i][0];
}

// The row's layout: elements [0, head) and [tail, C) are visited one by one, [head, tail) as 16-byte vectors.
struct RowSplit {
  int64_t head, num_vec, tail;
};

// Gradients of another width than the logits (float for float16) are stored one by one: no alignment asked of them.
template <typename scalar_t, typename grad_t, int VEC>
__device__ RowSplit split_row(const scalar_t* s, const scalar_t* t, const grad_t* gs, const grad_t* gt, int64_t C) {
  constexpr bool kVecGrads = sizeof(grad_t) == sizeof(scalar_t);
  const uintptr_t mis = reinterpret_cast<uintptr_t>(s) % 16;
  const bool same = reinterpret_cast<uintptr_t>(t) % 16 == mis &&
                    (!kVecGrads || gs == nullptr || reinterpret_cast<uintptr_t>(gs) % 16 == mis) &&
                    (!kVecGrads || gt == nullptr || reinterpret_cast<uintptr_t>(gt) % 16 == mis) &&
                    mis % sizeof(scalar_t) == 0;
  int64_t head = same ? static_cast<int64_t>(((16 - mis) % 16) / sizeof(scalar_t)) : C;
  head = head < C ? head : C;
  const int64_t num_vec = (C - head) / VEC;
  return RowSplit{head, num_vec, head + num_vec * VEC};
}

// Calls f(student / T, teacher / T) for each of this thread's classes of the row (vector loads in the body).
template <typename scalar_t, typename acc_t, int VEC, typename F>
__device__ __forceinline__ void visit_row(const scalar_t* s, const scalar_t* t, const RowSplit& sp, int64_t C,
                                          acc_t inv_temp, F&& f) {
  using P = Pack<scalar_t, VEC>;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  for (int64_t c = tid; c < sp.head; c += nthreads) f(acc_t(s[c]) * inv_temp, acc_t(t[c]) * inv_temp);
  for (int64_t v = tid; v < sp.num_vec; v += nthreads) {
    const P sv = reinterpret_cast<const P*>(s + sp.head)[v];
    const P tv = reinterpret_cast<const P*>(t + sp.head)[v];
#pragma unroll
    for (int k = 0; k < VEC; ++k) f(acc_t(sv.v[k]) * inv_temp, acc_t(tv.v[k]) * inv_temp);
  }
  for (int64_t c = sp.tail + tid; c < C; c += nthreads) f(acc_t(s[c]) * inv_temp, acc_t(t[c]) * inv_temp);
}

// Statistics of a row: maxima, log-sums of the shifted exponentials, KL; and the gradient scale.
template <typename acc_t>
struct RowStats {
  acc_t m_s, m_t, log_zs, log_zt, inv_zs, inv_zt, kl, scale;
};

// Gradients of scale * loss[r] at one class (scale includes T and is 0 for a row without teacher classes).
template <typename grad_t, typename acc_t>
__device__ __forceinline__ void class_grads(acc_t xs, acc_t xt, const RowStats<acc_t>& st, grad_t& gs, grad_t& gt) {
  const acc_t ds = xs - st.m_s, dt = xt - st.m_t;
  const acc_t p_t = acc_exp(dt) * st.inv_zt, p_s = acc_exp(ds) * st.inv_zs;
  gs = static_cast<grad_t>(st.scale * (p_s - p_t));
  const acc_t log_ratio = (dt - st.log_zt) - (ds - st.log_zs);
  gt = static_cast<grad_t>(p_t > acc_t(0) ? st.scale * p_t * (log_ratio - st.kl) : acc_t(0));
}

// Stores the VEC gradients of body vector v: one 16-byte store when they are as wide as the logits, else one by one.
template <typename scalar_t, typename grad_t, int VEC>
__device__ __forceinline__ void store_pack(grad_t* body, int64_t v, const Pack<grad_t, VEC>& x) {
  if constexpr (sizeof(grad_t) == sizeof(scalar_t)) {
    reinterpret_cast<Pack<grad_t, VEC>*>(body)[v] = x;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) body[v * VEC + k] = x.v[k];
  }
}

// Rows [R, C] (R = G * B): loss[r] = T^2 * KL(p_t || p_s); grad_s / grad_t = scale[r] * d loss[r] / d logits with
// scale[r] = factor * w[r / B] (factor = 1 / B for batchmean, else 1; w = 1 when weights is nullptr), in grad_t.
// Sweep 1: row maxima; sweep 2: Z_s, Z_t and A = sum exp(dt) * (dt - ds) of the shifted logits ds = s - max s,
// dt = t - max t, so that KL = A / Z_t - log Z_t + log Z_s has no cancellation between large logits; sweep 3 (when
// a gradient is asked for): the gradients. Sweeps 2 and 3 re-read a row this block has just read (L1/L2).
template <typename scalar_t, typename grad_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    distill_kl_kernel(acc_t* __restrict__ loss,             // [R]: T^2 * KL(p_t || p_s) per row
                      grad_t* __restrict__ gs_p,            // [R, C] contiguous, or nullptr when not asked for
                      grad_t* __restrict__ gt_p,            // [R, C] contiguous, or nullptr when not asked for
                      const scalar_t* __restrict__ s_p,     // [R, C] student logits, row stride s_stride
                      const scalar_t* __restrict__ t_p,     // [R, C] teacher logits, row stride t_stride
                      const acc_t* __restrict__ weights,    // [R / B] granularity weights, or nullptr
                      int64_t s_stride, int64_t t_stride, int64_t C, int64_t B, acc_t inv_temp, acc_t temp,
                      acc_t factor) {
  using P = Pack<scalar_t, VEC>;
  using PG = Pack<grad_t, VEC>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t row = blockIdx.x;
  const scalar_t* s = s_p + row * s_stride;
  const scalar_t* t = t_p + row * t_stride;
  grad_t* gs = gs_p != nullptr ? gs_p + row * C : nullptr;
  grad_t* gt = gt_p != nullptr ? gt_p + row * C : nullptr;
  const RowSplit sp = split_row<scalar_t, grad_t, VEC>(s, t, gs, gt, C);

  acc_t mx[2] = {kNegInf, kNegInf};
  visit_row<scalar_t, acc_t, VEC>(s, t, sp, C, inv_temp, [&](acc_t xs, acc_t xt) {
    mx[0] = xs > mx[0] ? xs : mx[0];
    mx[1] = xt > mx[1] ? xt : mx[1];
  });
  block_reduce<acc_t, 2>(mx, MaxOp(), kNegInf);
  const bool has_teacher = mx[1] != kNegInf;  // false: every teacher logit is -inf, the row adds nothing
  RowStats<acc_t> st;
  st.m_s = mx[0];
  st.m_t = has_teacher ? mx[1] : acc_t(0);

  acc_t sums[3] = {acc_t(0), acc_t(0), acc_t(0)};  // Z_s, Z_t, A
  visit_row<scalar_t, acc_t, VEC>(s, t, sp, C, inv_temp, [&](acc_t xs, acc_t xt) {
    const acc_t ds = xs - st.m_s, dt = xt - st.m_t;
    const acc_t e_t = acc_exp(dt);
    sums[0] += acc_exp(ds);
    sums[1] += e_t;
    if (e_t > acc_t(0)) sums[2] += e_t * (dt - ds);
  });
  block_reduce<acc_t, 3>(sums, SumOp(), acc_t(0));
  const acc_t z_t = has_teacher ? sums[1] : acc_t(1);
  st.log_zs = acc_log(sums[0]);
  st.log_zt = acc_log(z_t);
  st.inv_zs = acc_t(1) / sums[0];
  st.inv_zt = acc_t(1) / z_t;
  st.kl = has_teacher ? sums[2] / z_t - st.log_zt + st.log_zs : acc_t(0);
  if (threadIdx.x == 0) loss[row] = st.kl * temp * temp;
  if (gs == nullptr && gt == nullptr) return;
  st.scale = has_teacher ? temp * factor * (weights != nullptr ? weights[row / B] : acc_t(1)) : acc_t(0);

  const int tid = threadIdx.x, nthreads = blockDim.x;
  grad_t g1, g2;
  for (int64_t c = tid; c < sp.head; c += nthreads) {
    class_grads(acc_t(s[c]) * inv_temp, acc_t(t[c]) * inv_temp, st, g1, g2);
    if (gs != nullptr) gs[c] = g1;
    if (gt != nullptr) gt[c] = g2;
  }
  for (int64_t v = tid; v < sp.num_vec; v += nthreads) {
    const P sv = reinterpret_cast<const P*>(s + sp.head)[v];
    const P tv = reinterpret_cast<const P*>(t + sp.head)[v];
    PG gsv, gtv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      class_grads(acc_t(sv.v[k]) * inv_temp, acc_t(tv.v[k]) * inv_temp, st, gsv.v[k], gtv.v[k]);
    }
    if (gs != nullptr) store_pack<scalar_t, grad_t, VEC>(gs + sp.head, v, gsv);
    if (gt != nullptr) store_pack<scalar_t, grad_t, VEC>(gt + sp.head, v, gtv);
  }
  for (int64_t c = sp.tail + tid; c < C; c += nthreads) {
    class_grads(acc_t(s[c]) * inv_temp, acc_t(t[c]) * inv_temp, st, g1, g2);
    if (gs != nullptr) gs[c] = g1;
    if (gt != nullptr) gt[c] = g2;
  }
}

int threads_for(int64_t C) {
  if (C <= 1024) return 128;
  if (C <= 4096) return 256;
  return kMaxThreads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_kl_loss_cuda(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, const std::optional<at::Tensor>& weights,
    c10::string_view reduction, bool student_grad, bool teacher_grad) {
  distill::check_inputs(student, teacher, temperature, weights, reduction);
  TORCH_CHECK(student.is_cuda(), "student must be a CUDA tensor, got one on ", student.device());
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t G = student.size(0), B = student.size(1), C = student.size(2);
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto rows = at::empty({G, B}, student.options().dtype(acc));
  const auto grad_options = student.options().dtype(distill::grad_dtype(student.scalar_type()));
  auto gs = student_grad ? at::empty({G, B, C}, grad_options) : at::empty({0}, grad_options);
  auto gt = teacher_grad ? at::empty({G, B, C}, grad_options) : at::empty({0}, grad_options);
  const int64_t R = G * B;
  TORCH_CHECK(R <= std::numeric_limits<int32_t>::max(), "too many rows for one launch: ", R);
  if (R > 0) {
    auto s = distill::as_rows(student), t = distill::as_rows(teacher);
    auto w = weights.has_value() ? weights->contiguous() : at::Tensor();
    const double factor = distill::grad_factor(reduction, B);
    const dim3 grid(static_cast<unsigned>(R)), block(threads_for(C));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "distill_kl_loss_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      using grad_t = distill::grad_type<scalar_t>;
      constexpr int kVec = 16 / sizeof(scalar_t);
      distill_kl_kernel<scalar_t, grad_t, acc_t, kVec><<<grid, block, 0, stream>>>(
          rows.data_ptr<acc_t>(), student_grad ? gs.data_ptr<grad_t>() : nullptr,
          teacher_grad ? gt.data_ptr<grad_t>() : nullptr, s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
          w.defined() ? w.data_ptr<acc_t>() : nullptr, s.stride(0), t.stride(0), C, B,
          acc_t(1) / static_cast<acc_t>(temperature), static_cast<acc_t>(temperature), static_cast<acc_t>(factor));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto [loss, rows_out] = distill::reduce(rows, weights, reduction);
  return {loss, rows_out, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(amfor, CUDA, m) {
  m.impl("distill_kl_loss", &distill_kl_loss_cuda);
}

}  // namespace amfor
