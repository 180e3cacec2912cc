"""The fused squeeze-excite kernels (Triton and CUDA backends) on every squeeze-excite shape of
EfficientNet-B0..B7, at batch 2, channels_last, bf16 and fp32: output and gradients (x and the four
weights) against the fp64 reference, within conftest's bound from eager PyTorch's error; and the
squeeze and channel scale of a tensor past 2^31 elements (int64 offsets). GPU only
(far too big for the interpreter); the shape table itself is checked against torchvision's models
anywhere."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import backend_params, past_int32, past_int32_input
from test_squeeze_excite import check_functional

import fused_mbconv
from fused_mbconv.models.config import VARIANTS, layer_shapes


def se_shapes(variant: str) -> list[tuple[int, int, int]]:
    """(C, R, size) of each squeeze-excite in ``variant``: C the expanded channels, R a quarter of
    the block's input channels, size x size the block's output."""
    return [(s.expanded, s.block.squeeze_channels, s.out_size) for s in layer_shapes(VARIANTS[variant])]


@pytest.mark.parametrize("variant", VARIANTS)
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
    resolution = VARIANTS[variant].resolution
    model(torch.empty(1, 3, resolution, resolution, device="meta"))
    assert seen == se_shapes(variant)


SHAPES = sorted({shape for variant in VARIANTS for shape in se_shapes(variant)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend_name", backend_params("triton", "cuda"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("channels,reduced,size", SHAPES, ids=lambda v: str(v))
def test_efficientnet_se_shape(channels, reduced, size, dtype, backend_name):
    with fused_mbconv.backend(backend_name):
        check_functional((2, channels, size, size), reduced, dtype, "channels_last", "4d")


PAST_INT32 = (1, 64, 6000, 5600)  # fp16, 2.15e9 elements (precompile_triton.py compiles its kernels)


@past_int32
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("backend_name", backend_params("triton", "cuda"))
def test_past_int32_offsets(layout, backend_name):
    """PAST_INT32 has more than 2^31 elements: the squeeze reads it and the channel scale reads
    and writes it, so their offsets must be int64. The squeeze against torch's mean (x: noise on a
    level per channel and a ramp down the rows, so that reading the wrong channels or rows changes
    the means); the scale on row slices at the start, middle and end."""
    _, c, h, _ = PAST_INT32
    x = past_int32_input(PAST_INT32, layout)
    x.mul_(0.1).add_(torch.linspace(0, 1, c, device="cuda", dtype=x.dtype)[None, :, None, None])
    x.add_(torch.linspace(0, 1, h, device="cuda", dtype=x.dtype)[None, None, :, None])
    gate = torch.rand(1, c, device="cuda", dtype=torch.float16) + 0.5
    with fused_mbconv.backend(backend_name):
        pooled = fused_mbconv.ops.se_squeeze(x)
        y = fused_mbconv.ops.se_scale(x, gate)
    torch.testing.assert_close(pooled, x.mean((2, 3)), rtol=2e-3, atol=2e-3)  # torch sums half in fp32
    for rows in (slice(0, 2), slice(h // 2 - 1, h // 2 + 1), slice(h - 2, h)):
        torch.testing.assert_close(y[:, :, rows], x[:, :, rows] * gate[:, :, None, None], rtol=1e-3, atol=0)
