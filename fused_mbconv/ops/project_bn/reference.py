"""Reference implementation of the projection ops in plain torch ops (fp32 math, fp64 for fp64
inputs and for the CPU's batch statistics and backward, cast back): the CPU path and the ground
truth of the kernels.

Shapes: x (N, C, H, W); gate (N, C) or None; weight (O, C) or (O, C, 1, 1); per-channel vectors
(O,); residual (N, O, H, W) or None; branch_scale (N,) or None; y and z (N, O, H, W).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fused_mbconv._checks import empty_like_layout
from fused_mbconv.ops.running_stats import running_fold


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _backward_acc(t: torch.Tensor) -> torch.dtype:
    # On the CPU, fp64: eager's CPU kernels accumulate fp32 sums in double (at::acc_type), and
    # the gate's gradient is a sum over every position of a GEMM's output; matching eager's
    # accuracy there in fp32 is a coin toss. On the GPU, fp32 like the kernels.
    return torch.float64 if t.device.type == "cpu" else _acc(t)


def _matrix(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1).to(dtype)


def _gated(x: torch.Tensor, gate: Optional[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    """x * gate in ``acc``."""
    xf = x.to(acc)
    return xf if gate is None else xf * gate.to(xf.dtype)[:, :, None, None]


def _project(x: torch.Tensor, gate: Optional[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """z = weight @ (x * gate) over channels, in the compute dtype."""
    xg = _gated(x, gate, _acc(x))
    return torch.einsum("oc,nchw->nohw", _matrix(weight, xg.dtype), xg)


def _per_channel(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype)[None, :, None, None]


def _epilogue(x, normalized, residual, branch_scale, silu: bool) -> torch.Tensor:
    """branch_scale * act(normalized) + residual, in x's dtype and layout."""
    y = F.silu(normalized) if silu else normalized
    if branch_scale is not None:
        y = y * branch_scale.to(y.dtype)[:, None, None, None]
    if residual is not None:
        y = y + residual.to(y.dtype)
    out = empty_like_layout(x, y.shape)
    return out.copy_(y)


def forward_infer(x, gate, weight, scale, shift, residual, branch_scale, silu, running_mean=None, running_var=None,
                  eps=0.0) -> torch.Tensor:  # fmt: skip
    scale, shift = running_fold(scale, shift, running_mean, running_var, eps, by_op=False)
    z = _project(x, gate, weight)
    normalized = z * _per_channel(scale, z.dtype) + _per_channel(shift, z.dtype)
    return _epilogue(x, normalized, residual, branch_scale, silu)


def forward_train(x, gate, weight, gamma, beta, eps, residual, branch_scale, silu):
    z = _project(x, gate, weight)
    # statistics in fp64 on the CPU, as eager's CPU batch norm accumulates
    zs = z.to(_backward_acc(x))
    mean, var = zs.mean(dim=(0, 2, 3)), zs.var(dim=(0, 2, 3), unbiased=False)
    zhat = (zs - mean[None, :, None, None]) * torch.rsqrt(var + eps)[None, :, None, None]
    normalized = zhat * _per_channel(gamma, zs.dtype) + _per_channel(beta, zs.dtype)
    y = _epilogue(x, normalized, residual, branch_scale, silu)
    z_out = empty_like_layout(x, z.shape).copy_(z)
    return y, z_out, mean.to(z.dtype), var.to(z.dtype)


def backward(grad_y, x, gate, weight, z, gamma, beta, mean, invstd, branch_scale, silu, training):
    acc = _backward_acc(x)
    dy = grad_y.to(acc)
    if branch_scale is not None:
        dy = dy * branch_scale.to(acc)[:, None, None, None]
    zhat = (z.to(acc) - _per_channel(mean, acc)) * _per_channel(invstd, acc)
    if silu:  # dy becomes the gradient of the BN output u: silu'(u) = s (1 + u (1 - s)), s = sigmoid(u)
        u = zhat * _per_channel(gamma, acc) + _per_channel(beta, acc)
        s = torch.sigmoid(u)
        dy = dy * s * (1 + u * (1 - s))
    dbeta = dy.sum(dim=(0, 2, 3))
    dgamma = (dy * zhat).sum(dim=(0, 2, 3))
    dz = dy
    if training:  # the batch statistics depend on z too
        count = z.shape[0] * z.shape[2] * z.shape[3]
        dz = dy - (dbeta / count)[None, :, None, None] - zhat * (dgamma / count)[None, :, None, None]
    dz = dz * _per_channel(gamma.to(acc) * invstd.to(acc), acc)
    w = _matrix(weight, acc)
    dxg = torch.einsum("oc,nohw->nchw", w, dz)
    dweight = torch.einsum("nohw,nchw->oc", dz, _gated(x, gate, acc))
    dx = empty_like_layout(x, x.shape)
    if gate is None:
        dx.copy_(dxg)
        dgate = x.new_empty(0)
    else:
        dx.copy_(dxg * gate.to(acc)[:, :, None, None])
        dgate = (dxg * x.to(acc)).sum(dim=(2, 3)).to(gate.dtype)
    return (
        dx,
        dgate,
        dweight.to(weight.dtype).reshape(weight.shape),
        dgamma.to(gamma.dtype),
        dbeta.to(gamma.dtype),
    )
