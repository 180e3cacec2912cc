"""SqueezeExcite: the squeeze-excite block on the fused ops.

Laid out like torchvision's ``SqueezeExcitation`` (``fc1`` reduce and ``fc2`` expand, both
nn.Conv2d 1x1 with bias), so state_dicts carry over; SiLU inside, sigmoid gate.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fused_mbconv.nn import functional as F


class SqueezeExcite(nn.Module):
    """y = x * sigmoid(fc2(silu(fc1(mean_hw(x))))).

    Args:
        channels: C of the input.
        squeeze_channels: R, the reduced width (EfficientNet: a quarter of the block's input).

    ``forward(x, pooled=None)``: x (N, C, H, W) -> (N, C, H, W). Pass ``pooled`` (N, C), the
    spatial mean of x, when it is already known (DWConvBNAct's ``with_squeeze``) to skip a pass.
    ``gate(pooled)`` gives the gate alone, for a consumer that scales x itself.
    """

    def __init__(
        self,
        channels: int,
        squeeze_channels: int,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1, **factory)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1, **factory)

    def forward(self, x: torch.Tensor, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.squeeze_excite(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, pooled)

    def gate(self, pooled: torch.Tensor) -> torch.Tensor:
        """sigmoid(fc2(silu(fc1(pooled)))) (N, C) from the spatial mean ``pooled`` (N, C), for a
        consumer that applies the gate itself (``ProjectBN``)."""
        return F.se_gate(pooled, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
