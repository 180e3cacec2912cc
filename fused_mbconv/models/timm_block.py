"""timm's EfficientNet blocks (InvertedResidual, DepthwiseSeparableConv) on the fused ops.

timm keeps the depthwise conv and its BatchNormAct2d (BN + SiLU) in two attributes and the SE as
``se.conv_reduce``/``se.conv_expand``. ``FusedTimmBlock`` registers the very same child modules
under the same names, so Parameters, buffers and state_dict keys are untouched, and replaces only
the forward: the expansion (conv_pw + bn1) as one GEMM with BN and SiLU inside, depthwise conv +
BN + SiLU + squeeze in one op, then the SE gate from that squeeze, applied inside the projection
GEMM (conv_pwl + bn3) together with drop_path and the shortcut.
"""

from __future__ import annotations

import torch
from torch import nn

from fused_mbconv.models.layers import stochastic_depth_noise
from fused_mbconv.nn import DWConvBNAct, ExpandBNAct, ProjectBN, is_pointwise_bn
from fused_mbconv.nn import functional as F


class FusedTimmBlock(nn.Module):
    """Runs ``before`` (child names), the fused depthwise ``conv`` + ``norm``, the SE, ``after``,
    then timm's residual (``drop_path(x) + shortcut`` when ``has_skip``)."""

    def __init__(self, block: nn.Module, before: tuple[str, ...], conv: str, norm: str, after: tuple[str, ...]) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.before, self.after = before, after
        self.has_skip = block.has_skip
        bn = getattr(block, norm)
        # A view of the conv and BN (still registered above under their timm names) for the fused
        # call. Kept out of _modules on purpose: registering it would list every key twice.
        self.__dict__["depthwise"] = DWConvBNAct.from_modules(getattr(block, conv), bn, bn.act)
        # likewise the expansion (conv_pw + bn1 with SiLU) and the projection (conv_pwl + bn3), when
        # they are plain 1x1 convs + BN: the projection then takes the SE gate, drop_path and the
        # shortcut inside its GEMM
        expansion = [getattr(block, name) for name in before]
        fusable = len(expansion) == 2 and is_pointwise_bn(*expansion, nn.SiLU)
        self.__dict__["expansion"] = ExpandBNAct.from_modules(*expansion, expansion[1].act) if fusable else None
        projection = [getattr(block, name) for name in after]
        fusable = len(projection) == 2 and is_pointwise_bn(*projection) and not isinstance(block.se, nn.Identity)
        self.__dict__["projection"] = ProjectBN.from_modules(*projection) if fusable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.expansion is not None:
            x = self.expansion(x)
        else:
            for name in self.before:
                x = getattr(self, name)(x)
        se = self.se
        if self.projection is not None:
            x, pooled = self.depthwise(x, with_squeeze=True)
            reduce, expand = se.conv_reduce, se.conv_expand
            gate = F.se_gate(pooled, reduce.weight, reduce.bias, expand.weight, expand.bias)
            if not self.has_skip:
                return self.projection(x, gate)
            fusable, noise = stochastic_depth_noise(self.drop_path, shortcut)
            if fusable:
                return self.projection(x, gate, residual=shortcut, branch_scale=noise)
            return self.drop_path(self.projection(x, gate)) + shortcut
        if isinstance(se, nn.Identity):
            x = self.depthwise(x)
        else:
            x, pooled = self.depthwise(x, with_squeeze=True)
            reduce, expand = se.conv_reduce, se.conv_expand
            x = F.squeeze_excite(x, reduce.weight, reduce.bias, expand.weight, expand.bias, pooled)
        for name in self.after:
            x = getattr(self, name)(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x
