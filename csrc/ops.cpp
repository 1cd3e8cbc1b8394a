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

  // ---- distill_loss: amfor/ops/distill_loss.py ----
}
