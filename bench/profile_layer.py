"""Where one fused layer spends its time, kernel by kernel: a B5 layer shape of bench_dwconv
(depthwise conv + BN + SiLU) or bench_se_project (SE + projection), each provider's inference or
training step under torch.profiler, device time per kernel side by side. The per-kernel figures
behind those benchmarks' ratios (which pass of a fused op dominates).

    python bench/profile_layer.py --op dwconv --shape c144_k3_s2_h228 --providers cuda,triton,eager
    python bench/profile_layer.py --op se_project --shape c3072_r128_o512_h15_res --providers triton,eager
    python bench/profile_layer.py --smoke      # CPU, one small shape: operator times
    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        python bench/profile_layer.py --ncu --providers triton,eager    # hardware counters instead

With ``--ncu`` each provider's step runs once more after its warm-up, between cudaProfilerStart
and cudaProfilerStop, and nothing else is timed: under Nsight Compute started with
``--profile-from-start off`` only that step's kernels are profiled (the autotuner's timing runs
and the warm-up are not), and torch.profiler stays off (its CUPTI session would clash with ncu's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable

import torch  # noqa: E402

import fused_mbconv  # noqa: E402
from bench.bench_dwconv import BATCH, DTYPE, MODES  # noqa: E402
from bench.common import KernelSetting  # noqa: E402
from bench.profile_host import layer_steps  # noqa: E402
from bench.profile_model import kernel_times, table  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=("dwconv", "se_project"), default="dwconv")
    p.add_argument("--shape", default=None, help="a --list-shapes name of that op's benchmark (default: the largest)")
    p.add_argument("--providers", default="cuda,triton,eager", help="comma-separated fused backends and eager")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    p.add_argument("--smoke", action="store_true", help="CPU, one small shape")
    p.add_argument("--ncu", action="store_true", help="run one step per provider for Nsight Compute (see above)")
    args = p.parse_args(argv)
    timing = argparse.Namespace(smoke=args.smoke, quick=True, compile_mode="default")
    setting = KernelSetting.from_args(timing, BATCH, DTYPE)
    name, fused, make = layer_steps(args.op, setting, args.shape, default="largest")
    if args.ncu and setting.device.type != "cuda":
        p.error("--ncu: needs a CUDA device (Nsight Compute profiles GPU kernels)")
    providers = [p for p in args.providers.split(",") if p == "eager" or p in fused]
    for mode in args.modes.split(","):
        times = {}
        for provider in providers:
            with fused_mbconv.backend(provider if provider in fused else "reference"):
                step = make(provider, mode)
                for _ in range(2):  # compile, autotune
                    step()
                if args.ncu:
                    print(f"ncu: {name} {mode} {provider}", flush=True)
                    _under_the_profiler(step)
                else:
                    times[provider] = kernel_times(step, setting.device, args.steps)
        if not args.ncu:
            print(f"## {name} {mode}, batch {setting.batch}, {setting.dtype}, channels_last\n")
            print(table(times, top=8, what="kernel" if setting.device.type == "cuda" else "operator"))


def _under_the_profiler(step) -> None:
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
