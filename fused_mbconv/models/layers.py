"""Plain-PyTorch layers the EfficientNets are built from, laid out like torchvision's so that
state_dict keys match: ``ConvBNAct`` (Conv2dNormActivation), ``StochasticDepth``, and
``PlainSqueezeExcite`` (SqueezeExcitation, what ``revert`` turns the fused SE back into);
``Conv2dSame`` pads like TensorFlow "SAME" for TF-ported weights. torchvision itself is not needed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fused_mbconv.nn import functional as F

PADDING_MODES = ("same", "tf")


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow "SAME" padding, computed from each input's size (the odd pixel
    goes after). Named like timm's equivalent: ``fused_mbconv.nn.is_fusable`` knows both."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = F.tf_same_padding(x.shape[-2], x.shape[-1], self.kernel_size[0], self.stride[0])
        return super().forward(torch.nn.functional.pad(x, (left, right, top, bottom)))


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
           padding: str = "same") -> nn.Conv2d:  # fmt: skip
    """A bias-free square conv. "tf" padding differs from k // 2 only for stride 2 (with odd
    kernels TF pads symmetrically at stride 1), so only those convs become Conv2dSame."""
    if padding == "tf" and stride > 1:
        return Conv2dSame(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)


class ConvBNAct(nn.Sequential):
    """conv -> BatchNorm2d -> SiLU (or no activation), keys ``0.weight``, ``1.*`` like
    torchvision's Conv2dNormActivation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        activation: bool = True,
        padding: str = "same",
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        layers = [
            conv2d(in_channels, out_channels, kernel_size, stride, padding=padding),
            nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum),
        ]
        if activation:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth in "row" mode: in training, zero each sample's residual
    branch with probability ``p`` and scale the survivors by 1 / (1 - p). Draws its noise exactly
    as torchvision does, so both give the same masks from the same random state."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a drop probability in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # written out rather than through stochastic_depth_noise, which TorchScript cannot compile
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(survival)  # one draw per sample
        if survival > 0.0:
            noise.div_(survival)
        return x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode=row"


def stochastic_depth_noise(module: nn.Module, like: torch.Tensor) -> tuple[bool, Optional[torch.Tensor]]:
    """(fusable, noise) for a consumer that applies stochastic depth itself: ``noise`` (N,) the
    per-sample factor (None: keep every sample as is) drawn exactly as ``module`` would draw it
    for a batch like ``like``, from the same random stream. ``module`` is ours or torchvision's
    StochasticDepth ("row" mode), timm's DropPath or nn.Identity. ``fusable`` is False for what
    cannot be a per-sample factor (torchvision's "batch" mode, unknown modules): the caller then
    runs ``module`` itself."""
    if isinstance(module, nn.Identity):
        return True, None
    p = getattr(module, "p", getattr(module, "drop_prob", None))
    if p is None or getattr(module, "mode", "row") != "row":
        return False, None
    if not module.training or p == 0.0:
        return True, None
    survival = 1.0 - p
    noise = like.new_empty(like.shape[0]).bernoulli_(survival)
    if survival > 0.0 and getattr(module, "scale_by_keep", True):
        noise.div_(survival)
    return True, noise


class PlainSqueezeExcite(nn.Module):
    """x * sigmoid(fc2(silu(fc1(mean_hw(x))))) in torch ops, with torchvision SqueezeExcitation's
    children (avgpool, fc1, activation, fc2, scale_activation): the exportable form, built around
    existing 1x1 convs ``fc1`` (reduce) and ``fc2`` (expand)."""

    def __init__(self, fc1: nn.Conv2d, fc2: nn.Conv2d) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = fc1
        self.activation = nn.SiLU(inplace=True)
        self.fc2 = fc2
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x
