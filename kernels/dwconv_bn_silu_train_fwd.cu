// Training forward, pass 1: batch statistics of conv(x) per channel. The stats kernel computes
// conv(x) and a Welford (count, mean, M2) per tile row and channel; the combine kernel merges the
// rows with Chan's formula in a fixed order into mean, biased var and the apply kernel's scale.
// Pass 2 is the apply kernel (dwconv_bn_silu_infer.cu), which recomputes conv(x).
#include "dwconv_bn_silu.cuh"
#include "dwconv_device.cuh"
#include "static_switch.cuh"

namespace fused_mbconv {
namespace {

// Block: cpb channel lanes x `lanes` pixel lanes (see Tiling); one channel per lane, its k*k
// weights in registers. Writes partial[j][row][c] for j = count, mean, M2.
template <typename scalar_t, int K, int STRIDE>
__global__ void __launch_bounds__(kThreads) dwconv_stats_kernel(const DWConvStatsParams p) {
  __shared__ Welford red[kThreads];
  const Tiling& t = p.tiling;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const LaneCoord lane = lane_of(t, threadIdx.x);
  const int64_t plane = t.rows * p.shape.channels;

  for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {  // block-uniform loop
    const TileCoord tc = decode_tile(t, tile);
    const int64_t c = first_channel(t, tc, lane);
    const bool active = c < p.shape.channels;
    Welford w = {0.f, 0.f, 0.f};
    if (active) {
      float wr[K * K];
#pragma unroll
      for (int i = 0; i < K * K; ++i) wr[i] = p.weight[c * K * K + i];
      const scalar_t* xc = x + tc.n * p.x_stride[0] + c * p.x_stride[1];
      for (int q = tc.begin + lane.pixel; q < tc.end; q += t.lanes) {
        const int oh = q / p.shape.out_w, ow = q - oh * p.shape.out_w;
        float acc[1];
        conv_point<K, STRIDE, 1>(xc, p.x_stride[2], p.x_stride[3], p.shape.in_h, p.shape.in_w, oh, ow,
                                 p.shape.pad_top, p.shape.pad_left, [&](int tap, int) { return wr[tap]; }, acc);
        w.add(acc[0]);
      }
    }
    const Welford s = reduce_lanes(w, red, t.cpb, t.lanes, lane);
    if (active && lane.pixel == 0) {
      float* out = p.partial + tc.row * p.shape.channels + c;
      out[0] = s.count;
      out[plane] = s.mean;
      out[2 * plane] = s.m2;
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
      dwconv_stats_kernel<scalar_t, K, S><<<grid_size(p.tiling.tiles), kThreads, 0, stream>>>(p);
      return cudaGetLastError();
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
