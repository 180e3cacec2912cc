// Backward of the fused depthwise conv + BN + SiLU, in two passes that recompute conv(x) (the
// conv output and the pre-activation are never stored), plus a deterministic combine of the
// per-tile partial sums.
//
// With c = conv(x), xhat = (c - mean) * invstd, z = gamma * xhat + beta, y = silu(z), and the
// squeeze s = mean over (Ho, Wo) of y:
//   dz     = (dy + ds / (Ho * Wo)) * silu'(z)
//   dbeta  = S1 = sum over (n, oh, ow) of dz,   dgamma = S2 = sum of dz * xhat
//   dc     = gamma * invstd * (dz - (S1 + xhat * S2) / M)   (training, M = N * Ho * Wo: the batch
//            statistics depend on c)
//   dc     = gamma * invstd * dz                              (inference: mean, invstd constant)
//   dx[ih, iw]      = sum over (kh, kw, oh, ow) with oh * stride + kh = ih + pad_top (same for w)
//                     of dc[oh, ow] * weight[kh, kw]
//   dweight[kh, kw] = sum over (n, oh, ow) of dc[oh, ow] * x[oh * stride + kh - pad_top, ...]
// Pass 1 (over output pixels, on halo tiles) sums S1, S2. Pass 2 (over input pixels, on gather
// tiles) computes dc once at each output that reads the tile's inputs, in shared memory, then
// gathers dx and, from the same (output, tap) pairs, the dweight sums.
#include "dwconv_bn_silu.cuh"
#include "dwconv_device.cuh"
#include "static_switch.cuh"

namespace fused_mbconv {
namespace {

// The per-channel constants of one thread's (n, c).
struct ChannelGrad {
  float mean, invstd, gamma, beta;
  float dsq;  // ds[n, c] / (Ho * Wo): each y element's share of the squeeze's gradient
};

__device__ __forceinline__ ChannelGrad load_channel_grad(const DWConvBwdParams& p, int64_t n, int64_t c) {
  const float hw = static_cast<float>(p.shape.out_h) * static_cast<float>(p.shape.out_w);
  return {p.mean[c], p.invstd[c], p.gamma[c], p.beta[c],
          p.dsqueeze != nullptr ? p.dsqueeze[n * p.shape.channels + c] / hw : 0.f};
}

// load_channel_grad for each channel of a lane (zeros past the last channel).
__device__ __forceinline__ void load_lane_grads(const DWConvBwdParams& p, int64_t n, int64_t c0,
                                                ChannelGrad (&g)[kLaneChannels]) {
#pragma unroll
  for (int v = 0; v < kLaneChannels; ++v) {
    g[v] = c0 + v < p.shape.channels ? load_channel_grad(p, n, c0 + v) : ChannelGrad{};
  }
}

struct PointGrad {
  float dz, xhat;
};

// dz and xhat at an output pixel from c = conv(x) and the upstream gradient dy there.
__device__ __forceinline__ PointGrad grad_at(const ChannelGrad& g, float c, float dy) {
  const float xhat = (c - g.mean) * g.invstd;
  const float z = xhat * g.gamma + g.beta;
  return {(dy + g.dsq) * silu_grad(z), xhat};
}

// Pass 1. Block: t.threads threads on one halo tile (see HaloTiling), a strip of kStrip outputs
// and kLaneChannels channels a thread. Writes partial[j][row][c] for j = S1, S2.
template <typename scalar_t, int K, int STRIDE>
__global__ void __launch_bounds__(kThreads, 2) dwconv_bn_silu_bwd_reduce_kernel(const DWConvBwdParams p) {
  extern __shared__ float4 smem_raw[];  // weights, patch; then the reduction's states
  const HaloTiling& t = p.halo;
  const DWConvShape& s = p.shape;
  float* w_s = reinterpret_cast<float*>(smem_raw);
  float* patch = w_s + K * K * t.group;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* dy = static_cast<const scalar_t*>(p.dy);
  const HaloLane lane = halo_lane(t, threadIdx.x);
  const int64_t plane = t.rows * s.channels;

  int64_t staged_group = -1;
  for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {  // block-uniform loop
    const HaloTile tc = decode_halo_tile(t, tile);
    stage_halo_tile<K, STRIDE>(w_s, patch, staged_group, t, tc, p.weight, x, p.x_stride, p.vec > 1, s.channels,
                               s.in_h, s.in_w, s.pad_top, s.pad_left);
    const int64_t c0 = tc.group * t.group + lane.channel * kLaneChannels;
    ChannelGrad g[kLaneChannels];
    load_lane_grads(p, tc.n, c0, g);
    float acc[kStrip][kLaneChannels];
    conv_strip<K, STRIDE>(patch, w_s, t, lane, acc);

    Sum<2 * kLaneChannels> sums = zero_sum<2 * kLaneChannels>();  // S1 of each channel, then S2
    const int oh = tc.oh0 + lane.row;
    if (oh < s.out_h) {
      const scalar_t* dyr = dy + tc.n * p.dy_stride[0] + oh * p.dy_stride[2];
#pragma unroll
      for (int j = 0; j < kStrip; ++j) {
        const int ow = tc.ow0 + lane.col0 + j;
        if (ow >= s.out_w) break;
        float dyv[kLaneChannels];
        load_lane(dyr + ow * p.dy_stride[3], c0, p.dy_stride[1], s.channels, p.vec > 1, dyv);
#pragma unroll
        for (int v = 0; v < kLaneChannels; ++v) {
          if (c0 + v >= s.channels) break;
          const PointGrad pg = grad_at(g[v], acc[j][v], dyv[v]);
          sums.v[v] += pg.dz;
          sums.v[kLaneChannels + v] += pg.dz * pg.xhat;
        }
      }
    }
    sums = reduce_lanes(sums, reinterpret_cast<Sum<2 * kLaneChannels>*>(patch), t.lanes, t.strips,
                        LaneCoord{lane.channel, lane.strip});
    if (lane.strip == 0) {
      float* out = p.partial + tc.row * s.channels;
#pragma unroll
      for (int v = 0; v < kLaneChannels; ++v) {
        if (c0 + v < s.channels) {
          out[c0 + v] = sums.v[v];
          out[plane + c0 + v] = sums.v[kLaneChannels + v];
        }
      }
    }
  }
}

// Pass 2. Block: kThreads threads on one gather tile (see make_gather_tiling). Phase 1: dc at each
// output of the halo tile (0 outside the output plane), a strip of kStrip outputs and kLaneChannels
// channels a work item, into dc_s. Phase 2: dx at each input pixel of the tile, gathered from dc_s.
// Phase 3: per (channel lane, tap), the dweight products of the tile's inputs. Writes dx and
// partial[tap][row][c].
template <typename scalar_t, int K, int STRIDE>
__global__ void __launch_bounds__(kThreads, 2) dwconv_bn_silu_bwd_input_kernel(const DWConvBwdParams p) {
  extern __shared__ float4 smem_raw[];  // weights, patch, dc tile
  const HaloTiling& t = p.gather;
  const DWConvShape& s = p.shape;
  float* w_s = reinterpret_cast<float*>(smem_raw);
  float* patch = w_s + K * K * t.group;
  float* dc_s = patch + t.patch_h * t.patch_w * t.pixel_stride;
  float* part_s = dc_s + t.tile_h * t.tile_w * t.pixel_stride;  // [part][tap][channel]
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* dy = static_cast<const scalar_t*>(p.dy);
  auto* dx = static_cast<scalar_t*>(p.dx);
  const int64_t plane = t.rows * s.channels;
  const float m = static_cast<float>(s.batch * s.out_h * static_cast<int64_t>(s.out_w));
  const auto at = [&](const float* base, int pixel, int lane) {
    return *reinterpret_cast<const float4*>(base + pixel * t.pixel_stride + lane * kLaneChannels);
  };

  int64_t staged_group = -1;
  for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {  // block-uniform loop
    const HaloTile tc = decode_gather_tile(t, tile, K, STRIDE, s.pad_top, s.pad_left);
    stage_halo_tile<K, STRIDE>(w_s, patch, staged_group, t, tc, p.weight, x, p.x_stride, p.vec > 1, s.channels,
                               s.in_h, s.in_w, s.pad_top, s.pad_left);
    const int64_t group_first = tc.group * t.group;

    for (int item = threadIdx.x; item < t.lanes * t.strips; item += kThreads) {  // phase 1: dc
      const HaloLane lane = halo_lane(t, item);
      const int64_t c0 = group_first + lane.channel * kLaneChannels;
      ChannelGrad g[kLaneChannels];
      load_lane_grads(p, tc.n, c0, g);
      float a[kLaneChannels], k1[kLaneChannels], k2[kLaneChannels];  // dc = a * (dz - k1 - xhat * k2)
#pragma unroll
      for (int v = 0; v < kLaneChannels; ++v) {
        const bool active = c0 + v < s.channels;
        a[v] = g[v].gamma * g[v].invstd;
        k1[v] = active && p.training ? p.sum_dz[c0 + v] / m : 0.f;
        k2[v] = active && p.training ? p.sum_dz_xhat[c0 + v] / m : 0.f;
      }
      float acc[kStrip][kLaneChannels];
      conv_strip<K, STRIDE>(patch, w_s, t, lane, acc);
      const int oh = tc.oh0 + lane.row;
#pragma unroll
      for (int j = 0; j < kStrip; ++j) {
        const int ow = tc.ow0 + lane.col0 + j;
        float dc[kLaneChannels] = {0.f, 0.f, 0.f, 0.f};
        if (oh >= 0 && oh < s.out_h && ow >= 0 && ow < s.out_w) {
          float dyv[kLaneChannels];
          load_lane(dy + tc.n * p.dy_stride[0] + oh * p.dy_stride[2] + ow * p.dy_stride[3], c0, p.dy_stride[1],
                    s.channels, p.vec > 1, dyv);
#pragma unroll
          for (int v = 0; v < kLaneChannels; ++v) {
            if (c0 + v >= s.channels) break;
            const PointGrad pg = grad_at(g[v], acc[j][v], dyv[v]);
            dc[v] = a[v] * (pg.dz - k1[v] - pg.xhat * k2[v]);
          }
        }
        *reinterpret_cast<float4*>(dc_s + (lane.row * t.tile_w + lane.col0 + j) * t.pixel_stride +
                                   lane.channel * kLaneChannels) = make_float4(dc[0], dc[1], dc[2], dc[3]);
      }
    }
    __syncthreads();

    for (int item = threadIdx.x; item < t.lanes * t.in_tile_h * t.in_tile_w; item += kThreads) {  // phase 2: dx
      const int lane = item % t.lanes, pixel = item / t.lanes;
      const int ih = tc.ih0 + pixel / t.in_tile_w, iw = tc.iw0 + pixel % t.in_tile_w;
      const int64_t c0 = group_first + lane * kLaneChannels;
      if (ih >= s.in_h || iw >= s.in_w || c0 >= s.channels) continue;
      float sum[kLaneChannels] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int kh = 0; kh < K; ++kh) {
        const int r = gather_source<STRIDE>(ih, s.pad_top, kh, tc.oh0);
        if (r < 0) continue;
#pragma unroll
        for (int kw = 0; kw < K; ++kw) {
          const int q = gather_source<STRIDE>(iw, s.pad_left, kw, tc.ow0);
          if (q < 0) continue;
          const float4 d = at(dc_s, r * t.tile_w + q, lane);
          const float4 w = *reinterpret_cast<const float4*>(w_s + (kh * K + kw) * t.group + lane * kLaneChannels);
          sum[0] = fmaf(d.x, w.x, sum[0]);
          sum[1] = fmaf(d.y, w.y, sum[1]);
          sum[2] = fmaf(d.z, w.z, sum[2]);
          sum[3] = fmaf(d.w, w.w, sum[3]);
        }
      }
      store_lane(dx + tc.n * p.dx_stride[0] + ih * p.dx_stride[2] + iw * p.dx_stride[3], c0, p.dx_stride[1],
                 s.channels, p.vec > 1, sum);
    }

    // phase 3: dweight[tap] = sum over the tile's inputs i (and the output o reading i through
    // tap) of dc[o] * x[i]; inputs past the image are 0 in the patch. Each row part of the tile
    // sums into part_s, then the parts are added in a fixed order.
    const int ih_patch = tc.oh0 * STRIDE - s.pad_top, iw_patch = tc.ow0 * STRIDE - s.pad_left;
    const int part_rows = t.in_tile_h / t.dweight_parts;
    for (int item = threadIdx.x; item < t.lanes * K * K * t.dweight_parts; item += kThreads) {
      const int lane = item % t.lanes, pair = item / t.lanes;  // pair = part * K * K + tap
      const int tap = pair % (K * K), kh = tap / K, kw = tap - kh * K;
      const int first_row = tc.ih0 + pair / (K * K) * part_rows;
      float sum[kLaneChannels] = {0.f, 0.f, 0.f, 0.f};
      for (int ih = first_row; ih < first_row + part_rows; ++ih) {
        const int r = gather_source<STRIDE>(ih, s.pad_top, kh, tc.oh0);
        if (r < 0) continue;
        for (int iw = tc.iw0; iw < tc.iw0 + t.in_tile_w; ++iw) {
          const int q = gather_source<STRIDE>(iw, s.pad_left, kw, tc.ow0);
          if (q < 0) continue;
          const float4 d = at(dc_s, r * t.tile_w + q, lane);
          const float4 xv = at(patch, (ih - ih_patch) * t.patch_w + iw - iw_patch, lane);
          sum[0] = fmaf(d.x, xv.x, sum[0]);
          sum[1] = fmaf(d.y, xv.y, sum[1]);
          sum[2] = fmaf(d.z, xv.z, sum[2]);
          sum[3] = fmaf(d.w, xv.w, sum[3]);
        }
      }
      *reinterpret_cast<float4*>(part_s + pair * t.group + lane * kLaneChannels) =
          make_float4(sum[0], sum[1], sum[2], sum[3]);
    }
    __syncthreads();
    for (int item = threadIdx.x; item < t.lanes * K * K; item += kThreads) {
      const int lane = item % t.lanes, tap = item / t.lanes;
      float sum[kLaneChannels] = {0.f, 0.f, 0.f, 0.f};
      for (int part = 0; part < t.dweight_parts; ++part) {
        const float4 d =
            *reinterpret_cast<const float4*>(part_s + (part * K * K + tap) * t.group + lane * kLaneChannels);
        sum[0] += d.x;
        sum[1] += d.y;
        sum[2] += d.z;
        sum[3] += d.w;
      }
      const int64_t c0 = group_first + lane * kLaneChannels;
      float* out = p.partial + tap * plane + tc.row * s.channels;
#pragma unroll
      for (int v = 0; v < kLaneChannels; ++v) {
        if (c0 + v < s.channels) out[c0 + v] = sum[v];
      }
    }
  }
}

// Block: 32 columns (plane, channel) x 8 row lanes; each row lane sums rows lane, lane + 8, ...
// and the lanes merge by a fixed tree: the result does not depend on scheduling.
__global__ void __launch_bounds__(kThreads)
    sum_rows_kernel(const float* __restrict__ partial, int64_t planes, int64_t rows, int64_t channels,
                    float* __restrict__ out, int64_t out_plane_stride, int64_t out_channel_stride) {
  __shared__ Sum<1> red[kThreads];
  const LaneCoord lane = combine_lane();
  const int64_t columns = planes * channels;
  for (int64_t first = blockIdx.x * static_cast<int64_t>(kCombineColumns); first < columns;
       first += static_cast<int64_t>(gridDim.x) * kCombineColumns) {  // block-uniform loop
    const int64_t column = first + lane.channel;
    const bool active = column < columns;
    const int64_t j = column / channels, c = column - j * channels;
    Sum<1> s = zero_sum<1>();
    if (active) {
      for (int64_t r = lane.pixel; r < rows; r += kCombineRowLanes) s.v[0] += partial[(j * rows + r) * channels + c];
    }
    s = reduce_lanes(s, red, kCombineColumns, kCombineRowLanes, lane);
    if (active && lane.pixel == 0) out[j * out_plane_stride + c * out_channel_stride] = s.v[0];
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_dwconv_bn_silu_bwd_reduce(const DWConvBwdParams& p, int kernel_size, int stride,
                                             cudaStream_t stream) {
  return KERNEL_SIZE_SWITCH(kernel_size, K, [&] {
    return STRIDE_SWITCH(stride, S, [&] {
      return launch_halo_kernel(dwconv_bn_silu_bwd_reduce_kernel<scalar_t, K, S>, p, p.halo,
                                halo_smem_bytes(p.halo, K, sizeof(Sum<2 * kLaneChannels>)), stream);
    });
  });
}

template <typename scalar_t>
cudaError_t launch_dwconv_bn_silu_bwd_input(const DWConvBwdParams& p, int kernel_size, int stride,
                                            cudaStream_t stream) {
  return KERNEL_SIZE_SWITCH(kernel_size, K, [&] {
    return STRIDE_SWITCH(stride, S, [&] {
      return launch_halo_kernel(dwconv_bn_silu_bwd_input_kernel<scalar_t, K, S>, p, p.gather,
                                gather_smem_bytes(p.gather, K), stream);
    });
  });
}

cudaError_t launch_sum_rows(const float* partial, int64_t planes, int64_t rows, int64_t channels, float* out,
                            int64_t out_plane_stride, int64_t out_channel_stride, cudaStream_t stream) {
  sum_rows_kernel<<<grid_size(ceil_div(planes * channels, kCombineColumns)), kThreads, 0, stream>>>(
      partial, planes, rows, channels, out, out_plane_stride, out_channel_stride);
  return cudaGetLastError();
}

#define INSTANTIATE(scalar_t)                                                                                   \
  template cudaError_t launch_dwconv_bn_silu_bwd_reduce<scalar_t>(const DWConvBwdParams&, int, int, cudaStream_t); \
  template cudaError_t launch_dwconv_bn_silu_bwd_input<scalar_t>(const DWConvBwdParams&, int, int, cudaStream_t);
INSTANTIATE(float)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)
#undef INSTANTIATE

}  // namespace fused_mbconv
