// The apply kernel of the fused depthwise conv + BatchNorm + SiLU: one pass reading x once and
// writing y once, y = silu((conv(x) - mean) * scale + shift), with the SE squeeze (spatial sums
// of y) on the side. It is the whole inference forward and the second pass of the training one.
#include "dwconv_bn_silu.cuh"
#include "dwconv_device.cuh"
#include "static_switch.cuh"

namespace fused_mbconv {
namespace {

// Block: t.threads threads on one halo tile (see HaloTiling); a thread computes its strip of
// kStrip outputs for kLaneChannels channels. p.vec > 1: x staged through 16-byte channel vectors
// and y stored kLaneChannels channels at once (channels_last memory). Dynamic shared memory:
// weights, patch (see halo_smem_bytes), the patch's space reused by the squeeze reduction.
template <typename scalar_t, int K, int STRIDE>
__global__ void __launch_bounds__(kThreads, 2) dwconv_bn_silu_apply_kernel(const DWConvFwdParams p) {
  extern __shared__ float4 smem_raw[];  // float4: 16-byte aligned
  const HaloTiling& t = p.tiling;
  const DWConvShape& s = p.shape;
  float* w_s = reinterpret_cast<float*>(smem_raw);
  float* patch = w_s + K * K * t.group;
  const auto* x = static_cast<const scalar_t*>(p.x);
  auto* y = static_cast<scalar_t*>(p.y);
  const HaloLane lane = halo_lane(t, threadIdx.x);

  int64_t staged_group = -1;
  for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {  // block-uniform loop
    const HaloTile tc = decode_halo_tile(t, tile);
    stage_halo_tile<K, STRIDE>(w_s, patch, staged_group, t, tc, p.weight, x, p.x_stride, p.vec > 1, s.channels,
                               s.in_h, s.in_w, s.pad_top, s.pad_left);
    const int64_t c0 = tc.group * t.group + lane.channel * kLaneChannels;
    float mean[kLaneChannels], scale[kLaneChannels], shift[kLaneChannels];
    load_lane_channels(p.mean, c0, s.channels, mean);  // inference: no mean, 0
    load_lane_channels(p.scale, c0, s.channels, scale);
    load_lane_channels(p.shift, c0, s.channels, shift);
    float acc[kStrip][kLaneChannels];
    conv_strip<K, STRIDE>(patch, w_s, t, lane, acc);

    Sum<kLaneChannels> sq = zero_sum<kLaneChannels>();
    const int oh = tc.oh0 + lane.row;
    if (oh < s.out_h) {
      scalar_t* yc = y + tc.n * p.y_stride[0] + oh * p.y_stride[2];
#pragma unroll
      for (int j = 0; j < kStrip; ++j) {
        const int ow = tc.ow0 + lane.col0 + j;
        if (ow >= s.out_w) break;
        float out[kLaneChannels];
#pragma unroll
        for (int v = 0; v < kLaneChannels; ++v) {
          // (c - mean) first: in training the mean may be large against the spread. Past the last
          // channel everything is 0, and so is silu(0): the squeeze sums stay exact.
          out[v] = silu((acc[j][v] - mean[v]) * scale[v] + shift[v]);
          sq.v[v] += out[v];  // the squeeze is the mean of the fp32 y, as in the reference
        }
        store_lane(yc + ow * p.y_stride[3], c0, p.y_stride[1], s.channels, p.vec > 1, out);
      }
    }
    if (p.squeeze_sum != nullptr) {  // block-uniform
      sq = reduce_lanes(sq, reinterpret_cast<Sum<kLaneChannels>*>(patch), t.lanes, t.strips,
                        LaneCoord{lane.channel, lane.strip});
      // one atomic per channel and tile (tiles never span two images)
      if (lane.strip == 0) {
#pragma unroll
        for (int v = 0; v < kLaneChannels; ++v) {
          if (c0 + v < s.channels) atomicAdd(p.squeeze_sum + tc.n * s.channels + c0 + v, sq.v[v]);
        }
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_dwconv_bn_silu_apply(const DWConvFwdParams& p, int kernel_size, int stride, cudaStream_t stream) {
  return KERNEL_SIZE_SWITCH(kernel_size, K, [&] {
    return STRIDE_SWITCH(stride, S, [&] {
      return launch_halo_kernel(dwconv_bn_silu_apply_kernel<scalar_t, K, S>, p, p.tiling,
                                halo_smem_bytes(p.tiling, K, sizeof(Sum<kLaneChannels>)), stream);
    });
  });
}

template cudaError_t launch_dwconv_bn_silu_apply<float>(const DWConvFwdParams&, int, int, cudaStream_t);
template cudaError_t launch_dwconv_bn_silu_apply<__half>(const DWConvFwdParams&, int, int, cudaStream_t);
template cudaError_t launch_dwconv_bn_silu_apply<__nv_bfloat16>(const DWConvFwdParams&, int, int, cudaStream_t);

}  // namespace fused_mbconv
