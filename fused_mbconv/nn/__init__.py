"""Modules built on the fused ops, drop-in for their torchvision counterparts."""

from fused_mbconv.nn import functional
from fused_mbconv.nn.dwconv_bn_act import DWConvBNAct, is_fusable
from fused_mbconv.nn.project_bn import ProjectBN, is_projection
from fused_mbconv.nn.squeeze_excite import SqueezeExcite

__all__ = ["DWConvBNAct", "ProjectBN", "SqueezeExcite", "functional", "is_fusable", "is_projection"]
