// C++ CPU kernels of query_fusion_attention (see amfor/ops/query_fusion.py for the semantics).
//
// Forward: one thread owns a query row (b, h, q) and streams the keys/values of every layer past it
// (softmax per layer in acc_t, the layer-weighted sum in acc_t). Backward: the rows' pass writes dq and
// t[b, h, q, l] = dout . o_l (the layer-weight gradient); the tokens' pass gives each (b, h', l, n) to one
// thread, which sums over the heads of its group and the queries in a fixed order: deterministic, no atomics.
// Keys/values arrive as [one tensor [B, Hkv, L, N, d]] or L layer tensors [B, Hkv, N, d] sharing strides.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <limits>
#include <vector>

#include "../query_fusion.h"

namespace amfor {
namespace {

using query_fusion::check_inputs;
using query_fusion::layer_view;
using query_fusion::LayerView;

// Sizes and pointers every loop needs.
struct Problem {
  int64_t B, H, Q, d, G, Hkv, L, N, Qm;
  const bool* mask;
  double scale;
  // the mask row of (b, query qi, layer l), or nullptr without a mask
  const bool* mask_row(int64_t b, int64_t qi, int64_t l) const {
    return mask == nullptr ? nullptr : mask + ((b * Qm + (Qm > 1 ? qi : 0)) * L + l) * N;
  }
};

Problem problem(const at::Tensor& q, const LayerView& k, const std::optional<at::Tensor>& mask, double scale) {
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  const int64_t Qm = mask.has_value() ? mask->size(1) : 1;
  return {q.size(0), q.size(1), q.size(2), q.size(3), q.size(1) / k.Hkv, k.Hkv, k.L, k.N, Qm, m, scale};
}

// Dot product with 8 partial sums (a fixed order: results do not depend on the thread count).
template <typename scalar_t, typename acc_t>
inline acc_t dot_generic(const acc_t* a, const scalar_t* b, int64_t d) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * static_cast<acc_t>(b[i + j]);
  }
  for (; i < d; ++i) part[0] += a[i] * static_cast<acc_t>(b[i]);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// float32 versions compiled for AVX-512, AVX2 and the baseline ISA, chosen at load time: the inner loops of
// every kernel below are these two, and a portable build would otherwise run them at SSE2 width.
__attribute__((target_clones("avx512f", "avx2", "default")))
float dot_f32(const float* a, const float* b, int64_t d) {
  return dot_generic<float, float>(a, b, d);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void axpy_f32(float* y, float a, const float* x, int64_t d) {
  for (int64_t i = 0; i < d; ++i) y[i] += a * x[i];
}

template <typename scalar_t, typename acc_t>
inline acc_t dot(const acc_t* a, const scalar_t* b, int64_t d) {
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) return dot_f32(a, b, d);
  return dot_generic<scalar_t, acc_t>(a, b, d);
}

template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* y, acc_t a, const scalar_t* x, int64_t d) {
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    axpy_f32(y, a, x, d);
    return;
  }
  for (int64_t i = 0; i < d; ++i) y[i] += a * static_cast<acc_t>(x[i]);
}

template <typename scalar_t>
void forward_kernel(const Problem& P, const at::Tensor& q, const LayerView& k, const LayerView& v,
                    const at::Tensor& weights, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const acc_t* wp = weights.data_ptr<acc_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  const int64_t d = P.d, N = P.N, L = P.L;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, P.B * P.H * P.Q, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qv(d), o(d), total(d), s(N);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (P.H * P.Q), h = (row / P.Q) % P.H, qi = row % P.Q, hk = h / P.G;
      for (int64_t i = 0; i < d; ++i) qv[i] = static_cast<acc_t>(qp[row * d + i]);
      std::fill(total.begin(), total.end(), acc_t(0));
      for (int64_t l = 0; l < L; ++l) {
        const scalar_t* kb = static_cast<const scalar_t*>(k.ptr[l]) + b * k.sb + hk * k.sh;
        const scalar_t* vb = static_cast<const scalar_t*>(v.ptr[l]) + b * v.sb + hk * v.sh;
        const bool* mrow = P.mask_row(b, qi, l);
        acc_t m = neg_inf;
        for (int64_t n = 0; n < N; ++n) {
          s[n] = (mrow != nullptr && !mrow[n]) ? neg_inf : static_cast<acc_t>(P.scale) * dot(qv.data(), kb + n * k.sn, d);
          m = std::max(m, s[n]);
        }
        lp[row * L + l] = neg_inf;
        if (m == neg_inf) continue;  // every key masked: the layer contributes zero
        std::fill(o.begin(), o.end(), acc_t(0));
        acc_t sum = 0;
        for (int64_t n = 0; n < N; ++n) {
          if (s[n] == neg_inf) continue;
          const acc_t p = std::exp(s[n] - m);
          sum += p;
          axpy(o.data(), p, vb + n * v.sn, d);
        }
        lp[row * L + l] = m + std::log(sum);
        const acc_t scale_o = wp[(b * P.Q + qi) * L + l] / sum;
        for (int64_t i = 0; i < d; ++i) total[i] += scale_o * o[i];
      }
      for (int64_t i = 0; i < d; ++i) op[row * d + i] = static_cast<scalar_t>(total[i]);
    }
  });
}

// dq and t[row, l] = dout . o_l, one thread per query row.
template <typename scalar_t>
void dq_kernel(const Problem& P, const at::Tensor& grad, const at::Tensor& q, const LayerView& k, const LayerView& v,
               const at::Tensor& weights, const at::Tensor& lse, at::Tensor& dq, at::Tensor& t) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *gp = grad.data_ptr<scalar_t>(), *qp = q.data_ptr<scalar_t>();
  const acc_t *wp = weights.data_ptr<acc_t>(), *lp = lse.data_ptr<acc_t>();
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  acc_t* tp = t.data_ptr<acc_t>();
  const int64_t d = P.d, N = P.N, L = P.L;
  at::parallel_for(0, P.B * P.H * P.Q, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qv(d), gv(d), acc(d), p(N), dp(N);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (P.H * P.Q), h = (row / P.Q) % P.H, qi = row % P.Q, hk = h / P.G;
      for (int64_t i = 0; i < d; ++i) {
        qv[i] = static_cast<acc_t>(qp[row * d + i]);
        gv[i] = static_cast<acc_t>(gp[row * d + i]);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t l = 0; l < L; ++l) {
        const acc_t lse_l = lp[row * L + l];
        tp[row * L + l] = 0;
        if (std::isinf(lse_l)) continue;
        const scalar_t* kb = static_cast<const scalar_t*>(k.ptr[l]) + b * k.sb + hk * k.sh;
        const scalar_t* vb = static_cast<const scalar_t*>(v.ptr[l]) + b * v.sb + hk * v.sh;
        const bool* mrow = P.mask_row(b, qi, l);
        acc_t tl = 0;
        for (int64_t n = 0; n < N; ++n) {
          const bool ok = mrow == nullptr || mrow[n];
          p[n] = ok ? std::exp(static_cast<acc_t>(P.scale) * dot(qv.data(), kb + n * k.sn, d) - lse_l) : acc_t(0);
          dp[n] = ok ? dot(gv.data(), vb + n * v.sn, d) : acc_t(0);
          tl += p[n] * dp[n];
        }
        tp[row * L + l] = tl;
        const acc_t w = wp[(b * P.Q + qi) * L + l];
        for (int64_t n = 0; n < N; ++n) {
          if (p[n] != 0) axpy(acc.data(), w * p[n] * (dp[n] - tl), kb + n * k.sn, d);
        }
      }
      for (int64_t i = 0; i < d; ++i) dqp[row * d + i] = static_cast<scalar_t>(acc[i] * static_cast<acc_t>(P.scale));
    }
  });
}

// dk, dv: one thread per token (b, h', l, n), summing over its group's heads and the queries in order.
template <typename scalar_t>
void dkdv_kernel(const Problem& P, const at::Tensor& grad, const at::Tensor& q, const LayerView& k, const LayerView& v,
                 const at::Tensor& weights, const at::Tensor& lse, const at::Tensor& t, at::Tensor& dk, at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *gp = grad.data_ptr<scalar_t>(), *qp = q.data_ptr<scalar_t>();
  const acc_t *wp = weights.data_ptr<acc_t>(), *lp = lse.data_ptr<acc_t>(), *tp = t.data_ptr<acc_t>();
  scalar_t *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
  const int64_t d = P.d, N = P.N, L = P.L;
  at::parallel_for(0, P.B * P.Hkv * L * N, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kv(d), vv(d), ak(d), av(d), row_q(d), row_g(d);
    for (int64_t tok = begin; tok < end; ++tok) {
      const int64_t n = tok % N, l = (tok / N) % L, hk = (tok / (N * L)) % P.Hkv, b = tok / (N * L * P.Hkv);
      const scalar_t* kr = static_cast<const scalar_t*>(k.ptr[l]) + b * k.sb + hk * k.sh + n * k.sn;
      const scalar_t* vr = static_cast<const scalar_t*>(v.ptr[l]) + b * v.sb + hk * v.sh + n * v.sn;
      for (int64_t i = 0; i < d; ++i) {
        kv[i] = static_cast<acc_t>(kr[i]);
        vv[i] = static_cast<acc_t>(vr[i]);
      }
      std::fill(ak.begin(), ak.end(), acc_t(0));
      std::fill(av.begin(), av.end(), acc_t(0));
      for (int64_t h = hk * P.G; h < (hk + 1) * P.G; ++h) {
        for (int64_t qi = 0; qi < P.Q; ++qi) {
          const int64_t row = (b * P.H + h) * P.Q + qi;
          const bool* mrow = P.mask_row(b, qi, l);
          const acc_t lse_l = lp[row * L + l];
          if ((mrow != nullptr && !mrow[n]) || std::isinf(lse_l)) continue;
          const scalar_t *qr = qp + row * d, *gr = gp + row * d;
          const acc_t p = std::exp(static_cast<acc_t>(P.scale) * dot(kv.data(), qr, d) - lse_l);
          const acc_t w = wp[(b * P.Q + qi) * L + l];
          const acc_t ds = w * p * (dot(vv.data(), gr, d) - tp[row * L + l]);
          axpy(ak.data(), ds, qr, d);
          axpy(av.data(), w * p, gr, d);
        }
      }
      for (int64_t i = 0; i < d; ++i) {
        dkp[tok * d + i] = static_cast<scalar_t>(ak[i] * static_cast<acc_t>(P.scale));
        dvp[tok * d + i] = static_cast<scalar_t>(av[i]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> query_fusion_attention_cpu(const at::Tensor& q, at::TensorList k, at::TensorList v,
                                                              const at::Tensor& weights,
                                                              const std::optional<at::Tensor>& attn_mask, double scale) {
  check_rank(q, 4, "q");
  const auto kv = layer_view(k, q, "k");
  const auto vv = layer_view(v, q, "v");
  check_inputs(q, kv, vv, weights, attn_mask);
  const auto P = problem(q, kv, attn_mask, scale);
  auto out = at::empty_like(q);
  auto lse = at::empty({P.B, P.H, P.Q, P.L}, weights.options());
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "query_fusion_attention_cpu", [&] {
    forward_kernel<scalar_t>(P, q, kv, vv, weights, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> query_fusion_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, at::TensorList k, at::TensorList v, const at::Tensor& weights,
    const std::optional<at::Tensor>& attn_mask, double scale, const at::Tensor& lse) {
  check_rank(q, 4, "q");
  const auto kv = layer_view(k, q, "k");
  const auto vv = layer_view(v, q, "v");
  check_inputs(q, kv, vv, weights, attn_mask);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() && grad_out.is_contiguous(),
              "grad_out must be a contiguous tensor shaped and typed like q");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), kv.L}) &&
              lse.scalar_type() == weights.scalar_type() && lse.is_contiguous(), "lse must be [B, H, Q, L] like the forward's");
  const auto P = problem(q, kv, attn_mask, scale);
  auto dq = at::empty_like(q);
  auto dk = at::empty({P.B, P.Hkv, P.L, P.N, P.d}, q.options());
  auto dv = at::empty({P.B, P.Hkv, P.L, P.N, P.d}, q.options());
  auto t = at::zeros({P.B, P.H, P.Q, P.L}, weights.options());
  if (q.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "query_fusion_attention_backward_cpu", [&] {
      dq_kernel<scalar_t>(P, grad_out, q, kv, vv, weights, lse, dq, t);
      if (dk.numel() > 0) dkdv_kernel<scalar_t>(P, grad_out, q, kv, vv, weights, lse, t, dk, dv);
    });
  } else {
    dk.zero_();
    dv.zero_();
  }
  return {dq, dk, dv, t.sum(1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(amfor, CPU, m) {
  m.impl("query_fusion_attention", &query_fusion_attention_cpu);
  m.impl("query_fusion_attention_backward", &query_fusion_attention_backward_cpu);
}

}  // namespace amfor
