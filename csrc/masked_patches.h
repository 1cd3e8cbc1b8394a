// Argument checks of the masked_patches ops shared by the CPU and CUDA kernels (the Python layer checks first,
// with friendlier messages; these keep a direct torch.ops.amfor call from reading out of bounds).
#pragma once
#include <optional>

#include "common.h"

namespace amfor {
namespace masked_patches {

// x: [B, N, D] float; index: [B, K] int32/int64 on x's device.
inline void check_gather_args(const at::Tensor& x, const at::Tensor& index) {
  check_rank(x, 3, "x");
  check_rank(index, 2, "index");
  check_index(index, "index");
  check_float(x, "x");
  check_same_device(x, index, "index");
  TORCH_CHECK(index.size(0) == x.size(0), "index batch ", index.size(0), " differs from x batch ", x.size(0));
}

// y: [B, K, D] float; index: [B, K]; mask_token: D values of y's dtype; K <= num_tokens.
inline void check_scatter_args(const at::Tensor& y, const at::Tensor& index, int64_t num_tokens,
                               const at::Tensor& mask_token) {
  check_rank(y, 3, "y");
  check_rank(index, 2, "index");
  check_index(index, "index");
  check_float(y, "y");
  check_same_device(y, index, "index");
  check_same_device(y, mask_token, "mask_token");
  const int64_t B = y.size(0), K = y.size(1), D = y.size(2);
  TORCH_CHECK(index.size(0) == B && index.size(1) == K, "index shape ", index.sizes(), " must be [B, K] = [", B, ", ", K,
              "]");
  TORCH_CHECK(K <= num_tokens, "cannot scatter ", K, " rows into ", num_tokens, " tokens");
  TORCH_CHECK(mask_token.numel() == D && mask_token.scalar_type() == y.scalar_type(), "mask_token must be [D] of ",
              y.scalar_type());
}

// grad: [B, K, D]; index: [B, K].
inline void check_backward_args(const at::Tensor& grad, const at::Tensor& index) {
  check_rank(grad, 3, "grad");
  check_rank(index, 2, "index");
  check_index(index, "index");
  check_same_device(grad, index, "index");
  TORCH_CHECK(index.size(0) == grad.size(0) && index.size(1) == grad.size(1), "index shape ", index.sizes(),
              " must match grad's [B, K] ", grad.sizes());
}

// pos_embed ([N, D] or [1, N, D], x's dtype and device) as a contiguous tensor, or undefined when absent.
inline at::Tensor flat_pos(const std::optional<at::Tensor>& pos_embed, int64_t N, const at::Tensor& x) {
  if (!pos_embed.has_value()) return at::Tensor();
  const int64_t D = x.size(2);
  TORCH_CHECK(pos_embed->numel() == N * D, "pos_embed must hold [N, D] = [", N, ", ", D, "] values, got shape ",
              pos_embed->sizes());
  TORCH_CHECK(pos_embed->scalar_type() == x.scalar_type(), "pos_embed dtype ", pos_embed->scalar_type(),
              " differs from ", x.scalar_type());
  check_same_device(x, *pos_embed, "pos_embed");
  return pos_embed->contiguous();
}

}  // namespace masked_patches
}  // namespace amfor
