// CPU harness for tests/test_cuda_index_math.py: runs the CUDA kernels' own index arithmetic and
// statistics (kernels/dwconv_math.cuh, compiled here as plain C++) the way the kernels use them,
// so the tiling, the transposed-conv gather and the Welford/Chan merges are checked without a GPU.
//
//   harness tiling N C PIXELS VEC CHANNELS_INNER MIN_PIXELS_PER_LANE
//       enumerates every (block, tile, thread) as the tiled kernels do; prints "ok ..." when each
//       (image, channel, pixel) is visited once and each (row, channel) partial is written once.
//   harness halo N C OUT_H OUT_W K STRIDE
//       enumerates every (block, halo tile, thread, strip output) as the halo kernels do; prints
//       "ok ..." when each (image, channel, output pixel) is computed once, each strip reads inside
//       the staged patch, each (row, channel) partial is written once, and each block keeps one
//       channel group.
//   harness gather K STRIDE H W PAD_TOP PAD_LEFT OUT_H OUT_W  < weight(K*K) dc(OUT_H*OUT_W) x(H*W)
//       prints dx (H*W) then dweight (K*K) of one channel, gathered tile by tile as the backward's
//       pass 2 does: dc copied into each gather tile's halo tile (0 outside the output plane), x
//       into its patch, every index checked to fall inside them.
//   harness welford LANES ROWS < values
//       splits the values into ROWS contiguous rows, each reduced by LANES strided Welford lanes
//       merged by reduce_lanes' tree, then merges the rows as the combine kernel does; prints
//       mean and biased variance.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dwconv_math.cuh"

using namespace fused_mbconv;

namespace {

int fail(const char* what, long long a, long long b) {
  std::printf("error: %s (%lld, %lld)\n", what, a, b);
  return 1;
}

bool is_pow2(int v) { return v > 0 && (v & (v - 1)) == 0; }

int run_tiling(int64_t batch, int64_t channels, int pixels, int vec, bool inner, int min_ppl) {
  const Tiling t = make_tiling(batch, channels, pixels, vec, inner, min_ppl);
  if (!is_pow2(t.cpb) || !is_pow2(t.lanes) || t.cpb * t.lanes != kThreads) return fail("lanes", t.cpb, t.lanes);
  if (t.chunk_len % t.lanes != 0 || t.chunk_len < t.lanes) return fail("chunk_len", t.chunk_len, t.lanes);
  if (inner && t.cpb > 32) return fail("channel lanes per warp", t.cpb, 32);
  if (!inner && t.lanes < 32) return fail("pixel lanes per warp", t.lanes, 32);
  std::vector<unsigned char> visits(static_cast<size_t>(batch * channels * pixels), 0);
  std::vector<unsigned char> writes(static_cast<size_t>(t.rows * channels), 0);
  std::vector<unsigned char> tile_seen(static_cast<size_t>(t.tiles), 0);
  const unsigned grid = grid_size(t.tiles);
  for (unsigned block = 0; block < grid; ++block) {
    for (int64_t tile = block; tile < t.tiles; tile += grid) {  // the kernels' grid-stride loop
      if (tile_seen[tile]++) return fail("tile visited twice", tile, block);
      const TileCoord tc = decode_tile(t, tile);
      if (tc.n < 0 || tc.n >= batch || tc.row < 0 || tc.row >= t.rows) return fail("tile row", tc.n, tc.row);
      if (tc.begin < 0 || tc.begin >= tc.end || tc.end > pixels) return fail("tile range", tc.begin, tc.end);
      if (tc.row != tc.n * t.chunks + tc.begin / t.chunk_len) return fail("row of tile", tc.row, tile);
      for (int thread = 0; thread < kThreads; ++thread) {
        const LaneCoord lane = lane_of(t, thread);
        if (lane.channel < 0 || lane.channel >= t.cpb || lane.pixel < 0 || lane.pixel >= t.lanes)
          return fail("lane", lane.channel, lane.pixel);
        const int64_t c0 = first_channel(t, tc, lane);
        if (c0 >= channels) continue;  // idle lane
        for (int v = 0; v < vec; ++v) {
          if (c0 + v >= channels) return fail("vector past the last channel", c0, v);
          for (int q = tc.begin + lane.pixel; q < tc.end; q += t.lanes) {
            if (visits[(tc.n * channels + c0 + v) * pixels + q]++) return fail("pixel visited twice", c0 + v, q);
          }
          if (lane.pixel == 0 && writes[tc.row * channels + c0 + v]++) return fail("partial written twice", tc.row, c0);
        }
      }
    }
  }
  for (size_t i = 0; i < visits.size(); ++i)
    if (visits[i] != 1) return fail("pixel not visited", static_cast<long long>(i), visits[i]);
  for (size_t i = 0; i < writes.size(); ++i)
    if (writes[i] != 1) return fail("partial not written", static_cast<long long>(i), writes[i]);
  for (size_t i = 0; i < tile_seen.size(); ++i)
    if (tile_seen[i] != 1) return fail("tile not visited", static_cast<long long>(i), 0);
  std::printf("ok tiles=%lld rows=%lld cpb=%d lanes=%d chunk_len=%d\n", static_cast<long long>(t.tiles),
              static_cast<long long>(t.rows), t.cpb, t.lanes, t.chunk_len);
  return 0;
}

std::vector<double> read_values(size_t count) {
  std::vector<double> v(count);
  for (double& e : v)
    if (std::scanf("%lf", &e) != 1) std::exit(fail("short input", static_cast<long long>(count), 0));
  return v;
}

int run_halo(int64_t batch, int64_t channels, int out_h, int out_w, int k, int stride) {
  const HaloTiling t = make_halo_tiling(batch, channels, out_h, out_w, k, stride, true);
  if (t.lanes * t.strips != t.threads || t.threads > kThreads || !is_pow2(t.strips) || !is_pow2(t.lanes))
    return fail("threads", t.lanes, t.strips);
  if (halo_smem_bytes(t, k, 64) > 227 * 1024) return fail("shared memory", halo_smem_bytes(t, k, 64), k);
  const int span = (kStrip - 1) * stride + k;
  std::vector<unsigned char> visits(static_cast<size_t>(batch * channels * out_h * out_w), 0);
  std::vector<unsigned char> writes(static_cast<size_t>(t.rows * channels), 0);
  const unsigned grid = halo_grid_size(t.tiles, t.channel_groups);
  for (unsigned block = 0; block < grid; ++block) {
    const int64_t first_group = decode_halo_tile(t, block).group;
    for (int64_t tile = block; tile < t.tiles; tile += grid) {
      const HaloTile tc = decode_halo_tile(t, tile);
      if (tc.n < 0 || tc.n >= batch || tc.oh0 >= out_h || tc.ow0 >= out_w) return fail("tile", tc.oh0, tc.ow0);
      if (tc.group != first_group) return fail("block changes channel group", block, tile);
      // consecutive tiles, which run side by side, are the groups of one pixel tile
      if (tile % t.channel_groups != tc.group) return fail("groups not fastest", tile, tc.group);
      for (int thread = 0; thread < t.threads; ++thread) {
        const HaloLane lane = halo_lane(t, thread);
        if ((lane.row * stride + k - 1) >= t.patch_h || (lane.col0 * stride + span - 1) >= t.patch_w)
          return fail("strip reads past the patch", lane.row, lane.col0);
        for (int v = 0; v < kLaneChannels; ++v) {
          const int64_t c = tc.group * t.group + lane.channel * kLaneChannels + v;
          if (c >= channels) continue;
          for (int j = 0; j < kStrip; ++j) {
            const int oh = tc.oh0 + lane.row, ow = tc.ow0 + lane.col0 + j;
            if (oh >= out_h || ow >= out_w) continue;
            if (visits[((tc.n * channels + c) * out_h + oh) * out_w + ow]++) return fail("output twice", oh, ow);
          }
          if (lane.strip == 0 && writes[tc.row * channels + c]++) return fail("partial twice", tc.row, c);
        }
      }
    }
  }
  for (size_t i = 0; i < visits.size(); ++i)
    if (visits[i] != 1) return fail("output not computed", static_cast<long long>(i), visits[i]);
  for (size_t i = 0; i < writes.size(); ++i)
    if (writes[i] != 1) return fail("partial not written", static_cast<long long>(i), writes[i]);
  std::printf("ok tiles=%lld group=%d threads=%d smem=%zu\n", static_cast<long long>(t.tiles), t.group, t.threads,
              halo_smem_bytes(t, k, 64));
  return 0;
}

template <int K, int STRIDE>
int run_gather(int h, int w, int pad_top, int pad_left, int out_h, int out_w) {
  const std::vector<double> weight = read_values(K * K), dc = read_values(static_cast<size_t>(out_h) * out_w),
                            x = read_values(static_cast<size_t>(h) * w);
  std::vector<double> dx(static_cast<size_t>(h) * w, 0.0), dweight(K * K, 0.0);
  const HaloTiling t = make_gather_tiling(1, 1, h, w, K, STRIDE, true);
  if (gather_smem_bytes(t, K) > 227 * 1024) return fail("shared memory", gather_smem_bytes(t, K), K);
  for (int64_t tile = 0; tile < t.tiles; ++tile) {
    const HaloTile tc = decode_gather_tile(t, tile, K, STRIDE, pad_top, pad_left);
    // phase 1's dc tile (0 outside the output plane) and the staged patch (0 outside the image)
    std::vector<double> dc_tile(static_cast<size_t>(t.tile_h) * t.tile_w, 0.0);
    std::vector<double> patch(static_cast<size_t>(t.patch_h) * t.patch_w, 0.0);
    for (int r = 0; r < t.tile_h; ++r)
      for (int q = 0; q < t.tile_w; ++q) {
        const int oh = tc.oh0 + r, ow = tc.ow0 + q;
        if (oh >= 0 && oh < out_h && ow >= 0 && ow < out_w) dc_tile[r * t.tile_w + q] = dc[oh * out_w + ow];
      }
    const int ih_patch = tc.oh0 * STRIDE - pad_top, iw_patch = tc.ow0 * STRIDE - pad_left;
    for (int pr = 0; pr < t.patch_h; ++pr)
      for (int pc = 0; pc < t.patch_w; ++pc) {
        const int ih = ih_patch + pr, iw = iw_patch + pc;
        if (ih >= 0 && ih < h && iw >= 0 && iw < w) patch[pr * t.patch_w + pc] = x[ih * w + iw];
      }
    for (int ih = tc.ih0; ih < tc.ih0 + t.in_tile_h; ++ih) {
      for (int iw = tc.iw0; iw < tc.iw0 + t.in_tile_w; ++iw) {
        const int pr = ih - ih_patch, pc = iw - iw_patch;
        if (pr < 0 || pr >= t.patch_h || pc < 0 || pc >= t.patch_w) return fail("input outside the patch", ih, iw);
        double acc = 0.0;
        for (int kh = 0; kh < K; ++kh) {
          const int r = gather_source<STRIDE>(ih, pad_top, kh, tc.oh0);
          if (r < 0) continue;
          if (r >= t.tile_h) return fail("output row outside the halo tile", ih, kh);
          for (int kw = 0; kw < K; ++kw) {
            const int q = gather_source<STRIDE>(iw, pad_left, kw, tc.ow0);
            if (q < 0) continue;
            if (q >= t.tile_w) return fail("output column outside the halo tile", iw, kw);
            const double g = dc_tile[r * t.tile_w + q];
            acc += g * weight[kh * K + kw];  // phase 2
            dweight[kh * K + kw] += g * patch[pr * t.patch_w + pc];  // phase 3
          }
        }
        if (ih < h && iw < w) dx[static_cast<size_t>(ih) * w + iw] = acc;
      }
    }
  }
  for (double v : dx) std::printf("%.17g\n", v);
  for (double v : dweight) std::printf("%.17g\n", v);
  return 0;
}

// reduce_lanes' tree over `lanes` states: for s = lanes/2 .. 1, state[l] = merge(state[l], state[l + s])
Welford tree(std::vector<Welford> s) {
  for (size_t half = s.size() / 2; half > 0; half /= 2)
    for (size_t l = 0; l < half; ++l) s[l] = Welford::merge(s[l], s[l + half]);
  return s[0];
}

int run_welford(int lanes, int rows) {
  std::vector<float> values;
  double v;
  while (std::scanf("%lf", &v) == 1) values.push_back(static_cast<float>(v));
  const size_t per_row = (values.size() + rows - 1) / rows;
  std::vector<Welford> partial;
  for (int r = 0; r < rows; ++r) {  // the stats kernel: one tile per row
    std::vector<Welford> lane(lanes, Welford{0.f, 0.f, 0.f});
    const size_t end = values.size() < (r + 1) * per_row ? values.size() : (r + 1) * per_row;
    for (size_t i = r * per_row; i < end; ++i) lane[(i - r * per_row) % lanes].add(values[i]);
    partial.push_back(tree(lane));
  }
  const int row_lanes = kThreads / 32;  // the combine kernel: strided fold per row lane, then the tree
  std::vector<Welford> folded(row_lanes, Welford{0.f, 0.f, 0.f});
  for (int r = 0; r < rows; ++r) folded[r % row_lanes] = Welford::merge(folded[r % row_lanes], partial[r]);
  const Welford s = tree(folded);
  std::printf("%.9g %.9g %.9g\n", s.count, s.mean, s.m2 / s.count);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 8 && std::strcmp(argv[1], "tiling") == 0) {
    return run_tiling(std::atoll(argv[2]), std::atoll(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]),
                      std::atoi(argv[6]) != 0, std::atoi(argv[7]));
  }
  if (argc >= 8 && std::strcmp(argv[1], "halo") == 0) {
    return run_halo(std::atoll(argv[2]), std::atoll(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]),
                    std::atoi(argv[6]), std::atoi(argv[7]));
  }
  if (argc >= 10 && std::strcmp(argv[1], "gather") == 0) {
    const int k = std::atoi(argv[2]), stride = std::atoi(argv[3]);
    int a[6];
    for (int i = 0; i < 6; ++i) a[i] = std::atoi(argv[4 + i]);
    if (k == 3 && stride == 1) return run_gather<3, 1>(a[0], a[1], a[2], a[3], a[4], a[5]);
    if (k == 3 && stride == 2) return run_gather<3, 2>(a[0], a[1], a[2], a[3], a[4], a[5]);
    if (k == 5 && stride == 1) return run_gather<5, 1>(a[0], a[1], a[2], a[3], a[4], a[5]);
    if (k == 5 && stride == 2) return run_gather<5, 2>(a[0], a[1], a[2], a[3], a[4], a[5]);
  }
  if (argc >= 4 && std::strcmp(argv[1], "welford") == 0) return run_welford(std::atoi(argv[2]), std::atoi(argv[3]));
  std::fprintf(stderr, "usage: see the header comment of %s\n", __FILE__);
  return 2;
}
