"""DWConvBNAct: depthwise conv + BatchNorm2d + SiLU as one fused module.

It is laid out exactly like torchvision's ``Conv2dNormActivation`` (a Sequential of
``0`` nn.Conv2d, ``1`` nn.BatchNorm2d, ``2`` nn.SiLU), so state_dicts carry over both ways, and
``from_modules`` wraps existing modules without copying their parameters.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fused_mbconv.nn import functional as F
from fused_mbconv.nn.batch_norm import BatchNormCall
from fused_mbconv.ops.dwconv_bn_silu import KERNEL_SIZES, STRIDES

PADDING_MODES = ("same", "tf")


class DWConvBNAct(nn.Sequential):
    """y = SiLU(BN(depthwise_conv(x))).

    Args:
        channels: C, input and output channels.
        kernel_size: 3 or 5.
        stride: 1 or 2.
        padding: "same" (k // 2 on every side, as torchvision) or "tf" (TensorFlow "SAME":
            asymmetric, computed from the input size, as TF-ported checkpoints need).
        eps, momentum, track_running_stats: as nn.BatchNorm2d.

    ``forward(x, with_squeeze=False)``: x (N, C, H, W) -> y (N, C, Ho, Wo); with
    ``with_squeeze=True`` returns (y, squeeze) where squeeze (N, C) is the spatial mean of y,
    computed in the same pass (what a following squeeze-excite needs).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: str = "same",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        track_running_stats: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        _check_config(kernel_size, stride, padding)
        factory = {"device": device, "dtype": dtype}
        conv = nn.Conv2d(
            channels, channels, kernel_size, stride=stride, padding=0 if padding == "tf" else kernel_size // 2,
            groups=channels, bias=False, **factory,
        )  # fmt: skip
        bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, track_running_stats=track_running_stats, **factory)
        super().__init__(conv, bn, nn.SiLU(inplace=True))
        self.padding_mode = padding

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Optional[nn.Module] = None) -> "DWConvBNAct":
        """Wrap an existing depthwise conv and its BatchNorm, sharing their Parameters and buffers.

        The conv must pass ``is_fusable``: symmetric k // 2 padding, or timm's Conv2dSame (TF
        "SAME" padding).
        """
        if not is_fusable(conv, bn):
            raise ValueError(f"conv, bn: not a fusable depthwise conv + BatchNorm2d pair: {conv}, {bn}")
        self = cls.__new__(cls)
        nn.Sequential.__init__(self, conv, bn, act if act is not None else nn.SiLU(inplace=True))
        self.padding_mode = "tf" if _uses_tf_padding(conv) else "same"
        return self

    @property
    def kernel_size(self) -> int:
        return self._modules["0"].kernel_size[0]

    @property
    def stride(self) -> int:
        return self._modules["0"].stride[0]

    def padding_for(self, x: torch.Tensor) -> list[int]:
        if self.padding_mode == "tf":
            return F.tf_same_padding(x.shape[-2], x.shape[-1], self.kernel_size, self.stride)
        return F.symmetric_padding(self.kernel_size)

    def forward(self, x: torch.Tensor, with_squeeze: bool = False):
        # by name: nn.Sequential's [i] walks its modules (~2 us a lookup, paid on every call)
        conv, bn = self._modules["0"], self._modules["1"]
        call = BatchNormCall.of(bn)
        y, squeeze = F.dwconv_bn_silu(
            x, conv.weight, bn.weight, bn.bias, call.running_mean, call.running_var,
            training=call.batch_stats, momentum=call.momentum, eps=bn.eps,
            stride=self.stride, padding=self.padding_for(x), with_squeeze=with_squeeze,
        )  # fmt: skip
        return (y, squeeze) if with_squeeze else y

    def extra_repr(self) -> str:
        return f"padding={self.padding_mode!r}"


def _check_config(kernel_size: int, stride: int, padding: str) -> None:
    if kernel_size not in KERNEL_SIZES:
        raise ValueError(f"kernel_size: expected one of {KERNEL_SIZES}, got {kernel_size}")
    if stride not in STRIDES:
        raise ValueError(f"stride: expected one of {STRIDES}, got {stride}")
    if padding not in PADDING_MODES:
        raise ValueError(f"padding: expected one of {PADDING_MODES}, got {padding!r}")


def _uses_tf_padding(conv: nn.Conv2d) -> bool:
    # timm's Conv2dSame pads dynamically in its forward, with conv.padding left at 0
    return type(conv).__name__ == "Conv2dSame"


def is_fusable(conv: nn.Module, bn: nn.Module) -> bool:
    """True when (conv, bn) is a depthwise conv + BatchNorm2d that the fused op computes exactly."""
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
        return False
    k = conv.kernel_size
    expected_padding = (0, 0) if _uses_tf_padding(conv) else (k[0] // 2, k[1] // 2)
    return (
        conv.groups == conv.in_channels == conv.out_channels == bn.num_features
        and k[0] == k[1]
        and k[0] in KERNEL_SIZES
        and conv.stride[0] == conv.stride[1]
        and conv.stride[0] in STRIDES
        and conv.dilation == (1, 1)
        and conv.bias is None
        and conv.padding_mode == "zeros"
        and tuple(conv.padding) == expected_padding
    )
