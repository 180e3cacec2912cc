// Host-side helpers shared by the per-op host files of fused_mbconv._C: device checks that name the
// argument, the dtype dispatch to the kernels' scalar types, the 16-byte vector test, launch
// checks and fp32 workspaces. Light headers only (no ATen/cuda/CUDAContext.h, no torch/extension.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

namespace fused_mbconv {

// t on x's CUDA device; x_name is how the error names x.
inline void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& x, const char* x_name = "x") {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), name, ": expected a tensor on ", x.device(), " (the device of ", x_name,
              "), got ", t.device());
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<scalar_t>{}) for t's dtype; `name` is t's argument name in the error.
template <typename F>
void dispatch_dtype(const at::Tensor& t, const char* name, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, name, ": expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, kernel, ": kernel launch failed: ", cudaGetErrorString(err));
}

inline at::Tensor float_workspace(const at::Tensor& x, at::IntArrayRef sizes) {
  return at::empty(sizes, x.options().dtype(at::kFloat));
}

inline void copy_strides(const at::Tensor& t, int64_t (&strides)[4]) {
  for (int d = 0; d < 4; ++d) strides[d] = t.stride(d);
}

// Channels are innermost in memory (channels_last): threads then run along channels.
inline bool channels_inner(const at::Tensor& x) { return x.size(1) > 1 && x.stride(1) == 1; }

// 16-byte vectors of channels are possible when every tensor (4-D, x's shape and dtype) has
// channel stride 1, every other stride and C are multiples of the vector width, and every base
// pointer is 16-byte aligned. Returns the vector width in elements, or 1.
inline int vector_width(std::initializer_list<const at::Tensor*> tensors) {
  const at::Tensor& x = **tensors.begin();
  const int64_t vec = 16 / x.element_size();
  if (x.size(1) % vec != 0) return 1;
  for (const at::Tensor* t : tensors) {
    if (t->stride(1) != 1 || reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return 1;
    for (const int d : {0, 2, 3}) {
      if (t->stride(d) % vec != 0) return 1;
    }
  }
  return static_cast<int>(vec);
}

}  // namespace fused_mbconv
