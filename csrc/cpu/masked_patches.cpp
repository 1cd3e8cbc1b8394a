// C++ CPU kernels of the masked_patches ops (masked_gather, masked_scatter, masked_gather_backward).
// Every output row is written by exactly one thread in a fixed order, so results are deterministic.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <type_traits>

#include "../masked_patches.h"

namespace amfor {
namespace {

// out = a + b over D floats, compiled for AVX-512, AVX2 and the baseline ISA and chosen at load time, so a
// portable build still runs at the machine's vector width (the row add is the kernel's only arithmetic).
__attribute__((target_clones("avx512f", "avx2", "default")))
void add_rows_f32(float* out, const float* a, const float* b, int64_t D) {
  for (int64_t d = 0; d < D; ++d) out[d] = a[d] + b[d];
}

// out[r, :] = (src_row >= 0 ? src[src_row, :] : fill) + (pos ? pos[pos_row, :] : 0), all rows of length D.
template <typename scalar_t>
inline void write_row(scalar_t* out, const scalar_t* src, const scalar_t* fill, const scalar_t* pos, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* base = src != nullptr ? src : fill;
  if (pos == nullptr) {
    std::copy(base, base + D, out);
    return;
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    add_rows_f32(out, base, pos, D);
    return;
  }
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(static_cast<acc_t>(base[d]) + static_cast<acc_t>(pos[d]));
}

// Output rows [B, R, D]: row (b, r) copies source row rows[b, r] of batch b (or `fill` when it is negative)
// and adds pos_embed row (pos_by_output ? r : rows[b, r]).
template <typename scalar_t, typename index_t>
void gather_rows(const at::Tensor& src, const at::Tensor& rows, const at::Tensor& fill, const at::Tensor& pos,
                 bool pos_by_output, at::Tensor& out) {
  const int64_t B = out.size(0), R = out.size(1), D = out.size(2), S = src.size(1);
  const scalar_t* src_p = src.data_ptr<scalar_t>();
  const index_t* rows_p = rows.data_ptr<index_t>();
  const scalar_t* fill_p = fill.defined() ? fill.data_ptr<scalar_t>() : nullptr;
  const scalar_t* pos_p = pos.defined() ? pos.data_ptr<scalar_t>() : nullptr;
  scalar_t* out_p = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / R, r = i % R;
      const int64_t row = static_cast<int64_t>(rows_p[i]);
      const scalar_t* s = row >= 0 ? src_p + (b * S + row) * D : nullptr;
      const scalar_t* p = pos_p == nullptr ? nullptr : pos_p + (pos_by_output ? r : row) * D;
      write_row(out_p + i * D, s, fill_p, p, D);
    }
  });
}

at::Tensor masked_gather_cpu(const at::Tensor& x, const at::Tensor& index, const std::optional<at::Tensor>& pos_embed) {
  masked_patches::check_gather_args(x, index);
  const int64_t N = x.size(1), D = x.size(2);
  const at::Tensor pos = masked_patches::flat_pos(pos_embed, N, x);
  auto xc = x.contiguous();
  auto idx = index.contiguous();
  if (idx.numel() > 0) {
    TORCH_CHECK(idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < N, "index values must lie in [0, ", N, ")");
  }
  auto out = at::empty({x.size(0), index.size(1), D}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_gather_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "masked_gather_cpu_index", [&] {
      gather_rows<scalar_t, index_t>(xc, idx, at::Tensor(), pos, false, out);
    });
  });
  return out;
}

// inverse[b, n] = k where index[b, k] == n, else -1. Checks that each row's indices are in range and unique.
at::Tensor inverse_index(const at::Tensor& index, int64_t N) {
  const int64_t B = index.size(0), K = index.size(1);
  auto idx = index.to(at::kLong).contiguous();
  auto inv = at::full({B, N}, -1, idx.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  int64_t* vp = inv.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = ip[b * K + k];
      TORCH_CHECK(n >= 0 && n < N, "index values must lie in [0, ", N, "), got ", n);
      TORCH_CHECK(vp[b * N + n] < 0, "index must hold unique values per row; row ", b, " repeats ", n);
      vp[b * N + n] = k;
    }
  }
  return inv;
}

at::Tensor masked_scatter_cpu(const at::Tensor& y, const at::Tensor& index, int64_t num_tokens,
                              const at::Tensor& mask_token, const std::optional<at::Tensor>& pos_embed) {
  masked_patches::check_scatter_args(y, index, num_tokens, mask_token);
  const int64_t B = y.size(0), D = y.size(2), N = num_tokens;
  const at::Tensor pos = masked_patches::flat_pos(pos_embed, N, y);
  auto inv = inverse_index(index, N);
  auto out = at::empty({B, N, D}, y.options());
  if (out.numel() == 0) return out;
  auto yc = y.contiguous();
  auto fill = mask_token.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "masked_scatter_cpu", [&] {
    gather_rows<scalar_t, int64_t>(yc, inv, fill, pos, true, out);
  });
  return out;
}

// grad_x[b, n] = sum over k (increasing) with index[b, k] == n of grad[b, k]; one thread owns a batch row.
template <typename scalar_t, typename index_t>
void segment_sum(const at::Tensor& grad, const at::Tensor& index, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = grad.size(0), K = grad.size(1), D = grad.size(2), N = out.size(1);
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const index_t* ip = index.data_ptr<index_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(N * D);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        acc_t* a = acc.data() + static_cast<int64_t>(ip[b * K + k]) * D;
        const scalar_t* src = g + (b * K + k) * D;
        for (int64_t d = 0; d < D; ++d) a[d] += static_cast<acc_t>(src[d]);
      }
      scalar_t* dst = o + b * N * D;
      for (int64_t i = 0; i < N * D; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

at::Tensor masked_gather_backward_cpu(const at::Tensor& grad, const at::Tensor& index, int64_t num_tokens) {
  masked_patches::check_backward_args(grad, index);
  auto out = at::empty({grad.size(0), num_tokens, grad.size(2)}, grad.options());
  if (out.numel() == 0) return out;
  auto idx = index.contiguous();
  if (idx.numel() > 0) {
    TORCH_CHECK(idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < num_tokens,
                "index values must lie in [0, ", num_tokens, ")");
  }
  auto g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "masked_gather_backward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "masked_gather_backward_cpu_index", [&] {
      segment_sum<scalar_t, index_t>(g, idx, out);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(amfor, CPU, m) {
  m.impl("masked_gather", &masked_gather_cpu);
  m.impl("masked_scatter", &masked_scatter_cpu);
  m.impl("masked_gather_backward", &masked_gather_backward_cpu);
}

}  // namespace amfor
