"""Reference implementation of the running-statistics ops in torch ops (the CPU path and the
ground truth of the kernels)."""

from __future__ import annotations

import torch


def update(running_mean, running_var, mean, var, momentum: float, count: int) -> None:
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)


def fold_dtype(running_var: torch.Tensor) -> torch.dtype:
    """The fold's dtype: fp64 for fp64 statistics, else fp32."""
    return torch.float64 if running_var.dtype == torch.float64 else torch.float32


def fold(weight, bias, running_mean, running_var, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    acc = fold_dtype(running_var)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    scale = invstd if weight is None else weight.to(acc) * invstd
    shift = -running_mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    return scale, shift
