"""fused_mbconv/parity.py. same_masks_in_every_dtype: stochastic depth's and dropout's masks drawn
in float32 for every dtype, so that a float64 reference trains the same network as the fp32 and
16-bit models. The draws are watched at the aten level (on the CPU torch's masks agree across
dtypes anyway; on CUDA they do not, and a test checks the masks themselves there). Then how
checks are ranked, and why a training forward is judged by its logits."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

from fused_mbconv import parity
from fused_mbconv.models.layers import StochasticDepth, stochastic_depth_noise

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class _Draws(TorchDispatchMode):
    """The dtype of every tensor an aten random op fills, and whether dropout's own op ran."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []
        self.native_dropout = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "bernoulli" in name:
            self.dtypes.append(args[0].dtype)
        self.native_dropout |= "native_dropout" in name or "fused_dropout" in name
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("draw", ["torchvision stochastic depth", "fused_mbconv stochastic depth",
                                  "fused block's branch noise", "dropout"])  # fmt: skip
def test_every_mask_is_drawn_in_float32(draw, dtype):
    x = torch.randn(6, 5, 3, 3).to(dtype)
    layer = {
        "torchvision stochastic depth": torchvision.ops.StochasticDepth(0.4, "row").train(),
        "fused_mbconv stochastic depth": StochasticDepth(0.4).train(),
        "fused block's branch noise": lambda x: stochastic_depth_noise(StochasticDepth(0.4).train(), x),
        "dropout": torch.nn.Dropout(0.4).train(),
    }[draw]
    with parity.same_masks_in_every_dtype(), _Draws() as draws:
        layer(x)
    assert draws.dtypes == [torch.float32] and not draws.native_dropout


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_keeps_torch_values_and_gradient(dtype, inplace):
    p = 0.3
    x = torch.randn(4, 40, dtype=torch.float64)
    torch.manual_seed(1)
    keep = torch.empty(x.shape).bernoulli_(1 - p)  # what the mode draws from the same seed
    torch.manual_seed(1)
    if dtype in (torch.float32, torch.float64):  # torch's own dropout (on the CPU: the same mask)
        expected = torch.nn.functional.dropout(x.to(dtype), p)
    else:  # as torch's CUDA kernel: the product in float32, rounded once (the CPU's rounds twice)
        expected = (x.to(dtype).float() * (keep / (1 - p))).to(dtype)
    leaf = x.to(dtype).requires_grad_(True)
    inp = leaf * 1 if inplace else leaf  # in place needs a non-leaf
    torch.manual_seed(1)
    with parity.same_masks_in_every_dtype():
        out = torch.nn.functional.dropout(inp, p, training=True, inplace=inplace)
    assert (out is inp) == inplace
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    grad = (keep.double() / (1 - p)).to(dtype) if dtype == torch.float64 else (keep / (1 - p)).to(dtype)
    torch.testing.assert_close(leaf.grad, grad, rtol=0, atol=0)
    # outside training, or with nothing to drop, dropout is torch's own
    with parity.same_masks_in_every_dtype():
        assert torch.equal(torch.nn.functional.dropout(x, p, training=False), x)


def test_float64_masks_equal_float32_masks_on_the_device():
    """Stochastic depth and dropout in float64, float32 and bf16 from one seed: one mask."""
    masks = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.ones(64, 1, 1, 1, device=DEVICE, dtype=dtype)
        torch.manual_seed(7)
        with parity.same_masks_in_every_dtype():
            masks[dtype] = (torchvision.ops.stochastic_depth(x, 0.5, "row", True) != 0,
                            torch.nn.functional.dropout(x.view(8, 8), 0.5) != 0)  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16):
        assert all(torch.equal(a, b) for a, b in zip(masks[dtype], masks[torch.float64])), dtype
    assert 0 < masks[torch.float32][0].sum() < 64  # some dropped, some kept: a mask to compare


def test_worst_ranks_by_share_of_bound_and_all_zero_tensors_last():
    """parity.worst: the check nearest its bound (or furthest past it) is named; a tensor exactly
    zero everywhere (error 0, bound 0: a dropped block's gradients) ranks below any other, while
    a nonzero error against a zero bound ranks first."""
    exact = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0]), "zero": torch.zeros(3)}
    eager = {"a": exact["a"] + 1e-3, "b": exact["b"] + 1e-3, "zero": torch.zeros(3)}
    fused = {"a": exact["a"] + 1e-3, "b": exact["b"] + 3e-3, "zero": torch.zeros(3)}
    checks = parity.compare_all(fused, eager, exact, torch.float32)
    assert all(c.ok for c in checks)
    assert parity.worst(checks).name == "b"
    assert [c.bound for c in checks if c.name == "zero"] == [0.0]
    fused["zero"] = torch.full((3,), 1e-9)
    assert parity.worst(parity.compare_all(fused, eager, exact, torch.float32)).name == "zero"


def test_a_training_forward_is_judged_by_logits_which_bound_the_loss():
    """What parity.py argues for judging the training forward by its logits: a mean cross-entropy
    moves by at most twice the logits' largest change (its gradient's L1 norm per sample is at
    most 2), on random perturbations, and the factor 2 is needed: a small step of every logit
    against a confidently wrong model comes within 1% of it."""
    ce = torch.nn.functional.cross_entropy
    generator = torch.Generator().manual_seed(0)
    z = (torch.randn(16, 1000, generator=generator, dtype=torch.float64) * 4).requires_grad_(True)
    labels = torch.randint(0, 1000, (16,), generator=generator)
    loss = ce(z, labels)
    (grad,) = torch.autograd.grad(loss, z)
    z = z.detach()
    for scale in (1e-4, 1e-1, 3.0):
        dz = torch.randn(z.shape, generator=generator, dtype=torch.float64) * scale
        change = (ce(z + dz, labels) - loss).abs()
        assert 0 < change <= 2 * dz.abs().max(), (scale, change.item())
    step = 1e-6
    change = (ce(z + step * grad.sign(), labels) - loss).abs()
    assert 0.99 * 2 * step < change <= 2 * step, change.item() / step
