// Index arithmetic and statistics shared by the host, the kernels and the CPU tests: how the
// work of a depthwise-conv kernel is cut into tiles and threads, which output a transposed-conv
// gather reads, and the Welford/Chan merge of (count, mean, M2). Plain C++ (no CUDA headers) so
// tests/test_cuda_index_math.py compiles this very file with a host compiler and checks it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DWCONV_HD __host__ __device__ __forceinline__
#define DWCONV_UNROLL _Pragma("unroll")
#else
#define DWCONV_HD inline
#define DWCONV_UNROLL
#endif

namespace fused_mbconv {

constexpr int kThreads = 256;  // threads per block of every tiled kernel
// Tiles to aim for: one wave of 256-thread blocks at full occupancy on up to ~256 SMs.
constexpr int64_t kTargetTiles = 2048;
constexpr int kMaxGrid = 65535;  // the kernels loop over tiles, so any grid size is correct
// Minimum pixels per lane and tile (see make_tiling): the reducing kernels write one partial
// result (3, 2 or k*k floats) per tile and channel, so their tiles are longer.
constexpr int kApplyMinPixelsPerLane = 4;
constexpr int kReduceMinPixelsPerLane = 8;

// The work of a kernel is (channel group, image n, chunk of the image's pixels) tiles, one block
// at a time; inside a block, thread -> (channel lane, pixel lane). A channel lane covers `vec`
// consecutive channels; the pixel lanes of one channel lane stride through the chunk. Reductions
// over the pixels of a tile end in one partial result per (row = (n, chunk), channel).
struct Tiling {
  int vec;              // channels per channel lane (16-byte vectors, or 1)
  int cpb;              // channel lanes per block, a power of two
  int lanes;            // pixel lanes per block: kThreads / cpb, a power of two
  bool channels_inner;  // thread order channel-fastest (channels innermost in memory) or pixel-fastest
  int pixels;           // pixels of one image plane of the iterated space (input or output)
  int chunk_len;        // pixels per tile, a multiple of lanes
  int chunks;           // chunks per image
  int64_t channel_groups, rows, tiles;  // rows = batch * chunks; tiles = channel_groups * rows
};

struct TileCoord {
  int64_t group, row, n;  // channel group, partial-result row, image
  int begin, end;         // pixel range [begin, end) of the image plane
};

struct LaneCoord {
  int channel, pixel;  // channel lane in [0, cpb), pixel lane in [0, lanes)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int pow2_ceil(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

// min_pixels_per_lane keeps tiles long enough that per-tile partial results stay small next to
// the data they summarise. `pixels` must stay below 2^30 (checked by the host) so that pixel
// indices and chunk bounds fit an int.
inline Tiling make_tiling(int64_t batch, int64_t channels, int pixels, int vec, bool channels_inner,
                          int min_pixels_per_lane) {
  Tiling t{};
  t.vec = vec;
  t.channels_inner = channels_inner;
  t.pixels = pixels;
  const int64_t channel_lanes = ceil_div(channels, vec);
  if (channels_inner) {
    // a warp spans up to 32 neighbouring channel lanes: contiguous in channels_last memory
    t.cpb = channel_lanes < 32 ? pow2_ceil(channel_lanes) : 32;
    t.lanes = kThreads / t.cpb;
  } else {
    // a warp spans 32+ neighbouring pixels of one channel; small images share a block
    const int lanes = pow2_ceil(pixels);
    t.lanes = lanes < 32 ? 32 : (lanes > kThreads ? kThreads : lanes);
    t.cpb = kThreads / t.lanes;
  }
  t.channel_groups = ceil_div(channel_lanes, t.cpb);
  const int64_t lane_rounds = ceil_div(pixels, t.lanes);  // pixels per lane if one chunk per image
  int64_t per_lane = ceil_div(t.channel_groups * batch * lane_rounds, kTargetTiles);
  if (per_lane < min_pixels_per_lane) per_lane = min_pixels_per_lane;
  if (per_lane > lane_rounds) per_lane = lane_rounds;
  t.chunk_len = static_cast<int>(per_lane * t.lanes);
  t.chunks = static_cast<int>(ceil_div(pixels, t.chunk_len));
  t.rows = batch * t.chunks;
  t.tiles = t.channel_groups * t.rows;
  return t;
}

inline unsigned grid_size(int64_t tiles) {
  return static_cast<unsigned>(tiles < kMaxGrid ? tiles : kMaxGrid);
}

// Tiles are numbered group-major, so a block striding through them changes channel group (and
// restages that group's weights) rarely.
DWCONV_HD TileCoord decode_tile(const Tiling& t, int64_t tile) {
  TileCoord c;
  c.group = tile / t.rows;
  c.row = tile - c.group * t.rows;
  c.n = c.row / t.chunks;
  const int chunk = static_cast<int>(c.row - c.n * t.chunks);
  c.begin = chunk * t.chunk_len;
  c.end = t.pixels - c.begin < t.chunk_len ? t.pixels : c.begin + t.chunk_len;
  return c;
}

DWCONV_HD LaneCoord lane_of(const Tiling& t, int thread) {
  if (t.channels_inner) return {thread % t.cpb, thread / t.cpb};
  return {thread / t.lanes, thread % t.lanes};
}

// first channel of a thread's lane in a tile; the lane is idle when it is >= channels
DWCONV_HD int64_t first_channel(const Tiling& t, const TileCoord& tc, const LaneCoord& lane) {
  return (tc.group * t.cpb + lane.channel) * t.vec;
}

// Transposed convolution as a gather: output row o reads input row i through kernel row k when
// o * STRIDE + k = i + pad. Returns that o, or -1 when there is none (i + pad - k negative, not a
// multiple of the stride, or past the last output row).
template <int STRIDE>
DWCONV_HD int source_output(int i, int pad, int k, int out_size) {
  const int t = i + pad - k;
  if (t < 0 || t % STRIDE != 0) return -1;
  const int o = t / STRIDE;
  return o < out_size ? o : -1;
}

// Calls f(tap, oh, ow) for each kernel tap (kh * K + kw) through which an output reads input
// pixel (ih, iw): the (output, tap) pairs of dx[ih, iw] and of x[ih, iw]'s part of dweight.
template <int K, int STRIDE, typename F>
DWCONV_HD void for_each_reader(int ih, int iw, int pad_top, int pad_left, int out_h, int out_w, F&& f) {
  DWCONV_UNROLL
  for (int kh = 0; kh < K; ++kh) {
    const int oh = source_output<STRIDE>(ih, pad_top, kh, out_h);
    if (oh < 0) continue;
    DWCONV_UNROLL
    for (int kw = 0; kw < K; ++kw) {
      const int ow = source_output<STRIDE>(iw, pad_left, kw, out_w);
      if (ow < 0) continue;
      f(kh * K + kw, oh, ow);
    }
  }
}

// Running (count, mean, M2) of a set of values, M2 = sum of squared deviations from the mean.
// Welford's update and Chan's merge never form E[c^2] - E[c]^2, which cancels catastrophically in
// fp32 when the mean is large against the spread. A plain aggregate so it can live in __shared__.
struct Welford {
  float count, mean, m2;

  DWCONV_HD void add(float v) {
    count += 1.f;
    const float d = v - mean;
    mean += d / count;
    m2 += d * (v - mean);
  }

  // Chan et al.: with d = mean_b - mean_a and n = n_a + n_b,
  // mean = mean_a + d * n_b / n,  M2 = M2_a + M2_b + d^2 * n_a * n_b / n
  DWCONV_HD static Welford merge(const Welford& a, const Welford& b) {
    const float count = a.count + b.count;
    if (count == 0.f) return a;
    const float d = b.mean - a.mean, fb = b.count / count;
    return {count, a.mean + d * fb, a.m2 + b.m2 + d * d * a.count * fb};
  }
};

}  // namespace fused_mbconv
