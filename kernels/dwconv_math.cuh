// Index arithmetic and statistics shared by the host, the kernels and the CPU tests: how the
// work of a kernel is cut into tiles and threads (pixel chunks for the squeeze-excite kernels,
// halo and gather tiles for the depthwise ones), which output a transposed-conv gather reads, and
// the Welford/Chan merge of (count, mean, M2). Plain C++ (no CUDA headers) so
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

constexpr int kThreads = 256;  // threads per block of the tiled kernels (at most, for halo tiles)
// Tiles to aim for: one wave of 256-thread blocks at full occupancy on up to ~256 SMs.
constexpr int64_t kTargetTiles = 2048;
constexpr int kMaxGrid = 65535;  // the kernels loop over tiles, so any grid size is correct
// Minimum pixels per lane and tile (see make_tiling): the reducing squeeze-excite kernels write
// one partial result per tile and channel, so their tiles are longer.
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

// A capped grid of halo or gather tiles is a multiple of the channel groups: a block striding
// through the tiles (numbered group fastest, see locate_tile) then keeps one group and stages its
// weights once.
inline unsigned halo_grid_size(int64_t tiles, int64_t channel_groups) {
  if (tiles <= kMaxGrid || channel_groups > kMaxGrid) return grid_size(tiles);
  return static_cast<unsigned>(kMaxGrid / channel_groups * channel_groups);
}

// Tiles are numbered group-major. Unlike the halo tiles' (locate_tile), these groups are wide
// enough for that to cost little: with 16-byte vectors a group is 32 lanes of 16 bytes, 512
// contiguous bytes of a channels_last pixel, whole DRAM lines but at its ends (B5's 144 channels
// fit one group).
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

// Halo tiles: how the kernels that compute conv(x) at output pixels (apply, statistics, backward
// sums) cut their work. A tile is (channel group, image, tile_h x tile_w outputs); its block stages
// the inputs those outputs read, a patch of ((tile_h - 1) * stride + k) x ((tile_w - 1) * stride + k)
// pixels with its halo, once in shared memory as fp32, and each thread then computes a strip of
// kStrip outputs along a row for kLaneChannels channels from there. So x is read from global memory
// about once (1 + halo) instead of k*k times per output, and a patch row loaded into registers
// feeds kStrip outputs.
constexpr int kStrip = 4;
constexpr int kLaneChannels = 4;  // fp32 channels of a compute lane: one 16-byte shared load
constexpr int kHaloTileH = 8, kHaloTileW = 16;  // outputs per tile

struct HaloTiling {
  int group;            // channels per tile (a power of two, 4 to 32)
  int lanes;            // channel lanes: group / kLaneChannels
  int strips;           // strips per tile: tile_h * tile_w / kStrip (strip s: row s % tile_h)
  int threads;          // lanes * strips, at most kThreads
  int tile_h, tile_w;   // outputs per tile
  int patch_h, patch_w;  // staged input pixels
  int pixel_stride;     // floats between neighbouring staged pixels: group + 4 (see make_halo_tiling)
  int tiles_h, tiles_w;  // tiles per image
  int in_tile_h, in_tile_w;  // gather tilings only: input pixels per tile (what tiles_h, tiles_w count)
  int dweight_parts;         // gather tilings only: row parts of the tile that sum dweight side by side
  bool channels_inner;  // staging order: channels fastest (channels_last) or pixels fastest
  int64_t channel_groups, rows, tiles;  // rows = batch * tiles_h * tiles_w; tiles = channel_groups * rows
};

// Stride 2 reads four times the inputs per output: its tiles take 16 channels, not 32, so that the
// patch stays within ~55 KB of shared memory. The pixel stride group + 4 keeps each staged pixel
// 16-byte aligned and spreads a warp's stores of neighbouring pixels over all banks.
// The fields both tilings share: channel groups of up to max_group channels, halo tiles of
// tile_h x tile_w outputs (strips of kStrip along a row) and their patches, and a grid of tiles
// stepping step_h x step_w pixels over a plane_h x plane_w plane (outputs, or inputs for gathers).
inline HaloTiling tile_grid(int64_t batch, int64_t channels, int max_group, int tile_h, int tile_w, int k, int stride,
                            int plane_h, int plane_w, int step_h, int step_w, bool channels_inner) {
  HaloTiling t{};
  t.group = channels < max_group ? pow2_ceil(channels) : max_group;
  if (t.group < kLaneChannels) t.group = kLaneChannels;
  t.lanes = t.group / kLaneChannels;
  t.tile_h = tile_h;
  t.tile_w = tile_w;
  t.strips = t.tile_h * t.tile_w / kStrip;
  t.threads = t.lanes * t.strips;
  t.patch_h = (t.tile_h - 1) * stride + k;
  t.patch_w = (t.tile_w - 1) * stride + k;
  t.pixel_stride = t.group + 4;
  t.tiles_h = static_cast<int>(ceil_div(plane_h, step_h));
  t.tiles_w = static_cast<int>(ceil_div(plane_w, step_w));
  t.channels_inner = channels_inner;
  t.channel_groups = ceil_div(channels, t.group);
  t.rows = batch * t.tiles_h * t.tiles_w;
  t.tiles = t.channel_groups * t.rows;
  return t;
}

// Planes at most half a tile wide (the last stages of B0 and B1: 7 and 8 pixels) take tiles half
// as wide: 7 x 7 outputs fill 49 of 64 lanes' outputs, not of 128.
inline HaloTiling make_halo_tiling(int64_t batch, int64_t channels, int out_h, int out_w, int k, int stride,
                                   bool channels_inner) {
  const int tile_w = out_w <= kHaloTileW / 2 ? kHaloTileW / 2 : kHaloTileW;
  return tile_grid(batch, channels, stride == 1 ? 32 : 16, kHaloTileH, tile_w, k, stride, out_h, out_w, kHaloTileH,
                   tile_w, channels_inner);
}

// Shared memory of a halo kernel: the group's weights ([tap][channel]), then the patch, whose
// space the block reduction's kThreads states of state_bytes reuse once the patch is consumed.
inline size_t halo_smem_bytes(const HaloTiling& t, int k, size_t state_bytes) {
  const size_t patch = sizeof(float) * t.patch_h * t.patch_w * t.pixel_stride;
  const size_t reduction = state_bytes * t.threads;
  return sizeof(float) * k * k * t.group + (patch > reduction ? patch : reduction);
}

struct HaloTile {
  int64_t group, row, n;  // channel group, partial-result row, image
  int oh0, ow0;           // first output pixel (negative in gather tiles at the top and left)
  int ih0, iw0;           // gather tiles: first input pixel
};

// Tiles are numbered channel group fastest, then row-major in the image: a tile's group, row and
// image, and its (row, column) in the image's grid of tiles. Why group fastest: in channels_last
// memory a group's slice of a pixel is 32 or 64 bytes of its C * element-size bytes (288 at B5's
// 144 channels, bf16), so the blocks of one group fetch pieces of DRAM lines; numbered
// group-major, the blocks that run at once were all of one group, and the rest of each line was
// evicted from L2 long before its group's turn came. Group fastest, the blocks that share a
// pixel run side by side and the line is read from DRAM once. (The H200, 2026-11-27: the apply
// kernel at B5's c144 k3 s2 layer reached 18.5% of the bandwidth floor group-major.)
DWCONV_HD HaloTile locate_tile(const HaloTiling& t, int64_t tile, int& grid_row, int& grid_col) {
  HaloTile c{};
  c.row = tile / t.channel_groups;
  c.group = tile - c.row * t.channel_groups;
  const int64_t per_image = static_cast<int64_t>(t.tiles_h) * t.tiles_w;
  c.n = c.row / per_image;
  const int in_image = static_cast<int>(c.row - c.n * per_image);
  grid_row = in_image / t.tiles_w;
  grid_col = in_image - grid_row * t.tiles_w;
  return c;
}

DWCONV_HD HaloTile decode_halo_tile(const HaloTiling& t, int64_t tile) {
  int grid_row, grid_col;
  HaloTile c = locate_tile(t, tile, grid_row, grid_col);
  c.oh0 = grid_row * t.tile_h;
  c.ow0 = grid_col * t.tile_w;
  return c;
}

// Gather tiles: the work of the backward's pass 2 (dx, dweight), over input pixels. A tile is
// in_tile_h x in_tile_w input pixels of a channel group; its halo tile (tile_h x tile_w, the fields
// the halo kernels use) is every output that reads one of them through some tap, and its patch the
// inputs those outputs read. The block computes dc once at each of those outputs, into shared
// memory, and gathers dx and the dweight sums from there: a tile's outputs overlap its neighbours'
// by the halo, (tile_h * tile_w) / (in_tile_h * in_tile_w) ~ 1.9 computations of dc per output at
// k5 s1, not the k*k / stride^2 = 25 of gathering from global memory. 16 channels a group: the
// patch and the dc tile share ~52 KB of shared memory at k5 s1.
DWCONV_HD int ceil_div_signed(int a, int b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

inline HaloTiling make_gather_tiling(int64_t batch, int64_t channels, int in_h, int in_w, int k, int stride,
                                     bool channels_inner) {
  // kHaloTileH x kHaloTileW inputs are read by at most (that + k - 2) / stride + 1 outputs an axis
  const int tile_h = (kHaloTileH + k - 2) / stride + 1;
  const int tile_w = static_cast<int>(ceil_div((kHaloTileW + k - 2) / stride + 1, kStrip)) * kStrip;
  HaloTiling t = tile_grid(batch, channels, 16, tile_h, tile_w, k, stride, in_h, in_w, kHaloTileH, kHaloTileW,
                           channels_inner);
  t.in_tile_h = kHaloTileH;
  t.in_tile_w = kHaloTileW;
  t.threads = kThreads;  // the three phases loop over their own work items
  // (channel lane, tap) pairs alone would leave most threads idle in the dweight phase (36 of 256
  // at k3): split the tile's rows into parts, each summed by its own thread, up to kThreads items
  t.dweight_parts = 1;
  while (t.dweight_parts * 2 <= t.in_tile_h && t.lanes * k * k * t.dweight_parts * 2 <= kThreads) t.dweight_parts *= 2;
  return t;
}

// weights, patch, the dc tile, then the dweight parts ([part][tap][channel])
inline size_t gather_smem_bytes(const HaloTiling& t, int k) {
  return sizeof(float) * (k * k * t.group * (1 + t.dweight_parts) +
                          (t.patch_h * t.patch_w + t.tile_h * t.tile_w) * t.pixel_stride);
}

// The gather tile's inputs, and its first output: the first that reads input row ih0 (column iw0),
// through the last tap: ceil((ih0 + pad - (k - 1)) / stride).
DWCONV_HD HaloTile decode_gather_tile(const HaloTiling& t, int64_t tile, int k, int stride, int pad_top, int pad_left) {
  int grid_row, grid_col;
  HaloTile c = locate_tile(t, tile, grid_row, grid_col);
  c.ih0 = grid_row * t.in_tile_h;
  c.iw0 = grid_col * t.in_tile_w;
  c.oh0 = ceil_div_signed(c.ih0 + pad_top - (k - 1), stride);
  c.ow0 = ceil_div_signed(c.iw0 + pad_left - (k - 1), stride);
  return c;
}

// The output that reads input i (a row or a column) through tap k, relative to the gather tile's
// first output o0, or -1 when stride does not divide (i + pad - k).
template <int STRIDE>
DWCONV_HD int gather_source(int i, int pad, int k, int o0) {
  const int t = i + pad - k;  // may be negative: then t & 1 is still its parity
  if (STRIDE == 2 && (t & 1)) return -1;
  return t / STRIDE - o0;
}

struct HaloLane {
  int channel;     // channel lane: channels channel * kLaneChannels + [0, kLaneChannels) of the group
  int strip;       // in [0, strips): the reductions' pixel lane
  int row, col0;   // the strip's first output in the tile: row, column
};

// Channel lanes fastest: a quarter warp's 16-byte shared loads cover one pixel's 128 contiguous
// bytes (32 channels) or two pixels a patch row apart (16 channels: the row stride, 20 floats
// times an odd patch width, puts them on the other half of the banks).
DWCONV_HD HaloLane halo_lane(const HaloTiling& t, int thread) {
  HaloLane l;
  l.channel = thread % t.lanes;
  l.strip = thread / t.lanes;
  l.row = l.strip % t.tile_h;
  l.col0 = (l.strip / t.tile_h) * kStrip;
  return l;
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
