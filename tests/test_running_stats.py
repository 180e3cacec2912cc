"""fused_mbconv::update_running_stats advances BatchNorm's running buffers as nn.BatchNorm2d does
in training, on every backend: checked against nn.BatchNorm2d itself (fp32) and against the
formula in fp64 (low-precision buffers, non-contiguous buffers), and it rejects bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from fused_mbconv import ops

C = 20  # not a multiple of the kernel's block: masked lanes


def _stats(n=4, h=3, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, C, h, w, generator=g) * 3 + 2).to(DEVICE)
    return x, x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False), n * h * w


@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
def test_matches_batch_norm(backend, momentum):
    x, mean, var, count = _stats()
    bn = torch.nn.BatchNorm2d(C, momentum=momentum).to(DEVICE).train()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    bn(x)
    ops.update_running_stats(running_mean, running_var, mean, var, momentum, count)
    torch.testing.assert_close(running_mean, bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(running_var, bn.running_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_buffer_dtypes(backend, dtype):
    """Buffers of a bf16 / fp16 / fp32 model, fp32 statistics: within two of the buffer dtype's
    ulps of the fp64 formula (a rounding to the buffer's dtype, and the reference's rounding of
    the statistics to it first); fp32, eight (the lerp's and the unbiasing's own roundings)."""
    _, mean, var, count = _stats(seed=1)
    running_mean = torch.linspace(-1, 1, C, device=DEVICE).to(dtype)
    running_var = torch.linspace(0.5, 2, C, device=DEVICE).to(dtype)
    exact_mean = 0.9 * running_mean.double() + 0.1 * mean.double()
    exact_var = 0.9 * running_var.double() + 0.1 * var.double() * count / (count - 1)
    ops.update_running_stats(running_mean, running_var, mean, var, 0.1, count)
    assert running_mean.dtype == dtype and running_var.dtype == dtype
    ulps = (8 if dtype == torch.float32 else 2) * torch.finfo(dtype).eps
    for got, exact in ((running_mean, exact_mean), (running_var, exact_var)):
        assert ((got.double() - exact).abs() <= ulps * exact.abs().clamp_min(1e-3)).all(), (got, exact)


def test_non_contiguous_buffers_update_in_place(backend):
    _, mean, var, count = _stats(seed=2)
    storage = torch.ones(2, C, device=DEVICE)
    running_mean, running_var = storage[:, 0::1][0], torch.ones(C, 2, device=DEVICE)[:, 1]
    assert not running_var.is_contiguous()
    ops.update_running_stats(running_mean, running_var, mean, var, 0.5, count)
    torch.testing.assert_close(storage[0], 0.5 + 0.5 * mean)
    torch.testing.assert_close(running_var, 0.5 + 0.5 * var * count / (count - 1))


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(mean=torch.zeros(C + 1)), ValueError, r"mean: expected shape \(20\), got \(21,\)"),
        (dict(running_var=torch.zeros(C, dtype=torch.int64)), TypeError, "running_var: expected dtype"),
        (dict(momentum=1.5), ValueError, r"momentum: expected a value in \[0, 1\], got 1.5"),
        (dict(count=1), ValueError, "count: expected at least 2 values per channel"),
        (dict(running_mean=torch.zeros(1, C)), ValueError, "running_mean: expected a 1-D tensor"),
    ],
    ids=["shape", "dtype", "momentum", "count", "rank"],
)
def test_bad_input(change, error, pattern):
    args = dict(running_mean=torch.zeros(C), running_var=torch.ones(C), mean=torch.zeros(C), var=torch.ones(C),
                momentum=0.1, count=8)  # fmt: skip
    args.update(change)
    with pytest.raises(error, match=pattern):
        ops.update_running_stats(**args)
