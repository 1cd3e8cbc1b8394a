// C++ CPU kernel of the distill_kl_loss op: per-row T^2 * KL(p_t || p_s) and, in the same pass over the
// data, the row gradients (see amfor/ops/distill_loss.py for the semantics, csrc/ops.cpp for the schema).
// Each row is owned by one thread and walked in a fixed order, so results are deterministic.
// float32 / bfloat16 / float16: float math, vectorised (GCC vector extensions, one build per ISA chosen at run
// time, the exp of vec_math.h), sums in independent lanes combined pairwise; float64: scalar, in double. The
// gradients are written in the logits dtype, float32 for float16 logits (distill::grad_dtype).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../distill_loss.h"
#include "vec_math.h"

namespace amfor {
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

// float64 rows. Fills ds/dt with the shifted row / T and es/et with their exps; returns the row statistics.
// Working with shifted values only keeps large logits (+-1e4 / T) from cancelling.
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

// ---------------------------------------------------------------------------------------------------------
// float32 / bfloat16 / float16 rows: float math on vectors of W floats, W the vector width of the ISA the row
// kernels run with: 16 (one zmm) with AVX-512, 8 (one ymm) with AVX2 + FMA, 8 in the portable build, chosen at
// run time (`row_kernels()`). The bodies are always_inline templates on the vector type V, compiled once per ISA
// inside target("...") functions: GCC's target_clones("avx2") enabled no FMA, and 16-float vectors on AVX2 are
// two ymm each, so the former clones spilled (docs/distill_loss.md, "Measured"). Per row three passes: the
// maxima of both rows; ds, dt (shifted row / T), their exps (kept in es, et) and the sums Z_s, Z_t and A; the
// gradients from es, et (and ds, dt, recomputed from the logits, for the teacher's). Pass 2 takes STEP vectors
// per step: 2 with AVX-512 (each sum in 2W = 32 lanes, class c in lane c mod 32: the former lane order), 1 with
// AVX2 and the portable build (the body's classes in W = 8 lanes, class c in lane c mod 8, the tail's in 8 more:
// 3 accumulators beside the exp's constants; with 2 the 6 accumulators went to the stack in every step,
// docs/distill_loss.md).
// The lanes are combined pairwise at the end: a fixed order for a given ISA (never dependent on the thread
// count), and far more accurate than one sequential float sum.
// ---------------------------------------------------------------------------------------------------------
using vec::loadv;
using vec::splatv;
using vec::storev;
using vec::VecTraits;
#define AMFOR_INLINE __attribute__((always_inline)) inline

// The W-lane uint32 vector, and the W-lane uint16 vector (bfloat16 bits) with its unaligned alias, of V.
template <class V> struct Bf16Traits;
template <> struct Bf16Traits<vec::v16> {
  typedef uint32_t UI __attribute__((vector_size(64)));
  typedef uint16_t H __attribute__((vector_size(32)));
  typedef uint16_t HU __attribute__((vector_size(32), aligned(2), may_alias));
};
template <> struct Bf16Traits<vec::v8> {
  typedef uint32_t UI __attribute__((vector_size(32)));
  typedef uint16_t H __attribute__((vector_size(16)));
  typedef uint16_t HU __attribute__((vector_size(16), aligned(2), may_alias));
};

// Loads and stores of W values of a row of float32 (float) or bfloat16 (uint16_t bits), as floats.
template <class V>
AMFOR_INLINE V vload(const float* p) { return loadv<V>(p); }
template <class V>
AMFOR_INLINE V vload(const uint16_t* p) {
  using T = Bf16Traits<V>;
  const typename T::H h = *reinterpret_cast<const typename T::HU*>(p);
  return (V)(__builtin_convertvector(h, typename T::UI) << 16);
}
template <class V>
AMFOR_INLINE void vstore(float* p, V x) { storev(p, x); }
// float -> bfloat16 rounded to nearest even, NaN -> 0x7FC0: c10::BFloat16's conversion, W at a time.
template <class V>
AMFOR_INLINE void vstore(uint16_t* p, V x) {
  using T = Bf16Traits<V>;
  using UI = typename T::UI;
  const UI u = (UI)x;
  const UI r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  const UI bits = x != x ? UI{} + 0x7FC0u : r;
  *reinterpret_cast<typename T::HU*>(p) = __builtin_convertvector(bits, typename T::H);
}
AMFOR_INLINE float to_float(float x) { return x; }
AMFOR_INLINE float to_float(uint16_t x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}
// The first n < W values of a row as a vector, the other lanes `pad`.
template <class V, typename in_t>
AMFOR_INLINE V vload_tail(const in_t* p, int64_t n, float pad) {
  V v = splatv<V>(pad);
  for (int64_t i = 0; i < n; ++i) v[i] = to_float(p[i]);
  return v;
}
// Stores the first n < W lanes.
template <class V, typename out_t>
AMFOR_INLINE void vstore_tail(out_t* p, int64_t n, V x) {
  alignas(64) out_t tmp[VecTraits<V>::W];
  vstore(tmp, x);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
}
template <class V>
AMFOR_INLINE V vmax(V a, V b) { return b > a ? b : a; }
template <class V>
AMFOR_INLINE float hmax(V x) {
  float m = x[0];
  for (int i = 1; i < VecTraits<V>::W; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
// Pairwise sum of 2W lanes: (a + b), then halves of W / 2, W / 4, ..., 1 lanes.
template <class V>
AMFOR_INLINE float hsum(V a, V b) {
  constexpr int W = VecTraits<V>::W;
  V x = a + b;
  float l[W];
  for (int i = 0; i < W; ++i) l[i] = x[i];
  for (int w = W / 2; w > 0; w /= 2) {
    for (int i = 0; i < w; ++i) l[i] += l[i + w];
  }
  return l[0];
}

struct RowArgs {
  int64_t C;
  float inv_temp, temp, gscale;  // gscale: T times the factor the weights and the reduction give the row
};

// The exps of one step: e_s, e_t and the A term e_t * (dt - ds) where e_t > 0.
template <class V>
struct Step {
  V es, et, a;
};
template <class V>
AMFOR_INLINE Step<V> exp_step(V s, V t, float inv_temp, float m_s, float m_t) {
  const V ds = s * inv_temp - m_s, dt = t * inv_temp - m_t;
  const V es = vec::vexp<V>(ds), et = vec::vexp<V>(dt);
  return {es, et, et > 0.0f ? et * (dt - ds) : V{}};
}

// Statistics of a row after the first two passes (see RowStats), in float.
struct RowF {
  float m_s, m_t, log_zs, log_zt, inv_zs, inv_zt, kl;
};

template <class V>
AMFOR_INLINE V grad_s_step(V es, V et, const RowF& st, float gscale) {
  return gscale * (es * st.inv_zs - et * st.inv_zt);
}
template <class V>
AMFOR_INLINE V grad_t_step(V s, V t, V et, const RowF& st, float inv_temp, float gscale) {
  const V ds = s * inv_temp - st.m_s, dt = t * inv_temp - st.m_t;
  const V p_t = et * st.inv_zt;
  const V log_ratio = (dt - st.log_zt) - (ds - st.log_zs);
  return p_t > 0.0f ? gscale * p_t * (log_ratio - st.kl) : V{};
}

// One row: loss = T^2 KL; gs / gt (when not null): the gradients of row_grads (gscale * (p_s - p_t), ...).
// es, et: C floats of scratch each. Returns false (and writes only the loss, 0) when the row has no teacher.
template <class V, int STEP, typename in_t, typename out_t>
AMFOR_INLINE bool row_body(const in_t* s, const in_t* t, const RowArgs& a, float* es, float* et, out_t* gs,
                           out_t* gt, float* loss) {
  constexpr int64_t W = VecTraits<V>::W;
  const int64_t C = a.C, body = C / W * W, rem = C - body;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // Pass 1: the maxima (x -> x / T is monotone, so max(x) / T is the max of the scaled row).
  V ms = splatv<V>(kNegInf), mt = ms;
  for (int64_t c = 0; c < body; c += W) {
    ms = vmax(ms, vload<V>(s + c));
    mt = vmax(mt, vload<V>(t + c));
  }
  if (rem > 0) {
    ms = vmax(ms, vload_tail<V>(s + body, rem, kNegInf));
    mt = vmax(mt, vload_tail<V>(t + body, rem, kNegInf));
  }
  RowF st{};
  st.m_s = hmax(ms) * a.inv_temp;
  st.m_t = hmax(mt) * a.inv_temp;
  *loss = 0;
  if (st.m_t == kNegInf) return false;
  // Pass 2: exps and sums, STEP vectors per step (sums in 2W lanes with STEP 2; with STEP 1 in W lanes, the tail's
  // in W more).
  V zs0{}, zs1{}, zt0{}, zt1{}, a0{}, a1{};
  int64_t c = 0;
  if constexpr (STEP == 2) {
    for (; c + 2 * W <= body; c += 2 * W) {
      const Step<V> x = exp_step(vload<V>(s + c), vload<V>(t + c), a.inv_temp, st.m_s, st.m_t);
      storev(es + c, x.es), storev(et + c, x.et);
      zs0 += x.es, zt0 += x.et, a0 += x.a;
      const Step<V> y = exp_step(vload<V>(s + c + W), vload<V>(t + c + W), a.inv_temp, st.m_s, st.m_t);
      storev(es + c + W, y.es), storev(et + c + W, y.et);
      zs1 += y.es, zt1 += y.et, a1 += y.a;
    }
  }
  for (; c < body; c += W) {  // STEP 2: at most once
    const Step<V> x = exp_step(vload<V>(s + c), vload<V>(t + c), a.inv_temp, st.m_s, st.m_t);
    storev(es + c, x.es), storev(et + c, x.et);
    zs0 += x.es, zt0 += x.et, a0 += x.a;
  }
  if (rem > 0) {  // padding lanes: -inf logits, exps 0, no A term
    const Step<V> y = exp_step(vload_tail<V>(s + body, rem, kNegInf), vload_tail<V>(t + body, rem, kNegInf),
                               a.inv_temp, st.m_s, st.m_t);
    for (int64_t i = 0; i < rem; ++i) es[body + i] = y.es[i], et[body + i] = y.et[i];
    zs1 += y.es, zt1 += y.et, a1 += y.a;
  }
  const float z_s = hsum(zs0, zs1), z_t = hsum(zt0, zt1), A = hsum(a0, a1);
  st.log_zs = std::log(z_s);
  st.log_zt = std::log(z_t);
  st.inv_zs = 1.0f / z_s;
  st.inv_zt = 1.0f / z_t;
  // The same expression as the gradient's log ratio, so that a one-hot teacher gives exactly 0 there.
  st.kl = A / z_t - st.log_zt + st.log_zs;
  *loss = st.kl * a.temp * a.temp;
  // Pass 3: the gradients.
  if (gs != nullptr) {
    for (c = 0; c < body; c += W) {
      vstore(gs + c, grad_s_step(loadv<V>(es + c), loadv<V>(et + c), st, a.gscale));
    }
    if (rem > 0) {
      const V e_s = vload_tail<V>(es + body, rem, 0.0f), e_t = vload_tail<V>(et + body, rem, 0.0f);
      vstore_tail(gs + body, rem, grad_s_step(e_s, e_t, st, a.gscale));
    }
  }
  if (gt != nullptr) {
    for (c = 0; c < body; c += W) {
      vstore(gt + c, grad_t_step(vload<V>(s + c), vload<V>(t + c), loadv<V>(et + c), st, a.inv_temp, a.gscale));
    }
    if (rem > 0) {
      const V g = grad_t_step(vload_tail<V>(s + body, rem, 0.0f), vload_tail<V>(t + body, rem, 0.0f),
                              vload_tail<V>(et + body, rem, 0.0f), st, a.inv_temp, a.gscale);
      vstore_tail(gt + body, rem, g);
    }
  }
  return true;
}

// The row kernels compiled for one ISA.
struct RowKernels {
  bool (*f32)(const float* s, const float* t, const RowArgs& a, float* es, float* et, float* gs, float* gt,
              float* loss);
  bool (*bf16)(const uint16_t* s, const uint16_t* t, const RowArgs& a, float* es, float* et, uint16_t* gs,
               uint16_t* gt, float* loss);
};

// NAME: the `RowKernels` of row_body on vector type VT with STEP vectors per pass-2 step, compiled under the
// function attribute TARGET.
#define AMFOR_DL_KERNELS(NAME, TARGET, VT, STEP)                                                                       \
  TARGET bool NAME##_f32(const float* s, const float* t, const RowArgs& a, float* es, float* et, float* gs,            \
                         float* gt, float* loss) {                                                                     \
    return row_body<VT, STEP>(s, t, a, es, et, gs, gt, loss);                                                          \
  }                                                                                                                    \
  TARGET bool NAME##_bf16(const uint16_t* s, const uint16_t* t, const RowArgs& a, float* es, float* et,                \
                          uint16_t* gs, uint16_t* gt, float* loss) {                                                   \
    return row_body<VT, STEP>(s, t, a, es, et, gs, gt, loss);                                                          \
  }                                                                                                                    \
  const RowKernels NAME = {NAME##_f32, NAME##_bf16};

// 32 zmm with AVX-512: 2 vectors per step (6 accumulators). 16 ymm with AVX2: 1 (3 accumulators; the exp's ~15
// constants take the rest).
AMFOR_DL_KERNELS(portable_rows, , vec::v8, 1)
#if defined(__x86_64__) || defined(__i386__)
AMFOR_DL_KERNELS(avx2_rows, __attribute__((target("avx2,fma"))), vec::v8, 1)
AMFOR_DL_KERNELS(avx512_rows, __attribute__((target("avx512f"))), vec::v16, 2)
#endif
#undef AMFOR_DL_KERNELS

// The row kernels for this CPU: AVX-512 (W 16), else AVX2 with FMA (W 8), else the portable build (W 8).
const RowKernels& row_kernels() {
#if defined(__x86_64__) || defined(__i386__)
  switch (vec::cpu_isa()) {
    case vec::Isa::avx512: return avx512_rows;
    case vec::Isa::avx2_fma: return avx2_rows;
    default: return portable_rows;
  }
#else
  return portable_rows;
#endif
}

// One float32/bfloat16/float16 row (float16 goes through float32 copies of the row; its gradients are float32).
// buf: 2C floats of scratch (4C for float16).
template <typename scalar_t>
bool row_float(const scalar_t* s, const scalar_t* t, const RowArgs& a, float* buf, distill::grad_type<scalar_t>* gs,
               distill::grad_type<scalar_t>* gt, float* loss) {
  float *es = buf, *et = buf + a.C;
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row_kernels().f32(s, t, a, es, et, gs, gt, loss);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return row_kernels().bf16(reinterpret_cast<const uint16_t*>(s), reinterpret_cast<const uint16_t*>(t), a, es, et,
                    reinterpret_cast<uint16_t*>(gs), reinterpret_cast<uint16_t*>(gt), loss);
  } else {
    const int64_t C = a.C;
    float *sf = et + C, *tf = sf + C;
    for (int64_t c = 0; c < C; ++c) sf[c] = static_cast<float>(s[c]), tf[c] = static_cast<float>(t[c]);
    return row_kernels().f32(sf, tf, a, es, et, gs, gt, loss);
  }
}

// Rows [R, C] (R = G * B): loss[r] = T^2 KL; gs / gt (when defined) = factor * w[r / B] * d loss[r] / d logits, in
// distill::grad_dtype of the logits.
template <typename scalar_t>
void distill_rows(const at::Tensor& s, const at::Tensor& t, double temperature, const at::Tensor& weights,
                  double factor, int64_t B, at::Tensor& loss, at::Tensor& gs, at::Tensor& gt) {
  using acc_t = at::opmath_type<scalar_t>;
  using grad_t = distill::grad_type<scalar_t>;
  const int64_t R = s.size(0), C = s.size(1), s_stride = s.stride(0), t_stride = t.stride(0);
  const scalar_t* s_p = s.data_ptr<scalar_t>();
  const scalar_t* t_p = t.data_ptr<scalar_t>();
  const acc_t* w_p = weights.defined() ? weights.data_ptr<acc_t>() : nullptr;
  acc_t* loss_p = loss.data_ptr<acc_t>();
  grad_t* gs_p = gs.numel() > 0 ? gs.data_ptr<grad_t>() : nullptr;
  grad_t* gt_p = gt.numel() > 0 ? gt.data_ptr<grad_t>() : nullptr;
  const acc_t temp = static_cast<acc_t>(temperature), inv_temp = acc_t(1) / temp;
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    constexpr bool kDouble = std::is_same_v<scalar_t, double>;
    std::vector<acc_t> buf((kDouble || std::is_same_v<scalar_t, at::Half> ? 4 : 2) * C);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t *s_row = s_p + r * s_stride, *t_row = t_p + r * t_stride;
      grad_t* gs_row = gs_p != nullptr ? gs_p + r * C : nullptr;
      grad_t* gt_row = gt_p != nullptr ? gt_p + r * C : nullptr;
      const acc_t gscale = temp * static_cast<acc_t>(factor) * (w_p != nullptr ? w_p[r / B] : acc_t(1));
      bool has_teacher;
      if constexpr (kDouble) {
        acc_t *ds = buf.data(), *dt = ds + C, *es = dt + C, *et = es + C;
        const RowStats<acc_t> st = row_stats(s_row, t_row, C, inv_temp, ds, dt, es, et);
        loss_p[r] = st.kl * temp * temp;
        has_teacher = st.has_teacher;
        if (has_teacher && (gs_row != nullptr || gt_row != nullptr)) {
          row_grads(st, C, gscale, ds, dt, es, et, gs_row, gt_row);
        }
      } else {
        has_teacher = row_float(s_row, t_row, RowArgs{C, inv_temp, temp, gscale}, buf.data(), gs_row, gt_row,
                                loss_p + r);
      }
      if (!has_teacher) {  // no teacher class at all: the row adds nothing
        if (gs_row != nullptr) std::fill(gs_row, gs_row + C, grad_t(0));
        if (gt_row != nullptr) std::fill(gt_row, gt_row + C, grad_t(0));
      }
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
  const auto grad_options = student.options().dtype(distill::grad_dtype(student.scalar_type()));
  auto gs = student_grad ? at::empty({G, B, C}, grad_options) : at::empty({0}, grad_options);
  auto gt = teacher_grad ? at::empty({G, B, C}, grad_options) : at::empty({0}, grad_options);
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
