"""EfficientNet B0-B7 on the fused ops, laid out like torchvision's, plus timm checkpoint loading."""

from fused_mbconv.models.config import VARIANTS, round_filters, round_repeats
from fused_mbconv.models.efficientnet import (
    EfficientNet,
    create_efficientnet,
    efficientnet_b0,
    efficientnet_b1,
    efficientnet_b2,
    efficientnet_b3,
    efficientnet_b4,
    efficientnet_b5,
    efficientnet_b6,
    efficientnet_b7,
    load_weights,
)
from fused_mbconv.models.mbconv import MBConv
from fused_mbconv.models.timm_weights import load_timm_state_dict, timm_to_torchvision

__all__ = [
    "VARIANTS",
    "EfficientNet",
    "MBConv",
    "create_efficientnet",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "load_timm_state_dict",
    "load_weights",
    "round_filters",
    "round_repeats",
    "timm_to_torchvision",
]
