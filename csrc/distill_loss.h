// Argument checks and the reduction of the per-row losses of distill_kl_loss, shared by the CPU and CUDA
// kernels (csrc/cpu/distill_loss.cpp, csrc/cuda/distill_loss.cu).
#pragma once
#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common.h"

namespace amfor {
namespace distill {

inline void check_inputs(const at::Tensor& student, const at::Tensor& teacher, double temperature,
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

// The dtype of the stored gradients: the logits dtype, except float32 for float16 logits. The gradient of a
// batchmean loss over C classes is ~T / (B C) per entry (3e-6 at B = 64, C = 4101): float16 subnormals, which
// lose digits or flush to zero before the AMP loss scale could lift them. float32 keeps them; the backward then
// rounds grad_output x gradient once to float16. (bfloat16 has float32's exponent range: kept in bfloat16.)
inline at::ScalarType grad_dtype(at::ScalarType logits) { return logits == at::kHalf ? at::kFloat : logits; }

template <typename scalar_t>
using grad_type = std::conditional_t<std::is_same_v<scalar_t, at::Half>, float, scalar_t>;

// 1 / B for batchmean, 1 for sum and none: the factor the reduction gives each weighted row.
inline double grad_factor(c10::string_view reduction, int64_t batch) {
  return reduction == "batchmean" ? 1.0 / static_cast<double>(std::max<int64_t>(batch, 1)) : 1.0;
}

// (loss, loss_rows output): the reduction of w[g] * rows[g, b]; rows are returned only when weights need them.
inline std::tuple<at::Tensor, at::Tensor> reduce(const at::Tensor& rows, const std::optional<at::Tensor>& weights,
                                                 c10::string_view reduction) {
  at::Tensor weighted = weights.has_value() ? rows * weights->unsqueeze(1) : rows;
  at::Tensor loss = weighted;
  if (reduction == "sum") loss = weighted.sum();
  if (reduction == "batchmean") loss = weighted.sum() / static_cast<double>(std::max<int64_t>(rows.size(1), 1));
  return {loss, weights.has_value() ? rows : at::empty({0}, rows.options())};
}

// [G, B, C] -> [G * B, C] with unit column stride: a view when the layout allows, else a contiguous copy.
inline at::Tensor as_rows(const at::Tensor& x) {
  auto rows = x.reshape({-1, x.size(-1)});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

}  // namespace distill
}  // namespace amfor
