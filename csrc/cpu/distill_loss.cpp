// C++ CPU kernel of the distill_kl_loss op: per-row T^2 * KL(p_t || p_s) and, in the same pass over the
// data, the row gradients (see amfor/ops/distill_loss.py for the semantics, csrc/ops.cpp for the schema).
// Each row is owned by one thread and walked in a fixed order, so results are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"

namespace amfor {
namespace distill {

// Shared with csrc/cuda/distill_loss.cu (declared there): argument checks and the reduction of the rows.
void check_inputs(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                  const std::optional<at::Tensor>& weights, c10::string_view reduction) {
  check_float(student, "student");
  check_rank(student, 3, "student");
  TORCH_CHECK(student.size(2) >= 1, "student and teacher need at least one class (C >= 1), got C = 0");
  TORCH_CHECK(teacher.sizes() == student.sizes(), "teacher shape ", teacher.sizes(), " differs from student shape ",
              student.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "teacher dtype ", teacher.scalar_type(),
              " differs from student dtype ", student.scalar_type());
  check_same_device(student, teacher, "teacher");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(reduction == "batchmean" || reduction == "sum" || reduction == "none",
              "reduction must be batchmean, sum or none, got ", reduction);
  if (weights.has_value()) {
    const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == student.size(0), "weights must be [G] = [",
                student.size(0), "], got shape ", weights->sizes());
    TORCH_CHECK(weights->scalar_type() == acc, "weights must be ", acc, " for ", student.scalar_type(),
                " logits, got ", weights->scalar_type());
    check_same_device(student, *weights, "weights");
  }
}

// 1 / B for batchmean, 1 for sum and none: the factor the reduction gives each weighted row.
double grad_factor(c10::string_view reduction, int64_t batch) {
  return reduction == "batchmean" ? 1.0 / static_cast<double>(std::max<int64_t>(batch, 1)) : 1.0;
}

// (loss, loss_rows output): the reduction of w[g] * rows[g, b]; rows are returned only when weights need them.
std::tuple<at::Tensor, at::Tensor> reduce(const at::Tensor& rows, const std::optional<at::Tensor>& weights,
                                          c10::string_view reduction) {
  at::Tensor weighted = weights.has_value() ? rows * weights->unsqueeze(1) : rows;
  at::Tensor loss = weighted;
  if (reduction == "sum") loss = weighted.sum();
  if (reduction == "batchmean") loss = weighted.sum() / static_cast<double>(std::max<int64_t>(rows.size(1), 1));
  return {loss, weights.has_value() ? rows : at::empty({0}, rows.options())};
}

// [G, B, C] -> [G * B, C] with unit column stride: a view when the layout allows, else a contiguous copy.
at::Tensor as_rows(const at::Tensor& x) {
  auto rows = x.reshape({-1, x.size(-1)});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

}  // namespace distill

namespace {

// Statistics of one row, from which the loss and both gradients follow.
template <typename acc_t>
struct RowStats {
  bool has_teacher;  // false when every teacher logit is -inf: the row adds nothing
  acc_t log_zs;      // log sum exp(ds), ds = student / T - max
  acc_t log_zt;      // log sum exp(dt), dt = teacher / T - max
  acc_t inv_zs;      // 1 / sum exp(ds)
  acc_t inv_zt;      // 1 / sum exp(dt)
  acc_t kl;          // KL(p_t || p_s) = A / Z_t - log Z_t + log Z_s, without the T^2
};

// Fills ds/dt with the shifted row / T and es/et with their exps; returns the row statistics. Working with
// shifted values only keeps large logits (+-1e4 / T) from cancelling; the sums run in double, since a
// sequential float sum over thousands of classes would lose digits the GPU kernels' tree reductions keep.
template <typename scalar_t, typename acc_t>
RowStats<acc_t> row_stats(const scalar_t* s, const scalar_t* t, int64_t C, acc_t inv_temp, acc_t* ds, acc_t* dt,
                          acc_t* es, acc_t* et) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t m_s = kNegInf, m_t = kNegInf;
  for (int64_t c = 0; c < C; ++c) {
    ds[c] = static_cast<acc_t>(s[c]) * inv_temp;
    dt[c] = static_cast<acc_t>(t[c]) * inv_temp;
    m_s = std::max(m_s, ds[c]);
    m_t = std::max(m_t, dt[c]);
  }
  RowStats<acc_t> st{m_t != kNegInf, 0, 0, 0, 0, 0};
  if (!st.has_teacher) return st;
  double z_s = 0, z_t = 0, a = 0;  // a: sum exp(dt) * (dt - ds) over the classes with p_t > 0
  for (int64_t c = 0; c < C; ++c) {
    ds[c] -= m_s;
    dt[c] -= m_t;
    es[c] = std::exp(ds[c]);
    et[c] = std::exp(dt[c]);
    z_s += es[c];
    z_t += et[c];
    if (et[c] > 0) a += static_cast<double>(et[c]) * static_cast<double>(dt[c] - ds[c]);
  }
  st.log_zs = static_cast<acc_t>(std::log(z_s));
  st.log_zt = static_cast<acc_t>(std::log(z_t));
  st.inv_zs = static_cast<acc_t>(1.0 / z_s);
  st.inv_zt = static_cast<acc_t>(1.0 / z_t);
  // The same expression as the gradient's log ratio below, so that a one-hot teacher gives exactly 0 there.
  st.kl = static_cast<acc_t>(a / z_t) - st.log_zt + st.log_zs;
  return st;
}

// grad_s = scale * (p_s - p_t); grad_t = scale * p_t * (log p_t - log p_s - KL), 0 where p_t = 0; scale is T times
// the factor the weights and the reduction give the row.
template <typename scalar_t, typename acc_t>
void row_grads(const RowStats<acc_t>& st, int64_t C, acc_t scale, const acc_t* ds, const acc_t* dt, const acc_t* es,
               const acc_t* et, scalar_t* gs, scalar_t* gt) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t p_t = et[c] * st.inv_zt;
    if (gs != nullptr) gs[c] = static_cast<scalar_t>(scale * (es[c] * st.inv_zs - p_t));
    if (gt != nullptr) {
      const acc_t log_ratio = (dt[c] - st.log_zt) - (ds[c] - st.log_zs);
      gt[c] = static_cast<scalar_t>(p_t > 0 ? scale * p_t * (log_ratio - st.kl) : acc_t(0));
    }
  }
}

// Rows [R, C] (R = G * B): loss[r] = T^2 KL; gs / gt (when defined) = factor * w[r / B] * d loss[r] / d logits.
template <typename scalar_t>
void distill_rows(const at::Tensor& s, const at::Tensor& t, double temperature, const at::Tensor& weights,
                  double factor, int64_t B, at::Tensor& loss, at::Tensor& gs, at::Tensor& gt) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = s.size(0), C = s.size(1), s_stride = s.stride(0), t_stride = t.stride(0);
  const scalar_t* s_p = s.data_ptr<scalar_t>();
  const scalar_t* t_p = t.data_ptr<scalar_t>();
  const acc_t* w_p = weights.defined() ? weights.data_ptr<acc_t>() : nullptr;
  acc_t* loss_p = loss.data_ptr<acc_t>();
  scalar_t* gs_p = gs.numel() > 0 ? gs.data_ptr<scalar_t>() : nullptr;
  scalar_t* gt_p = gt.numel() > 0 ? gt.data_ptr<scalar_t>() : nullptr;
  const acc_t temp = static_cast<acc_t>(temperature), inv_temp = acc_t(1) / temp;
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(4 * C);
    acc_t *ds = buf.data(), *dt = ds + C, *es = dt + C, *et = es + C;
    for (int64_t r = begin; r < end; ++r) {
      const RowStats<acc_t> st = row_stats(s_p + r * s_stride, t_p + r * t_stride, C, inv_temp, ds, dt, es, et);
      scalar_t* gs_row = gs_p != nullptr ? gs_p + r * C : nullptr;
      scalar_t* gt_row = gt_p != nullptr ? gt_p + r * C : nullptr;
      loss_p[r] = st.kl * temp * temp;
      if (!st.has_teacher) {  // no teacher class at all: the row adds nothing
        if (gs_row != nullptr) std::fill(gs_row, gs_row + C, scalar_t(0));
        if (gt_row != nullptr) std::fill(gt_row, gt_row + C, scalar_t(0));
        continue;
      }
      const acc_t gscale = temp * static_cast<acc_t>(factor) * (w_p != nullptr ? w_p[r / B] : acc_t(1));
      if (gs_row != nullptr || gt_row != nullptr) row_grads(st, C, gscale, ds, dt, es, et, gs_row, gt_row);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_kl_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, const std::optional<at::Tensor>& weights,
    c10::string_view reduction, bool student_grad, bool teacher_grad) {
  distill::check_inputs(student, teacher, temperature, weights, reduction);
  const int64_t G = student.size(0), B = student.size(1), C = student.size(2);
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto rows = at::empty({G, B}, student.options().dtype(acc));
  auto gs = student_grad ? at::empty({G, B, C}, student.options()) : at::empty({0}, student.options());
  auto gt = teacher_grad ? at::empty({G, B, C}, teacher.options()) : at::empty({0}, teacher.options());
  if (rows.numel() > 0) {
    auto s = distill::as_rows(student), t = distill::as_rows(teacher);
    auto w = weights.has_value() ? weights->contiguous() : at::Tensor();
    const double factor = distill::grad_factor(reduction, B);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "distill_kl_loss_cpu", [&] {
      distill_rows<scalar_t>(s, t, temperature, w, factor, B, rows, gs, gt);
    });
  }
  auto [loss, rows_out] = distill::reduce(rows, weights, reduction);
  return {loss, rows_out, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(amfor, CPU, m) {
  m.impl("distill_kl_loss", &distill_kl_loss_cpu);
}

}  // namespace amfor
