// The extension module fused_mbconv._C: the schemas of the CUDA backend's kernel entry points,
// defined once here; their CUDA implementations register from the per-op host files
// (TORCH_LIBRARY_IMPL). Python glue in fused_mbconv/ops/*/cuda_impl.py allocates outputs (with
// the same layout rules as the public ops' fakes) and calls these.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fused_mbconv._C runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(fused_mbconv_cuda, m) {
  // Depthwise conv + BN + SiLU (csrc/dwconv_bn_silu.cpp). x in fp32/fp16/bf16, any strides;
  // weight (C, 1, k, k) and the per-channel vectors fp32 contiguous; outputs preallocated.
  // y = silu(scale * dwconv(x, weight) + shift); squeeze_sum (N, C) fp32 += spatial sums of y.
  m.def(
      "dwconv_bn_silu_infer(Tensor x, Tensor weight, Tensor scale, Tensor shift, int stride, int[] padding, "
      "Tensor(a!) y, Tensor(b!)? squeeze_sum) -> ()");
  // Training: mean, var (C,) fp32 := batch mean and biased variance of dwconv(x);
  // y = silu(gamma * (dwconv(x) - mean) / sqrt(var + eps) + beta); squeeze_sum as above.
  m.def(
      "dwconv_bn_silu_train(Tensor x, Tensor weight, Tensor gamma, Tensor beta, float eps, int stride, "
      "int[] padding, Tensor(a!) y, Tensor(b!)? squeeze_sum, Tensor(c!) mean, Tensor(d!) var) -> ()");
  // Gradients of either (inference: mean = 0, invstd = 1, gamma = scale, beta = shift,
  // training=False). grad_squeeze (N, C) fp32 or None; grad_x like x; grad_weight, grad_gamma,
  // grad_beta fp32.
  m.def(
      "dwconv_bn_silu_backward(Tensor grad_y, Tensor? grad_squeeze, Tensor x, Tensor weight, Tensor gamma, "
      "Tensor beta, Tensor mean, Tensor invstd, int stride, int[] padding, bool training, Tensor(a!) grad_x, "
      "Tensor(b!) grad_weight, Tensor(c!) grad_gamma, Tensor(d!) grad_beta) -> ()");
}
