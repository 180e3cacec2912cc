"""Bad input gets a clear exception that names the argument, what was expected and what came."""

from __future__ import annotations

import pytest
import torch

import fused_mbconv
from fused_mbconv import ops

C = 4


def dw_args(**over):
    args = dict(
        x=torch.randn(2, C, 8, 8), weight=torch.randn(C, 1, 3, 3), scale=torch.rand(C), shift=torch.randn(C),
        stride=1, padding=[1, 1, 1, 1], with_squeeze=False,
    )  # fmt: skip
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,error,pattern",
    [
        (dict(x=torch.randn(C, 8, 8)), ValueError, r"x: expected a 4-D tensor, got 3-D"),
        (dict(x=torch.randint(0, 5, (2, C, 8, 8))), TypeError, r"x: expected dtype in .*got int64"),
        (dict(x=torch.randn(0, C, 8, 8)), ValueError, r"x: expected a batch of at least 1 sample"),
        (dict(weight=torch.randn(C + 1, 1, 3, 3)), ValueError, r"weight: expected shape \(4, 1, 3, 3\), got \(5, 1, 3, 3\)"),
        (dict(weight=torch.randn(C, 1, 7, 7)), ValueError, r"weight: expected a square depthwise kernel of size \(3, 5\)"),
        (dict(weight=torch.randn(C, 1, 3, 5)), ValueError, r"weight: expected a square depthwise kernel"),
        (dict(scale=torch.rand(C + 2)), ValueError, r"scale: expected shape \(4\), got \(6,\)"),
        # the dispatcher checks argument types against the schema before our code runs
        (dict(shift="0"), RuntimeError, r"Expected a value of type 'Tensor' for argument 'shift'"),
        (dict(stride=3), ValueError, r"stride: expected one of \(1, 2\), got 3"),
        (dict(padding=[1, 1, 1]), ValueError, r"padding: expected 4 values"),
        (dict(padding=[3, 0, 0, 0]), ValueError, r"padding: expected 4 values .* in \[0, 2\]"),
        (dict(x=torch.randn(2, C, 1, 1), padding=[0, 0, 0, 0]), ValueError, r"x: spatial size \(1, 1\) is too small"),
        (dict(scale=torch.rand(C, device="meta")), ValueError, r"scale: expected a tensor on cpu \(the device of x\), got meta"),
        # eval-mode BN's running statistics: both or neither, one per channel, eps >= 0
        (dict(running_mean=torch.randn(C)), ValueError, r"running_var: expected a tensor when running_mean is given"),
        (dict(running_var=torch.rand(C)), ValueError, r"running_mean: expected a tensor when running_var is given"),
        (dict(running_mean=torch.randn(C), running_var=torch.rand(C + 1)), ValueError,
         r"running_var: expected shape \(4\), got \(5,\)"),
        (dict(running_mean=torch.randn(C), running_var=torch.rand(C), eps=-1.0), ValueError,
         r"eps: expected a value >= 0, got -1.0"),
    ],
)
def test_dwconv_bad_input(over, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.dwconv_bn_silu(**dw_args(**over))


def test_training_needs_two_values_per_channel():
    x = torch.randn(1, C, 1, 1)
    with pytest.raises(ValueError, match="training needs more than 1 value per channel"):
        ops.dwconv_bn_silu_train(x, torch.randn(C, 1, 3, 3), torch.ones(C), torch.zeros(C), 1e-5, 1, [1, 1, 1, 1], False)
    block = fused_mbconv.nn.DWConvBNAct(C).train()
    with pytest.raises(ValueError, match="training needs more than 1 value per channel"):
        block(x)


def test_backward_checks_grad_shape():
    x = torch.randn(2, C, 8, 8)
    with pytest.raises(ValueError, match=r"grad_y: expected shape \(2, 4, 8, 8\), got \(2, 4, 4, 4\)"):
        ops.dwconv_bn_silu_backward(
            torch.randn(2, C, 4, 4), None, x, torch.randn(C, 1, 3, 3), torch.ones(C), torch.zeros(C),
            torch.zeros(C), torch.ones(C), 1, [1, 1, 1, 1], True,
        )  # fmt: skip


@pytest.mark.parametrize(
    "call,error,pattern",
    [
        (lambda: ops.se_squeeze(torch.randn(2, 3)), ValueError, r"x: expected a 4-D tensor, got 2-D"),
        (lambda: ops.se_scale(torch.randn(2, 3, 4, 4), torch.randn(2, 4)), ValueError, r"gate: expected shape \(2, 3\), got \(2, 4\)"),
        (lambda: ops.se_scale(torch.randn(2, 3, 4, 4), torch.randn(2, 3).bool()), TypeError, r"gate: expected dtype in"),
        (
            lambda: ops.se_excite(torch.randn(2, 8), torch.randn(2, 6, 1, 1), torch.randn(2), torch.randn(8, 2, 1, 1), torch.randn(8)),
            ValueError,
            r"w1: expected shape \(\*, 8, 1, 1\), got \(2, 6, 1, 1\)",
        ),
        (
            lambda: ops.se_excite(torch.randn(2, 8), torch.randn(2, 8), torch.randn(3), torch.randn(8, 2), torch.randn(8)),
            ValueError,
            r"b1: expected shape \(2\), got \(3,\)",
        ),
        (
            lambda: ops.se_excite(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2), torch.randn(8, 2, 3), torch.randn(8)),
            ValueError,
            r"w2: expected a 2-D or 4-D tensor, got 3-D",
        ),
    ],
)
def test_squeeze_excite_bad_input(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_module_config_errors():
    with pytest.raises(ValueError, match="kernel_size: expected one of \\(3, 5\\), got 7"):
        fused_mbconv.nn.DWConvBNAct(8, kernel_size=7)
    with pytest.raises(ValueError, match="stride: expected one of \\(1, 2\\), got 4"):
        fused_mbconv.nn.DWConvBNAct(8, stride=4)
    with pytest.raises(ValueError, match="padding: expected one of \\('same', 'tf'\\), got 'valid'"):
        fused_mbconv.nn.DWConvBNAct(8, padding="valid")
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, dilation=2, bias=False)
    with pytest.raises(ValueError, match="conv, bn: not a fusable depthwise conv"):
        fused_mbconv.nn.DWConvBNAct.from_modules(conv, torch.nn.BatchNorm2d(8))


def test_module_wrong_channel_count():
    block = fused_mbconv.nn.DWConvBNAct(8).eval()
    with pytest.raises(ValueError, match=r"weight: expected shape \(3, 1, 3, 3\), got \(8, 1, 3, 3\)"):
        block(torch.randn(1, 3, 8, 8))


def project_args(**over):
    args = dict(
        x=torch.randn(2, C, 5, 5), gate=torch.rand(2, C), weight=torch.randn(3, C, 1, 1), scale=torch.rand(3),
        shift=torch.randn(3), residual=torch.randn(2, 3, 5, 5), branch_scale=torch.ones(2), silu=False,
    )  # fmt: skip
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,error,pattern",
    [
        (dict(x=torch.randn(2, C, 5)), ValueError, r"x: expected a 4-D tensor, got 3-D"),
        (dict(weight=torch.randn(3, C + 1, 1, 1)), ValueError, r"weight: expected shape \(\*, 4, 1, 1\), got \(3, 5, 1, 1\)"),
        (dict(weight=torch.randn(3, C, 3, 3)), ValueError, r"weight: expected shape \(\*, 4, 1, 1\), got \(3, 4, 3, 3\)"),
        (dict(gate=torch.rand(2, C + 1)), ValueError, r"gate: expected shape \(2, 4\), got \(2, 5\)"),
        (dict(residual=torch.randn(2, 4, 5, 5)), ValueError, r"residual: expected shape \(2, 3, 5, 5\), got \(2, 4, 5, 5\)"),
        (dict(branch_scale=torch.ones(3)), ValueError, r"branch_scale: expected shape \(2\), got \(3,\)"),
        (dict(shift=torch.randn(4)), ValueError, r"shift: expected shape \(3\), got \(4,\)"),
        (dict(x=torch.randn(2, C, 5, 5).int()), TypeError, r"x: expected dtype in .*got int32"),
        (dict(gate=torch.rand(2, C, device="meta")), ValueError, r"gate: expected a tensor on cpu \(the device of x\), got meta"),
        (dict(running_var=torch.rand(3)), ValueError, r"running_mean: expected a tensor when running_var is given"),
        (dict(running_mean=torch.randn(4), running_var=torch.rand(3)), ValueError,
         r"running_mean: expected shape \(3\), got \(4,\)"),
        (dict(running_mean=torch.randn(3, device="meta"), running_var=torch.rand(3)), ValueError,
         r"running_mean: expected a tensor on cpu \(the device of x\), got meta"),
    ],
)
def test_project_bad_input(over, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.project_bn(**project_args(**over))


def test_project_module_wrong_channel_count():
    block = fused_mbconv.nn.ProjectBN(8, 4).eval()
    with pytest.raises(ValueError, match=r"weight: expected shape \(\*, 3, 1, 1\), got \(4, 8, 1, 1\)"):
        block(torch.randn(1, 3, 8, 8))
