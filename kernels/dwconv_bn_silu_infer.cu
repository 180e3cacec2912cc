// Inference kernel of the fused depthwise conv + folded BatchNorm + SiLU: one pass, reading x
// once and writing y once, with the SE squeeze (spatial sum of y) accumulated on the side.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dwconv_bn_silu.cuh"

namespace fused_mbconv {
namespace {

// torch builds with __CUDA_NO_HALF_CONVERSIONS__: convert with the explicit intrinsics
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One thread per output element, int64 indices throughout (tensors may exceed 2^31 elements).
template <typename scalar_t, int K, int STRIDE>
__global__ void dwconv_bn_silu_infer_kernel(const DWConvParams p) {
  const int64_t total = p.batch * p.channels * p.out_h * p.out_w;
  const auto* x = static_cast<const scalar_t*>(p.x);
  auto* y = static_cast<scalar_t*>(p.y);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, oh, ow, rest = i;
    if (p.channels_last) {
      c = rest % p.channels; rest /= p.channels;
      ow = rest % p.out_w; rest /= p.out_w;
      oh = rest % p.out_h; n = rest / p.out_h;
    } else {
      ow = rest % p.out_w; rest /= p.out_w;
      oh = rest % p.out_h; rest /= p.out_h;
      c = rest % p.channels; n = rest / p.channels;
    }
    const scalar_t* xc = x + n * p.x_stride[0] + c * p.x_stride[1];
    const float* wc = p.weight + c * K * K;
    const int64_t ih0 = oh * STRIDE - p.pad_top, iw0 = ow * STRIDE - p.pad_left;
    float acc = 0.f;
#pragma unroll
    for (int kh = 0; kh < K; ++kh) {
      const int64_t ih = ih0 + kh;
      if (ih < 0 || ih >= p.in_h) continue;  // zero padding
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
        const int64_t iw = iw0 + kw;
        if (iw < 0 || iw >= p.in_w) continue;
        acc += to_float(xc[ih * p.x_stride[2] + iw * p.x_stride[3]]) * wc[kh * K + kw];
      }
    }
    const float z = acc * p.scale[c] + p.shift[c];
    const float out = z / (1.f + __expf(-z));  // SiLU
    y[n * p.y_stride[0] + c * p.y_stride[1] + oh * p.y_stride[2] + ow * p.y_stride[3]] = from_float<scalar_t>(out);
    if (p.squeeze_sum != nullptr) atomicAdd(p.squeeze_sum + n * p.channels + c, out);
  }
}

template <typename scalar_t, int K, int STRIDE>
cudaError_t launch(const DWConvParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = p.batch * p.channels * p.out_h * p.out_w;
  // grid-stride loop: cap the grid, every element is still visited
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 32 ? blocks : 65535 * 32);
  dwconv_bn_silu_infer_kernel<scalar_t, K, STRIDE><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_dwconv_bn_silu_infer(const DWConvParams& p, int kernel_size, int stride, cudaStream_t stream) {
  if (kernel_size == 3) return stride == 1 ? launch<scalar_t, 3, 1>(p, stream) : launch<scalar_t, 3, 2>(p, stream);
  return stride == 1 ? launch<scalar_t, 5, 1>(p, stream) : launch<scalar_t, 5, 2>(p, stream);
}

template cudaError_t launch_dwconv_bn_silu_infer<float>(const DWConvParams&, int, int, cudaStream_t);
template cudaError_t launch_dwconv_bn_silu_infer<__half>(const DWConvParams&, int, int, cudaStream_t);
template cudaError_t launch_dwconv_bn_silu_infer<__nv_bfloat16>(const DWConvParams&, int, int, cudaStream_t);

}  // namespace fused_mbconv
