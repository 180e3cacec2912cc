// Device-side interface of the depthwise conv + BN + SiLU kernels: the parameter block the host
// fills (sizes, int64 strides, raw pointers) and the launchers the host calls.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fused_mbconv {

struct DWConvParams {
  int64_t batch, channels, in_h, in_w, out_h, out_w;
  int pad_top, pad_left;
  // element strides (N, C, H, W) of x and y: any layout, channels_last the fast one
  int64_t x_stride[4];
  int64_t y_stride[4];
  bool channels_last;  // enumerate outputs channel-fastest so neighbouring threads coalesce
  const void* __restrict__ x;
  const float* __restrict__ weight;  // (C, 1, k, k) contiguous fp32
  const float* __restrict__ scale;  // (C,) folded BatchNorm
  const float* __restrict__ shift;  // (C,)
  void* __restrict__ y;
  float* __restrict__ squeeze_sum;  // (N, C) fp32 sums of y, or nullptr
};

// scalar_t: float, __half or __nv_bfloat16; kernel size 3 or 5; stride 1 or 2.
template <typename scalar_t>
cudaError_t launch_dwconv_bn_silu_infer(const DWConvParams& p, int kernel_size, int stride, cudaStream_t stream);

}  // namespace fused_mbconv
