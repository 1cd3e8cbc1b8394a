// Argument handling of query_fusion_attention shared by the CPU and CUDA kernels: keys/values arrive as
// [one tensor [B, Hkv, L, N, d]] or L layer tensors [B, Hkv, N, d] sharing strides (unit stride in d).
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"

namespace amfor {
namespace query_fusion {

// Per-layer base pointers and the strides (b, head, token) shared by all layers.
struct LayerView {
  std::vector<const void*> ptr;
  int64_t sb = 0, sh = 0, sn = 0, Hkv = 0, L = 0, N = 0;
  bool aligned = true;  // every layer pointer and stride allows 16-byte loads
};

inline LayerView layer_view(at::TensorList t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(!t.empty(), name, " must hold at least one tensor");
  const int64_t B = q.size(0), d = q.size(3);
  const bool stacked = t.size() == 1 && t[0].dim() == 5;
  for (const auto& x : t) {
    check_same_device(q, x, name);
    TORCH_CHECK(x.scalar_type() == q.scalar_type(), name, " dtype ", x.scalar_type(), " differs from q's ", q.scalar_type());
    TORCH_CHECK(x.dim() == (stacked ? 5 : 4), name, " must be [B, Hkv, L, N, d] or L tensors [B, Hkv, N, d], got ", x.sizes());
    TORCH_CHECK(x.size(0) == B && x.size(-1) == d, name, " batch/head dim ", x.sizes(), " differ from q's ", q.sizes());
    TORCH_CHECK(x.stride(-1) == 1 || x.size(-1) <= 1, name, " must have unit stride in d");
    TORCH_CHECK(x.sizes() == t[0].sizes() && x.strides() == t[0].strides(), name, " layers must share shape and strides");
  }
  const auto& x = t[0];
  LayerView view;
  view.Hkv = x.size(1);
  view.sb = x.stride(0);
  view.sh = x.stride(1);
  view.L = stacked ? x.size(2) : static_cast<int64_t>(t.size());
  view.N = stacked ? x.size(3) : x.size(2);
  view.sn = stacked ? x.stride(3) : x.stride(2);
  TORCH_CHECK(view.Hkv > 0 && q.size(1) % view.Hkv == 0, "Hkv = ", view.Hkv, " of ", name, " must divide H = ", q.size(1));
  const int64_t esize = static_cast<int64_t>(x.element_size()), vec = 16 / esize;
  view.aligned = d % vec == 0 && view.sb % vec == 0 && view.sh % vec == 0 && view.sn % vec == 0;
  for (int64_t l = 0; l < view.L; ++l) {
    const char* base = static_cast<const char*>(stacked ? x.data_ptr() : t[l].data_ptr());
    const char* p = base + (stacked ? l * x.stride(2) * esize : 0);
    view.aligned = view.aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
    view.ptr.push_back(p);
  }
  return view;
}

inline void check_inputs(const at::Tensor& q, const LayerView& k, const LayerView& v, const at::Tensor& weights,
                         const std::optional<at::Tensor>& mask) {
  check_rank(q, 4, "q");
  check_float(q, "q");
  TORCH_CHECK(q.is_contiguous(), "q must be contiguous");
  TORCH_CHECK(k.Hkv == v.Hkv && k.L == v.L && k.N == v.N, "k and v must have the same heads, layers and tokens");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(weights.scalar_type() == acc && weights.is_contiguous(), "weights must be contiguous ", acc);
  TORCH_CHECK(weights.sizes() == at::IntArrayRef({q.size(0), q.size(2), k.L}), "weights must be [B, Q, L], got ", weights.sizes());
  check_same_device(q, weights, "weights");
  if (mask.has_value()) {
    const auto& m = *mask;
    check_same_device(q, m, "attn_mask");
    TORCH_CHECK(m.scalar_type() == at::kBool && m.is_contiguous(), "attn_mask must be a contiguous bool tensor");
    TORCH_CHECK(m.dim() == 4 && m.size(0) == q.size(0) && (m.size(1) == 1 || m.size(1) == q.size(2)) && m.size(2) == k.L &&
                m.size(3) == k.N, "attn_mask must be [B, Q or 1, L, N], got ", m.sizes());
  }
}

// lse [B, H, Q, L] of a forward with nothing to compute (head dim 0, or no rows): every scaled score is 0, so
// lse = log(number of keys the row may attend), -inf where it may attend none. Never left uninitialised.
inline at::Tensor empty_head_lse(const at::Tensor& q, const LayerView& k, const std::optional<at::Tensor>& mask,
                                 at::ScalarType acc) {
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2);
  at::Tensor count = mask.has_value()
                         ? mask->sum({-1}, /*keepdim=*/false, acc).unsqueeze(1)  // [B, 1, Q or 1, L]
                         : at::full({B, 1, 1, k.L}, static_cast<double>(k.N), q.options().dtype(acc));
  return count.log().expand({B, H, Q, k.L}).contiguous();
}

}  // namespace query_fusion
}  // namespace amfor
