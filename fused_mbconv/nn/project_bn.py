"""The pointwise (1x1) conv + BatchNorm2d modules of an MBConv block, each one fused GEMM:

- ``ProjectBN``: the projection (no activation), which also takes the squeeze-excite gate, the
  stochastic-depth factor and the residual;
- ``ExpandBNAct``: the expansion (and the head conv), with SiLU.

Laid out like torchvision's ``Conv2dNormActivation`` (``0`` nn.Conv2d, ``1`` nn.BatchNorm2d,
``2`` nn.SiLU for ExpandBNAct), so state_dicts carry over both ways; ``from_modules`` wraps
existing modules without copying their parameters.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fused_mbconv.nn import functional as F
from fused_mbconv.nn.batch_norm import BatchNormCall


class _PointwiseBN(nn.Sequential):
    """[0 nn.Conv2d 1x1, 1 nn.BatchNorm2d] (+ ``2`` nn.SiLU with ``SILU``) on the fused op."""

    SILU = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        layers = [
            nn.Conv2d(in_channels, out_channels, 1, bias=False, **factory),
            nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory),
        ]
        super().__init__(*layers, *([nn.SiLU(inplace=True)] if self.SILU else []))

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Optional[nn.Module] = None) -> "_PointwiseBN":
        """Wrap an existing 1x1 conv and its BatchNorm (and SiLU), sharing their Parameters and buffers."""
        if not is_pointwise_bn(conv, bn, nn.SiLU if cls.SILU else nn.Identity):
            raise ValueError(f"conv, bn: not a bias-free 1x1 conv + BatchNorm2d pair: {conv}, {bn}")
        self = cls.__new__(cls)
        act = (act if act is not None else nn.SiLU(inplace=True)) if cls.SILU else None
        nn.Sequential.__init__(self, conv, bn, *([act] if act is not None else []))
        return self

    def _fused(self, x: torch.Tensor, **extras: Optional[torch.Tensor]) -> torch.Tensor:
        # by name: nn.Sequential's [i] walks its modules (~2 us a lookup, paid on every call)
        conv, bn = self._modules["0"], self._modules["1"]
        call = BatchNormCall.of(bn)
        return F.project_bn(
            x, conv.weight, bn.weight, bn.bias, call.running_mean, call.running_var,
            training=call.batch_stats, momentum=call.momentum, eps=bn.eps, silu=self.SILU, **extras,
        )  # fmt: skip


class ProjectBN(_PointwiseBN):
    """y = branch_scale * BN(conv1x1(x * gate)) + residual.

    Args:
        in_channels: C. out_channels: O.
        eps, momentum: as nn.BatchNorm2d.

    ``forward(x, gate=None, residual=None, branch_scale=None)``: x (N, C, H, W), gate (N, C) (a
    squeeze-excite's, applied to x on the way in), residual (N, O, H, W), branch_scale (N,) ->
    (N, O, H, W). Without the optional arguments it is conv1x1 + BN.
    """

    def forward(
        self,
        x: torch.Tensor,
        gate: Optional[torch.Tensor] = None,
        residual: Optional[torch.Tensor] = None,
        branch_scale: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return self._fused(x, gate=gate, residual=residual, branch_scale=branch_scale)


class ExpandBNAct(_PointwiseBN):
    """y = SiLU(BN(conv1x1(x))): x (N, C, H, W) -> (N, O, H, W), the expanded tensor written once
    (eager writes it three times: conv, BN, SiLU).

    Args:
        in_channels: C. out_channels: O.
        eps, momentum: as nn.BatchNorm2d.
    """

    SILU = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused(x)


def is_pointwise_bn(conv: nn.Module, bn: nn.Module, activation: type = nn.Identity) -> bool:
    """True when (conv, bn) is a bias-free, ungrouped, unstrided 1x1 conv + BatchNorm2d (or timm's
    BatchNormAct2d applying ``activation`` and no dropout: the fused module applies that itself)."""
    plain_bn = type(bn) is nn.BatchNorm2d or (
        isinstance(bn, nn.BatchNorm2d)
        and isinstance(getattr(bn, "act", None), activation)
        and isinstance(getattr(bn, "drop", None), nn.Identity)
    )
    return (
        type(conv) is nn.Conv2d
        and plain_bn
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.groups == 1
        and conv.bias is None
        and conv.padding in ((0, 0), "valid")
        and conv.out_channels == bn.num_features
    )
