// Device-side interface of the squeeze-excite kernels: the parameter blocks the host fills (sizes,
// int64 element strides, raw pointers, the tiling) and the launchers it calls. Each launcher
// starts one kernel on `stream` and returns cudaGetLastError() for the host to check.
// scalar_t is float, __half or __nv_bfloat16; all math is fp32.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "dwconv_math.cuh"

namespace fused_mbconv {

// An (N, C) input with one value per image and channel (the gate, its upstream gradient), any
// strides, in the activations' dtype or in fp32 (is_float): a uniform branch per load beats an
// extra conversion kernel or twice the instantiations.
struct PerImageIn {
  const void* data;
  int64_t stride[2];
  bool is_float;
};

// An (N, C) contiguous output (the squeeze, the gate's gradient) in scalar_t or fp32.
struct PerImageOut {
  void* data;
  bool is_float;
};

// The kernels over the activations x (N, C, H, W): squeeze, scale and the scale's backward. They
// share the depthwise kernels' Tiling (channel group, image, chunk of H*W). Strides are (N, C, H,
// W) in elements; with flat planes the host has put the stride of the flat pixel index hw in
// stride[3] and the kernels never divide by the width.
struct SEPlaneParams {
  int64_t batch, channels;
  int width;  // W: pixel q is (q / W, q % W) unless flat; H * W < 2^30 (host check)
  Tiling tiling;
  int64_t x_stride[4], y_stride[4], dy_stride[4];
  const void* __restrict__ x;   // squeeze, scale: the input; backward: the scale's input x
  void* __restrict__ y;         // scale: the output; backward: grad_x
  const void* __restrict__ dy;  // backward: grad_y
  PerImageIn gate;              // scale and backward
  // squeeze: the pooled means; backward: grad_gate. Written by the tile kernel when the tiling
  // has one chunk per image, else by launch_se_sum_chunks from `partial`.
  PerImageOut out;
  float* __restrict__ partial;  // (rows, C) fp32 per-chunk sums when tiling.chunks > 1
  float out_scale;              // 1 / (H * W) for the squeeze, 1 for grad_gate
};

// pooled (N, C) = mean over H*W of x; or per-chunk sums into partial
template <typename scalar_t>
cudaError_t launch_se_squeeze(const SEPlaneParams& p, bool flat, cudaStream_t stream);

// y = x * gate[n, c]
template <typename scalar_t>
cudaError_t launch_se_scale(const SEPlaneParams& p, bool flat, cudaStream_t stream);

// grad_x = grad_y * gate[n, c]; grad_gate = sum over H*W of grad_y * x (or per-chunk sums)
template <typename scalar_t>
cudaError_t launch_se_scale_backward(const SEPlaneParams& p, bool flat, cudaStream_t stream);

// out[n, c] = out_scale * sum over the chunks k of partial[n * chunks + k][c], k in order
template <typename scalar_t>
cudaError_t launch_se_sum_chunks(const SEPlaneParams& p, cudaStream_t stream);

// Samples per block of the excite kernels: each weight load serves this many samples.
constexpr int kExciteSamples = 4;

// The excite forward splits the C gate columns into blocks of kThreads, each with its own act
// workspace rows: act is (excite_column_blocks(C), N, R) there.
DWCONV_HD int64_t excite_column_blocks(int64_t channels) { return (channels + kThreads - 1) / kThreads; }

// The excite: h = pooled @ w1^T + b1 (N, R), a = silu(h), gate = sigmoid(a @ w2^T + b2) (N, C).
// Weights fp32 contiguous as matrices; fp32 workspaces (N, R) / (N, C) in global memory, written
// and read back by the same block (no size limit from shared memory).
struct SEExciteParams {
  int64_t batch, channels, reduced;  // N, C, R
  int c_lanes;  // FC1 (and dw1): lanes reducing over C, a power of two <= 32
  int r_lanes;  // backward, da = dlogits @ w2: lanes over R, fastest in the block, a power of two <= 32
  int64_t pooled_stride[2];
  const void* __restrict__ pooled;  // (N, C) scalar_t
  const float* __restrict__ w1;     // (R, C)
  const float* __restrict__ b1;     // (R,)
  const float* __restrict__ w2;     // (C, R)
  const float* __restrict__ b2;     // (C,)
  // workspaces, each written and read by one kernel (so not __restrict__: no read-only cache)
  float* act;      // (N, R) silu(h); forward: (excite_column_blocks(C), N, R)
  float* hidden;   // backward: (N, R) h
  float* dhidden;  // backward: (N, R) dL/dh
  float* dlogits;  // backward: (N, C) dL/d(a @ w2^T + b2)
  void* __restrict__ gate;         // forward: (N, C) contiguous scalar_t
  PerImageIn grad_gate;            // backward: (N, C), scalar_t or fp32
  void* __restrict__ grad_pooled;  // backward: (N, C) contiguous scalar_t
  float* __restrict__ grad_w1;     // (R, C)
  float* __restrict__ grad_b1;     // (R,)
  float* __restrict__ grad_w2;     // (C, R)
  float* __restrict__ grad_b2;     // (C,)
};

template <typename scalar_t>
cudaError_t launch_se_excite(const SEExciteParams& p, cudaStream_t stream);

// backward, per sample: hidden, act, dlogits, dhidden and grad_pooled
template <typename scalar_t>
cudaError_t launch_se_excite_backward_samples(const SEExciteParams& p, cudaStream_t stream);

// backward, the batch sums grad_w1, grad_b1, grad_w2, grad_b2 over the samples in order
template <typename scalar_t>
cudaError_t launch_se_excite_backward_weights(const SEExciteParams& p, cudaStream_t stream);

}  // namespace fused_mbconv
