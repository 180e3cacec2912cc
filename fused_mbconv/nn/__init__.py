"""Modules built on the fused ops, drop-in for their torchvision counterparts."""

from fused_mbconv.nn import functional
from fused_mbconv.nn.dwconv_bn_act import DWConvBNAct, is_fusable
from fused_mbconv.nn.project_bn import ExpandBNAct, ProjectBN, is_pointwise_bn
from fused_mbconv.nn.squeeze_excite import SqueezeExcite

__all__ = ["DWConvBNAct", "ExpandBNAct", "ProjectBN", "SqueezeExcite", "functional", "is_fusable", "is_pointwise_bn"]
