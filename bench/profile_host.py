"""Where the host's time goes when it issues one fused layer's call: Python's profiler over many
calls of bench_dwconv's or bench_se_project's timed step (after warm-up), the functions that
take the most time themselves. On the H200 the host took 2.3 ms to issue one training step of the
triton depthwise layer whose kernels run 1.7 ms (bench/results/2026-11-26_h200_host_share.md):
this says which layer of the stack (module, our launch code, Triton's launcher, torch ops) that
time is spent in. (Calls through torch.library's dispatcher hide the op body's functions: the
TorchDynamo-disabling wrapper around a custom op's kernel defeats cProfile, which then books
all of it to ``backend_impl``. Plain eager calls take the ops' fast path and show them.)

    python bench/profile_host.py --op dwconv --providers triton,cuda,eager --modes train
    python bench/profile_host.py --op se_project --smoke     # CPU, one small shape
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable

import fused_mbconv  # noqa: E402
from bench import bench_dwconv, bench_se_project  # noqa: E402
from bench.common import KernelSetting  # noqa: E402


def layer_steps(op: str, setting: KernelSetting, shape_name: str | None, default: str = "first"):
    """(shape name, fused providers, make(provider, mode) -> step function) of one B5 layer shape
    of ``op``'s benchmark (its quick list on a GPU, its smoke shape on the CPU); no name: the
    list's first, or with ``default="largest"`` its largest. Shared with profile_layer.py."""
    bench = bench_dwconv if op == "dwconv" else bench_se_project
    on_gpu = setting.device.type == "cuda"
    shapes = bench.selected_shapes(quick=shape_name is None, smoke=not on_gpu)
    if shape_name is None:
        shape = shapes[0] if default == "first" else max(shapes, key=lambda s: s.channels * s.size**2)
    else:
        shape = next((s for s in shapes if s.name == shape_name), None)
    if shape is None:
        raise SystemExit(f"--shape: no {shape_name!r}; choose from {[s.name for s in shapes]}")
    if op == "dwconv":
        size = (setting.batch, shape.channels, shape.size, shape.size)
        x = torch.randn(size, device=setting.device, dtype=setting.dtype).contiguous(memory_format=torch.channels_last)
        modules = bench_dwconv.make_modules(shape, setting)

        def make(provider, mode):
            return bench_dwconv.step_fn(modules[provider], mode, x, bench_dwconv.output_size(shape))

        return shape.name, bench_dwconv.FUSED, make
    inputs = bench_se_project.make_inputs(shape, setting.device, setting.dtype, setting.batch)
    modules = bench_se_project.make_modules(shape, setting.compile_mode, setting.device, setting.dtype)
    return shape.name, bench_se_project.FUSED, lambda p, m: bench_se_project.step_fn(modules[p], m, shape, *inputs)


def host_profile(fn, device: torch.device, calls: int, top: int) -> str:
    """Median host time of one call (from a synchronized start until it returns), then the
    profile of ``calls`` calls: the ``top`` functions by their own time."""
    for _ in range(3):  # compile, autotune, warm caches
        fn()
    issue = []
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        issue.append((time.perf_counter() - start) * 1e6)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime")
    stats.print_stats(top)
    body = text.getvalue()
    body = body[body.find("   ncalls") :]  # the table only
    return f"host time per call: median {sorted(issue)[len(issue) // 2]:.0f} us (unprofiled)\n{body}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=("dwconv", "se_project"), default="dwconv")
    p.add_argument("--shape", default=None, help="a --list-shapes name of that op's benchmark (default: its first)")
    p.add_argument("--providers", default="triton,eager")
    p.add_argument("--modes", default="infer,train")
    p.add_argument("--calls", type=int, default=50, help="profiled calls (after 3 warm-up calls)")
    p.add_argument("--top", type=int, default=25, help="functions listed per profile")
    p.add_argument("--smoke", action="store_true", help="CPU, one small shape")
    args = p.parse_args(argv)
    timing = argparse.Namespace(smoke=args.smoke, quick=True, compile_mode="default")
    setting = KernelSetting.from_args(timing, bench_dwconv.BATCH, bench_dwconv.DTYPE)
    name, fused, make = layer_steps(args.op, setting, args.shape)
    for mode in args.modes.split(","):
        for provider in args.providers.split(","):
            with fused_mbconv.backend(provider if provider in fused else "reference"):
                report = host_profile(make(provider, mode), setting.device, args.calls, args.top)
            print(f"## {args.op} {name} {mode} {provider}, batch {setting.batch}, {setting.dtype}\n\n{report}")


if __name__ == "__main__":
    main()
