"""Peak memory of an EfficientNet training step, fused vs eager torchvision, without a GPU.

The step (forward, backward, SGD with momentum; bf16 weights as the GPU benchmark's) runs on
PyTorch's "meta" device: every tensor has its real size and no data, so B7 at 600x600 takes
seconds and no memory. torch's MemTracker follows each storage from the op that makes it to the
moment it is freed and keeps the peak of the live bytes, split into parameters, gradients,
optimizer state, activations (what autograd keeps for the backward) and temporaries.

What it does not see: memory inside one op (cuDNN's workspaces; the fused ops' transient
buffers, at most one output-sized tensor each, while that op runs) and the CUDA caching
allocator's rounding. Against the GPU: eager B5, batch 16, 456x456, bf16, modelled 10114 MB;
measured on the H200 10364 MB (torch.cuda.max_memory_allocated, bench/results/
2026-11-26_h200_run3_model.csv).

    python bench/memory_model.py         # B0-B7, native resolution, the GPU benchmark's training batches
    python bench/memory_model.py --variants b5 --batch 16 --resolution 456
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable

import fused_mbconv  # noqa: E402
from fused_mbconv.models import VARIANTS  # noqa: E402

MB = 2**20
KINDS = ("Parameter", "Gradient", "Optstate", "Activation", "Temp")


def meta_model_and_input(model_name: str, variant: str, batch: int, resolution: int, dtype=torch.bfloat16):
    """``model_name`` "eager" (torchvision's) or "fused" EfficientNet ``variant`` on the meta
    device in ``dtype``, and a channels_last batch of images for it."""
    import torchvision

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the dtype: meta modules cannot be converted afterwards
    try:
        with torch.device("meta"):
            if model_name == "eager":
                model = getattr(torchvision.models, f"efficientnet_{variant}")()
            else:
                model = fused_mbconv.models.create_efficientnet(variant)
    finally:
        torch.set_default_dtype(previous)
    x = torch.randn(batch, 3, resolution, resolution, device="meta", dtype=dtype)
    return model, x.contiguous(memory_format=torch.channels_last)


def training_peak(model_name: str, variant: str, batch: int, resolution: int, dtype=torch.bfloat16) -> dict[str, float]:
    """Live bytes (MB) by kind at the peak of a training step's second iteration (the first
    creates the gradients and the optimizer's state), ``model_name`` "eager" or "fused"."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model, x = meta_model_and_input(model_name, variant, batch, resolution, dtype)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        for step in range(2):
            model(x).float().sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == 0:
                tracker.reset_mod_stats()
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    out = {str(getattr(kind, "value", kind)): n / MB for kind, n in peak.items()}
    return {kind: out.get(kind, 0.0) for kind in (*KINDS, "Total")}


def main(argv=None) -> None:
    from bench.__main__ import GPU_BATCH

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, e.g. b0,b5")
    p.add_argument("--batch", type=int, help="default: the GPU benchmark's training batch per variant")
    p.add_argument("--resolution", type=int, help="default: each variant's native resolution")
    args = p.parse_args(argv)
    print("| variant | batch | resolution | eager MB (activations) | fused MB (activations) | fused / eager |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        batch = args.batch or GPU_BATCH[variant][1]
        resolution = args.resolution or VARIANTS[variant].resolution
        eager = training_peak("eager", variant, batch, resolution)
        fused = training_peak("fused", variant, batch, resolution)
        cells = [f"{m['Total']:.0f} ({m['Activation']:.0f})" for m in (eager, fused)]
        print(f"| {variant} | {batch} | {resolution} | {' | '.join(cells)} | {fused['Total'] / eager['Total']:.2f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
