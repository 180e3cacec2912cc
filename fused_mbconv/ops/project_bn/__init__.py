"""The pointwise (1x1) conv ops of an MBConv block, as one GEMM whose prologue gates the input
and whose epilogue normalises, activates and adds the shortcut: the projection (squeeze-excite
scale + 1x1 conv + BatchNorm + stochastic depth + residual) and, with ``silu``, the expansion
(1x1 conv + BatchNorm + SiLU). Schemas, input checks, fakes, autograd.

Contract: x (N, C, H, W) the block's wide tensor (any float dtype, NCHW or channels_last);
gate (N, C) the SE gate or None; weight (O, C) or (O, C, 1, 1), the 1x1 conv; residual
(N, O, H, W) or None; branch_scale (N,) or None, the stochastic-depth factor of each sample
(0 or 1 / survival); per-channel BN vectors (O,); act = SiLU when ``silu``, else the identity.
With z = weight @ (x * gate) over C:

- ``fused_mbconv::project_bn``: inference, BN folded into (scale, shift):
  y = branch_scale * act(scale * z + shift) + residual; or, given ``running_mean`` and
  ``running_var``, eval-mode BN unfolded (``scale``, ``shift`` its weight and bias), folded in the
  GEMM's epilogue: y = branch_scale * act(scale * (z - running_mean) / sqrt(running_var + eps) +
  shift) + residual.
- ``fused_mbconv::project_bn_train``: training, batch statistics of z inside:
  y = branch_scale * act(gamma * (z - mean) / sqrt(var + eps) + beta) + residual.
  Returns (y, z, mean, var), var biased. z is kept for the backward, which then needs no GEMM to
  recompute it: for the projection it is narrow (a sixth of x in MBConv); for the expansion it
  is as wide as y, what eager's BN keeps too.
- ``fused_mbconv::project_bn_backward``: (dx, dgate, dweight, dgamma, dbeta) of either
  (inference = mean 0, invstd 1, gamma = scale, beta = shift); dgate is empty when there is no
  gate. The residual's gradient is grad_y itself and branch_scale gets none (it is sampled noise).

Each backend registers its implementation in ``IMPLS``.
"""

from __future__ import annotations

from typing import Optional

import torch

from fused_mbconv import backends as _backend
from fused_mbconv._checks import check_nonempty_batch, check_same_device, check_tensor, empty_like_layout
from fused_mbconv.ops import _eager
from fused_mbconv.ops._registry import Implementations
from fused_mbconv.ops.project_bn import reference
from fused_mbconv.ops.running_stats import check_running_stats, running_fold, running_fold_backward

IMPLS = {
    "forward_infer": Implementations("project_bn"),
    "forward_train": Implementations("project_bn_train"),
    "backward": Implementations("project_bn_backward"),
}
for _name, _impls in IMPLS.items():
    _impls.register("reference")(getattr(reference, _name))


def check_inputs(
    x: torch.Tensor,
    gate: Optional[torch.Tensor],
    weight: torch.Tensor,
    residual: Optional[torch.Tensor],
    branch_scale: Optional[torch.Tensor],
    **per_channel: Optional[torch.Tensor],
) -> tuple[int, int, int, int]:
    """Validate the shared contract; returns the output shape (N, O, H, W)."""
    check_tensor("x", x, ndim=4)
    check_nonempty_batch("x", x)
    n, c, h, w = x.shape
    if c == 0:
        raise ValueError(f"x: expected at least 1 channel, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=(2, 4))
    if weight.dim() == 4:
        check_tensor("weight", weight, shape=(None, c, 1, 1))
    else:
        check_tensor("weight", weight, shape=(None, c))
    out_shape = (n, weight.shape[0], h, w)
    if gate is not None:
        check_tensor("gate", gate, shape=(n, c))
    if residual is not None:
        check_tensor("residual", residual, shape=out_shape)
    if branch_scale is not None:
        check_tensor("branch_scale", branch_scale, shape=(n,))
    for name, v in per_channel.items():
        if v is not None:
            check_tensor(name, v, shape=(weight.shape[0],))
    check_same_device(x=x, gate=gate, weight=weight, residual=residual, branch_scale=branch_scale, **per_channel)
    return out_shape


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# inference


@torch.library.custom_op("fused_mbconv::project_bn", mutates_args=())
def project_bn(
    x: torch.Tensor,
    gate: Optional[torch.Tensor],
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: Optional[torch.Tensor],
    branch_scale: Optional[torch.Tensor],
    silu: bool,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    eps: float = 0.0,
) -> torch.Tensor:
    _check_infer(x, gate, weight, scale, shift, residual, branch_scale, running_mean, running_var, eps)
    impl = IMPLS["forward_infer"].pick(x.device, x)
    return impl(x, gate, weight, scale, shift, residual, branch_scale, silu, running_mean, running_var, eps)


def _check_infer(x, gate, weight, scale, shift, residual, branch_scale, running_mean, running_var, eps):
    out_shape = check_inputs(x, gate, weight, residual, branch_scale, scale=scale, shift=shift,
                             running_mean=running_mean, running_var=running_var)  # fmt: skip
    check_running_stats(running_mean, running_var, eps)
    return out_shape


@project_bn.register_fake
def _(x, gate, weight, scale, shift, residual, branch_scale, silu, running_mean=None, running_var=None, eps=0.0):
    return empty_like_layout(
        x, _check_infer(x, gate, weight, scale, shift, residual, branch_scale, running_mean, running_var, eps)
    )


def _setup_infer(ctx, inputs, output):
    x, gate, weight, scale, shift, residual, branch_scale, silu, running_mean, running_var, eps = inputs
    ctx.save_for_backward(x, gate, weight, scale, shift, branch_scale, running_mean, running_var)
    ctx.has_residual, ctx.silu, ctx.eps = residual is not None, silu, eps


def _backward_infer(ctx, grad_y):
    x, gate, weight, scale, shift, branch_scale, running_mean, running_var = ctx.saved_tensors
    bn = (scale, shift, running_mean, running_var, ctx.eps)
    folded_scale, folded_shift = running_fold(*bn)
    # z is recomputed (one GEMM) rather than kept: the inference op is also what frozen-BN
    # fine-tuning runs, and there memory is the point
    zeros = folded_scale.new_zeros(folded_scale.shape)
    z = _eager.call(project_bn, x, gate, weight, zeros + 1, zeros, None, None, False, None, None, 0.0)
    dx, dgate, dweight, dscale, dshift = _eager.call(
        project_bn_backward,
        grad_y, x, gate, weight, z, folded_scale, folded_shift, zeros, zeros + 1, branch_scale, ctx.silu, False
    )
    dscale, dshift, dmean, dvar = running_fold_backward(*bn, dscale, dshift)
    return (dx, dgate if gate is not None else None, dweight, dscale, dshift,
            grad_y if ctx.has_residual else None, None, None, dmean, dvar, None)  # fmt: skip


project_bn.register_autograd(_backward_infer, setup_context=_setup_infer)


# ---------------------------------------------------------------------------------------------
# training


def _check_train(x, gate, weight, residual, branch_scale, gamma, beta):
    out_shape = check_inputs(x, gate, weight, residual, branch_scale, gamma=gamma, beta=beta)
    n, _, h, w = out_shape
    if n * h * w < 2:
        # the same rule as nn.BatchNorm2d: a variance needs at least two values per channel
        raise ValueError(
            f"x: training needs more than 1 value per channel for batch statistics, got input {tuple(x.shape)}"
        )
    return out_shape


@torch.library.custom_op("fused_mbconv::project_bn_train", mutates_args=())
def project_bn_train(
    x: torch.Tensor,
    gate: Optional[torch.Tensor],
    weight: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor],
    branch_scale: Optional[torch.Tensor],
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_train(x, gate, weight, residual, branch_scale, gamma, beta)
    impl = IMPLS["forward_train"].pick(x.device, x)
    return impl(x, gate, weight, gamma, beta, eps, residual, branch_scale, silu)


@project_bn_train.register_fake
def _(x, gate, weight, gamma, beta, eps, residual, branch_scale, silu):
    out_shape = _check_train(x, gate, weight, residual, branch_scale, gamma, beta)
    mean = x.new_empty((out_shape[1],), dtype=_stats_dtype(x))
    return empty_like_layout(x, out_shape), empty_like_layout(x, out_shape), mean, torch.empty_like(mean)


def _setup_train(ctx, inputs, output):
    x, gate, weight, gamma, beta, eps, residual, branch_scale, silu = inputs
    _, z, mean, var = output
    ctx.mark_non_differentiable(z, mean, var)  # z is kept for the backward; the statistics feed running averages
    ctx.set_materialize_grads(False)  # no zero-filled gradients for them: a kernel launch each
    ctx.save_for_backward(x, gate, weight, z, gamma, beta, mean, var, branch_scale)
    ctx.eps, ctx.has_residual, ctx.silu = eps, residual is not None, silu


def _backward_train(ctx, grad_y, _grad_z, _grad_mean, _grad_var):
    if grad_y is None:  # no gradient reached y (none is materialized): none flows back
        return (None,) * 9
    x, gate, weight, z, gamma, beta, mean, var, branch_scale = ctx.saved_tensors
    dx, dgate, dweight, dgamma, dbeta = _eager.call(
        project_bn_backward,
        grad_y, x, gate, weight, z, gamma, beta, mean, torch.rsqrt(var + ctx.eps), branch_scale, ctx.silu, True
    )
    return (dx, dgate if gate is not None else None, dweight, dgamma, dbeta, None,
            grad_y if ctx.has_residual else None, None, None)  # fmt: skip


project_bn_train.register_autograd(_backward_train, setup_context=_setup_train)


# ---------------------------------------------------------------------------------------------
# backward


def _check_backward(grad_y, x, gate, weight, z, gamma, beta, mean, invstd, branch_scale):
    out_shape = check_inputs(x, gate, weight, None, branch_scale, gamma=gamma, beta=beta, mean=mean, invstd=invstd)
    check_tensor("grad_y", grad_y, shape=out_shape)
    check_tensor("z", z, shape=out_shape)
    check_same_device(x=x, grad_y=grad_y, z=z)


@torch.library.custom_op("fused_mbconv::project_bn_backward", mutates_args=())
def project_bn_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    gate: Optional[torch.Tensor],
    weight: torch.Tensor,
    z: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    branch_scale: Optional[torch.Tensor],
    silu: bool,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_backward(grad_y, x, gate, weight, z, gamma, beta, mean, invstd, branch_scale)
    impl = IMPLS["backward"].pick(x.device, x)
    return impl(grad_y, x, gate, weight, z, gamma, beta, mean, invstd, branch_scale, silu, training)


@project_bn_backward.register_fake
def _(grad_y, x, gate, weight, z, gamma, beta, mean, invstd, branch_scale, silu, training):
    _check_backward(grad_y, x, gate, weight, z, gamma, beta, mean, invstd, branch_scale)
    dgate = x.new_empty(0) if gate is None else torch.empty_like(gate, memory_format=torch.contiguous_format)
    return (
        empty_like_layout(x, x.shape),
        dgate,
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(gamma),
        torch.empty_like(gamma),
    )


# The Triton backend registers itself in IMPLS when imported, where Triton is installed.
if _backend.triton_importable():
    from fused_mbconv.ops.project_bn import triton_impl  # noqa: E402, F401
