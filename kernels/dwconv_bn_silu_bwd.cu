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
// Pass 1 (over output pixels) sums S1, S2. Pass 2 (over input pixels) gathers dx and, from the
// same (output, tap) pairs, the dweight sums; it recomputes dc at every output pixel that reads
// the input pixel (k*k / stride^2 of them): compute, not memory traffic.
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

struct PointGrad {
  float dz, xhat;
};

// dz and xhat at output pixel (oh, ow), recomputing c = conv(x) there. xc and dyc point at (n, c).
template <int K, int STRIDE, typename scalar_t>
__device__ __forceinline__ PointGrad point_grad(const DWConvBwdParams& p, const scalar_t* __restrict__ xc,
                                                const scalar_t* __restrict__ dyc, const float (&w)[K * K],
                                                const ChannelGrad& g, int oh, int ow) {
  float acc[1];
  conv_point<K, STRIDE, 1>(xc, p.x_stride[2], p.x_stride[3], p.shape.in_h, p.shape.in_w, oh, ow, p.shape.pad_top,
                           p.shape.pad_left, [&](int tap, int) { return w[tap]; }, acc);
  const float xhat = (acc[0] - g.mean) * g.invstd;
  const float z = xhat * g.gamma + g.beta;
  const float dy = to_float(dyc[oh * p.dy_stride[2] + ow * p.dy_stride[3]]) + g.dsq;
  return {dy * silu_grad(z), xhat};
}

template <int K>
__device__ __forceinline__ void load_weights(const DWConvBwdParams& p, int64_t c, float (&w)[K * K]) {
#pragma unroll
  for (int i = 0; i < K * K; ++i) w[i] = p.weight[c * K * K + i];
}

// Pass 1. Block: cpb channel lanes x `lanes` pixel lanes over output pixels (see Tiling); one
// channel per lane. Writes partial[j][row][c] for j = S1, S2.
template <typename scalar_t, int K, int STRIDE>
__global__ void __launch_bounds__(kThreads) dwconv_bn_silu_bwd_reduce_kernel(const DWConvBwdParams p) {
  __shared__ Sum<2> red[kThreads];
  const Tiling& t = p.tiling;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* dy = static_cast<const scalar_t*>(p.dy);
  const LaneCoord lane = lane_of(t, threadIdx.x);
  const int64_t plane = t.rows * p.shape.channels;

  for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {  // block-uniform loop
    const TileCoord tc = decode_tile(t, tile);
    const int64_t c = first_channel(t, tc, lane);
    const bool active = c < p.shape.channels;
    Sum<2> s = zero_sum<2>();
    if (active) {
      float w[K * K];
      load_weights<K>(p, c, w);
      const ChannelGrad g = load_channel_grad(p, tc.n, c);
      const scalar_t* xc = x + tc.n * p.x_stride[0] + c * p.x_stride[1];
      const scalar_t* dyc = dy + tc.n * p.dy_stride[0] + c * p.dy_stride[1];
      for (int q = tc.begin + lane.pixel; q < tc.end; q += t.lanes) {
        const int oh = q / p.shape.out_w, ow = q - oh * p.shape.out_w;
        const PointGrad pg = point_grad<K, STRIDE>(p, xc, dyc, w, g, oh, ow);
        s.v[0] += pg.dz;
        s.v[1] += pg.dz * pg.xhat;
      }
    }
    s = reduce_lanes(s, red, t.cpb, t.lanes, lane);
    if (active && lane.pixel == 0) {
      float* out = p.partial + tc.row * p.shape.channels + c;
      out[0] = s.v[0];
      out[plane] = s.v[1];
    }
  }
}

// Pass 2. Block: cpb channel lanes x `lanes` pixel lanes over input pixels; one channel per
// lane. Writes dx at every input pixel (zero where no output reads it) and partial[tap][row][c].
template <typename scalar_t, int K, int STRIDE>
__global__ void __launch_bounds__(kThreads) dwconv_bn_silu_bwd_input_kernel(const DWConvBwdParams p) {
  __shared__ Sum<K * K> red[kThreads];
  const Tiling& t = p.tiling;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* dy = static_cast<const scalar_t*>(p.dy);
  auto* dx = static_cast<scalar_t*>(p.dx);
  const LaneCoord lane = lane_of(t, threadIdx.x);
  const int64_t plane = t.rows * p.shape.channels;
  const float m = static_cast<float>(p.shape.batch * p.shape.out_h * static_cast<int64_t>(p.shape.out_w));

  for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {  // block-uniform loop
    const TileCoord tc = decode_tile(t, tile);
    const int64_t c = first_channel(t, tc, lane);
    const bool active = c < p.shape.channels;
    Sum<K * K> dw = zero_sum<K * K>();
    if (active) {
      float w[K * K];
      load_weights<K>(p, c, w);
      const ChannelGrad g = load_channel_grad(p, tc.n, c);
      // dc = a * (dz - k1 - xhat * k2)
      const float a = g.gamma * g.invstd;
      const float k1 = p.training ? p.sum_dz[c] / m : 0.f;
      const float k2 = p.training ? p.sum_dz_xhat[c] / m : 0.f;
      const scalar_t* xc = x + tc.n * p.x_stride[0] + c * p.x_stride[1];
      const scalar_t* dyc = dy + tc.n * p.dy_stride[0] + c * p.dy_stride[1];
      scalar_t* dxc = dx + tc.n * p.dx_stride[0] + c * p.dx_stride[1];
      for (int q = tc.begin + lane.pixel; q < tc.end; q += t.lanes) {
        const int ih = q / p.shape.in_w, iw = q - ih * p.shape.in_w;
        const float xv = to_float(xc[ih * p.x_stride[2] + iw * p.x_stride[3]]);
        float dxv = 0.f;
        for_each_reader<K, STRIDE>(ih, iw, p.shape.pad_top, p.shape.pad_left, p.shape.out_h, p.shape.out_w,
                                   [&](int tap, int oh, int ow) {
                                     const PointGrad pg = point_grad<K, STRIDE>(p, xc, dyc, w, g, oh, ow);
                                     const float dc = a * (pg.dz - k1 - pg.xhat * k2);
                                     dxv = fmaf(dc, w[tap], dxv);
                                     dw.v[tap] = fmaf(dc, xv, dw.v[tap]);
                                   });
        dxc[ih * p.dx_stride[2] + iw * p.dx_stride[3]] = from_float<scalar_t>(dxv);
      }
    }
    dw = reduce_lanes(dw, red, t.cpb, t.lanes, lane);
    if (active && lane.pixel == 0) {
      float* out = p.partial + tc.row * p.shape.channels + c;
#pragma unroll
      for (int tap = 0; tap < K * K; ++tap) out[tap * plane] = dw.v[tap];
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
      dwconv_bn_silu_bwd_reduce_kernel<scalar_t, K, S><<<grid_size(p.tiling.tiles), kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

template <typename scalar_t>
cudaError_t launch_dwconv_bn_silu_bwd_input(const DWConvBwdParams& p, int kernel_size, int stride,
                                            cudaStream_t stream) {
  return KERNEL_SIZE_SWITCH(kernel_size, K, [&] {
    return STRIDE_SWITCH(stride, S, [&] {
      dwconv_bn_silu_bwd_input_kernel<scalar_t, K, S><<<grid_size(p.tiling.tiles), kThreads, 0, stream>>>(p);
      return cudaGetLastError();
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
