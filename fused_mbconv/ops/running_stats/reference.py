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


def fold_backward(weight, bias, running_mean, running_var, eps: float, grad_scale, grad_shift) -> list:
    """Gradients of ``fold`` for (weight, bias, running_mean, running_var) from those of (scale,
    shift), either None when it got none; None for an absent weight or bias."""
    acc = fold_dtype(running_var)
    zeros = torch.zeros(running_mean.shape, dtype=acc, device=running_mean.device)
    dshift = zeros if grad_shift is None else grad_shift.to(acc)
    mean = running_mean.to(acc)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    gamma = invstd.new_ones(()) if weight is None else weight.to(acc)
    # shift depends on scale: scale's total gradient is its own minus the shift's through it
    dscale = (zeros if grad_scale is None else grad_scale.to(acc)) - dshift * mean
    return [
        None if weight is None else (dscale * invstd).to(weight.dtype),
        None if bias is None else dshift.to(bias.dtype),
        (-dshift * gamma * invstd).to(running_mean.dtype),
        (dscale * gamma * -0.5 * invstd**3).to(running_var.dtype),
    ]
