"""Benchmark: fused depthwise conv + BN + SiLU (triton and cuda backends) against eager PyTorch (cuDNN
depthwise conv, BatchNorm2d, SiLU) and torch.compile of the same eager module, on every distinct
depthwise layer shape of EfficientNet-B5 (batch 32, 456x456, bf16, channels_last).

Modes: "infer" (eval forward under no_grad) and "train" (train-mode forward + backward to x
and the parameters). Each time is triton.testing.do_bench's median (with p20/p80) on random
data after a warm-up call (compiling, autotuning). pct_bw_floor = the bytes that must move
(see ``floor_bytes``) / the time, as a percentage of the device's measured copy bandwidth.

    python bench/bench_dwconv.py                # all shapes, markdown table + CSV
    python bench/bench_dwconv.py --quick        # 3 shapes, shorter timing
    python bench/bench_dwconv.py --list-shapes  # the shapes only (no GPU needed)
    python bench/bench_dwconv.py --smoke --out /tmp/dw.csv  # CPU, one small shape: the code path only
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable

import fused_mbconv  # noqa: E402
from bench.common import (  # noqa: E402
    KernelSetting,
    environment,
    kernel_bench_parser,
    kernel_shape_rows,
    kernel_table,
    select_providers,
    slug,
)
from fused_mbconv.models.config import DWShape, depthwise_shapes  # noqa: E402

VARIANT, BATCH, RESOLUTION, DTYPE = "b5", 32, 456, torch.bfloat16
FUSED = ("triton", "cuda")  # providers that run the fused module under that backend
PROVIDERS = (*FUSED, "eager", "compile")
MODES = ("infer", "train")
SMOKE_SHAPES = [DWShape(8, 3, 2, 9)]


def output_size(shape: DWShape) -> int:
    return -(-shape.size // shape.stride)  # "same" padding


def floor_bytes(shape: DWShape, mode: str, itemsize: int, batch: int = BATCH) -> int:
    """Bytes any implementation of the fused design must move (weights and per-channel vectors
    are negligible):

    - infer: read x, write y (one pass);
    - train: forward pass 1 reads x (batch statistics need all of conv(x) before normalising),
      pass 2 reads x and writes y; backward pass 1 reads x and dy (the sums of the BN backward),
      pass 2 reads x and dy and writes dx: 4 |x| + 3 |y| + |dx|. The triton backward also
      writes and reads dc (the gradient of the conv output) between its dc and dx passes,
      2 |y| more, so it tops out below 100% of this floor.
    """
    x = batch * shape.channels * shape.size**2 * itemsize
    y = batch * shape.channels * output_size(shape) ** 2 * itemsize
    return x + y if mode == "infer" else 5 * x + 3 * y


def eager_module(shape: DWShape) -> nn.Sequential:
    """nn.Conv2d(groups=C) (cuDNN) + nn.BatchNorm2d + nn.SiLU, as the unfused model runs it."""
    c, k = shape.channels, shape.kernel
    return nn.Sequential(nn.Conv2d(c, c, k, shape.stride, k // 2, groups=c, bias=False), nn.BatchNorm2d(c), nn.SiLU())


def make_modules(shape: DWShape, setting: KernelSetting) -> dict[str, nn.Module]:
    eager = eager_module(shape).to(setting.device, setting.dtype, memory_format=torch.channels_last)
    conv, bn, _ = copy.deepcopy(eager)
    fused = fused_mbconv.nn.DWConvBNAct.from_modules(conv, bn)
    return {**dict.fromkeys(FUSED, fused), "eager": eager,
            "compile": torch.compile(copy.deepcopy(eager), mode=setting.compile_mode)}  # fmt: skip


def step_fn(module: nn.Module, mode: str, x: torch.Tensor, out_size: int) -> Callable[[], object]:
    """The timed call: forward under no_grad (infer), or forward + backward to x and the
    parameters (train) with a random gradient of the (out_size x out_size) output."""
    module.train(mode == "train")
    if mode == "infer":

        def infer():
            with torch.no_grad():
                return module(x)

        return infer
    x = x.detach().requires_grad_(True)
    inputs = [x, *module.parameters()]
    dy = torch.randn(*x.shape[:2], out_size, out_size, device=x.device, dtype=x.dtype)
    dy = dy.contiguous(memory_format=torch.channels_last)

    def train():
        return torch.autograd.grad(module(x), inputs, dy)

    return train


def run(shapes: list[DWShape], providers: list[str], setting: KernelSetting, out: Path | None = None) -> list[dict]:
    """Time every (shape, mode, provider), rows into the CSV ``out`` as they come."""

    def case(shape: DWShape):
        size = (setting.batch, shape.channels, shape.size, shape.size)
        x = torch.randn(size, device=setting.device, dtype=setting.dtype).contiguous(memory_format=torch.channels_last)
        modules = make_modules(shape, setting)
        return (lambda provider, mode: step_fn(modules[provider], mode, x, output_size(shape)),
                lambda mode: floor_bytes(shape, mode, x.element_size(), setting.batch))  # fmt: skip

    return kernel_shape_rows("dwconv_bn_silu", shapes, providers, FUSED, MODES, setting, RESOLUTION, case, out)


def parse_args(argv=None) -> argparse.Namespace:
    return kernel_bench_parser(__doc__, PROVIDERS, "CSV path (default bench/results/dwconv_<gpu>.csv)").parse_args(argv)


def selected_shapes(quick: bool, smoke: bool = False) -> list[DWShape]:
    if smoke:
        return SMOKE_SHAPES
    shapes = depthwise_shapes(VARIANT)
    if not quick:
        return shapes
    # the largest input, the first 5x5 stride-2 layer and the last (widest channels) layer
    largest = max(shapes, key=lambda s: s.channels * s.size**2)
    return list(dict.fromkeys([largest, next(s for s in shapes if s.kernel == 5 and s.stride == 2), shapes[-1]]))


def main(argv=None) -> None:
    args = parse_args(argv)
    shapes = selected_shapes(args.quick, args.smoke)
    if args.list_shapes:
        print(f"EfficientNet-{VARIANT.upper()} depthwise shapes at {RESOLUTION}x{RESOLUTION}, batch {BATCH}:")
        for s in shapes:
            print(f"  {s.name:22s} channels={s.channels} kernel={s.kernel} stride={s.stride} input={s.size}x{s.size}")
        return
    setting = KernelSetting.from_args(args, BATCH, DTYPE)
    providers = select_providers(args.providers, PROVIDERS, FUSED, args.smoke)
    out = args.out or Path(__file__).parent / "results" / f"dwconv_{slug(environment(setting.device)['gpu'])}.csv"
    rows = run(shapes, providers, setting, out)
    print(kernel_table(rows, providers))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
