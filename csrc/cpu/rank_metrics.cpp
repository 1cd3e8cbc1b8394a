// Per-query AP, first-match rank and INP under the Market-1501 protocol (amfor/evaluation/rank.py), on CPU.
//
// One thread owns a query row. Its true matches (same pid, other camera; found through the gallery grouped
// by pid) are sorted by (distance, gallery index), the order a stable sort of the distances gives. Every
// kept gallery entry j (not same pid AND same camera) is placed among them: p = the number of matches before
// (d_j, j). A histogram of p gives the 1-based rank of match m as hist[0] + ... + hist[m] (match m counts
// itself). Cost per query O(G M) at worst, one compare per entry behind the last match; no sort of the
// gallery; the classic loop's numbers exactly.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "../common.h"

namespace amfor {
namespace {

struct RowResult {
  double ap = 0.0, inp = 0.0;
  int64_t first = 0;
  bool valid = false;
};

// Number of sorted matches that come before gallery entry (d, j) in stable order: those strictly closer,
// plus those at the same distance with a smaller gallery index. md: [M] ascending; mi: their indices.
template <typename scalar_t>
inline int64_t matches_before(const scalar_t* md, const int64_t* mi, int64_t M, scalar_t d, int64_t j) {
  int64_t p = 0;
  if (M <= 64) {
    for (int64_t m = 0; m < M; ++m) p += md[m] < d;  // branch-free, vectorised: M is small for ReID sets
  } else {
    p = std::lower_bound(md, md + M, d) - md;
  }
  while (p < M && md[p] == d && mi[p] < j) ++p;  // ties (rare for real-valued features)
  return p;
}

// The gallery grouped by identity: indices sorted by (pid, index), so one identity's entries are a range.
struct GalleryIndex {
  std::vector<int64_t> pids, order;  // pids[i] = g_pids[order[i]], ascending

  GalleryIndex(const int64_t* g_pids, int64_t G) : pids(G), order(G) {
    for (int64_t j = 0; j < G; ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return g_pids[a] < g_pids[b]; });
    for (int64_t i = 0; i < G; ++i) pids[i] = g_pids[order[i]];
  }

  // [first, last) positions in `order` of the entries with identity pid
  std::pair<int64_t, int64_t> range(int64_t pid) const {
    auto [lo, hi] = std::equal_range(pids.begin(), pids.end(), pid);
    return {lo - pids.begin(), hi - pids.begin()};
  }
};

struct Scratch {
  std::vector<int64_t> mi, junk, hist;
};

template <typename scalar_t>
RowResult rank_row(const scalar_t* row, int64_t pid, int64_t cam, const int64_t* g_cams, int64_t G,
                   const GalleryIndex& gallery, std::vector<std::pair<scalar_t, int64_t>>& matches,
                   std::vector<scalar_t>& md, Scratch& sc) {
  matches.clear();
  sc.junk.clear();
  const auto [first, last_pos] = gallery.range(pid);
  for (int64_t i = first; i < last_pos; ++i) {
    const int64_t j = gallery.order[i];
    if (g_cams[j] != cam) {
      matches.emplace_back(row[j], j);
    } else {
      sc.junk.push_back(j);  // same identity seen by the same camera: removed from the ranking
    }
  }
  RowResult res;
  const int64_t M = static_cast<int64_t>(matches.size());
  if (M == 0) return res;
  std::sort(matches.begin(), matches.end());  // (distance, index): the stable-sort order
  md.resize(M);
  sc.mi.resize(M);
  for (int64_t m = 0; m < M; ++m) std::tie(md[m], sc.mi[m]) = matches[m];
  sc.hist.assign(M + 1, 0);
  // Place every entry up to the last match (the ones behind it rank no match; hist[M] is never read),
  // then take the junk entries back out.
  const scalar_t last = md[M - 1];
  for (int64_t j = 0; j < G; ++j) {
    if (row[j] <= last) ++sc.hist[matches_before(md.data(), sc.mi.data(), M, row[j], j)];
  }
  for (const int64_t j : sc.junk) {
    if (row[j] <= last) --sc.hist[matches_before(md.data(), sc.mi.data(), M, row[j], j)];
  }
  int64_t rank = 0;
  double precision_sum = 0.0;
  for (int64_t m = 0; m < M; ++m) {
    rank += sc.hist[m];
    precision_sum += static_cast<double>(m + 1) / static_cast<double>(rank);
    if (m == 0) res.first = rank;
  }
  res.ap = precision_sum / static_cast<double>(M);
  res.inp = static_cast<double>(M) / static_cast<double>(rank);
  res.valid = true;
  return res;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rank_metrics_cpu(
    const at::Tensor& dist, const at::Tensor& q_pids, const at::Tensor& g_pids, const at::Tensor& q_camids,
    const at::Tensor& g_camids) {
  check_rank(dist, 2, "dist");
  check_float(dist, "dist");
  const int64_t Q = dist.size(0), G = dist.size(1);
  for (const auto& [t, n, name] : {std::tuple{q_pids, Q, "q_pids"}, std::tuple{g_pids, G, "g_pids"},
                                   std::tuple{q_camids, Q, "q_camids"}, std::tuple{g_camids, G, "g_camids"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kLong, name, " must be int64 of length ", n,
                ", got ", t.scalar_type(), " ", t.sizes());
  }
  auto opts = dist.options().dtype(at::kDouble);
  auto ap = at::zeros({Q}, opts), inp = at::zeros({Q}, opts);
  auto first = at::zeros({Q}, opts.dtype(at::kLong));
  auto valid = at::zeros({Q}, opts.dtype(at::kBool));
  auto d = dist.contiguous();
  auto qp = q_pids.contiguous(), gp = g_pids.contiguous(), qc = q_camids.contiguous(), gc = g_camids.contiguous();
  const GalleryIndex gallery(gp.data_ptr<int64_t>(), G);
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "rank_metrics_cpu", [&] {
    const scalar_t* dp = d.data_ptr<scalar_t>();
    at::parallel_for(0, Q, 1, [&](int64_t begin, int64_t end) {
      std::vector<std::pair<scalar_t, int64_t>> matches;
      std::vector<scalar_t> md;
      Scratch scratch;
      for (int64_t i = begin; i < end; ++i) {
        const RowResult r = rank_row(dp + i * G, qp.data_ptr<int64_t>()[i], qc.data_ptr<int64_t>()[i],
                                     gc.data_ptr<int64_t>(), G, gallery, matches, md, scratch);
        ap.data_ptr<double>()[i] = r.ap;
        inp.data_ptr<double>()[i] = r.inp;
        first.data_ptr<int64_t>()[i] = r.first;
        valid.data_ptr<bool>()[i] = r.valid;
      }
    });
  });
  return {ap, first, inp, valid};
}

}  // namespace

TORCH_LIBRARY_IMPL(amfor, CPU, m) { m.impl("rank_metrics", &rank_metrics_cpu); }

}  // namespace amfor
