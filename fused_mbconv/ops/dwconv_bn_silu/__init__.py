"""The fused depthwise conv + BatchNorm + SiLU ops: schemas, input checks, fakes, autograd.

Three ops share one contract (x (N, C, H, W), weight (C, 1, k, k), k in {3, 5}, stride 1 or 2,
padding (top, bottom, left, right), any float dtype, NCHW or channels_last):

- ``fused_mbconv::dwconv_bn_silu``: inference, y = silu(scale * conv(x) + shift) with BN folded
  into per-channel ``scale``/``shift``; or, given ``running_mean`` and ``running_var``, eval-mode
  BN unfolded (``scale``, ``shift`` its weight and bias), y = silu(scale * (conv(x) -
  running_mean) / sqrt(running_var + eps) + shift), folded inside the kernel: a fold of its own
  would be a launch per call. Returns (y, squeeze), squeeze = mean of y over (Ho, Wo) as (N, C)
  when ``with_squeeze``, else an empty tensor.
- ``fused_mbconv::dwconv_bn_silu_train``: training; batch statistics of conv(x) computed inside,
  y = silu(gamma * (conv(x) - mean) / sqrt(var + eps) + beta). Returns (y, squeeze, mean, var)
  with the biased batch variance; running statistics are updated by the caller from these
  (see ``fused_mbconv.nn.functional``).
- ``fused_mbconv::dwconv_bn_silu_backward``: gradients of either, recomputing conv(x) instead of
  storing it. Inference is the case mean = 0, invstd = 1, gamma = scale, beta = shift.

Each backend ("reference", "triton", "cuda") registers its implementation in ``IMPLS``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fused_mbconv import _extension
from fused_mbconv import backends as _backend
from fused_mbconv._checks import check_nonempty_batch, check_same_device, check_tensor, empty_like_layout
from fused_mbconv.ops import _eager
from fused_mbconv.ops._registry import Implementations
from fused_mbconv.ops.dwconv_bn_silu import reference
from fused_mbconv.ops.running_stats import check_running_stats, running_fold, running_fold_backward

KERNEL_SIZES = (3, 5)
STRIDES = (1, 2)

IMPLS = {
    "forward_infer": Implementations("dwconv_bn_silu"),
    "forward_train": Implementations("dwconv_bn_silu_train"),
    "backward": Implementations("dwconv_bn_silu_backward"),
}
for _name, _impls in IMPLS.items():
    _impls.register("reference")(getattr(reference, _name))


def output_size(size: int, k: int, stride: int, pad_before: int, pad_after: int) -> int:
    return (size + pad_before + pad_after - k) // stride + 1


def check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    padding: Sequence[int],
    **per_channel: Optional[torch.Tensor],
) -> tuple[int, int]:
    """Validate the shared contract; returns the output size (Ho, Wo)."""
    check_tensor("x", x, ndim=4)
    check_nonempty_batch("x", x)
    channels = x.shape[1]
    if channels == 0:
        raise ValueError(f"x: expected at least 1 channel, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=4)
    k = weight.shape[-1]
    if weight.shape[2] != weight.shape[3] or k not in KERNEL_SIZES:
        raise ValueError(
            f"weight: expected a square depthwise kernel of size {KERNEL_SIZES}, "
            f"got spatial size {tuple(weight.shape[2:])}"
        )
    check_tensor("weight", weight, shape=(channels, 1, k, k))
    for name, v in per_channel.items():
        if v is not None:
            check_tensor(name, v, shape=(channels,))
    check_same_device(x=x, weight=weight, **per_channel)
    if stride not in STRIDES:
        raise ValueError(f"stride: expected one of {STRIDES}, got {stride}")
    if len(padding) != 4 or any(not 0 <= p < k for p in padding):
        raise ValueError(
            f"padding: expected 4 values (top, bottom, left, right) in [0, {k - 1}] for kernel size {k}, "
            f"got {list(padding)}"
        )
    top, bottom, left, right = padding
    out_h = output_size(x.shape[2], k, stride, top, bottom)
    out_w = output_size(x.shape[3], k, stride, left, right)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"x: spatial size {tuple(x.shape[2:])} is too small for kernel {k}, stride {stride}, "
            f"padding {list(padding)}"
        )
    return out_h, out_w


def _check_grad(name: str, grad: torch.Tensor, shape: Sequence[int], like: torch.Tensor) -> None:
    check_tensor(name, grad, shape=tuple(shape))
    check_same_device(x=like, **{name: grad})


# ---------------------------------------------------------------------------------------------
# inference


@torch.library.custom_op("fused_mbconv::dwconv_bn_silu", mutates_args=())
def dwconv_bn_silu(
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
    _check_infer(x, weight, scale, shift, stride, padding, running_mean, running_var, eps)
    impl = IMPLS["forward_infer"].pick(x.device, x)
    return impl(x, weight, scale, shift, stride, padding, with_squeeze, running_mean, running_var, eps)


def _check_infer(x, weight, scale, shift, stride, padding, running_mean, running_var, eps):
    out_hw = check_inputs(x, weight, stride, padding, scale=scale, shift=shift, running_mean=running_mean,
                          running_var=running_var)  # fmt: skip
    check_running_stats(running_mean, running_var, eps)
    return out_hw


@dwconv_bn_silu.register_fake
def _(x, weight, scale, shift, stride, padding, with_squeeze, running_mean=None, running_var=None, eps=0.0):
    out_h, out_w = _check_infer(x, weight, scale, shift, stride, padding, running_mean, running_var, eps)
    y = empty_like_layout(x, (x.shape[0], x.shape[1], out_h, out_w))
    squeeze = x.new_empty((x.shape[0], x.shape[1]) if with_squeeze else (0,))
    return y, squeeze


def _setup_infer(ctx, inputs, output):
    x, weight, scale, shift, stride, padding, with_squeeze, running_mean, running_var, eps = inputs
    ctx.save_for_backward(x, weight, scale, shift, running_mean, running_var)
    ctx.stride, ctx.padding, ctx.with_squeeze, ctx.eps = stride, padding, with_squeeze, eps


def _backward_infer(ctx, grad_y, grad_squeeze):
    x, weight, scale, shift, running_mean, running_var = ctx.saved_tensors
    bn = (scale, shift, running_mean, running_var, ctx.eps)
    folded_scale, folded_shift = running_fold(*bn)
    stats = folded_scale.new_zeros(folded_scale.shape, dtype=_stats_dtype(x))
    dx, dweight, dscale, dshift = _eager.call(
        dwconv_bn_silu_backward,
        grad_y, grad_squeeze if ctx.with_squeeze else None, x, weight, folded_scale, folded_shift,
        stats, stats + 1, ctx.stride, ctx.padding, False,
    )  # fmt: skip
    dscale, dshift, dmean, dvar = running_fold_backward(*bn, dscale, dshift)
    return dx, dweight, dscale, dshift, None, None, None, dmean, dvar, None


dwconv_bn_silu.register_autograd(_backward_infer, setup_context=_setup_infer)


# ---------------------------------------------------------------------------------------------
# training


@torch.library.custom_op("fused_mbconv::dwconv_bn_silu_train", mutates_args=())
def dwconv_bn_silu_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    stride: int,
    padding: Sequence[int],
    with_squeeze: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out_h, out_w = check_inputs(x, weight, stride, padding, gamma=gamma, beta=beta)
    _check_batch_statistics(x, out_h, out_w)
    impl = IMPLS["forward_train"].pick(x.device, x)
    return impl(x, weight, gamma, beta, eps, stride, padding, with_squeeze)


def _check_batch_statistics(x: torch.Tensor, out_h: int, out_w: int) -> None:
    if x.shape[0] * out_h * out_w < 2:
        # the same rule as nn.BatchNorm2d: a variance needs at least two values per channel
        raise ValueError(
            f"x: training needs more than 1 value per channel for batch statistics, got input "
            f"{tuple(x.shape)} giving output size {(x.shape[0], x.shape[1], out_h, out_w)}"
        )


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@dwconv_bn_silu_train.register_fake
def _(x, weight, gamma, beta, eps, stride, padding, with_squeeze):
    out_h, out_w = check_inputs(x, weight, stride, padding, gamma=gamma, beta=beta)
    _check_batch_statistics(x, out_h, out_w)
    y = empty_like_layout(x, (x.shape[0], x.shape[1], out_h, out_w))
    squeeze = x.new_empty((x.shape[0], x.shape[1]) if with_squeeze else (0,))
    mean = x.new_empty((x.shape[1],), dtype=_stats_dtype(x))
    return y, squeeze, mean, torch.empty_like(mean)


def _setup_train(ctx, inputs, output):
    x, weight, gamma, beta, eps, stride, padding, with_squeeze = inputs
    y, _, mean, var = output
    ctx.mark_non_differentiable(mean, var)  # batch statistics feed the running averages only
    # no zero-filled gradients for outputs that got none (the statistics always, and the squeeze
    # when unused): each would be a kernel launch per call
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, gamma, beta, mean, var)
    ctx.eps, ctx.stride, ctx.padding, ctx.with_squeeze, ctx.y_shape = eps, stride, padding, with_squeeze, y.shape


def _backward_train(ctx, grad_y, grad_squeeze, _grad_mean, _grad_var):
    if grad_y is None and grad_squeeze is None:  # no gradient reached the outputs (none is materialized)
        return (None,) * 8
    x, weight, gamma, beta, mean, var = ctx.saved_tensors
    if grad_y is None:  # only the squeeze was used
        grad_y = x.new_zeros(ctx.y_shape)
    dx, dweight, dgamma, dbeta = _eager.call(
        dwconv_bn_silu_backward,
        grad_y, grad_squeeze if ctx.with_squeeze else None, x, weight, gamma, beta,
        mean, torch.rsqrt(var + ctx.eps), ctx.stride, ctx.padding, True,
    )  # fmt: skip
    return dx, dweight, dgamma, dbeta, None, None, None, None


dwconv_bn_silu_train.register_autograd(_backward_train, setup_context=_setup_train)


# ---------------------------------------------------------------------------------------------
# backward


@torch.library.custom_op("fused_mbconv::dwconv_bn_silu_backward", mutates_args=())
def dwconv_bn_silu_backward(
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
    _check_backward(grad_y, grad_squeeze, x, weight, gamma, beta, mean, invstd, stride, padding)
    impl = IMPLS["backward"].pick(x.device, x)
    return impl(grad_y, grad_squeeze, x, weight, gamma, beta, mean, invstd, stride, padding, training)


def _check_backward(grad_y, grad_squeeze, x, weight, gamma, beta, mean, invstd, stride, padding):
    out_h, out_w = check_inputs(x, weight, stride, padding, gamma=gamma, beta=beta, mean=mean, invstd=invstd)
    _check_grad("grad_y", grad_y, (x.shape[0], x.shape[1], out_h, out_w), x)
    if grad_squeeze is not None:
        _check_grad("grad_squeeze", grad_squeeze, (x.shape[0], x.shape[1]), x)


@dwconv_bn_silu_backward.register_fake
def _(grad_y, grad_squeeze, x, weight, gamma, beta, mean, invstd, stride, padding, training):
    _check_backward(grad_y, grad_squeeze, x, weight, gamma, beta, mean, invstd, stride, padding)
    return (
        empty_like_layout(x, x.shape),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(gamma),
        torch.empty_like(beta),
    )


# The other backends register themselves in IMPLS when imported, where they can run.
if _backend.triton_importable():
    from fused_mbconv.ops.dwconv_bn_silu import triton_impl  # noqa: E402, F401
if _extension.loaded():
    from fused_mbconv.ops.dwconv_bn_silu import cuda_impl  # noqa: E402, F401
