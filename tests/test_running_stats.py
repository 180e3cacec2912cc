"""fused_mbconv::update_running_stats advances BatchNorm's running buffers as nn.BatchNorm2d does
in training, on every backend: checked against nn.BatchNorm2d itself (fp32) and against the
formula in fp64 (low-precision buffers, non-contiguous buffers), and it rejects bad input.
fused_mbconv::fold_batch_norm gives the affine map of nn.BatchNorm2d in eval(): checked against
nn.BatchNorm2d itself, the fp64 formula and autograd's gradients of it."""

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


def test_the_update_bumps_the_buffers_version_counters(backend):
    """As nn.BatchNorm2d's in-place update does, through the op and through the modules' eager
    fast path alike (a kernel's writes bump nothing by themselves)."""
    from fused_mbconv.ops._eager import call

    _, mean, var, count = _stats(seed=3)
    running_mean, running_var = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    for update in (ops.update_running_stats, lambda *a: call(ops.update_running_stats, *a)):
        versions = running_mean._version, running_var._version
        update(running_mean, running_var, mean, var, 0.1, count)
        assert running_mean._version > versions[0] and running_var._version > versions[1]


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


# ---------------------------------------------------------------------------------------------
# fold


def _eval_bn(affine: bool, dtype=torch.float32, seed=3) -> torch.nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(C, eps=1e-3, affine=affine)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=g) * 2)
        bn.running_var.copy_(torch.rand(C, generator=g) * 3 + 0.01)
        if affine:
            bn.weight.copy_(torch.randn(C, generator=g))
            bn.bias.copy_(torch.randn(C, generator=g))
    return bn.to(DEVICE, dtype).eval()


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_fold_is_batch_norm_in_eval(backend, affine):
    """scale * x + shift is nn.BatchNorm2d's eval output, to fp32 rounding (the two associate
    the same terms differently)."""
    bn = _eval_bn(affine)
    x, *_ = _stats()
    scale, shift = ops.fold_batch_norm(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    assert scale.dtype == shift.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(scale[:, None, None] * x + shift[:, None, None], bn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_fold_of_low_precision_parameters(backend, dtype):
    """A bf16 / fp16 model's BN folds in fp32 (fp64 statistics in fp64), within a few of the
    fold's dtype's ulps of the fp64 formula of the same stored values."""
    bn = _eval_bn(True, dtype)
    scale, shift = ops.fold_batch_norm(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert scale.dtype == shift.dtype == acc
    w, b, m, v = (t.double() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
    exact_scale = w / torch.sqrt(v + bn.eps)
    exact_shift = b - m * exact_scale
    ulps = 4 * torch.finfo(acc).eps
    for got, exact, magnitude in ((scale, exact_scale, exact_scale.abs()), (shift, exact_shift, (m * exact_scale).abs() + b.abs())):
        assert ((got.double() - exact).abs() <= ulps * magnitude.clamp_min(1e-6)).all(), (got, exact)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_fold_gradients(backend, affine):
    """The registered backward against autograd through the formula, fp32, every input."""
    bn = _eval_bn(affine)
    inputs = [None if t is None else t.detach().clone().requires_grad_(True)
              for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]  # fmt: skip
    g = torch.Generator().manual_seed(4)
    dscale, dshift = (torch.randn(C, generator=g).to(DEVICE) for _ in range(2))
    scale, shift = ops.fold_batch_norm(*inputs, bn.eps)
    got = torch.autograd.grad((scale * dscale + shift * dshift).sum(), [t for t in inputs if t is not None])
    w, b, m, v = inputs
    invstd = torch.rsqrt(v + bn.eps)
    ref_scale = invstd if w is None else w * invstd
    ref_shift = -m * ref_scale + (0 if b is None else b)
    expected = torch.autograd.grad((ref_scale * dscale + ref_shift * dshift).sum(), [t for t in inputs if t is not None])
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_fold_gradcheck_fp64():
    inputs = [(torch.randn(C, dtype=torch.float64, device=DEVICE) + (2 if i == 3 else 0)).abs().requires_grad_(True)
              for i in range(4)]  # fmt: skip
    assert torch.autograd.gradcheck(lambda *t: ops.fold_batch_norm(*t, 1e-3), inputs)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(running_var=torch.ones(C + 1)), ValueError, r"running_var: expected shape \(20\), got \(21,\)"),
        (dict(weight=torch.ones(C, dtype=torch.int64)), TypeError, "weight: expected dtype"),
        (dict(bias=torch.ones(2, C)), ValueError, r"bias: expected shape \(20\), got \(2, 20\)"),
        (dict(eps=-1.0), ValueError, r"eps: expected a value >= 0, got -1.0"),
        (dict(running_mean=torch.zeros(1, C)), ValueError, "running_mean: expected a 1-D tensor"),
    ],
    ids=["shape", "dtype", "bias-shape", "eps", "rank"],
)
def test_fold_bad_input(change, error, pattern):
    args = dict(weight=torch.ones(C), bias=torch.zeros(C), running_mean=torch.zeros(C), running_var=torch.ones(C),
                eps=1e-5)  # fmt: skip
    args.update(change)
    with pytest.raises(error, match=pattern):
        ops.fold_batch_norm(**args)
