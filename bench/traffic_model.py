"""The memory traffic and kernel count of an EfficientNet step, eager torchvision vs the fused
model on the "reference" backend, without a GPU.

Why: "auto" once kept training on CUDA on the reference ops (bench/results/
2026-11-27_cpu_auto_training.md), taking them for eager PyTorch's speed. They are not: the
reference computes in fp32 with one torch op per formula term. This counts what a step would
cost a GPU, from the torch ops it runs on the meta device (real sizes, no data): each op that
launches a kernel (not views, allocations or metadata) reads its tensor arguments and writes its
outputs once (an ideal, cache-free traffic: a lower bound on the bytes the GPU moves), and the
number of such ops (what the host issues, one launch each). The fused ops' bodies run in place
of their fake implementations, so the reference's torch ops are counted; the Triton kernels
cannot run on the meta device and are not modelled.

    python bench/traffic_model.py                                   # B5, batch 16, 456, bf16, train
    python bench/traffic_model.py --variant b0 --batch 64 --modes infer,train --dtype fp32 --top 8
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable

import fused_mbconv  # noqa: E402
from bench.host_cost import NOT_KERNELS, op_bodies  # noqa: E402
from bench.memory_model import meta_model_and_input  # noqa: E402

GiB = 2**30


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CountTraffic(TorchDispatchMode):
    """Per aten op: kernels launched and ideal bytes (tensor arguments read once, outputs written
    once; an in-place copy reads its source and writes its destination)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter = collections.Counter()
        self.kernels: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if not any(part in name for part in NOT_KERNELS):
            ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            outs = [a for a in tree_leaves(out) if isinstance(a, torch.Tensor)]
            if func is torch.ops.aten.copy_.default:
                outs = ins[:1]  # destination written; its old contents are not read
                ins = ins[1:]
            self.bytes[name] += sum(map(_nbytes, ins)) + sum(map(_nbytes, outs))
            self.kernels[name] += 1
        return out


def step_traffic(provider: str, variant: str, batch: int, resolution: int, dtype: torch.dtype,
                 mode: str) -> CountTraffic:  # fmt: skip
    """The counts of one step (``mode`` "infer": a forward without autograd; "train": forward and
    backward) of ``provider`` "eager" (torchvision) or "reference" (the fused model on that
    backend)."""
    model, x = meta_model_and_input("eager" if provider == "eager" else "fused", variant, batch, resolution, dtype)
    model.train(mode == "train")
    with fused_mbconv.backend("reference"), op_bodies(), CountTraffic() as counts:
        if mode == "train":
            model(x).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="b5")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, help="default: the variant's native resolution")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--modes", default="train", help="comma-separated: infer, train")
    p.add_argument("--top", type=int, default=0, help="also list each provider's ops that move the most bytes")
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    resolution = args.resolution or fused_mbconv.models.VARIANTS[args.variant].resolution
    print(f"EfficientNet-{args.variant.upper()}, batch {args.batch}, {resolution}x{resolution}, {args.dtype}, "
          "channels_last; meta device, ideal traffic (a kernel reads its inputs, writes its outputs once)")
    print("| mode | provider | traffic GiB | kernels | traffic / eager | kernels / eager |")
    print("|---|---|---|---|---|---|")
    listed = []
    for mode in args.modes.split(","):
        eager = None
        for provider in ("eager", "reference"):
            counts = step_traffic(provider, args.variant, args.batch, resolution, dtype, mode)
            total, kernels = sum(counts.bytes.values()), sum(counts.kernels.values())
            eager = eager or (total, kernels)
            print(f"| {mode} | {provider} | {total / GiB:.2f} | {kernels} | {total / eager[0]:.2f} | "
                  f"{kernels / eager[1]:.2f} |", flush=True)  # fmt: skip
            listed.append((mode, provider, counts))
    for mode, provider, counts in listed if args.top else ():
        print(f"\n{mode}, {provider}: the ops that move the most bytes")
        for name, n in counts.bytes.most_common(args.top):
            print(f"    {n / GiB:8.2f} GiB  {counts.kernels[name]:5d} x {name}")


if __name__ == "__main__":
    main()
