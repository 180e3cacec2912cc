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

  // Squeeze-excite (csrc/squeeze_excite.cpp). x (N, C, H, W) in fp32/fp16/bf16, any strides.
  // pooled (N, C) contiguous in x's dtype := mean over (H, W) of x.
  m.def("se_squeeze(Tensor x, Tensor(a!) pooled) -> ()");
  // gate (N, C) := sigmoid(w2 silu(w1 pooled + b1) + b2); pooled (N, C) fp32/fp16/bf16, any
  // strides; w1 (R, C), b1 (R,), w2 (C, R), b2 (C,) contiguous fp32; gate contiguous, pooled's dtype.
  m.def("se_excite(Tensor pooled, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor(a!) gate) -> ()");
  // Its gradients: grad_gate (N, C) in pooled's dtype or fp32, any strides; grad_pooled contiguous
  // in pooled's dtype; the parameter gradients contiguous fp32, shaped like the parameters.
  m.def(
      "se_excite_backward(Tensor grad_gate, Tensor pooled, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "Tensor(a!) grad_pooled, Tensor(b!) grad_w1, Tensor(c!) grad_b1, Tensor(d!) grad_w2, Tensor(e!) grad_b2) -> ()");
  // y := x * gate[:, :, None, None]; gate (N, C) in x's dtype or fp32, any strides; y like x.
  m.def("se_scale(Tensor x, Tensor gate, Tensor(a!) y) -> ()");
  // grad_x := grad_y * gate (grad_y and grad_x like x, any strides); grad_gate (N, C) contiguous
  // in x's dtype or fp32 := sum over (H, W) of grad_y * x.
  m.def(
      "se_scale_backward(Tensor grad_y, Tensor x, Tensor gate, Tensor(a!) grad_x, Tensor(b!) grad_gate) -> ()");
}
