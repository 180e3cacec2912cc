// Device-side interface of the depthwise conv + BN + SiLU kernels: the parameter blocks the host
// fills (sizes, int64 element strides, raw pointers, the tiling) and the launchers it calls. Each
// launcher starts one kernel on `stream` and returns cudaGetLastError() for the host to check.
// scalar_t is float, __half or __nv_bfloat16; kernel size 3 or 5; stride 1 or 2.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "dwconv_math.cuh"

namespace fused_mbconv {

struct DWConvShape {
  int64_t batch, channels;
  int in_h, in_w, out_h, out_w;  // each image plane has < 2^30 pixels (host check)
  int pad_top, pad_left;         // bottom/right padding only shows in out_h/out_w
};

// y = silu((conv(x) - mean) * scale + shift); squeeze_sum (N, C) += spatial sums of y.
// Inference: mean = nullptr (0), BN folded into scale/shift. Training pass 2: batch mean,
// scale = gamma * invstd, shift = beta.
struct DWConvFwdParams {
  DWConvShape shape;
  HaloTiling tiling;
  int vec;  // > 1: x read in 16-byte channel vectors, y written 4 channels at once (channel stride 1)
  int64_t x_stride[4], y_stride[4];  // (N, C, H, W), any layout
  const void* __restrict__ x;
  const float* __restrict__ weight;  // (C, 1, k, k) contiguous
  const float* __restrict__ mean;    // (C,) or nullptr
  const float* __restrict__ scale;   // (C,)
  const float* __restrict__ shift;   // (C,)
  void* __restrict__ y;
  float* __restrict__ squeeze_sum;  // (N, C) contiguous, zeroed by the caller; or nullptr
};

// Training pass 1: batch statistics of conv(x) per channel.
struct DWConvStatsParams {
  DWConvShape shape;
  HaloTiling tiling;
  int vec;  // > 1: x read in 16-byte channel vectors (channel stride 1)
  int64_t x_stride[4];
  const void* __restrict__ x;
  const float* __restrict__ weight;  // (C, 1, k, k) contiguous
  float* __restrict__ partial;       // (3, rows, C): count, mean, M2 per tile row and channel
  const float* __restrict__ gamma;   // (C,)
  float eps;
  float* __restrict__ mean;   // (C,) out
  float* __restrict__ var;    // (C,) out, biased
  float* __restrict__ scale;  // (C,) out: gamma * rsqrt(var + eps), for the apply kernel
};

// Backward, recomputing conv(x). Training: mean/invstd are the batch statistics; inference:
// mean = 0, invstd = 1, gamma = scale, beta = shift.
struct DWConvBwdParams {
  DWConvShape shape;
  HaloTiling halo;    // pass 1
  HaloTiling gather;  // pass 2 (make_gather_tiling)
  int vec;  // > 1: x staged in 16-byte channel vectors, dy read and dx written 4 channels at once
  int64_t x_stride[4], dy_stride[4], dx_stride[4];
  const void* __restrict__ x;
  const float* __restrict__ weight;     // (C, 1, k, k) contiguous
  const void* __restrict__ dy;          // grad_y, dtype of x
  const float* __restrict__ dsqueeze;   // (N, C) contiguous grad of the squeeze, or nullptr
  const float* __restrict__ gamma;      // (C,)
  const float* __restrict__ beta;       // (C,)
  const float* __restrict__ mean;       // (C,)
  const float* __restrict__ invstd;     // (C,)
  const float* __restrict__ sum_dz;     // (C,) S1 = dbeta, from pass 1 (read by pass 2)
  const float* __restrict__ sum_dz_xhat;  // (C,) S2 = dgamma, from pass 1 (read by pass 2)
  bool training;
  float* __restrict__ partial;  // pass 1: (2, rows, C) S1, S2; pass 2: (k*k, rows, C) dweight
  void* __restrict__ dx;
};

template <typename scalar_t>
cudaError_t launch_dwconv_bn_silu_apply(const DWConvFwdParams& p, int kernel_size, int stride, cudaStream_t stream);

template <typename scalar_t>
cudaError_t launch_dwconv_stats(const DWConvStatsParams& p, int kernel_size, int stride, cudaStream_t stream);

// per channel: merge the (3, rows, C) partials into mean, var, scale
cudaError_t launch_welford_combine(const DWConvStatsParams& p, cudaStream_t stream);

// pass 1: (2, rows, C) partial sums of dz and dz * xhat
template <typename scalar_t>
cudaError_t launch_dwconv_bn_silu_bwd_reduce(const DWConvBwdParams& p, int kernel_size, int stride,
                                             cudaStream_t stream);

// pass 2: dx, and (k*k, rows, C) partial sums of dweight
template <typename scalar_t>
cudaError_t launch_dwconv_bn_silu_bwd_input(const DWConvBwdParams& p, int kernel_size, int stride,
                                            cudaStream_t stream);

// out[j * out_plane_stride + c * out_channel_stride] = sum over rows r of partial[j][r][c], for
// partial (planes, rows, channels) contiguous; summed in a fixed order (deterministic).
cudaError_t launch_sum_rows(const float* partial, int64_t planes, int64_t rows, int64_t channels, float* out,
                            int64_t out_plane_stride, int64_t out_channel_stride, cudaStream_t stream);

}  // namespace fused_mbconv
