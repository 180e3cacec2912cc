// Device helpers shared by the depthwise conv + BN + SiLU kernels: dtype conversion, 16-byte
// vector access, SiLU and its derivative, the convolution at one output pixel, and the
// deterministic block reduction over pixel lanes (and the lane layout of the combine kernels).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dwconv_math.cuh"

namespace fused_mbconv {

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

// VEC consecutive elements moved as one access: 16 bytes (LDG.128 / STG.128) when VEC * sizeof(T)
// is 16. The host vectorises only when every such address is 16-byte aligned.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ void load_pack(const T* __restrict__ src, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(src);
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = to_float(pack.v[v]);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_pack(T* __restrict__ dst, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int v = 0; v < VEC; ++v) pack.v[v] = from_float<T>(in[v]);
  *reinterpret_cast<Pack<T, VEC>*>(dst) = pack;
}

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + __expf(-z)); }

__device__ __forceinline__ float silu(float z) { return z * sigmoid(z); }

// silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
__device__ __forceinline__ float silu_grad(float z) {
  const float s = sigmoid(z);
  return s * (1.f + z * (1.f - s));
}

// acc[v] = sum over taps of x[ih, iw, channel v] * weight(tap, v) for output pixel (oh, ow), zero
// padding outside the image. xc points at (n, first channel, 0, 0); for VEC > 1 the channels are
// contiguous (channel stride 1). weight(tap, v) returns the fp32 weight of tap kh * K + kw.
template <int K, int STRIDE, int VEC, typename scalar_t, typename WeightAt>
__device__ __forceinline__ void conv_point(const scalar_t* __restrict__ xc, int64_t stride_h, int64_t stride_w,
                                           int in_h, int in_w, int oh, int ow, int pad_top, int pad_left,
                                           WeightAt&& weight, float (&acc)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
  const int ih0 = oh * STRIDE - pad_top, iw0 = ow * STRIDE - pad_left;
#pragma unroll
  for (int kh = 0; kh < K; ++kh) {
    const int ih = ih0 + kh;
    if (ih < 0 || ih >= in_h) continue;
    const scalar_t* row = xc + ih * stride_h;
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      const int iw = iw0 + kw;
      if (iw < 0 || iw >= in_w) continue;
      float xv[VEC];
      load_pack<VEC>(row + iw * stride_w, xv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = fmaf(xv[v], weight(kh * K + kw, v), acc[v]);
    }
  }
}

// The combine kernels fold the partial rows of 32 columns per block (a warp reads 32 consecutive
// floats of a row), with 8 row lanes per column merged by reduce_lanes.
constexpr int kCombineColumns = 32;
constexpr int kCombineRowLanes = kThreads / kCombineColumns;

__device__ __forceinline__ LaneCoord combine_lane() {
  return {static_cast<int>(threadIdx.x) % kCombineColumns, static_cast<int>(threadIdx.x) / kCombineColumns};
}

// NV running sums, as a State for reduce_lanes (a plain aggregate so it can live in __shared__).
template <int NV>
struct Sum {
  float v[NV];

  __device__ static Sum merge(const Sum& a, const Sum& b) {
    Sum s;
#pragma unroll
    for (int i = 0; i < NV; ++i) s.v[i] = a.v[i] + b.v[i];
    return s;
  }
};

template <int NV>
__device__ __forceinline__ Sum<NV> zero_sum() {
  Sum<NV> s;
#pragma unroll
  for (int i = 0; i < NV; ++i) s.v[i] = 0.f;
  return s;
}

// Merges the states of the `lanes` pixel lanes of each channel lane with a fixed binary tree
// (deterministic, unlike atomics) and returns the result to every thread of that channel lane.
// smem holds kThreads states. Every thread of the block must call it (it synchronises).
template <typename State>
__device__ __forceinline__ State reduce_lanes(const State& value, State* smem, int cpb, int lanes, LaneCoord lane) {
  __syncthreads();  // the previous call's readers are done with smem
  smem[lane.pixel * cpb + lane.channel] = value;
  for (int s = lanes / 2; s > 0; s /= 2) {
    __syncthreads();
    if (lane.pixel < s) {
      State& mine = smem[lane.pixel * cpb + lane.channel];
      mine = State::merge(mine, smem[(lane.pixel + s) * cpb + lane.channel]);
    }
  }
  __syncthreads();
  return smem[lane.channel];
}

}  // namespace fused_mbconv
