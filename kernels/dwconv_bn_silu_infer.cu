// The apply kernel of the fused depthwise conv + BatchNorm + SiLU: one pass reading x once and
// writing y once, y = silu((conv(x) - mean) * scale + shift), with the SE squeeze (spatial sums
// of y) on the side. It is the whole inference forward and the second pass of the training one.
#include "dwconv_bn_silu.cuh"
#include "dwconv_device.cuh"
#include "static_switch.cuh"

namespace fused_mbconv {
namespace {

// Block: kThreads threads = cpb channel lanes x `lanes` pixel lanes; a channel lane covers VEC
// channels (VEC > 1: one 16-byte load of x and store of y per pixel, channels_last memory).
// Dynamic shared memory: the channel group's weights as [tap][group channel] (a thread's VEC
// weights of one tap are adjacent), then kThreads Sum<VEC> for the squeeze reduction.
template <typename scalar_t, int K, int STRIDE, int VEC>
__global__ void __launch_bounds__(kThreads) dwconv_bn_silu_apply_kernel(const DWConvFwdParams p) {
  extern __shared__ float4 smem_raw[];  // float4: 16-byte aligned
  const Tiling& t = p.tiling;
  const int group_channels = t.cpb * VEC;
  float* w_s = reinterpret_cast<float*>(smem_raw);
  Sum<VEC>* red = reinterpret_cast<Sum<VEC>*>(w_s + K * K * group_channels);
  const auto* x = static_cast<const scalar_t*>(p.x);
  auto* y = static_cast<scalar_t*>(p.y);
  const LaneCoord lane = lane_of(t, threadIdx.x);

  int64_t staged_group = -1;
  for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {  // block-uniform loop
    const TileCoord tc = decode_tile(t, tile);
    if (tc.group != staged_group) {
      __syncthreads();  // every thread is done with the previous group's weights
      const int64_t group_first = tc.group * group_channels;
      for (int i = threadIdx.x; i < K * K * group_channels; i += kThreads) {
        const int tap = i / group_channels;
        const int64_t c = group_first + (i - tap * group_channels);
        w_s[i] = c < p.shape.channels ? p.weight[c * K * K + tap] : 0.f;
      }
      __syncthreads();
      staged_group = tc.group;
    }
    const int64_t c0 = first_channel(t, tc, lane);
    // host: with VEC > 1, channels % VEC == 0, so a lane is wholly in range or wholly idle
    const bool active = c0 < p.shape.channels;
    float sq[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) sq[v] = 0.f;
    if (active) {
      float mean[VEC], scale[VEC], shift[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        mean[v] = p.mean != nullptr ? p.mean[c0 + v] : 0.f;
        scale[v] = p.scale[c0 + v];
        shift[v] = p.shift[c0 + v];
      }
      const scalar_t* xc = x + tc.n * p.x_stride[0] + c0 * p.x_stride[1];
      scalar_t* yc = y + tc.n * p.y_stride[0] + c0 * p.y_stride[1];
      const float* w_lane = w_s + lane.channel * VEC;
      const auto weight = [&](int tap, int v) { return w_lane[tap * group_channels + v]; };
      for (int q = tc.begin + lane.pixel; q < tc.end; q += t.lanes) {
        const int oh = q / p.shape.out_w, ow = q - oh * p.shape.out_w;
        float acc[VEC];
        conv_point<K, STRIDE, VEC>(xc, p.x_stride[2], p.x_stride[3], p.shape.in_h, p.shape.in_w, oh, ow,
                                   p.shape.pad_top, p.shape.pad_left, weight, acc);
        float out[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          // (c - mean) first: in training the mean may be large against the spread
          out[v] = silu((acc[v] - mean[v]) * scale[v] + shift[v]);
          sq[v] += out[v];  // the squeeze is the mean of the fp32 y, as in the reference
        }
        store_pack<VEC>(yc + oh * p.y_stride[2] + ow * p.y_stride[3], out);
      }
    }
    if (p.squeeze_sum != nullptr) {  // block-uniform
      Sum<VEC> s;
#pragma unroll
      for (int v = 0; v < VEC; ++v) s.v[v] = sq[v];
      s = reduce_lanes(s, red, t.cpb, t.lanes, lane);
      // one atomic per channel and tile (tiles never span two images)
      if (active && lane.pixel == 0) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) atomicAdd(p.squeeze_sum + tc.n * p.shape.channels + c0 + v, s.v[v]);
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_dwconv_bn_silu_apply(const DWConvFwdParams& p, int kernel_size, int stride, cudaStream_t stream) {
  return KERNEL_SIZE_SWITCH(kernel_size, K, [&] {
    return STRIDE_SWITCH(stride, S, [&] {
      return BOOL_SWITCH(p.tiling.vec > 1, kVectorized, [&] {
        constexpr int VEC = kVectorized ? 16 / static_cast<int>(sizeof(scalar_t)) : 1;
        const size_t smem = (static_cast<size_t>(K * K * p.tiling.cpb) + kThreads) * VEC * sizeof(float);
        dwconv_bn_silu_apply_kernel<scalar_t, K, S, VEC>
            <<<grid_size(p.tiling.tiles), kThreads, smem, stream>>>(p);
        return cudaGetLastError();
      });
    });
  });
}

template cudaError_t launch_dwconv_bn_silu_apply<float>(const DWConvFwdParams&, int, int, cudaStream_t);
template cudaError_t launch_dwconv_bn_silu_apply<__half>(const DWConvFwdParams&, int, int, cudaStream_t);
template cudaError_t launch_dwconv_bn_silu_apply<__nv_bfloat16>(const DWConvFwdParams&, int, int, cudaStream_t);

}  // namespace fused_mbconv
