"""Triton backend of the squeeze-excite ops: the signatures, dtypes and output layouts of
``reference``, fp32 math inside every kernel; fp64 (and empty) inputs go to the reference.

- squeeze: the per-(n, c) mean over H*W. Tiles are (BLOCK_HW, BLOCK_C) addressed through the
  input's strides, so channels_last (channels contiguous), NCHW and any other layout run the same
  code. When N * C is too small to fill the GPU (an early stage at small batch: 32 channels,
  112 x 112 pixels), H*W is split into chunks whose fp32 partial sums a second kernel adds in a
  fixed order: deterministic, no atomics.
- excite: both 1x1 convs, SiLU and sigmoid for the whole batch in one kernel; its backward in
  two, the second reducing the weight gradients over the batch in a fixed order.
- scale: y = x * gate; its backward dx = dy * gate with dgate = sum_hw dy * x, split like the
  squeeze.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_mbconv._checks import empty_like_layout
from fused_mbconv.ops import _triton
from fused_mbconv.ops._launch import launcher
from fused_mbconv.ops._triton import (
    INTERPRETED,
    autotune,
    cast,
    cdiv,
    prune_wider_than,
    sum_rows,
    triton_entry,
    widen,
)
from fused_mbconv.ops.squeeze_excite import IMPLS, reference

# fp64 math is the reference's job (the kernels compute in fp32); empty tensors launch nothing
_triton_entry = triton_entry(reference, empty=True)


# ---------------------------------------------------------------------------------------------
# (H, W) addressing and the split of H*W, shared by the squeeze, the scale and its backward


def _hw_flat(*tensors: torch.Tensor) -> bool:
    """Whether every tensor walks (H, W) as one index hw with a single stride (NCHW and
    channels_last do), which spares the kernels a division per element."""
    _, _, h, w = tensors[0].shape
    return all(h == 1 or w == 1 or t.stride(2) == w * t.stride(3) for t in tensors)


def _strides(t: torch.Tensor, flat: bool) -> tuple[int, int, int, int]:
    """(s_n, s_c, s_h, s_w) of 4-D ``t``; when ``flat``, s_w is the stride of the flat hw index."""
    s_n, s_c, s_h, s_w = t.stride()
    if flat and t.shape[3] == 1:
        s_w = s_h  # hw = h
    return s_n, s_c, s_h, s_w


@triton.jit
def _hw_offsets(hw, W, s_h, s_w, FLAT: tl.constexpr):
    """Element offsets (int64: N*C*H*W can pass 2^31) of the flat spatial indices ``hw``."""
    if FLAT:
        return hw.to(tl.int64) * s_w
    else:
        return (hw // W).to(tl.int64) * s_h + (hw % W).to(tl.int64) * s_w


# The split of H*W aims for _WAVES programs per SM, counting _NOMINAL_BLOCK_C channels a program
# (the tuned BLOCK_C varies), in chunks of at least _MIN_CHUNK pixels: fewer are not worth a
# partial sum. Interpreted, the "device" gets _WAVES programs and chunks are small, so that the
# tests' small shapes take the split path too.
_WAVES = 4
_NOMINAL_BLOCK_C = 64
_MIN_CHUNK = 16 if INTERPRETED else 512


def _hw_chunk(x: torch.Tensor) -> tuple[int, int]:
    """(chunk, splits): each program reduces ``chunk`` consecutive pixels of H*W; more than one
    split only when N * C alone leaves the GPU idle."""
    n, c, h, w = x.shape
    tiles = n * cdiv(c, _NOMINAL_BLOCK_C)
    splits = max(1, min(cdiv(_WAVES * _triton.multiprocessors(x.device), tiles), cdiv(h * w, _MIN_CHUNK)))
    chunk = cdiv(h * w, splits)
    return chunk, cdiv(h * w, chunk)


def _reduction_output(x: torch.Tensor, splits: int, dtype: torch.dtype) -> torch.Tensor:
    """Where a (N, C) reduction over H*W lands: the result itself, or fp32 partials per split,
    split-major so that ``sum_rows`` adds them."""
    n, c = x.shape[:2]
    if splits == 1:
        return torch.empty((n, c), dtype=dtype, device=x.device)
    return torch.empty((splits, n, c), dtype=torch.float32, device=x.device)


def _finish(reduced: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (N, C) result in ``dtype`` from ``_reduction_output``'s tensor."""
    if reduced.dim() == 2:
        return reduced
    splits, n, c = reduced.shape
    return sum_rows(reduced.view(splits, n * c), torch.empty((n, c), dtype=dtype, device=reduced.device))


_HW_TILE_CONFIGS = [
    triton.Config({"BLOCK_HW": bhw, "BLOCK_C": bc}, num_warps=warps)
    for bhw, bc, warps in [(64, 32, 4), (16, 128, 4), (128, 16, 4), (32, 128, 8)]
]
# a tail in both directions on the tests' small shapes (C = 17, H*W > 32)
_HW_TILE_INTERPRETED = triton.Config({"BLOCK_HW": 32, "BLOCK_C": 16})
# N is in the key as the grid grows with it; the channel stride brings in the layout: 1 for
# channels_last, H*W for NCHW
_HW_REDUCE_KEY = ["N", "C", "HW", "CHUNK", "s_xc"]
# Sizes that only bound loops and split indices: not specialised on (== 1, divisible by 16), which
# would compile a kernel per shape class. C and the strides are: they decide vector loads.
_HW_NO_SPECIALIZE = ["N", "HW", "W", "CHUNK", "SPLITS"]


# ---------------------------------------------------------------------------------------------
# squeeze


@launcher
@autotune(_HW_TILE_CONFIGS, _HW_REDUCE_KEY, interpreted=_HW_TILE_INTERPRETED)
@triton.jit(do_not_specialize=_HW_NO_SPECIALIZE)
def _squeeze_kernel(
    x_ptr, out_ptr, N, C, HW, W, CHUNK, SPLITS, inv_hw,
    s_xn, s_xc, s_xh, s_xw,
    FLAT: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # grid (N * SPLITS, cdiv(C, BLOCK_C)): out[(split,) n, c] = sum of x[n, c, chunk] / HW
    n = tl.program_id(0) // SPLITS
    split = tl.program_id(0) % SPLITS
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    x_base = x_ptr + n.to(tl.int64) * s_xn + c[None, :].to(tl.int64) * s_xc
    acc = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
    for hw0 in range(start, end, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = (hw[:, None] < end) & (c[None, :] < C)
        x = tl.load(x_base + _hw_offsets(hw, W, s_xh, s_xw, FLAT)[:, None], mask=mask, other=0.0)
        acc += widen(x)
    # out is (N, C) when SPLITS == 1, else (SPLITS, N, C): the same flat index either way
    out = tl.sum(acc, axis=0) * inv_hw
    tl.store(out_ptr + (split.to(tl.int64) * N + n) * C + c, cast(out, out_ptr.dtype.element_ty), mask=c < C)


@IMPLS["squeeze"].register("triton")
@_triton_entry
def squeeze(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    chunk, splits = _hw_chunk(x)
    out = _reduction_output(x, splits, x.dtype)
    flat = _hw_flat(x)
    grid = lambda meta: (n * splits, cdiv(c, meta["BLOCK_C"]))  # noqa: E731
    _squeeze_kernel[grid](x, out, n, c, h * w, w, chunk, splits, 1.0 / (h * w), *_strides(x, flat), FLAT=flat)
    return _finish(out, x.dtype)


# ---------------------------------------------------------------------------------------------
# scale and its backward


@launcher
@autotune(_HW_TILE_CONFIGS, ["N", "C", "HW", "s_xc"], interpreted=_HW_TILE_INTERPRETED)
@triton.jit(do_not_specialize=["N", "HW", "W"])
def _scale_kernel(
    x_ptr, gate_ptr, y_ptr, N, C, HW, W,
    s_gn, s_gc, s_xn, s_xc, s_xh, s_xw, s_yn, s_yc, s_yh, s_yw,
    FLAT: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # grid (N * cdiv(HW, BLOCK_HW), cdiv(C, BLOCK_C)): y[n, c, hw] = x[n, c, hw] * gate[n, c]
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    n = (tl.program_id(0) // hw_blocks).to(tl.int64)
    hw = (tl.program_id(0) % hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c64 = c.to(tl.int64)
    mask = (hw[:, None] < HW) & (c[None, :] < C)
    gate = tl.load(gate_ptr + n * s_gn + c64 * s_gc, mask=c < C, other=0.0).to(tl.float32)
    x_off = n * s_xn + c64[None, :] * s_xc + _hw_offsets(hw, W, s_xh, s_xw, FLAT)[:, None]
    y = widen(tl.load(x_ptr + x_off, mask=mask, other=0.0)) * gate[None, :]
    y_off = n * s_yn + c64[None, :] * s_yc + _hw_offsets(hw, W, s_yh, s_yw, FLAT)[:, None]
    tl.store(y_ptr + y_off, cast(y, y_ptr.dtype.element_ty), mask=mask)


@IMPLS["scale"].register("triton")
@_triton_entry
def scale(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    y = empty_like_layout(x, x.shape)
    flat = _hw_flat(x, y)
    grid = lambda meta: (n * cdiv(h * w, meta["BLOCK_HW"]), cdiv(c, meta["BLOCK_C"]))  # noqa: E731
    _scale_kernel[grid](
        x, gate, y, n, c, h * w, w, *gate.stride(), *_strides(x, flat), *_strides(y, flat), FLAT=flat
    )
    return y


@launcher
@autotune(_HW_TILE_CONFIGS, _HW_REDUCE_KEY, interpreted=_HW_TILE_INTERPRETED)
@triton.jit(do_not_specialize=_HW_NO_SPECIALIZE)
def _scale_backward_kernel(
    dy_ptr, x_ptr, gate_ptr, dx_ptr, dgate_ptr, N, C, HW, W, CHUNK, SPLITS,
    s_gn, s_gc, s_dyn, s_dyc, s_dyh, s_dyw, s_xn, s_xc, s_xh, s_xw, s_dxn, s_dxc, s_dxh, s_dxw,
    FLAT: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # grid (N * SPLITS, cdiv(C, BLOCK_C)), over the chunk of H*W of the program's split:
    #   dx = dy * gate                       (y = x * gate)
    #   dgate[(split,) n, c] = sum dy * x    (fp32; the splits' partials are added afterwards)
    n = tl.program_id(0) // SPLITS
    split = tl.program_id(0) % SPLITS
    n64 = n.to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c64 = c[None, :].to(tl.int64)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    gate = tl.load(gate_ptr + n64 * s_gn + c.to(tl.int64) * s_gc, mask=c < C, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
    for hw0 in range(start, end, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = (hw[:, None] < end) & (c[None, :] < C)
        dy_off = n64 * s_dyn + c64 * s_dyc + _hw_offsets(hw, W, s_dyh, s_dyw, FLAT)[:, None]
        x_off = n64 * s_xn + c64 * s_xc + _hw_offsets(hw, W, s_xh, s_xw, FLAT)[:, None]
        dx_off = n64 * s_dxn + c64 * s_dxc + _hw_offsets(hw, W, s_dxh, s_dxw, FLAT)[:, None]
        dy = widen(tl.load(dy_ptr + dy_off, mask=mask, other=0.0))
        x = widen(tl.load(x_ptr + x_off, mask=mask, other=0.0))
        tl.store(dx_ptr + dx_off, cast(dy * gate[None, :], dx_ptr.dtype.element_ty), mask=mask)
        acc += dy * x
    dgate = tl.sum(acc, axis=0)
    tl.store(dgate_ptr + (split.to(tl.int64) * N + n64) * C + c, cast(dgate, dgate_ptr.dtype.element_ty), mask=c < C)


@IMPLS["scale_backward"].register("triton")
@_triton_entry
def scale_backward(grad_y: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    chunk, splits = _hw_chunk(x)
    dx = empty_like_layout(x, x.shape)
    dgate = _reduction_output(x, splits, gate.dtype)
    flat = _hw_flat(grad_y, x, dx)
    grid = lambda meta: (n * splits, cdiv(c, meta["BLOCK_C"]))  # noqa: E731
    _scale_backward_kernel[grid](
        grad_y, x, gate, dx, dgate, n, c, h * w, w, chunk, splits,
        *gate.stride(), *_strides(grad_y, flat), *_strides(x, flat), *_strides(dx, flat), FLAT=flat,
    )  # fmt: skip
    return dx, _finish(dgate, gate.dtype)


# ---------------------------------------------------------------------------------------------
# excite: h = pooled @ w1^T + b1 (N, R); gate = sigmoid(silu(h) @ w2^T + b2) (N, C)
#
# Tiles are multiplied with tl.dot in fp32 ("ieee": no TF32 rounding of the inputs); every dot
# dimension is at least 16, so a batch of 2 fills a BLOCK_N = 16 tile with masked rows.

# BLOCK_C chunks the channels, as output columns (the gate, the per-channel sums) or as the
# reduction of the hidden layer and of dh
_EXCITE_CONFIGS = [
    triton.Config({"BLOCK_N": 16, "BLOCK_C": bc, "BLOCK_R": br}, num_warps=warps)
    for bc, br, warps in [(32, 16, 2), (64, 32, 4), (128, 32, 8)]
]
# The hidden layer's programs are few (a batch of rows by R / BLOCK_R), each reducing over all C:
# wide chunks make fewer serial steps (at C = 3072, 24-96 steps of 32-128). ptxas (sm_90, bf16):
# 80 registers, no spills; the same chunks spilled 1-4 KB in the dh and per-channel kernels.
_EXCITE_HIDDEN_CONFIGS = _EXCITE_CONFIGS + [
    triton.Config({"BLOCK_N": 16, "BLOCK_C": bc, "BLOCK_R": 16}, num_warps=warps) for bc, warps in [(256, 4), (512, 8)]
]


# no channel block wider than the channels (the 32-channel configs always stay)
_prune_excite = prune_wider_than("C", "BLOCK_C", at_least=32)

# tails on the tests' sizes (C = 17, R = 4; C = 72, R = 18 takes several chunks of each)
_EXCITE_INTERPRETED = triton.Config({"BLOCK_N": 16, "BLOCK_C": 32, "BLOCK_R": 16})
_EXCITE_KEY = ["N", "C", "R"]
# tiny matrices, scalar loads: one compiled kernel per config and dtype, whatever the sizes (every
# size and stride argument of the kernels below is left unspecialized)
_EXCITE_SIZES = ["N", "C", "R"]


@triton.jit
def _hidden(p_ptr, w1_ptr, b1_ptr, rows, r, N, C, R, s_pn, s_pc, s_w1r, s_w1c, s_b1,
            BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """h[rows, r] = pooled[rows, :] @ w1[r, :]^T + b1[r] in fp32, 0 where r >= R."""
    h = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        p = tl.load(p_ptr + rows[:, None] * s_pn + k[None, :] * s_pc,
                    mask=(rows[:, None] < N) & (k[None, :] < C), other=0.0)  # fmt: skip
        w1t = tl.load(w1_ptr + r[None, :] * s_w1r + k[:, None] * s_w1c,
                      mask=(r[None, :] < R) & (k[:, None] < C), other=0.0)  # fmt: skip
        h = tl.dot(p.to(tl.float32), w1t.to(tl.float32), h, input_precision="ieee")
    return h + tl.load(b1_ptr + r * s_b1, mask=r < R, other=0.0).to(tl.float32)[None, :]


# The excite runs in phases, each a launch spread over the batch and the channels (the hidden
# layer is a reduction over all C channels, the gate one over all R): one program per row block
# that did it all (the backward) or one per column block that recomputed the hidden layer
# (the forward) took 2.3 ms and 0.6 ms at B5's last block (C = 3072, R = 128, batch 32) on the
# H200, where eager's conv1x1s took 0.01 ms.


@launcher
@autotune(_EXCITE_HIDDEN_CONFIGS, _EXCITE_KEY, interpreted=_EXCITE_INTERPRETED, prune=_prune_excite)
@triton.jit(do_not_specialize=[*_EXCITE_SIZES, "s_pn", "s_pc", "s_w1r", "s_w1c", "s_b1"])
def _excite_hidden_kernel(
    p_ptr, w1_ptr, b1_ptr, h_ptr, N, C, R, s_pn, s_pc, s_w1r, s_w1c, s_b1,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(N, BLOCK_N), cdiv(R, BLOCK_R)): h = pooled @ w1^T + b1 into fp32 scratch (N, R)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = _hidden(p_ptr, w1_ptr, b1_ptr, rows, r, N, C, R, s_pn, s_pc, s_w1r, s_w1c, s_b1,
                BLOCK_N, BLOCK_R, BLOCK_C)  # fmt: skip
    tl.store(h_ptr + rows[:, None] * R + r[None, :], h, mask=(rows[:, None] < N) & (r[None, :] < R))


@launcher
@autotune(_EXCITE_CONFIGS, _EXCITE_KEY, interpreted=_EXCITE_INTERPRETED, prune=_prune_excite)
@triton.jit(do_not_specialize=[*_EXCITE_SIZES, "s_w2c", "s_w2r", "s_b2", "s_dgn", "s_dgc"])
def _excite_gate_kernel(
    h_ptr, w2_ptr, b2_ptr, dg_ptr, out_ptr, N, C, R, s_w2c, s_w2r, s_b2, s_dgn, s_dgc,
    BACKWARD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(N, BLOCK_N), cdiv(C, BLOCK_C)): g = sigmoid(silu(h) @ w2^T + b2) for the
    # program's (rows, cols); out = g, or with BACKWARD the fp32 dlogits = dgate * g (1 - g)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    logits = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + rows[:, None] * R + r[None, :], mask=(rows[:, None] < N) & (r[None, :] < R), other=0.0)
        w2t = tl.load(w2_ptr + cols[None, :] * s_w2c + r[:, None] * s_w2r,
                      mask=(cols[None, :] < C) & (r[:, None] < R), other=0.0)  # fmt: skip
        logits = tl.dot(h * tl.sigmoid(h), w2t.to(tl.float32), logits, input_precision="ieee")
    g = tl.sigmoid(logits + tl.load(b2_ptr + cols * s_b2, mask=cols < C, other=0.0).to(tl.float32)[None, :])
    mask = (rows[:, None] < N) & (cols[None, :] < C)
    out = out_ptr + rows[:, None] * C + cols[None, :]
    if BACKWARD:
        dg = tl.load(dg_ptr + rows[:, None] * s_dgn + cols[None, :] * s_dgc, mask=mask, other=0.0).to(tl.float32)
        tl.store(out, dg * g * (1 - g), mask=mask)
    else:
        tl.store(out, cast(g, out_ptr.dtype.element_ty), mask=mask)


def _matrix(w: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight (out, in, 1, 1) as the (out, in) matrix it is (a view); 2-D as is."""
    return w.flatten(1) if w.dim() == 4 else w


def _hidden_and_gate(pooled, w1m, b1, w2m, b2, out, grad_gate=None) -> torch.Tensor:
    """The forward's two phases: returns the fp32 pre-activation h (N, R); ``out`` gets the gate
    (or, given ``grad_gate``, the fp32 dlogits)."""
    n, c = pooled.shape
    r = w1m.shape[0]
    h = torch.empty((n, r), dtype=torch.float32, device=pooled.device)
    _excite_hidden_kernel[lambda meta: (cdiv(n, meta["BLOCK_N"]), cdiv(r, meta["BLOCK_R"]))](
        pooled, w1m, b1, h, n, c, r, *pooled.stride(), *w1m.stride(), *b1.stride()
    )
    backward = grad_gate is not None
    dg = grad_gate if backward else out  # a placeholder pointer in the forward
    _excite_gate_kernel[lambda meta: (cdiv(n, meta["BLOCK_N"]), cdiv(c, meta["BLOCK_C"]))](
        h, w2m, b2, dg, out, n, c, r, *w2m.stride(), *b2.stride(), *dg.stride(), BACKWARD=backward
    )
    return h


@IMPLS["excite"].register("triton")
@_triton_entry
def excite(pooled, w1, b1, w2, b2) -> torch.Tensor:
    gate = torch.empty(pooled.shape, dtype=pooled.dtype, device=pooled.device)
    _hidden_and_gate(pooled, _matrix(w1), b1, _matrix(w2), b2, gate)
    return gate


@launcher
@autotune(_EXCITE_CONFIGS, _EXCITE_KEY, interpreted=_EXCITE_INTERPRETED, prune=_prune_excite)
@triton.jit(do_not_specialize=[*_EXCITE_SIZES, "s_w2c", "s_w2r"])
def _excite_dh_kernel(
    h_ptr, dl_ptr, w2_ptr, dh_ptr, N, C, R, s_w2c, s_w2r,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(N, BLOCK_N), cdiv(R, BLOCK_R)): dh = (dlogits @ w2) * silu'(h), fp32 (N, R),
    # silu'(h) = s (1 + h (1 - s)) with s = sigmoid(h)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows[:, None] < N
    da = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        dl = tl.load(dl_ptr + rows[:, None] * C + c[None, :], mask=row_mask & (c[None, :] < C), other=0.0)
        w2 = tl.load(w2_ptr + c[:, None] * s_w2c + r[None, :] * s_w2r,
                     mask=(c[:, None] < C) & (r[None, :] < R), other=0.0)  # fmt: skip
        da = tl.dot(dl, w2.to(tl.float32), da, input_precision="ieee")
    mask = row_mask & (r[None, :] < R)
    h = tl.load(h_ptr + rows[:, None] * R + r[None, :], mask=mask, other=0.0)
    s = tl.sigmoid(h)
    tl.store(dh_ptr + rows[:, None] * R + r[None, :], da * s * (1 + h * (1 - s)), mask=mask)


@launcher
@autotune(_EXCITE_CONFIGS, _EXCITE_KEY, interpreted=_EXCITE_INTERPRETED, prune=_prune_excite)
@triton.jit(do_not_specialize=[*_EXCITE_SIZES, "s_pn", "s_pc", "s_w1r", "s_w1c"])
def _excite_backward_columns_kernel(
    p_ptr, w1_ptr, h_ptr, dl_ptr, dh_ptr, dp_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, N, C, R,
    s_pn, s_pc, s_w1r, s_w1c,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(C, BLOCK_C),): what is per channel, for the program's columns; the batch sums
    # over the samples in order (deterministic):
    #   dpooled[:, cols] = dh @ w1[:, cols]
    #   dw2[cols, :] = dlogits[:, cols]^T @ silu(h);   db2[cols] = sum_n dlogits[:, cols]
    #   dw1[:, cols] = dh^T @ pooled[:, cols];         db1 = sum_n dh (by program 0)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        dp = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            nr_mask = (rows[:, None] < N) & (r[None, :] < R)
            dh = tl.load(dh_ptr + rows[:, None] * R + r[None, :], mask=nr_mask, other=0.0)
            w1 = tl.load(w1_ptr + r[:, None] * s_w1r + cols[None, :] * s_w1c,
                         mask=(r[:, None] < R) & col_mask[None, :], other=0.0)  # fmt: skip
            dp = tl.dot(dh, w1.to(tl.float32), dp, input_precision="ieee")
        tl.store(dp_ptr + rows[:, None] * C + cols[None, :], cast(dp, dp_ptr.dtype.element_ty),
                 mask=(rows[:, None] < N) & col_mask[None, :])  # fmt: skip
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        dw2 = tl.zeros([BLOCK_C, BLOCK_R], tl.float32)
        dw1t = tl.zeros([BLOCK_C, BLOCK_R], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            nc_mask = (rows[None, :] < N) & col_mask[:, None]
            nr_mask = (rows[:, None] < N) & (r[None, :] < R)
            dl_t = tl.load(dl_ptr + rows[None, :] * C + cols[:, None], mask=nc_mask, other=0.0)
            p_t = tl.load(p_ptr + rows[None, :] * s_pn + cols[:, None] * s_pc, mask=nc_mask, other=0.0)
            h = tl.load(h_ptr + rows[:, None] * R + r[None, :], mask=nr_mask, other=0.0)
            dh = tl.load(dh_ptr + rows[:, None] * R + r[None, :], mask=nr_mask, other=0.0)
            dw2 = tl.dot(dl_t, h * tl.sigmoid(h), dw2, input_precision="ieee")
            dw1t = tl.dot(p_t.to(tl.float32), dh, dw1t, input_precision="ieee")
        mask = col_mask[:, None] & (r[None, :] < R)
        tl.store(dw2_ptr + cols[:, None] * R + r[None, :], cast(dw2, dw2_ptr.dtype.element_ty), mask=mask)
        tl.store(dw1_ptr + r[None, :] * C + cols[:, None], cast(dw1t, dw1_ptr.dtype.element_ty), mask=mask)
    db2 = tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < N) & col_mask[None, :]
        db2 += tl.sum(tl.load(dl_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(db2_ptr + cols, cast(db2, db2_ptr.dtype.element_ty), mask=col_mask)
    if tl.program_id(0) == 0:
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            db1 = tl.zeros([BLOCK_R], tl.float32)
            for n0 in range(0, N, BLOCK_N):
                rows = n0 + tl.arange(0, BLOCK_N)
                dh = tl.load(dh_ptr + rows[:, None] * R + r[None, :], mask=(rows[:, None] < N) & (r[None, :] < R),
                             other=0.0)  # fmt: skip
                db1 += tl.sum(dh, axis=0)
            tl.store(db1_ptr + r, cast(db1, db1_ptr.dtype.element_ty), mask=r < R)


@IMPLS["excite_backward"].register("triton")
@_triton_entry
def excite_backward(grad_gate, pooled, w1, b1, w2, b2):
    n, c = pooled.shape
    r = w1.shape[0]
    w1m, w2m = _matrix(w1), _matrix(w2)
    dlogits = torch.empty((n, c), dtype=torch.float32, device=pooled.device)
    h = _hidden_and_gate(pooled, w1m, b1, w2m, b2, dlogits, grad_gate)
    dh = torch.empty((n, r), dtype=torch.float32, device=pooled.device)
    _excite_dh_kernel[lambda meta: (cdiv(n, meta["BLOCK_N"]), cdiv(r, meta["BLOCK_R"]))](
        h, dlogits, w2m, dh, n, c, r, *w2m.stride()
    )
    dpooled = torch.empty((n, c), dtype=pooled.dtype, device=pooled.device)
    dw1, db1, dw2, db2 = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (w1, b1, w2, b2))
    _excite_backward_columns_kernel[lambda meta: (cdiv(c, meta["BLOCK_C"]),)](
        pooled, w1m, h, dlogits, dh, dpooled, dw1, db1, dw2, db2, n, c, r, *pooled.stride(), *w1m.stride()
    )
    return dpooled, dw1, db1, dw2, db2
