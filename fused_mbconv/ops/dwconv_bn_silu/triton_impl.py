"""Triton backend of the fused depthwise conv + BatchNorm + SiLU ops (see ``__init__``).

Every kernel works on tiles of BLOCK_P spatial positions x BLOCK_C channels: in channels_last
the channels are the contiguous axis, so each row of a tile is one vector load. The positions of
a tile are a (BLOCK_P // TILE_W) x TILE_W rectangle of one sample's plane: a k x k conv reads
each input row and column of the tile's halo once per tap from L1, and a square tile has the
smallest halo (8 x 8 outputs of a 5 x 5 conv read 12 x 12 inputs, where 64 outputs along a row
read 5 x 68); TILE_W is autotuned with the tile size. Other layouts (NCHW, sliced views) take
their strides from the tensor; nothing is copied. Math is fp32 for
fp32/fp16/bf16 inputs; calls with fp64 tensors run the reference implementation (fp64 math).

Memory passes (x: input, y: output, dy: grad of y, dc: grad of the conv output):

- inference forward: one pass, reads x, writes y (and the squeeze from the same registers);
- training forward: pass 1 reads x for the batch statistics, pass 2 reads x again and writes y;
- backward: [training only] pass 1 reads x, dy for the two per-channel sums of the BN backward;
  pass 2 reads x, dy and writes dc (and the dweight partial sums); pass 3 reads dc, writes dx.
  The conv output and the pre-activation are recomputed, never stored.

Reductions over positions are deterministic: the tiles are cut into ``groups`` chunks, each
program loops over one chunk and writes one partial per channel, and a small kernel combines
the partials. Only the squeeze is summed with atomics (fp32, one add per tile and channel).

Kernels run on the current CUDA stream and allocate through torch, so they can be captured in a
CUDA graph once every shape has been autotuned (run the model once before capturing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fused_mbconv._checks import empty_like_layout
from fused_mbconv.ops._triton import autotune, cast, chan_merge, merge_rows, multiprocessors, sum_rows, triton_entry
from fused_mbconv.ops.dwconv_bn_silu import IMPLS, output_size, reference

# The per-chunk statistics are merged BLOCK_G chunks at a time, BLOCK_L channels per program.
BLOCK_G, BLOCK_L = 32, 128
# A reduction's program takes at least this many output positions on average.
MIN_CHUNK = 256


# ---------------------------------------------------------------------------------------------
# configurations


def _tile_configs(gpu_configs: Sequence[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_P, BLOCK_C, num_warps, TILE_W) as autotune configs."""
    return [triton.Config({"BLOCK_P": p, "BLOCK_C": c, "TILE_W": tw}, num_warps=w) for p, c, w, tw in gpu_configs]


def _prune(width: str):
    """Drop configs whose channel block is wider than the channels or whose tile is wider than
    the plane (``width`` names the kernel's plane-width argument): masked lanes do no work."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        widest_c, widest_w = triton.next_power_of_2(args["C"]), triton.next_power_of_2(args[width])
        kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_C"] <= widest_c and cfg.kwargs["TILE_W"] <= widest_w]
        return kept or [min(configs, key=lambda cfg: (cfg.kwargs["BLOCK_C"], cfg.kwargs["TILE_W"]))]

    return prune


# 16 elements per thread: the K unrolled taps of a row keep loads in flight, and bigger tiles
# spill registers (ptxas, sm_90). Square-ish tiles (least halo): a tile along a row, 64 x 1
# (the first design), took 190-255 registers a thread where 8 x 8 takes 80-125, and spilled in
# the backward (bench/results/triton_sm90_registers.md). Few configs: each is compiled per
# kernel specialization.
_TILE_CONFIGS = _tile_configs([(64, 32, 4, 8), (64, 32, 4, 16), (128, 32, 8, 16), (32, 64, 4, 8), (64, 64, 8, 8)])
# The interpreter pays per operation, not per element, so fewer, bigger tiles run faster; 16 x 8
# tiles have masked rows and columns on the test shapes.
_TILE_INTERPRETED = _tile_configs([(128, 32, 1, 8)])[0]
_TILE_KEY = ["C", "H_OUT", "W_OUT", "K", "STRIDE"]
# Plane sizes, paddings and counts are not specialized on (value 1, divisibility by 16): each
# distinct pattern would compile every config anew, and they guide no vectorization; the channel
# count and the strides (contiguity and alignment of the channel vectors) are.
_PLANE = ["H", "W", "H_OUT", "W_OUT", "pad_t", "pad_l"]


def _autotune(key=_TILE_KEY, width="W_OUT", **kwargs):
    return autotune(_TILE_CONFIGS, key, interpreted=_TILE_INTERPRETED, prune=_prune(width), **kwargs)


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _tile(t, H, W, BLOCK_P: tl.constexpr, TILE_W: tl.constexpr):
    """Tile t of an (N, H, W) position grid cut into (BLOCK_P // TILE_W) x TILE_W rectangles,
    sample by sample: its sample n (a scalar), the positions' (h, w) and the in-plane mask."""
    TILE_H: tl.constexpr = BLOCK_P // TILE_W
    tiles_w = tl.cdiv(W, TILE_W)
    per_sample = tl.cdiv(H, TILE_H) * tiles_w
    n = t // per_sample
    r = t - n * per_sample
    th = r // tiles_w
    i = tl.arange(0, BLOCK_P)
    h = th * TILE_H + i // TILE_W
    w = (r - th * tiles_w) * TILE_W + i % TILE_W
    return n, h, w, (h < H) & (w < W)


@triton.jit
def _tile_count(N, H, W, BLOCK_P: tl.constexpr, TILE_W: tl.constexpr):
    return N * tl.cdiv(H, BLOCK_P // TILE_W) * tl.cdiv(W, TILE_W)


@triton.jit
def _tile_offsets(n, h, w, cs, strides):
    """int64 element offsets of a (positions, channels) tile of an (N, C, H, W) tensor."""
    rows = n.to(tl.int64) * strides[0] + h.to(tl.int64) * strides[2] + w.to(tl.int64) * strides[3]
    return rows[:, None] + (cs.to(tl.int64) * strides[1])[None, :]


@triton.jit
def _load_channels(ptr, cs, mask_c):
    return tl.load(ptr + cs, mask=mask_c, other=0.0).to(tl.float32)


@triton.jit
def _tap(x_c, x_n, oh, ow, ok_p, mask_c, kh, kw, H, W, pad_t, pad_l, sx, STRIDE: tl.constexpr):
    """The x tile under tap (kh, kw) of the outputs (oh, ow), in fp32: x[n, ch, ih, iw] with
    ih = oh * S - pad_t + kh, iw = ow * S - pad_l + kw, zero outside the image (the padding).
    x_c: x's pointer at the tile's channels (1, BLOCK_C); x_n: the samples' int64 offsets."""
    ih = oh * STRIDE - pad_t + kh
    iw = ow * STRIDE - pad_l + kw
    ok = ok_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    rows = x_n + ih.to(tl.int64) * sx[2] + iw.to(tl.int64) * sx[3]
    return tl.load(x_c + rows[:, None], mask=ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _conv(
    x_ptr, w_ptr, n, oh, ow, ok_p, cs, mask_c, H, W, pad_t, pad_l, sx, sw,
    K: tl.constexpr, STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """c[p, ch] = sum_{kh, kw} w[ch, kh, kw] * x[n, ch, oh*S - pad_t + kh, ow*S - pad_l + kw],
    in fp32; c = 0 on masked positions."""
    x_c = x_ptr + (cs.to(tl.int64) * sx[1])[None, :]
    x_n = n.to(tl.int64) * sx[0]
    w_c = w_ptr + cs * sw[0]
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    # rows of taps in a runtime loop: fully unrolled, the compiler issues all K*K tile loads (and
    # their int64 addresses) at once, and at K = 5 ptxas spilled kilobytes a thread (sm_90, see
    # bench/results/triton_sm90_registers.md); K loads in flight still hide the latency
    for kh in range(K):
        for kw in tl.static_range(K):
            xv = _tap(x_c, x_n, oh, ow, ok_p, mask_c, kh, kw, H, W, pad_t, pad_l, sx, STRIDE)
            wv = tl.load(w_c + kh * sw[2] + kw * sw[3], mask=mask_c, other=0.0).to(tl.float32)
            acc += xv * wv[None, :]
    return acc


@triton.jit
def _chunk(N, C, H_OUT, W_OUT, groups, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr):
    """This program's channels and its chunk [start, end) of the output tiles (empty when the
    tiles run out before the programs)."""
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tiles = _tile_count(N, H_OUT, W_OUT, BLOCK_P, TILE_W)
    per_chunk = tl.cdiv(tiles, groups)
    start = tl.program_id(0) * per_chunk
    return cs, cs < C, start, tl.minimum(start + per_chunk, tiles)


@triton.jit
def _load_dy(dy_ptr, dsq_ptr, n, oh, ow, ok_p, cs, mask_c, C, inv_p_out, sdy, HAS_DSQ: tl.constexpr):
    """dL/dy on a tile of sample n, 0 on masked positions."""
    mask = ok_p[:, None] & mask_c[None, :]
    dy = tl.load(dy_ptr + _tile_offsets(n, oh, ow, cs, sdy), mask=mask, other=0.0).to(tl.float32)
    if HAS_DSQ:
        # squeeze = mean over (Ho, Wo) of y, so each y element receives grad_squeeze / (Ho * Wo)
        dsq = tl.load(dsq_ptr + n * C + cs, mask=mask_c, other=0.0).to(tl.float32)
        dy = tl.where(mask, dy + dsq[None, :] * inv_p_out, 0.0)
    return dy


@triton.jit
def _bn_silu_backward(c, dy, mean, invstd, gamma, beta):
    """xhat = (c - mean) * invstd, z = gamma * xhat + beta, y = silu(z):
    returns xhat and dz = dy * silu'(z), silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z)))."""
    xhat = (c - mean[None, :]) * invstd[None, :]
    z = xhat * gamma[None, :] + beta[None, :]
    sig = tl.sigmoid(z)
    return xhat, dy * sig * (1.0 + z * (1.0 - sig))


# ---------------------------------------------------------------------------------------------
# forward kernels


@_autotune(reset_to_zero=["sq_ptr"])
@triton.jit(do_not_specialize=_PLANE)
def _conv_bn_silu_kernel(
    x_ptr, w_ptr, center_ptr, scale_ptr, shift_ptr, y_ptr, sq_ptr,
    C, H, W, H_OUT, W_OUT, inv_p_out, pad_t, pad_l, sx, sw, sy,
    K: tl.constexpr, STRIDE: tl.constexpr, CENTERED: tl.constexpr, WITH_SQUEEZE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr,
):  # fmt: skip
    """y = silu((conv(x) - center) * scale + shift) and squeeze += mean of y over (Ho, Wo).

    Inference (center = 0, BN folded into scale/shift) and training pass 2 (center = batch mean,
    scale = gamma * invstd, shift = beta: subtracting the mean first keeps fp32 exact when the
    mean is large). A tile lies within one sample, so its squeeze partial is one row of (N, C).
    """
    n, oh, ow, ok_p = _tile(tl.program_id(0), H_OUT, W_OUT, BLOCK_P, TILE_W)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cs < C

    c = _conv(x_ptr, w_ptr, n, oh, ow, ok_p, cs, mask_c, H, W, pad_t, pad_l, sx, sw, K, STRIDE, BLOCK_P, BLOCK_C)
    if CENTERED:
        c -= _load_channels(center_ptr, cs, mask_c)[None, :]
    z = c * _load_channels(scale_ptr, cs, mask_c)[None, :] + _load_channels(shift_ptr, cs, mask_c)[None, :]
    y = z * tl.sigmoid(z)
    mask = ok_p[:, None] & mask_c[None, :]
    tl.store(y_ptr + _tile_offsets(n, oh, ow, cs, sy), cast(y, y_ptr.dtype.element_ty), mask=mask)
    if WITH_SQUEEZE:
        # the unrounded fp32 y, as the reference averages before casting
        partial = tl.sum(tl.where(mask, y, 0.0), axis=0) * inv_p_out
        tl.atomic_add(sq_ptr + n.to(tl.int64) * C + cs, partial, mask=mask_c, sem="relaxed")


@_autotune()
@triton.jit(do_not_specialize=[*_PLANE, "N", "groups"])
def _conv_stats_kernel(
    x_ptr, w_ptr, count_part_ptr, mean_part_ptr, m2_part_ptr,
    N, C, H, W, H_OUT, W_OUT, groups, pad_t, pad_l, sx, sw,
    K: tl.constexpr, STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr,
):  # fmt: skip
    """Training pass 1: (count, mean, M2) of conv(x) per channel over this program's chunk,
    each tile's exact (mean, M2) merged into the running triple by Chan's formula."""
    cs, mask_c, start, end = _chunk(N, C, H_OUT, W_OUT, groups, BLOCK_P, BLOCK_C, TILE_W)
    count = 0.0
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for t in range(start, end):
        n, oh, ow, ok_p = _tile(t, H_OUT, W_OUT, BLOCK_P, TILE_W)
        c = _conv(x_ptr, w_ptr, n, oh, ow, ok_p, cs, mask_c, H, W, pad_t, pad_l, sx, sw, K, STRIDE, BLOCK_P, BLOCK_C)
        tile_count = tl.sum(ok_p.to(tl.float32), axis=0)  # >= 1: every tile overlaps the plane
        tile_mean = tl.sum(c, axis=0) / tile_count  # masked positions hold c = 0
        dev = tl.where(ok_p[:, None], c - tile_mean[None, :], 0.0)
        count, mean, m2 = chan_merge(count, mean, m2, tile_count, tile_mean, tl.sum(dev * dev, axis=0))
    row = tl.program_id(0) * C + cs
    tl.store(mean_part_ptr + row, mean, mask=mask_c)
    tl.store(m2_part_ptr + row, m2, mask=mask_c)
    tl.store(count_part_ptr + tl.program_id(0), count, mask=tl.program_id(1) == 0)


@triton.jit
def _combine_stats_kernel(
    count_part_ptr, mean_part_ptr, m2_part_ptr, gamma_ptr, mean_ptr, var_ptr, scale_ptr,
    C, groups, eps,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Merge the per-chunk (count, mean, M2) into the batch mean, the biased variance M2 / count
    and the normalising scale gamma / sqrt(var + eps), BLOCK_G chunks at a time (empty chunks,
    count 0, drop out)."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cs < C
    count = 0.0
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for g0 in range(0, groups, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        ok_g = gs < groups
        n_g = tl.load(count_part_ptr + gs, mask=ok_g, other=0.0)
        mask = ok_g[:, None] & mask_c[None, :]
        offs = gs[:, None] * C + cs[None, :]
        mean_g = tl.load(mean_part_ptr + offs, mask=mask, other=0.0)
        m2_g = tl.load(m2_part_ptr + offs, mask=mask, other=0.0)
        count, mean, m2 = chan_merge(count, mean, m2, *merge_rows(n_g, mean_g, m2_g))
    var = m2 / count
    tl.store(mean_ptr + cs, mean, mask=mask_c)
    tl.store(var_ptr + cs, var, mask=mask_c)
    tl.store(scale_ptr + cs, _load_channels(gamma_ptr, cs, mask_c) * tl.rsqrt(var + eps), mask=mask_c)


# ---------------------------------------------------------------------------------------------
# backward kernels


@_autotune()
@triton.jit(do_not_specialize=[*_PLANE, "N", "groups"])
def _dz_sums_kernel(
    dy_ptr, dsq_ptr, x_ptr, w_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, part_ptr,
    N, C, H, W, H_OUT, W_OUT, groups, inv_p_out, pad_t, pad_l, sx, sw, sdy,
    K: tl.constexpr, STRIDE: tl.constexpr, HAS_DSQ: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr,
):  # fmt: skip
    """Training backward pass 1: this chunk's sum(dz) and sum(dz * xhat) per channel (the dbeta
    and dgamma partials, which the BN backward of every position needs), into
    part[chunk, 0:C] and part[chunk, C:2C]."""
    cs, mask_c, start, end = _chunk(N, C, H_OUT, W_OUT, groups, BLOCK_P, BLOCK_C, TILE_W)
    gamma = _load_channels(gamma_ptr, cs, mask_c)
    beta = _load_channels(beta_ptr, cs, mask_c)
    mean = _load_channels(mean_ptr, cs, mask_c)
    invstd = _load_channels(invstd_ptr, cs, mask_c)
    sum_dz = tl.zeros((BLOCK_C,), tl.float32)
    sum_dz_xhat = tl.zeros((BLOCK_C,), tl.float32)
    for t in range(start, end):
        n, oh, ow, ok_p = _tile(t, H_OUT, W_OUT, BLOCK_P, TILE_W)
        # recompute c instead of storing it in the forward
        c = _conv(x_ptr, w_ptr, n, oh, ow, ok_p, cs, mask_c, H, W, pad_t, pad_l, sx, sw, K, STRIDE, BLOCK_P, BLOCK_C)
        dy = _load_dy(dy_ptr, dsq_ptr, n, oh, ow, ok_p, cs, mask_c, C, inv_p_out, sdy, HAS_DSQ)
        xhat, dz = _bn_silu_backward(c, dy, mean, invstd, gamma, beta)  # dz = 0 where masked
        sum_dz += tl.sum(dz, axis=0)
        sum_dz_xhat += tl.sum(dz * xhat, axis=0)
    row = part_ptr + tl.program_id(0) * 2 * C + cs
    tl.store(row, sum_dz, mask=mask_c)
    tl.store(row + C, sum_dz_xhat, mask=mask_c)


@_autotune()
@triton.jit(do_not_specialize=[*_PLANE, "N", "groups"])
def _dconv_kernel(
    dy_ptr, dsq_ptr, x_ptr, w_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, sums_ptr,
    dc_ptr, sums_part_ptr, dw_part_ptr,
    N, C, H, W, H_OUT, W_OUT, groups, inv_count, inv_p_out, pad_t, pad_l, sx, sw, sdy, sdc,
    K: tl.constexpr, STRIDE: tl.constexpr, HAS_DSQ: tl.constexpr, TRAINING: tl.constexpr,
    KK_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr,
):  # fmt: skip
    """dc = dL/dconv(x) at every output position of this chunk, stored for the dx pass, and
    this chunk's dweight partial sum_p dc[p] * x[tap(p)] for each of the K*K taps.

    With batch statistics (TRAINING) mean and var depend on c, so with a = gamma * invstd:
        dc = a * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M)    (sums from pass 1)
    otherwise dc = a * dz, and this pass also emits the sum(dz), sum(dz * xhat) partials.
    """
    cs, mask_c, start, end = _chunk(N, C, H_OUT, W_OUT, groups, BLOCK_P, BLOCK_C, TILE_W)
    gamma = _load_channels(gamma_ptr, cs, mask_c)
    beta = _load_channels(beta_ptr, cs, mask_c)
    mean = _load_channels(mean_ptr, cs, mask_c)
    invstd = _load_channels(invstd_ptr, cs, mask_c)
    a = gamma * invstd
    if TRAINING:
        mean_dz = _load_channels(sums_ptr, cs, mask_c) * inv_count
        mean_dz_xhat = _load_channels(sums_ptr + C, cs, mask_c) * inv_count
    sum_dz = tl.zeros((BLOCK_C,), tl.float32)
    sum_dz_xhat = tl.zeros((BLOCK_C,), tl.float32)
    x_c = x_ptr + (cs.to(tl.int64) * sx[1])[None, :]
    taps = tl.arange(0, KK_PAD)
    dw = tl.zeros((KK_PAD, BLOCK_C), tl.float32)
    for t in range(start, end):
        n, oh, ow, ok_p = _tile(t, H_OUT, W_OUT, BLOCK_P, TILE_W)
        mask = ok_p[:, None] & mask_c[None, :]
        c = _conv(x_ptr, w_ptr, n, oh, ow, ok_p, cs, mask_c, H, W, pad_t, pad_l, sx, sw, K, STRIDE, BLOCK_P, BLOCK_C)
        dy = _load_dy(dy_ptr, dsq_ptr, n, oh, ow, ok_p, cs, mask_c, C, inv_p_out, sdy, HAS_DSQ)
        xhat, dz = _bn_silu_backward(c, dy, mean, invstd, gamma, beta)
        if TRAINING:
            dc = tl.where(mask, a[None, :] * (dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :]), 0.0)
        else:
            dc = a[None, :] * dz  # dz = 0 where masked
            sum_dz += tl.sum(dz, axis=0)
            sum_dz_xhat += tl.sum(dz * xhat, axis=0)
        tl.store(dc_ptr + _tile_offsets(n, oh, ow, cs, sdc), cast(dc, dc_ptr.dtype.element_ty), mask=mask)
        # dweight from the unrounded fp32 dc; the taps were just loaded by _conv (cache hits)
        x_n = n.to(tl.int64) * sx[0]
        for kh in range(K):  # a runtime loop, as in _conv
            for kw in tl.static_range(K):
                xv = _tap(x_c, x_n, oh, ow, ok_p, mask_c, kh, kw, H, W, pad_t, pad_l, sx, STRIDE)
                tap_sum = tl.sum(xv * dc, axis=0)
                dw += tl.where(taps[:, None] == kh * K + kw, tap_sum[None, :], 0.0)
    # dweight partials laid out like the contiguous (C, 1, K, K) weight: [chunk, ch * K * K + tap]
    dw_offs = tl.program_id(0) * C * K * K + cs[None, :] * (K * K) + taps[:, None]
    tl.store(dw_part_ptr + dw_offs, dw, mask=(taps[:, None] < K * K) & mask_c[None, :])
    if not TRAINING:
        row = sums_part_ptr + tl.program_id(0) * 2 * C + cs
        tl.store(row, sum_dz, mask=mask_c)
        tl.store(row + C, sum_dz_xhat, mask=mask_c)


@_autotune(["C", "H", "W", "K", "STRIDE"], width="W")
@triton.jit(do_not_specialize=_PLANE)
def _dx_kernel(
    dc_ptr, w_ptr, dx_ptr,
    C, H, W, H_OUT, W_OUT, pad_t, pad_l, sdc, sw, sdx,
    K: tl.constexpr, STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr,
):  # fmt: skip
    """dx = the transposed depthwise conv of dc, gathered per input pixel (tiles of the input
    plane): dx[i] = sum_{kh, kw} w[kh, kw] * dc[o] over the outputs o with o * S - pad + k = i,
    i.e. o = (i + pad - k) / S where that is a whole number in [0, Ho)."""
    n, ih, iw, ok_p = _tile(tl.program_id(0), H, W, BLOCK_P, TILE_W)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cs < C
    w_c = w_ptr + cs * sw[0]
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for kh in range(K):  # a runtime loop, as in _conv
        # a negative numerator is masked before its quotient is used (// rounds toward zero)
        num_h = ih + pad_t - kh
        oh = num_h // STRIDE
        ok_h = ok_p & (num_h >= 0) & (num_h % STRIDE == 0) & (oh < H_OUT)
        for kw in tl.static_range(K):
            num_w = iw + pad_l - kw
            ow = num_w // STRIDE
            ok = ok_h & (num_w >= 0) & (num_w % STRIDE == 0) & (ow < W_OUT)
            dc = tl.load(dc_ptr + _tile_offsets(n, oh, ow, cs, sdc), mask=ok[:, None] & mask_c[None, :], other=0.0)
            wv = tl.load(w_c + kh * sw[2] + kw * sw[3], mask=mask_c, other=0.0).to(tl.float32)
            acc += dc.to(tl.float32) * wv[None, :]
    tl.store(dx_ptr + _tile_offsets(n, ih, iw, cs, sdx), cast(acc, dx_ptr.dtype.element_ty),
             mask=ok_p[:, None] & mask_c[None, :])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# host side


@dataclass(frozen=True)
class _Geometry:
    """Sizes shared by the launches of one op call."""

    n: int
    c: int
    h: int
    w: int
    k: int
    stride: int
    pad_t: int
    pad_l: int
    h_out: int
    w_out: int

    @classmethod
    def of(cls, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: Sequence[int]) -> _Geometry:
        n, c, h, w = x.shape
        k = weight.shape[-1]
        top, bottom, left, right = padding
        geo = cls(n, c, h, w, k, stride, top, left,
                  output_size(h, k, stride, top, bottom), output_size(w, k, stride, left, right))  # fmt: skip
        # tile indices are int32 in the kernels (element offsets are int64)
        if max(n * h * w, geo.m) >= 2**31:
            raise ValueError(f"x: {tuple(x.shape)} has too many positions (N * H * W) for the triton backend")
        return geo

    @property
    def m(self) -> int:
        """Output positions per channel: the count of the batch statistics."""
        return self.n * self.h_out * self.w_out

    def conv_args(self) -> dict:
        return {"C": self.c, "H": self.h, "W": self.w, "H_OUT": self.h_out, "W_OUT": self.w_out,
                "pad_t": self.pad_t, "pad_l": self.pad_l, "K": self.k, "STRIDE": self.stride}  # fmt: skip


def _groups(geo: _Geometry, device: torch.device) -> int:
    """How many chunks a reduction over the output positions is cut into: enough for a few
    programs per multiprocessor (a channel block of ~32 per program), each with MIN_CHUNK
    positions or more; partial sums are then a few hundred rows at most, cheap to combine."""
    programs = 4 * multiprocessors(device)
    return max(1, min(programs // triton.cdiv(geo.c, 32), triton.cdiv(geo.m, MIN_CHUNK)))


def _channel_grid(groups: int):
    return lambda meta: (groups, triton.cdiv(meta["C"], meta["BLOCK_C"]))


def _tile_grid(n: int, h: int, w: int):
    """One program per (tile of the (n, h, w) positions, channel block)."""
    return lambda meta: (
        n * triton.cdiv(h, meta["BLOCK_P"] // meta["TILE_W"]) * triton.cdiv(w, meta["TILE_W"]),
        triton.cdiv(meta["C"], meta["BLOCK_C"]),
    )


_triton_entry = triton_entry(reference)


def _conv_bn_silu(x, weight, center, scale, shift, geo: _Geometry, with_squeeze: bool):
    """y = silu((conv(x) - center) * scale + shift) (center None: 0) and the squeeze."""
    y = empty_like_layout(x, (geo.n, geo.c, geo.h_out, geo.w_out))
    f32 = {"dtype": torch.float32, "device": x.device}
    squeeze = torch.zeros((geo.n, geo.c), **f32) if with_squeeze else torch.empty(1, **f32)  # fp32 atomics
    scale = scale.contiguous()
    _conv_bn_silu_kernel[_tile_grid(geo.n, geo.h_out, geo.w_out)](
        x, weight, scale if center is None else center.contiguous(), scale, shift.contiguous(), y, squeeze,
        inv_p_out=1.0 / (geo.h_out * geo.w_out), sx=x.stride(), sw=weight.stride(), sy=y.stride(),
        CENTERED=center is not None, WITH_SQUEEZE=with_squeeze, **geo.conv_args(),
    )  # fmt: skip
    return y, (squeeze.to(x.dtype) if with_squeeze else x.new_empty(0))


@IMPLS["forward_infer"].register("triton")
@_triton_entry
def forward_infer(
    x: torch.Tensor,  # (N, C, H, W)
    weight: torch.Tensor,  # (C, 1, k, k)
    scale: torch.Tensor,  # (C,)
    shift: torch.Tensor,  # (C,)
    stride: int,
    padding: Sequence[int],
    with_squeeze: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    geo = _Geometry.of(x, weight, stride, padding)
    return _conv_bn_silu(x, weight, None, scale, shift, geo, with_squeeze)


def _batch_statistics(x, weight, gamma, eps: float, geo: _Geometry):
    """(mean, biased var, gamma * invstd) of conv(x) per channel, fp32."""
    groups = _groups(geo, x.device)
    f32 = {"dtype": torch.float32, "device": x.device}
    count_part = torch.empty(groups, **f32)
    mean_part, m2_part = (torch.empty((groups, geo.c), **f32) for _ in range(2))
    _conv_stats_kernel[_channel_grid(groups)](
        x, weight, count_part, mean_part, m2_part, N=geo.n, groups=groups, sx=x.stride(), sw=weight.stride(),
        **geo.conv_args(),
    )  # fmt: skip
    mean, var, scale = (torch.empty(geo.c, **f32) for _ in range(3))
    _combine_stats_kernel[(triton.cdiv(geo.c, BLOCK_L),)](
        count_part, mean_part, m2_part, gamma.contiguous(), mean, var, scale, geo.c, groups, eps,
        BLOCK_G=BLOCK_G, BLOCK_C=BLOCK_L,
    )  # fmt: skip
    return mean, var, scale


@IMPLS["forward_train"].register("triton")
@_triton_entry
def forward_train(
    x: torch.Tensor,  # (N, C, H, W)
    weight: torch.Tensor,  # (C, 1, k, k)
    gamma: torch.Tensor,  # (C,)
    beta: torch.Tensor,  # (C,)
    eps: float,
    stride: int,
    padding: Sequence[int],
    with_squeeze: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    geo = _Geometry.of(x, weight, stride, padding)
    mean, var, scale = _batch_statistics(x, weight, gamma, eps, geo)
    y, squeeze = _conv_bn_silu(x, weight, mean, scale, beta, geo, with_squeeze)
    return y, squeeze, mean, var


@IMPLS["backward"].register("triton")
@_triton_entry
def backward(
    grad_y: torch.Tensor,  # (N, C, Ho, Wo)
    grad_squeeze: torch.Tensor | None,  # (N, C) or None
    x: torch.Tensor,  # (N, C, H, W)
    weight: torch.Tensor,  # (C, 1, k, k)
    gamma: torch.Tensor,  # (C,)
    beta: torch.Tensor,  # (C,)
    mean: torch.Tensor,  # (C,)
    invstd: torch.Tensor,  # (C,)
    stride: int,
    padding: Sequence[int],
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    geo = _Geometry.of(x, weight, stride, padding)
    groups = _groups(geo, x.device)
    grid = _channel_grid(groups)
    f32 = {"dtype": torch.float32, "device": x.device}
    per_channel = [v.contiguous() for v in (gamma, beta, mean, invstd)]
    has_dsq = grad_squeeze is not None
    dsq = grad_squeeze.contiguous() if has_dsq else grad_y  # a placeholder pointer when absent
    dy_args = {"inv_p_out": 1.0 / (geo.h_out * geo.w_out), "sdy": grad_y.stride(), "HAS_DSQ": has_dsq}
    conv_args = {"N": geo.n, "groups": groups, "sx": x.stride(), "sw": weight.stride(), **geo.conv_args()}

    sums_part = torch.empty((groups, 2 * geo.c), **f32)  # [sum dz | sum dz * xhat] per chunk
    sums = torch.empty(2 * geo.c, **f32)
    if training:
        _dz_sums_kernel[grid](grad_y, dsq, x, weight, *per_channel, sums_part, **dy_args, **conv_args)
        sum_rows(sums_part, sums)

    # dc in x's dtype, as eager autograd holds it: it is written once and read once
    dc = empty_like_layout(x, (geo.n, geo.c, geo.h_out, geo.w_out))
    dw_part = torch.empty((groups, geo.c * geo.k * geo.k), **f32)
    _dconv_kernel[grid](
        grad_y, dsq, x, weight, *per_channel, sums, dc, sums_part, dw_part,
        inv_count=1.0 / geo.m, sdc=dc.stride(), TRAINING=training, KK_PAD=triton.next_power_of_2(geo.k * geo.k),
        **dy_args, **conv_args,
    )  # fmt: skip
    if not training:
        sum_rows(sums_part, sums)
    dweight = sum_rows(dw_part, torch.empty((geo.c, 1, geo.k, geo.k), dtype=weight.dtype, device=x.device))

    dx = empty_like_layout(x, x.shape)
    _dx_kernel[_tile_grid(geo.n, geo.h, geo.w)](
        dc, weight, dx, geo.c, geo.h, geo.w, geo.h_out, geo.w_out, geo.pad_t, geo.pad_l,
        dc.stride(), weight.stride(), dx.stride(), K=geo.k, STRIDE=geo.stride,
    )  # fmt: skip
    # fresh tensors: op outputs must not alias each other
    dgamma = torch.empty_like(gamma).copy_(sums[geo.c :])
    dbeta = torch.empty_like(beta).copy_(sums[: geo.c])
    return dx, dweight, dgamma, dbeta
