// Device helpers shared by the depthwise conv + BN + SiLU kernels: dtype conversion, 16-byte
// vector access, SiLU and its derivative, the halo tiles (staging a tile's input patch in shared
// memory, the convolution of a strip of outputs from it, the launch), and the deterministic block
// reduction over pixel lanes (and the lane layout of the combine kernels).
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

// Stages a halo tile's input patch in `patch`: fp32, pixel (r, c) at (r * patch_w + c) *
// pixel_stride, zero outside the image and past the last channel. VEC: elements of x per global
// load, 16-byte channel vectors (the host checked channel stride 1, C % VEC == 0 and alignment) or
// 1 (any strides). An item is max(VEC, kLaneChannels) channels of one pixel.
template <int VEC, typename scalar_t>
__device__ __forceinline__ void stage_patch(float* __restrict__ patch, const HaloTiling& t, const HaloTile& tc,
                                            const scalar_t* __restrict__ xn, const int64_t (&xs)[4],
                                            int64_t channels, int in_h, int in_w, int ih0, int iw0) {
  constexpr int CHUNK = VEC > kLaneChannels ? VEC : kLaneChannels;
  const int64_t c_first = tc.group * t.group;
  const int chunks = t.group / CHUNK, pixels = t.patch_h * t.patch_w;
  for (int i = threadIdx.x; i < pixels * chunks; i += t.threads) {
    int pix, chunk;
    if (t.channels_inner) {  // neighbouring threads read neighbouring channels
      pix = i / chunks;
      chunk = i - pix * chunks;
    } else {  // neighbouring threads read neighbouring pixels of a channel
      chunk = i / pixels;
      pix = i - chunk * pixels;
    }
    const int pr = pix / t.patch_w, pc = pix - pr * t.patch_w;
    const int ih = ih0 + pr, iw = iw0 + pc;
    const int64_t c = c_first + chunk * CHUNK;
    float v[CHUNK];
#pragma unroll
    for (int j = 0; j < CHUNK; ++j) v[j] = 0.f;
    if (ih >= 0 && ih < in_h && iw >= 0 && iw < in_w && c < channels) {
      const scalar_t* src = xn + c * xs[1] + ih * xs[2] + iw * xs[3];
      if constexpr (VEC > 1) {
        load_pack<VEC>(src, v);  // C % VEC == 0: the whole vector is in range
      } else {
#pragma unroll
        for (int j = 0; j < CHUNK; ++j) {
          if (c + j < channels) v[j] = to_float(src[j * xs[1]]);
        }
      }
    }
    float4* dst = reinterpret_cast<float4*>(patch + pix * t.pixel_stride + chunk * CHUNK);
#pragma unroll
    for (int j = 0; j < CHUNK / 4; ++j) dst[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
  }
}

// Starts a halo tile (see HaloTiling): waits until every thread is done with the previous tile's
// shared memory, stages the group's weights in w_s as [tap][channel] when the group changed and the
// tile's input patch (stage_patch, through 16-byte vectors when `vectorized`: a block-uniform
// branch, not a template parameter, so no kernel is compiled twice), and waits until both are in
// place.
template <int K, int STRIDE, typename scalar_t>
__device__ __forceinline__ void stage_halo_tile(float* __restrict__ w_s, float* __restrict__ patch,
                                                int64_t& staged_group, const HaloTiling& t, const HaloTile& tc,
                                                const float* __restrict__ weight, const scalar_t* __restrict__ x,
                                                const int64_t (&xs)[4], bool vectorized, int64_t channels, int in_h,
                                                int in_w, int pad_top, int pad_left) {
  __syncthreads();
  if (tc.group != staged_group) {
    const int64_t c_first = tc.group * t.group;
    for (int i = threadIdx.x; i < K * K * t.group; i += t.threads) {
      const int tap = i / t.group;
      const int64_t c = c_first + (i - tap * t.group);
      w_s[i] = c < channels ? weight[c * K * K + tap] : 0.f;
    }
    staged_group = tc.group;
  }
  const int ih0 = tc.oh0 * STRIDE - pad_top, iw0 = tc.ow0 * STRIDE - pad_left;
  const scalar_t* xn = x + tc.n * xs[0];
  if (vectorized) {
    stage_patch<16 / static_cast<int>(sizeof(scalar_t))>(patch, t, tc, xn, xs, channels, in_h, in_w, ih0, iw0);
  } else {
    stage_patch<1>(patch, t, tc, xn, xs, channels, in_h, in_w, ih0, iw0);
  }
  __syncthreads();
}

// Launches a halo kernel, one block of t.threads per tile (looping when there are more tiles than
// kMaxGrid). Past the default 48 KB of dynamic shared memory a kernel must opt in first.
template <typename Params>
cudaError_t launch_halo_kernel(void (*kernel)(Params), const Params& p, const HaloTiling& t, size_t smem,
                               cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<halo_grid_size(t.tiles, t.channel_groups), t.threads, smem, stream>>>(p);
  return cudaGetLastError();
}

// acc[j][v] = conv(x) at the lane's strip output j (tile row lane.row, column lane.col0 + j) for
// its channel v, from the staged patch and weights. A patch row's SPAN pixels are loaded once into
// registers and feed every output of the strip.
template <int K, int STRIDE>
__device__ __forceinline__ void conv_strip(const float* __restrict__ patch, const float* __restrict__ w_s,
                                           const HaloTiling& t, const HaloLane& lane,
                                           float (&acc)[kStrip][kLaneChannels]) {
  constexpr int SPAN = (kStrip - 1) * STRIDE + K;
  const int ch = lane.channel * kLaneChannels;
  const float* first = patch + (lane.row * STRIDE * t.patch_w + lane.col0 * STRIDE) * t.pixel_stride + ch;
#pragma unroll
  for (int j = 0; j < kStrip; ++j) {
#pragma unroll
    for (int v = 0; v < kLaneChannels; ++v) acc[j][v] = 0.f;
  }
#pragma unroll
  for (int kh = 0; kh < K; ++kh) {
    const float* row = first + kh * t.patch_w * t.pixel_stride;
    float4 xr[SPAN];
#pragma unroll
    for (int i = 0; i < SPAN; ++i) xr[i] = *reinterpret_cast<const float4*>(row + i * t.pixel_stride);
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      const float4 w = *reinterpret_cast<const float4*>(w_s + (kh * K + kw) * t.group + ch);
#pragma unroll
      for (int j = 0; j < kStrip; ++j) {
        const float4 xv = xr[j * STRIDE + kw];
        acc[j][0] = fmaf(xv.x, w.x, acc[j][0]);
        acc[j][1] = fmaf(xv.y, w.y, acc[j][1]);
        acc[j][2] = fmaf(xv.z, w.z, acc[j][2]);
        acc[j][3] = fmaf(xv.w, w.w, acc[j][3]);
      }
    }
  }
}

// A lane's kLaneChannels fp32 per-channel constants, 0 past the last channel.
__device__ __forceinline__ void load_lane_channels(const float* __restrict__ src, int64_t c0, int64_t channels,
                                                   float (&out)[kLaneChannels]) {
#pragma unroll
  for (int v = 0; v < kLaneChannels; ++v) out[v] = src != nullptr && c0 + v < channels ? src[c0 + v] : 0.f;
}

// A lane's kLaneChannels channels c0.. at one pixel (`pixel` points at its channel 0): one vector
// access when `vectorized` (channel stride 1, C % 4 == 0 and 4-channel alignment: the host's
// 16-byte test is stricter), else one access per channel below `channels`. Loads give 0 past them.
template <typename scalar_t>
__device__ __forceinline__ void load_lane(const scalar_t* __restrict__ pixel, int64_t c0, int64_t channel_stride,
                                          int64_t channels, bool vectorized, float (&out)[kLaneChannels]) {
  if (vectorized && c0 < channels) {
    load_pack<kLaneChannels>(pixel + c0, out);
    return;
  }
#pragma unroll
  for (int v = 0; v < kLaneChannels; ++v) out[v] = c0 + v < channels ? to_float(pixel[(c0 + v) * channel_stride]) : 0.f;
}

template <typename scalar_t>
__device__ __forceinline__ void store_lane(scalar_t* __restrict__ pixel, int64_t c0, int64_t channel_stride,
                                           int64_t channels, bool vectorized, const float (&in)[kLaneChannels]) {
  if (vectorized) {
    if (c0 < channels) store_pack<kLaneChannels>(pixel + c0, in);
    return;
  }
#pragma unroll
  for (int v = 0; v < kLaneChannels; ++v) {
    if (c0 + v < channels) pixel[(c0 + v) * channel_stride] = from_float<scalar_t>(in[v]);
  }
}

// Running (count, mean, M2) of kLaneChannels channels that see the same number of values, as a
// State for reduce_lanes: one reciprocal per output pixel, not per value.
struct LaneWelford {
  float count, mean[kLaneChannels], m2[kLaneChannels];

  __device__ void add(const float (&v)[kLaneChannels]) {
    count += 1.f;
    const float inv = 1.f / count;
#pragma unroll
    for (int i = 0; i < kLaneChannels; ++i) {
      const float d = v[i] - mean[i];
      mean[i] += d * inv;
      m2[i] += d * (v[i] - mean[i]);
    }
  }

  __device__ static LaneWelford merge(const LaneWelford& a, const LaneWelford& b) {
    LaneWelford s;
#pragma unroll
    for (int i = 0; i < kLaneChannels; ++i) {
      const Welford m = Welford::merge({a.count, a.mean[i], a.m2[i]}, {b.count, b.mean[i], b.m2[i]});
      s.count = m.count;
      s.mean[i] = m.mean;
      s.m2[i] = m.m2;
    }
    return s;
  }
};

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
