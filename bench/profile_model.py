"""Where a model's step spends its time, kernel by kernel: torch.profiler over a few steps (after
warm-up), device time summed per kernel name, for each provider side by side. The per-kernel
figures behind the model benchmark's ratios (which fused kernel, which eager kernel dominates).

    python bench/profile_model.py --variant b5 --mode train --batch 16           # GPU
    python bench/profile_model.py --variant b0 --resolution 64 --batch 2 --steps 1  # CPU: op times

On the CPU (no kernels) it reports the time of each operator itself instead.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable

import fused_mbconv  # noqa: E402
from bench.__main__ import DTYPES, PROVIDERS, batch_size, build_models, step_function  # noqa: E402
from fused_mbconv.models import VARIANTS  # noqa: E402


def kernel_times(fn, device: torch.device, steps: int) -> dict[str, tuple[float, int]]:
    """{kernel (or, on the CPU, operator) name: (ms per step, calls per step)} over ``steps``
    calls of ``fn``, each name's own time (not its children's)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            totals[event.key][0] += us / 1e3 / steps
            totals[event.key][1] += event.count / steps
    return {name: (ms, round(calls)) for name, (ms, calls) in totals.items()}


def table(times: dict[str, dict[str, tuple[float, int]]], top: int, what: str = "kernel") -> str:
    """Markdown: per provider, its ``top`` kernels (``what``) by time, with their share of the step."""
    lines = []
    for provider, by_kernel in times.items():
        total = sum(ms for ms, _ in by_kernel.values())
        lines += [f"### {provider}: {total:.2f} ms of {what} time per step", "",
                  f"| {what} | ms / step | calls / step | share |", "|---|---|---|---|"]  # fmt: skip
        ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])
        for name, (ms, calls) in ranked[:top]:
            short = name if len(name) <= 80 else name[:77] + "..."
            lines.append(f"| `{short}` | {ms:.3f} | {calls} | {100 * ms / total:.1f}% |")
        rest = sum(ms for _, (ms, _) in ranked[top:])
        share = 100 * rest / max(total, 1e-9)
        lines += [f"| (the other {max(0, len(ranked) - top)}) | {rest:.3f} | | {share:.1f}% |", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="b5" if on_gpu else "b0", choices=list(VARIANTS))
    p.add_argument("--providers", default="eager,fused-triton", help=f"comma-separated subset of {sorted(PROVIDERS)}")
    p.add_argument("--mode", default="train", choices=["infer", "train"])
    p.add_argument("--dtype", default="bf16" if on_gpu else "fp32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=None, help="default: the model benchmark's")
    p.add_argument("--resolution", type=int, default=None, help="default: native on GPU, 64 on CPU")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--top", type=int, default=15, help="kernels listed per provider")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    providers = [p for p in args.providers.split(",") if p]
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise SystemExit(f"--providers: unknown {sorted(unknown)}; choose from {sorted(PROVIDERS)}")
    resolution = args.resolution or (VARIANTS[args.variant].resolution if device.type == "cuda" else 64)
    batch = batch_size(args, args.variant, args.mode, device)
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=DTYPES[args.dtype])
    x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    models = build_models(args.variant, providers, device, DTYPES[args.dtype], channels_last=True)
    times = {}
    for provider, model in models.items():
        with fused_mbconv.backend(PROVIDERS[provider][2] or "auto"):
            step = step_function(model, args.mode, x, labels)
            for _ in range(3):  # compile, autotune, settle the allocator
                step()
            times[provider] = kernel_times(step, device, args.steps)
    print(f"## efficientnet_{args.variant} {args.mode}, batch {batch}, {resolution}x{resolution}, {args.dtype}, "
          f"channels_last, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}\n")  # fmt: skip
    print(table(times, args.top, "kernel" if device.type == "cuda" else "operator"))


if __name__ == "__main__":
    main()
