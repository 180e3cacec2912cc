"""torch.compile(fullgraph=True) of modules built on the fused ops: no graph breaks, same
outputs, gradients and running statistics as the uncompiled modules."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE
from torch import nn

import fused_mbconv


class DWSEBlock(nn.Module):
    """Depthwise conv + BN + SiLU feeding its squeeze to a squeeze-excite, as in MBConv."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.dw = fused_mbconv.nn.DWConvBNAct(channels, 5, 2, padding="tf")
        self.se = fused_mbconv.nn.SqueezeExcite(channels, 2)

    def forward(self, x):
        y, pooled = self.dw(x, with_squeeze=True)
        return self.se(y, pooled)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_compile_fullgraph_matches_eager(training):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = DWSEBlock().to(DEVICE).train(training)
    compiled_block = copy.deepcopy(block)
    compiled = torch.compile(compiled_block, fullgraph=True)
    x = torch.randn(2, 8, 11, 10, device=DEVICE).contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # the second call must reuse the compiled graph with updated buffers
        y = block(x)
        yc = compiled(x)
        torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
    if training:
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, list(block.parameters()), g)
        grads_c = torch.autograd.grad(yc, list(compiled_block.parameters()), g)
        for a, b in zip(grads_c, grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled_block.dw[1].running_var, block.dw[1].running_var)
        assert compiled_block.dw[1].num_batches_tracked.item() == block.dw[1].num_batches_tracked.item() == 2


def test_autocast_lookup_on_cuda_and_cpu_stays_traceable(monkeypatch):
    """The modules ask which dtype autocast casts to without torch.amp.is_autocast_available on
    CUDA and CPU: torch 2.11's dynamo cannot trace that call, and fullgraph compiles of every
    fused module failed there (seen with the GPU image's torch 2.11; this CI's 2.14 traces it)."""
    from fused_mbconv.nn.functional import autocast_dtype

    def untraceable(device_type):
        raise AssertionError(f"torch.amp.is_autocast_available({device_type!r}) was called")

    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    for device_type in ("cpu", "cuda"):
        assert autocast_dtype(device_type) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.undo()
    assert autocast_dtype("meta") is None  # no autocast there: torch would raise if asked
