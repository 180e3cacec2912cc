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

fp32's own rounding (2^-24) is left out: TF32's (2^-11) dominates. ``--train`` also compares the
running statistics after one training-mode forward (parity.compare_all, as the models step).

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

from fused_mbconv import parity  # noqa: E402
from fused_mbconv.__main__ import SEED, randomize_batch_norm_  # noqa: E402
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


def emulated(model: nn.Module, rounding: dict[str, str]) -> nn.Module:
    """A float64 copy of ``model`` whose convs round their operands to TF32 by ``rounding``."""
    model = copy.deepcopy(model).double()
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            mode = rounding[conv_role(name, conv)]

            def forward(x, conv=conv, mode=mode):
                w = to_tf32(conv.weight, mode)
                return F.conv2d(to_tf32(x, mode), w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

            conv.forward = forward
    return model


def running_statistics(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The BN buffers after one training-mode forward (the models step's seeded masks)."""
    model.train()
    torch.manual_seed(SEED)
    with torch.no_grad():
        model(x)
    return {n: b for n, b in model.named_buffers() if b.is_floating_point()}


def main(argv=None) -> None:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="b0", choices=list(VARIANTS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train", action="store_true", help="also the running statistics of a training forward")
    args = p.parse_args(argv)
    # as python -m fused_mbconv builds them: the same generator draws the BN values, then the input
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    tv = randomize_batch_norm_(getattr(torchvision.models, f"efficientnet_{args.variant}")(), generator)
    size = VARIANTS[args.variant].resolution
    x = torch.randn(args.batch, 3, size, size, generator=generator).double()
    models = {name: emulated(tv, rounding) for name, rounding in IMPLEMENTATIONS.items()}
    with torch.no_grad():
        logits = {name: m.eval()(x) for name, m in models.items()}
    print(f"EfficientNet-{args.variant.upper()}, batch {args.batch}, {size}x{size}: eval logits, max |error| vs exact")
    for name in list(IMPLEMENTATIONS)[1:]:
        print(f"  {name}: {(logits[name] - logits['exact']).abs().max().item():.3g}")
    if args.train:
        stats = {name: running_statistics(m, x) for name, m in models.items()}
        for name in ("fused, truncated", "fused, rounded"):
            checks = parity.compare_all(stats[name], stats["eager (cuDNN)"], stats["exact"], torch.float32)
            print(f"  running statistics, {name}: worst {parity.worst(checks)}")


if __name__ == "__main__":
    main()
