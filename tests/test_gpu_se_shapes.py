"""The Triton squeeze-excite kernels on every squeeze-excite shape of EfficientNet-B0..B7, at batch
2, channels_last, bf16 and fp32: output and gradients (x and the four weights) against the fp64
reference, within conftest's bound from eager PyTorch's error. GPU only (far too big for the
interpreter); the shape table itself is checked against torchvision's models anywhere."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from conftest import BACKENDS
from test_squeeze_excite import check_functional

import fused_mbconv

# EfficientNet-B0's stages (Tan & Le 2019, table 1): expand ratio, stride, input and output
# channels, repeats. The stem (32 channels) halves the input first.
B0_STAGES = [
    (1, 1, 32, 16, 1),
    (6, 2, 16, 24, 2),
    (6, 2, 24, 40, 2),
    (6, 2, 40, 80, 3),
    (6, 1, 80, 112, 3),
    (6, 2, 112, 192, 4),
    (6, 1, 192, 320, 1),
]
# variant: (width multiplier, depth multiplier, input resolution)
SCALING = {
    "b0": (1.0, 1.0, 224),
    "b1": (1.0, 1.1, 240),
    "b2": (1.1, 1.2, 260),
    "b3": (1.2, 1.4, 300),
    "b4": (1.4, 1.8, 380),
    "b5": (1.6, 2.2, 456),
    "b6": (1.8, 2.6, 528),
    "b7": (2.0, 3.1, 600),
}


def round_filters(channels: float, divisor: int = 8) -> int:
    """The nearest multiple of ``divisor``, but never below 90% of ``channels``."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def se_shapes(variant: str) -> list[tuple[int, int, int]]:
    """(C, R, size) of each squeeze-excite in ``variant``: C the expanded channels, R a quarter of
    the block's input channels, size x size the block's output (every stride-2 step, the stem's
    included, rounds up: "same" padding)."""
    width, depth, resolution = SCALING[variant]
    size = math.ceil(resolution / 2)
    shapes = []
    for expand, stride, cin, cout, repeats in B0_STAGES:
        cin, cout = round_filters(cin * width), round_filters(cout * width)
        size = math.ceil(size / stride)
        for i in range(math.ceil(depth * repeats)):
            block_in = cin if i == 0 else cout
            shapes.append((round_filters(block_in * expand), max(1, block_in // 4), size))
    return shapes


@pytest.mark.parametrize("variant", SCALING)
def test_shapes_are_torchvisions(variant):
    """The helper agrees with torchvision's model, built and run on the meta device (no memory,
    no compute), whose squeeze-excites report their channels and input size."""
    with torch.device("meta"):
        model = getattr(torchvision.models, f"efficientnet_{variant}")().eval()
    seen = []
    for module in model.modules():
        if isinstance(module, torchvision.ops.SqueezeExcitation):
            module.register_forward_hook(
                lambda m, args, out: seen.append((m.fc1.in_channels, m.fc1.out_channels, args[0].shape[-1]))
            )
    resolution = SCALING[variant][2]
    model(torch.empty(1, 3, resolution, resolution, device="meta"))
    assert seen == se_shapes(variant)


SHAPES = sorted({shape for variant in SCALING for shape in se_shapes(variant)})


@pytest.mark.skipif(not torch.cuda.is_available() or "triton" not in BACKENDS, reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("channels,reduced,size", SHAPES, ids=lambda v: str(v))
def test_efficientnet_se_shape(channels, reduced, size, dtype):
    with fused_mbconv.backend("triton"):
        check_functional((2, channels, size, size), reduced, dtype, "channels_last", "4d")
