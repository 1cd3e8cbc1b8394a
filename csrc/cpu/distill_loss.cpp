// C++ CPU kernel of the distill_kl_loss op: per-row T^2 * KL(p_t || p_s) and, in the same pass over the
// data, the row gradients (see amfor/ops/distill_loss.py for the semantics, csrc/ops.cpp for the schema).
// Each row is owned by one thread and walked in a fixed order, so results are deterministic.
// float32 / bfloat16 / float16: float math, vectorised (GCC vector extensions under target_clones, the exp of
// vec_math.h), sums in 32 independent lanes combined pairwise; float64: scalar, in double. The gradients are
// written in the logits dtype, float32 for float16 logits (distill::grad_dtype).
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
// float32 / bfloat16 / float16 rows: float math on 16-float vectors. Per row three passes: the maxima of both
// rows; ds, dt (shifted row / T), their exps (kept in es, et) and the sums Z_s, Z_t and A; the gradients from
// es, et (and ds, dt, recomputed from the logits, for the teacher's). Each sum is kept in 32 lanes (class c in
// lane c mod 32, in class order), combined pairwise at the end: a fixed order, and far more accurate than one
// sequential float sum.
// ---------------------------------------------------------------------------------------------------------
using vec::load16;
using vec::splat16;
using vec::store16;
using vec::v16;
using vec::v16i;
using vec::vexp16;

typedef uint32_t v16ui __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint16_t v16hu __attribute__((vector_size(32), aligned(2), may_alias));

// Loads and stores of 16 values of a row of float32 (float) or bfloat16 (uint16_t bits), as floats.
__attribute__((always_inline)) inline v16 vload(const float* p) { return load16(p); }
__attribute__((always_inline)) inline v16 vload(const uint16_t* p) {
  const v16h h = *reinterpret_cast<const v16hu*>(p);
  return (v16)(__builtin_convertvector(h, v16ui) << 16);
}
__attribute__((always_inline)) inline void vstore(float* p, v16 x) { store16(p, x); }
// float -> bfloat16 rounded to nearest even, NaN -> 0x7FC0: c10::BFloat16's conversion, 16 at a time.
__attribute__((always_inline)) inline void vstore(uint16_t* p, v16 x) {
  const v16ui u = (v16ui)x;
  const v16ui r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  const v16ui bits = x != x ? v16ui{} + 0x7FC0u : r;
  *reinterpret_cast<v16hu*>(p) = __builtin_convertvector(bits, v16h);
}
__attribute__((always_inline)) inline float to_float(float x) { return x; }
__attribute__((always_inline)) inline float to_float(uint16_t x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}
// The first n < 16 values of a row as a vector, the other lanes `pad`.
template <typename in_t>
__attribute__((always_inline)) inline v16 vload_tail(const in_t* p, int64_t n, float pad) {
  v16 v = splat16(pad);
  for (int64_t i = 0; i < n; ++i) v[i] = to_float(p[i]);
  return v;
}
// Stores the first n < 16 lanes.
template <typename out_t>
__attribute__((always_inline)) inline void vstore_tail(out_t* p, int64_t n, v16 x) {
  alignas(64) out_t tmp[16];
  vstore(tmp, x);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
}
__attribute__((always_inline)) inline v16 vmax(v16 a, v16 b) { return b > a ? b : a; }
__attribute__((always_inline)) inline float hmax(v16 x) {
  float m = x[0];
  for (int i = 1; i < 16; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
// Pairwise sum of 32 lanes: (a + b), then halves of 8, 4, 2, 1 lanes.
__attribute__((always_inline)) inline float hsum(v16 a, v16 b) {
  v16 x = a + b;
  float l[16];
  for (int i = 0; i < 16; ++i) l[i] = x[i];
  for (int w = 8; w > 0; w /= 2) {
    for (int i = 0; i < w; ++i) l[i] += l[i + w];
  }
  return l[0];
}

struct RowArgs {
  int64_t C;
  float inv_temp, temp, gscale;  // gscale: T times the factor the weights and the reduction give the row
};

// The exps of one step: e_s, e_t and the A term e_t * (dt - ds) where e_t > 0.
struct Step {
  v16 es, et, a;
};
__attribute__((always_inline)) inline Step exp_step(v16 s, v16 t, float inv_temp, float m_s, float m_t) {
  const v16 ds = s * inv_temp - m_s, dt = t * inv_temp - m_t;
  const v16 es = vexp16(ds), et = vexp16(dt);
  return {es, et, et > 0.0f ? et * (dt - ds) : v16{}};
}

// Statistics of a row after the first two passes (see RowStats), in float.
struct RowF {
  float m_s, m_t, log_zs, log_zt, inv_zs, inv_zt, kl;
};

__attribute__((always_inline)) inline v16 grad_s_step(v16 es, v16 et, const RowF& st, float gscale) {
  return gscale * (es * st.inv_zs - et * st.inv_zt);
}
__attribute__((always_inline)) inline v16 grad_t_step(v16 s, v16 t, v16 et, const RowF& st, float inv_temp,
                                                      float gscale) {
  const v16 ds = s * inv_temp - st.m_s, dt = t * inv_temp - st.m_t;
  const v16 p_t = et * st.inv_zt;
  const v16 log_ratio = (dt - st.log_zt) - (ds - st.log_zs);
  return p_t > 0.0f ? gscale * p_t * (log_ratio - st.kl) : v16{};
}

// One row: loss = T^2 KL; gs / gt (when not null): the gradients of row_grads (gscale * (p_s - p_t), ...).
// es, et: C floats of scratch each. Returns false (and writes only the loss, 0) when the row has no teacher.
template <typename in_t, typename out_t>
__attribute__((always_inline)) inline bool row_vec(const in_t* s, const in_t* t, const RowArgs& a, float* es,
                                                   float* et, out_t* gs, out_t* gt, float* loss) {
  const int64_t C = a.C, body = C & ~int64_t(15), rem = C - body;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // Pass 1: the maxima (x -> x / T is monotone, so max(x) / T is the max of the scaled row).
  v16 ms = splat16(kNegInf), mt = ms;
  for (int64_t c = 0; c < body; c += 16) {
    ms = vmax(ms, vload(s + c));
    mt = vmax(mt, vload(t + c));
  }
  if (rem > 0) {
    ms = vmax(ms, vload_tail(s + body, rem, kNegInf));
    mt = vmax(mt, vload_tail(t + body, rem, kNegInf));
  }
  RowF st{};
  st.m_s = hmax(ms) * a.inv_temp;
  st.m_t = hmax(mt) * a.inv_temp;
  *loss = 0;
  if (st.m_t == kNegInf) return false;
  // Pass 2: exps and sums, two vectors (32 lanes) per step.
  v16 zs0{}, zs1{}, zt0{}, zt1{}, a0{}, a1{};
  int64_t c = 0;
  for (; c + 32 <= body; c += 32) {
    const Step x = exp_step(vload(s + c), vload(t + c), a.inv_temp, st.m_s, st.m_t);
    const Step y = exp_step(vload(s + c + 16), vload(t + c + 16), a.inv_temp, st.m_s, st.m_t);
    store16(es + c, x.es), store16(et + c, x.et), store16(es + c + 16, y.es), store16(et + c + 16, y.et);
    zs0 += x.es, zt0 += x.et, a0 += x.a;
    zs1 += y.es, zt1 += y.et, a1 += y.a;
  }
  if (c < body) {
    const Step x = exp_step(vload(s + c), vload(t + c), a.inv_temp, st.m_s, st.m_t);
    store16(es + c, x.es), store16(et + c, x.et);
    zs0 += x.es, zt0 += x.et, a0 += x.a;
    c += 16;
  }
  if (rem > 0) {  // padding lanes: -inf logits, exps 0, no A term
    const Step y = exp_step(vload_tail(s + body, rem, kNegInf), vload_tail(t + body, rem, kNegInf), a.inv_temp,
                            st.m_s, st.m_t);
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
    for (c = 0; c < body; c += 16) vstore(gs + c, grad_s_step(load16(es + c), load16(et + c), st, a.gscale));
    if (rem > 0) {
      const v16 e_s = vload_tail(es + body, rem, 0.0f), e_t = vload_tail(et + body, rem, 0.0f);
      vstore_tail(gs + body, rem, grad_s_step(e_s, e_t, st, a.gscale));
    }
  }
  if (gt != nullptr) {
    for (c = 0; c < body; c += 16) {
      vstore(gt + c, grad_t_step(vload(s + c), vload(t + c), load16(et + c), st, a.inv_temp, a.gscale));
    }
    if (rem > 0) {
      const v16 g = grad_t_step(vload_tail(s + body, rem, 0.0f), vload_tail(t + body, rem, 0.0f),
                                vload_tail(et + body, rem, 0.0f), st, a.inv_temp, a.gscale);
      vstore_tail(gt + body, rem, g);
    }
  }
  return true;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
bool row_f32(const float* s, const float* t, const RowArgs& a, float* es, float* et, float* gs, float* gt,
             float* loss) {
  return row_vec(s, t, a, es, et, gs, gt, loss);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
bool row_bf16(const uint16_t* s, const uint16_t* t, const RowArgs& a, float* es, float* et, uint16_t* gs,
              uint16_t* gt, float* loss) {
  return row_vec(s, t, a, es, et, gs, gt, loss);
}

// One float32/bfloat16/float16 row (float16 goes through float32 copies of the row; its gradients are float32).
// buf: 2C floats of scratch (4C for float16).
template <typename scalar_t>
bool row_float(const scalar_t* s, const scalar_t* t, const RowArgs& a, float* buf, distill::grad_type<scalar_t>* gs,
               distill::grad_type<scalar_t>* gt, float* loss) {
  float *es = buf, *et = buf + a.C;
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row_f32(s, t, a, es, et, gs, gt, loss);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return row_bf16(reinterpret_cast<const uint16_t*>(s), reinterpret_cast<const uint16_t*>(t), a, es, et,
                    reinterpret_cast<uint16_t*>(gs), reinterpret_cast<uint16_t*>(gt), loss);
  } else {
    const int64_t C = a.C;
    float *sf = et + C, *tf = sf + C;
    for (int64_t c = 0; c < C; ++c) sf[c] = static_cast<float>(s[c]), tf[c] = static_cast<float>(t[c]);
    return row_f32(sf, tf, a, es, et, gs, gt, loss);
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
