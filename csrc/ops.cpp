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

  // ---- distill_loss: amfor/ops/distill_loss.py ----
}
