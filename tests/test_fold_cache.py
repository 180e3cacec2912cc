"""DWConvBNAct and ProjectBN in eval() fold BatchNorm into a per-channel scale and shift once and
reuse them; every way the BN tensors can change must refresh them, and autograd must still see
the fold. The Triton depthwise kernels' copy of the conv weight (its taps by channel) is kept
per weight tensor the same way."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS
from eager import EagerDWConvBNAct, randomize_
from torch import nn

import fused_mbconv
from fused_mbconv import _derived
from fused_mbconv.nn import DWConvBNAct, ProjectBN


@pytest.fixture(params=["depthwise", "projection"])
def kind(request):
    return request.param


def pair(kind, seed=0):
    """(fused, eager) in eval() with the same random weights and statistics: DWConvBNAct or
    ProjectBN (8 -> 6 channels) and their unfused modules."""
    if kind == "depthwise":
        eager, fused = EagerDWConvBNAct(8, 3, 1), DWConvBNAct(8, 3, 1)
    else:
        eager, fused = nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)), ProjectBN(8, 6)
    eager = randomize_(eager, torch.Generator().manual_seed(seed)).eval()
    fused.load_state_dict(eager.state_dict())
    return fused.eval(), eager


X = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(1))


def same(fused, eager, x=X):
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-5, atol=1e-6)


def test_the_fold_is_computed_once_and_reused(kind):
    fused, eager = pair(kind)
    same(fused, eager)
    scale = fused._fold_cache[2]
    same(fused, eager)
    assert fused._fold_cache[2] is scale


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m[1].weight.mul_(1.5),  # an optimizer step (in place)
        lambda m: m[1].running_var.add_(0.5),
        lambda m: m.load_state_dict({k: v * 1.1 if v.is_floating_point() else v for k, v in m.state_dict().items()}),
        lambda m: setattr(m[1].bias, "data", m[1].bias.data + 1.0),  # a new tensor under the same Parameter
        lambda m: setattr(m[1], "eps", 0.5),
    ],
    ids=["in-place", "running-stat", "load_state_dict", "data-assign", "eps"],
)
def test_a_changed_bn_refreshes_the_fold(kind, change):
    fused, eager = pair(kind)
    same(fused, eager)
    with torch.no_grad():
        change(fused)
    eager.load_state_dict(fused.state_dict())
    eager[1].eps = fused[1].eps
    same(fused, eager)


def test_a_training_step_refreshes_the_fold(kind):
    fused, eager = pair(kind)
    same(fused, eager)
    x = torch.randn(4, 8, 9, 9)
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
    fused, eager = pair(kind)
    same(fused, eager)  # a cached fold exists, made without autograd
    for m in (fused, eager):
        m(X).square().sum().backward()
    for a, b in ((fused[1].weight, eager[1].weight), (fused[1].bias, eager[1].bias)):
        assert a.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_a_fold_made_in_inference_mode_is_not_saved_for_backward(kind):
    fused, eager = pair(kind)
    for p in fused.parameters():
        p.requires_grad_(False)  # frozen backbone: the fold may be cached with grad mode on
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
        lambda w: setattr(w, "data", w.data + 1.0),  # a new tensor under the same Parameter
    ],
    ids=["in-place", "data-assign"],
)
def test_depthwise_taps_follow_the_weight(change):
    from fused_mbconv.ops.dwconv_bn_silu import triton_impl

    fused, eager = pair("depthwise")
    weight = fused[0].weight
    with fused_mbconv.backend("triton"):
        same(fused, eager)
        taps = triton_impl._TAPS[weight][1]
        same(fused, eager)
        assert triton_impl._TAPS[weight][1] is taps  # reused while the weight is unchanged
        with torch.no_grad():
            change(weight)
        eager[0].weight.data.copy_(weight)
        same(fused, eager)
        assert triton_impl._TAPS[weight][1] is not taps


def _capturing(monkeypatch):
    """As during a CUDA graph capture (which needs a GPU: tests/test_runtime.py captures one)."""
    monkeypatch.setattr(_derived, "_capturing", lambda tensors: True)


def test_no_fold_is_kept_or_reused_during_a_cuda_graph_capture(kind, monkeypatch):
    """A graph must fold the live BN tensors on every replay: the fold kept before the capture is
    neither read (it would not follow in-place updates) nor replaced (its memory would be freed
    under the replays)."""
    fused, eager = pair(kind)
    same(fused, eager)
    kept = fused._fold_cache
    _capturing(monkeypatch)
    with torch.no_grad():
        fused[1].weight.mul_(1.5)
    eager.load_state_dict(fused.state_dict())
    same(fused, eager)
    assert fused._fold_cache is kept


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend cannot run here")
def test_no_taps_copy_is_kept_or_reused_during_a_cuda_graph_capture(monkeypatch):
    from fused_mbconv.ops.dwconv_bn_silu import triton_impl

    fused, eager = pair("depthwise")
    weight = fused[0].weight
    with fused_mbconv.backend("triton"):
        same(fused, eager)
        kept = triton_impl._TAPS[weight]
        _capturing(monkeypatch)
        with torch.no_grad():
            weight.mul_(1.5)
        eager[0].weight.data.copy_(weight)
        same(fused, eager)
        assert triton_impl._TAPS[weight] is kept
