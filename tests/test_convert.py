"""convert() on torchvision and timm models: the same Parameter objects under the same keys, the
same outputs and gradients as before (both against float64), a summary of what was fused and what
was left; revert() gives the original modules back and an exportable model."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import fused_mbconv
from fused_mbconv import parity
from fused_mbconv.__main__ import randomize_batch_norm_
from fused_mbconv.models.layers import Conv2dSame
from fused_mbconv.models.timm_block import FusedTimmBlock
from fused_mbconv.nn import DWConvBNAct, ExpandBNAct, ProjectBN, SqueezeExcite

MODELS = {  # name: (constructor, image size, what convert() should make of it)
    "torchvision_b0": (torchvision.models.efficientnet_b0, 64,
                       {"DWConvBNAct": 16, "SqueezeExcite": 16, "MBConv": 16, "ExpandBNAct": 16, "ProjectBN": 16}),
    # drop_path: the fused projection must draw the same per-sample masks as timm
    "timm_b0": (lambda: timm.create_model("efficientnet_b0", pretrained=False, drop_path_rate=0.3), 64,
                {"FusedTimmBlock": 16}),
    # odd size: TF "same" padding is asymmetric there
    "timm_tf_b0": (lambda: timm.create_model("tf_efficientnet_b0", pretrained=False), 67, {"FusedTimmBlock": 16}),
}


def build(name, seed=0):
    make, size, expected = MODELS[name]
    torch.manual_seed(seed)
    model = randomize_batch_norm_(make(), torch.Generator().manual_seed(seed))
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x, expected


def run(model, x, train):
    """eval: logits; train: (logits, gradients by name) of one step, dropout and drop-path seeded
    (the logits bound the loss: fused_mbconv/parity.py)."""
    if not train:
        with torch.no_grad():
            return model.eval()(x.to(next(model.parameters()).dtype))
    model.train().zero_grad(set_to_none=True)
    torch.manual_seed(5)
    logits = model(x.to(next(model.parameters()).dtype))
    nn.functional.cross_entropy(logits, torch.tensor([0, 10, 200, 999])).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_keeps_parameters_keys_and_outputs(name):
    model, x, expected = build(name)
    eager, exact = copy.deepcopy(model), copy.deepcopy(model).double()
    keys = list(model.state_dict())
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}

    converted, summary = fused_mbconv.convert(model)

    assert converted is model
    assert list(model.state_dict()) == keys
    after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert after.keys() == tensors.keys() and all(after[n] is t for n, t in tensors.items())
    print(summary)
    assert summary.counts() == expected and summary.left == []
    assert str(summary).startswith(f"converted {sum(expected.values())} modules, left 0")

    check = parity.compare("logits", run(model, x, False), run(eager, x, False), run(exact, x, False), torch.float32)
    print(check)
    assert check.ok
    # a copy converted to float64 afterwards is the float64 model (the fused views follow .to())
    as_double = run(copy.deepcopy(model).double(), x, False)
    torch.testing.assert_close(as_double, run(exact, x, False), rtol=1e-9, atol=1e-12)
    (logits, grads), (e_logits, e_grads), (x_logits, x_grads) = (run(m, x, True) for m in (model, eager, exact))
    assert parity.compare("training logits", logits, e_logits, x_logits, torch.float32).ok
    checks = parity.compare_all(grads, e_grads, x_grads, torch.float32)
    print("worst:", parity.worst(checks))
    assert all(c.ok for c in checks), [str(c) for c in checks if not c.ok]


# tracing TF "same" padding bakes the padding of the traced size in, as the warning says
EXPORT_WARNINGS = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.*deprecated")


@EXPORT_WARNINGS
@pytest.mark.parametrize("name", ["torchvision_b0", "timm_tf_b0"])
def test_revert_gives_back_the_original_modules(name):
    model, x, _ = build(name)
    types = [(n, type(m)) for n, m in model.named_modules()]
    params = list(model.parameters())
    expected = run(model, x, False)

    reverted = fused_mbconv.revert(fused_mbconv.convert(model)[0])

    assert [(n, type(m)) for n, m in reverted.named_modules()] == types
    assert all(a is b for a, b in zip(reverted.parameters(), params))
    assert not reverted.training  # run() left it in eval, convert and revert kept that
    torch.testing.assert_close(run(reverted, x, False), expected, rtol=0, atol=0)
    traced = torch.jit.trace(reverted, x)
    torch.testing.assert_close(traced(x), expected)


@EXPORT_WARNINGS
@pytest.mark.parametrize("padding", ["same", "tf"])
def test_revert_native_model_is_plain_and_exportable(padding):
    model = fused_mbconv.efficientnet_b0(padding=padding).eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        expected = model(x)
    plain = fused_mbconv.revert(model)
    fused_types = (DWConvBNAct, SqueezeExcite, ExpandBNAct, ProjectBN)
    assert not any(isinstance(m, fused_types) for m in plain.modules())
    stride_2_convs = sum(isinstance(m, Conv2dSame) for m in plain.modules())
    assert stride_2_convs == (5 if padding == "tf" else 0)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.jit.trace(plain, x)(x), expected, rtol=1e-5, atol=1e-6)
        if padding == "same":  # Conv2dSame computes its padding in Python: trace it, not script it
            torch.testing.assert_close(torch.jit.script(plain)(x), expected, rtol=1e-5, atol=1e-6)
    exported = torch.export.export(plain, (x,)).module()  # what torch.onnx.export(dynamo=True) starts from
    with torch.no_grad():
        torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)
    # and back again
    fused, summary = fused_mbconv.convert(plain)
    assert summary.counts() == {"DWConvBNAct": 16, "SqueezeExcite": 16, "ExpandBNAct": 16, "ProjectBN": 16}
    assert summary.left == []
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-6)


def test_a_dwconvbnact_built_with_tf_padding_reverts_to_a_self_padding_conv():
    block = randomize_batch_norm_(DWConvBNAct(8, 3, stride=2, padding="tf"), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(2, 8, 9, 10)
    plain = fused_mbconv.revert(block)
    assert type(plain) is nn.Sequential and isinstance(plain[0], Conv2dSame) and plain[0].weight is block[0].weight
    with torch.no_grad():
        torch.testing.assert_close(plain(x), block(x), rtol=1e-5, atol=1e-6)


def test_what_is_left_is_reported_with_the_reason():
    model, summary = fused_mbconv.convert(torchvision.models.mobilenet_v2())
    assert summary.converted == [] and len(summary.left) == 17
    assert summary.left[0] == (
        "features.1.conv.0.0", "followed by BatchNorm2d and ReLU6; the fused op is BatchNorm2d then SiLU"
    )
    custom = nn.Sequential(
        nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=False), nn.BatchNorm2d(8), nn.SiLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.SiLU()),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
    )
    model, summary = fused_mbconv.convert(custom)
    assert isinstance(model[1], DWConvBNAct) and summary.converted == [("1", "DWConvBNAct")]
    assert [p for p, _ in summary.left] == ["0.0", "2"]
    assert "kernel (7, 7)" in summary.left[0][1] and "not in a recognised form" in summary.left[1][1]
    assert "left 0.0: " in str(summary)


def test_the_root_itself_can_be_converted():
    block = torchvision.ops.Conv2dNormActivation(16, 16, 5, stride=2, groups=16, activation_layer=nn.SiLU)
    fused, summary = fused_mbconv.convert(block)
    assert isinstance(fused, DWConvBNAct) and fused[0] is block[0] and summary.converted == [("", "DWConvBNAct")]
    assert fused_mbconv.revert(fused) is block


def test_timm_block_with_another_activation_is_left():
    model, summary = fused_mbconv.convert(timm.create_model("mobilenetv3_small_050", pretrained=False))
    assert not any(isinstance(m, FusedTimmBlock) for m in model.modules())
    reasons = dict(summary.left)
    why = "its BatchNorm applies Hardswish (and drop Identity); the fused op is SiLU"
    assert reasons["blocks.2.0.conv_dw"] == why
    assert reasons["blocks.2.0.se"] == f"its timm block is left as it is: {why}"


def test_timm_block_whose_depthwise_stage_is_no_conv2d_is_left():
    """MixNet's blocks convolve channel groups with kernels of several sizes (timm's MixedConv2d, a
    module of Conv2d's): the block is left, its convs with the block's reason, and the model
    computes as before."""
    timm_model = timm.create_model("mixnet_s", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = timm_model(x)
    model, summary = fused_mbconv.convert(timm_model)
    reasons = dict(summary.left)
    why = "its depthwise stage is a MixedConv2d, not an nn.Conv2d"
    assert reasons["blocks.2.0.conv_dw.0"] == reasons["blocks.2.0.conv_dw.2"] == why
    assert reasons["blocks.2.0.se"] == f"its timm block is left as it is: {why}"
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
