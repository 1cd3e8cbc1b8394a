// Schemas of every amfor op. Kernels register per backend in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu;
// fake (meta) implementations and autograd are registered from Python (amfor/ops/<op>.py).
#include <Python.h>
#include <torch/library.h>

// Importing amfor._C from Python loads this library and runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(amfor, m) {
  // ---- masked_patches: amfor/ops/masked_patches.py ----
  // out[b, k] = x[b, index[b, k]] (+ pos_embed[index[b, k]])                      x: [B, N, D] -> [B, K, D]
  m.def("masked_gather(Tensor x, Tensor index, Tensor? pos_embed) -> Tensor");
  // out[b, n] = y[b, k] where index[b, k] == n, else mask_token; then + pos_embed[n]  y: [B, K, D] -> [B, N, D]
  m.def("masked_scatter(Tensor y, Tensor index, int num_tokens, Tensor mask_token, Tensor? pos_embed) -> Tensor");
  // grad_x[b, n] = sum of grad[b, k] over k with index[b, k] == n, in increasing k (deterministic, no atomics)
  m.def("masked_gather_backward(Tensor grad, Tensor index, int num_tokens) -> Tensor");

  // ---- query_fusion: amfor/ops/query_fusion.py ----
  // out[b,h,q] = sum_l w[b,q,l] softmax_n(scale q[b,h,q] . k_l[b,h',n] | mask) @ v_l[b,h',:], h' = h / (H / Hkv).
  // q: [B, H, Q, d]; k, v: [one tensor [B, Hkv, L, N, d]] or L tensors [B, Hkv, N, d] (same strides, unit stride in
  // d); weights: [B, Q, L] float32 (float64 for float64 q); attn_mask: bool [B, Q or 1, L, N], True = may attend.
  // Returns out [B, H, Q, d] and lse [B, H, Q, L] (weights' dtype; -inf where a layer is fully masked).
  m.def("query_fusion_attention(Tensor q, Tensor[] k, Tensor[] v, Tensor weights, Tensor? attn_mask, float scale) "
        "-> (Tensor, Tensor)");
  // Gradients: dq [B, H, Q, d], dk and dv [B, Hkv, L, N, d], dweights [B, Q, L]; deterministic, no atomics.
  m.def("query_fusion_attention_backward(Tensor grad_out, Tensor q, Tensor[] k, Tensor[] v, Tensor weights, "
        "Tensor? attn_mask, float scale, Tensor lse) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- evaluation: amfor/evaluation/rank.py (CPU only; the GPU path is vectorised PyTorch) ----
  // Per query (rows of dist [Q, G]): AP, 1-based rank of the first true match, INP, and whether it has a
  // true match, under the Market-1501 protocol with stable-sort tie order.
  m.def("rank_metrics(Tensor dist, Tensor q_pids, Tensor g_pids, Tensor q_camids, Tensor g_camids) "
        "-> (Tensor ap, Tensor first, Tensor inp, Tensor valid)");

  // ---- distill_loss: amfor/ops/distill_loss.py ----
  // student, teacher [G, B, C]; rows[g, b] = T^2 * KL(softmax(teacher[g, b] / T) || softmax(student[g, b] / T))
  // (float32, float64 for float64 logits); loss = reduction ("batchmean" | "sum" | "none") of w[g] * rows[g, b];
  // loss_rows = rows when weights is given (for its gradient), else empty. In the same launch, when asked,
  // grad_student / grad_teacher = d sum(loss) / d logits in the logits dtype (empty [0] tensors otherwise):
  // the backward only scales them by grad_output.
  m.def("distill_kl_loss(Tensor student, Tensor teacher, float temperature, Tensor? weights, str reduction, "
        "bool student_grad, bool teacher_grad) -> (Tensor loss, Tensor loss_rows, Tensor grad_student, "
        "Tensor grad_teacher)");
}
