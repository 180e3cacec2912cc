// Training forward, pass 1: batch statistics of conv(x) per channel. The stats kernel computes
// conv(x) on halo tiles and a Welford (count, mean, M2) per tile and channel; the combine kernel
// merges the tiles' rows with Chan's formula in a fixed order into mean, biased var and the apply
// kernel's scale.
// Pass 2 is the apply kernel (dwconv_bn_silu_infer.cu), which recomputes conv(x).
#include "dwconv_bn_silu.cuh"
#include "dwconv_device.cuh"
#include "static_switch.cuh"

namespace fused_mbconv {
namespace {

// Block: t.threads threads on one halo tile (see HaloTiling), a strip of kStrip outputs and
// kLaneChannels channels a thread. Writes partial[j][row][c] for j = count, mean, M2.
template <typename scalar_t, int K, int STRIDE>
__global__ void __launch_bounds__(kThreads, 2) dwconv_stats_kernel(const DWConvStatsParams p) {
  extern __shared__ float4 smem_raw[];  // weights, patch; then the reduction's states
  const HaloTiling& t = p.tiling;
  const DWConvShape& s = p.shape;
  float* w_s = reinterpret_cast<float*>(smem_raw);
  float* patch = w_s + K * K * t.group;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const HaloLane lane = halo_lane(t, threadIdx.x);
  const int64_t plane = t.rows * s.channels;

  int64_t staged_group = -1;
  for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {  // block-uniform loop
    const HaloTile tc = decode_halo_tile(t, tile);
    stage_halo_tile<K, STRIDE>(w_s, patch, staged_group, t, tc, p.weight, x, p.x_stride, p.vec > 1, s.channels,
                               s.in_h, s.in_w, s.pad_top, s.pad_left);
    float acc[kStrip][kLaneChannels];
    conv_strip<K, STRIDE>(patch, w_s, t, lane, acc);
    LaneWelford w{};
    const int oh = tc.oh0 + lane.row;
#pragma unroll
    for (int j = 0; j < kStrip; ++j) {
      if (oh < s.out_h && tc.ow0 + lane.col0 + j < s.out_w) w.add(acc[j]);
    }
    w = reduce_lanes(w, reinterpret_cast<LaneWelford*>(patch), t.lanes, t.strips, LaneCoord{lane.channel, lane.strip});
    const int64_t c0 = tc.group * t.group + lane.channel * kLaneChannels;
    if (lane.strip == 0) {
      float* out = p.partial + tc.row * s.channels;
#pragma unroll
      for (int v = 0; v < kLaneChannels; ++v) {
        if (c0 + v < s.channels) {
          out[c0 + v] = w.count;
          out[plane + c0 + v] = w.mean[v];
          out[2 * plane + c0 + v] = w.m2[v];
        }
      }
    }
  }
}

// Block: 32 channels x 8 row lanes; each row lane folds rows lane, lane + 8, ... then the lanes
// merge by a fixed tree: the result does not depend on scheduling.
__global__ void __launch_bounds__(kThreads) welford_combine_kernel(const DWConvStatsParams p) {
  __shared__ Welford red[kThreads];
  const LaneCoord lane = combine_lane();
  const int64_t channels = p.shape.channels, rows = p.tiling.rows, plane = rows * channels;
  for (int64_t first = blockIdx.x * static_cast<int64_t>(kCombineColumns); first < channels;
       first += static_cast<int64_t>(gridDim.x) * kCombineColumns) {  // block-uniform loop
    const int64_t c = first + lane.channel;
    const bool active = c < channels;
    Welford w = {0.f, 0.f, 0.f};
    if (active) {
      for (int64_t r = lane.pixel; r < rows; r += kCombineRowLanes) {
        const float* in = p.partial + r * channels + c;
        w = Welford::merge(w, {in[0], in[plane], in[2 * plane]});
      }
    }
    const Welford s = reduce_lanes(w, red, kCombineColumns, kCombineRowLanes, lane);
    if (active && lane.pixel == 0) {
      const float var = s.m2 / s.count;  // biased, as BatchNorm normalises with
      p.mean[c] = s.mean;
      p.var[c] = var;
      p.scale[c] = p.gamma[c] * rsqrtf(var + p.eps);
    }
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_dwconv_stats(const DWConvStatsParams& p, int kernel_size, int stride, cudaStream_t stream) {
  return KERNEL_SIZE_SWITCH(kernel_size, K, [&] {
    return STRIDE_SWITCH(stride, S, [&] {
      return launch_halo_kernel(dwconv_stats_kernel<scalar_t, K, S>, p, p.tiling,
                                halo_smem_bytes(p.tiling, K, sizeof(LaneWelford)), stream);
    });
  });
}

cudaError_t launch_welford_combine(const DWConvStatsParams& p, cudaStream_t stream) {
  welford_combine_kernel<<<grid_size(ceil_div(p.shape.channels, kCombineColumns)), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t launch_dwconv_stats<float>(const DWConvStatsParams&, int, int, cudaStream_t);
template cudaError_t launch_dwconv_stats<__half>(const DWConvStatsParams&, int, int, cudaStream_t);
template cudaError_t launch_dwconv_stats<__nv_bfloat16>(const DWConvStatsParams&, int, int, cudaStream_t);

}  // namespace fused_mbconv
