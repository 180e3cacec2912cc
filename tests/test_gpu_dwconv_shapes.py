"""GPU sweep: the fused backends ("triton", "cuda") against the reference backend on every depthwise layer shape of
EfficientNet-B0..B7 (batch 2, native resolution), bf16 and fp32, eval and train, outputs and
gradients; and a tensor past 2^31 elements (int64 offsets). Skipped without CUDA.

The shapes come from the model's own description (fused_mbconv.models.config), which
tests/test_gpu_se_shapes.py checks against torchvision's models.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_matches, backend_params, past_int32, past_int32_input
from eager import randomize_

import fused_mbconv
from fused_mbconv.models.config import VARIANTS, DWShape, depthwise_shapes, round_filters
from fused_mbconv.ops.dwconv_bn_silu import reference


def all_depthwise_shapes() -> list[DWShape]:
    """The distinct depthwise shapes over B0..B7."""
    return list(dict.fromkeys(s for variant in VARIANTS for s in depthwise_shapes(variant)))


def test_round_filters_and_b0_table():
    assert [round_filters(c, 1.6) for c in (32, 16, 24, 320)] == [48, 24, 40, 512]  # B5 as in timm
    assert depthwise_shapes("b0") == [
        DWShape(32, 3, 1, 112), DWShape(96, 3, 2, 112), DWShape(144, 3, 1, 56), DWShape(144, 5, 2, 56),
        DWShape(240, 5, 1, 28), DWShape(240, 3, 2, 28), DWShape(480, 3, 1, 14), DWShape(480, 5, 1, 14),
        DWShape(672, 5, 1, 14), DWShape(672, 5, 2, 14), DWShape(1152, 5, 1, 7), DWShape(1152, 3, 1, 7),
    ]  # fmt: skip


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BATCH = 2


@pytest.fixture(scope="module", autouse=True)
def _no_autotuning():
    # hundreds of shapes: one config each keeps compile and tuning time out of a correctness sweep
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSED_MBCONV_TRITON_AUTOTUNE", "0")
        yield


def _forward_backward(block, x, backend_name, seed=2):
    """y, squeeze and the grads of x, conv weight, BN weight and bias under ``backend_name``."""
    x = x.detach().requires_grad_(True)
    with fused_mbconv.backend(backend_name):
        y, squeeze = block(x, with_squeeze=True)
        g = torch.Generator(device=x.device).manual_seed(seed)
        dy = torch.randn(y.shape, generator=g, device=x.device, dtype=torch.float64).to(y.dtype)
        dsq = torch.randn(squeeze.shape, generator=g, device=x.device, dtype=torch.float64).to(y.dtype)
        grads = torch.autograd.grad([y, squeeze], [x, block[0].weight, block[1].weight, block[1].bias], [dy, dsq])
    return [y, squeeze, *grads]


@requires_cuda
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", all_depthwise_shapes(), ids=lambda s: s.name)
@pytest.mark.parametrize("backend_name", backend_params("triton", "cuda"))
def test_efficientnet_shape(shape: DWShape, dtype, training, backend_name):
    block64 = fused_mbconv.nn.DWConvBNAct(shape.channels, shape.kernel, shape.stride)
    randomize_(block64, torch.Generator().manual_seed(0))
    block64 = block64.cuda().double().train(training)
    block = copy.deepcopy(block64).to(dtype)
    x = torch.randn(BATCH, shape.channels, shape.size, shape.size, device="cuda", dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)

    fused = _forward_backward(copy.deepcopy(block), x, backend_name)
    ref = _forward_backward(copy.deepcopy(block), x, "reference")
    exact = _forward_backward(block64, x.double(), "reference")
    for name, a, r, e in zip(["y", "squeeze", "dx", "dweight", "dgamma", "dbeta"], fused, ref, exact, strict=True):
        assert_matches(a, r, e, name)


PAST_INT32 = (1, 48, 6000, 7500)  # fp16, 2.16e9 elements (precompile_triton.py compiles its kernels)


@past_int32
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("backend_name", backend_params("triton", "cuda"))
def test_past_int32_offsets(layout, backend_name):
    """PAST_INT32 has more than 2^31 elements: the kernel's offsets must be int64. Compared with
    the reference on row slices at the start, middle and end of the image."""
    _, c, h, _ = PAST_INT32
    k = 3
    x = past_int32_input(PAST_INT32, layout)
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(c, 1, k, k, generator=g) * 0.4).cuda().half()
    scale, shift = (torch.rand(c, generator=g) + 0.5).cuda(), torch.randn(c, generator=g).cuda()
    padding = [1, 1, 1, 1]
    with fused_mbconv.backend(backend_name):
        y, squeeze = fused_mbconv.ops.dwconv_bn_silu(x, weight, scale, shift, 1, padding, True)
    for rows in (slice(0, 4), slice(h // 2 - 2, h // 2 + 2), slice(h - 4, h)):
        # output rows r need input rows r - 1 .. r + 1; outside the image the slice is padded
        lo, hi = max(rows.start - 1, 0), min(rows.stop + 1, h)
        pads = [1 if rows.start == 0 else 0, 1 if rows.stop == h else 0, 1, 1]
        expected, _ = reference.forward_infer(x[:, :, lo:hi], weight, scale, shift, 1, pads, False)
        torch.testing.assert_close(y[:, :, rows], expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(squeeze.float(), y.mean((2, 3), dtype=torch.float32), rtol=2e-3, atol=2e-3)
