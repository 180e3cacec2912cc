"""The BatchNorm running-statistics update as one op:
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
"""

from __future__ import annotations

import torch

from fused_mbconv import backends as _backend
from fused_mbconv._checks import check_same_device, check_tensor
from fused_mbconv.ops._registry import Implementations
from fused_mbconv.ops.running_stats import reference

IMPLS = {"update": Implementations("update_running_stats")}
IMPLS["update"].register("reference")(reference.update)


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


if _backend.triton_importable():
    from fused_mbconv.ops.running_stats import triton_impl  # noqa: E402, F401
