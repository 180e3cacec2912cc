"""CUDA backend of the depthwise conv + BN + SiLU ops: glue from the op contract to the kernels
of ``fused_mbconv._C`` (device code in kernels/dwconv_bn_silu_*.cu, host code in
csrc/dwconv_bn_silu.cpp). Outputs are allocated here, with the layout rule the fakes use; the
kernels take weights and per-channel vectors as contiguous fp32 and return fp32 statistics and
parameter gradients, cast here to the parameters' dtypes.

Implemented: inference forward (one pass), training forward (batch statistics pass, then the
inference kernel with the batch mean and gamma * invstd) and backward (two passes recomputing the
convolution). Every kernel stages its tile's inputs with their halo in shared memory once and
convolves strips of 4 outputs from there (kernels/dwconv_math.cuh: halo and gather tiles). Calls
with fp64 tensors take the reference path: the kernels compute in fp32.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fused_mbconv._checks import empty_like_layout
from fused_mbconv.ops._registry import reference_fallback
from fused_mbconv.ops.dwconv_bn_silu import IMPLS, output_size, reference
from fused_mbconv.ops.running_stats import running_fold


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()


def _atomic_squeeze(with_squeeze: bool) -> bool:
    """Whether the kernel sums the squeeze (with float atomics, in any order); under
    ``torch.use_deterministic_algorithms(True)`` the squeeze-excite's fixed-order squeeze kernel
    takes it from y instead (``_squeeze``)."""
    return with_squeeze and not torch.are_deterministic_algorithms_enabled()


def _outputs(
    x: torch.Tensor, k: int, stride: int, padding: Sequence[int], with_squeeze: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """y laid out like x, and the zeroed fp32 (N, C) buffer the kernel adds the squeeze sums to
    (None when it does not)."""
    n, c, h, w = x.shape
    top, bottom, left, right = padding
    y = empty_like_layout(x, (n, c, output_size(h, k, stride, top, bottom), output_size(w, k, stride, left, right)))
    squeeze_sum = x.new_zeros((n, c), dtype=torch.float32) if _atomic_squeeze(with_squeeze) else None
    return y, squeeze_sum


def _squeeze(x: torch.Tensor, y: torch.Tensor, squeeze_sum: Optional[torch.Tensor], with_squeeze: bool) -> torch.Tensor:
    if not with_squeeze:
        return x.new_empty(0)
    if squeeze_sum is None:
        pooled = torch.empty((y.shape[0], y.shape[1]), dtype=y.dtype, device=y.device)
        torch.ops.fused_mbconv_cuda.se_squeeze(y, pooled)
        return pooled
    return (squeeze_sum / (y.shape[2] * y.shape[3])).to(x.dtype)


@IMPLS["forward_infer"].register("cuda")
@reference_fallback(reference)
def forward_infer(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    stride: int,
    padding: Sequence[int],
    with_squeeze: bool,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    scale, shift = running_fold(scale, shift, running_mean, running_var, eps)  # the kernel takes the fold
    y, squeeze_sum = _outputs(x, weight.shape[-1], stride, padding, with_squeeze)
    torch.ops.fused_mbconv_cuda.dwconv_bn_silu_infer(
        x, _f32(weight), _f32(scale), _f32(shift), stride, list(padding), y, squeeze_sum
    )
    return y, _squeeze(x, y, squeeze_sum, with_squeeze)


@IMPLS["forward_train"].register("cuda")
@reference_fallback(reference)
def forward_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    stride: int,
    padding: Sequence[int],
    with_squeeze: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, squeeze_sum = _outputs(x, weight.shape[-1], stride, padding, with_squeeze)
    mean = x.new_empty((x.shape[1],), dtype=torch.float32)  # (C,) batch mean of conv(x)
    var = torch.empty_like(mean)  # (C,) biased batch variance
    torch.ops.fused_mbconv_cuda.dwconv_bn_silu_train(
        x, _f32(weight), _f32(gamma), _f32(beta), eps, stride, list(padding), y, squeeze_sum, mean, var
    )
    return y, _squeeze(x, y, squeeze_sum, with_squeeze), mean, var


@IMPLS["backward"].register("cuda")
@reference_fallback(reference)
def backward(
    grad_y: torch.Tensor,
    grad_squeeze: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    stride: int,
    padding: Sequence[int],
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x = empty_like_layout(x, x.shape)
    grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=x.device)  # (C, 1, k, k)
    grad_gamma = x.new_empty((x.shape[1],), dtype=torch.float32)
    grad_beta = torch.empty_like(grad_gamma)
    torch.ops.fused_mbconv_cuda.dwconv_bn_silu_backward(
        grad_y.to(x.dtype), None if grad_squeeze is None else _f32(grad_squeeze), x, _f32(weight), _f32(gamma),
        _f32(beta), _f32(mean), _f32(invstd), stride, list(padding), training, grad_x, grad_weight, grad_gamma,
        grad_beta,
    )  # fmt: skip
    return grad_x, grad_weight.to(weight.dtype), grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype)
