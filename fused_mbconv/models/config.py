"""The one compact description of EfficientNet B0-B7 (Tan & Le, 2019): the B0 stage table, each
variant's width, depth, resolution and dropout, and the reference rounding rules that scale B0.

    >>> [b.out_channels for b in blocks(VARIANTS["b0"])][:3]
    [16, 24, 24]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Stage:
    """One row of the B0 table: ``layers`` MBConv blocks, the first with ``stride``."""

    expand_ratio: int
    kernel_size: int
    stride: int
    in_channels: int
    out_channels: int
    layers: int


# B0, found by architecture search (the paper's Table 1): stem conv 3x3/2 to 32 channels, these
# seven MBConv stages, then a 1x1 conv to 1280 channels, pooling and the classifier.
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
B0_STAGES = (
    Stage(1, 3, 1, 32, 16, 1),
    Stage(6, 3, 2, 16, 24, 2),
    Stage(6, 5, 2, 24, 40, 2),
    Stage(6, 3, 2, 40, 80, 3),
    Stage(6, 5, 1, 80, 112, 3),
    Stage(6, 5, 2, 112, 192, 4),
    Stage(6, 3, 1, 192, 320, 1),
)
SE_RATIO = 0.25  # squeeze width, as a fraction of the block's input channels


@dataclass(frozen=True)
class Variant:
    """Compound scaling of B0, and the BatchNorm settings of torchvision's port of the weights."""

    name: str
    width: float
    depth: float
    resolution: int
    dropout: float
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1


# torchvision builds B5-B7 with BatchNorm2d(eps=1e-3, momentum=0.01) and B0-B4 with the defaults.
VARIANTS = {
    v.name: v
    for v in (
        Variant("b0", 1.0, 1.0, 224, 0.2),
        Variant("b1", 1.0, 1.1, 240, 0.2),
        Variant("b2", 1.1, 1.2, 260, 0.3),
        Variant("b3", 1.2, 1.4, 300, 0.3),
        Variant("b4", 1.4, 1.8, 380, 0.4),
        Variant("b5", 1.6, 2.2, 456, 0.4, bn_eps=1e-3, bn_momentum=0.01),
        Variant("b6", 1.8, 2.6, 528, 0.5, bn_eps=1e-3, bn_momentum=0.01),
        Variant("b7", 2.0, 3.1, 600, 0.5, bn_eps=1e-3, bn_momentum=0.01),
    )
}


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width``: the nearest multiple of ``divisor``, never below 90% of
    the scaled value (the rule of the reference TensorFlow code)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's block count by ``depth``, rounding up."""
    return int(math.ceil(repeats * depth))


@dataclass(frozen=True)
class Block:
    """One MBConv block of a scaled network; ``stage`` counts from 0 over the seven MBConv stages."""

    stage: int
    expand_ratio: int
    kernel_size: int
    stride: int
    in_channels: int
    out_channels: int

    @property
    def expanded_channels(self) -> int:
        return round_filters(self.in_channels, self.expand_ratio)

    @property
    def squeeze_channels(self) -> int:
        return max(1, int(self.in_channels * SE_RATIO))


def blocks(variant: Variant) -> list[Block]:
    """Every MBConv block of ``variant`` in order; the first of each stage has the stage's stride
    and input width, the others stride 1 and the stage's output width on both sides."""
    out = []
    for index, stage in enumerate(B0_STAGES):
        in_channels = round_filters(stage.in_channels, variant.width)
        out_channels = round_filters(stage.out_channels, variant.width)
        for i in range(round_repeats(stage.layers, variant.depth)):
            out.append(
                Block(
                    index, stage.expand_ratio, stage.kernel_size, stage.stride if i == 0 else 1,
                    in_channels if i == 0 else out_channels, out_channels,
                )  # fmt: skip
            )
    return out


@dataclass(frozen=True)
class LayerShapes:
    """The activation sizes around one MBConv block's fusable layers, for an input image of
    ``resolution``: its depthwise conv sees (expanded, in_size, in_size) and its squeeze-excite
    (expanded, out_size, out_size), reduced to ``squeeze`` channels."""

    block: Block
    in_size: int
    out_size: int

    @property
    def expanded(self) -> int:
        return self.block.expanded_channels


def layer_shapes(variant: Variant, resolution: int | None = None) -> list[LayerShapes]:
    """Every block of ``variant`` with its spatial sizes ("same" padding rounds up: ceil(size / stride));
    the stem halves the image first."""
    size = math.ceil((resolution or variant.resolution) / 2)
    shapes = []
    for block in blocks(variant):
        out_size = math.ceil(size / block.stride)
        shapes.append(LayerShapes(block, size, out_size))
        size = out_size
    return shapes


class DWShape(NamedTuple):
    """One depthwise layer: ``channels`` (expanded), ``kernel``, ``stride``, input ``size`` x size."""

    channels: int
    kernel: int
    stride: int
    size: int  # input height = width

    @property
    def name(self) -> str:
        return f"c{self.channels}_k{self.kernel}_s{self.stride}_h{self.size}"


def depthwise_shapes(variant: str) -> list[DWShape]:
    """The distinct depthwise conv shapes of one EfficientNet variant, in network order."""
    layers = layer_shapes(VARIANTS[variant])
    return list(dict.fromkeys(DWShape(s.expanded, s.block.kernel_size, s.block.stride, s.in_size) for s in layers))


class SEProjectShape(NamedTuple):
    """One block's squeeze-excite + projection: the depthwise output (``channels`` C, ``size`` x
    size, the block's output size), squeezed to ``squeeze`` R channels, projected to ``out``
    O channels; ``residual`` when the block adds its input (stride 1, same width in and out)."""

    channels: int
    squeeze: int
    out: int
    size: int  # output height = width
    residual: bool

    @property
    def name(self) -> str:
        return f"c{self.channels}_r{self.squeeze}_o{self.out}_h{self.size}" + ("_res" if self.residual else "")


def se_project_shapes(variant: str) -> list[SEProjectShape]:
    """The distinct squeeze-excite + projection shapes of one EfficientNet variant, in network order."""
    shapes = []
    for s in layer_shapes(VARIANTS[variant]):
        b = s.block
        residual = b.stride == 1 and b.in_channels == b.out_channels  # MBConv's use_res_connect
        shapes.append(SEProjectShape(s.expanded, b.squeeze_channels, b.out_channels, s.out_size, residual))
    return list(dict.fromkeys(shapes))
