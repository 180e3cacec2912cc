"""Parity of the fused depthwise conv + BN + SiLU against eager PyTorch: outputs, the squeeze
by-product, running statistics and gradients, in every dtype, layout, kernel, stride, padding."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import BACKENDS, DEVICE, INTERPRETED, assert_matches, skip_if_slow
from eager import dw_triplet

import fused_mbconv
from fused_mbconv.ops.dwconv_bn_silu import IMPLS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CONFIGS = [  # (kernel, stride, tf padding)
    (3, 1, False),
    (5, 2, False),
    (3, 2, True),
    (5, 1, True),
]
LAYOUTS = ["nchw", "channels_last", "strided"]


def make_input(shape, dtype, layout, seed=1):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if layout == "strided":  # every other column of a wider tensor: not contiguous in any format
        # slice last: a dtype or device copy of a view would make it contiguous again
        x = torch.randn(n, c, h, 2 * w, generator=g).to(DEVICE, dtype)[..., ::2]
        assert w == 1 or not x.is_contiguous()
        return x
    x = torch.randn(n, c, h, w, generator=g).to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def run_block(block, x, with_squeeze, seed=2):
    """Forward, then backward of a random linear function of y (and of the squeeze)."""
    x = x.detach().requires_grad_(True)
    out = block(x, with_squeeze=True) if with_squeeze else block(x)
    y, squeeze = out if with_squeeze else (out, None)
    g = torch.Generator().manual_seed(seed)
    loss = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)).sum()
    if squeeze is not None:
        loss = loss + (squeeze.double() * torch.randn(squeeze.shape, generator=g, dtype=torch.float64).to(y.device)).sum()
    params = [block[0].weight, block[1].weight, block[1].bias]
    grads = torch.autograd.grad(loss, [x, *params])
    return y, squeeze, grads


def eager_with_squeeze(block, x, with_squeeze):
    x = x.detach().requires_grad_(True)
    y = block(x)
    out = (y, y.mean((2, 3))) if with_squeeze else y
    return out


class _EagerAdapter(torch.nn.Module):
    """Gives an eager block the fused block's ``with_squeeze`` interface for ``run_block``."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def __getitem__(self, i):
        return self.block[i]

    def forward(self, x, with_squeeze=False):
        y = self.block(x)
        return (y, y.mean((2, 3))) if with_squeeze else y


def check_parity(shape, k, stride, tf, dtype, layout, training, with_squeeze, backend):
    needed = ["forward_train" if training else "forward_infer", "backward"]
    missing = [op for op in needed if backend not in IMPLS[op].backends()]
    if missing:
        pytest.skip(f"backend {backend!r} does not implement {missing} yet")
    fused, eager, exact = dw_triplet(shape[1], k, stride, tf, dtype, DEVICE)
    for m in (fused, eager, exact):
        m.train(training)
    x = make_input(shape, dtype, layout)
    y, s, grads = run_block(fused, x, with_squeeze)
    ye, se, grads_e = run_block(_EagerAdapter(eager), x, with_squeeze)
    yx, sx, grads_x = run_block(_EagerAdapter(exact), x.double(), with_squeeze)

    assert_matches(y, ye, yx, "y")
    if layout == "channels_last" and shape[1] > 1 and y.shape[2] * y.shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last input must give channels_last output"
    if with_squeeze:
        assert_matches(s, se, sx, "squeeze")
    for name, a, e, ex in zip(["dx", "dweight", "dgamma", "dbeta"], grads, grads_e, grads_x):
        assert_matches(a, e, ex, name)
    if training:
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            a, e, ex = (getattr(m[1], buf) for m in (fused, eager, exact))
            if buf == "num_batches_tracked":
                assert a.item() == ex.item() == 1
            else:
                assert_matches(a, e, ex, buf)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,stride,tf", CONFIGS, ids=lambda v: str(v))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_parity(backend, dtype, k, stride, tf, layout, training):
    shape = (2, 17, 13, 11)
    skip_if_slow(backend, 2 * 17 * 13 * 11)
    if backend == "triton" and INTERPRETED and dtype == torch.float16 and layout != "channels_last":
        # a dtype's path (conversions, rounding) does not depend on the layout: fp16 runs in
        # channels_last, fp32 and bf16 in every layout (all on the GPU)
        pytest.skip("interpreted: fp16 is covered in channels_last")
    check_parity(shape, k, stride, tf, dtype, layout, training, with_squeeze=True, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,stride,tf", [(3, 1, False), (5, 2, True)], ids=lambda v: str(v))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_channels_last_vector_width(backend, dtype, k, stride, tf, training):
    """C a multiple of 8: the kernels' 16-byte channel-vector paths (the fast ones) are taken."""
    shape = (2, 32, 9, 11)
    skip_if_slow(backend, 2 * 32 * 9 * 11)
    check_parity(shape, k, stride, tf, dtype, "channels_last", training, with_squeeze=True, backend=backend)


def _interior_tile_plane(backend, plane, stride):
    """A plane (input h, w) in which some tiles of the Triton kernels read no padding and take the
    unmasked path beside border tiles that take the masked one: under the interpreter (16 x 8
    tiles; asserted) the smallest such, 3 x 3 tiles of output (its time goes with the programs,
    not the elements: no skip_if_slow); on a GPU, 64 x 64 outputs, with interior tiles in every
    tile config."""
    if not INTERPRETED:
        return 64 * stride, 64 * stride
    if backend == "triton":
        from fused_mbconv.ops.dwconv_bn_silu.triton_impl import _TILE_INTERPRETED

        tile = _TILE_INTERPRETED.kwargs
        assert (tile["BLOCK_P"] // tile["TILE_W"], tile["TILE_W"], tile["BLOCK_C"]) == (16, 8, 32), "shape chosen for these"
    return plane


@pytest.mark.parametrize("k,stride,tf", [(3, 1, False), (5, 1, True)], ids=lambda v: str(v))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_channel_blocks_and_interior_tiles(backend, k, stride, tf, training):
    """Interior and border tiles (``_interior_tile_plane``: 36 x 20 under the interpreter); at k3
    C = 40, two channel blocks of the Triton kernels, the second partly masked (only the full one
    has interior tiles), at k5 C = 32, one (half the interpreter's time). bf16 channels_last, the
    layout and dtype of mixed-precision training."""
    h, w = _interior_tile_plane(backend, (36, 20), stride)
    c = 40 if k == 3 else 32
    check_parity((1, c, h, w), k, stride, tf, torch.bfloat16, "channels_last", training, True, backend)


@pytest.mark.parametrize("taps_per_strip", [False, True], ids=["taps-per-tile", "taps-per-strip"])
def test_k5_dweight_per_tile_and_per_strip(backend, taps_per_strip, monkeypatch):
    """The dc + dweight kernel at k5 sums each tap's products over a tile's strips once per tile,
    or (TAPS_PER_STRIP) keeps them per strip across the chunk's tiles and sums them at the end:
    either way the same gradients, over interior and border tiles (bf16 channels_last, C = 32)."""
    if backend != "triton":
        pytest.skip("a Triton kernel's configs")
    if INTERPRETED and taps_per_strip:
        pytest.skip("the interpreted config's path: test_channel_blocks_and_interior_tiles[triton-train-5-1-True]")
    import triton

    from fused_mbconv.ops.dwconv_bn_silu import triton_impl

    configs = [triton_impl._DCONV_INTERPRETED] if INTERPRETED else triton_impl._DCONV_CONFIGS
    base = next(cfg for cfg in configs if cfg.kwargs["TAPS_PER_STRIP"] == taps_per_strip or INTERPRETED)
    cfg = triton.Config({**base.kwargs, "TAPS_PER_STRIP": taps_per_strip}, num_warps=base.num_warps)
    monkeypatch.setattr(triton_impl._dconv_kernel, "configs", [cfg])  # one config: no tuning, no prune
    h, w = _interior_tile_plane(backend, (36, 20), 1)
    check_parity((1, 32, h, w), 5, 1, True, torch.bfloat16, "channels_last", True, True, backend)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_interior_tiles_at_stride_2(backend, training):
    """The unmasked path's bounds at stride 2 with TF padding (1 before, 2 after; 72 x 34 input,
    36 x 17 outputs under the interpreter). Forward only (the outputs, the squeeze and,
    training, the batch statistics): the backward's conv takes the same path, checked at stride
    1 above, and its dx pass over this input would cost the interpreter a minute."""
    h, w = _interior_tile_plane(backend, (72, 34), 2)
    fused, eager, exact = dw_triplet(40, 5, 2, True, torch.bfloat16, DEVICE)
    x = make_input((1, 40, h, w), torch.bfloat16, "channels_last")
    with torch.no_grad():
        y, s = fused.train(training)(x, with_squeeze=True)
        ye, se = _EagerAdapter(eager).train(training)(x, with_squeeze=True)
        yx, sx = _EagerAdapter(exact).train(training)(x.double(), with_squeeze=True)
    assert_matches(y, ye, yx, "y")
    assert_matches(s, se, sx, "squeeze")
    if training:
        for buf in ("running_mean", "running_var"):
            assert_matches(*(getattr(m[1], buf) for m in (fused, eager, exact)), buf)


ODD_SHAPES = [(1, 1, 7, 7), (2, 3, 13, 7), (3, 17, 1, 13), (1, 17, 7, 1), (2, 1152, 7, 7), (2, 3, 112, 112), (1, 17, 112, 13)]


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("k,stride", [(3, 1), (5, 2)])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_odd_sizes(backend, shape, k, stride, training):
    skip_if_slow(backend, torch.Size(shape).numel())
    check_parity(shape, k, stride, False, torch.float32, "nchw", training, with_squeeze=False, backend=backend)


def test_cumulative_momentum_and_no_running_stats(backend):
    """momentum=None (cumulative average) over several steps; track_running_stats=False."""
    fused, eager, _ = dw_triplet(5, 3, 1, False, torch.float32, DEVICE, momentum=None)
    fused.train(), eager.train()
    for step in range(3):
        x = make_input((2, 5, 9, 9), torch.float32, "nchw", seed=10 + step)
        y, ye = fused(x), eager(x)
        torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-5)
    for buf in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(fused[1], buf), getattr(eager[1], buf), rtol=1e-5, atol=1e-6)
    assert fused[1].num_batches_tracked.item() == 3

    fused, eager, _ = dw_triplet(5, 3, 1, False, torch.float32, DEVICE, track_running_stats=False)
    for training in (True, False):  # without running stats, eval also normalises with batch stats
        fused.train(training), eager.train(training)
        x = make_input((2, 5, 9, 9), torch.float32, "nchw")
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-5, atol=1e-5)


def test_large_mean_small_spread(backend):
    """Batch statistics stay accurate when the conv output's mean is huge against its spread,
    where E[c^2] - E[c]^2 in fp32 would cancel catastrophically."""
    fused, _, exact = dw_triplet(4, 3, 1, False, torch.float32, DEVICE)
    fused.train(), exact.train()
    x = 1000.0 + 0.01 * make_input((2, 4, 9, 9), torch.float32, "nchw")
    with torch.no_grad():
        fused[0].weight.fill_(1.0 / 9), exact[0].weight.fill_(1.0 / 9)
        y, yx = fused(x), exact(x.double())
    # padding makes border outputs differ by ~1000/9 from the interior: the spread is real, and
    # a cancelling variance would be off by far more than 1e-3 of it
    torch.testing.assert_close(fused[1].running_var.double(), exact[1].running_var, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(y.double(), yx, rtol=1e-3, atol=1e-3)


def test_backends_agree_with_reference(backend):
    """The fused output is identical in shape, dtype and layout to the reference backend's."""
    fused, _, _ = dw_triplet(6, 5, 2, True, torch.float32, DEVICE)
    x = make_input((2, 6, 9, 10), torch.float32, "channels_last")
    y, s = fused.eval()(x, with_squeeze=True)
    with fused_mbconv.backend("reference"):
        yr, sr = fused(x, with_squeeze=True)
    assert y.stride() == yr.stride() and y.dtype == yr.dtype
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [3, 40], ids=lambda g: f"groups{g}")
def test_reductions_split_into_chunks(monkeypatch, groups):
    """The Triton reductions (batch statistics, BN backward sums, dweight) over several chunks of
    tiles, some empty when the programs outnumber the tiles: the partials must merge exactly as
    one chunk does. (2, 17, 13, 11) has 4 tiles of 16 x 8 under the interpreter, 2 per sample;
    40 chunks leave a whole block of 32 partial rows (the statistics merge) empty."""
    if "triton" not in BACKENDS:
        pytest.skip("the Triton backend cannot run here")
    skip_if_slow("triton", 2 * 17 * 13 * 11)
    from fused_mbconv.ops.dwconv_bn_silu import triton_impl

    monkeypatch.setattr(triton_impl, "_groups", lambda geo, device: groups)
    with fused_mbconv.backend("triton"):
        for training in (True, False):
            check_parity((2, 17, 13, 11), 3, 1, False, torch.float32, "channels_last", training, True, "triton")


@pytest.mark.parametrize(
    "c,width,expected",
    [
        # 240 channels: 16-, 32- and 64-channel blocks use 100%, 94% and 94% of their lanes
        (240, 228, {(128, 32, 16), (64, 64, 8), (128, 64, 16), (64, 32, 8), (256, 16, 16)}),
        (48, 228, {(256, 16, 16)}),  # 100% against 75% for 32 and 64
        (144, 114, {(128, 32, 16), (64, 32, 8), (256, 16, 16)}),  # 100%, 90%; 64: 75%
        (24, 228, {(128, 32, 16), (64, 32, 8), (256, 16, 16)}),  # 75%; 64: 38%
        (240, 7, {(64, 64, 8), (64, 32, 8)}),  # no 16-wide tiles on a 7-wide plane
        (48, 7, {(64, 64, 8), (64, 32, 8)}),  # then the best of those left (75% both)
        (3, 1, {(64, 32, 8)}),  # nothing fits: the narrowest tile, its fullest channel block
    ],
)
def test_depthwise_tile_configs_fit_the_shape(c, width, expected):
    """The autotuner's candidates (GPU configs) for a plane: tiles wider than the next power of
    two of the plane's width and channel blocks that leave more lanes masked than the best
    (by over 10% of them) only compute masked lanes."""
    if "triton" not in IMPLS["backward"].backends():
        pytest.skip("no triton backend")
    from fused_mbconv.ops.dwconv_bn_silu import triton_impl

    kept = triton_impl._prune("W_OUT")(triton_impl._TILE_CONFIGS, {"C": c}, W_OUT=width)
    assert {(cfg.kwargs["BLOCK_P"], cfg.kwargs["BLOCK_C"], cfg.kwargs["TILE_W"]) for cfg in kept} == expected


def test_dweight_configs_keep_taps_per_strip_at_k5_only(monkeypatch):
    """The dc + dweight kernel's candidates: at k5 the TAPS_PER_STRIP configs first (the ones that
    run with autotuning off) and no per-tile config of the same tile and warps; at k3 none of them
    (every config keeps its 9 taps per strip); none with FUSED_MBCONV_TAPS_PER_STRIP=0."""
    if "triton" not in IMPLS["backward"].backends():
        pytest.skip("no triton backend")
    from fused_mbconv.ops.dwconv_bn_silu import triton_impl

    def kept(k):
        configs = triton_impl._prune_dconv(triton_impl._DCONV_CONFIGS, {"C": 240, "K": k}, W_OUT=57)
        return [(cfg.kwargs["BLOCK_P"], cfg.kwargs["BLOCK_C"], cfg.num_warps, cfg.kwargs["TAPS_PER_STRIP"])
                for cfg in configs]  # fmt: skip

    k5 = kept(5)
    flags = [flag for *_, flag in k5]
    assert flags[0] and flags == sorted(flags, reverse=True), k5
    tiles = [tile for *tile, _ in k5]
    assert len(set(map(tuple, tiles))) == len(tiles), k5
    assert not any(flag for *_, flag in kept(3))
    monkeypatch.setenv("FUSED_MBCONV_TAPS_PER_STRIP", "0")
    assert not any(flag for *_, flag in kept(5))


def test_gradient_through_the_squeeze_only(backend):
    """A training forward whose y is unused and whose squeeze is (no zero gradient is made for
    an output that got none): the gradients equal those of the squeeze with y counted at 0."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 7, 6, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(8, device=DEVICE, dtype=torch.float64) + 0.5).requires_grad_(True)
    beta = torch.randn(8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    dsq = torch.randn(2, 8, device=DEVICE, dtype=torch.float64)
    grads = []
    for with_y in (False, True):
        y, squeeze, _, _ = fused_mbconv.ops.dwconv_bn_silu_train(x, w, gamma, beta, 1e-3, 1, [1, 1, 1, 1], True)
        loss = (squeeze * dsq).sum() + (y.sum() * 0 if with_y else 0)
        grads.append(torch.autograd.grad(loss, (x, w, gamma, beta)))
    for only_squeeze, both in zip(*grads):
        torch.testing.assert_close(only_squeeze, both)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_deterministic_algorithms_squeeze_in_a_fixed_order(backend, training, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the squeeze is not summed with float atomics
    (they add in any order: last-bit differences between runs) but taken from y by the
    squeeze-excite's fixed-order kernel; parity holds as before."""
    calls = []
    if backend == "triton":
        from fused_mbconv.ops.dwconv_bn_silu import triton_impl

        squeeze = triton_impl.se_squeeze
        monkeypatch.setattr(triton_impl, "se_squeeze", lambda y: calls.append(y.shape) or squeeze(y))
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn only: eager's cuBLAS needs no env setting
    try:
        check_parity((2, 16, 9, 7), 3, 1, False, torch.float32, "channels_last", training, True, backend)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    if backend == "triton":
        assert calls == [(2, 16, 9, 7)]


_ORDER_RUN = """
import sys, torch, fused_mbconv
torch.manual_seed(0)
device = sys.argv[2]
layer = fused_mbconv.nn.DWConvBNAct(40, 3, 2).to(device).train()
x = torch.randn(2, 40, 9, 11, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
with fused_mbconv.backend("triton"):
    y, squeeze = layer(x, with_squeeze=True)
    torch.autograd.backward((y, squeeze), (torch.randn_like(y), torch.randn_like(squeeze)))
found = (y, squeeze, x.grad, layer[0].weight.grad, layer[1].weight.grad, layer[1].running_var)
torch.save([t.cpu() for t in found], sys.argv[1])
"""


@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend")
def test_program_orders_agree(tmp_path):
    """The depthwise kernels number their programs channel block fastest;
    FUSED_MBCONV_CHANNELS_FASTEST=0 (tile or chunk fastest, kept to measure the difference on a
    GPU) must give the same layer: output, gradients and running statistics of a training step
    with two channel blocks (40 channels, 32 a block in the interpreter) and several tiles, in
    two processes (the order is read at import). Equal up to fp32 rounding, not bit for bit: the
    squeeze's atomic adds may land in another order."""
    results = []
    for order in ("1", "0"):
        path = tmp_path / f"order{order}.pt"
        env = {**os.environ, "FUSED_MBCONV_CHANNELS_FASTEST": order}
        done = subprocess.run([sys.executable, "-c", _ORDER_RUN, str(path), str(DEVICE)], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(torch.load(path))
    for name, new, old in zip(("y", "squeeze", "dx", "dweight", "dgamma", "running_var"), *results):
        torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
