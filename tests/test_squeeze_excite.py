"""Parity of the squeeze-excite ops and ``fused_mbconv.nn.SqueezeExcite`` against eager PyTorch
(torchvision's SqueezeExcitation, ``eager.squeeze_excite_eager``): outputs and gradients in every
dtype and layout, odd sizes, the precomputed-squeeze path, 2-D and 4-D weights, registration."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as TF
import torchvision
from conftest import BACKENDS, DEVICE, assert_matches, skip_if_slow
from eager import squeeze_excite_eager
from torch import nn
from torch.library import opcheck

import fused_mbconv
from fused_mbconv import ops
from fused_mbconv.nn import functional as F

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "strided"]
GRAD_NAMES = ["dx", "dw1", "db1", "dw2", "db2"]


def make_input(shape, dtype, layout, seed=1):
    """x of ``shape`` with a per-(sample, channel) offset, so the pooled means are O(1) at any
    H*W rather than ~1/sqrt(H*W) (which would leave the gate near sigmoid(b2) everywhere).

    "strided": every other channel of a channels-last tensor three columns wider, so no stride
    is 1 and (H, W) cannot be walked as one flat dimension. Made last: arithmetic and dtype casts
    return dense tensors.
    """
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = (torch.randn(n, c, h, w, generator=g) + torch.randn(n, c, 1, 1, generator=g)).to(DEVICE, dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.zeros(n, h, w + 3, 2 * c, dtype=dtype, device=DEVICE).permute(0, 3, 1, 2)
        return wide[:, ::2, :, :w].copy_(x)
    return x


def make_weights(channels, reduced, seed=0):
    """fp64 (w1 (R, C, 1, 1), b1 (R,), w2 (C, R, 1, 1), b2 (C,)), scaled by 1/sqrt(fan_in) so the
    hidden units and logits are O(1), where SiLU and the sigmoid are far from linear."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(reduced, channels, 1, 1, generator=g, dtype=torch.float64) * (1.5 / math.sqrt(channels)),
        torch.randn(reduced, generator=g, dtype=torch.float64) * 0.5,
        torch.randn(channels, reduced, 1, 1, generator=g, dtype=torch.float64) * (1.5 / math.sqrt(reduced)),
        torch.randn(channels, generator=g, dtype=torch.float64) * 0.5,
    ]


def weights_as(weights, dtype, form):
    """Leaf copies of ``weights`` in ``dtype``, the two matrices in ``form``: "4d" (nn.Conv2d's
    (out, in, 1, 1)), "2d" (nn.Linear's (out, in)) or "2d_transposed" (a (out, in) view of an
    (in, out) tensor: column-major, not contiguous)."""
    out = []
    for t in weights:
        if t.dim() == 4 and form != "4d":
            t = t.flatten(1)
            if form == "2d_transposed":
                t = t.t().contiguous().t()
        out.append(t.to(DEVICE, dtype).requires_grad_(True))
    return out


def forward_backward(fn, x, *params, seed=2):
    """y = fn(x, *params), and the gradients of a random linear function of y w.r.t. x and params
    (fp64 weights, so the upstream gradient is the same in every dtype)."""
    x = x.detach().requires_grad_(True)
    y = fn(x, *params)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)
    grads = torch.autograd.grad((y.double() * dy).sum(), [x, *params])
    return y, grads


def assert_all_match(fused, eager, exact, names):
    for name, a, e, ex in zip(names, fused, eager, exact, strict=True):
        assert_matches(a, e, ex, name)


def check_functional(shape, reduced, dtype, layout, form):
    """F.squeeze_excite against ``squeeze_excite_eager`` in ``dtype`` and in fp64."""
    weights = make_weights(shape[1], reduced)
    x = make_input(shape, dtype, layout)
    params = weights_as(weights, dtype, form)
    y, grads = forward_backward(F.squeeze_excite, x, *params)
    ye, grads_e = forward_backward(squeeze_excite_eager, x, *params)
    yx, grads_x = forward_backward(squeeze_excite_eager, x.double(), *weights_as(weights, torch.float64, form))
    assert_all_match([y, *grads], [ye, *grads_e], [yx, *grads_x], ["y", *GRAD_NAMES])
    for name, p, dp in zip(GRAD_NAMES[1:], params, grads[1:], strict=True):
        assert dp.shape == p.shape and dp.dtype == p.dtype, f"{name}: {dp.shape} {dp.dtype} for {p.shape} {p.dtype}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_matches_torchvision(backend, dtype, layout):
    """SqueezeExcite with torchvision's state_dict computes what torchvision computes."""
    shape, reduced = (2, 17, 7, 9), 4
    skip_if_slow(backend, torch.Size(shape).numel())
    exact = torchvision.ops.SqueezeExcitation(shape[1], reduced, activation=nn.SiLU).double()
    exact.load_state_dict(
        dict(zip(["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], make_weights(17, reduced), strict=True))
    )
    eager = copy.deepcopy(exact).to(DEVICE, dtype)
    exact.to(DEVICE)
    fused = fused_mbconv.nn.SqueezeExcite(shape[1], reduced)
    fused.load_state_dict(eager.state_dict())
    fused.to(DEVICE, dtype)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in eager.named_parameters()]

    x = make_input(shape, dtype, layout)
    (y, grads), (ye, grads_e), (yx, grads_x) = (
        forward_backward(lambda x, *_, m=m: m(x), x.to(m.fc1.weight.dtype), *m.parameters())
        for m in (fused, eager, exact)
    )
    assert_all_match([y, *grads], [ye, *grads_e], [yx, *grads_x], ["y", *GRAD_NAMES])
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last input must give channels_last output"


# C = 1, 3, 17, 1152 with R = max(1, C // 4); H, W = 1, 7, 13, 112; batches 1 to 3. C = 72 (R = 18)
# is the widest the Triton interpreter runs quickly: channels and hidden units in several tiles.
ODD_SHAPES = [
    (1, 1, 1, 1),
    (3, 1, 13, 7),
    (2, 3, 7, 13),
    (1, 3, 112, 112),
    (1, 17, 1, 112),
    (1, 17, 112, 1),
    (2, 17, 13, 13),
    (3, 72, 5, 5),
    (2, 1152, 1, 1),
    (2, 1152, 7, 7),
]


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_sizes(backend, shape, dtype):
    reduced = max(1, shape[1] // 4)
    skip_if_slow(backend, torch.Size(shape).numel(), 2 * shape[1] * reduced)  # x and both FC weights
    check_functional(shape, reduced, dtype, "channels_last", "4d")


@pytest.mark.parametrize("form", ["4d", "2d", "2d_transposed"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_weight_forms(backend, form, layout):
    """Weights as nn.Conv2d (R, C, 1, 1) or nn.Linear (R, C) hold them, or non-contiguous; each
    gradient comes back in its weight's shape."""
    check_functional((2, 17, 5, 6), 4, torch.float32, layout, form)


def test_broadcast_upstream_gradient(backend):
    """``y.sum()`` hands the backward an expanded gradient, every stride 0."""
    weights = make_weights(17, 4)
    x = make_input((2, 17, 5, 6), torch.float32, "channels_last")
    grads = []
    for fn, dtype in [(F.squeeze_excite, torch.float32), (squeeze_excite_eager, torch.float32),
                      (squeeze_excite_eager, torch.float64)]:  # fmt: skip
        leaves = [x.detach().to(dtype).requires_grad_(True), *weights_as(weights, dtype, "4d")]
        grads.append(torch.autograd.grad(fn(*leaves).sum(), leaves))
    assert_all_match(*grads, GRAD_NAMES)


def excite_eager(pooled, w1, b1, w2, b2):
    """The gate from a given (N, C) squeeze: torchvision's fc1, SiLU, fc2, sigmoid as linears."""
    return torch.sigmoid(TF.linear(TF.silu(TF.linear(pooled, w1.flatten(1), b1)), w2.flatten(1), b2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_precomputed_squeeze(backend, dtype):
    """``pooled=`` skips the squeeze: given x's own mean it changes nothing, and as an input of its
    own it receives the gradient that eager PyTorch gives it (and x only the scale's)."""
    shape = (2, 17, 6, 5)
    weights = make_weights(shape[1], 4)
    x = make_input(shape, dtype, "channels_last")
    params = weights_as(weights, dtype, "4d")

    y, grads = forward_backward(F.squeeze_excite, x, *params)
    y_p, grads_p = forward_backward(lambda x, *w: F.squeeze_excite(x, *w, pooled=ops.se_squeeze(x)), x, *params)
    # the same ops on the same values: bit for bit, the gradient reaching x through pooled included
    torch.testing.assert_close(y_p, y, rtol=0, atol=0)
    for name, a, b in zip(GRAD_NAMES, grads_p, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    pooled = x.double().mean((2, 3))
    results = []
    for dt, fn in [
        (dtype, lambda x, p, *w: F.squeeze_excite(x, *w, pooled=p)),
        (dtype, lambda x, p, *w: x * excite_eager(p, *w)[:, :, None, None]),
        (torch.float64, lambda x, p, *w: x * excite_eager(p, *w)[:, :, None, None]),
    ]:
        p = pooled.to(dt).requires_grad_(True)
        results.append(forward_backward(fn, x.to(dt), p, *weights_as(weights, dt, "4d")))
    (y, grads), (ye, grads_e), (yx, grads_x) = results
    assert_all_match([y, *grads], [ye, *grads_e], [yx, *grads_x], ["y", "dx", "dpooled", *GRAD_NAMES[1:]])


@pytest.mark.parametrize("layout", ["channels_last", "strided"])  # test_opcheck.py samples NCHW
def test_opcheck_layouts(backend, layout):
    """The fakes agree with the real outputs' shapes, strides and dtypes on channels_last and
    strided activations, bf16 activations with fp32 weights as under autocast."""
    n, c, r = 2, 6, 3
    x = make_input((n, c, 3, 4), torch.bfloat16, layout)
    w1, b1, w2, b2 = (w.to(DEVICE, torch.float32) for w in make_weights(c, r))
    pooled = x.float().mean((2, 3)).to(torch.bfloat16)
    gate = torch.rand(n, c, device=DEVICE, dtype=torch.bfloat16)
    samples = [
        (ops.se_squeeze, (x,)),
        (ops.se_excite, (pooled, w1, b1, w2.flatten(1), b2)),
        (ops.se_excite_backward, (gate, pooled, w1, b1, w2, b2)),
        (ops.se_scale, (x, gate)),
        (ops.se_scale_backward, (torch.randn_like(x), x, gate)),
    ]
    for op, args in samples:
        differentiable = op in (ops.se_squeeze, ops.se_excite, ops.se_scale)
        args = tuple(a.detach().requires_grad_(differentiable) for a in args)
        opcheck(op, args)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic(backend, layout):
    """Two runs give the same bits: fixed-order reductions, no float atomics. The plane (48 x 48,
    3 channels) is split into chunks whose partial sums are added afterwards; the excite has
    several groups of samples."""
    shape = (1, 3, 48, 48)
    skip_if_slow(backend, torch.Size(shape).numel())
    x = make_input(shape, torch.float32, layout)
    dy = make_input(shape, torch.float32, layout, seed=3)
    w = [t.detach() for t in weights_as(make_weights(40, 10), torch.float32, "4d")]
    pooled = torch.randn(9, 40, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    grad_gate = torch.randn(9, 40, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def run():
        gate = ops.se_excite(pooled, *w)
        x_gate = gate[:1, :3].contiguous()
        dx, dgate = ops.se_scale_backward(dy, x, x_gate)
        return [ops.se_squeeze(x), gate, ops.se_scale(x, x_gate), dx, dgate,
                *ops.se_excite_backward(grad_gate, pooled, *w)]  # fmt: skip

    names = ["pooled", "gate", "y", "dx", "dgate", "dpooled", "dw1", "db1", "dw2", "db2"]
    for name, a, b in zip(names, run(), run(), strict=True):
        assert torch.equal(a, b), f"{name} differs between two runs"


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs a GPU or TRITON_INTERPRET=1")
def test_excite_configs_fit_the_channels():
    """The excite's autotuning candidates: channel blocks no wider than the channels (down to 32),
    the wide reduction chunks only for the hidden layer (they spilled elsewhere)."""
    from fused_mbconv.ops.squeeze_excite import triton_impl as se

    def widths(configs, c):
        return sorted(cfg.kwargs["BLOCK_C"] for cfg in se._prune_excite(configs, {"C": c}))

    assert widths(se._EXCITE_CONFIGS, 17) == [32]
    assert widths(se._EXCITE_CONFIGS, 72) == [32, 64, 128]
    assert widths(se._EXCITE_HIDDEN_CONFIGS, 200) == [32, 64, 128, 256]
    assert widths(se._EXCITE_HIDDEN_CONFIGS, 3072) == [32, 64, 128, 256, 512]
