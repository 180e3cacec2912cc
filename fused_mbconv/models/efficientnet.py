"""EfficientNet B0-B7 on the fused ops, module for module and key for key torchvision's
``efficientnet_bN``: ``features`` = [stem, seven stages of MBConv blocks, head conv], ``avgpool``,
``classifier`` = [Dropout, Linear]. A torchvision checkpoint loads with ``strict=True`` both ways.

    model = fused_mbconv.efficientnet_b0(weights="efficientnet_b0.pth").eval()
    logits = model(images)                              # (N, 1000)
    c2, c3, c4, c5 = model.feature_maps(images)         # strides 4, 8, 16, 32, for detection

Weights are never downloaded: pass a file (torchvision or timm layout) or a state_dict.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from fused_mbconv.models.config import HEAD_CHANNELS, STEM_CHANNELS, VARIANTS, Block, Variant, blocks, round_filters
from fused_mbconv.models.layers import PADDING_MODES, ConvBNAct
from fused_mbconv.models.mbconv import MBConv
from fused_mbconv.models.timm_weights import is_timm_state_dict, timm_to_torchvision
from fused_mbconv.nn import ExpandBNAct
from fused_mbconv.nn.functional import autocast_dtype

MIN_IMAGE_SIZE = 32  # five stride-2 stages: anything smaller ends below one pixel
FEATURE_STRIDES = (2, 4, 8, 16, 32)

Weights = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


class EfficientNet(nn.Module):
    """EfficientNet ``variant`` ("b0" ... "b7").

    Args:
        variant: which scaling of B0: a name from ``fused_mbconv.models.VARIANTS`` or a ``Variant``.
        num_classes: outputs of the classifier.
        dropout: before the classifier; None takes the variant's (0.2 for B0 ... 0.5 for B7).
        stochastic_depth_prob: drop probability of the last block's residual branch; it rises
            linearly from 0 at the first block, as in torchvision.
        padding: "same" (k // 2, torchvision and timm ``efficientnet_bN`` weights) or "tf"
            (TensorFlow "SAME", for timm ``tf_efficientnet_bN`` weights).
        norm_eps, norm_momentum: BatchNorm settings; None takes torchvision's for the variant
            (1e-5 and 0.1 for B0-B4, 1e-3 and 0.01 for B5-B7). TF-ported weights want eps 1e-3.

    ``forward(x)``: x (N, 3, H, W), H and W >= 32 -> logits (N, num_classes).
    """

    def __init__(
        self,
        variant: Union[str, Variant] = "b0",
        *,
        num_classes: int = 1000,
        dropout: Optional[float] = None,
        stochastic_depth_prob: float = 0.2,
        padding: str = "same",
        norm_eps: Optional[float] = None,
        norm_momentum: Optional[float] = None,
    ) -> None:
        super().__init__()
        spec = _variant(variant)
        dropout = spec.dropout if dropout is None else dropout
        _check_arguments(num_classes, dropout, stochastic_depth_prob, padding)
        eps = spec.bn_eps if norm_eps is None else norm_eps
        momentum = spec.bn_momentum if norm_momentum is None else norm_momentum
        norm = {"padding": padding, "eps": eps, "momentum": momentum}
        self.variant = spec

        stem_channels = round_filters(STEM_CHANNELS, spec.width)
        layers: list[nn.Module] = [ConvBNAct(3, stem_channels, 3, stride=2, **norm)]
        specs = blocks(spec)
        stages: list[list[nn.Module]] = [[] for _ in range(specs[-1].stage + 1)]
        for index, block in enumerate(specs):
            # the drop probability grows linearly with depth, from 0 at the first block
            stages[block.stage].append(MBConv.build(block, stochastic_depth_prob * index / len(specs), **norm))
        layers += [nn.Sequential(*stage) for stage in stages]
        head_channels = round_filters(HEAD_CHANNELS, spec.width)
        layers.append(ExpandBNAct(specs[-1].out_channels, head_channels, eps=eps, momentum=momentum))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(head_channels, num_classes))
        self.feature_info = _feature_info(stem_channels, specs)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so that a fresh model trains the same
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.out_features**0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, H, W) -> the head conv's output (N, C_head, ceil(H / 32), ceil(W / 32))."""
        if not torch.jit.is_scripting():
            self._check_input(x)
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """forward_features' output -> logits (N, num_classes): pool, dropout, linear."""
        return self.classifier(torch.flatten(self.avgpool(features), 1))

    def feature_maps(self, x: torch.Tensor, strides: Sequence[int] = (4, 8, 16, 32)) -> list[torch.Tensor]:
        """Multi-scale features for detection and segmentation backbones (an FPN's C2-C5 by default).

        For each stride in ``strides`` (from 2, 4, 8, 16, 32) the output of the last block that
        runs at that stride: B0 gives 24, 40, 112 and 320 channels at strides 4, 8, 16, 32 (the
        head conv is not part of it). ``feature_info`` lists every stride's channels and module.
        Returns one (N, C_s, ~H / s, ~W / s) tensor per requested stride, in the order asked.
        """
        by_stride = {info["stride"]: info for info in self.feature_info}
        if not strides or any(s not in by_stride for s in strides):
            raise ValueError(f"strides: expected a non-empty selection from {FEATURE_STRIDES}, got {tuple(strides)}")
        self._check_input(x)
        wanted = {by_stride[s]["index"] for s in strides}
        outputs = {}
        for index, layer in enumerate(self.features[: max(wanted) + 1]):
            x = layer(x)
            if index in wanted:
                outputs[index] = x
        return [outputs[by_stride[s]["index"]] for s in strides]

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing():  # shapes are constants of the trace: checking them only warns
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor of images (N, 3, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D batch of images (N, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise ValueError(f"x: expected 3 channels (RGB) in dim 1 of (N, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[2] < MIN_IMAGE_SIZE or x.shape[3] < MIN_IMAGE_SIZE:
            raise ValueError(
                f"x: image too small: {x.shape[2]}x{x.shape[3]} pixels; EfficientNet downsamples by 32 and "
                f"needs at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}"
            )
        expected = self.features[0][0].weight.dtype
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point image tensor ({expected}), got {x.dtype}")
        if x.dtype != expected and autocast_dtype(x.device.type) is None:
            raise TypeError(
                f"x: expected dtype {expected} (the model's parameters), got {x.dtype}; convert the input "
                f"or the model, or run under torch.autocast"
            )


def _variant(variant: Union[str, Variant]) -> Variant:
    if isinstance(variant, Variant):
        return variant
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {tuple(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant]


def _check_arguments(num_classes: int, dropout: float, stochastic_depth_prob: float, padding: str) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout}")
    if not 0.0 <= stochastic_depth_prob <= 1.0:
        raise ValueError(f"stochastic_depth_prob: expected a probability in [0, 1], got {stochastic_depth_prob}")
    if padding not in PADDING_MODES:
        raise ValueError(f"padding: expected one of {PADDING_MODES}, got {padding!r}")


def _feature_info(stem_channels: int, specs: list[Block]) -> list[dict[str, Any]]:
    """Per output stride, the last ``features`` entry at that stride: {stride, channels, index, module}."""
    info = {2: {"stride": 2, "channels": stem_channels, "index": 0}}
    stride = 2
    for block in specs:
        stride *= block.stride
        info[stride] = {"stride": stride, "channels": block.out_channels, "index": block.stage + 1}
    return [dict(v, module=f"features.{v['index']}") for v in info.values()]


def load_weights(model: nn.Module, weights: Weights) -> None:
    """Load ``weights`` (a file path or a state_dict, torchvision or timm layout) with strict=True."""
    if isinstance(weights, (str, os.PathLike)):
        # weights_only: a checkpoint file must not run code when it is read
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    elif isinstance(weights, Mapping):
        state_dict = weights
    else:
        raise TypeError(f"weights: expected None, a file path or a state_dict, got {type(weights).__name__}")
    if is_timm_state_dict(state_dict):
        state_dict = timm_to_torchvision(state_dict)
    model.load_state_dict(state_dict, strict=True)


def create_efficientnet(
    variant: Union[str, Variant], *, weights: Optional[Weights] = None, **kwargs: Any
) -> EfficientNet:
    """EfficientNet ``variant`` with ``weights`` loaded (see ``EfficientNet`` for the options)."""
    model = EfficientNet(variant, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model


def _builder(name: str) -> Callable[..., EfficientNet]:
    spec = VARIANTS[name]

    def build(
        *,
        weights: Optional[Weights] = None,
        num_classes: int = 1000,
        dropout: Optional[float] = None,
        stochastic_depth_prob: float = 0.2,
        padding: str = "same",
        norm_eps: Optional[float] = None,
        norm_momentum: Optional[float] = None,
    ) -> EfficientNet:
        return create_efficientnet(
            name,
            weights=weights,
            num_classes=num_classes,
            dropout=dropout,
            stochastic_depth_prob=stochastic_depth_prob,
            padding=padding,
            norm_eps=norm_eps,
            norm_momentum=norm_momentum,
        )

    build.__name__ = build.__qualname__ = f"efficientnet_{name}"
    build.__doc__ = (
        f"EfficientNet-{name.upper()} (width {spec.width}, depth {spec.depth}, native resolution "
        f"{spec.resolution}, dropout {spec.dropout}), laid out like torchvision's efficientnet_{name}. "
        f"``weights``: None, a file path or a state_dict (torchvision or timm layout); never downloaded."
    )
    return build


efficientnet_b0 = _builder("b0")
efficientnet_b1 = _builder("b1")
efficientnet_b2 = _builder("b2")
efficientnet_b3 = _builder("b3")
efficientnet_b4 = _builder("b4")
efficientnet_b5 = _builder("b5")
efficientnet_b6 = _builder("b6")
efficientnet_b7 = _builder("b7")
