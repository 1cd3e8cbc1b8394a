// Argument checks shared by the CPU and CUDA kernels. The Python layer validates first with friendlier
// messages; these keep a direct torch.ops.amfor call from reading out of bounds.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

namespace amfor {

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name) {
  TORCH_CHECK(t.dim() == rank, name, " must have ", rank, " dimensions, got shape ", t.sizes());
}

inline void check_index(const at::Tensor& index, const char* name) {
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, name,
              " must be int32 or int64, got ", index.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.device() == b.device(), name, " is on ", b.device(), " but the input is on ", a.device());
}

inline void check_float(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
              " must be float64, float32, float16 or bfloat16, got ", s);
}

}  // namespace amfor
