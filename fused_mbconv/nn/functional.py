"""Functional forms of the fused blocks: BatchNorm bookkeeping (folding, running statistics,
momentum) and padding rules around the raw ops, so modules stay thin.

Shapes: x (N, C, H, W); weight (C, 1, k, k); BN vectors (C,).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fused_mbconv import ops
from fused_mbconv.ops._eager import call


def symmetric_padding(kernel_size: int) -> list[int]:
    """PyTorch-style "same" padding: k // 2 on every side (top, bottom, left, right)."""
    p = kernel_size // 2
    return [p, p, p, p]


def tf_same_padding(height: int, width: int, kernel_size: int, stride: int) -> list[int]:
    """TensorFlow "SAME" padding for an input of (height, width): output ceil(size / stride),
    the odd pixel of padding going after (bottom, right), as TF-ported checkpoints expect."""

    def split(size: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
        return total // 2, total - total // 2

    top, bottom = split(height)
    left, right = split(width)
    return [top, bottom, left, right]


def _update_running_stats(running_mean, running_var, mean, var, y, momentum: float) -> None:
    """nn.BatchNorm2d's update from the batch ``mean`` and biased ``var`` of ``y``'s channels:
    a lerp by ``momentum``, the variance made unbiased."""
    if running_mean is None or running_var is None:
        return
    count = y.shape[0] * y.shape[2] * y.shape[3]
    with torch.no_grad():
        call(ops.update_running_stats, running_mean, running_var, mean, var, momentum, count)


def _running_stats(running_mean, running_var) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval mode's statistics. They are folded with the BN's weight and bias inside the op's
    kernel on every call: a fold kept between calls would miss the writes that bypass version
    counters (``p.data.mul_()``, CUDA graph replays, the fused ops' own running-statistics
    kernel), and a fold of its own would be one more launch a call."""
    if running_mean is None or running_var is None:
        raise ValueError("running_mean, running_var: expected tensors when training is False, got None")
    return running_mean, running_var


def _batch_norm_affine(bn_weight, bn_bias, channels: int, like: torch.Tensor):
    """(gamma, beta) of a BN, ones and zeros for affine=False."""
    gamma = bn_weight if bn_weight is not None else like.new_ones(channels, dtype=torch.float32)
    beta = bn_bias if bn_bias is not None else like.new_zeros(channels, dtype=torch.float32)
    return gamma, beta


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on ``device_type``, or None when autocast is off there (or,
    as on "meta", does not exist: asking torch would raise)."""
    # cuda and cpu have autocast: asking torch.amp.is_autocast_available about them broke
    # torch.compile(fullgraph=True) on torch 2.11, whose dynamo cannot trace it
    available = device_type in ("cuda", "cpu") or torch.amp.is_autocast_available(device_type)
    if available and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    # the ops are opaque to autocast: cast the activation the way eager conv2d would under AMP
    dtype = autocast_dtype(x.device.type)
    return x if dtype is None else x.to(dtype)


def dwconv_bn_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    *,
    training: bool,
    momentum: float,
    eps: float,
    stride: int,
    padding: list[int],
    with_squeeze: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """silu(BatchNorm2d(depthwise_conv(x))) with nn.BatchNorm2d's semantics.

    Arguments follow ``torch.nn.functional.batch_norm``: with ``training`` normalise with the
    batch's statistics and, when running buffers are given, update them in place with factor
    ``momentum`` (unbiased variance); otherwise normalise with the running statistics (folded
    with weight and bias inside the op's kernel).
    Returns (y, squeeze): squeeze is the (N, C) mean of y over its spatial dims, or None.
    """
    x = _autocast_input(x)
    gamma, beta = _batch_norm_affine(bn_weight, bn_bias, x.shape[1], x)
    if training:
        op = ops.dwconv_bn_silu_train
        y, squeeze, mean, var = call(op, x, weight, gamma, beta, eps, stride, padding, with_squeeze)
        _update_running_stats(running_mean, running_var, mean, var, y, momentum)
    else:
        stats = _running_stats(running_mean, running_var)
        y, squeeze = call(ops.dwconv_bn_silu, x, weight, gamma, beta, stride, padding, with_squeeze, *stats, eps)
    return y, (squeeze if with_squeeze else None)


def squeeze_excite(
    x: torch.Tensor,
    reduce_weight: torch.Tensor,
    reduce_bias: torch.Tensor,
    expand_weight: torch.Tensor,
    expand_bias: torch.Tensor,
    pooled: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x * sigmoid(W2 silu(W1 mean_hw(x) + b1) + b2); ``pooled`` (N, C) skips the squeeze when the
    producer of x already computed it (the depthwise kernel's by-product)."""
    x = _autocast_input(x)
    if pooled is None:
        pooled = call(ops.se_squeeze, x)
    return call(ops.se_scale, x, se_gate(pooled, reduce_weight, reduce_bias, expand_weight, expand_bias))


def se_gate(
    pooled: torch.Tensor,
    reduce_weight: torch.Tensor,
    reduce_bias: torch.Tensor,
    expand_weight: torch.Tensor,
    expand_bias: torch.Tensor,
) -> torch.Tensor:
    """sigmoid(W2 silu(W1 pooled + b1) + b2): the squeeze-excite gate (N, C) from pooled (N, C)."""
    return call(ops.se_excite, _autocast_input(pooled), reduce_weight, reduce_bias, expand_weight, expand_bias)


def project_bn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    *,
    training: bool,
    momentum: float,
    eps: float,
    gate: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    branch_scale: Optional[torch.Tensor] = None,
    silu: bool = False,
) -> torch.Tensor:
    """branch_scale * act(BatchNorm2d(conv1x1(x * gate))) + residual, one fused op (act: SiLU with
    ``silu``, else none), with nn.BatchNorm2d's semantics (``training``, ``momentum``, running
    buffers as ``dwconv_bn_silu``).

    x (N, C, H, W); weight (O, C, 1, 1); gate (N, C) (the SE's); residual (N, O, H, W) (the
    block's input); branch_scale (N,) (stochastic depth's per-sample factor). Returns (N, O, H, W).
    """
    x = _autocast_input(x)
    if gate is not None:
        gate = gate.to(x.dtype)
    gamma, beta = _batch_norm_affine(bn_weight, bn_bias, weight.shape[0], x)
    if training:
        y, _, mean, var = call(ops.project_bn_train, x, gate, weight, gamma, beta, eps, residual, branch_scale, silu)
        _update_running_stats(running_mean, running_var, mean, var, y, momentum)
        return y
    stats = _running_stats(running_mean, running_var)
    return call(ops.project_bn, x, gate, weight, gamma, beta, residual, branch_scale, silu, *stats, eps)
