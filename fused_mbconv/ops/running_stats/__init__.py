"""BatchNorm's running statistics as ops: their update in training, their fold for inference.

``fused_mbconv::update_running_stats(running_mean, running_var, mean, var, momentum, count)``
advances the (C,) running buffers in place the way nn.BatchNorm2d does in training,

    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var = (1 - momentum) * running_var + momentum * var * count / (count - 1)

from a batch's mean and biased variance over ``count`` values per channel (the unbiased
variance goes into the running one). Any float dtypes; mean and var may differ from the buffers'.

Why an op: in torch ops it was three to five kernel launches per BatchNorm (two lerps, the
unbiasing product and the dtype conversions), on every training step of every fused layer; the
"triton" backend does it in one launch. It mutates its first two arguments, so torch.compile
sees it as the in-place update it is.

``fused_mbconv::fold_batch_norm(weight, bias, running_mean, running_var, eps) -> (scale, shift)``
folds an eval-mode BatchNorm into a per-channel affine map, BN(c) = scale * c + shift:

    scale = weight / sqrt(running_var + eps),   shift = bias - running_mean * scale

in fp32 (fp64 for fp64 statistics), weight and bias None for affine=False; differentiable.
Why an op: in torch ops it was five to ten kernel launches (the dtype conversions of a bf16
model's buffers, the add, rsqrt, products and sum); the "triton" backend does it in one launch.
The fused modules' eval mode does not call it: the inference ops take the running statistics and
fold inside their kernels (no launch at all); their "cuda" depthwise kernel, the backward of
their eval mode and users' own folds do.
"""

from __future__ import annotations

from typing import Optional

import torch

from fused_mbconv import backends as _backend
from fused_mbconv._checks import check_same_device, check_tensor
from fused_mbconv.ops import _eager
from fused_mbconv.ops._registry import Implementations
from fused_mbconv.ops.running_stats import reference

IMPLS = {"update": Implementations("update_running_stats"), "fold": Implementations("fold_batch_norm")}
IMPLS["update"].register("reference")(reference.update)
IMPLS["fold"].register("reference")(reference.fold)


def check_inputs(running_mean, running_var, mean, var, momentum: float, count: int) -> None:
    check_tensor("running_mean", running_mean, ndim=1)
    c = running_mean.shape[0]
    for name, t in (("running_var", running_var), ("mean", mean), ("var", var)):
        check_tensor(name, t, shape=(c,))
    check_same_device(running_mean=running_mean, running_var=running_var, mean=mean, var=var)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1], got {momentum}")
    if count < 2:
        raise ValueError(f"count: expected at least 2 values per channel for an unbiased variance, got {count}")


@torch.library.custom_op("fused_mbconv::update_running_stats", mutates_args=("running_mean", "running_var"))
def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float,
    count: int,
) -> None:
    check_inputs(running_mean, running_var, mean, var, momentum, count)
    IMPLS["update"].pick(running_mean.device, running_mean)(running_mean, running_var, mean, var, momentum, count)


@update_running_stats.register_fake
def _(running_mean, running_var, mean, var, momentum, count):
    check_inputs(running_mean, running_var, mean, var, momentum, count)


# ---------------------------------------------------------------------------------------------
# fold


def check_running_stats(running_mean, running_var, eps: float) -> None:
    """The optional running statistics of the inference ops (shapes are the op's check): both or
    neither, and eps >= 0."""
    if (running_mean is None) != (running_var is None):
        given, missing = ("running_mean", "running_var") if running_var is None else ("running_var", "running_mean")
        raise ValueError(f"{missing}: expected a tensor when {given} is given, got None")
    if not eps >= 0.0:
        raise ValueError(f"eps: expected a value >= 0, got {eps}")


def running_fold(scale, shift, running_mean, running_var, eps: float, *, by_op: bool = True):
    """The (scale, shift) an inference op applies to its conv output: as given, or with running
    statistics given, the fold of the BatchNorm (scale, shift, running_mean, running_var, eps),
    by ``fold_batch_norm`` (one launch on "triton"; traceable, as a backward must be) or, without
    ``by_op``, the reference's torch ops."""
    if running_mean is None:
        return scale, shift
    if not by_op:
        return reference.fold(scale, shift, running_mean, running_var, eps)
    return _eager.call(fold_batch_norm, scale, shift, running_mean, running_var, eps)


def running_fold_backward(scale, shift, running_mean, running_var, eps: float, grad_scale, grad_shift):
    """(dscale, dshift, drunning_mean, drunning_var) from the gradients of ``running_fold``'s
    output."""
    if running_mean is None:
        return grad_scale, grad_shift, None, None
    return tuple(reference.fold_backward(scale, shift, running_mean, running_var, eps, grad_scale, grad_shift))


def _check_fold(weight, bias, running_mean, running_var, eps: float) -> torch.dtype:
    """Validate; returns the dtype of the fold."""
    check_tensor("running_mean", running_mean, ndim=1)
    c = running_mean.shape[0]
    check_tensor("running_var", running_var, shape=(c,))
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, shape=(c,))
    check_same_device(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    check_running_stats(running_mean, running_var, eps)
    return reference.fold_dtype(running_var)


@torch.library.custom_op("fused_mbconv::fold_batch_norm", mutates_args=())
def fold_batch_norm(
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_fold(weight, bias, running_mean, running_var, eps)
    return IMPLS["fold"].pick(running_mean.device, running_mean)(weight, bias, running_mean, running_var, eps)


@fold_batch_norm.register_fake
def _(weight, bias, running_mean, running_var, eps):
    acc = _check_fold(weight, bias, running_mean, running_var, eps)
    return running_mean.new_empty(running_mean.shape, dtype=acc), running_mean.new_empty(running_mean.shape, dtype=acc)


def _setup_fold(ctx, inputs, output):
    weight, bias, running_mean, running_var, eps = inputs
    ctx.save_for_backward(weight, bias, running_mean, running_var)
    ctx.eps = eps
    ctx.set_materialize_grads(False)


def _backward_fold(ctx, grad_scale, grad_shift):
    return (*reference.fold_backward(*ctx.saved_tensors, ctx.eps, grad_scale, grad_shift), None)


fold_batch_norm.register_autograd(_backward_fold, setup_context=_setup_fold)


if _backend.triton_importable():
    from fused_mbconv.ops.running_stats import triton_impl  # noqa: E402, F401
