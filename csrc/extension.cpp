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
  // y = silu(scale * dwconv(x, weight) + shift); squeeze_sum (N, C) fp32 += spatial sums of y.
  m.def(
      "dwconv_bn_silu_infer(Tensor x, Tensor weight, Tensor scale, Tensor shift, int stride, int[] padding, "
      "Tensor(a!) y, Tensor(b!)? squeeze_sum) -> ()");
}
