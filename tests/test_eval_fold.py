"""DWConvBNAct and ProjectBN in eval() fold BatchNorm into a per-channel scale and shift inside the
op (its kernel reads the BN's weight, bias and running statistics): every way the BN tensors can
change must be seen, as eager BatchNorm sees it, including writes that bypass version counters
(so nothing derived from them is kept between calls), and autograd must see the fold. The Triton
depthwise kernels read a copy of the conv weight (its taps by channel), which must follow the
weight the same way."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DEVICE
from eager import EagerDWConvBNAct, randomize_
from torch import nn

import fused_mbconv
from fused_mbconv import ops
from fused_mbconv.nn import DWConvBNAct, ProjectBN


@pytest.fixture(params=["depthwise", "projection"])
def kind(request):
    return request.param


def pair(kind, seed=0):
    """(fused, eager) in eval() on the test device with the same random weights and statistics:
    DWConvBNAct or ProjectBN (8 -> 6 channels) and their unfused modules."""
    if kind == "depthwise":
        eager, fused = EagerDWConvBNAct(8, 3, 1), DWConvBNAct(8, 3, 1)
    else:
        eager, fused = nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)), ProjectBN(8, 6)
    eager = randomize_(eager, torch.Generator().manual_seed(seed)).eval()
    fused.load_state_dict(eager.state_dict())
    return fused.to(DEVICE).eval(), eager.to(DEVICE)


X = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def same(fused, eager, x=X):
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m[1].weight.mul_(1.5),  # an optimizer step (in place)
        lambda m: m[1].weight.data.mul_(1.5),  # through .data: the Parameter's version counter is not bumped
        lambda m: m[1].running_var.add_(0.5),
        lambda m: m.load_state_dict({k: v * 1.1 if v.is_floating_point() else v for k, v in m.state_dict().items()}),
        lambda m: setattr(m[1].bias, "data", m[1].bias.data + 1.0),  # a new tensor under the same Parameter
        lambda m: setattr(m[1], "eps", 0.5),
    ],
    ids=["in-place", "in-place-data", "running-stat", "load_state_dict", "data-assign", "eps"],
)
def test_a_changed_bn_refreshes_the_fold(kind, change):
    fused, eager = pair(kind)
    same(fused, eager)
    with torch.no_grad():
        change(fused)
    eager.load_state_dict(fused.state_dict())
    eager[1].eps = fused[1].eps
    same(fused, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_training_step_refreshes_the_fold(kind, backend):
    """The training step's running statistics reach the next eval() call (the Triton kernel that
    updates them writes without bumping their version counters)."""
    fused, eager = pair(kind)
    with fused_mbconv.backend(backend):
        same(fused, eager)
        x = torch.randn(4, 8, 9, 9, device=DEVICE)
        fused.train()(x)  # new running statistics
        eager.train()(x)
        same(fused.eval(), eager.eval())


def test_dtype_conversion_refreshes_the_fold(kind):
    fused, eager = pair(kind)
    same(fused, eager)
    fused, eager = fused.double(), eager.double()
    with torch.no_grad():
        torch.testing.assert_close(fused(X.double()), eager(X.double()), rtol=1e-12, atol=1e-12)


def test_gradients_reach_bn_parameters_in_eval(kind):
    """Through the inference ops' registered backward, which chains the fold's (frozen
    statistics, trainable affine: detection fine-tuning)."""
    fused, eager = pair(kind)
    same(fused, eager)  # a fold made without autograd first
    for m in (fused, eager):
        m(X).square().sum().backward()
    for a, b in ((fused[1].weight, eager[1].weight), (fused[1].bias, eager[1].bias)):
        assert a.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_a_fold_made_in_inference_mode_is_not_saved_for_backward(kind):
    fused, eager = pair(kind)
    for p in fused.parameters():
        p.requires_grad_(False)  # frozen backbone
    with torch.inference_mode():
        fused(X)
    x = X.clone().requires_grad_(True)
    fused(x).sum().backward()  # would fail if the inference-mode fold were reused here
    x_eager = X.clone().requires_grad_(True)
    eager(x_eager).sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend cannot run here")
@pytest.mark.parametrize(
    "change",
    [
        lambda w: w.mul_(1.5),  # an optimizer step (in place)
        lambda w: w.data.mul_(1.5),  # through .data: no version bump
        lambda w: setattr(w, "data", w.data + 1.0),  # a new tensor under the same Parameter
    ],
    ids=["in-place", "in-place-data", "data-assign"],
)
def test_depthwise_taps_follow_the_weight(change):
    fused, eager = pair("depthwise")
    weight = fused[0].weight
    with fused_mbconv.backend("triton"):
        same(fused, eager)
        with torch.no_grad():
            change(weight)
        eager[0].weight.data.copy_(weight)
        same(fused, eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_running_statistics_in_the_op_equal_the_fold_then_the_op(kind, backend, dtype):
    """The inference ops given BN's weight, bias and running statistics (folded in the kernel)
    compute what fold_batch_norm followed by the op with the folded (scale, shift) computes: the
    same math, differently rounded (the kernels subtract the mean before scaling). Parameters and
    buffers in the activations' dtype, as in a model converted with .to(dtype)."""
    g = torch.Generator().manual_seed(3)
    c = 8 if kind == "depthwise" else 6

    def t(*shape, positive=False):
        v = torch.rand(*shape, generator=g) + 0.5 if positive else torch.randn(*shape, generator=g)
        return v.to(DEVICE, dtype)

    x = t(2, 8, 7, 9).contiguous(memory_format=torch.channels_last)
    gamma, beta, mean, var = t(c, positive=True), t(c), 3 * t(c), t(c, positive=True)
    with fused_mbconv.backend(backend):
        scale, shift = ops.fold_batch_norm(gamma, beta, mean, var, 1e-3)
        if kind == "depthwise":
            w = t(8, 1, 3, 3)
            got = ops.dwconv_bn_silu(x, w, gamma, beta, 1, [1, 1, 1, 1], True, mean, var, 1e-3)
            want = ops.dwconv_bn_silu(x, w, scale, shift, 1, [1, 1, 1, 1], True)
        else:
            w, gate, residual = t(6, 8, 1, 1), t(2, 8, positive=True), t(2, 6, 7, 9)
            got = ops.project_bn(x, gate, w, gamma, beta, residual, None, True, mean, var, 1e-3)
            want = ops.project_bn(x, gate, w, scale, shift, residual, None, True)
    # fp32: a few ulps of the outputs (|y| ~ 10); bf16: one rounding of the output (2^-8 relative)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-7}
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        torch.testing.assert_close(a, b, **tol)
