// The squeeze-excite kernels: the squeeze (per-(n, c) mean over H*W), the scale (x * gate) and its
// backward over the activations, and the excite (two small FCs, SiLU, sigmoid) with its backward.
// Every reduction runs in a fixed order (block trees, per-chunk partial sums added in chunk order,
// batch sums over the samples in order): results do not depend on scheduling, no float atomics.
#include "dwconv_device.cuh"
#include "squeeze_excite.cuh"
#include "static_switch.cuh"

namespace fused_mbconv {
namespace {

template <typename scalar_t>
__device__ __forceinline__ float load_per_image(const PerImageIn& t, int64_t n, int64_t c) {
  const int64_t i = n * t.stride[0] + c * t.stride[1];
  return t.is_float ? static_cast<const float*>(t.data)[i] : to_float(static_cast<const scalar_t*>(t.data)[i]);
}

template <typename scalar_t>
__device__ __forceinline__ void store_per_image(const PerImageOut& t, int64_t i, float v) {
  if (t.is_float) {
    static_cast<float*>(t.data)[i] = v;
  } else {
    static_cast<scalar_t*>(t.data)[i] = from_float<scalar_t>(v);
  }
}

struct PlanePoint {
  int h, w;
};

// With FLAT the pixel index is itself the (flat) w coordinate: h * stride[2] folds away.
template <bool FLAT>
__device__ __forceinline__ PlanePoint plane_point(int q, int width) {
  if (FLAT) return {0, q};
  const int h = q / width;
  return {h, q - h * width};
}

__device__ __forceinline__ int64_t offset_of(const PlanePoint& pt, const int64_t (&stride)[4]) {
  return pt.h * stride[2] + pt.w * stride[3];
}

// The lane sums of a tile, reduced over its pixel lanes: the result (tiling with one chunk per
// image) or the chunk's partial sums. Called by the pixel-lane-0 thread of an active lane.
template <typename scalar_t, int VEC>
__device__ __forceinline__ void write_tile_sums(const SEPlaneParams& p, const TileCoord& tc, int64_t c0,
                                                const Sum<VEC>& s) {
  if (p.tiling.chunks == 1) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) store_per_image<scalar_t>(p.out, tc.n * p.channels + c0 + v, s.v[v] * p.out_scale);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) p.partial[tc.row * p.channels + c0 + v] = s.v[v];
  }
}

// Block: kThreads threads = cpb channel lanes x `lanes` pixel lanes (see Tiling); a channel lane
// covers VEC channels (VEC > 1: 16-byte loads, channels_last memory).
template <typename scalar_t, int VEC, bool FLAT>
__global__ void __launch_bounds__(kThreads) se_squeeze_kernel(const SEPlaneParams p) {
  __shared__ Sum<VEC> red[kThreads];
  const Tiling& t = p.tiling;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const LaneCoord lane = lane_of(t, threadIdx.x);

  for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {  // block-uniform loop
    const TileCoord tc = decode_tile(t, tile);
    const int64_t c0 = first_channel(t, tc, lane);
    // host: with VEC > 1, channels % VEC == 0, so a lane is wholly in range or wholly idle
    const bool active = c0 < p.channels;
    Sum<VEC> s = zero_sum<VEC>();
    if (active) {
      const scalar_t* xc = x + tc.n * p.x_stride[0] + c0 * p.x_stride[1];
      for (int q = tc.begin + lane.pixel; q < tc.end; q += t.lanes) {
        float xv[VEC];
        load_pack<VEC>(xc + offset_of(plane_point<FLAT>(q, p.width), p.x_stride), xv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) s.v[v] += xv[v];
      }
    }
    s = reduce_lanes(s, red, t.cpb, t.lanes, lane);
    if (active && lane.pixel == 0) write_tile_sums<scalar_t, VEC>(p, tc, c0, s);
  }
}

// Same blocks as the squeeze, without a reduction: no shared memory, no barriers.
template <typename scalar_t, int VEC, bool FLAT>
__global__ void __launch_bounds__(kThreads) se_scale_kernel(const SEPlaneParams p) {
  const Tiling& t = p.tiling;
  const auto* x = static_cast<const scalar_t*>(p.x);
  auto* y = static_cast<scalar_t*>(p.y);
  const LaneCoord lane = lane_of(t, threadIdx.x);

  for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {
    const TileCoord tc = decode_tile(t, tile);
    const int64_t c0 = first_channel(t, tc, lane);
    if (c0 >= p.channels) continue;
    float gate[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) gate[v] = load_per_image<scalar_t>(p.gate, tc.n, c0 + v);
    const scalar_t* xc = x + tc.n * p.x_stride[0] + c0 * p.x_stride[1];
    scalar_t* yc = y + tc.n * p.y_stride[0] + c0 * p.y_stride[1];
    for (int q = tc.begin + lane.pixel; q < tc.end; q += t.lanes) {
      const PlanePoint pt = plane_point<FLAT>(q, p.width);
      float vals[VEC];
      load_pack<VEC>(xc + offset_of(pt, p.x_stride), vals);
#pragma unroll
      for (int v = 0; v < VEC; ++v) vals[v] *= gate[v];
      store_pack<VEC>(yc + offset_of(pt, p.y_stride), vals);
    }
  }
}

// y = x * gate: grad_x = grad_y * gate, grad_gate = sum over the plane of grad_y * x.
template <typename scalar_t, int VEC, bool FLAT>
__global__ void __launch_bounds__(kThreads) se_scale_backward_kernel(const SEPlaneParams p) {
  __shared__ Sum<VEC> red[kThreads];
  const Tiling& t = p.tiling;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* dy = static_cast<const scalar_t*>(p.dy);
  auto* dx = static_cast<scalar_t*>(p.y);
  const LaneCoord lane = lane_of(t, threadIdx.x);

  for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {  // block-uniform loop
    const TileCoord tc = decode_tile(t, tile);
    const int64_t c0 = first_channel(t, tc, lane);
    const bool active = c0 < p.channels;
    Sum<VEC> s = zero_sum<VEC>();
    if (active) {
      float gate[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) gate[v] = load_per_image<scalar_t>(p.gate, tc.n, c0 + v);
      const scalar_t* xc = x + tc.n * p.x_stride[0] + c0 * p.x_stride[1];
      const scalar_t* dyc = dy + tc.n * p.dy_stride[0] + c0 * p.dy_stride[1];
      scalar_t* dxc = dx + tc.n * p.y_stride[0] + c0 * p.y_stride[1];
      for (int q = tc.begin + lane.pixel; q < tc.end; q += t.lanes) {
        const PlanePoint pt = plane_point<FLAT>(q, p.width);
        float xv[VEC], dyv[VEC], dxv[VEC];
        load_pack<VEC>(xc + offset_of(pt, p.x_stride), xv);
        load_pack<VEC>(dyc + offset_of(pt, p.dy_stride), dyv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          dxv[v] = dyv[v] * gate[v];
          s.v[v] = fmaf(dyv[v], xv[v], s.v[v]);
        }
        store_pack<VEC>(dxc + offset_of(pt, p.y_stride), dxv);
      }
    }
    s = reduce_lanes(s, red, t.cpb, t.lanes, lane);
    if (active && lane.pixel == 0) write_tile_sums<scalar_t, VEC>(p, tc, c0, s);
  }
}

// One thread per (n, c), consecutive threads on consecutive channels (coalesced partial rows).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) se_sum_chunks_kernel(const SEPlaneParams p) {
  const int64_t total = p.batch * p.channels, chunks = p.tiling.chunks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t n = i / p.channels, c = i - n * p.channels;
    const float* part = p.partial + n * chunks * p.channels + c;  // row n * chunks + k
    float s = 0.f;
    for (int64_t k = 0; k < chunks; ++k) s += part[k * p.channels];
    store_per_image<scalar_t>(p.out, i, s * p.out_scale);
  }
}

// ---------------------------------------------------------------------------------------------
// excite

using SampleSum = Sum<kExciteSamples>;

template <typename scalar_t>
__device__ __forceinline__ float pooled_at(const SEExciteParams& p, int64_t n, int64_t c) {
  return to_float(static_cast<const scalar_t*>(p.pooled)[n * p.pooled_stride[0] + c * p.pooled_stride[1]]);
}

// Samples n0 .. n0 + kExciteSamples - 1 of the block that exist.
__device__ __forceinline__ int samples_in(const SEExciteParams& p, int64_t n0) {
  const int64_t left = p.batch - n0;
  return left < kExciteSamples ? static_cast<int>(left) : kExciteSamples;
}

// FC1 for the block's samples: act[n, r] = silu(h), h = b1[r] + sum_c w1[r, c] pooled[n, c] (and
// hidden[n, r] = h when hidden is given); act and hidden are (N, R) workspaces. Threads: row lanes (hidden units) x c_lanes lanes
// striding over C, fastest, so a warp reads consecutive weights of a row; the c lanes merge by
// reduce_lanes. Every thread of the block must call it.
template <typename scalar_t>
__device__ void excite_hidden(const SEExciteParams& p, int64_t n0, SampleSum* red, float* act, float* hidden) {
  const int lanes = p.c_lanes, rows = kThreads / lanes;
  const LaneCoord lane = {static_cast<int>(threadIdx.x) / lanes, static_cast<int>(threadIdx.x) % lanes};
  const int count = samples_in(p, n0);
  for (int64_t r0 = 0; r0 < p.reduced; r0 += rows) {  // block-uniform loop
    const int64_t r = r0 + lane.channel;
    const bool active = r < p.reduced;
    SampleSum s = zero_sum<kExciteSamples>();
    if (active) {
      const float* w_row = p.w1 + r * p.channels;
      for (int64_t c = lane.pixel; c < p.channels; c += lanes) {
        const float w = w_row[c];
#pragma unroll
        for (int i = 0; i < kExciteSamples; ++i) {
          if (i < count) s.v[i] = fmaf(w, pooled_at<scalar_t>(p, n0 + i, c), s.v[i]);
        }
      }
    }
    s = reduce_lanes(s, red, rows, lanes, lane);
    if (active && lane.pixel == 0) {
      const float b = p.b1[r];
#pragma unroll
      for (int i = 0; i < kExciteSamples; ++i) {
        if (i >= count) continue;
        const float h = s.v[i] + b;
        act[(n0 + i) * p.reduced + r] = silu(h);
        if (hidden != nullptr) hidden[(n0 + i) * p.reduced + r] = h;
      }
    }
  }
}

// FC2 logits of column c for the block's samples, from act (N, R): b2[c] + sum_r w2[c, r] act[n, r].
// One thread per column; act rows are the same address across a warp (a broadcast).
__device__ __forceinline__ SampleSum excite_logits(const SEExciteParams& p, const float* act, int64_t n0, int count,
                                                   int64_t c) {
  SampleSum s;
  const float b = p.b2[c];
#pragma unroll
  for (int i = 0; i < kExciteSamples; ++i) s.v[i] = b;
  const float* w_row = p.w2 + c * p.reduced;
  for (int64_t r = 0; r < p.reduced; ++r) {
    const float w = w_row[r];
#pragma unroll
    for (int i = 0; i < kExciteSamples; ++i) {
      if (i < count) s.v[i] = fmaf(w, act[(n0 + i) * p.reduced + r], s.v[i]);
    }
  }
  return s;
}

// Work item = (group of kExciteSamples samples, block of kThreads columns), one column a thread:
// small batches still spread over several SMs. Each item recomputes its samples' FC1 (R x C
// multiply-adds a sample, a few microseconds) into its own act rows, so items never share
// workspace; a barrier (global writes of the block are then visible to it), then FC2 and the
// sigmoid of its columns.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) se_excite_kernel(const SEExciteParams p) {
  __shared__ SampleSum red[kThreads];
  auto* gate = static_cast<scalar_t*>(p.gate);
  const int64_t column_blocks = excite_column_blocks(p.channels);
  const int64_t items = (p.batch + kExciteSamples - 1) / kExciteSamples * column_blocks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // block-uniform loop
    const int64_t group = item / column_blocks, column_block = item - group * column_blocks;
    const int64_t n0 = group * kExciteSamples;
    float* act = p.act + column_block * p.batch * p.reduced;
    excite_hidden<scalar_t>(p, n0, red, act, nullptr);
    __syncthreads();
    const int count = samples_in(p, n0);
    const int64_t c = column_block * kThreads + threadIdx.x;
    if (c < p.channels) {
      const SampleSum logits = excite_logits(p, act, n0, count, c);
#pragma unroll
      for (int i = 0; i < kExciteSamples; ++i) {
        if (i < count) gate[(n0 + i) * p.channels + c] = from_float<scalar_t>(sigmoid(logits.v[i]));
      }
    }
  }
}

// Backward, per sample, in four phases separated by barriers (each reads what other threads of
// the block wrote to the workspaces in the one before):
//   h = pooled @ w1^T + b1;  a = silu(h);  g = sigmoid(a @ w2^T + b2)
//   dlogits = dgate * g (1 - g)                                   sigmoid' = g (1 - g)
//   dh = (dlogits @ w2) * silu'(h)
//   dpooled = dh @ w1
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) se_excite_backward_samples_kernel(const SEExciteParams p) {
  __shared__ SampleSum red[kThreads];
  auto* dpooled = static_cast<scalar_t*>(p.grad_pooled);
  const int64_t C = p.channels, R = p.reduced;
  for (int64_t n0 = blockIdx.x * static_cast<int64_t>(kExciteSamples); n0 < p.batch;
       n0 += static_cast<int64_t>(gridDim.x) * kExciteSamples) {  // block-uniform loop
    const int count = samples_in(p, n0);
    excite_hidden<scalar_t>(p, n0, red, p.act, p.hidden);
    __syncthreads();

    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const SampleSum logits = excite_logits(p, p.act, n0, count, c);
#pragma unroll
      for (int i = 0; i < kExciteSamples; ++i) {
        if (i >= count) continue;
        const float g = sigmoid(logits.v[i]);
        p.dlogits[(n0 + i) * C + c] = load_per_image<scalar_t>(p.grad_gate, n0 + i, c) * g * (1.f - g);
      }
    }
    __syncthreads();

    // da[r] = sum_c dlogits[c] w2[c, r]: r lanes fastest (a warp reads along a row of w2), the
    // c lanes merge by reduce_lanes
    {
      const int rows = p.r_lanes, lanes = kThreads / rows;
      const LaneCoord lane = {static_cast<int>(threadIdx.x) % rows, static_cast<int>(threadIdx.x) / rows};
      for (int64_t r0 = 0; r0 < R; r0 += rows) {  // block-uniform loop
        const int64_t r = r0 + lane.channel;
        const bool active = r < R;
        SampleSum s = zero_sum<kExciteSamples>();
        if (active) {
          for (int64_t c = lane.pixel; c < C; c += lanes) {
            const float w = p.w2[c * R + r];
#pragma unroll
            for (int i = 0; i < kExciteSamples; ++i) {
              if (i < count) s.v[i] = fmaf(w, p.dlogits[(n0 + i) * C + c], s.v[i]);
            }
          }
        }
        s = reduce_lanes(s, red, rows, lanes, lane);
        if (active && lane.pixel == 0) {
#pragma unroll
          for (int i = 0; i < kExciteSamples; ++i) {
            if (i < count) p.dhidden[(n0 + i) * R + r] = s.v[i] * silu_grad(p.hidden[(n0 + i) * R + r]);
          }
        }
      }
    }
    __syncthreads();

    // dpooled[c] = sum_r dh[r] w1[r, c]: one thread per column, a warp reads along a row of w1
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      SampleSum s = zero_sum<kExciteSamples>();
      for (int64_t r = 0; r < R; ++r) {
        const float w = p.w1[r * C + c];
#pragma unroll
        for (int i = 0; i < kExciteSamples; ++i) {
          if (i < count) s.v[i] = fmaf(w, p.dhidden[(n0 + i) * R + r], s.v[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < kExciteSamples; ++i) {
        if (i < count) dpooled[(n0 + i) * C + c] = from_float<scalar_t>(s.v[i]);
      }
    }
  }
}

// One thread per output element of grad_w1 (R, C), grad_w2 (C, R), grad_b2 (C,), grad_b1 (R,), in
// that order of a flat index (the fastest index of each is contiguous in memory, and in the
// workspace row it reads); each sums over the samples in order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) se_excite_backward_weights_kernel(const SEExciteParams p) {
  const int64_t C = p.channels, R = p.reduced, N = p.batch, weights = R * C;
  const int64_t total = 2 * weights + C + R;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    float s = 0.f;
    if (i < weights) {  // grad_w1[r, c] = sum_n dh[n, r] pooled[n, c]
      const int64_t r = i / C, c = i - r * C;
      for (int64_t n = 0; n < N; ++n) s = fmaf(p.dhidden[n * R + r], pooled_at<scalar_t>(p, n, c), s);
      p.grad_w1[i] = s;
    } else if (i < 2 * weights) {  // grad_w2[c, r] = sum_n dlogits[n, c] a[n, r]
      const int64_t j = i - weights, c = j / R, r = j - c * R;
      for (int64_t n = 0; n < N; ++n) s = fmaf(p.dlogits[n * C + c], p.act[n * R + r], s);
      p.grad_w2[j] = s;
    } else if (i < 2 * weights + C) {  // grad_b2[c] = sum_n dlogits[n, c]
      const int64_t c = i - 2 * weights;
      for (int64_t n = 0; n < N; ++n) s += p.dlogits[n * C + c];
      p.grad_b2[c] = s;
    } else {  // grad_b1[r] = sum_n dh[n, r]
      const int64_t r = i - 2 * weights - C;
      for (int64_t n = 0; n < N; ++n) s += p.dhidden[n * R + r];
      p.grad_b1[r] = s;
    }
  }
}

template <typename scalar_t>
constexpr int vector_of() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

unsigned excite_grid(const SEExciteParams& p) { return grid_size(ceil_div(p.batch, kExciteSamples)); }

}  // namespace

template <typename scalar_t>
cudaError_t launch_se_squeeze(const SEPlaneParams& p, bool flat, cudaStream_t stream) {
  return BOOL_SWITCH(p.tiling.vec > 1, kVectorized, [&] {
    return BOOL_SWITCH(flat, kFlat, [&] {
      constexpr int VEC = kVectorized ? vector_of<scalar_t>() : 1;
      se_squeeze_kernel<scalar_t, VEC, kFlat><<<grid_size(p.tiling.tiles), kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

template <typename scalar_t>
cudaError_t launch_se_scale(const SEPlaneParams& p, bool flat, cudaStream_t stream) {
  return BOOL_SWITCH(p.tiling.vec > 1, kVectorized, [&] {
    return BOOL_SWITCH(flat, kFlat, [&] {
      constexpr int VEC = kVectorized ? vector_of<scalar_t>() : 1;
      se_scale_kernel<scalar_t, VEC, kFlat><<<grid_size(p.tiling.tiles), kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

template <typename scalar_t>
cudaError_t launch_se_scale_backward(const SEPlaneParams& p, bool flat, cudaStream_t stream) {
  return BOOL_SWITCH(p.tiling.vec > 1, kVectorized, [&] {
    return BOOL_SWITCH(flat, kFlat, [&] {
      constexpr int VEC = kVectorized ? vector_of<scalar_t>() : 1;
      se_scale_backward_kernel<scalar_t, VEC, kFlat><<<grid_size(p.tiling.tiles), kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

template <typename scalar_t>
cudaError_t launch_se_sum_chunks(const SEPlaneParams& p, cudaStream_t stream) {
  se_sum_chunks_kernel<scalar_t><<<grid_size(ceil_div(p.batch * p.channels, kThreads)), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_se_excite(const SEExciteParams& p, cudaStream_t stream) {
  const int64_t items = ceil_div(p.batch, kExciteSamples) * excite_column_blocks(p.channels);
  se_excite_kernel<scalar_t><<<grid_size(items), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_se_excite_backward_samples(const SEExciteParams& p, cudaStream_t stream) {
  se_excite_backward_samples_kernel<scalar_t><<<excite_grid(p), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_se_excite_backward_weights(const SEExciteParams& p, cudaStream_t stream) {
  const int64_t total = 2 * p.reduced * p.channels + p.channels + p.reduced;
  se_excite_backward_weights_kernel<scalar_t><<<grid_size(ceil_div(total, kThreads)), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define INSTANTIATE(scalar_t)                                                                              \
  template cudaError_t launch_se_squeeze<scalar_t>(const SEPlaneParams&, bool, cudaStream_t);              \
  template cudaError_t launch_se_scale<scalar_t>(const SEPlaneParams&, bool, cudaStream_t);                \
  template cudaError_t launch_se_scale_backward<scalar_t>(const SEPlaneParams&, bool, cudaStream_t);       \
  template cudaError_t launch_se_sum_chunks<scalar_t>(const SEPlaneParams&, cudaStream_t);                 \
  template cudaError_t launch_se_excite<scalar_t>(const SEExciteParams&, cudaStream_t);                    \
  template cudaError_t launch_se_excite_backward_samples<scalar_t>(const SEExciteParams&, cudaStream_t);   \
  template cudaError_t launch_se_excite_backward_weights<scalar_t>(const SEExciteParams&, cudaStream_t);
INSTANTIATE(float)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)
#undef INSTANTIATE

}  // namespace fused_mbconv
