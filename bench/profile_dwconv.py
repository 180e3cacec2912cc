"""Where a fused depthwise conv + BN + SiLU layer spends its time, kernel by kernel: one B5 layer
shape (bench_dwconv's), each provider's inference or training step under torch.profiler, device
time per kernel side by side. The per-kernel figures behind bench_dwconv's ratios (which pass of
the fused op dominates: statistics, apply, backward sums, dx + dweight).

    python bench/profile_dwconv.py --shape c144_k3_s2_h228 --providers cuda,triton,eager
    python bench/profile_dwconv.py --smoke      # CPU, one small shape: operator times
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable

import fused_mbconv  # noqa: E402
from bench.bench_dwconv import (  # noqa: E402
    BATCH,
    DTYPE,
    FUSED,
    MODES,
    PROVIDERS,
    make_modules,
    output_size,
    selected_shapes,
    step_fn,
)
from bench.common import KernelSetting, select_providers  # noqa: E402
from bench.profile_model import kernel_times, table  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=None, help="a bench_dwconv --list-shapes name (default: the largest)")
    p.add_argument("--providers", default="cuda,triton,eager", help=f"comma-separated subset of {PROVIDERS}")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    p.add_argument("--smoke", action="store_true", help="CPU, one small shape")
    args = p.parse_args(argv)
    timing = argparse.Namespace(smoke=args.smoke, quick=True, compile_mode="default")
    setting = KernelSetting.from_args(timing, BATCH, DTYPE)
    shapes = selected_shapes(quick=False, smoke=args.smoke)
    if args.shape is None:
        shape = max(shapes, key=lambda s: s.channels * s.size**2)
    else:
        shape = next((s for s in shapes if s.name == args.shape), None)
    if shape is None:
        raise SystemExit(f"--shape: no {args.shape!r}; choose from {[s.name for s in shapes]}")
    providers = [name for name in select_providers(args.providers, PROVIDERS, FUSED, args.smoke) if name != "compile"]
    x = torch.randn(setting.batch, shape.channels, shape.size, shape.size, device=setting.device, dtype=setting.dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    modules = make_modules(shape, setting)
    for mode in args.modes.split(","):
        times = {}
        for provider in providers:
            with fused_mbconv.backend(provider if provider in FUSED else "reference"):
                step = step_fn(modules[provider], mode, x, output_size(shape))
                for _ in range(2):  # compile, autotune
                    step()
                times[provider] = kernel_times(step, setting.device, args.steps)
        print(f"## {shape.name} {mode}, batch {setting.batch}, {setting.dtype}, channels_last\n")
        print(table(times, top=8, what="kernel" if setting.device.type == "cuda" else "operator"))


if __name__ == "__main__":
    main()
