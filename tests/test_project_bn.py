"""Parity of the projection op (SE gate + 1x1 conv + BatchNorm + stochastic depth + residual) and
``fused_mbconv.nn.ProjectBN`` against eager PyTorch (``project_eager``: x * gate, conv2d,
F.batch_norm, multiply, add): outputs, running statistics and every gradient, in every dtype
and layout, train and eval, with and without the optional inputs; plus the batch statistics'
numerical soundness and the MBConv wiring."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF
from conftest import DEVICE, FLOOR, assert_matches, skip_if_slow
from eager import randomize_
from test_squeeze_excite import make_input

import fused_mbconv
from fused_mbconv import ops
from fused_mbconv.nn import ExpandBNAct, ProjectBN

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "strided"]
# N, C (wide input), O (output), H, W: no size a multiple of the interpreter's tiles (32, 16)
SHAPE = (2, 24, 20, 5, 9)
EPS, MOMENTUM = 1e-3, 0.1


def project_eager(x, gate, weight, gamma, beta, running_mean, running_var, residual, noise, training, silu):
    """The unfused computation, in torch ops as torchvision's MBConv runs it."""
    if gate is not None:
        x = x * gate[:, :, None, None]
    z = TF.conv2d(x, weight)
    y = TF.batch_norm(z, running_mean, running_var, gamma, beta, training, MOMENTUM, EPS)
    if silu:
        y = TF.silu(y)
    if noise is not None:
        y = y * noise[:, None, None, None]
    return y if residual is None else y + residual


def make_case(dtype, layout, with_extras, seed=0, shape=SHAPE):
    """(x, tensors) for ``project_eager``: fp64 weights made once; x, gate and the residual in
    ``dtype``; one sample dropped and one kept by the noise when ``with_extras`` (batch of 2)."""
    n, c, o, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = make_input((n, c, h, w), dtype, layout, seed=seed + 1)
    weight = torch.randn(o, c, 1, 1, generator=g, dtype=torch.float64) / c**0.5
    gamma = torch.rand(o, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(o, generator=g, dtype=torch.float64)
    stats = (torch.randn(o, generator=g, dtype=torch.float64) * 0.3, torch.rand(o, generator=g, dtype=torch.float64) + 0.5)
    extras = {"gate": None, "residual": None, "noise": None}
    if with_extras:
        extras = {
            "gate": torch.rand(n, c, generator=g).to(DEVICE, dtype),
            "residual": torch.randn(n, o, h, w, generator=g).to(DEVICE, dtype),
            "noise": torch.tensor([0.0, 1.25], dtype=torch.float64),
        }
    return x, weight, gamma, beta, stats, extras


def upstream_gradient(shape) -> torch.Tensor:
    """The gradient ``run`` sends back into y (fp64, on the CPU)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def run(fn_kind, dtype, x, weight, gamma, beta, stats, extras, training, silu=False):
    """Forward + backward of the fused module or the eager code with parameters in ``dtype``
    (fp32 for fp16/bf16, as under AMP the parameters stay fp32). Returns (outputs, names)."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w, gm, bt = (t.to(DEVICE, param_dtype).requires_grad_(True) for t in (weight, gamma, beta))
    running = [t.to(DEVICE, param_dtype).clone() for t in stats]
    x = x.detach().requires_grad_(True)
    gate, residual, noise = extras["gate"], extras["residual"], extras["noise"]
    leaves = [x, w, gm, bt]
    if gate is not None:
        gate = gate.detach().to(dtype).requires_grad_(True)
        residual = residual.detach().to(dtype).requires_grad_(True)
        noise = noise.to(DEVICE, x.dtype)
        leaves += [gate, residual]
    if fn_kind == "fused":
        kind = ExpandBNAct if silu else ProjectBN
        module = kind(weight.shape[1], weight.shape[0], eps=EPS, momentum=MOMENTUM).to(DEVICE, param_dtype)
        with torch.no_grad():
            module[0].weight = torch.nn.Parameter(w)
            module[1].weight, module[1].bias = torch.nn.Parameter(gm), torch.nn.Parameter(bt)
            module[1].running_mean.copy_(running[0])
            module[1].running_var.copy_(running[1])
        module.train(training)
        leaves[1:4] = [module[0].weight, module[1].weight, module[1].bias]
        y = module(x) if silu else module(x, gate, residual, noise)
        running = [module[1].running_mean, module[1].running_var]
    else:
        wc = w.to(x.dtype) if x.dtype != param_dtype else w  # what autocast does to the conv weight
        y = project_eager(x, gate, wc, gm, bt, *running, residual, noise, training, silu)
    grads = torch.autograd.grad((y.double() * upstream_gradient(y.shape).to(y.device)).sum(), leaves)
    names = ["y", "dx", "dweight", "dgamma", "dbeta", "dgate", "dresidual"][: 1 + len(leaves)]
    outputs = [y, *grads]
    if training:
        outputs += running
        names += ["running_mean", "running_var"]
    return outputs, names


def check(dtype, layout, training, with_extras, silu=False, shape=SHAPE):
    """The fused module against eager in ``dtype`` and in fp64 (conftest's bound), at ``shape``
    (N, C, O, H, W)."""
    x, *case = make_case(dtype, layout, with_extras, shape=shape)
    fused, names = run("fused", dtype, x, *case, training, silu)
    eager, _ = run("eager", dtype, x, *case, training, silu)
    exact, _ = run("eager", torch.float64, x.double(), *case, training, silu)
    for name, a, e, ex in zip(names, fused, eager, exact, strict=True):
        if a.dtype != e.dtype:  # eager under AMP gives the BN grads in fp32 too; compare values
            e = e.to(a.dtype)
        assert_matches(a, e, ex, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_eager(backend, dtype, layout, training):
    skip_if_slow(backend, SHAPE[0] * SHAPE[1] * SHAPE[3] * SHAPE[4])
    check(dtype, layout, training, with_extras=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channel_vectors(backend, dtype, training):
    """channels_last with C and O multiples of 8 (EfficientNet's widths): the kernels then claim
    16-byte channel vectors (``_triton.vector_alignment``: 8 channels in bf16, 4 in fp32), masks
    written per vector; O = 40 is no multiple of the tile width 16 nor of 16 itself."""
    from fused_mbconv.ops._triton import vector_alignment

    shape = (2, 48, 40, 3, 5)
    x, *_ = make_case(dtype, "channels_last", True, shape=shape)
    assert vector_alignment(x) == 16 // x.element_size()
    skip_if_slow(backend, 2 * 48 * 15)
    check(dtype, "channels_last", training, with_extras=True, shape=shape)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_without_gate_residual_or_noise(backend, training):
    """Plain conv1x1 + BN: every optional input absent."""
    check(torch.float32, "channels_last", training, with_extras=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_expansion_matches_eager(backend, dtype, layout, training):
    """ExpandBNAct: conv1x1 + BN + SiLU, whose backward goes through SiLU's derivative."""
    skip_if_slow(backend, SHAPE[0] * SHAPE[1] * SHAPE[3] * SHAPE[4])
    check(dtype, layout, training, with_extras=False, silu=True)


def test_batch_statistics_hold_when_the_mean_dwarfs_the_spread(backend):
    """z with mean ~1e4 and spread ~1: E[z^2] - E[z]^2 in fp32 loses the variance entirely."""
    n, c, o, h, w = 3, 16, 18, 7, 11
    g = torch.Generator().manual_seed(3)
    x = (1000.0 + torch.randn(n, c, h, w, generator=g)).to(DEVICE)
    weight = torch.full((o, c, 1, 1), 0.6, dtype=torch.float64) + 0.05 * torch.randn(o, c, 1, 1, generator=g, dtype=torch.float64)
    ones, zeros = torch.ones(o, device=DEVICE), torch.zeros(o, device=DEVICE)
    _, _, mean, var = ops.project_bn_train(x, None, weight.float().to(DEVICE), ones, zeros, EPS, None, None, False)
    z = torch.einsum("oc,nchw->nohw", weight.flatten(1).to(DEVICE), x.double())
    exact_var = z.var(dim=(0, 2, 3), unbiased=False)
    assert exact_var.min() > 1 and z.mean() > 5e3
    # fp32 z carries ~1e4 * 6e-8 absolute error per element; the variance must keep ~1e-3 relative
    torch.testing.assert_close(var.double(), exact_var, rtol=2e-2, atol=0)
    torch.testing.assert_close(mean.double(), z.mean(dim=(0, 2, 3)), rtol=1e-5, atol=0)


def _eager_bf16_dweight(x, weight, gamma, extras, dy):
    """The projection weight's gradient as eager PyTorch computes it on a GPU in bf16 (every
    tensor between ops rounded to bf16, sums in fp32), emulated in fp64: x * gate, the conv
    weight and output, the upstream gradient, its product with the noise, the BN backward's dz
    and the weight gradient itself (autocast's bf16 copy of the weight). On the H200 eager's
    error at the shape below was 4.01; this gives 4.007."""
    bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    noise = extras["noise"].double()[:, None, None, None]
    xg = bf(x.double() * extras["gate"].double()[:, :, None, None])
    z = bf(torch.einsum("oc,nchw->nohw", bf(weight.float().double().flatten(1)), xg))
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
    invstd = (var + EPS).rsqrt()[None, :, None, None]
    zhat = (z - mean[None, :, None, None]) * invstd
    du = bf(bf(dy) * noise)
    dz = gamma.double()[None, :, None, None] * invstd * (du - du.mean((0, 2, 3), keepdim=True)
                                                         - zhat * (du * zhat).mean((0, 2, 3), keepdim=True))  # fmt: skip
    return bf(torch.einsum("nohw,nchw->oc", bf(dz), xg))


@pytest.mark.skipif("triton" not in fused_mbconv.available_backends(), reason="needs a GPU or TRITON_INTERPRET=1")
def test_weight_gradient_where_stochastic_depth_drops_a_sample():
    """bf16, training, one sample dropped (du = 0 there): dz on that sample is an affine function
    of the bf16 z, and rounding it to bf16 again gives errors that follow z, so x, and add up over
    the H*W positions in dweight = sum dz * x. The H200's sweep caught it at this shape (fused
    8.83 from fp64, eager 4.01); the Triton backward keeps dz in fp32 (now 2.71)."""
    shape = (2, 32, 16, 130, 130)  # a B5 projection's (C, O, size) from the GPU shape sweep
    x, weight, gamma, beta, stats, extras = make_case(torch.bfloat16, "channels_last", True, shape=shape)
    with fused_mbconv.backend("triton"):
        fused, names = run("fused", torch.bfloat16, x, weight, gamma, beta, stats, extras, True)
    extras64 = {k: v.double() for k, v in extras.items()}
    exact, _ = run("eager", torch.float64, x.double(), weight, gamma, beta, stats, extras64, True)
    dy = upstream_gradient(exact[0].shape)
    exact_dweight = exact[names.index("dweight")].cpu().double().flatten(1)
    eager = _eager_bf16_dweight(x.cpu(), weight, gamma, {k: v.cpu() for k, v in extras.items()}, dy)
    eager_error = (eager - exact_dweight).abs().max().item()
    error = (fused[names.index("dweight")].cpu().double().flatten(1) - exact_dweight).abs().max().item()
    assert error <= 2 * eager_error, f"dweight: max error {error:.3g}, eager's (emulated) {eager_error:.3g}"


@pytest.mark.skipif(DEVICE.type != "cuda", reason="TF32 is a GPU mode")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_tf32_follows_torch_flag(training, monkeypatch):
    """With torch.backends.cudnn.allow_tf32 (torch's default; conftest turns it off), fp32
    projections multiply in TF32 as eager's 1x1 conv does: within TF32's error of fp64 (10-bit
    mantissas: ~1e-3 per product, norm-wise far less over 240 terms; 5e-3 leaves room, a wrong
    index is off by O(1)), and no longer fp32-exact."""
    n, c, o, h, w = 4, 240, 40, 9, 11
    x = torch.randn(n, c, h, w, device=DEVICE).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(o, c, 1, 1, device=DEVICE) / c**0.5
    gamma, beta = torch.rand(o, device=DEVICE) + 0.5, torch.randn(o, device=DEVICE)
    exact = TF.conv2d(x.double(), weight.double())
    errors = {}
    for tf32 in (False, True):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
        with fused_mbconv.backend("triton"):
            if training:
                z = ops.project_bn_train(x, None, weight, torch.ones_like(gamma), torch.zeros_like(beta), EPS, None, None, False)[0]
                mean = exact.mean(dim=(0, 2, 3), keepdim=True)
                var = exact.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
                ref = (exact - mean) / (var + EPS).sqrt()
            else:
                z = ops.project_bn(x, None, weight.flatten(1), gamma, beta, None, None, False)
                ref = exact * gamma.double()[:, None, None] + beta.double()[:, None, None]
        errors[tf32] = ((z.double() - ref).norm() / ref.norm()).item()
    print(f"relative error: fp32 {errors[False]:.2e}, tf32 {errors[True]:.2e}")
    assert errors[False] < 1e-5
    assert errors[True] < 5e-3
    assert errors[True] > errors[False]


@pytest.mark.parametrize("o", [1, 33])
def test_odd_widths_and_one_pixel(backend, o):
    """A single output channel or a width past one tile; 1 x 1 spatial with a batch of 3."""
    for n, c, h, w in [(3, 5, 1, 1), (2, 40, 3, 4)]:
        skip_if_slow(backend, n * c * h * w)
        x = torch.randn(n, c, h, w, device=DEVICE)
        weight = torch.randn(o, c, device=DEVICE) / c**0.5
        gate = torch.rand(n, c, device=DEVICE)
        scale, shift = torch.rand(o, device=DEVICE) + 0.5, torch.randn(o, device=DEVICE)
        y = ops.project_bn(x, gate, weight, scale, shift, None, None, False)
        expected = TF.conv2d(x * gate[:, :, None, None], weight[:, :, None, None]) * scale[:, None, None] + shift[:, None, None]
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=FLOOR[torch.float32] * 10)


def test_gradcheck_fp64():
    n, c, o, h, w = 2, 5, 3, 3, 4
    g = torch.Generator().manual_seed(0)

    def t(*shape, positive=False):
        v = torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5 if positive else torch.randn(*shape, generator=g, dtype=torch.float64)
        return v.to(DEVICE).requires_grad_(True)

    x, gate, weight, residual = t(n, c, h, w), t(n, c, positive=True), t(o, c, 1, 1), t(n, o, h, w)
    gamma, beta = t(o, positive=True), t(o)
    noise = torch.tensor([2.0, 0.5], dtype=torch.float64, device=DEVICE)

    for silu in (False, True):

        def train(x, gate, weight, gamma, beta, residual, silu=silu):
            return ops.project_bn_train(x, gate, weight, gamma, beta, EPS, residual, noise, silu)[0]

        def infer(x, gate, weight, gamma, beta, residual, silu=silu):
            return ops.project_bn(x, gate, weight, gamma, beta, residual, noise, silu)

        assert torch.autograd.gradcheck(train, (x, gate, weight, gamma, beta, residual))
        assert torch.autograd.gradcheck(infer, (x, gate, weight, gamma, beta, residual))


def test_from_modules_shares_parameters_and_rejects_non_projections():
    conv, bn = torch.nn.Conv2d(8, 4, 1, bias=False), torch.nn.BatchNorm2d(4)
    fused = ProjectBN.from_modules(conv, bn)
    assert fused[0].weight is conv.weight and fused[1].running_var is bn.running_var
    assert list(fused.state_dict()) == list(torch.nn.Sequential(conv, bn).state_dict())
    with pytest.raises(ValueError, match="conv, bn: not a bias-free 1x1 conv"):
        ProjectBN.from_modules(torch.nn.Conv2d(8, 4, 3, bias=False), bn)


def test_mbconv_runs_gate_noise_and_residual_inside_the_projection(monkeypatch):
    """A B0 block with a residual: the fused model sends the SE gate, the stochastic-depth noise and
    the shortcut to project_bn_train, and its output equals the unfused computation of the same
    modules with the same random draws."""
    model = fused_mbconv.efficientnet_b0(stochastic_depth_prob=0.5).to(DEVICE).train()
    block = model.features[2][1]  # stride 1, 24 -> 24 channels: has the residual
    assert block.use_res_connect
    calls = []
    real = ops.project_bn_train

    def spy(x, gate, weight, gamma, beta, eps, residual, branch_scale, silu):
        calls.append((gate is not None, residual is not None, branch_scale is not None, silu))
        return real(x, gate, weight, gamma, beta, eps, residual, branch_scale, silu)

    monkeypatch.setattr(ops, "project_bn_train", spy)
    x = torch.randn(4, 24, 9, 9, device=DEVICE)
    torch.manual_seed(5)
    fused = block(x)
    assert calls == [(False, False, False, True), (True, True, True, False)]  # expansion, projection
    plain = fused_mbconv.revert(block)
    torch.manual_seed(5)
    expected = plain(x)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mbconv_block_matches_its_plain_modules(backend, training):
    """One whole residual MBConv block of B0 (expand, depthwise + squeeze, excite, projection with
    gate, stochastic depth and shortcut) on every backend, against the same modules unfused (in
    fp32 and fp64): output, input gradient, every parameter gradient, running statistics. Small
    enough for the Triton interpreter, so the fused chain runs in CI, not only on the GPU."""
    block = fused_mbconv.efficientnet_b0(stochastic_depth_prob=0.5).features[2][1].to(DEVICE)
    randomize_(block, torch.Generator().manual_seed(0))
    plain = fused_mbconv.revert(copy.deepcopy(block))
    exact = copy.deepcopy(plain).double()
    x = torch.randn(2, 24, 5, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    skip_if_slow(backend, 2 * 144 * 5 * 4)  # the expanded tensor

    def run(module, x):
        module.train(training)
        x = x.detach().requires_grad_(True)
        torch.manual_seed(5)  # the same stochastic-depth draws
        y = module(x)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
        params = [p for _, p in sorted(module.named_parameters())]
        grads = torch.autograd.grad((y.double() * dy).sum(), [x, *params])
        stats = [b for _, b in sorted(module.named_buffers()) if b.is_floating_point()]
        return [y, *grads, *stats]

    fused_out = run(block, x)
    eager_out, exact_out = run(plain, x), run(exact, x.double())
    names = ["y", "dx", *(n for n, _ in sorted(block.named_parameters()))]
    names += [n for n, b in sorted(block.named_buffers()) if b.is_floating_point()]
    for name, a, e, ex in zip(names, fused_out, eager_out, exact_out, strict=True):
        assert_matches(a, e, ex, name)
