"""The fused pointwise GEMMs (the projection with SE gate, stochastic depth and residual; the
expansion with SiLU) on every such shape of EfficientNet-B0..B7 at batch 2, channels_last, bf16,
train and eval, on every backend that has them (Triton): output, every gradient and the running
statistics against eager PyTorch in the same dtype and in fp64 (test_project_bn's check); and a
tensor past 2^31 elements read and written (int64 offsets). GPU only (far too big for the
interpreter); the shape lists themselves are checked anywhere."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params, past_int32
from test_project_bn import check

import fused_mbconv
from fused_mbconv.models.config import VARIANTS, layer_shapes, se_project_shapes
from fused_mbconv.ops.project_bn import reference

BATCH = 2


def projection_shapes() -> list[tuple[int, int, int]]:
    """(C, O, size) of every projection of B0..B7 (each is run with the SE gate, stochastic depth
    and a residual: the kernels' full path)."""
    return sorted({(s.channels, s.out, s.size) for v in VARIANTS for s in se_project_shapes(v)})


def expansion_shapes() -> list[tuple[int, int, int]]:
    """(C, E, size) of every expansion of B0..B7 (blocks with expand ratio > 1), at its input size."""
    return sorted({(s.block.in_channels, s.expanded, s.in_size) for v in VARIANTS for s in layer_shapes(VARIANTS[v])
                   if s.expanded != s.block.in_channels})  # fmt: skip


def test_shape_lists_follow_the_block_table():
    assert (16, 96, 112) in expansion_shapes()  # B0 stage 2's first block: 16 -> 96 at 112 x 112
    assert (32, 16, 112) in projection_shapes()  # B0's first block (expand ratio 1)
    assert (3840, 640, 19) in projection_shapes()  # B7's last block: 640 * 6 -> 640 at 19 x 19
    assert all(e == 6 * c for c, e, _ in expansion_shapes())  # every expansion of EfficientNet is x6


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TRAINING = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
# bf16 only, the dtype of the benchmarks and the least precise: fp32 and fp16 parity is covered at
# small shapes (test_project_bn), and the sweep must fit the GPU session's test step
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)


@GPU
@pytest.mark.parametrize("backend_name", backend_params("triton"))
@DTYPES
@TRAINING
@pytest.mark.parametrize("channels,out,size", projection_shapes(), ids=str)
def test_efficientnet_projection_shape(channels, out, size, training, dtype, backend_name):
    with fused_mbconv.backend(backend_name):
        check(dtype, "channels_last", training, with_extras=True, shape=(BATCH, channels, out, size, size))


@GPU
@pytest.mark.parametrize("backend_name", backend_params("triton"))
@DTYPES
@TRAINING
@pytest.mark.parametrize("channels,expanded,size", expansion_shapes(), ids=str)
def test_efficientnet_expansion_shape(channels, expanded, size, training, dtype, backend_name):
    with fused_mbconv.backend(backend_name):
        check(dtype, "channels_last", training, with_extras=False, silu=True, shape=(BATCH, channels, expanded, size, size))


# (C in, O out) on a PAST_INT32_PLANE image in fp16: 64 channels of it are 2.15e9 elements
# (precompile_triton.py compiles their kernels)
PAST_INT32_GEMMS = ((64, 16), (16, 64))
PAST_INT32_PLANE = (6000, 5600)


@past_int32
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("channels,out", PAST_INT32_GEMMS, ids=["projection-reads", "expansion-writes"])
@pytest.mark.parametrize("backend_name", backend_params("triton"))
def test_past_int32_offsets(channels, out, layout, backend_name):
    """64 channels of a PAST_INT32_PLANE image have more than 2^31 elements: the GEMM reads them
    (the gated projection 64 -> 16) or writes them (the expansion 16 -> 64 with SiLU), so its
    offsets must be int64. Row slices at the start, middle and end compared with the reference (a
    1x1 conv: each output row depends on its input row alone)."""
    h, w = PAST_INT32_PLANE
    x = torch.randn(1, channels, h, w, device="cuda", dtype=torch.float16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert max(channels, out) * h * w > 2**31
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(out, channels, 1, 1, generator=g) / channels**0.5).cuda().half()
    gate = (torch.rand(1, channels, generator=g) + 0.5).cuda().half() if channels > out else None
    scale, shift = (torch.rand(out, generator=g) + 0.5).cuda(), torch.randn(out, generator=g).cuda()
    silu = gate is None
    with fused_mbconv.backend(backend_name):
        y = fused_mbconv.ops.project_bn(x, gate, weight, scale, shift, None, None, silu)
    for rows in (slice(0, 2), slice(h // 2 - 1, h // 2 + 1), slice(h - 2, h)):
        expected = reference.forward_infer(x[:, :, rows], gate, weight, scale, shift, None, None, silu)
        torch.testing.assert_close(y[:, :, rows], expected, rtol=2e-3, atol=2e-3)
