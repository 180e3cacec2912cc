"""pytest-benchmark suite of the fused ops, for regression tracking:

    pytest bench --benchmark-only --benchmark-autosave          # record
    pytest bench --benchmark-only --benchmark-compare           # compare with the last record

Runs on the GPU with the backend in force (FUSED_MBCONV_BACKEND), on the CPU with the reference
backend and small shapes. An EfficientNet-B0 stage-4 sized layer (k5, 240 channels, 28x28)
stands for the typical depthwise layer.
"""

from __future__ import annotations

import pytest
import torch

from fused_mbconv import ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BATCH = 32 if DEVICE.type == "cuda" else 2
C, K, H = 240, 5, 28


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _inputs():
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(BATCH, C, H, H, generator=g).to(DEVICE, DTYPE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, K, K, generator=g).to(DEVICE)
    scale, shift = (torch.rand(C, generator=g) + 0.5).to(DEVICE), torch.randn(C, generator=g).to(DEVICE)
    return x, w, scale, shift


def _bench(benchmark, fn):
    def run():
        fn()
        _sync()

    benchmark.pedantic(run, rounds=20 if DEVICE.type == "cuda" else 3, warmup_rounds=2)


@pytest.mark.parametrize("stride", [1, 2])
def test_dwconv_bn_silu_infer(benchmark, stride):
    x, w, scale, shift = _inputs()
    _bench(benchmark, lambda: ops.dwconv_bn_silu(x, w, scale, shift, stride, [2, 2, 2, 2], True))


def test_dwconv_bn_silu_train_forward(benchmark):
    x, w, gamma, beta = _inputs()
    _bench(benchmark, lambda: ops.dwconv_bn_silu_train(x, w, gamma, beta, 1e-3, 1, [2, 2, 2, 2], True))


def test_dwconv_bn_silu_backward(benchmark):
    x, w, gamma, beta = _inputs()
    mean, invstd = torch.zeros_like(gamma), torch.ones_like(gamma)
    dy = torch.randn_like(x)
    padding = [2, 2, 2, 2]
    _bench(benchmark, lambda: ops.dwconv_bn_silu_backward(dy, None, x, w, gamma, beta, mean, invstd, 1, padding, True))


def test_squeeze_excite(benchmark):
    x, *_ = _inputs()
    w1, b1 = torch.randn(C // 24, C, device=DEVICE), torch.randn(C // 24, device=DEVICE)
    w2, b2 = torch.randn(C, C // 24, device=DEVICE), torch.randn(C, device=DEVICE)
    _bench(benchmark, lambda: ops.se_scale(x, ops.se_excite(ops.se_squeeze(x), w1, b1, w2, b2)))
