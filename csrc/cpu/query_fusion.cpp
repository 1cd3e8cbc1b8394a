// C++ CPU kernels of query_fusion_attention (see amfor/ops/query_fusion.py for the semantics).
//
// float32 (forward_f32, backward_f32): blocked. Up to W rows (head, query) of one key/value head group
// against all tokens of a layer as a token-major score tile, so each key/value row read serves all rows of
// the block (W = 16 with AVX-512, 8 with AVX2 + FMA or the portable build, chosen at run time); vectorised exp;
// backward per (b, h') or (b, h', l) unit writing dq, dk, dv, t without cross-thread reductions.
// Other dtypes (forward_kernel, dq_kernel, dkdv_kernel): one thread per query row
// streams the keys/values (forward, dq/t); the tokens' pass gives each (b, h', l, n) to one thread, which
// sums over its group's heads and the queries in a fixed order. All paths deterministic, no atomics.
// Keys/values arrive as [one tensor [B, Hkv, L, N, d]] or L layer tensors [B, Hkv, N, d] sharing strides.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <limits>
#include <vector>

#include "../query_fusion.h"
#include "vec_math.h"

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

template <typename scalar_t, typename acc_t>
inline acc_t dot(const acc_t* a, const scalar_t* b, int64_t d) {
  return dot_generic<scalar_t, acc_t>(a, b, d);
}

template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* y, acc_t a, const scalar_t* x, int64_t d) {
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

// ---------------------------------------------------------------------------------------------------------
// float32: blocked kernels. A block is up to W rows (head, query) of one key/value head group, W the float
// vector width of the ISA the kernels run with: 16 (one zmm) with AVX-512, 8 (one ymm) with AVX2 + FMA, 8 in
// the portable fallback. The scores of the block against all N tokens of a layer are a [N][W] tile (token-major,
// the rows of a token in one vector), so every key/value token row read is used by all rows of the block at
// once. Register blocking: no inner loop keeps more than 16 accumulators (8 on AVX2) and 3 operands live, so
// the AVX2 code fits its 16 ymm registers (16-float vectors there are two ymm each: they spilled, see
// docs/query_fusion.md, "Measured"). The helpers are always_inline bodies on a vector type (GCC vector extensions),
// compiled once per ISA inside target("...") functions and chosen at run time (`kernels()`).
// Summation orders are fixed by the loops (never by the thread count): deterministic.
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t MAX_W = 16;
constexpr int64_t DCHUNK = 64;  // the score sums run over chunks of 64 head-dim columns, added in order
using vec::loadv;
using vec::splatv;
using vec::storev;
using vec::VecTraits;
#define AMFOR_INLINE __attribute__((always_inline)) inline

// S[n][j] = scale * sum_i Qt[i][j] * K[n, i] for n < N (Qt: [d][W], the block's rows transposed, zero padded).
// 8 tokens at a time (8 accumulators); the chunk sums are added in order through the tile.
template <class V>
AMFOR_INLINE void scores_body(float* S, const float* Qt, const float* K, int64_t sk, int64_t N, int64_t d,
                              float scale) {
  constexpr int64_t W = VecTraits<V>::W;
  int64_t n = 0;
  for (; n + 8 <= N; n += 8) {
    const float* k0 = K + n * sk;
    float* s0 = S + n * W;
    for (int64_t i0 = 0; i0 < d; i0 += DCHUNK) {
      const int64_t i1 = std::min(d, i0 + DCHUNK);
      V a0{}, a1{}, a2{}, a3{}, a4{}, a5{}, a6{}, a7{};
      for (int64_t i = i0; i < i1; ++i) {
        const V qv = loadv<V>(Qt + i * W);
        a0 += k0[i] * qv;
        a1 += k0[sk + i] * qv;
        a2 += k0[2 * sk + i] * qv;
        a3 += k0[3 * sk + i] * qv;
        a4 += k0[4 * sk + i] * qv;
        a5 += k0[5 * sk + i] * qv;
        a6 += k0[6 * sk + i] * qv;
        a7 += k0[7 * sk + i] * qv;
      }
      if (i0 > 0) {
        a0 = loadv<V>(s0) + a0, a1 = loadv<V>(s0 + W) + a1, a2 = loadv<V>(s0 + 2 * W) + a2;
        a3 = loadv<V>(s0 + 3 * W) + a3, a4 = loadv<V>(s0 + 4 * W) + a4, a5 = loadv<V>(s0 + 5 * W) + a5;
        a6 = loadv<V>(s0 + 6 * W) + a6, a7 = loadv<V>(s0 + 7 * W) + a7;
      }
      storev(s0, a0), storev(s0 + W, a1), storev(s0 + 2 * W, a2), storev(s0 + 3 * W, a3);
      storev(s0 + 4 * W, a4), storev(s0 + 5 * W, a5), storev(s0 + 6 * W, a6), storev(s0 + 7 * W, a7);
    }
    for (int64_t j = 0; j < 8; ++j) storev(s0 + j * W, (d == 0 ? V{} : loadv<V>(s0 + j * W)) * scale);
  }
  for (; n < N; ++n) {
    const float* k0 = K + n * sk;
    V t{};
    for (int64_t i0 = 0; i0 < d; i0 += DCHUNK) {
      const int64_t i1 = std::min(d, i0 + DCHUNK);
      V a0{};
      for (int64_t i = i0; i < i1; ++i) a0 += k0[i] * loadv<V>(Qt + i * W);
      t = i0 == 0 ? a0 : t + a0;
    }
    storev(S + n * W, t * scale);
  }
}

// O[j][c] (+)= sum_n P[n][j] * V[n, c] for j < rows (rounded up to ROWS), c < d (O: [W][ldo]). ROWS rows x COLS
// vectors of columns at a time (ROWS COLS accumulators); rows beyond are left as they are.
template <class V, int64_t ROWS, int64_t COLS>
AMFOR_INLINE void pv_tile(float* O, int64_t ldo, const float* P, const float* Vp, int64_t sv, int64_t N, int64_t rows,
                          bool accumulate) {
  constexpr int64_t W = VecTraits<V>::W;
  for (int64_t j0 = 0; j0 < rows; j0 += ROWS) {
    V a[ROWS][COLS];
    for (int64_t r = 0; r < ROWS; ++r) {
      for (int64_t u = 0; u < COLS; ++u) a[r][u] = accumulate ? loadv<V>(O + (j0 + r) * ldo + u * W) : V{};
    }
    for (int64_t n = 0; n < N; ++n) {
      V vv[COLS];
      for (int64_t u = 0; u < COLS; ++u) vv[u] = loadv<V>(Vp + n * sv + u * W);
      const float* p = P + n * W + j0;
      for (int64_t r = 0; r < ROWS; ++r) {
        for (int64_t u = 0; u < COLS; ++u) a[r][u] += p[r] * vv[u];
      }
    }
    for (int64_t r = 0; r < ROWS; ++r) {
      for (int64_t u = 0; u < COLS; ++u) storev(O + (j0 + r) * ldo + u * W, a[r][u]);
    }
  }
}

template <class V, int64_t ROWS, int64_t COLS>
AMFOR_INLINE void pv_body(float* O, int64_t ldo, const float* P, const float* Vp, int64_t sv, int64_t N, int64_t d,
                          int64_t rows, bool accumulate) {
  constexpr int64_t W = VecTraits<V>::W;
  static_assert(W % ROWS == 0, "ROWS must divide the tile width");
  int64_t c = 0;
  for (; c + COLS * W <= d; c += COLS * W) pv_tile<V, ROWS, COLS>(O + c, ldo, P, Vp + c, sv, N, rows, accumulate);
  for (; c + W <= d; c += W) pv_tile<V, ROWS, 1>(O + c, ldo, P, Vp + c, sv, N, rows, accumulate);
  for (; c < d; ++c) {  // tail columns (d % W)
    V a{};
    if (accumulate) {
      for (int64_t j = 0; j < W; ++j) a[j] = O[j * ldo + c];
    }
    for (int64_t n = 0; n < N; ++n) a += Vp[n * sv + c] * loadv<V>(P + n * W);
    for (int64_t j = 0; j < W; ++j) O[j * ldo + c] = a[j];
  }
}

// D[n, c] = scale * sum_blk sum_j A_blk[n][j] * R[blk W + j][c] for n < N, c < d: the outer products of nblk
// tiles A_blk [N][W] (consecutive, N W apart) with the row blocks of R [nblk W][d] (zero padded rows), summed
// over the blocks in order and written once. TOK tokens x COLS vectors of columns at a time (TOK COLS
// accumulators), the tokens' rows written column block after column block.
template <class V, int64_t TOK, int64_t COLS>
AMFOR_INLINE void outer_tile(float* D, int64_t ldd, const float* A, const float* R, int64_t N, int64_t d,
                             int64_t nblk, float scale) {
  constexpr int64_t W = VecTraits<V>::W;
  V a[TOK][COLS];
  for (int64_t t = 0; t < TOK; ++t) {
    for (int64_t u = 0; u < COLS; ++u) a[t][u] = V{};
  }
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const float* p = A + blk * N * W;
    const float* r = R + blk * W * d;
    for (int64_t j = 0; j < W; ++j) {
      V rv[COLS];
      for (int64_t u = 0; u < COLS; ++u) rv[u] = loadv<V>(r + j * d + u * W);
      for (int64_t t = 0; t < TOK; ++t) {
        for (int64_t u = 0; u < COLS; ++u) a[t][u] += p[t * W + j] * rv[u];
      }
    }
  }
  for (int64_t t = 0; t < TOK; ++t) {
    for (int64_t u = 0; u < COLS; ++u) storev(D + t * ldd + u * W, a[t][u] * scale);
  }
}

template <class V, int64_t TOK, int64_t COLS>
AMFOR_INLINE void outer_body(float* D, int64_t ldd, const float* A, const float* R, int64_t N, int64_t d,
                             int64_t nblk, float scale) {
  constexpr int64_t W = VecTraits<V>::W;
  for (int64_t n = 0; n < N;) {
    const bool full = n + TOK <= N;  // else the tail tokens (N % TOK), one at a time
    int64_t c = 0;
    if (full) {
      for (; c + COLS * W <= d; c += COLS * W) {
        outer_tile<V, TOK, COLS>(D + n * ldd + c, ldd, A + n * W, R + c, N, d, nblk, scale);
      }
      for (; c + W <= d; c += W) outer_tile<V, TOK, 1>(D + n * ldd + c, ldd, A + n * W, R + c, N, d, nblk, scale);
    } else {
      for (; c + W <= d; c += W) outer_tile<V, 1, 1>(D + n * ldd + c, ldd, A + n * W, R + c, N, d, nblk, scale);
    }
    const int64_t n1 = full ? n + TOK : n + 1;
    for (; c < d; ++c) {  // tail columns (d % W)
      for (int64_t t = n; t < n1; ++t) {
        float a = 0.0f;
        for (int64_t blk = 0; blk < nblk; ++blk) {
          for (int64_t j = 0; j < W; ++j) a += A[blk * N * W + t * W + j] * R[(blk * W + j) * d + c];
        }
        D[t * ldd + c] = a * scale;
      }
    }
    n = n1;
  }
}

// Forward softmax of a [N][W] tile of scaled scores in place: m = row max, P = exp(S - m), sum = row sums.
template <class V>
AMFOR_INLINE void softmax_body(float* S, int64_t N, float* m_out, float* sum_out) {
  constexpr int64_t W = VecTraits<V>::W;
  const V neg_inf = splatv<V>(-std::numeric_limits<float>::infinity());
  V m = neg_inf;
  for (int64_t n = 0; n < N; ++n) {
    const V s = loadv<V>(S + n * W);
    m = s > m ? s : m;
  }
  const V msafe = m == neg_inf ? V{} : m;
  V sum{};
  for (int64_t n = 0; n < N; ++n) {
    const V p = vec::vexp<V>(loadv<V>(S + n * W) - msafe);
    storev(S + n * W, p);
    sum += p;
  }
  storev(m_out, m);
  storev(sum_out, sum);
}

// S[n][j] *= coef[j].
template <class V>
AMFOR_INLINE void scale_body(float* S, int64_t N, const float* coef) {
  constexpr int64_t W = VecTraits<V>::W;
  const V c = loadv<V>(coef);
  for (int64_t n = 0; n < N; ++n) storev(S + n * W, loadv<V>(S + n * W) * c);
}

// Backward of a [N][W] tile: S (scaled scores) -> dS = w P (dP - t), dP -> w P, with P = exp(S - lse)
// (lse = +inf for rows without probabilities); t = sum_n P dP (in token order) to t_out.
template <class V>
AMFOR_INLINE void backward_body(float* S, float* dP, int64_t N, const float* lse, const float* w, float* t_out) {
  constexpr int64_t W = VecTraits<V>::W;
  const V l = loadv<V>(lse), wv = loadv<V>(w);
  V t{};
  for (int64_t n = 0; n < N; ++n) {
    const V p = vec::vexp<V>(loadv<V>(S + n * W) - l);
    storev(S + n * W, p);
    t += p * loadv<V>(dP + n * W);
  }
  for (int64_t n = 0; n < N; ++n) {
    const V wp = wv * loadv<V>(S + n * W);
    storev(S + n * W, wp * (loadv<V>(dP + n * W) - t));
    storev(dP + n * W, wp);
  }
  storev(t_out, t);
}

// The helpers compiled for one ISA, with the tile width W they use.
struct Kernels {
  int64_t W;
  void (*scores)(float* S, const float* Qt, const float* K, int64_t sk, int64_t N, int64_t d, float scale);
  void (*pv)(float* O, int64_t ldo, const float* P, const float* V, int64_t sv, int64_t N, int64_t d, int64_t rows,
             bool acc);
  void (*outer)(float* D, int64_t ldd, const float* A, const float* R, int64_t N, int64_t d, int64_t nblk,
                float scale);
  void (*softmax)(float* S, int64_t N, float* m_out, float* sum_out);
  void (*scale)(float* S, int64_t N, const float* coef);
  void (*backward)(float* S, float* dP, int64_t N, const float* lse, const float* w, float* t_out);
};

// NAME: a `Kernels` of the bodies on vector type VT, each compiled under the function attribute TARGET; the
// register blocking of pv (PV_ROWS rows x PV_COLS column vectors) and outer (OUT_TOK tokens x OUT_COLS).
#define AMFOR_QF_KERNELS(NAME, TARGET, VT, PV_ROWS, PV_COLS, OUT_TOK, OUT_COLS)                                  \
  TARGET void NAME##_scores(float* S, const float* Qt, const float* K, int64_t sk, int64_t N, int64_t d,         \
                            float scale) {                                                                     \
    scores_body<VT>(S, Qt, K, sk, N, d, scale);                                                                \
  }                                                                                                            \
  TARGET void NAME##_pv(float* O, int64_t ldo, const float* P, const float* V, int64_t sv, int64_t N, int64_t d, \
                        int64_t rows, bool acc) {                                                              \
    pv_body<VT, PV_ROWS, PV_COLS>(O, ldo, P, V, sv, N, d, rows, acc);                                          \
  }                                                                                                            \
  TARGET void NAME##_outer(float* D, int64_t ldd, const float* A, const float* R, int64_t N, int64_t d,          \
                           int64_t nblk, float scale) {                                                        \
    outer_body<VT, OUT_TOK, OUT_COLS>(D, ldd, A, R, N, d, nblk, scale);                                        \
  }                                                                                                            \
  TARGET void NAME##_softmax(float* S, int64_t N, float* m, float* sum) { softmax_body<VT>(S, N, m, sum); }      \
  TARGET void NAME##_scale(float* S, int64_t N, const float* coef) { scale_body<VT>(S, N, coef); }               \
  TARGET void NAME##_backward(float* S, float* dP, int64_t N, const float* lse, const float* w, float* t) {      \
    backward_body<VT>(S, dP, N, lse, w, t);                                                                    \
  }                                                                                                            \
  const Kernels NAME = {VecTraits<VT>::W, NAME##_scores, NAME##_pv,      NAME##_outer,                          \
                        NAME##_softmax,   NAME##_scale,  NAME##_backward};

// 32 zmm registers with AVX-512: 16 rows x 1 and 8 tokens x 1 (16 and 8 accumulators, 1 operand vector).
// 16 ymm with AVX2: 4 x 2 both (8 accumulators; 2 operand vectors per 4 broadcasts: fewer loads per FMA).
AMFOR_QF_KERNELS(portable_kernels, , vec::v8, 4, 2, 4, 2)
#if defined(__x86_64__) || defined(__i386__)
AMFOR_QF_KERNELS(avx2_kernels, __attribute__((target("avx2,fma"))), vec::v8, 4, 2, 4, 2)
AMFOR_QF_KERNELS(avx512_kernels, __attribute__((target("avx512f"))), vec::v16, 16, 1, 8, 1)
#endif
#undef AMFOR_QF_KERNELS

// The helpers for this CPU: AVX-512 (W 16), else AVX2 with FMA (W 8), else the portable build (W 8).
const Kernels& kernels() {
#if defined(__x86_64__) || defined(__i386__)
  switch (vec::cpu_isa()) {
    case vec::Isa::avx512: return avx512_kernels;
    case vec::Isa::avx2_fma: return avx2_kernels;
    default: return portable_kernels;
  }
#else
  return portable_kernels;
#endif
}

// Set S[n][j] = value where token n is masked for row j of the block (rows r0 + j of the group, j < R; tile
// width W).
void apply_mask(const Problem& P, float* S, int64_t W, int64_t b, int64_t l, int64_t r0, int64_t R, float value) {
  if (P.mask == nullptr) return;
  for (int64_t j = 0; j < R; ++j) {
    const bool* mrow = P.mask_row(b, (r0 + j) % P.Q, l);
    for (int64_t n = 0; n < P.N; ++n) {
      if (!mrow[n]) S[n * W + j] = value;
    }
  }
}

// Rows [r0, r0 + R) of the group starting at src (row stride d), transposed to [d][W], zero padded.
void transpose_rows(float* dst, const float* src, int64_t W, int64_t R, int64_t d) {
  std::fill(dst, dst + d * W, 0.0f);
  for (int64_t j = 0; j < R; ++j) {
    for (int64_t i = 0; i < d; ++i) dst[i * W + j] = src[j * d + i];
  }
}
void forward_f32(const Problem& P, const at::Tensor& q, const LayerView& k, const LayerView& v,
                 const at::Tensor& weights, at::Tensor& out, at::Tensor& lse) {
  const float* qp = q.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t d = P.d, N = P.N, L = P.L, GQ = P.G * P.Q;
  const Kernels& kern = kernels();
  const int64_t W = kern.W, nblk = (GQ + W - 1) / W;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, P.B * P.Hkv * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(d * W), S(N * W), O(W * d);
    alignas(64) float m[MAX_W], sum[MAX_W], coef[MAX_W];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t blk = unit % nblk, hk = (unit / nblk) % P.Hkv, b = unit / (nblk * P.Hkv);
      const int64_t r0 = blk * W, R = std::min(W, GQ - r0);
      const int64_t row0 = (b * P.H + hk * P.G) * P.Q + r0;  // global row of the block's first row
      transpose_rows(qt.data(), qp + row0 * d, W, R, d);
      for (int64_t l = 0; l < L; ++l) {
        const float* kb = static_cast<const float*>(k.ptr[l]) + b * k.sb + hk * k.sh;
        const float* vb = static_cast<const float*>(v.ptr[l]) + b * v.sb + hk * v.sh;
        kern.scores(S.data(), qt.data(), kb, k.sn, N, d, static_cast<float>(P.scale));
        apply_mask(P, S.data(), W, b, l, r0, R, neg_inf);
        kern.softmax(S.data(), N, m, sum);
        for (int64_t j = 0; j < W; ++j) {
          const bool live = j < R && m[j] != neg_inf;
          if (j < R) lp[(row0 + j) * L + l] = live ? m[j] + std::log(sum[j]) : neg_inf;
          coef[j] = live ? wp[(b * P.Q + (r0 + j) % P.Q) * L + l] / sum[j] : 0.0f;
        }
        kern.scale(S.data(), N, coef);
        kern.pv(O.data(), d, S.data(), vb, v.sn, N, d, R, l > 0);
      }
      std::copy(O.begin(), O.begin() + R * d, op + row0 * d);
    }
  });
}

void backward_f32(const Problem& P, const at::Tensor& grad, const at::Tensor& q, const LayerView& k,
                  const LayerView& v, const at::Tensor& weights, const at::Tensor& lse, at::Tensor& dq, at::Tensor& t,
                  at::Tensor& dk, at::Tensor& dv) {
  const float *gp = grad.data_ptr<float>(), *qp = q.data_ptr<float>();
  const float *wp = weights.data_ptr<float>(), *lp = lse.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *tp = t.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const int64_t d = P.d, N = P.N, L = P.L, GQ = P.G * P.Q;
  const Kernels& kern = kernels();
  const int64_t W = kern.W, nblk = (GQ + W - 1) / W;
  const float scale = static_cast<float>(P.scale), inf = std::numeric_limits<float>::infinity();
  // A work unit owns whole output elements. With many (b, h') it is one (b, h') (all layers; dq summed over
  // the layers in the unit); with few, one (b, h', l), and dq's per-layer parts go to a buffer
  // [B, H, Q, L, d] summed over l afterwards. Either way every element sees the same operations in the
  // same order (dq = scale * (((0 + C_0) + C_1) + ...), dk/dv over the row blocks in order): the results
  // are bitwise the same whichever mode and thread count.
  const bool per_layer = P.B * P.Hkv < 4 * static_cast<int64_t>(at::get_num_threads());
  std::vector<float> part(per_layer ? static_cast<size_t>(P.B * P.H * P.Q * L * d) : 0);
  const int64_t units = P.B * P.Hkv * (per_layer ? L : 1);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    // per row block blk: qt/gt [d][W] (q, dout transposed), S/dP [N][W] tiles, acc [W][d] (dq / scale); qr/gr
    // [nblk W][d] (the group's q and dout rows, zero padded): the dk/dv outer products run over all blocks at once
    std::vector<float> qt(nblk * d * W), gt(nblk * d * W), qr(nblk * W * d), gr(nblk * W * d), S(nblk * N * W),
        dP(nblk * N * W), C(W * d), acc(nblk * W * d);
    alignas(64) float lse_b[MAX_W], w_b[MAX_W], t_b[MAX_W];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t l0 = per_layer ? unit % L : 0, l1 = per_layer ? l0 + 1 : L;
      const int64_t bh = per_layer ? unit / L : unit, hk = bh % P.Hkv, b = bh / P.Hkv;
      const int64_t grow0 = (b * P.H + hk * P.G) * P.Q;  // global row of the group's first row
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t r0 = blk * W, R = std::min(W, GQ - r0);
        transpose_rows(qt.data() + blk * d * W, qp + (grow0 + r0) * d, W, R, d);
        transpose_rows(gt.data() + blk * d * W, gp + (grow0 + r0) * d, W, R, d);
      }
      std::fill(qr.begin() + GQ * d, qr.end(), 0.0f);
      std::fill(gr.begin() + GQ * d, gr.end(), 0.0f);
      std::copy(qp + grow0 * d, qp + (grow0 + GQ) * d, qr.begin());
      std::copy(gp + grow0 * d, gp + (grow0 + GQ) * d, gr.begin());
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t l = l0; l < l1; ++l) {
        const float* kb = static_cast<const float*>(k.ptr[l]) + b * k.sb + hk * k.sh;
        const float* vb = static_cast<const float*>(v.ptr[l]) + b * v.sb + hk * v.sh;
        for (int64_t blk = 0; blk < nblk; ++blk) {
          const int64_t r0 = blk * W, R = std::min(W, GQ - r0), row0 = grow0 + r0;
          float *Sb = S.data() + blk * N * W, *dPb = dP.data() + blk * N * W;
          for (int64_t j = 0; j < W; ++j) {
            const float ls = j < R ? lp[(row0 + j) * L + l] : -inf;
            lse_b[j] = std::isinf(ls) ? inf : ls;  // no probabilities: exp(x - inf) = 0
            w_b[j] = j < R ? wp[(b * P.Q + (r0 + j) % P.Q) * L + l] : 0.0f;
          }
          kern.scores(Sb, qt.data() + blk * d * W, kb, k.sn, N, d, scale);
          apply_mask(P, Sb, W, b, l, r0, R, -inf);
          kern.scores(dPb, gt.data() + blk * d * W, vb, v.sn, N, d, 1.0f);
          kern.backward(Sb, dPb, N, lse_b, w_b, t_b);  // S <- dS, dP <- w P
          for (int64_t j = 0; j < R; ++j) tp[(row0 + j) * L + l] = t_b[j];
          kern.pv(C.data(), d, Sb, kb, k.sn, N, d, R, false);  // this layer's part of dq / scale
          if (per_layer) {
            for (int64_t j = 0; j < R; ++j) {
              std::copy(C.begin() + j * d, C.begin() + (j + 1) * d, part.begin() + ((row0 + j) * L + l) * d);
            }
          } else {
            float* a = acc.data() + blk * W * d;
            for (int64_t i = 0; i < R * d; ++i) a[i] += C[i];
          }
        }
        kern.outer(dkp + ((b * P.Hkv + hk) * L + l) * N * d, d, S.data(), qr.data(), N, d, nblk, scale);
        kern.outer(dvp + ((b * P.Hkv + hk) * L + l) * N * d, d, dP.data(), gr.data(), N, d, nblk, 1.0f);
      }
      if (!per_layer) {
        for (int64_t blk = 0; blk < nblk; ++blk) {
          const int64_t r0 = blk * W, R = std::min(W, GQ - r0);
          const float* a = acc.data() + blk * W * d;
          for (int64_t i = 0; i < R * d; ++i) dqp[(grow0 + r0) * d + i] = a[i] * scale;
        }
      }
    }
  });
  if (!per_layer) return;
  at::parallel_for(0, P.B * P.H * P.Q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* dst = dqp + row * d;
      std::fill(dst, dst + d, 0.0f);
      for (int64_t l = 0; l < L; ++l) {
        const float* src = part.data() + (row * L + l) * d;
        for (int64_t i = 0; i < d; ++i) dst[i] += src[i];
      }
      for (int64_t i = 0; i < d; ++i) dst[i] *= scale;
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
  if (out.numel() == 0) return {out, query_fusion::empty_head_lse(q, kv, attn_mask, weights.scalar_type())};
  auto lse = at::empty({P.B, P.H, P.Q, P.L}, weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "query_fusion_attention_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, float>) {
      forward_f32(P, q, kv, vv, weights, out, lse);
    } else {
      forward_kernel<scalar_t>(P, q, kv, vv, weights, out, lse);
    }
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
      if constexpr (std::is_same_v<scalar_t, float>) {
        backward_f32(P, grad_out, q, kv, vv, weights, lse, dq, t, dk, dv);
      } else {
        dq_kernel<scalar_t>(P, grad_out, q, kv, vv, weights, lse, dq, t);
        if (dk.numel() > 0) dkdv_kernel<scalar_t>(P, grad_out, q, kv, vv, weights, lse, t, dk, dv);
      }
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
