"""The model benchmark: EfficientNet B0-B7, eager torchvision vs torch.compile vs the fused model.

    python -m bench                          # GPU: all variants at native resolution; CPU: a small run
    python -m bench --variants b5 --batch 32 --modes infer --providers eager,compile-max-autotune,fused
    python -m bench --report-only bench/results/models_h100.csv

Each (variant, provider, mode) row: img/s (median over repeats, after warm-up, random data),
median/p20/p80 ms per step, peak memory (CUDA), appended to a CSV with the columns of
bench/common.py; then a markdown report with speedup tables and PNG plots (bench/report.py).
A configuration that runs out of memory is recorded with status "oom" and the sweep goes on.
The torch.compile providers run after every variant's other providers, so that a time budget
cuts compilations, not variants; on a GPU only B5 (the targets' variant) is compiled unless
--compile-variants names more (each compile takes minutes: all of B0-B7 do not fit one session).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import fused_mbconv
from bench import report
from bench.common import (
    COMPILE_CONV_BACKENDS_HELP,
    DTYPES,
    environment,
    measure,
    set_compile_conv_backends,
    slug,
    write_rows,
)
from fused_mbconv.models import VARIANTS

GRAPHED = "cuda-graph"  # PROVIDERS' "compile mode" of the CUDA-graph providers (not torch.compile)
PROVIDERS = {
    # name: (builds on the fused model?, torch.compile mode or None, fused backend or None)
    "eager": (False, None, None),
    "compile": (False, "default", None),
    "compile-max-autotune": (False, "max-autotune-no-cudagraphs", None),
    "fused": (True, None, "auto"),
    "fused-triton": (True, None, "triton"),
    "fused-cuda": (True, None, "cuda"),
    # the reference ops (fp32, a torch op per term; "auto" trained on them until 2026-11-27):
    # bench/traffic_model.py counts 6.6x eager's traffic in B5's bf16 training step
    "fused-reference": (True, None, "reference"),
    "fused+compile": (True, "default", "auto"),
    # a user's one line for CUDA graphs: inductor fuses the eager glue (stem, head, residual
    # adds) around the fused ops and cudagraph trees replay the step
    "fused+compile-reduce-overhead": (True, "reduce-overhead", "auto"),
    # "+graph": the step's forward (and backward) captured once in a CUDA graph and replayed
    # (GRAPHED), no compiler: the host's per-op work is gone, the kernels' time is left. On the
    # H200 the host took longer to issue a fused layer than its kernels ran (bench/results/
    # 2026-11-26_h200_host_share.md); torch.compile's max-autotune replays graphs as well.
    "eager+graph": (False, GRAPHED, None),
    "fused-triton+graph": (True, GRAPHED, "triton"),
    "fused-cuda+graph": (True, GRAPHED, "cuda"),
}
# (inference, training) batch per variant on the GPU, sized so B0-B7 together fit the device time
# of one session (B5's are the targets': 32 and 16); the biggest variants also get fewer timed
# repeats.
GPU_BATCH = {"b0": (64, 64), "b1": (64, 64), "b2": (48, 48), "b3": (32, 32), "b4": (32, 16), "b5": (32, 16),
             "b6": (16, 8), "b7": (16, 8)}  # fmt: skip
GPU_REPEATS = {"b6": 5, "b7": 5}


def build_models(variant: str, providers: list[str], device, dtype, channels_last: bool) -> dict[str, Callable]:
    """One model per provider, every one with the same random weights as torchvision's."""
    import torchvision

    reference = getattr(torchvision.models, f"efficientnet_{variant}")(weights=None)
    state = reference.state_dict()
    models = {}
    for name in providers:
        fused, compile_mode, _ = PROVIDERS[name]
        if fused:
            model = fused_mbconv.models.create_efficientnet(variant)
        else:
            model = getattr(torchvision.models, f"efficientnet_{variant}")()
        model.load_state_dict(state)
        model = model.to(device, dtype)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        compiled = compile_mode is not None and compile_mode != GRAPHED
        models[name] = torch.compile(model, mode=compile_mode) if compiled else model
    return models


def step_function(model, mode: str, x: torch.Tensor, labels: torch.Tensor, graphed: bool = False) -> Callable[[], None]:
    """One timed step: inference under no_grad, or a training step (forward, cross-entropy,
    backward, SGD with momentum). ``graphed``: the forward (and backward) are captured in CUDA
    graphs after warm-up calls (compiling, autotuning) and replayed; the optimizer stays eager."""
    if graphed:
        return _graphed_step(model, mode, x, labels)
    if mode == "infer":
        model.eval()

        def infer():
            with torch.no_grad():
                model(x)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
        loss.backward()
        optimizer.step()

    return train


def _graphed_step(model, mode: str, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    if mode == "infer":
        model.eval()

        def forward(inp):
            with torch.no_grad():
                return model(inp)

        # a replay copies the batch in, as a user's would (since 2026-11-28; B5 at 32: 40 MB, ~0.02 ms)
        run = fused_mbconv.cuda_graphed(forward, x)
        return lambda: run(x)
    model.train()
    graphed = torch.cuda.make_graphed_callables(model, (x,), num_warmup_iters=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(graphed(x).float(), labels).backward()
        optimizer.step()

    return train


def batch_size(args: argparse.Namespace, variant: str, mode: str, device: torch.device) -> int:
    if args.batch:
        return args.batch
    if device.type != "cuda":
        return 2
    infer, train = GPU_BATCH[variant]
    return infer if mode == "infer" else train


def _peak_memory_mb(device: torch.device, graphed: bool) -> float:
    """Peak memory of the timed steps (reset after the first). A CUDA graph's private pool leaves
    the allocator's allocated statistics once captured (on the H200, 2026-11-27, eager B5's
    training step "peaked" at 676 MB replayed from graphs, 10485 MB called eagerly), so graph rows
    report the peak reserved memory, which holds the pool."""
    if device.type != "cuda":
        return float("nan")
    peak = torch.cuda.max_memory_allocated(device)
    if graphed:
        peak = max(peak, torch.cuda.max_memory_reserved(device))
    return peak / 2**20


def row_of(variant, provider, mode, batch, resolution, dtype_name, channels_last) -> dict:
    """A CSV row's configuration columns."""
    return {
        "kind": "model", "name": f"efficientnet_{variant}", "provider": provider, "mode": mode,
        "dtype": dtype_name, "layout": "channels_last" if channels_last else "nchw",
        "batch": batch, "resolution": resolution,
    }  # fmt: skip


def run_one(variant, provider, model, mode, batch, resolution, dtype_name, device, channels_last, repeats) -> dict:
    row = row_of(variant, provider, mode, batch, resolution, dtype_name, channels_last)
    _, compile_mode, backend = PROVIDERS[provider]
    backend = backend or "auto"
    graphed = compile_mode == GRAPHED
    if graphed and device.type != "cuda":
        return {**row, "status": "skipped: CUDA graphs need a GPU"}
    if backend not in fused_mbconv.available_backends():
        return {**row, "status": f"skipped: backend {backend} unavailable"}
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=DTYPES[dtype_name])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    try:
        with fused_mbconv.backend(backend):
            step = step_function(model, mode, x, labels, graphed)
            step()  # compiles, autotunes, warms up: one-time work whose scratch memory is not the step's
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)  # the timed steps' peak, not the sweep's
            timing = measure(step, device, repeats=repeats, warmup=2)
            peak = _peak_memory_mb(device, graphed or compile_mode == "reduce-overhead")
    except torch.OutOfMemoryError:
        return {**row, "status": "oom"}
    except RuntimeError as e:  # one configuration's failure (a capture, a compile) is its row's, not the sweep's
        first_line = str(e).partition("\n")[0]  # an empty message has no line to index
        reason = f"{type(e).__name__}: {first_line[:160]}".replace("|", "/")  # a markdown cell
        return {**row, "status": f"error: {reason}"}
    finally:
        model.zero_grad(set_to_none=True)  # the next rows' memory must not hold this one's gradients
    return {**row, **timing, "img_per_s": batch / (timing["median_ms"] * 1e-3), "peak_mem_mb": peak, "status": "ok"}


def parse_args(argv):
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    # B5 first: the targets are on B5, and the time budget may cut the sweep short
    p.add_argument("--variants", default="b5,b0,b1,b2,b3,b4,b6,b7" if on_gpu else "b0")
    gpu_providers = "eager,eager+graph,fused-triton+graph,fused,compile,compile-max-autotune"
    p.add_argument("--providers", default=gpu_providers if on_gpu else "eager,fused")
    p.add_argument("--modes", default="infer,train")
    p.add_argument("--dtype", default="bf16" if on_gpu else "fp32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=None, help="default: per variant and mode on GPU, 2 on CPU")
    p.add_argument("--latency", action="store_true", help="also measure batch-1 inference (latency)")
    p.add_argument("--resolution", type=int, default=None, help="default: native on GPU, 64 on CPU")
    p.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps per row (default: 10 on GPU, 5 for b6/b7; 3 on CPU)")
    p.add_argument("--time-budget", type=float, default=420 if on_gpu else None, metavar="SECONDS",
                   help="rows not started within this time are recorded as skipped (default: 420 on GPU)")
    p.add_argument("--compile-variants", default="b5" if on_gpu else "all", metavar="VARIANTS",
                   help="variants measured with the torch.compile providers, or 'all' (default on GPU: b5, "
                        "the targets' variant: compiling one takes minutes a mode; the others' rows say skipped)")
    p.add_argument("--compile-conv-backends", metavar="BACKENDS", help=COMPILE_CONV_BACKENDS_HELP)
    p.add_argument("--out", default=None, help="CSV to append to (default bench/results/models_<gpu>.csv)")
    p.add_argument("--report", default=None, help="markdown report path (default: next to the CSV)")
    p.add_argument("--report-only", metavar="CSV", help="only (re)write the report of an existing CSV")
    return p.parse_args(argv)


def _compiled(provider: str) -> bool:
    """Whether ``provider`` runs a torch.compile'd model."""
    return PROVIDERS[provider][1] not in (None, GRAPHED)


def _passes(plan: list, providers: list[str]) -> list[tuple[tuple, list[str]]]:
    """(plan entry, its providers) in the order they run: every variant's uncompiled providers
    first, then the torch.compile ones (a compile of each variant took minutes: under a time
    budget, they would leave the later variants unmeasured)."""
    compiled = [p for p in providers if _compiled(p)]
    plain = [p for p in providers if p not in compiled]
    return [(entry, group) for group in (plain, compiled) if group for entry in plan]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        print(report.write_report(args.report_only, args.report))
        return 0
    from tqdm import tqdm

    set_compile_conv_backends(args.compile_conv_backends)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    out = Path(args.out or f"bench/results/models_{slug(env['gpu'])}.csv")
    variants, providers, modes = (s.split(",") for s in (args.variants, args.providers, args.modes))
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; choose from {sorted(PROVIDERS)}")
    compile_variants = None if args.compile_variants == "all" else set(args.compile_variants.split(","))
    if compile_variants is not None and not compile_variants <= set(VARIANTS):
        raise SystemExit(f"--compile-variants: unknown {sorted(compile_variants - set(VARIANTS))}; "
                         f"choose from {sorted(VARIANTS)} or 'all'")  # fmt: skip
    channels_last = not args.nchw
    plan = []
    for variant in variants:
        resolution = args.resolution or (VARIANTS[variant].resolution if device.type == "cuda" else 64)
        plan += [(variant, resolution, latency) for latency in ([False, True] if args.latency else [False])]
    start = time.monotonic()
    rows = 0
    steps = sum(1 if latency else len(modes) for _, _, latency in plan) * len(providers)
    with tqdm(total=steps, file=sys.stderr, desc="bench") as progress:
        for (variant, resolution, latency), pass_providers in _passes(plan, providers):
            over_budget = args.time_budget is not None and time.monotonic() - start > args.time_budget
            # a pass's providers are all compiled or none (_passes)
            unselected = compile_variants is not None and variant not in compile_variants and (
                _compiled(pass_providers[0]))
            models = dict.fromkeys(pass_providers) if over_budget or unselected else build_models(
                variant, pass_providers, device, DTYPES[args.dtype], channels_last)  # fmt: skip
            repeats = args.repeats or (GPU_REPEATS.get(variant, 10) if device.type == "cuda" else 3)
            for provider, model in models.items():
                for mode in ["infer"] if latency else modes:  # latency: batch-1 inference
                    batch = 1 if latency else batch_size(args, variant, mode, device)
                    progress.set_postfix_str(f"{variant} {provider} {mode} b{batch}")
                    over_budget = args.time_budget is not None and time.monotonic() - start > args.time_budget
                    skipped = "not in --compile-variants" if unselected else "time budget" if over_budget else None
                    if skipped:
                        row = {**row_of(variant, provider, mode, batch, resolution, args.dtype, channels_last),
                               "status": f"skipped: {skipped}"}  # fmt: skip
                    else:
                        row = run_one(variant, provider, model, mode, batch, resolution, args.dtype, device,
                                      channels_last, repeats)  # fmt: skip
                    write_rows(out, [{**row, **env}])  # row by row: a run cut short keeps what it measured
                    rows += 1
                    progress.update()
            del models
    print(f"wrote {rows} rows to {out}")
    print(report.write_report(out, args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
