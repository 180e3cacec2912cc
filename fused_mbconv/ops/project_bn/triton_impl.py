"""Triton backend of the projection ops (see ``__init__``): a GEMM over channels whose prologue
multiplies each input channel by its sample's SE gate and whose epilogue applies the BatchNorm,
the stochastic-depth factor and the residual.

The GEMM is (positions x C) @ (C x O). A tile holds BLOCK_M positions of one sample, so the gate
is one (BLOCK_K,) vector per step of the channel loop, and the per-sample sums of the backward
stay inside a program. Tensors are addressed as (n, channel, flat hw) through their strides, so
NCHW and channels_last run the same code (other layouts are copied to channels_last first).

Memory passes (x: the wide input, C channels; y, z, dy, dz: O channels, a sixth of x in MBConv):

- inference: one pass: reads x (and the residual), writes y. The gated x never exists in memory.
- training forward: pass 1 reads x, writes z and per-tile (mean, M2) partials of z; pass 2 reads
  z (and the residual), writes y.
- backward: reads dy and z for the BN backward's two sums; writes dz; GEMM dz @ W reads dz, x and
  writes dx with the gate's gradient (per-tile partials); GEMM dz^T @ (x * gate) reads dz and x for
  the weight's gradient (split over positions, partials summed in a fixed order).

Every reduction is deterministic (partials, then a fixed-order sum). fp32 inputs multiply in
TF32 when torch allows it for convolutions (``torch.backends.cudnn.allow_tf32``, what the eager
1x1 conv does), else in full fp32; fp16/bf16 inputs multiply in their dtype with fp32
accumulation, the gated x rounded to that dtype as eager's ``x * gate`` is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_mbconv._checks import empty_like_layout, memory_format_of
from fused_mbconv.ops import _triton
from fused_mbconv.ops._launch import launcher
from fused_mbconv.ops._triton import cast, cdiv, sigmoid, vector_alignment
from fused_mbconv.ops.project_bn import IMPLS, reference

# ---------------------------------------------------------------------------------------------
# configurations


def _gemm_configs(triples):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in triples
    ]


# (BLOCK_M positions, BLOCK_N output channels, BLOCK_K reduced channels, warps, stages)
_GEMM_CONFIGS = _gemm_configs([
    (64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
    (128, 32, 64, 4, 4), (64, 32, 64, 4, 4),
    # for the wide reductions (B5's last projections reduce 1056-3072 channels): per 32 of K, the
    # gated loop issues 72 instructions here against 93 at BLOCK_K 32 (sm_90 SASS, no spills)
    (128, 128, 64, 8, 3),
])  # fmt: skip
# the interpreter runs one program at a time in numpy: tails in every direction on the tests'
# small shapes (C = 24, O = 20, H*W = 45)
_GEMM_INTERPRETED = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16})


# no output-channel block wider than the output channels
_prune_gemm = _triton.prune_wider_than("N_COLS", "BLOCK_N", at_least=16)


_MIN_BLOCK_M = min(cfg.kwargs["BLOCK_M"] for cfg in (*_GEMM_CONFIGS, _GEMM_INTERPRETED))


def _gemm_autotune(key):
    return _triton.autotune(_GEMM_CONFIGS, key, interpreted=_GEMM_INTERPRETED, prune=_prune_gemm)


# elementwise / reduction tiles over (positions, channels) of the narrow tensors
_TILE_CONFIGS = [
    triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w) for p, c, w in [(64, 32, 4), (32, 64, 4), (128, 32, 8)]
]
_TILE_INTERPRETED = triton.Config({"BLOCK_P": 32, "BLOCK_C": 16})


def _tile_autotune(key):
    return _triton.autotune(_TILE_CONFIGS, key, interpreted=_TILE_INTERPRETED)


def gemm_precision(x: torch.Tensor) -> str:
    """tl.dot's input precision for activations ``x``: TF32 for fp32 on a GPU when torch allows
    it for convolutions (as eager's 1x1 conv), else IEEE fp32 (fp16/bf16 ignore it)."""
    if x.dtype == torch.float32 and not (torch.backends.cudnn.allow_tf32 and x.is_cuda):
        return "ieee"
    return "tf32"  # the default: TF32 for fp32 operands, ignored for fp16/bf16


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _offsets(n64, p, c, s_n, s_c, s_p, ALIGN: tl.constexpr):
    """int64 offsets of the (positions, channels) tile [n, c, p] of a tensor with strides
    (s_n, s_c, s_p), p the flat (h, w) index; ALIGN: what every position's offset is known to be
    a multiple of (``_triton.vector_alignment``)."""
    rows = n64 * s_n + p.to(tl.int64) * s_p
    if ALIGN > 1:
        rows = tl.multiple_of(rows, ALIGN)
    return rows[:, None] + c.to(tl.int64)[None, :] * s_c


@triton.jit
def _gated_tile(x_ptr, gate_ptr, n64, p, mask_p, k, C, s_xn, s_xc, s_xp, s_gn, s_gc, HAS_GATE: tl.constexpr,
                ALIGN: tl.constexpr):
    """x[n, k, p] * gate[n, k] as a (positions, channels) tile in x's dtype, the operand of tl.dot."""
    mask_k = _triton.below(k, C, ALIGN)
    mask = mask_p[:, None] & mask_k[None, :]
    a = tl.load(x_ptr + _offsets(n64, p, k, s_xn, s_xc, s_xp, ALIGN), mask=mask, other=0.0)
    if HAS_GATE:
        g = tl.load(gate_ptr + n64 * s_gn + k * s_gc, mask=mask_k, other=0.0)
        if g.dtype == a.dtype:
            a = _triton.mul_rounded(a, g[None, :])
        else:
            a = cast(_triton.widen(a) * g.to(tl.float32)[None, :], x_ptr.dtype.element_ty)
    return a


@triton.jit
def _tile_position(pid, HW, BLOCK_M: tl.constexpr):
    """Sample and positions of tile ``pid``: tiles never straddle two samples."""
    tiles = tl.cdiv(HW, BLOCK_M)
    n = pid // tiles
    p = (pid - n * tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    return n.to(tl.int64), p, p < HW


@triton.jit
def _activate_and_store(
    y, n64, p, c, mask, bs_ptr, res_ptr, y_ptr, s_rn, s_rc, s_rp, s_yn, s_yc, s_yp,
    ACT: tl.constexpr, HAS_BS: tl.constexpr, HAS_RES: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """The epilogue of both forward kernels: y = bs[n] * act(y) + res, stored in y's dtype
    (act: SiLU with ACT, else the identity)."""
    if ACT:
        y = y * sigmoid(y)
    if HAS_BS:
        y *= tl.load(bs_ptr + n64).to(tl.float32)
    if HAS_RES:
        y += _triton.widen(tl.load(res_ptr + _offsets(n64, p, c, s_rn, s_rc, s_rp, ALIGN), mask=mask, other=0.0))
    tl.store(y_ptr + _offsets(n64, p, c, s_yn, s_yc, s_yp, ALIGN), cast(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_grad(u):
    """silu'(u) = s (1 + u (1 - s)), s = sigmoid(u)."""
    s = sigmoid(u)
    return s * (1.0 + u * (1.0 - s))


# ---------------------------------------------------------------------------------------------
# forward


@launcher
@_gemm_autotune(["C", "N_COLS", "HW", "s_xc"])
@triton.jit(do_not_specialize=["HW"])
def _project_kernel(
    x_ptr, gate_ptr, w_ptr, scale_ptr, shift_ptr, mean_ptr, var_ptr, res_ptr, bs_ptr, y_ptr, count_part_ptr,
    mean_part_ptr, m2_part_ptr, C, N_COLS, HW, eps,
    s_xn, s_xc, s_xp, s_gn, s_gc, s_wo, s_wc, s_rn, s_rc, s_rp, s_yn, s_yc, s_yp,
    HAS_GATE: tl.constexpr, AFFINE: tl.constexpr, NORMALIZE: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_BS: tl.constexpr, STATS: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # grid (N * cdiv(HW, BLOCK_M) * cdiv(O, BLOCK_N),); O is N_COLS.
    #   acc[p, o] = sum_k x[n, k, p] * gate[n, k] * w[o, k]                  (fp32)
    #   AFFINE: y = bs[n] * act(scale[o] * acc + shift[o]) + res[n, o, p]  else y = acc
    #   NORMALIZE (eval-mode BN): scale[o] / sqrt(var[o] + eps) and shift[o] - mean[o] * that
    #   (act: SiLU with ACT, else the identity)
    #   STATS: the tile's (mean, M2) of acc per o, for the batch statistics (Chan's merge later)
    # The output-channel blocks of one position tile are consecutive programs, so they run side
    # by side and x's tile comes from DRAM once, from L2 for the others. With the position tiles
    # fastest, the programs in flight swept all of x once per output block, and an x larger than
    # L2 came from DRAM each time (B5, batch 32: the 29x29 projection 1056 -> 176, 54 MB).
    blocks_o = tl.cdiv(N_COLS, BLOCK_N)
    tile = tl.program_id(0) // blocks_o
    block_o = tl.program_id(0) - tile * blocks_o
    n64, p, mask_p = _tile_position(tile, HW, BLOCK_M)
    o = block_o * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_o = _triton.below(o, N_COLS, ALIGN)
    w_rows = o.to(tl.int64) * s_wo
    if ALIGN > 1:
        w_rows = tl.multiple_of(w_rows, ALIGN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = _gated_tile(x_ptr, gate_ptr, n64, p, mask_p, k, C, s_xn, s_xc, s_xp, s_gn, s_gc, HAS_GATE, ALIGN)
        wt = tl.load(w_ptr + w_rows[None, :] + k[:, None] * s_wc,
                     mask=_triton.below(k, C, ALIGN)[:, None] & mask_o[None, :], other=0.0)  # fmt: skip
        acc = _triton.dot(a, cast(wt.to(tl.float32), x_ptr.dtype.element_ty), acc, PRECISION)
    mask = mask_p[:, None] & mask_o[None, :]
    if STATS:
        # statistics of z as stored (rounded to its dtype), which the backward reads back: with
        # the unrounded mean, sum(z - mean) over the batch would not vanish, and its error would
        # reach the weight gradient through every position
        z = cast(acc, y_ptr.dtype.element_ty).to(tl.float32)
        count = tl.sum(mask_p.to(tl.float32), axis=0)
        mean = tl.sum(z, axis=0) / count  # masked rows hold exact zeros
        dev = tl.where(mask, z - mean[None, :], 0.0)
        row = tile.to(tl.int64) * N_COLS + o
        tl.store(mean_part_ptr + row, mean, mask=mask_o)
        tl.store(m2_part_ptr + row, tl.sum(dev * dev, axis=0), mask=mask_o)
        tl.store(count_part_ptr + tile, count, mask=block_o == 0)
    if AFFINE:
        scale = tl.load(scale_ptr + o, mask=mask_o, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + o, mask=mask_o, other=0.0).to(tl.float32)
        if NORMALIZE:
            # Folded per column as fold_batch_norm does, but with the approximate rsqrt (within
            # 2 ulp; the GEMM's own rounding is far larger): IEEE sqrt and division are
            # subroutines whose register saves, beside the accumulators, spilled (ptxas, sm_90,
            # bf16, unspecialized, 64x128 tiles: 96 bytes of stack without the fold, 144 with
            # them, 96 with rsqrt). Subtracting the mean from the tile instead (the depthwise
            # kernel's way) kept a third per-column vector live there: 704.
            var = tl.load(var_ptr + o, mask=mask_o, other=1.0).to(tl.float32)
            scale *= tl.math.rsqrt(var + eps)
            shift -= tl.load(mean_ptr + o, mask=mask_o, other=0.0).to(tl.float32) * scale
        acc = acc * scale[None, :] + shift[None, :]
    _activate_and_store(acc, n64, p, o, mask, bs_ptr, res_ptr, y_ptr, s_rn, s_rc, s_rp, s_yn, s_yc, s_yp,
                        ACT, HAS_BS, HAS_RES, ALIGN)  # fmt: skip


@launcher
@_tile_autotune(["C", "HW"])
@triton.jit(do_not_specialize=["HW"])
def _normalize_kernel(
    z_ptr, a_ptr, b_ptr, res_ptr, bs_ptr, y_ptr, C, HW,
    s_zn, s_zc, s_zp, s_rn, s_rc, s_rp, s_yn, s_yc, s_yp,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_BS: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # grid (N * cdiv(HW, BLOCK_P), cdiv(C, BLOCK_C)): y = bs[n] * act(a[c] * z + b[c]) + res,
    # a = gamma * invstd and b = beta - mean * a: the BN of the training forward
    n64, p, mask_p = _tile_position(tl.program_id(0), HW, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = _triton.below(c, C, ALIGN)
    mask = mask_p[:, None] & mask_c[None, :]
    z = _triton.widen(tl.load(z_ptr + _offsets(n64, p, c, s_zn, s_zc, s_zp, ALIGN), mask=mask, other=0.0))
    a = tl.load(a_ptr + c, mask=mask_c, other=0.0)
    b = tl.load(b_ptr + c, mask=mask_c, other=0.0)
    y = z * a[None, :] + b[None, :]
    _activate_and_store(y, n64, p, c, mask, bs_ptr, res_ptr, y_ptr, s_rn, s_rc, s_rp, s_yn, s_yc, s_yp,
                        ACT, HAS_BS, HAS_RES, ALIGN)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# backward


@launcher
@_tile_autotune(["C", "HW", "CHUNK"])
@triton.jit(do_not_specialize=["HW", "CHUNK", "SPLITS"])
def _dy_sums_kernel(
    dy_ptr, z_ptr, bs_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, part_ptr, C, HW, CHUNK, SPLITS,
    s_dn, s_dc, s_dp, s_zn, s_zc, s_zp,
    ACT: tl.constexpr, HAS_BS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # grid (N * SPLITS, cdiv(C, BLOCK_C)), each program over one CHUNK of a sample's H*W:
    #   part[row, c] = sum du,  part[row, C + c] = sum du * zhat     (row = n * SPLITS + split)
    #   du = dy * bs[n] (* silu'(u) with ACT, u = gamma * zhat + beta): the gradient of the BN
    #   output u, zhat = (z - mean) * invstd
    n64 = (tl.program_id(0) // SPLITS).to(tl.int64)
    start = (tl.program_id(0) % SPLITS) * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = _triton.below(c, C, ALIGN)
    mean = tl.load(mean_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    sum_dy = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    sum_dyz = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < end)[:, None] & mask_c[None, :]
        dy = _triton.widen(tl.load(dy_ptr + _offsets(n64, p, c, s_dn, s_dc, s_dp, ALIGN), mask=mask, other=0.0))
        z = _triton.widen(tl.load(z_ptr + _offsets(n64, p, c, s_zn, s_zc, s_zp, ALIGN), mask=mask, other=0.0))
        zhat = (z - mean[None, :]) * invstd[None, :]
        if ACT:
            dy *= _silu_grad(zhat * gamma[None, :] + beta[None, :])
        sum_dy += dy
        sum_dyz += tl.where(mask, dy * zhat, 0.0)
    scale = 1.0
    if HAS_BS:
        scale = tl.load(bs_ptr + n64).to(tl.float32)
    row = part_ptr + tl.program_id(0).to(tl.int64) * 2 * C + c
    tl.store(row, tl.sum(sum_dy, axis=0) * scale, mask=mask_c)
    tl.store(row + C, tl.sum(sum_dyz, axis=0) * scale, mask=mask_c)


@launcher
@_tile_autotune(["C", "HW"])
@triton.jit(do_not_specialize=["HW"])
def _dz_kernel(
    dy_ptr, z_ptr, bs_ptr, sums_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, dz_ptr, dgamma_ptr, dbeta_ptr,
    C, HW, inv_count, s_dn, s_dc, s_dp, s_zn, s_zc, s_zp, s_qn, s_qc, s_qp,
    ACT: tl.constexpr, HAS_BS: tl.constexpr, TRAINING: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # grid (N * cdiv(HW, BLOCK_P), cdiv(C, BLOCK_C)): the BN backward, per element
    #   dz = k1[c] * du + k2[c] * z + k3[c], from sums = [sum du | sum du * zhat] over positions:
    #   k1 = gamma * invstd; in training also k2 = -k1 invstd sum(du zhat) / count and
    #   k3 = -k1 sum(du) / count - k2 mean (in inference, k2 = k3 = 0)
    #   du = bs[n] * dy (* silu'(u) with ACT, u = gamma * (z - mean) * invstd + beta)
    # The first tile's programs also write dgamma = sum du zhat and dbeta = sum du. (As torch ops
    # on the host, the coefficients and those copies were 15 kernel launches.)
    n64, p, mask_p = _tile_position(tl.program_id(0), HW, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = _triton.below(c, C, ALIGN)
    mask = mask_p[:, None] & mask_c[None, :]
    mean = tl.load(mean_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    sum_du = tl.load(sums_ptr + c, mask=mask_c, other=0.0)
    sum_duz = tl.load(sums_ptr + C + c, mask=mask_c, other=0.0)
    if tl.program_id(0) == 0:
        tl.store(dgamma_ptr + c, cast(sum_duz, dgamma_ptr.dtype.element_ty), mask=mask_c)
        tl.store(dbeta_ptr + c, cast(sum_du, dbeta_ptr.dtype.element_ty), mask=mask_c)
    k1 = gamma * invstd
    dy = _triton.widen(tl.load(dy_ptr + _offsets(n64, p, c, s_dn, s_dc, s_dp, ALIGN), mask=mask, other=0.0))
    z = _triton.widen(tl.load(z_ptr + _offsets(n64, p, c, s_zn, s_zc, s_zp, ALIGN), mask=mask, other=0.0))
    if HAS_BS:
        dy *= tl.load(bs_ptr + n64).to(tl.float32)
    if ACT:
        beta = tl.load(beta_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
        dy *= _silu_grad((z - mean[None, :]) * (invstd * gamma)[None, :] + beta[None, :])
    dz = dy * k1[None, :]
    if TRAINING:
        k2 = -k1 * invstd * (sum_duz * inv_count)
        k3 = -k1 * (sum_du * inv_count) - k2 * mean
        dz += z * k2[None, :] + k3[None, :]
    tl.store(dz_ptr + _offsets(n64, p, c, s_qn, s_qc, s_qp, ALIGN), cast(dz, dz_ptr.dtype.element_ty), mask=mask)


@launcher
@_gemm_autotune(["N_COLS", "K", "HW", "s_xc"])
@triton.jit(do_not_specialize=["HW"])
def _dx_kernel(
    dz_ptr, w_ptr, x_ptr, gate_ptr, dx_ptr, dgate_part_ptr, N_COLS, K, HW,
    s_qn, s_qc, s_qp, s_wo, s_wc, s_xn, s_xc, s_xp, s_gn, s_gc, s_dxn, s_dxc, s_dxp,
    HAS_GATE: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # grid (N * cdiv(HW, BLOCK_M), cdiv(C, BLOCK_N)); C is N_COLS, O is K (the reduced length).
    #   dxg[p, c] = sum_o dz[n, o, p] * w[o, c]      (the gradient of x * gate)
    #   dx = dxg * gate[n, c];   dgate_part[tile, c] = sum_p dxg * x[n, c, p]
    n64, p, mask_p = _tile_position(tl.program_id(0), HW, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = _triton.below(c, N_COLS, ALIGN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = _triton.below(k, K, ALIGN)
        dz = tl.load(dz_ptr + _offsets(n64, p, k, s_qn, s_qc, s_qp, ALIGN), mask=mask_p[:, None] & mask_k[None, :],
                     other=0.0)  # fmt: skip
        w_rows = k.to(tl.int64) * s_wo
        if ALIGN > 1:
            w_rows = tl.multiple_of(w_rows, ALIGN)
        w = tl.load(w_ptr + w_rows[:, None] + c[None, :] * s_wc,
                    mask=mask_k[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
        acc = _triton.dot(dz, cast(w.to(tl.float32), dz_ptr.dtype.element_ty), acc, PRECISION)
    mask = mask_p[:, None] & mask_c[None, :]
    if HAS_GATE:
        x = _triton.widen(tl.load(x_ptr + _offsets(n64, p, c, s_xn, s_xc, s_xp, ALIGN), mask=mask, other=0.0))
        dgate = tl.sum(acc * x, axis=0)
        tl.store(dgate_part_ptr + tl.program_id(0).to(tl.int64) * N_COLS + c, dgate, mask=mask_c)
        acc *= tl.load(gate_ptr + n64 * s_gn + c * s_gc, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(dx_ptr + _offsets(n64, p, c, s_dxn, s_dxc, s_dxp, ALIGN), cast(acc, dx_ptr.dtype.element_ty), mask=mask)


@launcher
@_gemm_autotune(["C", "N_COLS", "HW", "s_xc"])
@triton.jit(do_not_specialize=["N", "HW"])
def _dweight_kernel(
    dz_ptr, x_ptr, gate_ptr, part_ptr, N, C, N_COLS, HW,
    s_qn, s_qc, s_qp, s_xn, s_xc, s_xp, s_gn, s_gc,
    HAS_GATE: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(O, BLOCK_N), cdiv(C, BLOCK_K), splits); O is N_COLS. The position tiles (BLOCK_M
    # positions of one sample) are dealt out to the splits in consecutive runs:
    #   part[split, o, c] = sum over the split's positions of dz[n, o, p] * x[n, c, p] * gate[n, c]
    o = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    tiles = N * tl.cdiv(HW, BLOCK_M)
    per_split = tl.cdiv(tiles, tl.num_programs(2))
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for t in range(split * per_split, tl.minimum((split + 1) * per_split, tiles)):
        n64, p, mask_p = _tile_position(t, HW, BLOCK_M)
        dz_t = tl.load(dz_ptr + tl.trans(_offsets(n64, p, o, s_qn, s_qc, s_qp, ALIGN)),
                       mask=_triton.below(o, N_COLS, ALIGN)[:, None] & mask_p[None, :], other=0.0)  # fmt: skip
        xg = _gated_tile(x_ptr, gate_ptr, n64, p, mask_p, c, C, s_xn, s_xc, s_xp, s_gn, s_gc, HAS_GATE, ALIGN)
        acc = _triton.dot(dz_t, xg.to(dz_ptr.dtype.element_ty), acc, PRECISION)  # an fp32 dz: x widened, exact
    offs = (split.to(tl.int64) * N_COLS + o[:, None]) * C + c[None, :]
    tl.store(part_ptr + offs, acc, mask=(o < N_COLS)[:, None] & (c < C)[None, :])


# ---------------------------------------------------------------------------------------------
# host side


def _layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its (H, W) walk as one flat index (NCHW, channels_last), else a
    channels_last copy."""
    _, _, h, w = x.shape
    if h == 1 or w == 1 or x.stride(2) == w * x.stride(3):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(s_n, s_c, s_p) of 4-D ``t`` whose (H, W) walk as one flat index p."""
    s_n, s_c, s_h, s_w = t.stride()
    return s_n, s_c, (s_h if t.shape[3] == 1 else s_w)


def _like(x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in ``x``'s memory format, so both walk their positions alike."""
    return None if t is None else _layout(t.contiguous(memory_format=memory_format_of(x)))


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def _tiles(n: int, hw: int, block: int) -> int:
    return n * cdiv(hw, block)


def _project(x, gate, weight, scale, shift, residual, branch_scale, out, stats: bool, act: bool = False,
             running_mean=None, running_var=None, eps: float = 0.0):  # fmt: skip
    """Launch ``_project_kernel`` into ``out``; with ``stats`` returns the per-tile (count, mean,
    M2) partials and the tile height they were made with. With running statistics, ``scale`` and
    ``shift`` are the eval-mode BN's weight and bias."""
    n, c, h, w = x.shape
    o = weight.shape[0]
    wm = _matrix(weight)
    f32 = {"dtype": torch.float32, "device": x.device}
    placeholder = out  # pointer arguments of disabled features are never read
    launch = {}

    def grid(meta):
        launch["rows"] = meta["BLOCK_M"]  # the last call is the launch of the config that runs
        return (_tiles(n, h * w, meta["BLOCK_M"]) * cdiv(o, meta["BLOCK_N"]),)

    # the partials' row count depends on the tile height the tuner picks: size for the smallest
    most = _tiles(n, h * w, _MIN_BLOCK_M)
    parts = [torch.empty(most, **f32), *(torch.empty((most, o), **f32) for _ in range(2))] if stats else [out] * 3
    res = _like(out, residual)
    _project_kernel[grid](
        x, placeholder if gate is None else gate, wm,
        placeholder if scale is None else scale, placeholder if shift is None else shift,
        placeholder if running_mean is None else running_mean.contiguous(),
        placeholder if running_var is None else running_var.contiguous(),
        placeholder if res is None else res, placeholder if branch_scale is None else branch_scale,
        out, *parts, c, o, h * w, float(eps),
        *_strides(x), *(gate.stride() if gate is not None else (0, 0)), *wm.stride(),
        *(_strides(res) if res is not None else (0, 0, 0)), *_strides(out),
        HAS_GATE=gate is not None, AFFINE=scale is not None, NORMALIZE=running_var is not None, ACT=act,
        HAS_RES=res is not None, HAS_BS=branch_scale is not None, STATS=stats, PRECISION=gemm_precision(x),
        ALIGN=vector_alignment(x, wm, res, out),
    )  # fmt: skip
    return (parts, launch["rows"]) if stats else None


@IMPLS["forward_infer"].register("triton")
@_triton.triton_entry(reference)
def forward_infer(x, gate, weight, scale, shift, residual, branch_scale, silu, running_mean=None, running_var=None,
                  eps=0.0) -> torch.Tensor:  # fmt: skip
    x = _layout(x)
    y = empty_like_layout(x, (x.shape[0], weight.shape[0], *x.shape[2:]))
    _project(x, gate, weight, scale.contiguous(), shift.contiguous(), residual, branch_scale, y, stats=False, act=silu,
             running_mean=running_mean, running_var=running_var, eps=eps)  # fmt: skip
    return y


@IMPLS["forward_train"].register("triton")
@_triton.triton_entry(reference)
def forward_train(x, gate, weight, gamma, beta, eps, residual, branch_scale, silu):
    x = _layout(x)
    n, _, h, w = x.shape
    o = weight.shape[0]
    z = empty_like_layout(x, (n, o, h, w))
    y = torch.empty_like(z)
    parts, rows = _project(x, gate, weight, None, None, None, None, z, stats=True)
    # the partial rows of the tiles of the config that ran; the BN's scale a and shift b
    mean, var, a, b = _triton.combine_stats(*parts, rows=_tiles(n, h * w, rows), gamma=gamma, beta=beta, eps=eps)
    res = _like(z, residual)
    bs = branch_scale
    _normalize_kernel[lambda meta: (_tiles(n, h * w, meta["BLOCK_P"]), cdiv(o, meta["BLOCK_C"]))](
        z, a, b, z if res is None else res, z if bs is None else bs, y, o, h * w,
        *_strides(z), *(_strides(res) if res is not None else (0, 0, 0)), *_strides(y),
        ACT=silu, HAS_RES=res is not None, HAS_BS=bs is not None, ALIGN=vector_alignment(z, res, y),
    )  # fmt: skip
    return y, z, mean, var


def _hw_splits(n: int, o: int, hw: int, device: torch.device) -> tuple[int, int]:
    """(chunk, splits) of H*W for a per-sample reduction: more than one split only when the
    samples alone (a program per sample and 32 channels) leave the GPU idle."""
    programs = 4 * _triton.multiprocessors(device)
    splits = max(1, min(cdiv(programs, n * cdiv(o, 32)), cdiv(hw, _MIN_CHUNK)))
    chunk = cdiv(hw, splits)
    return chunk, cdiv(hw, chunk)


# a split of H*W reduces at least this many positions (interpreted: small, so tests split too)
_MIN_CHUNK = 16 if _triton.INTERPRETED else 1024


@IMPLS["backward"].register("triton")
@_triton.triton_entry(reference)
def backward(grad_y, x, gate, weight, z, gamma, beta, mean, invstd, branch_scale, silu, training):
    x = _layout(x)
    n, c, h, w = x.shape
    o = weight.shape[0]
    hw = h * w
    wm = _matrix(weight)
    dy, z = _like(x, grad_y), _like(x, z)
    f32 = {"dtype": torch.float32, "device": x.device}
    bs = dy if branch_scale is None else branch_scale  # a placeholder pointer when absent
    has_bs, has_gate = branch_scale is not None, gate is not None
    gate_arg, gate_strides = (gate, gate.stride()) if has_gate else (x, (0, 0))
    precision = gemm_precision(x)
    # the BN backward's two sums, then dz = its per-element formula
    chunk, splits = _hw_splits(n, o, hw, x.device)
    part = torch.empty((n * splits, 2 * o), **f32)
    per_channel = [v.contiguous() for v in (mean, invstd, gamma, beta)]  # the kernels load them as fp32
    _dy_sums_kernel[lambda meta: (n * splits, cdiv(o, meta["BLOCK_C"]))](
        dy, z, bs, *per_channel, part, o, hw, chunk, splits, *_strides(dy), *_strides(z), ACT=silu, HAS_BS=has_bs,
        ALIGN=vector_alignment(dy, z),
    )  # fmt: skip
    sums = _triton.sum_rows(part, torch.empty(2 * o, **f32))
    # The projection's dz stays fp32 (its O channels are the narrow side). In 16 bits it was an
    # affine function of the 16-bit z rounded again wherever du is constant (the samples that
    # stochastic depth drops: du = 0): rounding errors that follow z, hence x, add up in
    # dweight = sum dz x instead of cancelling (the H200's B0-B7 sweep, bf16: 2-5x eager's error
    # at 4 of its shapes; tests/test_project_bn.py reproduces one). The expansion's dz is the wide
    # tensor and its du = dy silu'(u) varies everywhere: it keeps z's dtype.
    dz = torch.empty_like(z) if silu else torch.empty_like(z, dtype=torch.float32)
    dgamma, dbeta = torch.empty_like(gamma), torch.empty_like(gamma)
    _dz_kernel[lambda meta: (_tiles(n, hw, meta["BLOCK_P"]), cdiv(o, meta["BLOCK_C"]))](
        dy, z, bs, sums, *per_channel, dz, dgamma, dbeta, o, hw, 1.0 / (n * hw),
        *_strides(dy), *_strides(z), *_strides(dz),
        ACT=silu, HAS_BS=has_bs, TRAINING=training, ALIGN=vector_alignment(dy, z, dz),
    )  # fmt: skip

    # dx and the gate's gradient: GEMM dz @ W, per-tile partials of dgate
    dx = empty_like_layout(x, x.shape)
    dgate_part = torch.empty((_tiles(n, hw, _MIN_BLOCK_M), c), **f32) if has_gate else dx
    rows = {}

    def dx_grid(meta):
        rows["dx"] = meta["BLOCK_M"]  # the last call is the launch of the config that runs
        return _tiles(n, hw, meta["BLOCK_M"]), cdiv(c, meta["BLOCK_N"])

    _dx_kernel[dx_grid](
        dz, wm, x, gate_arg, dx, dgate_part, c, o, hw,
        *_strides(dz), *wm.stride(), *_strides(x), *gate_strides, *_strides(dx),
        HAS_GATE=has_gate, PRECISION=precision, ALIGN=vector_alignment(dz, wm, x, dx),
    )  # fmt: skip
    dgate = x.new_empty(0)
    if has_gate:
        tiles_per_sample = cdiv(hw, rows["dx"])
        per_sample = dgate_part[: n * tiles_per_sample].view(n, tiles_per_sample, c)
        dgate = per_sample.sum(dim=1).to(gate.dtype)  # a fixed-order reduction: deterministic

    # the weight's gradient reduces over every position: split them to fill the GPU
    programs = 4 * _triton.multiprocessors(x.device)
    fewest_blocks = min(cdiv(o, cfg.kwargs["BLOCK_N"]) * cdiv(c, cfg.kwargs["BLOCK_K"])
                        for cfg in _GEMM_CONFIGS)  # fmt: skip
    max_splits = max(1, min(_tiles(n, hw, _MIN_BLOCK_M), programs // fewest_blocks))
    part_w = torch.empty((max_splits, o, c), **f32)

    def dweight_grid(meta):
        tiles = _tiles(n, hw, meta["BLOCK_M"])
        blocks = cdiv(o, meta["BLOCK_N"]) * cdiv(c, meta["BLOCK_K"])
        per_split = cdiv(tiles, max(1, min(tiles, programs // blocks)))
        rows["splits"] = cdiv(tiles, per_split)
        return cdiv(o, meta["BLOCK_N"]), cdiv(c, meta["BLOCK_K"]), rows["splits"]

    _dweight_kernel[dweight_grid](
        dz, x, gate_arg, part_w, n, c, o, hw, *_strides(dz), *_strides(x), *gate_strides,
        HAS_GATE=has_gate, PRECISION=precision, ALIGN=vector_alignment(dz, x),
    )  # fmt: skip
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    _triton.sum_rows(part_w[: rows["splits"]].view(rows["splits"], o * c), dweight)
    return dx, dgate, dweight, dgamma, dbeta
