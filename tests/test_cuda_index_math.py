"""The CUDA kernels' index arithmetic and statistics, checked on the CPU.

kernels/dwconv_math.cuh holds what the depthwise kernels compute about indices (tiling, thread
lanes, the transposed-conv gather) and the Welford/Chan merges; it is plain C++, so
tests/cuda_index_math_harness.cpp compiles the very same file with the host compiler and runs it
the way the kernels do. Here its answers are checked against torch: every pixel and channel
covered once, dx and dweight of the gather equal to autograd's, batch statistics accurate when the
mean is huge against the spread.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    exe = tmp_path_factory.mktemp("harness") / "harness"
    subprocess.run(
        [CXX, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{ROOT / 'kernels'}",
         str(ROOT / "tests" / "cuda_index_math_harness.cpp"), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip

    def run(*args, stdin: str = "") -> str:
        done = subprocess.run([str(exe), *map(str, args)], input=stdin, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    return run


TILINGS = [  # (N, C, pixels of one plane, vec, channels innermost, min pixels per lane)
    (1, 1, 1, 1, False, 1),
    (2, 17, 143, 1, True, 8),  # the parity suite's (2, 17, 13, 11)
    (2, 17, 143, 1, False, 8),
    (3, 5, 49, 1, False, 4),  # small planes: several channels share a block
    (2, 1152, 49, 8, True, 4),  # wide and small, bf16 vectors
    (2, 1152, 49, 4, True, 4),  # fp32 vectors
    (1, 24, 12544, 8, True, 4),  # 112 x 112, fewer channel lanes than 32
    (4, 32, 12544, 1, False, 8),
    (2, 40, 3, 8, True, 1),  # C not a multiple of 32 vectors: an idle part of the group
    (300, 3, 7, 1, True, 8),  # more tiles than kTargetTiles
    (70000, 1, 1, 1, False, 1),  # more tiles than the grid: the grid-stride loop covers the rest
]


@pytest.mark.parametrize("n,c,pixels,vec,inner,min_ppl", TILINGS, ids=str)
def test_tiling_covers_each_pixel_and_partial_once(harness, n, c, pixels, vec, inner, min_ppl):
    out = harness("tiling", n, c, pixels, vec, int(inner), min_ppl)
    print(out)
    assert out.startswith("ok"), out


HALO_TILINGS = [  # (N, C, Ho, Wo, k, stride)
    (1, 1, 1, 1, 3, 1),
    (2, 17, 13, 11, 3, 1),  # the parity suite's shape: an idle part of the channel group
    (2, 17, 7, 6, 5, 2),
    (2, 240, 57, 57, 5, 1),  # B5 stage 3: tiles neither divide the plane nor the channels' 32s
    (1, 144, 114, 114, 3, 2),
    (1, 48, 228, 228, 3, 1),
    (4, 1152, 7, 7, 5, 1),  # a plane narrower than half a tile: tiles 8 wide
    (2, 1, 200, 300, 3, 1),
    (1, 17, 2100, 2100, 3, 2),  # more tiles than the grid, two groups: blocks stride, each in its group
]


@pytest.mark.parametrize("n,c,out_h,out_w,k,stride", HALO_TILINGS, ids=str)
def test_halo_tiling_computes_each_output_once(harness, n, c, out_h, out_w, k, stride):
    out = harness("halo", n, c, out_h, out_w, k, stride)
    print(out)
    assert out.startswith("ok"), out


GATHERS = [  # (k, stride, H, W, top, bottom, left, right)
    (3, 1, 7, 6, 1, 1, 1, 1),
    (3, 2, 7, 8, 0, 1, 0, 1),  # TF "SAME": the odd pixel of padding after
    (3, 2, 8, 7, 1, 1, 1, 1),  # last input row/column read by no output window
    (5, 1, 6, 9, 2, 2, 2, 2),
    (5, 2, 9, 10, 1, 2, 2, 1),  # asymmetric both ways
    (5, 2, 5, 5, 0, 0, 0, 0),
    (3, 1, 1, 5, 1, 1, 0, 2),
    (5, 2, 13, 11, 4, 4, 4, 4),  # padding up to k - 1
    (3, 1, 19, 37, 1, 1, 1, 1),  # several gather tiles down and across
    (5, 2, 20, 35, 1, 2, 2, 1),
    (5, 1, 9, 17, 0, 4, 4, 0),
]


@pytest.mark.parametrize("k,stride,h,w,top,bottom,left,right", GATHERS, ids=str)
def test_gather_gives_the_convolution_gradients(harness, k, stride, h, w, top, bottom, left, right):
    """dx and dweight of one channel, as the backward's pass 2 gathers them tile by tile from each
    tile's dc tile and patch, equal autograd's gradients of the padded strided convolution."""
    g = torch.Generator().manual_seed(k * 100 + stride * 10 + h)
    out_h = (h + top + bottom - k) // stride + 1
    out_w = (w + left + right - k) // stride + 1
    x = torch.randn(1, 1, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 1, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    dc = torch.randn(1, 1, out_h, out_w, generator=g, dtype=torch.float64)
    F.conv2d(F.pad(x, (left, right, top, bottom)), weight, stride=stride).backward(dc)

    values = torch.cat([weight.detach().flatten(), dc.flatten(), x.detach().flatten()])
    out = harness("gather", k, stride, h, w, top, left, out_h, out_w, stdin="\n".join(map(repr, values.tolist())))
    result = torch.tensor([float(v) for v in out.split()], dtype=torch.float64)
    dx, dweight = result[: h * w].view(1, 1, h, w), result[h * w :].view(1, 1, k, k)
    torch.testing.assert_close(dx, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dweight, weight.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lanes,rows", [(8, 1), (8, 37), (256, 5), (32, 300)])
def test_welford_chan_statistics_survive_a_large_mean(harness, lanes, rows):
    """fp32 (count, mean, M2) merged as the stats and combine kernels do: accurate variance for
    values 1000 +- 0.01, where fp32 E[x^2] - E[x]^2 has no correct digit."""
    g = torch.Generator().manual_seed(lanes + rows)
    values = (1000.0 + 0.01 * torch.randn(5000, generator=g, dtype=torch.float64)).float().double()
    out = harness("welford", lanes, rows, stdin="\n".join(map(repr, values.tolist())))
    count, mean, var = map(float, out.split())
    assert count == values.numel()
    assert abs(mean - values.mean().item()) < 1e-4
    assert abs(var - values.var(unbiased=False).item()) < 1e-3 * values.var(unbiased=False).item()
