"""The fp32 models step's TF32 rounding, emulated in float64 on the CPU: how far eager cuDNN's and
the fused GEMMs' TF32 operands put an EfficientNet's eval logits from the exact ones.

On the H200 every variant's fp32 eval logits failed `python -m fused_mbconv`'s check (fused error
3.5-4.5x eager's, bench/results/2026-11-27_h200_models_sweep.md), blamed on Triton's "tf32" dot
truncating fp32 operands where cuDNN rounds them. This tests that explanation without a GPU: the
models step's torchvision model, weights and input (same seeds), computed in float64 with each
conv's input and weight first rounded to TF32 as one implementation would:

- eager: every conv on tensor cores (stem, 1x1 expansion and projection, SE's FCs, head) rounds
  to nearest; depthwise convs (no tensor cores) and the classifier (matmul TF32 off) stay exact;
- fused, truncated (Triton's "tf32" dot before a645af2) or rounded (after): the 1x1 expansion,
  projection and head convs (fused_mbconv's GEMMs) truncate or round; SE's FCs are exact (the
  excite kernel's IEEE dots); the stem is eager's.

The backward rounds as the forward: cuDNN's data and weight gradients of a TF32 conv take TF32
operands (the output gradient and the weight, or the input), and so do the fused GEMMs' dx and
dweight GEMMs (``_triton.dot`` with the forward's precision); depthwise and SE stay exact.

fp32's own rounding (2^-24) is left out: TF32's (2^-11) dominates. ``--train`` also runs the
models step's training step (same seeds, masks and labels) and checks its logits, every gradient
and the running statistics as that step does (its `training_checks`).

    python bench/tf32_emulation.py --variant b0 --batch 8    # the models step's batch for B0-B3
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `fused_mbconv` importable

from fused_mbconv.__main__ import SEED, Runner, randomize_batch_norm_, training_checks  # noqa: E402
from fused_mbconv.models import VARIANTS  # noqa: E402

TF32_DROPPED_BITS = 0x1FFF  # fp32 keeps 23 mantissa bits, TF32 10: the low 13 go


def to_tf32(t: torch.Tensor, rounding: str) -> torch.Tensor:
    """``t`` (float64 holding fp32 values) rounded to TF32: "nearest" (ties away, cvt.rna),
    "truncate", or "exact" (unchanged). Infinities and NaN stay."""
    if rounding == "exact":
        return t
    bits = t.float().view(torch.int32)
    if rounding == "nearest":
        bits = bits + (TF32_DROPPED_BITS + 1) // 2  # a carry into the exponent is the rounding up
    rounded = (bits & ~TF32_DROPPED_BITS).view(torch.float32).double()
    return torch.where(t.isfinite(), rounded, t)


def conv_role(name: str, conv: nn.Conv2d) -> str:
    """Which implementation runs ``conv`` (a torchvision EfficientNet module name): "depthwise",
    "stem", "se", or "gemm" (1x1 expansion, projection and head: fused_mbconv's GEMMs)."""
    if conv.groups > 1:
        return "depthwise"
    if name.startswith("features.0."):
        return "stem"
    return "se" if ".fc" in name else "gemm"


IMPLEMENTATIONS = {  # role -> rounding of the operands
    "exact": dict(depthwise="exact", stem="exact", se="exact", gemm="exact"),
    "eager (cuDNN)": dict(depthwise="exact", stem="nearest", se="nearest", gemm="nearest"),
    "fused, truncated": dict(depthwise="exact", stem="nearest", se="exact", gemm="truncate"),
    "fused, rounded": dict(depthwise="exact", stem="nearest", se="exact", gemm="nearest"),
}


class _RoundedConv(torch.autograd.Function):
    """conv2d whose forward and both backward products take operands rounded by ``mode``."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv: nn.Conv2d, mode: str):
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.mode, ctx.has_bias = conv, mode, bias is not None
        return F.conv2d(to_tf32(x, mode), to_tf32(weight, mode), bias, conv.stride, conv.padding, conv.dilation,
                        conv.groups)  # fmt: skip

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        conv, mode = ctx.conv, ctx.mode
        args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        dy_r = to_tf32(dy, mode)
        dx = torch.nn.grad.conv2d_input(x.shape, to_tf32(weight, mode), dy_r, *args)
        dw = torch.nn.grad.conv2d_weight(to_tf32(x, mode), weight.shape, dy_r, *args)
        return dx, dw, dy.sum((0, 2, 3)) if ctx.has_bias else None, None, None


def emulated(model: nn.Module, rounding: dict[str, str]) -> nn.Module:
    """A float64 copy of ``model`` whose convs round their operands to TF32 by ``rounding``,
    forward and backward."""
    model = copy.deepcopy(model).double()
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            mode = rounding[conv_role(name, conv)]
            conv.forward = lambda x, conv=conv, mode=mode: _RoundedConv.apply(x, conv.weight, conv.bias, conv, mode)
    return model


def training_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(logits, gradients, BN buffers) of the models step's training step (its seeded masks)."""
    return Runner(torch.device("cpu"), torch.float64, channels_last=False).train_step(model, x, labels, torch.float64)


def main(argv=None) -> None:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="b0", choices=list(VARIANTS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train", action="store_true",
                   help="also the models step's training step: logits, gradients, running statistics")
    args = p.parse_args(argv)
    # as python -m fused_mbconv builds them: the same generator draws the BN values, then the input
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    tv = randomize_batch_norm_(getattr(torchvision.models, f"efficientnet_{args.variant}")(), generator)
    size = VARIANTS[args.variant].resolution
    x = torch.randn(args.batch, 3, size, size, generator=generator).double()
    labels = torch.randint(0, 1000, (args.batch,), generator=generator)
    models = {name: emulated(tv, rounding) for name, rounding in IMPLEMENTATIONS.items()}
    with torch.no_grad():
        logits = {name: m.eval()(x) for name, m in models.items()}
    print(f"EfficientNet-{args.variant.upper()}, batch {args.batch}, {size}x{size}: eval logits, max |error| vs exact")
    for name in list(IMPLEMENTATIONS)[1:]:
        print(f"  {name}: {(logits[name] - logits['exact']).abs().max().item():.3g}")
    if args.train:
        steps = {name: training_step(m, x, labels) for name, m in models.items()}
        for name in ("fused, truncated", "fused, rounded"):
            print(f"  training step, {name}:")
            for check in training_checks(steps[name], steps["eager (cuDNN)"], steps["exact"], torch.float32):
                print(f"    {check}")


if __name__ == "__main__":
    main()
