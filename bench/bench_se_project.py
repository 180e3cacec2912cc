"""Benchmark: an MBConv block's squeeze-excite + projection (SE gate + 1x1 conv + BatchNorm
(+ residual), the ``ProjectBN`` op, one GEMM) against eager PyTorch in torchvision's order and
torch.compile of the same eager module, on every distinct SE + projection shape of
EfficientNet-B5 (batch 32, 456x456, bf16, channels_last).

Inputs, random: h (N, C, H, W), the depthwise output (C expanded channels, H the block's output
size); pooled (N, C), its spatial mean; x_in (N, O, H, W), the block input, when the block has a
residual (stride 1, same width in and out). Stochastic depth is left out on every path (it is
noise, identity in eval; ProjectBN's branch_scale is None).

- eager: plain torch modules, torchvision's order: mean -> conv1x1 fc1 (bias) -> SiLU -> conv1x1
  fc2 (bias) -> sigmoid -> h * gate -> conv1x1 (no bias) -> BatchNorm2d (-> + x_in). It computes
  the mean itself.
- compile: torch.compile (``--compile-mode``) of that same eager module.
- triton: ``SqueezeExcite.gate(pooled)`` then ``ProjectBN(h, gate, residual=x_in)`` under
  ``fused_mbconv.backend("triton")``, over the same Parameters as eager. pooled is given: in the
  model the fused depthwise kernel produces it in the same pass as h, so this path gets it for free.

Modes: "infer" (eval forward under no_grad) and "train" (train-mode forward + backward to h, x_in
and every parameter, with a random upstream gradient). In train, the fused path's pooled is tied
to h by a function whose backward is the mean's (``FreeSqueeze``): its backward therefore
includes the excite backward and the squeeze's broadcast gradient (dpooled / HW, added to dh by
autograd's accumulation) exactly as autograd gives it, the same gradients as eager's; that
accumulation is one more elementwise pass over dh, which the model's depthwise backward does
without (it takes dpooled itself). Each time is triton.testing.do_bench's median (with p20/p80) on
random data after a warm-up call (compiling, autotuning). pct_bw_floor = the bytes that must move
(see ``floor_bytes``) / the time, as a percentage of the device's measured copy bandwidth.

    python bench/bench_se_project.py                # all shapes, markdown table + CSV
    python bench/bench_se_project.py --quick        # 3 shapes, shorter timing
    python bench/bench_se_project.py --list-shapes  # the shapes only (no GPU needed)
    python bench/bench_se_project.py --out -        # the CSV to stdout, after the table
    python bench/bench_se_project.py --smoke --out /tmp/se.csv  # CPU, one small shape: the code path only
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable

from bench.common import (  # noqa: E402
    CSV_COLUMNS,
    KernelSetting,
    environment,
    kernel_bench_parser,
    kernel_shape_rows,
    kernel_table,
    select_providers,
    slug,
    write_rows,
)
from fused_mbconv.models.config import SEProjectShape, se_project_shapes  # noqa: E402
from fused_mbconv.nn import ProjectBN, SqueezeExcite  # noqa: E402

VARIANT, BATCH, RESOLUTION, DTYPE = "b5", 32, 456, torch.bfloat16
# providers that run the fused modules under that backend; the projection op has reference and
# triton backends only, so "cuda" would time the same Triton projection again
FUSED = ("triton",)
PROVIDERS = (*FUSED, "eager", "compile")
MODES = ("infer", "train")
SMOKE_SHAPES = [SEProjectShape(16, 4, 8, 5, True)]


def floor_bytes(shape: SEProjectShape, mode: str, itemsize: int, batch: int = BATCH) -> int:
    """Bytes any implementation of the fused design must move (weights, the (N, C) pooled/gate and
    the per-channel vectors are negligible); |h| = N C H W, |y| = N O H W:

    - infer: read h once, write y, read x_in when residual: |h| + |y| (+ |y|).
    - train: forward reads h, writes z (the conv output, O channels, kept for the backward) and
      y (+ reads x_in when residual); backward reads dy and z, reads h twice (the dx GEMM, whose
      epilogue also forms the gate's gradient, and the weight-gradient GEMM) and writes dh:
      4 |h| + 3 |y| (+ |y|). x_in's gradient is dy itself (no bytes).

    Not counted, so the triton path tops out below 100%: its training forward reads z once more to
    normalise it into y, its backward reads dy and z twice and writes and reads dz (all O channels,
    a sixth of h or less), and, here only, the squeeze's broadcast gradient adds one more pass over
    dh (see the module docstring).
    """
    h = batch * shape.channels * shape.size**2 * itemsize
    y = batch * shape.out * shape.size**2 * itemsize
    residual = y if shape.residual else 0
    return h + y + residual if mode == "infer" else 4 * h + 3 * y + residual


class EagerSEProject(nn.Module):
    """torchvision's SqueezeExcitation (fc1, fc2: 1x1 convs with bias) followed by its projection
    Conv2dNormActivation without activation (1x1 conv, BatchNorm2d), plus the residual."""

    def __init__(self, shape: SEProjectShape, eps: float = 1e-3, momentum: float = 0.01) -> None:
        super().__init__()
        # B5 builds its BatchNorms with eps 1e-3, momentum 0.01 (torchvision)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(shape.channels, shape.squeeze, 1)
        self.activation = nn.SiLU()
        self.fc2 = nn.Conv2d(shape.squeeze, shape.channels, 1)
        self.scale_activation = nn.Sigmoid()
        self.conv = nn.Conv2d(shape.channels, shape.out, 1, bias=False)
        self.bn = nn.BatchNorm2d(shape.out, eps=eps, momentum=momentum)

    def forward(self, h: torch.Tensor, pooled: torch.Tensor, x_in: Optional[torch.Tensor] = None) -> torch.Tensor:
        del pooled  # eager computes the mean itself
        gate = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(h)))))
        y = self.bn(self.conv(h * gate))
        return y if x_in is None else y + x_in


class FreeSqueeze(torch.autograd.Function):
    """pooled, given (the depthwise kernel's by-product), tied to h as ``h.mean((2, 3))`` is: the
    forward costs nothing, the backward is the mean's, so dh gets dpooled / HW as in the model."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        ctx.shape = h.shape
        return pooled.clone()  # (N, C): a fresh output keeps autograd's view bookkeeping out of it

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n, c, hh, ww = ctx.shape
        return (grad / (hh * ww))[:, :, None, None].expand(n, c, hh, ww), None


class FusedSEProject(nn.Module):
    """SqueezeExcite.gate + ProjectBN over the Parameters (and BN buffers) of an EagerSEProject."""

    def __init__(self, eager: EagerSEProject) -> None:
        super().__init__()
        # built on the meta device, then given the eager fc1/fc2: shared, not copied
        self.se = SqueezeExcite(eager.fc1.in_channels, eager.fc1.out_channels, device="meta")
        self.se.fc1, self.se.fc2 = eager.fc1, eager.fc2
        self.project = ProjectBN.from_modules(eager.conv, eager.bn)

    def forward(self, h: torch.Tensor, pooled: torch.Tensor, x_in: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.is_grad_enabled() and h.requires_grad:
            pooled = FreeSqueeze.apply(h, pooled)
        return self.project(h, self.se.gate(pooled), residual=x_in)


def make_modules(
    shape: SEProjectShape, compile_mode: str, device: torch.device | str = "cuda", dtype: torch.dtype = DTYPE
) -> dict[str, nn.Module]:
    eager = EagerSEProject(shape).to(device, dtype, memory_format=torch.channels_last)
    fused = FusedSEProject(eager)
    return {**dict.fromkeys(FUSED, fused), "eager": eager,
            "compile": torch.compile(eager, mode=compile_mode)}  # fmt: skip


def make_inputs(
    shape: SEProjectShape, device: torch.device | str = "cuda", dtype: torch.dtype = DTYPE, batch: int = BATCH
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Random h (channels_last), its spatial mean pooled (N, C), and x_in when residual."""
    size = (batch, shape.channels, shape.size, shape.size)
    h = torch.randn(size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    pooled = h.mean((2, 3))
    x_in = None
    if shape.residual:
        x_in = torch.randn(batch, shape.out, shape.size, shape.size, device=device, dtype=dtype)
        x_in = x_in.contiguous(memory_format=torch.channels_last)
    return h, pooled, x_in


def step_fn(
    module: nn.Module,
    mode: str,
    shape: SEProjectShape,
    h: torch.Tensor,
    pooled: torch.Tensor,
    x_in: Optional[torch.Tensor],
) -> Callable[[], object]:
    """The timed call: forward under no_grad (infer), or forward + backward to h, x_in and the
    parameters (train) with a random gradient of the (N, O, H, W) output."""
    module.train(mode == "train")
    if mode == "infer":

        def infer():
            with torch.no_grad():
                return module(h, pooled, x_in)

        return infer
    h = h.detach().requires_grad_(True)
    x_in = None if x_in is None else x_in.detach().requires_grad_(True)
    inputs = [t for t in (h, x_in) if t is not None] + list(module.parameters())
    dy = torch.randn(h.shape[0], shape.out, *h.shape[2:], device=h.device, dtype=h.dtype)
    dy = dy.contiguous(memory_format=torch.channels_last)

    def train():
        return torch.autograd.grad(module(h, pooled, x_in), inputs, dy)

    return train


def run(shapes: list[SEProjectShape], providers: list[str], setting: KernelSetting, out: Optional[Path]) -> list[dict]:
    """Time every (shape, mode, provider), rows into the CSV ``out`` (if any) as they come."""

    def case(shape: SEProjectShape):
        inputs = make_inputs(shape, setting.device, setting.dtype, setting.batch)
        modules = make_modules(shape, setting.compile_mode, setting.device, setting.dtype)
        return (lambda provider, mode: step_fn(modules[provider], mode, shape, *inputs),
                lambda mode: floor_bytes(shape, mode, inputs[0].element_size(), setting.batch))  # fmt: skip

    return kernel_shape_rows("se_project", shapes, providers, FUSED, MODES, setting, RESOLUTION, case, out)


def parse_args(argv=None) -> argparse.Namespace:
    out_help = "CSV path (default bench/results/se_project_<gpu>.csv); '-': stdout"
    return kernel_bench_parser(__doc__, PROVIDERS, out_help).parse_args(argv)


def selected_shapes(quick: bool, smoke: bool = False) -> list[SEProjectShape]:
    if smoke:
        return SMOKE_SHAPES
    shapes = se_project_shapes(VARIANT)
    if not quick:
        return shapes
    # the first block (no residual, O = C / 2), the largest h (a residual block) and the last
    # (widest C, the longest GEMM reduction)
    largest = max(shapes, key=lambda s: s.channels * s.size**2)
    return list(dict.fromkeys([shapes[0], largest, shapes[-1]]))


def main(argv=None) -> None:
    args = parse_args(argv)
    shapes = selected_shapes(args.quick, args.smoke)
    if args.list_shapes:
        print(f"EfficientNet-{VARIANT.upper()} SE + projection shapes at {RESOLUTION}x{RESOLUTION}, batch {BATCH}:")
        for s in shapes:
            print(f"  {s.name:26s} channels={s.channels} squeeze={s.squeeze} out={s.out} "
                  f"size={s.size}x{s.size} residual={s.residual}")  # fmt: skip
        return
    setting = KernelSetting.from_args(args, BATCH, DTYPE)
    providers = select_providers(args.providers, PROVIDERS, FUSED, args.smoke)
    out = args.out or Path(__file__).parent / "results" / f"se_project_{slug(environment(setting.device)['gpu'])}.csv"
    to_stdout = str(out) == "-"  # the CSV in the log: one file fewer to bring back from a GPU run
    rows = run(shapes, providers, setting, out=None if to_stdout else out)
    print(kernel_table(rows, providers))
    if to_stdout:
        print()
        writer = csv.DictWriter(sys.stdout, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return
    write_rows(out, rows, append=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
