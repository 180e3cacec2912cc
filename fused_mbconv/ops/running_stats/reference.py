"""Reference implementation of the running-statistics update in torch ops (the CPU path and the
ground truth of the kernel)."""

from __future__ import annotations

import torch


def update(running_mean, running_var, mean, var, momentum: float, count: int) -> None:
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)
