"""Reference implementation of the depthwise conv + BatchNorm + SiLU ops, in plain torch ops.

It is the CPU path and the ground truth the fused kernels are tested against: it computes in
fp32 (fp64 for fp64 inputs) and casts back, like the kernels do. Shapes: x (N, C, H, W),
weight (C, 1, k, k), per-channel vectors (C,), y (N, C, Ho, Wo), squeeze (N, C).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fused_mbconv._checks import empty_like_layout
from fused_mbconv.ops.running_stats import running_fold


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _padded(x: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    top, bottom, left, right = padding
    return F.pad(x.to(compute_dtype(x)), (left, right, top, bottom))


def conv(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: Sequence[int]) -> torch.Tensor:
    """The depthwise convolution alone, in the compute dtype."""
    xp = _padded(x, padding)
    return F.conv2d(xp, weight.to(xp.dtype), stride=stride, groups=x.shape[1])


def _per_channel(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).view(1, -1, 1, 1)


def _outputs(x: torch.Tensor, y: torch.Tensor, with_squeeze: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out = empty_like_layout(x, y.shape)
    out.copy_(y)
    squeeze = y.mean(dim=(2, 3)).to(x.dtype) if with_squeeze else x.new_empty(0)
    return out, squeeze


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
    scale, shift = running_fold(scale, shift, running_mean, running_var, eps, by_op=False)
    c = conv(x, weight, stride, padding)
    y = F.silu(c * _per_channel(scale, c.dtype) + _per_channel(shift, c.dtype))
    return _outputs(x, y, with_squeeze)


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
    c = conv(x, weight, stride, padding)
    var, mean = torch.var_mean(c, dim=(0, 2, 3), unbiased=False)
    xhat = (c - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + eps).view(1, -1, 1, 1)
    y = F.silu(xhat * _per_channel(gamma, c.dtype) + _per_channel(beta, c.dtype))
    out, squeeze = _outputs(x, y, with_squeeze)
    return out, squeeze, mean, var


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
    xp = _padded(x, padding)
    wc = weight.to(xp.dtype)
    c = F.conv2d(xp, wc, stride=stride, groups=x.shape[1])  # recompute: c and z are never stored
    xhat = (c - _per_channel(mean, c.dtype)) * _per_channel(invstd, c.dtype)
    z = xhat * _per_channel(gamma, c.dtype) + _per_channel(beta, c.dtype)
    dy = grad_y.to(c.dtype)
    if grad_squeeze is not None:
        # squeeze = mean over (Ho, Wo) of y, so each y element gets grad_squeeze / (Ho * Wo)
        dy = dy + grad_squeeze.to(c.dtype)[:, :, None, None] / (c.shape[2] * c.shape[3])
    sig = torch.sigmoid(z)
    dz = dy * sig * (1 + z * (1 - sig))  # silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
    dbeta = dz.sum(dim=(0, 2, 3))
    dgamma = (dz * xhat).sum(dim=(0, 2, 3))
    a = _per_channel(gamma, c.dtype) * _per_channel(invstd, c.dtype)
    if training:
        # batch statistics depend on c: dc = a * (dz - mean(dz) - xhat * mean(dz * xhat))
        m = c.shape[0] * c.shape[2] * c.shape[3]
        dc = a * (dz - (dbeta.view(1, -1, 1, 1) + xhat * dgamma.view(1, -1, 1, 1)) / m)
    else:
        dc = a * dz
    dxp, dw, _ = torch.ops.aten.convolution_backward(
        dc, xp, wc, None, [stride, stride], [0, 0], [1, 1], False, [0, 0], x.shape[1], [True, True, False]
    )
    top, _, left, _ = padding
    dx = empty_like_layout(x, x.shape)
    dx.copy_(dxp[:, :, top : top + x.shape[2], left : left + x.shape[3]])
    return dx, dw.to(weight.dtype).contiguous(), dgamma.to(gamma.dtype), dbeta.to(beta.dtype)
