"""The "triton" backend of the running-statistics ops: the update of both buffers, and the fold, each
one launch, in fp32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_mbconv.ops._launch import launcher
from fused_mbconv.ops._triton import cast, cdiv, running_invstd, triton_entry
from fused_mbconv.ops.running_stats import IMPLS, reference

_BLOCK = 256


@launcher
@triton.jit
def _update_kernel(running_mean_ptr, running_var_ptr, mean_ptr, var_ptr, C, momentum, unbias, BLOCK: tl.constexpr):
    cs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cs < C
    old_mean = tl.load(running_mean_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    old_var = tl.load(running_var_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + cs, mask=mask, other=0.0).to(tl.float32) * unbias
    tl.store(running_mean_ptr + cs, cast(old_mean + momentum * (mean - old_mean), running_mean_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip
    tl.store(running_var_ptr + cs, cast(old_var + momentum * (var - old_var), running_var_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip


@IMPLS["update"].register("triton")
@triton_entry(reference)
def update(running_mean, running_var, mean, var, momentum: float, count: int) -> None:
    if not (running_mean.is_contiguous() and running_var.is_contiguous()):
        reference.update(running_mean, running_var, mean, var, momentum, count)  # in place: views stay views
        return
    c = running_mean.shape[0]
    _update_kernel[(cdiv(c, _BLOCK),)](
        running_mean, running_var, mean.contiguous(), var.contiguous(), c, float(momentum), count / (count - 1),
        BLOCK=_BLOCK,
    )  # fmt: skip


@launcher
@triton.jit
def _fold_kernel(weight_ptr, bias_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, C, eps,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    cs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cs < C
    scale = running_invstd(var_ptr, cs, mask, eps)
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    shift = -tl.load(mean_ptr + cs, mask=mask, other=0.0).to(tl.float32) * scale
    if HAS_BIAS:
        shift += tl.load(bias_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    tl.store(scale_ptr + cs, scale, mask=mask)
    tl.store(shift_ptr + cs, shift, mask=mask)


@IMPLS["fold"].register("triton")
@triton_entry(reference)
def fold(weight, bias, running_mean, running_var, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    c = running_mean.shape[0]
    scale, shift = (torch.empty(c, dtype=torch.float32, device=running_mean.device) for _ in range(2))
    mean, var = running_mean.contiguous(), running_var.contiguous()
    _fold_kernel[(cdiv(c, _BLOCK),)](
        mean if weight is None else weight.contiguous(), mean if bias is None else bias.contiguous(), mean, var,
        scale, shift, c, float(eps), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=_BLOCK,
    )  # fmt: skip
    return scale, shift
