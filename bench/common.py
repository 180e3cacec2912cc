"""Timing, environment and CSV helpers shared by every benchmark in bench/.

Timing (fused_mbconv._timing): CUDA events around each call on the GPU after warm-up, wall
clock on the CPU; reported as median and 20th/80th percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from fused_mbconv._timing import time_calls

CSV_COLUMNS = [
    "kind", "name", "provider", "mode", "dtype", "layout", "batch", "resolution",
    "median_ms", "p20_ms", "p80_ms", "img_per_s", "peak_mem_mb", "pct_bw_floor",
    "status", "gpu", "torch", "triton", "commit", "date",
]  # fmt: skip

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _quantile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(round(q * (len(sorted_ms) - 1))))]


def summarize(times_ms: Iterable[float]) -> dict:
    """{median_ms, p20_ms, p80_ms} of timings in milliseconds."""
    times = sorted(times_ms)
    return {"median_ms": statistics.median(times), "p20_ms": _quantile(times, 0.2), "p80_ms": _quantile(times, 0.8)}


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 20, warmup: int = 3) -> dict:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` calls; milliseconds per call."""
    return summarize(time_calls(fn, device, repeats, warmup))


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), in GB/s: 1 GiB
    moved on a GPU (many times its L2), 64 MiB on the CPU."""
    nbytes = 1 << 30 if device.type == "cuda" else 1 << 26
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device, repeats=20, warmup=3)["median_ms"]
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def pct_of_floor(bytes_moved: int, ms: float, bandwidth_gbs: float) -> float:
    """Achieved fraction of the bandwidth floor: (bytes / bandwidth) / measured time, in %."""
    return 100.0 * (bytes_moved / (bandwidth_gbs * 1e9)) / (ms * 1e-3)


def slug(text: str) -> str:
    """A file-name-safe short form of a device name."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "device"


def _git_commit() -> str:
    """HEAD's short hash, "-dirty" when the tree differs from it (the device tool sends the working
    tree with the session's first HEAD: its runs of later commits read as that one, dirty)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    """The columns that say where and when a row was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def write_rows(path: str | Path, rows: Iterable[dict], append: bool = True) -> None:
    """Write rows with the shared CSV columns (missing values left empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not (append and path.exists())
    with path.open("a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow(row)


def read_rows(path: str | Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# per-op kernel benchmarks (bench_dwconv.py, bench_se_project.py)

KERNEL_QUANTILES = [0.5, 0.2, 0.8]


COMPILE_CONV_BACKENDS_HELP = (
    "Inductor's max_autotune_conv_backends (its default ATEN,TRITON). ATEN leaves out\n"
    "Triton's conv templates: on B5's depthwise convs they ran 33-68 ms against cuDNN's\n"
    "0.21 ms, and timing them took ~10 s a conv (H200, 2026-11-27)"
)


def set_compile_conv_backends(backends: str | None) -> None:
    """Inductor's max_autotune_conv_backends for the compile providers (None: its default), read
    when they compile."""
    if backends:
        from torch._inductor import config as inductor_config

        inductor_config.max_autotune_conv_backends = backends


@dataclass(frozen=True)
class KernelSetting:
    """Where and how a per-op benchmark runs: on the GPU, the issue's batch and dtype; with
    ``--smoke``, the CPU, a small batch in fp32 and a few repeats, to run every code path in CI."""

    device: torch.device
    batch: int
    dtype: torch.dtype
    rep: int  # do_bench's milliseconds of repeats on the GPU; the number of calls on the CPU
    compile_mode: str
    host_share: bool = False  # also time each call from a CUDA graph, and the host's issue time

    @classmethod
    def from_args(cls, args: argparse.Namespace, batch: int, dtype: torch.dtype) -> KernelSetting:
        host_share = getattr(args, "host_share", False)
        set_compile_conv_backends(getattr(args, "compile_conv_backends", None))
        if args.smoke:
            return cls(torch.device("cpu"), 2, torch.float32, 2, args.compile_mode)
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU (--list-shapes and --smoke work without one)")
        return cls(torch.device("cuda"), batch, dtype, 20 if args.quick else 100, args.compile_mode, host_share)


# time_kernel_call's ways of timing a call; kernel_rows labels the rows "<provider><suffix>"
TIMINGS = {"": "do_bench", "+graph": "replayed from a CUDA graph", "+host": "the host's time to issue it"}


def time_kernel_call(fn: Callable[[], object], setting: KernelSetting, timing: str = "") -> list[float]:
    """(median, p20, p80) ms of ``fn`` after one untimed call (compiling, autotuning): by
    triton.testing.do_bench on the GPU, by wall clock on the CPU. ``timing`` "+graph": calls
    captured in a CUDA graph and replayed (do_bench_cudagraph), without the host's work; "+host":
    the host's time from the call until it returns, the GPU idle at its start (Python, dispatch,
    launches: the GPU waits for it where the kernels are shorter)."""
    fn()
    if setting.device.type != "cuda":
        return list(measure(fn, setting.device, repeats=setting.rep, warmup=0).values())
    import triton.testing  # here: the CPU-only parts of the benchmarks need no Triton

    if timing == "+graph":
        return triton.testing.do_bench_cudagraph(fn, rep=setting.rep, quantiles=KERNEL_QUANTILES)
    if timing == "+host":
        issue = []
        for _ in range(50):
            torch.cuda.synchronize(setting.device)
            start = time.perf_counter()
            fn()
            issue.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize(setting.device)
        return list(summarize(issue).values())
    return triton.testing.do_bench(fn, rep=setting.rep, quantiles=KERNEL_QUANTILES)


def kernel_rows(
    name: str,
    providers: list[str],
    fused: tuple[str, ...],
    modes: tuple[str, ...],
    step: Callable[[str, str], Callable[[], object]],
    floor_bytes: Callable[[str], int],
    bandwidth_gbs: float,
    setting: KernelSetting,
    **columns,
) -> list[dict]:
    """Time ``step(provider, mode)`` (the call to time, built under the provider's backend) for
    every mode and provider of one shape; a row per success with ``columns`` and % of the
    bandwidth floor (``floor_bytes(mode)``). With ``setting.host_share`` each provider also gets
    rows "<provider>+graph" and "<provider>+host" (``TIMINGS``; no % of the floor for the host's
    time). A failure (a compile error, a call that cannot be captured) is reported on stderr and
    leaves the other rows."""
    import fused_mbconv

    timings = list(TIMINGS) if setting.host_share else [""]
    rows = []
    for mode in modes:
        for provider, timing in [(p, t) for p in providers for t in timings]:
            label = provider + timing
            try:
                with fused_mbconv.backend(provider if provider in fused else "auto"):
                    median, p20, p80 = time_kernel_call(step(provider, mode), setting, timing)
            except Exception as e:
                print(f"{name} {mode} {label}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
                continue
            pct = "" if timing == "+host" else round(pct_of_floor(floor_bytes(mode), median, bandwidth_gbs), 1)
            rows.append({**columns, "name": name, "provider": label, "mode": mode, "status": "ok",
                         "median_ms": round(median, 4), "p20_ms": round(p20, 4), "p80_ms": round(p80, 4),
                         "pct_bw_floor": pct})  # fmt: skip
            print(f"{name:26s} {mode:5s} {label:14s} {median:8.3f} ms {pct}%", flush=True)
    return rows


def kernel_shape_rows(
    kind: str,
    shapes: list,
    providers: list[str],
    fused: tuple[str, ...],
    modes: tuple[str, ...],
    setting: KernelSetting,
    resolution: int,
    case: Callable,
    out: Path | None,
) -> list[dict]:
    """``kernel_rows`` for every shape (``shape.name``); ``case(shape)`` builds its inputs and
    modules and returns (step(provider, mode), floor_bytes(mode)). The CSV ``out`` (if any) is
    rewritten after each shape, so a run cut short by a time limit keeps the rows it measured."""
    bandwidth = copy_bandwidth_gbs(setting.device)
    columns = {
        "kind": kind, "dtype": str(setting.dtype).replace("torch.", ""), "layout": "channels_last",
        "batch": setting.batch, "resolution": resolution, **environment(setting.device),
    }  # fmt: skip
    print(f"{columns['gpu']}: copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    rows = []
    for shape in shapes:
        step, floor = case(shape)
        rows += kernel_rows(shape.name, providers, fused, modes, step, floor, bandwidth, setting, **columns)
        if out is not None:
            write_rows(out, rows, append=False)
        del step, floor  # the shape's tensors and modules, before the next shape's
        if setting.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def kernel_bench_parser(doc: str, providers: tuple[str, ...], out_help: str) -> argparse.ArgumentParser:
    """The options every per-op benchmark takes."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help=out_help)
    p.add_argument("--quick", action="store_true", help="3 shapes, shorter timing")
    p.add_argument("--list-shapes", action="store_true", help="print the shapes and exit (no GPU needed)")
    p.add_argument("--smoke", action="store_true", help="CPU, one small shape, no torch.compile: the code path only")
    p.add_argument("--providers", default=",".join(providers), help=f"comma-separated subset of {providers}")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs", help="torch.compile mode")
    p.add_argument("--compile-conv-backends", metavar="BACKENDS", help=COMPILE_CONV_BACKENDS_HELP)
    p.add_argument("--host-share", action="store_true",
                   help='also time each provider replayed from a CUDA graph ("<provider>+graph": without the\n'
                        'host\'s work) and the host\'s time to issue a call ("<provider>+host")')
    return p


def select_providers(arg: str, known: tuple[str, ...], fused: tuple[str, ...], smoke: bool = False) -> list[str]:
    """The comma-separated ``arg`` checked against ``known``; fused backends that cannot run here
    are dropped, and torch.compile from a smoke run (Inductor takes minutes on a CPU)."""
    import fused_mbconv

    providers = [p for p in arg.split(",") if p]
    unknown = set(providers) - set(known)
    if unknown:
        raise SystemExit(f"--providers: unknown {sorted(unknown)}; expected a subset of {known}")
    runnable = fused_mbconv.available_backends()
    return [p for p in providers if (p not in fused or p in runnable) and not (smoke and p == "compile")]


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    floor = row["pct_bw_floor"]
    return f"{row['median_ms']:.3f}" + ("" if floor == "" else f" ({floor:.0f}%)")


def kernel_table(rows: list[dict], providers: list[str]) -> str:
    """Markdown, one line per (shape, mode): each provider's median ms and % of the bandwidth floor
    (and its "+graph" and "+host" timings, where measured)."""
    timed = {r["provider"] for r in rows}
    providers = [p + suffix for p in providers for suffix in TIMINGS if not suffix or p + suffix in timed]
    head = "| shape | mode | " + " | ".join(f"{p} ms (% floor)" for p in providers) + " |"
    lines = [head, "|" + "---|" * (2 + len(providers))]
    by_key = {(r["name"], r["mode"], r["provider"]): r for r in rows}
    for name, mode in dict.fromkeys((r["name"], r["mode"]) for r in rows):
        cells = [by_key.get((name, mode, p)) for p in providers]
        text = [_cell(c) for c in cells]
        lines.append(f"| {name} | {mode} | " + " | ".join(text) + " |")
    return "\n".join(lines)
