"""The squeeze-excite ops: schemas, input checks, fakes, autograd.

SE(x) = x * gate, gate = sigmoid(W2 silu(W1 mean_hw(x) + b1) + b2), split into three ops so that
each can be fused with its neighbour (the squeeze into the depthwise kernel, the scale into the
projection GEMM):

- ``fused_mbconv::se_squeeze(x) -> pooled``: mean over (H, W), (N, C, H, W) -> (N, C).
- ``fused_mbconv::se_excite(pooled, w1, b1, w2, b2) -> gate``: both 1x1 convs, SiLU and sigmoid,
  (N, C) -> (N, C); w1 (R, C[, 1, 1]), b1 (R,), w2 (C, R[, 1, 1]), b2 (C,) as nn.Conv2d holds them.
- ``fused_mbconv::se_scale(x, gate) -> y``: y = x * gate[:, :, None, None].
plus ``se_excite_backward`` and ``se_scale_backward``. The squeeze's backward is a broadcast.
"""

from __future__ import annotations

import torch

from fused_mbconv import _extension
from fused_mbconv import backends as _backend
from fused_mbconv._checks import (
    check_nonempty_batch,
    check_same_device,
    check_tensor,
    empty_like_layout,
)
from fused_mbconv.ops import _eager
from fused_mbconv.ops._registry import Implementations
from fused_mbconv.ops.squeeze_excite import reference

IMPLS = {
    "squeeze": Implementations("se_squeeze"),
    "excite": Implementations("se_excite"),
    "excite_backward": Implementations("se_excite_backward"),
    "scale": Implementations("se_scale"),
    "scale_backward": Implementations("se_scale_backward"),
}
for _name, _impls in IMPLS.items():
    _impls.register("reference")(getattr(reference, _name))


def _check_activation(name: str, x: torch.Tensor) -> None:
    check_tensor(name, x, ndim=4)
    check_nonempty_batch(name, x)


def _check_gate(name: str, gate: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """``gate`` is one value per (sample, channel) of ``like``, on its device."""
    check_tensor(name, gate, shape=(like.shape[0], like.shape[1]))
    check_same_device(**{like_name: like, name: gate})


def _fc_weight(name: str, w: torch.Tensor, out_features: int | None, in_features: int | None) -> torch.Tensor:
    check_tensor(name, w, ndim=(2, 4))
    if w.dim() == 4:
        check_tensor(name, w, shape=(out_features, in_features, 1, 1))
    else:
        check_tensor(name, w, shape=(out_features, in_features))
    return w


def _check_excite(pooled, w1, b1, w2, b2) -> None:
    check_tensor("pooled", pooled, ndim=2)
    if pooled.shape[0] == 0:
        raise ValueError(f"pooled: expected a batch of at least 1 sample, got shape {tuple(pooled.shape)}")
    channels = pooled.shape[1]
    _fc_weight("w1", w1, None, channels)
    reduced = w1.shape[0]
    check_tensor("b1", b1, shape=(reduced,))
    _fc_weight("w2", w2, channels, reduced)
    check_tensor("b2", b2, shape=(channels,))
    check_same_device(pooled=pooled, w1=w1, b1=b1, w2=w2, b2=b2)


# ---------------------------------------------------------------------------------------------
# squeeze


@torch.library.custom_op("fused_mbconv::se_squeeze", mutates_args=())
def se_squeeze(x: torch.Tensor) -> torch.Tensor:
    _check_activation("x", x)
    return IMPLS["squeeze"].pick(x.device, x)(x)


@se_squeeze.register_fake
def _(x):
    _check_activation("x", x)
    return x.new_empty((x.shape[0], x.shape[1]))


def _setup_squeeze(ctx, inputs, output):
    ctx.x_shape = inputs[0].shape


def _backward_squeeze(ctx, grad_pooled):
    n, c, h, w = ctx.x_shape
    return (grad_pooled / (h * w))[:, :, None, None].expand(n, c, h, w)


se_squeeze.register_autograd(_backward_squeeze, setup_context=_setup_squeeze)


# ---------------------------------------------------------------------------------------------
# excite


@torch.library.custom_op("fused_mbconv::se_excite", mutates_args=())
def se_excite(
    pooled: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    _check_excite(pooled, w1, b1, w2, b2)
    return IMPLS["excite"].pick(pooled.device, pooled)(pooled, w1, b1, w2, b2)


@se_excite.register_fake
def _(pooled, w1, b1, w2, b2):
    _check_excite(pooled, w1, b1, w2, b2)
    return torch.empty_like(pooled, memory_format=torch.contiguous_format)


@torch.library.custom_op("fused_mbconv::se_excite_backward", mutates_args=())
def se_excite_backward(
    grad_gate: torch.Tensor,
    pooled: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_excite(pooled, w1, b1, w2, b2)
    _check_gate("grad_gate", grad_gate, "pooled", pooled)
    return IMPLS["excite_backward"].pick(pooled.device, pooled)(grad_gate, pooled, w1, b1, w2, b2)


@se_excite_backward.register_fake
def _(grad_gate, pooled, w1, b1, w2, b2):
    _check_excite(pooled, w1, b1, w2, b2)
    _check_gate("grad_gate", grad_gate, "pooled", pooled)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (pooled, w1, b1, w2, b2))


def _setup_excite(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_excite(ctx, grad_gate):
    return _eager.call(se_excite_backward, grad_gate, *ctx.saved_tensors)


se_excite.register_autograd(_backward_excite, setup_context=_setup_excite)


# ---------------------------------------------------------------------------------------------
# scale


@torch.library.custom_op("fused_mbconv::se_scale", mutates_args=())
def se_scale(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    _check_activation("x", x)
    _check_gate("gate", gate, "x", x)
    return IMPLS["scale"].pick(x.device, x)(x, gate)


@se_scale.register_fake
def _(x, gate):
    _check_activation("x", x)
    _check_gate("gate", gate, "x", x)
    return empty_like_layout(x, x.shape)


@torch.library.custom_op("fused_mbconv::se_scale_backward", mutates_args=())
def se_scale_backward(
    grad_y: torch.Tensor, x: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_activation("x", x)
    _check_gate("gate", gate, "x", x)
    check_tensor("grad_y", grad_y, shape=tuple(x.shape))
    check_same_device(x=x, grad_y=grad_y)
    return IMPLS["scale_backward"].pick(x.device, x)(grad_y, x, gate)


@se_scale_backward.register_fake
def _(grad_y, x, gate):
    _check_activation("x", x)
    _check_gate("gate", gate, "x", x)
    check_tensor("grad_y", grad_y, shape=tuple(x.shape))
    return empty_like_layout(x, x.shape), torch.empty_like(gate, memory_format=torch.contiguous_format)


def _setup_scale(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_scale(ctx, grad_y):
    return _eager.call(se_scale_backward, grad_y, *ctx.saved_tensors)


se_scale.register_autograd(_backward_scale, setup_context=_setup_scale)


# The other backends register themselves in IMPLS when imported, where they can run.
if _backend.triton_importable():
    from fused_mbconv.ops.squeeze_excite import triton_impl  # noqa: E402, F401
if _extension.loaded():
    from fused_mbconv.ops.squeeze_excite import cuda_impl  # noqa: E402, F401
