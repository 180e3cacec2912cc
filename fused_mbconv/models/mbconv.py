"""The MBConv block (inverted residual + squeeze-excite) with torchvision's layout:
``block`` = [expansion (1x1 conv + BN + SiLU, absent when the expand ratio is 1), depthwise, SE,
projection (1x1 conv + BN)] and ``stochastic_depth``, so its state_dict keys are torchvision's.

With the fused modules in place (ExpandBNAct, DWConvBNAct, SqueezeExcite, ProjectBN), the
expansion is one GEMM with BN and SiLU in its epilogue, the depthwise kernel's squeeze by-product
feeds the SE, whose gate the projection applies in its GEMM, with the stochastic depth and the
residual in its epilogue: each expanded tensor is written once and read once. With plain
modules in place (after ``fused_mbconv.revert``) it runs them one after the other as torchvision
does, which is also the only path TorchScript sees.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fused_mbconv.models.config import Block
from fused_mbconv.models.layers import StochasticDepth, conv2d, stochastic_depth_noise
from fused_mbconv.nn import DWConvBNAct, ExpandBNAct, ProjectBN, SqueezeExcite


class MBConv(nn.Module):
    """y = x + stochastic_depth(block(x)) when the block keeps shape (stride 1, same width),
    else block(x). x (N, Cin, H, W) -> (N, Cout, H / stride, W / stride)."""

    def __init__(self, block: nn.Sequential, stochastic_depth: nn.Module, use_res_connect: bool) -> None:
        super().__init__()
        self.block = block
        self.stochastic_depth = stochastic_depth
        self.use_res_connect = use_res_connect

    @classmethod
    def build(cls, spec: Block, stochastic_depth_prob: float, padding: str, eps: float, momentum: float) -> "MBConv":
        """A freshly initialised block for ``spec`` (one entry of ``config.blocks``)."""
        hidden = spec.expanded_channels
        layers: list[nn.Module] = []
        if hidden != spec.in_channels:
            layers.append(ExpandBNAct(spec.in_channels, hidden, eps=eps, momentum=momentum))
        depthwise = conv2d(hidden, hidden, spec.kernel_size, spec.stride, groups=hidden, padding=padding)
        layers += [
            DWConvBNAct.from_modules(depthwise, nn.BatchNorm2d(hidden, eps=eps, momentum=momentum)),
            SqueezeExcite(hidden, spec.squeeze_channels),
            ProjectBN(hidden, spec.out_channels, eps=eps, momentum=momentum),
        ]
        use_res_connect = spec.stride == 1 and spec.in_channels == spec.out_channels
        return cls(nn.Sequential(*layers), StochasticDepth(stochastic_depth_prob), use_res_connect)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fused = self._run_fused(x)
            if fused is not None:
                return fused
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result

    @torch.jit.unused
    def _run_fused(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The block on the fused ops, or None when its depthwise stage and SE are plain modules.
        With a ProjectBN the SE gate, stochastic depth and the residual all happen inside it."""
        *expand, depthwise, se, project = self.block
        if not (isinstance(depthwise, DWConvBNAct) and isinstance(se, SqueezeExcite)):
            return None
        h = x
        for layer in expand:
            h = layer(h)
        h, pooled = depthwise(h, with_squeeze=True)
        if isinstance(project, ProjectBN):
            if not self.use_res_connect:
                return project(h, se.gate(pooled))
            fusable, noise = stochastic_depth_noise(self.stochastic_depth, x)
            if fusable:
                return project(h, se.gate(pooled), residual=x, branch_scale=noise)
            result = project(h, se.gate(pooled))
        else:
            result = project(se(h, pooled=pooled))
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result
