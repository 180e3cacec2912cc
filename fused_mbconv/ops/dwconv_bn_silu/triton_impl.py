"""Triton backend of the fused depthwise conv + BatchNorm + SiLU ops (see ``__init__``).

Every kernel works on tiles of BLOCK_P spatial positions x BLOCK_C channels: in channels_last
the channels are the contiguous axis, so each row of a tile is one vector load. The positions of
a tile are a (BLOCK_P // TILE_W) x TILE_W rectangle of one sample's plane: a square tile has the
smallest halo (8 x 8 outputs of a 5 x 5 conv read 12 x 12 inputs, where 64 outputs along a row
read 5 x 68); TILE_W is autotuned with the tile size. Within a tile, a thread computes STRIP = 4
consecutive outputs along w, which share most of their input columns: each column is loaded and
converted to fp32 once per row of taps and feeds every output that reads it (see ``_conv``).
Tiles that read no padding and hold a full channel block (most tiles of a large plane) take an
unmasked path (``_interior``).
Other layouts (NCHW, sliced views) take their strides from the tensor; nothing is copied. Math
is fp32 for fp32/fp16/bf16 inputs; calls with fp64 tensors run the reference implementation.

Memory passes (x: input, y: output, dy: grad of y, dc: grad of the conv output):

- inference forward: one pass, reads x, writes y (and the squeeze from the same registers);
- training forward: pass 1 reads x for the batch statistics, pass 2 reads x again and writes y;
- backward: [training only] pass 1 reads x, dy for the two per-channel sums of the BN backward;
  pass 2 reads x, dy and writes dc (and the dweight partial sums); pass 3 reads dc, writes dx.
  The conv output and the pre-activation are recomputed, never stored.

Reductions over positions are deterministic: the tiles are cut into ``groups`` chunks, each
program loops over one chunk and writes one partial per channel, and a small kernel combines
the partials. Only the squeeze is summed with atomics (fp32, one add per tile and channel);
under ``torch.use_deterministic_algorithms(True)`` it is taken from y by the squeeze-excite's
fixed-order squeeze kernel instead (a second read of y).

Kernels run on the current CUDA stream and allocate through torch, so they can be captured in a
CUDA graph once every shape has been autotuned (run the model once before capturing).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fused_mbconv._checks import empty_like_layout
from fused_mbconv.ops import _triton
from fused_mbconv.ops._launch import launcher
from fused_mbconv.ops._triton import (
    aligned,
    autotune,
    below,
    cast,
    cdiv,
    chan_merge,
    combine_stats,
    merge_rows,
    next_power_of_2,
    running_invstd,
    sigmoid,
    sum_rows,
    triton_entry,
    vector_alignment,
    widen,
)
from fused_mbconv.ops.dwconv_bn_silu import IMPLS, output_size, reference
from fused_mbconv.ops.squeeze_excite.triton_impl import squeeze as se_squeeze

# A reduction's program takes at least this many output positions on average.
MIN_CHUNK = 256


# ---------------------------------------------------------------------------------------------
# configurations


def _tile_configs(gpu_configs: Sequence[tuple[int, int, int, int]], **flags) -> list[triton.Config]:
    """(BLOCK_P, BLOCK_C, num_warps, TILE_W) as autotune configs, with these constexpr ``flags``."""
    return [
        triton.Config({"BLOCK_P": p, "BLOCK_C": c, "TILE_W": tw, **flags}, num_warps=w) for p, c, w, tw in gpu_configs
    ]


def _lanes_used(c: int, block_c: int) -> float:
    """The share of a launch's channel lanes that hold one of the c channels."""
    return c / (cdiv(c, block_c) * block_c)


def _prune(width: str):
    """Drop configs whose tile is wider than the plane (``width`` names the kernel's plane-width
    argument) or whose channel block leaves over 10% more lanes masked than the best one left
    (48 channels: 16-channel blocks use every lane, 32 or 64 a quarter idle): masked lanes do
    no work but take their instructions and registers."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        widest_w = next_power_of_2(args[width])
        lanes = {id(cfg): _lanes_used(args["C"], cfg.kwargs["BLOCK_C"]) for cfg in configs}
        fit = [cfg for cfg in configs if cfg.kwargs["TILE_W"] <= widest_w]
        if not fit:
            return [min(configs, key=lambda cfg: (cfg.kwargs["TILE_W"], -lanes[id(cfg)]))]
        best = max(lanes[id(cfg)] for cfg in fit)
        return [cfg for cfg in fit if lanes[id(cfg)] >= best - 0.1]

    return prune


# A thread computes STRIP consecutive outputs along w of each of its (strip, channel) elements:
# they share most of their input columns (see _conv). TILE_W is a multiple of STRIP.
STRIP: tl.constexpr = tl.constexpr(4)
# Elements a thread holds per strip position: BLOCK_P * BLOCK_C / (STRIP * 32 * num_warps), 8
# channels (one 16-byte vector of bf16; 32 outputs a thread) or 4 (8-byte vectors, about half the
# registers: ptxas gives the backward kernels 170-240 registers a thread with 8, 100-130 with 4,
# sm_90). Square-ish tiles (least halo): a tile along a row, 64 x 1 (the first design), took
# 190-255 registers a thread and spilled in the backward (bench/results/triton_sm90_registers.md
# at commit a25ef34). 16-channel blocks (16 x 16 tiles, the same 8 channels a thread) for the
# widths that 32 or 64 leave partly idle: 16 (B1, B2), 48 (B4, B5), 144 (B0-B5). Few configs:
# each is compiled per kernel specialization, and ``_prune`` keeps those that suit the shape.
_TILES = [(128, 32, 4, 16), (64, 64, 4, 8), (128, 64, 8, 16), (128, 32, 8, 16), (64, 32, 4, 8), (64, 32, 2, 8),
          (256, 16, 4, 16)]  # fmt: skip
_TILE_CONFIGS = _tile_configs(_TILES)
# The interpreter pays per operation, not per element, so fewer, bigger tiles run faster; 16 x 8
# tiles have masked rows, columns and strip positions on the test shapes.
_TILE_INTERPRETED_SHAPE = (128, 32, 1, 8)
_TILE_INTERPRETED = _tile_configs([_TILE_INTERPRETED_SHAPE])[0]
_TILE_KEY = ["C", "H_OUT", "W_OUT", "K", "STRIDE"]
# Plane sizes, paddings and counts are not specialized on (value 1, divisibility by 16): each
# distinct pattern would compile every config anew, and they guide no vectorization; the channel
# count and the strides (contiguity and alignment of the channel vectors, with ALIGN) are.
_PLANE = ["H", "W", "H_OUT", "W_OUT", "pad_t", "pad_l"]


def _autotune(key=_TILE_KEY, width="W_OUT", **kwargs):
    return autotune(_TILE_CONFIGS, key, interpreted=_TILE_INTERPRETED, prune=_prune(width), **kwargs)


# The dc + dweight kernel: the tile configs, and for K = 5 configs of 4 channels a thread that keep
# every tap's products per strip across tiles (TAPS_PER_STRIP; 8 channels a thread would need 200
# registers for them). ``_prune_dconv`` puts those first at K = 5: with autotuning off they run.
_DCONV_CONFIGS = [
    *_tile_configs(_TILES, TAPS_PER_STRIP=False),
    *_tile_configs([(128, 32, 8, 16), (64, 32, 4, 8), (128, 16, 4, 16)], TAPS_PER_STRIP=True),
]
_DCONV_INTERPRETED = _tile_configs([_TILE_INTERPRETED_SHAPE], TAPS_PER_STRIP=True)[0]


def _prune_dconv(configs, named_args, **kwargs):
    """``_prune``, after dropping the TAPS_PER_STRIP configs at K = 3 (which keeps its taps per
    strip in every config: they would be duplicates) and, at K = 5, the other configs of the same
    tiles and warps (sm_90 SASS, k5 s1, interior tile: 223 instructions per output against 126).
    FUSED_MBCONV_TAPS_PER_STRIP=0: no TAPS_PER_STRIP config (a switch for bisecting on a GPU)."""
    def tile(cfg):
        return cfg.kwargs["BLOCK_P"], cfg.kwargs["BLOCK_C"], cfg.kwargs["TILE_W"], cfg.num_warps

    per_strip = [cfg for cfg in configs if cfg.kwargs["TAPS_PER_STRIP"]]
    per_tile = [cfg for cfg in configs if not cfg.kwargs["TAPS_PER_STRIP"]]
    if {**named_args, **kwargs}["K"] == 3 or os.environ.get("FUSED_MBCONV_TAPS_PER_STRIP", "1") == "0":
        configs = per_tile
    else:
        taken = {tile(cfg) for cfg in per_strip}
        configs = per_strip + [cfg for cfg in per_tile if tile(cfg) not in taken]
    return _prune("W_OUT")(configs, named_args, **kwargs)


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _tile_coords(t, H, W, BLOCK_P: tl.constexpr, TILE_W: tl.constexpr):
    """Tile t of an (N, H, W) position grid cut into (BLOCK_P // TILE_W) x TILE_W rectangles,
    sample by sample: its sample and its row and column in the sample's grid of tiles."""
    tiles_w = tl.cdiv(W, TILE_W)
    per_sample = tl.cdiv(H, BLOCK_P // TILE_W) * tiles_w
    n = t // per_sample
    r = t - n * per_sample
    th = r // tiles_w
    return n, th, r - th * tiles_w


@triton.jit
def _tile(t, H, W, BLOCK_P: tl.constexpr, TILE_W: tl.constexpr):
    """Tile t (``_tile_coords``) as BLOCK_P // STRIP strips of STRIP positions along w: its sample
    n (a scalar), each strip's row h and first column w0, and whether the row is in the plane.
    Strip position j is (h, w0 + j), in the plane when also w0 + j < W."""
    TILE_H: tl.constexpr = BLOCK_P // TILE_W
    PER_ROW: tl.constexpr = TILE_W // STRIP
    n, th, tw = _tile_coords(t, H, W, BLOCK_P, TILE_W)
    i = tl.arange(0, BLOCK_P // STRIP)
    h = th * TILE_H + i // PER_ROW
    w0 = tw * TILE_W + (i % PER_ROW) * STRIP
    return n, h, w0, h < H


# FUSED_MBCONV_INTERIOR_TILES=0: every tile takes the masked path (a switch for bisecting on a GPU).
_INTERIOR_TILES: tl.constexpr = tl.constexpr(os.environ.get("FUSED_MBCONV_INTERIOR_TILES", "1") != "0")
# Programs are numbered channel block fastest: in channels_last memory a channel block is 32 or 64
# bytes of a pixel's C * element-size (288 bytes at B5's 144 channels, bf16), a piece of a DRAM
# line. Tile (or chunk) fastest, the programs that ran at once were all of one channel block (or,
# in the reductions, of the first few), and the rest of each line was evicted from L2 before its
# block's turn; channel block fastest, the programs that share a pixel run side by side and the
# line is read once. FUSED_MBCONV_CHANNELS_FASTEST=0: the order before 2026-11-27 (to measure the
# difference on a GPU).
_CHANNELS_FASTEST: tl.constexpr = tl.constexpr(os.environ.get("FUSED_MBCONV_CHANNELS_FASTEST", "1") != "0")


@triton.jit
def _tile_program(C, BLOCK_C: tl.constexpr):
    """This per-tile program's tile and channel block (see ``_tile_grid``)."""
    if _CHANNELS_FASTEST:
        blocks = tl.cdiv(C, BLOCK_C)
        pid = tl.program_id(0)
        t = pid // blocks
        return t, pid - t * blocks
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def _chunk_program():
    """This reduction program's chunk and channel block (see ``_channel_grid``)."""
    if _CHANNELS_FASTEST:
        return tl.program_id(1), tl.program_id(0)
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def _interior(t, cb, H, W, H_OUT, W_OUT, pad_t, pad_l, C, K: tl.constexpr, STRIDE: tl.constexpr,
              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr):  # fmt: skip
    """Whether output tile t (``_tile``) and this program's channel block need no mask: every
    output in the plane, every input the conv reads inside it (no padding), every channel < C.
    Most tiles of a large plane are (the depthwise layers that move the most bytes)."""
    TILE_H: tl.constexpr = BLOCK_P // TILE_W
    _, th, tw = _tile_coords(t, H_OUT, W_OUT, BLOCK_P, TILE_W)
    rows_in = (th + 1) * TILE_H <= H_OUT
    rows_in &= (th * TILE_H * STRIDE >= pad_t) & (((th + 1) * TILE_H - 1) * STRIDE - pad_t + K <= H)
    cols_in = (tw + 1) * TILE_W <= W_OUT
    cols_in &= (tw * TILE_W * STRIDE >= pad_l) & (((tw + 1) * TILE_W - 1) * STRIDE - pad_l + K <= W)
    return rows_in & cols_in & ((cb + 1) * BLOCK_C <= C) & _INTERIOR_TILES


@triton.jit
def _tile_count(N, H, W, BLOCK_P: tl.constexpr, TILE_W: tl.constexpr):
    return N * tl.cdiv(H, BLOCK_P // TILE_W) * tl.cdiv(W, TILE_W)


@triton.jit
def _tile_offsets(n, h, w, cs, strides, ALIGN: tl.constexpr):
    """int64 element offsets of a (positions, channels) tile of an (N, C, H, W) tensor; ALIGN:
    what every position's offset is a multiple of (``_triton.vector_alignment``)."""
    rows = n.to(tl.int64) * strides[0] + h.to(tl.int64) * strides[2] + w.to(tl.int64) * strides[3]
    if ALIGN > 1:
        rows = tl.multiple_of(rows, ALIGN)
    return rows[:, None] + (cs.to(tl.int64) * strides[1])[None, :]


@triton.jit
def _load_channels(ptr, cs, mask_c):
    return tl.load(ptr + cs, mask=mask_c, other=0.0).to(tl.float32)


@triton.jit
def _pick(i: tl.constexpr, v0, v1, v2, v3, v4):
    """v_i, i a compile-time index (taps and strip positions are unrolled)."""
    v = v0
    if i == 1:
        v = v1
    if i == 2:
        v = v2
    if i == 3:
        v = v3
    if i == 4:
        v = v4
    return v


@triton.jit
def _strip_fma(col, TAP0: tl.constexpr, TAP_STEP: tl.constexpr, w0, w1, w2, w3, w4, acc0, acc1, acc2, acc3,
               K: tl.constexpr):  # fmt: skip
    """acc_j += col * w_k for each strip position j whose tap k = TAP0 + j * TAP_STEP is one of
    the K (compile-time indices: nothing but the multiply-adds is left)."""
    for j in tl.static_range(STRIP):
        if TAP0 + j * TAP_STEP >= 0:
            if TAP0 + j * TAP_STEP < K:
                p = col * _pick(TAP0 + j * TAP_STEP, w0, w1, w2, w3, w4)[None, :]
                if j == 0:
                    acc0 += p
                if j == 1:
                    acc1 += p
                if j == 2:
                    acc2 += p
                if j == 3:
                    acc3 += p
    return acc0, acc1, acc2, acc3


@triton.jit
def _tap_weight(w_ptr, cs, mask_c, kh, kw: tl.constexpr, sw, MASKED: tl.constexpr):
    offs = cs * sw[0] + kh * sw[2] + kw * sw[3]
    if MASKED:
        return tl.load(w_ptr + offs, mask=mask_c, other=0.0)
    return tl.load(w_ptr + offs)


@triton.jit
def _tap_weights(w_ptr, cs, mask_c, kh, sw, K: tl.constexpr, MASKED: tl.constexpr = True):
    """The weights of the K taps of row kh for the tile's channels, fp32 (K <= 5; unused ones 0),
    from ``_taps_by_channel``'s layout; not MASKED: every channel is < C."""
    w0 = _tap_weight(w_ptr, cs, mask_c, kh, 0, sw, MASKED)
    w1 = _tap_weight(w_ptr, cs, mask_c, kh, 1, sw, MASKED)
    w2 = _tap_weight(w_ptr, cs, mask_c, kh, 2, sw, MASKED)
    w3 = tl.zeros_like(w0)
    w4 = tl.zeros_like(w0)
    if K > 3:
        w3 = _tap_weight(w_ptr, cs, mask_c, kh, 3, sw, MASKED)
        w4 = _tap_weight(w_ptr, cs, mask_c, kh, 4, sw, MASKED)
    return w0, w1, w2, w3, w4


@triton.jit
def _column(x_c, rows, ok_row, iw, m: tl.constexpr, mask_c, W, sx, ALIGN: tl.constexpr, MASKED: tl.constexpr = True):
    """Input column iw + m of the strips' rows (int64 offsets ``rows`` at column iw), fp32,
    zero outside the plane (the padding); not MASKED: every element is in the plane."""
    offs = rows + m * tl.cast(sx[3], tl.int64)  # tl.cast: a unit stride arrives as a constexpr int
    if ALIGN > 1:
        offs = tl.multiple_of(offs, ALIGN)
    if MASKED:
        ok = ok_row & (iw + m >= 0) & (iw + m < W)
        return widen(tl.load(x_c + offs[:, None], mask=ok[:, None] & mask_c[None, :], other=0.0))
    return widen(tl.load(x_c + offs[:, None]))


@triton.jit
def _conv(
    x_ptr, w_ptr, n, oh, ow0, ok_h, cs, mask_c, H, W, pad_t, pad_l, sx, sw, interior,
    K: tl.constexpr, STRIDE: tl.constexpr, ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The conv at the STRIP positions of each strip, as STRIP tiles (strips, channels), fp32:
    c_j[r, ch] = sum_{kh, kw} w[ch, kh, kw] * x[n, ch, oh*S - pad_t + kh, (ow0 + j)*S - pad_l + kw],
    0 on rows outside the output plane (not on columns past W_OUT: they may read the plane). An
    ``interior`` tile (``_interior``) loads without masks: no predicates to compute, no zeroing
    of masked-off lanes (sm_90 SASS, k5 s1: 30 of the 380 instructions per row of taps)."""
    if interior:
        c0, c1, c2, c3 = _conv_window(x_ptr, w_ptr, n, oh, ow0, ok_h, cs, mask_c, H, W, pad_t, pad_l, sx, sw,
                                      K, STRIDE, ALIGN, BLOCK_P, BLOCK_C, False)  # fmt: skip
    else:
        c0, c1, c2, c3 = _conv_window(x_ptr, w_ptr, n, oh, ow0, ok_h, cs, mask_c, H, W, pad_t, pad_l, sx, sw,
                                      K, STRIDE, ALIGN, BLOCK_P, BLOCK_C, True)  # fmt: skip
    return c0, c1, c2, c3


@triton.jit
def _conv_window(
    x_ptr, w_ptr, n, oh, ow0, ok_h, cs, mask_c, H, W, pad_t, pad_l, sx, sw,
    K: tl.constexpr, STRIDE: tl.constexpr, ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """``_conv``, with masks or (not MASKED) without.

    Output j of a strip reads input column j*S + kw of the strip's window, so the window's
    (STRIP - 1) * S + K columns are each loaded and converted to fp32 once per row of taps and
    used by every output that needs them (k5 s1: 8 column loads and fp32 conversions for 20
    multiply-adds, where a load per tap made it 20 for 20): sm_90 SASS of the bf16 inference
    kernel, k5 s1, counts 88 instructions per output against 146 with a load per tap."""
    R: tl.constexpr = BLOCK_P // STRIP
    x_c = x_ptr + (cs.to(tl.int64) * sx[1])[None, :]
    iw = ow0 * STRIDE - pad_l
    x_r = n.to(tl.int64) * sx[0] + iw.to(tl.int64) * sx[3]
    c0 = tl.zeros((R, BLOCK_C), tl.float32)
    c1 = tl.zeros((R, BLOCK_C), tl.float32)
    c2 = tl.zeros((R, BLOCK_C), tl.float32)
    c3 = tl.zeros((R, BLOCK_C), tl.float32)
    # rows of taps in a runtime loop: unrolled, every row's loads would be in flight at once and
    # ptxas spilled (sm_90, bench/results/triton_sm90_registers.md)
    for kh in range(K):
        ih = oh * STRIDE - pad_t + kh
        ok_row = ok_h & (ih >= 0) & (ih < H)
        rows = x_r + ih.to(tl.int64) * sx[2]
        if ALIGN > 1:  # also here: _column's claim on its offsets is lost when they are these rows (m = 0)
            rows = tl.multiple_of(rows, ALIGN)
        w0, w1, w2, w3, w4 = _tap_weights(w_ptr, cs, mask_c, kh, sw, K, MASKED)
        for m in tl.static_range((STRIP - 1) * STRIDE + K):
            xm = _column(x_c, rows, ok_row, iw, m, mask_c, W, sx, ALIGN, MASKED)
            # output j reads this column through tap m - j * S
            c0, c1, c2, c3 = _strip_fma(xm, m, -STRIDE, w0, w1, w2, w3, w4, c0, c1, c2, c3, K)
    return c0, c1, c2, c3


@triton.jit
def _chunk(N, C, H_OUT, W_OUT, groups, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr,
           ALIGN: tl.constexpr):
    """This program's chunk g and channel block cb, its channels, and its chunk's output tiles
    [start, end) (empty when the tiles run out before the programs)."""
    g, cb = _chunk_program()
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    tiles = _tile_count(N, H_OUT, W_OUT, BLOCK_P, TILE_W)
    per_chunk = tl.cdiv(tiles, groups)
    start = g * per_chunk
    return g, cb, cs, below(cs, C, ALIGN), start, tl.minimum(start + per_chunk, tiles)


@triton.jit
def _squeeze_grad(dsq_ptr, n, cs, mask_c, C, inv_p_out, HAS_DSQ: tl.constexpr, ALIGN: tl.constexpr):
    """What sample n's squeeze gradient adds to dL/dy at each of its positions, per channel:
    squeeze = mean over (Ho, Wo) of y, so each y element receives grad_squeeze / (Ho * Wo).
    Loaded once per tile (a load per strip position is not merged: dc stores come between)."""
    if HAS_DSQ:
        return tl.load(dsq_ptr + n * aligned(C, ALIGN) + cs, mask=mask_c, other=0.0).to(tl.float32) * inv_p_out
    return tl.zeros_like(cs).to(tl.float32)


@triton.jit
def _load_dy(dy_ptr, dsq, n, oh, ow, ok_p, cs, mask_c, sdy, HAS_DSQ: tl.constexpr, ALIGN: tl.constexpr):
    """dL/dy at the positions (oh, ow) of sample n, 0 on masked positions (dsq: ``_squeeze_grad``)."""
    mask = ok_p[:, None] & mask_c[None, :]
    dy = widen(tl.load(dy_ptr + _tile_offsets(n, oh, ow, cs, sdy, ALIGN), mask=mask, other=0.0))
    if HAS_DSQ:
        dy = tl.where(mask, dy + dsq[None, :], 0.0)
    return dy


@triton.jit
def _bn_silu_backward(c, dy, mean, invstd, gamma, beta):
    """xhat = (c - mean) * invstd, z = gamma * xhat + beta, y = silu(z):
    returns xhat and dz = dy * silu'(z), silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z)))."""
    xhat = (c - mean[None, :]) * invstd[None, :]
    z = xhat * gamma[None, :] + beta[None, :]
    sig = sigmoid(z)
    return xhat, dy * sig * (1.0 + z * (1.0 - sig))


# ---------------------------------------------------------------------------------------------
# forward kernels


@triton.jit
def _bn_silu_store(c, j: tl.constexpr, n, oh, ow0, ok_h, cs, mask_c, W_OUT, center, scale, shift, y_ptr, sy,
                   CENTERED: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    """y = silu((c - center) * scale + shift) stored at strip position j; returns y, 0 where masked."""
    if CENTERED:
        c -= center[None, :]
    z = c * scale[None, :] + shift[None, :]
    y = z * sigmoid(z)
    ow = ow0 + j
    mask = (ok_h & (ow < W_OUT))[:, None] & mask_c[None, :]
    tl.store(y_ptr + _tile_offsets(n, oh, ow, cs, sy, ALIGN), cast(y, y_ptr.dtype.element_ty), mask=mask)
    return tl.where(mask, y, 0.0)


@launcher
@_autotune(reset_to_zero=["sq_ptr"])
@triton.jit(do_not_specialize=_PLANE)
def _conv_bn_silu_kernel(
    x_ptr, w_ptr, center_ptr, scale_ptr, shift_ptr, var_ptr, y_ptr, sq_ptr,
    C, H, W, H_OUT, W_OUT, inv_p_out, eps, pad_t, pad_l, sx, sw, sy,
    K: tl.constexpr, STRIDE: tl.constexpr, CENTERED: tl.constexpr, NORMALIZE: tl.constexpr,
    WITH_SQUEEZE: tl.constexpr, ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    TILE_W: tl.constexpr,
):  # fmt: skip
    """y = silu((conv(x) - center) * scale + shift) and squeeze += mean of y over (Ho, Wo); with
    NORMALIZE, scale is multiplied by 1 / sqrt(var + eps) first.

    Inference with BN folded (center = 0, scale/shift), eval-mode BN (center = running mean,
    scale = gamma, var = running variance, shift = beta) and training pass 2 (center = batch mean,
    scale = gamma * invstd, shift = beta). Subtracting the mean first keeps fp32 exact when the
    mean is large. A tile lies within one sample, so its squeeze partial is one row of (N, C).
    """
    t, cb = _tile_program(C, BLOCK_C)
    n, oh, ow0, ok_h = _tile(t, H_OUT, W_OUT, BLOCK_P, TILE_W)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = below(cs, C, ALIGN)
    interior = _interior(t, cb, H, W, H_OUT, W_OUT, pad_t, pad_l, C, K, STRIDE, BLOCK_P, BLOCK_C, TILE_W)
    c0, c1, c2, c3 = _conv(x_ptr, w_ptr, n, oh, ow0, ok_h, cs, mask_c, H, W, pad_t, pad_l, sx, sw, interior,
                           K, STRIDE, ALIGN, BLOCK_P, BLOCK_C)  # fmt: skip
    center = _load_channels(center_ptr, cs, mask_c)
    scale = _load_channels(scale_ptr, cs, mask_c)
    if NORMALIZE:
        scale *= running_invstd(var_ptr, cs, mask_c, eps)
    shift = _load_channels(shift_ptr, cs, mask_c)
    y = _bn_silu_store(c0, 0, n, oh, ow0, ok_h, cs, mask_c, W_OUT, center, scale, shift, y_ptr, sy, CENTERED, ALIGN)
    y += _bn_silu_store(c1, 1, n, oh, ow0, ok_h, cs, mask_c, W_OUT, center, scale, shift, y_ptr, sy, CENTERED, ALIGN)
    y += _bn_silu_store(c2, 2, n, oh, ow0, ok_h, cs, mask_c, W_OUT, center, scale, shift, y_ptr, sy, CENTERED, ALIGN)
    y += _bn_silu_store(c3, 3, n, oh, ow0, ok_h, cs, mask_c, W_OUT, center, scale, shift, y_ptr, sy, CENTERED, ALIGN)
    if WITH_SQUEEZE:
        # the unrounded fp32 y, as the reference averages before casting; one reduction per tile
        partial = tl.sum(y, axis=0) * inv_p_out
        tl.atomic_add(sq_ptr + n.to(tl.int64) * C + cs, partial, mask=mask_c, sem="relaxed")


@triton.jit
def _sq_dev(c, ok, mean):
    dev = tl.where(ok[:, None], c - mean, 0.0)
    return dev * dev


@launcher
@_autotune()
@triton.jit(do_not_specialize=[*_PLANE, "N", "groups"])
def _conv_stats_kernel(
    x_ptr, w_ptr, count_part_ptr, mean_part_ptr, m2_part_ptr,
    N, C, H, W, H_OUT, W_OUT, groups, pad_t, pad_l, sx, sw,
    K: tl.constexpr, STRIDE: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr,
):  # fmt: skip
    """Training pass 1: (count, mean, M2) of conv(x) per channel over this program's chunk.

    Each strip keeps its own running triple across the chunk's tiles, its STRIP new values'
    exact (mean, M2) merged in by Chan's formula, and the strips' triples are merged once, after
    the loop: no reduction across threads per tile (sm_90 SASS, interior tile, instructions per
    output: k3 s1 45 -> 30, k5 s1 76 -> 60)."""
    R: tl.constexpr = BLOCK_P // STRIP
    g, cb, cs, mask_c, start, end = _chunk(N, C, H_OUT, W_OUT, groups, BLOCK_P, BLOCK_C, TILE_W, ALIGN)
    count = tl.zeros((R,), tl.float32)
    mean = tl.zeros((R, BLOCK_C), tl.float32)
    m2 = tl.zeros((R, BLOCK_C), tl.float32)
    for t in range(start, end):
        n, oh, ow0, ok_h = _tile(t, H_OUT, W_OUT, BLOCK_P, TILE_W)
        interior = _interior(t, cb, H, W, H_OUT, W_OUT, pad_t, pad_l, C, K, STRIDE, BLOCK_P, BLOCK_C, TILE_W)
        c0, c1, c2, c3 = _conv(x_ptr, w_ptr, n, oh, ow0, ok_h, cs, mask_c, H, W, pad_t, pad_l, sx, sw,
                               interior, K, STRIDE, ALIGN, BLOCK_P, BLOCK_C)  # fmt: skip
        ok0 = ok_h & (ow0 < W_OUT)
        ok1 = ok_h & (ow0 + 1 < W_OUT)
        ok2 = ok_h & (ow0 + 2 < W_OUT)
        ok3 = ok_h & (ow0 + 3 < W_OUT)
        in_plane = ok0.to(tl.float32) + ok1.to(tl.float32) + ok2.to(tl.float32) + ok3.to(tl.float32)
        in_sum = tl.where(ok0[:, None], c0, 0.0) + tl.where(ok1[:, None], c1, 0.0)
        in_sum += tl.where(ok2[:, None], c2, 0.0) + tl.where(ok3[:, None], c3, 0.0)
        strip_mean = in_sum * (1.0 / tl.maximum(in_plane, 1.0))[:, None]
        strip_m2 = _sq_dev(c0, ok0, strip_mean) + _sq_dev(c1, ok1, strip_mean)
        strip_m2 += _sq_dev(c2, ok2, strip_mean) + _sq_dev(c3, ok3, strip_mean)
        # a count per strip (row); a strip outside the plane merges nothing in
        _, mean, m2 = chan_merge(count[:, None], mean, m2, in_plane[:, None], strip_mean, strip_m2)
        count += in_plane
    count, mean, m2 = merge_rows(count, mean, m2)
    row = g * C + cs
    tl.store(mean_part_ptr + row, mean, mask=mask_c)
    tl.store(m2_part_ptr + row, m2, mask=mask_c)
    tl.store(count_part_ptr + g, count, mask=cb == 0)


# ---------------------------------------------------------------------------------------------
# backward kernels


@triton.jit
def _dz_at(c, j: tl.constexpr, n, oh, ow0, ok_h, cs, mask_c, W_OUT, dy_ptr, dsq, sdy, mean, invstd, gamma, beta,
           HAS_DSQ: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    """(xhat, dz) at strip position j (dz = dL/d(BN output before SiLU), 0 where masked)."""
    ow = ow0 + j
    dy = _load_dy(dy_ptr, dsq, n, oh, ow, ok_h & (ow < W_OUT), cs, mask_c, sdy, HAS_DSQ, ALIGN)
    return _bn_silu_backward(c, dy, mean, invstd, gamma, beta)


@launcher
@_autotune()
@triton.jit(do_not_specialize=[*_PLANE, "N", "groups"])
def _dz_sums_kernel(
    dy_ptr, dsq_ptr, x_ptr, w_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, part_ptr,
    N, C, H, W, H_OUT, W_OUT, groups, inv_p_out, pad_t, pad_l, sx, sw, sdy,
    K: tl.constexpr, STRIDE: tl.constexpr, HAS_DSQ: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr,
):  # fmt: skip
    """Training backward pass 1: this chunk's sum(dz) and sum(dz * xhat) per channel (the dbeta
    and dgamma partials, which the BN backward of every position needs), into
    part[chunk, 0:C] and part[chunk, C:2C]. Summed per strip across the tiles, over the strips
    once at the end: no reduction across threads per tile (sm_90 SASS, interior tile,
    instructions per output: k3 s1 47 -> 41, k5 s1 78 -> 72)."""
    R: tl.constexpr = BLOCK_P // STRIP
    g, cb, cs, mask_c, start, end = _chunk(N, C, H_OUT, W_OUT, groups, BLOCK_P, BLOCK_C, TILE_W, ALIGN)
    mean = _load_channels(mean_ptr, cs, mask_c)
    invstd = _load_channels(invstd_ptr, cs, mask_c)
    gamma = _load_channels(gamma_ptr, cs, mask_c)
    beta = _load_channels(beta_ptr, cs, mask_c)
    sum_dz = tl.zeros((R, BLOCK_C), tl.float32)
    sum_dz_xhat = tl.zeros((R, BLOCK_C), tl.float32)
    for t in range(start, end):
        n, oh, ow0, ok_h = _tile(t, H_OUT, W_OUT, BLOCK_P, TILE_W)
        # recompute c instead of storing it in the forward
        interior = _interior(t, cb, H, W, H_OUT, W_OUT, pad_t, pad_l, C, K, STRIDE, BLOCK_P, BLOCK_C, TILE_W)
        c0, c1, c2, c3 = _conv(x_ptr, w_ptr, n, oh, ow0, ok_h, cs, mask_c, H, W, pad_t, pad_l, sx, sw,
                               interior, K, STRIDE, ALIGN, BLOCK_P, BLOCK_C)  # fmt: skip
        dsq = _squeeze_grad(dsq_ptr, n, cs, mask_c, C, inv_p_out, HAS_DSQ, ALIGN)
        xhat0, dz0 = _dz_at(c0, 0, n, oh, ow0, ok_h, cs, mask_c, W_OUT, dy_ptr, dsq, sdy, mean, invstd,
                            gamma, beta, HAS_DSQ, ALIGN)  # fmt: skip
        xhat1, dz1 = _dz_at(c1, 1, n, oh, ow0, ok_h, cs, mask_c, W_OUT, dy_ptr, dsq, sdy, mean, invstd,
                            gamma, beta, HAS_DSQ, ALIGN)  # fmt: skip
        xhat2, dz2 = _dz_at(c2, 2, n, oh, ow0, ok_h, cs, mask_c, W_OUT, dy_ptr, dsq, sdy, mean, invstd,
                            gamma, beta, HAS_DSQ, ALIGN)  # fmt: skip
        xhat3, dz3 = _dz_at(c3, 3, n, oh, ow0, ok_h, cs, mask_c, W_OUT, dy_ptr, dsq, sdy, mean, invstd,
                            gamma, beta, HAS_DSQ, ALIGN)  # fmt: skip
        sum_dz += dz0 + dz1 + dz2 + dz3
        sum_dz_xhat += dz0 * xhat0 + dz1 * xhat1 + dz2 * xhat2 + dz3 * xhat3
    row = part_ptr + g * 2 * C + cs
    tl.store(row, tl.sum(sum_dz, axis=0), mask=mask_c)
    tl.store(row + C, tl.sum(sum_dz_xhat, axis=0), mask=mask_c)


@triton.jit
def _dc_store(c, j: tl.constexpr, n, oh, ow0, ok_h, cs, mask_c, W_OUT, dy_ptr, dsq, sdy, mean, invstd, gamma, beta,
              HAS_DSQ: tl.constexpr, a, mean_dz, mean_dz_xhat, dc_ptr, sdc, TRAINING: tl.constexpr,
              ALIGN: tl.constexpr):  # fmt: skip
    """dc at strip position j, stored (in dc's dtype); returns the fp32 dc, dz and dz * xhat
    (0 where masked)."""
    xhat, dz = _dz_at(c, j, n, oh, ow0, ok_h, cs, mask_c, W_OUT, dy_ptr, dsq, sdy, mean, invstd, gamma, beta,
                      HAS_DSQ, ALIGN)  # fmt: skip
    ow = ow0 + j
    mask = (ok_h & (ow < W_OUT))[:, None] & mask_c[None, :]
    if TRAINING:
        dc = tl.where(mask, a[None, :] * (dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :]), 0.0)
    else:
        dc = a[None, :] * dz
    tl.store(dc_ptr + _tile_offsets(n, oh, ow, cs, sdc, ALIGN), cast(dc, dc_ptr.dtype.element_ty), mask=mask)
    return dc, dz, dz * xhat


@triton.jit
def _row_products(
    x_c, x_r, oh, ok_h, iw, kh, mask_c, H, W, pad_t, sx, dc0, dc1, dc2, dc3, interior, q0, q1, q2, q3, q4,
    K: tl.constexpr, STRIDE: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """q_kw + the sum over the strip positions j of dc_j * x[tap (kh, kw) of output j], per
    (strip, channel), for the K taps kw of row kh (q3, q4 unchanged for K = 3). x_r: the strips'
    int64 offsets at sample n and input column iw (their window's first). An ``interior`` tile
    loads without masks, as in ``_conv``."""
    if interior:
        q0, q1, q2, q3, q4 = _row_window(x_c, x_r, oh, ok_h, iw, kh, mask_c, H, W, pad_t, sx, dc0, dc1, dc2, dc3,
                                         q0, q1, q2, q3, q4, K, STRIDE, ALIGN, False)  # fmt: skip
    else:
        q0, q1, q2, q3, q4 = _row_window(x_c, x_r, oh, ok_h, iw, kh, mask_c, H, W, pad_t, sx, dc0, dc1, dc2, dc3,
                                         q0, q1, q2, q3, q4, K, STRIDE, ALIGN, True)  # fmt: skip
    return q0, q1, q2, q3, q4


@triton.jit
def _row_window(
    x_c, x_r, oh, ok_h, iw, kh, mask_c, H, W, pad_t, sx, dc0, dc1, dc2, dc3, q0, q1, q2, q3, q4,
    K: tl.constexpr, STRIDE: tl.constexpr, ALIGN: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """``_row_products``, with masks or (not MASKED) without."""
    ih = oh * STRIDE - pad_t + kh
    ok_row = ok_h & (ih >= 0) & (ih < H)
    rows = x_r + ih.to(tl.int64) * sx[2]
    if ALIGN > 1:
        rows = tl.multiple_of(rows, ALIGN)
    for m in tl.static_range((STRIP - 1) * STRIDE + K):
        xm = _column(x_c, rows, ok_row, iw, m, mask_c, W, sx, ALIGN, MASKED)
        for j in tl.static_range(STRIP):
            if m - j * STRIDE >= 0:
                if m - j * STRIDE < K:
                    p = xm * _pick(j, dc0, dc1, dc2, dc3, dc3)
                    if m - j * STRIDE == 0:
                        q0 += p
                    if m - j * STRIDE == 1:
                        q1 += p
                    if m - j * STRIDE == 2:
                        q2 += p
                    if m - j * STRIDE == 3:
                        q3 += p
                    if m - j * STRIDE == 4:
                        q4 += p
    return q0, q1, q2, q3, q4


@triton.jit
def _add_tap(dw, p, kh, kw: tl.constexpr, taps, K: tl.constexpr):
    """dw[kh * K + kw, :] += sum over the strips of p (a tap's products), kw < K."""
    if kw < K:
        dw += tl.where(taps[:, None] == kh * K + kw, tl.sum(p, axis=0)[None, :], 0.0)
    return dw


@triton.jit
def _add_row(dw, kh: tl.constexpr, q0, q1, q2, q3, q4, taps, K: tl.constexpr):
    """``_add_tap`` for the taps (kh, 0..4) of row kh < K."""
    if kh < K:
        dw = _add_tap(dw, q0, kh, 0, taps, K)
        dw = _add_tap(dw, q1, kh, 1, taps, K)
        dw = _add_tap(dw, q2, kh, 2, taps, K)
        dw = _add_tap(dw, q3, kh, 3, taps, K)
        dw = _add_tap(dw, q4, kh, 4, taps, K)
    return dw


@launcher
@autotune(_DCONV_CONFIGS, _TILE_KEY, interpreted=_DCONV_INTERPRETED, prune=_prune_dconv)
@triton.jit(do_not_specialize=[*_PLANE, "N", "groups"])
def _dconv_kernel(
    dy_ptr, dsq_ptr, x_ptr, w_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, sums_ptr,
    dc_ptr, sums_part_ptr, dw_part_ptr,
    N, C, H, W, H_OUT, W_OUT, groups, inv_count, inv_p_out, pad_t, pad_l, sx, sw, sdy, sdc,
    K: tl.constexpr, STRIDE: tl.constexpr, HAS_DSQ: tl.constexpr, TRAINING: tl.constexpr, ALIGN: tl.constexpr,
    KK_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr,
    TAPS_PER_STRIP: tl.constexpr,
):  # fmt: skip
    """dc = dL/dconv(x) at every output position of this chunk, stored for the dx pass, and
    this chunk's dweight partial sum_p dc[p] * x[tap(p)] for each of the K*K taps.

    Each tap's products are summed over a tile's strips, a reduction across threads. At K = 3,
    and at K = 5 with TAPS_PER_STRIP (configs of 4 channels a thread: the 25 accumulators take
    100 registers), they stay per strip in registers across the chunk's tiles instead and are
    reduced once, after the loop (sm_90 SASS, k5 s1, interior tile: 198 -> 126 instructions per
    output); otherwise (K = 5, 8 channels a thread) once per tile.

    With batch statistics (TRAINING) mean and var depend on c, so with a = gamma * invstd:
        dc = a * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M)    (sums from pass 1)
    otherwise dc = a * dz, and this pass also emits the sum(dz), sum(dz * xhat) partials.
    """
    R: tl.constexpr = BLOCK_P // STRIP
    g, cb, cs, mask_c, start, end = _chunk(N, C, H_OUT, W_OUT, groups, BLOCK_P, BLOCK_C, TILE_W, ALIGN)
    mean = _load_channels(mean_ptr, cs, mask_c)
    invstd = _load_channels(invstd_ptr, cs, mask_c)
    gamma = _load_channels(gamma_ptr, cs, mask_c)
    beta = _load_channels(beta_ptr, cs, mask_c)
    a = gamma * invstd
    mean_dz = tl.zeros_like(a)
    mean_dz_xhat = tl.zeros_like(a)
    if TRAINING:
        mean_dz = _load_channels(sums_ptr, cs, mask_c) * inv_count
        mean_dz_xhat = _load_channels(sums_ptr + aligned(C, ALIGN), cs, mask_c) * inv_count
    sum_dz = tl.zeros((BLOCK_C,), tl.float32)
    sum_dz_xhat = tl.zeros((BLOCK_C,), tl.float32)
    x_c = x_ptr + (cs.to(tl.int64) * sx[1])[None, :]
    taps = tl.arange(0, KK_PAD)
    dw = tl.zeros((KK_PAD, BLOCK_C), tl.float32)
    zero = tl.zeros((R, BLOCK_C), tl.float32)
    PER_STRIP: tl.constexpr = TAPS_PER_STRIP | (K == 3)
    if PER_STRIP:  # q[kh * 5 + kw]: tap (kh, kw)
        q0, q1, q2, q3, q4 = zero, zero, zero, zero, zero
        q5, q6, q7, q8, q9 = zero, zero, zero, zero, zero
        q10, q11, q12, q13, q14 = zero, zero, zero, zero, zero
        q15, q16, q17, q18, q19 = zero, zero, zero, zero, zero
        q20, q21, q22, q23, q24 = zero, zero, zero, zero, zero
    for t in range(start, end):
        n, oh, ow0, ok_h = _tile(t, H_OUT, W_OUT, BLOCK_P, TILE_W)
        interior = _interior(t, cb, H, W, H_OUT, W_OUT, pad_t, pad_l, C, K, STRIDE, BLOCK_P, BLOCK_C, TILE_W)
        c0, c1, c2, c3 = _conv(x_ptr, w_ptr, n, oh, ow0, ok_h, cs, mask_c, H, W, pad_t, pad_l, sx, sw,
                               interior, K, STRIDE, ALIGN, BLOCK_P, BLOCK_C)  # fmt: skip
        dsq = _squeeze_grad(dsq_ptr, n, cs, mask_c, C, inv_p_out, HAS_DSQ, ALIGN)
        dc0, dz0, dzx0 = _dc_store(c0, 0, n, oh, ow0, ok_h, cs, mask_c, W_OUT, dy_ptr, dsq, sdy, mean,
                                      invstd, gamma, beta, HAS_DSQ, a, mean_dz, mean_dz_xhat, dc_ptr, sdc,
                                      TRAINING, ALIGN)  # fmt: skip
        dc1, dz1, dzx1 = _dc_store(c1, 1, n, oh, ow0, ok_h, cs, mask_c, W_OUT, dy_ptr, dsq, sdy, mean,
                                      invstd, gamma, beta, HAS_DSQ, a, mean_dz, mean_dz_xhat, dc_ptr, sdc,
                                      TRAINING, ALIGN)  # fmt: skip
        dc2, dz2, dzx2 = _dc_store(c2, 2, n, oh, ow0, ok_h, cs, mask_c, W_OUT, dy_ptr, dsq, sdy, mean,
                                      invstd, gamma, beta, HAS_DSQ, a, mean_dz, mean_dz_xhat, dc_ptr, sdc,
                                      TRAINING, ALIGN)  # fmt: skip
        dc3, dz3, dzx3 = _dc_store(c3, 3, n, oh, ow0, ok_h, cs, mask_c, W_OUT, dy_ptr, dsq, sdy, mean,
                                      invstd, gamma, beta, HAS_DSQ, a, mean_dz, mean_dz_xhat, dc_ptr, sdc,
                                      TRAINING, ALIGN)  # fmt: skip
        if not TRAINING:
            sum_dz += tl.sum(dz0 + dz1 + dz2 + dz3, axis=0)
            sum_dz_xhat += tl.sum(dzx0 + dzx1 + dzx2 + dzx3, axis=0)
        # dweight from the unrounded fp32 dc: tap kw of output j reads window column j*S + kw,
        # so each column is loaded once per row of taps (the conv just loaded it: cache hits)
        iw = ow0 * STRIDE - pad_l
        x_r = n.to(tl.int64) * sx[0] + iw.to(tl.int64) * sx[3]
        if PER_STRIP:  # rows unrolled: each has its accumulators
            q0, q1, q2, q3, q4 = _row_products(x_c, x_r, oh, ok_h, iw, 0, mask_c, H, W, pad_t, sx, dc0, dc1,
                                               dc2, dc3, interior, q0, q1, q2, q3, q4,
                                               K, STRIDE, ALIGN)  # fmt: skip
            q5, q6, q7, q8, q9 = _row_products(x_c, x_r, oh, ok_h, iw, 1, mask_c, H, W, pad_t, sx, dc0, dc1,
                                               dc2, dc3, interior, q5, q6, q7, q8, q9,
                                               K, STRIDE, ALIGN)  # fmt: skip
            q10, q11, q12, q13, q14 = _row_products(x_c, x_r, oh, ok_h, iw, 2, mask_c, H, W, pad_t, sx, dc0, dc1,
                                                    dc2, dc3, interior, q10, q11, q12, q13, q14,
                                                    K, STRIDE, ALIGN)  # fmt: skip
            if K > 3:
                q15, q16, q17, q18, q19 = _row_products(x_c, x_r, oh, ok_h, iw, 3, mask_c, H, W, pad_t, sx, dc0, dc1,
                                                        dc2, dc3, interior, q15, q16, q17, q18, q19,
                                                        K, STRIDE, ALIGN)  # fmt: skip
                q20, q21, q22, q23, q24 = _row_products(x_c, x_r, oh, ok_h, iw, 4, mask_c, H, W, pad_t, sx, dc0, dc1,
                                                        dc2, dc3, interior, q20, q21, q22, q23, q24,
                                                        K, STRIDE, ALIGN)  # fmt: skip
        else:
            for kh in range(K):  # a runtime loop, as in _conv
                p0, p1, p2, p3, p4 = _row_products(x_c, x_r, oh, ok_h, iw, kh, mask_c, H, W, pad_t, sx, dc0, dc1,
                                                   dc2, dc3, interior, zero, zero, zero, zero, zero,
                                                   K, STRIDE, ALIGN)  # fmt: skip
                dw = _add_tap(dw, p0, kh, 0, taps, K)
                dw = _add_tap(dw, p1, kh, 1, taps, K)
                dw = _add_tap(dw, p2, kh, 2, taps, K)
                dw = _add_tap(dw, p3, kh, 3, taps, K)
                dw = _add_tap(dw, p4, kh, 4, taps, K)
    if PER_STRIP:
        dw = _add_row(dw, 0, q0, q1, q2, q3, q4, taps, K)
        dw = _add_row(dw, 1, q5, q6, q7, q8, q9, taps, K)
        dw = _add_row(dw, 2, q10, q11, q12, q13, q14, taps, K)
        dw = _add_row(dw, 3, q15, q16, q17, q18, q19, taps, K)
        dw = _add_row(dw, 4, q20, q21, q22, q23, q24, taps, K)
    # dweight partials laid out like the contiguous (C, 1, K, K) weight: [chunk, ch * K * K + tap]
    dw_offs = g * C * K * K + cs[None, :] * (K * K) + taps[:, None]
    tl.store(dw_part_ptr + dw_offs, dw, mask=(taps[:, None] < K * K) & mask_c[None, :])
    if not TRAINING:
        row = sums_part_ptr + g * 2 * C + cs
        tl.store(row, sum_dz, mask=mask_c)
        tl.store(row + C, sum_dz_xhat, mask=mask_c)


@triton.jit
def _dx_interior(t, cb, H, W, H_OUT, W_OUT, pad_t, pad_l, C, K: tl.constexpr, STRIDE: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr):  # fmt: skip
    """Whether input tile t of the dx pass and this program's channel block need no mask (stride
    1 only; at stride 2 a row of taps reads every other output row): every input in the plane,
    every output i + pad - k it reads in [0, Ho) x [0, Wo), every channel < C."""
    if STRIDE != 1:
        return False
    TILE_H: tl.constexpr = BLOCK_P // TILE_W
    _, th, tw = _tile_coords(t, H, W, BLOCK_P, TILE_W)
    rows_in = ((th + 1) * TILE_H <= H) & (th * TILE_H + pad_t - (K - 1) >= 0) & ((th + 1) * TILE_H + pad_t <= H_OUT)
    cols_in = ((tw + 1) * TILE_W <= W) & (tw * TILE_W + pad_l - (K - 1) >= 0) & ((tw + 1) * TILE_W + pad_l <= W_OUT)
    return rows_in & cols_in & ((cb + 1) * BLOCK_C <= C) & _INTERIOR_TILES


@triton.jit
def _dx_window(
    dc_ptr, w_ptr, n, ih, iw0, ok_h, cs, mask_c, H_OUT, W_OUT, pad_t, pad_l, sdc, sw,
    K: tl.constexpr, STRIDE: tl.constexpr, PAD_ODD: tl.constexpr, ALIGN: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The dx accumulators of the tile's STRIP positions (``_dx_kernel``), with masks or (not
    MASKED: an interior tile, ``_dx_interior``) without."""
    R: tl.constexpr = BLOCK_P // STRIP
    dc_c = dc_ptr + (cs.to(tl.int64) * sdc[1])[None, :]
    acc0 = tl.zeros((R, BLOCK_C), tl.float32)
    acc1 = tl.zeros((R, BLOCK_C), tl.float32)
    acc2 = tl.zeros((R, BLOCK_C), tl.float32)
    acc3 = tl.zeros((R, BLOCK_C), tl.float32)
    for kh in range(K):  # a runtime loop, as in _conv
        # a negative numerator is masked before its quotient is used (// rounds toward zero)
        num_h = ih + pad_t - kh
        oh = num_h // STRIDE
        ok_row = ok_h & (num_h >= 0) & (num_h % STRIDE == 0) & (oh < H_OUT)
        rows = n.to(tl.int64) * sdc[0] + oh.to(tl.int64) * sdc[2]
        w0, w1, w2, w3, w4 = _tap_weights(w_ptr, cs, mask_c, kh, sw, K, MASKED)
        for dd in tl.static_range(STRIP + K - 1):
            d = dd - (K - 1)  # j - kw, from -(K - 1) to STRIP - 1
            if (PAD_ODD + dd + K - 1) % STRIDE == 0:  # (pad_l + d) % S == 0, dd + K - 1 keeps it >= 0
                num_w = iw0 + pad_l + d
                ow = num_w // STRIDE
                offs = rows + ow.to(tl.int64) * sdc[3]
                if ALIGN > 1:
                    offs = tl.multiple_of(offs, ALIGN)
                if MASKED:
                    ok = ok_row & (num_w >= 0) & (ow < W_OUT)
                    col = widen(tl.load(dc_c + offs[:, None], mask=ok[:, None] & mask_c[None, :], other=0.0))
                else:
                    col = widen(tl.load(dc_c + offs[:, None]))
                # input j takes this output column through tap j - d
                acc0, acc1, acc2, acc3 = _strip_fma(col, -d, 1, w0, w1, w2, w3, w4, acc0, acc1, acc2, acc3, K)
    return acc0, acc1, acc2, acc3


@launcher
@_autotune(["C", "H", "W", "K", "STRIDE"], width="W")
@triton.jit(do_not_specialize=_PLANE)
def _dx_kernel(
    dc_ptr, w_ptr, dx_ptr,
    C, H, W, H_OUT, W_OUT, pad_t, pad_l, sdc, sw, sdx,
    K: tl.constexpr, STRIDE: tl.constexpr, PAD_ODD: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr,
):  # fmt: skip
    """dx = the transposed depthwise conv of dc, gathered per input pixel (strips of the input
    plane): dx[i] = sum_{kh, kw} w[kh, kw] * dc[o] over the outputs o with o * S - pad + k = i,
    i.e. o = (i + pad - k) / S where that is a whole number in [0, Ho).

    Input j of a strip (column iw0 + j) and tap kw read output column (iw0 + pad_l + d) / S with
    d = j - kw: each such column is loaded once per row of taps for every (j, kw) with that d.
    With S = 2 only even iw0 + pad_l + d are outputs; strips start on even columns, so which d
    qualify depends on pad_l's parity alone (PAD_ODD)."""
    t, cb = _tile_program(C, BLOCK_C)
    n, ih, iw0, ok_h = _tile(t, H, W, BLOCK_P, TILE_W)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = below(cs, C, ALIGN)
    if _dx_interior(t, cb, H, W, H_OUT, W_OUT, pad_t, pad_l, C, K, STRIDE, BLOCK_P, BLOCK_C, TILE_W):
        acc0, acc1, acc2, acc3 = _dx_window(dc_ptr, w_ptr, n, ih, iw0, ok_h, cs, mask_c, H_OUT, W_OUT, pad_t, pad_l,
                                            sdc, sw, K, STRIDE, PAD_ODD, ALIGN, BLOCK_P, BLOCK_C, False)  # fmt: skip
    else:
        acc0, acc1, acc2, acc3 = _dx_window(dc_ptr, w_ptr, n, ih, iw0, ok_h, cs, mask_c, H_OUT, W_OUT, pad_t, pad_l,
                                            sdc, sw, K, STRIDE, PAD_ODD, ALIGN, BLOCK_P, BLOCK_C, True)  # fmt: skip
    dx_ty = dx_ptr.dtype.element_ty
    for j in tl.static_range(STRIP):
        mask = (ok_h & (iw0 + j < W))[:, None] & mask_c[None, :]
        acc = _pick(j, acc0, acc1, acc2, acc3, acc3)
        tl.store(dx_ptr + _tile_offsets(n, ih, iw0 + j, cs, sdx, ALIGN), cast(acc, dx_ty), mask=mask)


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
    programs = 4 * _triton.multiprocessors(device)
    return max(1, min(programs // cdiv(geo.c, 32), cdiv(geo.m, MIN_CHUNK)))


def _channel_grid(groups: int):
    """One program per (chunk of the output tiles, channel block), channel blocks fastest
    (``_CHANNELS_FASTEST``)."""

    def grid(meta):
        blocks = cdiv(meta["C"], meta["BLOCK_C"])
        return (blocks, groups) if _CHANNELS_FASTEST else (groups, blocks)

    return grid


def _tile_grid(n: int, h: int, w: int):
    """One program per (tile of the (n, h, w) positions, channel block), channel blocks fastest
    (``_CHANNELS_FASTEST``)."""

    def grid(meta):
        tiles = n * cdiv(h, meta["BLOCK_P"] // meta["TILE_W"]) * cdiv(w, meta["TILE_W"])
        blocks = cdiv(meta["C"], meta["BLOCK_C"])
        return (tiles * blocks,) if _CHANNELS_FASTEST else (tiles, blocks)

    return grid


_triton_entry = triton_entry(reference)


def _taps_by_channel(weight: torch.Tensor) -> torch.Tensor:
    """The (C, 1, k, k) weight as fp32 with the channels contiguous and each tap's row of channels
    padded to a multiple of 16 (strides (1, ., k Cp, Cp)): a tap's weights for a tile's channels
    are then one vector load with nothing to convert. The (C, 1, k, k) layout (channel stride
    k * k) took one 16-bit load and conversion per channel and tap (sm_90 SASS of the k5 kernel:
    40 of the 423 instructions per row of taps); unpadded, a launch specializes the tap strides
    as divisible by 16 only when C is, and at C = 40 the loads of tap 0 were per channel (a
    tl.multiple_of claim on an offset with nothing added to it is folded away).

    Made on every call (one small copy): a copy kept between calls would miss the writes to the
    weight that bypass its version counter (``p.data.mul_()``, CUDA graph replays of an
    optimizer step)."""
    c, _, k, _ = weight.shape
    padded = torch.empty((k, k, cdiv(c, 16) * 16), dtype=torch.float32, device=weight.device)
    return padded[:, :, :c].permute(2, 0, 1).unsqueeze(1).copy_(weight.detach())


def _conv_bn_silu(x, weight, center, scale, shift, geo: _Geometry, with_squeeze: bool, var=None, eps: float = 0.0):
    """y = silu((conv(x) - center) * scale + shift) (center None: 0; var given: scale / sqrt(var +
    eps)) and the squeeze."""
    if with_squeeze and torch.are_deterministic_algorithms_enabled():
        y, _ = _conv_bn_silu(x, weight, center, scale, shift, geo, False, var, eps)
        return y, se_squeeze(y)  # float atomics add in any order: run-to-run differences
    y = empty_like_layout(x, (geo.n, geo.c, geo.h_out, geo.w_out))
    f32 = {"dtype": torch.float32, "device": x.device}
    squeeze = torch.zeros((geo.n, geo.c), **f32) if with_squeeze else torch.empty(1, **f32)  # fp32 atomics
    scale = scale.contiguous()
    _conv_bn_silu_kernel[_tile_grid(geo.n, geo.h_out, geo.w_out)](
        x, weight, scale if center is None else center.contiguous(), scale, shift.contiguous(),
        scale if var is None else var.contiguous(), y, squeeze, inv_p_out=1.0 / (geo.h_out * geo.w_out), eps=eps,
        sx=x.stride(), sw=weight.stride(), sy=y.stride(), CENTERED=center is not None, NORMALIZE=var is not None,
        WITH_SQUEEZE=with_squeeze, ALIGN=vector_alignment(x, y), **geo.conv_args(),
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
    running_mean: torch.Tensor | None = None,  # (C,)
    running_var: torch.Tensor | None = None,  # (C,)
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    geo = _Geometry.of(x, weight, stride, padding)
    taps = _taps_by_channel(weight)
    return _conv_bn_silu(x, taps, running_mean, scale, shift, geo, with_squeeze, running_var, float(eps))


def _batch_statistics(x, weight, gamma, eps: float, geo: _Geometry):
    """(mean, biased var, gamma * invstd) of conv(x) per channel, fp32."""
    groups = _groups(geo, x.device)
    f32 = {"dtype": torch.float32, "device": x.device}
    count_part = torch.empty(groups, **f32)
    mean_part, m2_part = (torch.empty((groups, geo.c), **f32) for _ in range(2))
    _conv_stats_kernel[_channel_grid(groups)](
        x, weight, count_part, mean_part, m2_part, N=geo.n, groups=groups, sx=x.stride(), sw=weight.stride(),
        ALIGN=vector_alignment(x), **geo.conv_args(),
    )  # fmt: skip
    mean, var, scale, _ = combine_stats(count_part, mean_part, m2_part, gamma=gamma, eps=eps)
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
    taps = _taps_by_channel(weight)
    mean, var, scale = _batch_statistics(x, taps, gamma, eps, geo)
    y, squeeze = _conv_bn_silu(x, taps, mean, scale, beta, geo, with_squeeze)
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
    taps = _taps_by_channel(weight)
    # dc in x's dtype, as eager autograd holds it: it is written once and read once
    dc = empty_like_layout(x, (geo.n, geo.c, geo.h_out, geo.w_out))
    align = vector_alignment(x, grad_y, dc)
    conv_args = {"N": geo.n, "groups": groups, "sx": x.stride(), "sw": taps.stride(), "ALIGN": align, **geo.conv_args()}

    sums_part = torch.empty((groups, 2 * geo.c), **f32)  # [sum dz | sum dz * xhat] per chunk
    sums = torch.empty(2 * geo.c, **f32)
    if training:
        _dz_sums_kernel[grid](grad_y, dsq, x, taps, *per_channel, sums_part, **dy_args, **conv_args)
        sum_rows(sums_part, sums)

    dw_part = torch.empty((groups, geo.c * geo.k * geo.k), **f32)
    _dconv_kernel[grid](
        grad_y, dsq, x, taps, *per_channel, sums, dc, sums_part, dw_part,
        inv_count=1.0 / geo.m, sdc=dc.stride(), TRAINING=training, KK_PAD=next_power_of_2(geo.k * geo.k),
        **dy_args, **conv_args,
    )  # fmt: skip
    if not training:
        sum_rows(sums_part, sums)
    dweight = sum_rows(dw_part, torch.empty((geo.c, 1, geo.k, geo.k), dtype=weight.dtype, device=x.device))

    dx = empty_like_layout(x, x.shape)
    _dx_kernel[_tile_grid(geo.n, geo.h, geo.w)](
        dc, taps, dx, geo.c, geo.h, geo.w, geo.h_out, geo.w_out, geo.pad_t, geo.pad_l,
        dc.stride(), taps.stride(), dx.stride(), K=geo.k, STRIDE=geo.stride,
        PAD_ODD=geo.pad_l % 2 if geo.stride == 2 else 0, ALIGN=vector_alignment(dc, dx),
    )  # fmt: skip
    # fresh tensors: op outputs must not alias each other
    dgamma = torch.empty_like(gamma).copy_(sums[geo.c :])
    dbeta = torch.empty_like(beta).copy_(sums[: geo.c])
    return dx, dweight, dgamma, dbeta
