"""What the Triton backends of the ops share: autotuning, rounding casts and a dot that the
interpreter computes right, Chan's merge of (count, mean, M2), a deterministic sum of partial
rows, and the host-side plumbing (launch device, multiprocessor count, the fp64 fallback to the
reference). The per-op choices (tile configs,
tuning keys, how a reduction is split) stay in each op's ``triton_impl``.

FUSED_MBCONV_TRITON_AUTOTUNE=0 skips the tuning of every kernel (first config), for test sweeps
over many shapes. Before a new shape is tuned, its candidate configs are compiled side by side in
threads (compiling, not timing, is most of a first call's cost); FUSED_MBCONV_COMPILE_THREADS=1
compiles them one by one as triton does.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.language as tl
import triton.testing

from fused_mbconv.backends import triton_interpreted
from fused_mbconv.ops._launch import launcher
from fused_mbconv.ops._registry import reference_fallback

INTERPRETED = triton_interpreted()


# ---------------------------------------------------------------------------------------------
# autotuning


def autotuning_enabled() -> bool:
    return os.environ.get("FUSED_MBCONV_TRITON_AUTOTUNE", "1") != "0"


def _quick_bench(fn, quantiles=None):
    # the default (25 ms warm-up, 100 ms of repeats per config) is far longer than these
    # kernels need to rank configs, and every new shape pays it
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def compile_threads() -> int:
    return int(os.environ.get("FUSED_MBCONV_COMPILE_THREADS", min(8, os.cpu_count() or 1)))


def precompile(jit_fn, configs: list[triton.Config], named_args: dict, call_kwargs: dict) -> None:
    """Compile ``jit_fn`` for each config of one call (its arguments ``named_args`` and
    ``call_kwargs``, as the autotuner's prune hook sees them) in a pool of threads, into the
    kernel cache that the autotuner's timed launches then hit. Triton's own asynchronous compile
    mode does the work (the same specialization and cache keys as a launch); a config that fails
    to compile fails again, with the autotuner's handling, when it is launched. Without that mode
    (a triton that lacks it, or one already active around this call) the autotuner compiles as
    usual."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode, active_mode
    except ImportError:
        return
    if active_mode.get() is not None:
        return
    # triton 3.6's autotuner hands the prune hook the launch's own grid and warmup flags too
    launch_kwargs = {k: v for k, v in call_kwargs.items() if k not in ("grid", "warmup")}
    with ThreadPoolExecutor(min(len(configs), compile_threads())) as pool:
        with AsyncCompileMode(pool, ignore_errors=True):
            for cfg in configs:
                jit_fn.warmup(grid=(1,), **named_args, **launch_kwargs, **cfg.all_kwargs())


def autotune(
    configs: list[triton.Config],
    key: list[str],
    *,
    interpreted: triton.Config | None = None,
    prune=None,
    **kwargs,
):
    """``triton.autotune`` over ``configs``, keyed on ``key``, timed briefly (``do_bench=`` to
    override) and remembered on disk. ``prune(configs, named_args, **kwargs) -> configs``
    (triton's early_config_prune signature) drops configs before any is compiled; with
    autotuning disabled only the first config left runs. Other ``kwargs`` go to
    ``triton.autotune`` (reset_to_zero, ...).

    Under the interpreter (which runs a kernel in numpy, one program at a time, tuning would run
    it once per config) only ``interpreted`` runs, by default ``configs[0]``."""
    if INTERPRETED:
        return triton.autotune(configs=[configs[0] if interpreted is None else interpreted], key=key, **kwargs)

    tuned = {"compare": True}  # the JITFunction, once decorated; whether the last prune left a choice

    def early_prune(configs, named_args, **call_kwargs):
        kept = prune(configs, named_args, **call_kwargs) if prune is not None else configs
        if not autotuning_enabled():
            kept = kept[:1]
        tuned["compare"] = len(kept) > 1
        if tuned["compare"] and compile_threads() > 1:
            precompile(tuned["fn"], kept, named_args, call_kwargs)
        return kept

    def bench(fn, quantiles=None):
        # triton 3.6's autotuner times the one config a prune leaves (3.8 takes it untimed): each
        # new shape's first call then ran its kernel for ~25 ms more, with autotuning off too
        # (the GPU test sweeps: ~1000 shapes), and twice in all under the stand-in driver
        if not tuned["compare"]:
            return [0.0] * len(quantiles) if quantiles else 0.0
        return _quick_bench(fn, quantiles)

    kwargs.setdefault("do_bench", bench)
    # the timings per shape are kept in triton's on-disk cache: the next process on this machine
    # does not time the candidates again (their compiled code is in that cache already)
    kwargs.setdefault("cache_results", True)
    decorate = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": early_prune}, **kwargs)

    def decorator(fn):
        tuned["fn"] = fn
        return decorate(fn)

    return decorator


def prune_wider_than(size_arg: str, block_arg: str, at_least: int):
    """An ``autotune`` prune: drop configs whose ``block_arg`` block is wider than the launch's
    ``size_arg`` rounded up to a power of 2 (and ``at_least``): masked lanes do no work. Where
    none fits, the narrowest config stays."""

    def prune(configs, named_args, **kwargs):
        widest = max(at_least, next_power_of_2({**named_args, **kwargs}[size_arg]))
        kept = [cfg for cfg in configs if cfg.kwargs[block_arg] <= widest]
        return kept or [min(configs, key=lambda cfg: cfg.kwargs[block_arg])]

    return prune


# ---------------------------------------------------------------------------------------------
# device helpers

# Triton's interpreter casts fp32 -> bf16 by truncation (it ignores the rounding mode), where
# the GPU rounds to nearest even: under the interpreter, round in the bits before the cast.
_ROUND_BF16_IN_BITS: tl.constexpr = tl.constexpr(INTERPRETED)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """fp32 ``x`` in ``dtype``, rounded to nearest even (what the GPU's cast does)."""
    if _ROUND_BF16_IN_BITS:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            x = (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def widen(x):
    """``x`` (a loaded fp32, fp16 or bf16 tile) in fp32. bf16 is the high half of an fp32, so its
    bits are shifted into place: one integer instruction an element (the odd channel of a pair a
    mask, the even one a shift), where ``.to(tl.float32)`` took a byte permute and a shift for
    every odd one (sm_90 SASS of the depthwise kernel: 96 conversion instructions per row of
    taps for 64 elements, now 64)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def mul_rounded(a, b):
    """a * b for tiles of one dtype, in that dtype, rounded once to nearest even. On the GPU a
    16-bit product is one instruction per pair of elements (mul.bf16x2 / mul.f16x2 on sm_90: the
    exact product rounded once, the very result of widening both, multiplying in fp32 - exact
    for 8- and 11-bit mantissas - and casting back, which took 3-4 instructions an element: in
    the gated projection GEMM's loop, 128 x 128 tile, 137 -> 93 SASS instructions per step of 32
    in K). The interpreter rounds bf16 by truncation: there, that fp32 path."""
    if _ROUND_BF16_IN_BITS:
        return cast(widen(a) * widen(b), a.dtype)
    return a * b


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s parallel update of (count, mean, M2 = sum of squared deviations):
    delta = mean_b - mean_a, n = n_a + n_b,
    mean = mean_a + delta * n_b / n, M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
    Unlike E[c^2] - E[c]^2 it never subtracts two large numbers, so fp32 holds up when the
    mean is large against the spread. Counts are whole numbers; two empty sets merge to (0, 0, 0)
    where the means are 0. Counts may be a column (one per row of means): their products are
    then taken once a row."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac_b = n_b / tl.maximum(n, 1.0)
    return n, mean_a + delta * frac_b, m2_a + m2_b + delta * delta * (n_a * frac_b)


@triton.jit
def merge_rows(n_rows, mean_rows, m2_rows):
    """(count, mean, M2) of a block of partial rows (counts (ROWS,), means and M2s (ROWS, C)),
    merged in one step: mean = sum(n_r mean_r) / n, M2 = sum(M2_r + n_r (mean_r - mean)^2).
    Rows with count 0 (and mean 0) drop out; a block of only such rows gives (0, 0, 0)."""
    n = tl.sum(n_rows, axis=0)
    mean = tl.sum(n_rows[:, None] * mean_rows, axis=0) / tl.maximum(n, 1.0)
    dev = mean_rows - mean[None, :]
    return n, mean, tl.sum(m2_rows + n_rows[:, None] * dev * dev, axis=0)


# Triton's interpreter multiplies fp16/bf16 tl.dot operands wrongly (triton 3.8: errors of 1e10
# on a 16 x 16 bf16 product): interpreted, the operands go up to fp32 first, which gives the
# exact products the tensor cores make.
_DOT_IN_FP32: tl.constexpr = tl.constexpr(INTERPRETED)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation, ``PRECISION`` as tl.dot's input_precision; with "tf32",
    fp32 operands are first rounded to TF32 as cuDNN and cuBLAS round them."""
    if _DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        if PRECISION == "tf32":
            if a.dtype == tl.float32:
                a = round_to_tf32(a)
            if b.dtype == tl.float32:
                b = round_to_tf32(b)
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def round_to_tf32(x):
    """fp32 ``x`` rounded to the nearest TF32 value (10 stored mantissa bits), ties away from zero
    (PTX's cvt.rna.tf32.f32); infinities and NaNs unchanged. tl.dot's "tf32" hands the tensor
    cores fp32 bits, which drop the low 13 (truncation): every product then comes out smaller in
    magnitude, a bias that adds up along K instead of averaging out. On the H200 (2026-11-27)
    that made the fused fp32 models' logits 3.5-4.5x further from float64 than eager's TF32 convs."""
    bits = x.to(tl.int32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    # +half a TF32 unit on the magnitude bits, then clear the 13 low bits: a carry into the
    # exponent is the correct round up (to infinity past the largest finite value)
    rounded = (bits + 0x1000) & -8192
    return tl.where(finite, rounded, bits).to(tl.float32, bitcast=True)


# The interpreter runs no PTX: there sigmoid is tl.sigmoid (FUSED_MBCONV_PTX_SIGMOID=0: everywhere).
_PTX_SIGMOID: tl.constexpr = tl.constexpr(not INTERPRETED and os.environ.get("FUSED_MBCONV_PTX_SIGMOID", "1") != "0")


@triton.jit
def sigmoid(z):
    """1 / (1 + exp(-z)) for fp32 z as two approximate special-function instructions (ex2 and
    rcp, flushing denormals: within 2 ulp of fp32 where the exp is). tl.sigmoid's exp guards
    denormal results and its division large denominators, 8-10 instructions an element where
    these take 4: in the fused BN + SiLU epilogues that was half their arithmetic (sm_90 SASS)."""
    if _PTX_SIGMOID:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [z * -1.4426950408889634],
                                      dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [e + 1.0],
                                         dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
    else:
        return tl.sigmoid(z)


@triton.jit
def below(idx, n, ALIGN: tl.constexpr):
    """The mask idx < n for channel indices idx (runs of ALIGN consecutive values starting at
    multiples of ALIGN) and a channel count n that is a multiple of ALIGN (``vector_alignment``):
    written so that the compiler sees it constant over each run, and masked loads and stores stay
    whole vectors. Triton learns divisibility only from arguments divisible by 16: rows of 24, 40
    or 112 channels would otherwise move one element per instruction (sm_90 SASS of the projection
    GEMM). The row offsets need the same claim, as ``tl.multiple_of(rows, ALIGN)`` where they are
    computed (on a function's argument it is lost)."""
    if ALIGN > 1:
        return (idx // ALIGN) < (n // ALIGN)
    return idx < n


@triton.jit
def aligned(n, ALIGN: tl.constexpr):
    """A count n that is a multiple of ALIGN (``vector_alignment``), written so that the compiler
    knows it too (as ``below``): offsets of n * rows or n elements then stay whole vectors."""
    if ALIGN > 1:
        return (n // ALIGN) * ALIGN
    return n


@triton.jit
def running_invstd(var_ptr, cs, mask, eps):
    """1 / sqrt(running_var + eps) of channels cs, correctly rounded as torch's sqrt and division
    (the fold op's and the depthwise kernel's eval-mode BN; the GEMM's epilogue, where these
    subroutine calls spilled, takes the approximate rsqrt)."""
    var = tl.load(var_ptr + cs, mask=mask, other=1.0).to(tl.float32)
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))


# A stats-merge program reads _STATS_BLOCK partial elements (BLOCK_G rows x BLOCK_C channels) a
# step; past _STATS_SERIAL_STEPS steps in one program the merge takes two levels (another launch).
_STATS_BLOCK, _STATS_SERIAL_STEPS = 4096, 8


@triton.jit
def _merge_row_range(count_part_ptr, mean_part_ptr, m2_part_ptr, cs, mask_c, C, first, end,
                     BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """(count, mean, M2) of channels cs merged over the partial rows first <= row < end,
    BLOCK_G rows a step in a fixed order (rows of count 0 drop out)."""
    count = 0.0
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for g0 in range(first, end, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        ok_g = gs < end
        n_g = tl.load(count_part_ptr + gs, mask=ok_g, other=0.0)
        mask = ok_g[:, None] & mask_c[None, :]
        offs = gs.to(tl.int64)[:, None] * C + cs[None, :]
        mean_g = tl.load(mean_part_ptr + offs, mask=mask, other=0.0)
        m2_g = tl.load(m2_part_ptr + offs, mask=mask, other=0.0)
        count, mean, m2 = chan_merge(count, mean, m2, *merge_rows(n_g, mean_g, m2_g))
    return count, mean, m2


@launcher
@triton.jit
def _merge_stats_kernel(
    count_part_ptr, mean_part_ptr, m2_part_ptr, count_out_ptr, mean_out_ptr, m2_out_ptr, C, rows, chunk,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The first level of a two-level merge: grid (cdiv(C, BLOCK_C), cdiv(rows, chunk)), program
    (j, s) merges rows [s * chunk, (s + 1) * chunk) of channel block j into output row s."""
    split = tl.program_id(1)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cs < C
    first = split * chunk
    count, mean, m2 = _merge_row_range(count_part_ptr, mean_part_ptr, m2_part_ptr, cs, mask_c, C, first,
                                       tl.minimum(first + chunk, rows), BLOCK_G, BLOCK_C)  # fmt: skip
    tl.store(mean_out_ptr + split * C + cs, mean, mask=mask_c)
    tl.store(m2_out_ptr + split * C + cs, m2, mask=mask_c)
    if tl.program_id(0) == 0:
        tl.store(count_out_ptr + split, count)


@launcher
@triton.jit
def _combine_stats_kernel(
    count_part_ptr, mean_part_ptr, m2_part_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, scale_ptr, shift_ptr,
    eps, C, rows, AFFINE: tl.constexpr, SHIFT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Merge per-row (count, mean, M2) partials into the mean and the biased variance M2 / count
    of every channel. With AFFINE also the BN's scale = gamma / sqrt(var + eps), with SHIFT its
    shift = beta - mean * scale."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cs < C
    count, mean, m2 = _merge_row_range(count_part_ptr, mean_part_ptr, m2_part_ptr, cs, mask_c, C, 0, rows,
                                       BLOCK_G, BLOCK_C)  # fmt: skip
    var = m2 / count
    tl.store(mean_ptr + cs, mean, mask=mask_c)
    tl.store(var_ptr + cs, var, mask=mask_c)
    if AFFINE:
        scale = tl.load(gamma_ptr + cs, mask=mask_c, other=0.0).to(tl.float32) / tl.sqrt(var + eps)
        tl.store(scale_ptr + cs, scale, mask=mask_c)
        if SHIFT:
            shift = tl.load(beta_ptr + cs, mask=mask_c, other=0.0).to(tl.float32) - mean * scale
            tl.store(shift_ptr + cs, shift, mask=mask_c)


# Partial rows are summed _SUM_BLOCK_G rows at a time, _SUM_BLOCK_L columns per program.
_SUM_BLOCK_G, _SUM_BLOCK_L = 32, 128


@launcher
@triton.jit
def _sum_rows_kernel(part_ptr, out_ptr, rows, L, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[l] = sum over rows of part[row, l], in fp32, in a fixed order (deterministic)."""
    ls = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = ls < L
    acc = tl.zeros((BLOCK_L,), tl.float32)
    for g0 in range(0, rows, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        mask = (gs < rows)[:, None] & mask_l[None, :]
        acc += tl.sum(tl.load(part_ptr + gs[:, None] * L + ls[None, :], mask=mask, other=0.0), axis=0)
    tl.store(out_ptr + ls, cast(acc, out_ptr.dtype.element_ty), mask=mask_l)


# ---------------------------------------------------------------------------------------------
# host side


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints as a plain int (triton.cdiv is a constexpr function since triton
    3.8: ~10x slower on the host, where launch code calls it per grid dimension). A grid function's
    meta-parameters can arrive as tl.constexpr: int() unwraps them (a constexpr left in a launch
    grid made the interpreter launch too few programs)."""
    return -(-int(a) // int(b))


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1), as a plain int (see ``cdiv``)."""
    return 1 << (int(n) - 1).bit_length()


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The SM count of a CUDA ``device``; 1 for any other device (the interpreter's CPU)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def vector_alignment(*tensors: torch.Tensor | None) -> int:
    """ALIGN for ``below`` and the kernels' tl.multiple_of row offsets, for kernels addressing
    these tensors (None: absent) by rows of channels: 16 bytes' worth of elements of the widest
    dtype when every tensor has unit stride along dim 1 (the channels), a channel count, every
    other stride and its data address all multiples of 16 bytes (channels_last with C % 8 == 0
    in 16-bit, C % 4 == 0 in fp32; contiguous 2-D weights likewise); else 1, no claim (NCHW,
    odd channel counts, sliced views; FUSED_MBCONV_VECTOR_HINTS=0: always)."""
    if os.environ.get("FUSED_MBCONV_VECTOR_HINTS", "1") == "0":
        return 1
    align = 0
    for t in tensors:  # on every launch: plain loops (this was a tenth of a model's host time)
        if t is None:
            continue
        step = 16 // t.element_size()
        shape, strides = t.shape, t.stride()
        if strides[1] != 1 or shape[1] % step or t.data_ptr() % 16:
            return 1
        for d, s in enumerate(strides):
            if d != 1 and s % step and shape[d] > 1:
                return 1
        align = step if align == 0 else min(align, step)
    return max(align, 1)


def device_of(t: torch.Tensor):
    """Launch on ``t``'s GPU whatever the current device is (a no-op for interpreted CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def sum_rows(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (any shape, contiguous, L elements, any float dtype) = the fp32 ``part`` (rows, L),
    contiguous, summed over rows in a fixed order: a deterministic end to a split reduction."""
    rows, length = part.shape
    if part.dtype != torch.float32 or not part.is_contiguous():
        raise ValueError(f"part: expected a contiguous fp32 tensor, got {part.dtype}, strides {part.stride()}")
    if out.numel() != length or not out.is_contiguous():
        raise ValueError(f"out: expected {length} contiguous elements, got shape {tuple(out.shape)}")
    grid = (cdiv(length, _SUM_BLOCK_L),)
    _sum_rows_kernel[grid](part, out, rows, length, BLOCK_G=_SUM_BLOCK_G, BLOCK_L=_SUM_BLOCK_L)
    return out


def _first_level_rows(rows: int, block_g: int) -> int:
    """Rows per program of a two-level merge's first level, or 0 for one level. Its steps p and
    the second level's, about rows / (p * block_g^2), are balanced: p ~ sqrt(steps / block_g)
    (13024 rows of 32: 3 and 5 steps; of 128: 1 and 1). Interpreted, 4 rows from 5 rows on, so
    that the CPU tests' few partial rows go through both levels."""
    if INTERPRETED:
        return 4 if rows > 4 else 0
    steps = cdiv(rows, block_g)
    if steps <= _STATS_SERIAL_STEPS:
        return 0
    return max(1, math.isqrt(steps // block_g)) * block_g


def combine_stats(
    count_part: torch.Tensor,
    mean_part: torch.Tensor,
    m2_part: torch.Tensor,
    rows: int | None = None,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean, biased variance, scale, shift) per channel, fp32, of the first ``rows`` (default:
    all) partial rows: ``count_part`` (rows,), ``mean_part`` and ``m2_part`` (rows, C), fp32 and
    contiguous, each row the exact (count, mean, M2) of a disjoint set of positions. Chan's merge
    in a fixed order: deterministic, and sound when the mean is large against the spread. With
    ``gamma`` (C,) also the BN's scale = gamma / sqrt(var + eps), and with ``beta`` its shift =
    beta - mean * scale, in the same launch (else None): as torch ops they were a kernel launch
    each, and launches are what the host spends its time on."""
    rows = count_part.shape[0] if rows is None else rows
    c = mean_part.shape[1]
    f32 = {"dtype": torch.float32, "device": mean_part.device}
    block_c = min(128, max(16, next_power_of_2(c)))
    block_g = _STATS_BLOCK // block_c
    chunk = _first_level_rows(rows, block_g)
    if chunk:
        # one program merging all rows took 407 serial steps (13024 rows of a B5 projection's
        # GEMM tiles): two levels take a few each
        splits = cdiv(rows, chunk)
        merged = torch.empty(splits, **f32), torch.empty((splits, c), **f32), torch.empty((splits, c), **f32)
        _merge_stats_kernel[(cdiv(c, block_c), splits)](
            count_part, mean_part, m2_part, *merged, c, rows, chunk, BLOCK_G=block_g, BLOCK_C=block_c
        )
        (count_part, mean_part, m2_part), rows = merged, splits
    mean, var = torch.empty(c, **f32), torch.empty(c, **f32)
    scale = torch.empty(c, **f32) if gamma is not None else None
    shift = torch.empty(c, **f32) if gamma is not None and beta is not None else None
    _combine_stats_kernel[(cdiv(c, block_c),)](
        count_part, mean_part, m2_part, mean, var,
        mean if gamma is None else gamma.contiguous(), mean if beta is None else beta.contiguous(),
        mean if scale is None else scale, mean if shift is None else shift, float(eps), c, rows,
        AFFINE=scale is not None, SHIFT=shift is not None, BLOCK_G=block_g, BLOCK_C=block_c,
    )  # fmt: skip
    return mean, var, scale, shift


def triton_entry(reference_module, *, empty: bool = False):
    """A decorator for an op's Triton implementation: ``_registry.reference_fallback`` (fp64, and
    with ``empty`` empty, calls run the reference), and the kernels launched on the device of the
    first tensor argument, whatever the current device is."""

    def decorator(fn):
        @functools.wraps(fn)
        def on_input_device(*args, **kwargs):
            first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            with device_of(first):
                return fn(*args, **kwargs)

        return reference_fallback(reference_module, empty=empty)(on_input_device)

    return decorator
