"""timm EfficientNet checkpoints (``efficientnet_bN``, ``tf_efficientnet_bN``) in torchvision's
key layout, which the fused EfficientNet shares.

timm names the stem ``conv_stem``/``bn1``, the blocks ``blocks.<stage>.<block>`` with
DepthwiseSeparableConv (stage 0: conv_dw, bn1, se, conv_pw, bn2) or InvertedResidual (conv_pw,
bn1, conv_dw, bn2, se, conv_pwl, bn3) layouts, the head ``conv_head``/``bn2`` and ``classifier``.
The tensors are the same; only the names change. ``tf_`` checkpoints were trained with TensorFlow
"SAME" padding and BatchNorm eps 1e-3: load them into ``efficientnet_bN(padding="tf", norm_eps=1e-3)``.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

# where each module of a timm block goes inside torchvision's ``features.<stage + 1>.<block>.block``
_DEPTHWISE_SEPARABLE = {
    "conv_dw": "0.0", "bn1": "0.1", "se.conv_reduce": "1.fc1", "se.conv_expand": "1.fc2",
    "conv_pw": "2.0", "bn2": "2.1",
}  # fmt: skip
_INVERTED_RESIDUAL = {
    "conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1",
    "se.conv_reduce": "2.fc1", "se.conv_expand": "2.fc2", "conv_pwl": "3.0", "bn3": "3.1",
}  # fmt: skip
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)\.(\w+)")
_TOP_KEY = re.compile(r"(conv_stem|bn1|conv_head|bn2|classifier)\.(\w+)")


def is_timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "conv_stem.weight" in state_dict


def timm_to_torchvision(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under torchvision's efficientnet_bN keys (raises on a key it cannot place)."""
    stages = [int(m.group(1)) for m in map(_BLOCK_KEY.fullmatch, state_dict) if m]
    if not stages:
        raise ValueError("state_dict: expected timm EfficientNet keys (blocks.<stage>.<block>...), found none")
    head = max(stages) + 2  # features: stem, the stages, then the head
    top = {"conv_stem": "features.0.0", "bn1": "features.0.1", "conv_head": f"features.{head}.0",
           "bn2": f"features.{head}.1", "classifier": "classifier.1"}  # fmt: skip
    out, unknown = {}, []
    for key, value in state_dict.items():
        block, plain = _BLOCK_KEY.fullmatch(key), _TOP_KEY.fullmatch(key)
        if block:
            stage, index, module, tensor = block.groups()
            inverted = f"blocks.{stage}.{index}.conv_pwl.weight" in state_dict
            target = (_INVERTED_RESIDUAL if inverted else _DEPTHWISE_SEPARABLE).get(module)
            new = f"features.{int(stage) + 1}.{index}.block.{target}.{tensor}" if target else None
        else:
            new = f"{top[plain.group(1)]}.{plain.group(2)}" if plain else None
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ValueError(f"state_dict: keys outside timm's EfficientNet layout: {unknown[:5]}{more}")
    return out


def load_timm_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load a timm EfficientNet state_dict into ``model`` (fused or torchvision layout); returns
    what ``load_state_dict`` returns."""
    return model.load_state_dict(timm_to_torchvision(state_dict), strict=strict)
