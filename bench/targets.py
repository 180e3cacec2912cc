"""The issues' speed targets checked against the measured benchmark CSVs, and BENCHMARKS.md.

Every figure is a ratio of times measured side by side in one run (one CSV under bench/results):
for each target, the newest GPU CSV that has its rows. EfficientNet-B5's shapes, bf16,
channels_last; the fused provider is the fastest fused one of the row (issue 6: "the better
backend"), named in the table.

- Kernels (bench_dwconv.py: issue 4; bench_se_project.py: issue 5): the geometric mean over every
  distinct B5 shape of eager's time / fused's and torch.compile's / fused's, twice: as called
  (do_bench of the call, the host's work included) and as GPU time (each provider replayed from a
  CUDA graph: the "+graph" rows). A target counts as met only when every shape was measured.
- Depthwise layers whose activations exceed 16 MB: the fused kernel's % of the bandwidth floor.
- The model (``python -m bench``: issue 8): B5 img/s of the fastest fused provider against eager
  and the fastest torch.compile provider; the training step's peak memory against eager's, for the
  fastest fused provider measured the same way as eager (called eagerly, max_memory_allocated:
  "+graph" rows hold a CUDA graph's pool).

    python -m bench.targets                  # rewrite BENCHMARKS.md from bench/results
    python -m bench.targets --print          # the targets table only
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable

from bench import report  # noqa: E402
from bench.common import kernel_table, read_rows  # noqa: E402
from fused_mbconv.models.config import depthwise_shapes, se_project_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
BIG_ACTIVATION = 16 * 2**20  # bytes: issue 4's floor target covers layers above this
B5_BATCH = 32  # the kernel benchmarks' batch; bf16 (2 bytes)
AS_CALLED, GPU_TIME = "", "+graph"  # the kernel CSVs' timing suffixes
BASES = {AS_CALLED: "as called", GPU_TIME: "GPU time"}
DWCONV, SE_PROJECT = "dwconv_bn_silu", "se_project"  # the kernel CSVs' kinds


@dataclass(frozen=True)
class KernelTarget:
    issue: int
    kind: str
    mode: str
    vs_eager: float
    vs_compile: float


KERNEL_TARGETS = (
    KernelTarget(4, DWCONV, "infer", 2.0, 1.3),
    KernelTarget(4, DWCONV, "train", 1.5, 1.2),
    KernelTarget(5, SE_PROJECT, "infer", 2.5, 1.3),
    KernelTarget(5, SE_PROJECT, "train", 1.5, 1.15),
)
KERNEL_FUSED = {DWCONV: ("triton", "cuda"), SE_PROJECT: ("triton",)}
FLOOR_TARGET = 75.0
# issue 8: (mode, batch, img/s vs eager, vs torch.compile, peak memory vs eager or None)
MODEL_TARGETS = (("infer", 32, 1.6, 1.2, None), ("train", 16, 1.4, 1.1, 0.7))


def expected_shapes(kind: str) -> list[str]:
    """Every distinct B5 shape of a kernel benchmark, by its CSV name."""
    shapes = depthwise_shapes("b5") if kind == DWCONV else se_project_shapes("b5")
    return [s.name for s in shapes]


def gpu_csvs(results: Path = RESULTS) -> list[Path]:
    """The committed CSVs measured on a GPU, oldest first (their names start with the date)."""
    return [p for p in sorted(results.glob("*.csv")) if any(not r["gpu"].startswith("cpu") for r in read_rows(p))]


def _ms(row: dict | None) -> float | None:
    return report._float(row["median_ms"]) if row and row.get("status") == "ok" else None


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _verdict(value: float | None, bound: float, done: bool, at_most: bool = False) -> str:
    if value is None:
        return "not measured"
    met = value <= bound if at_most else value >= bound
    if not met:
        return "**not met**"
    return "met" if done else "met on the shapes measured"


def _newest(csvs: list[Path], wanted) -> Path | None:
    """The newest CSV with a row that ``wanted(row)`` accepts."""
    return next((path for path in reversed(csvs) if any(wanted(r) for r in read_rows(path))), None)


def _kernel_row(r: dict, kind: str, mode: str) -> bool:
    """A row of a kernel benchmark's B5 run (bf16) of ``kind`` in ``mode``."""
    return r["kind"] == kind and r["mode"] == mode and r["dtype"] == "bfloat16"


def _by_shape(rows: list[dict]) -> dict[str, dict[str, dict]]:
    shapes: dict[str, dict[str, dict]] = {}
    for r in rows:
        shapes.setdefault(r["name"], {})[r["provider"]] = r
    return shapes


def kernel_lines(target: KernelTarget, csvs: list[Path]) -> list[list[str]]:
    """Table rows (issue, target, measured, verdict, source) of one kernel target, per basis."""
    expected = expected_shapes(target.kind)
    path = _newest(csvs, lambda r: _kernel_row(r, target.kind, target.mode) and r["provider"] == "eager")
    label = f"{target.kind} {target.mode}: geomean >= {target.vs_eager}x eager, >= {target.vs_compile}x compile"
    if path is None:
        return [[str(target.issue), label, "", "not measured", ""]]
    rows = [r for r in read_rows(path) if _kernel_row(r, target.kind, target.mode)]
    shapes = {n: p for n, p in _by_shape(rows).items() if n in expected}
    lines = []
    for suffix, basis in BASES.items():
        eager, compiled, winners = [], [], set()
        for by_provider in shapes.values():
            fused = [(t, p) for p in KERNEL_FUSED[target.kind] if (t := _ms(by_provider.get(p + suffix)))]
            if not fused:
                continue
            best, winner = min(fused)
            winners.add(winner)
            if (t := _ms(by_provider.get("eager" + suffix))) is not None:
                eager.append(t / best)
            if (t := _ms(by_provider.get("compile" + suffix))) is not None:
                compiled.append(t / best)
        done = len(eager) == len(expected) and len(compiled) == len(expected)
        ge = _geomean(eager) if eager else None
        gc = _geomean(compiled) if compiled else None
        measured = (f"{ge:.2f}x eager, " if ge else "") + (f"{gc:.2f}x compile" if gc else "no compile rows")
        verdict = [_verdict(ge, target.vs_eager, done), _verdict(gc, target.vs_compile, done)]
        lines.append([
            str(target.issue), f"{label} ({basis})",
            f"{measured}; {len(eager)} of {len(expected)} shapes; fused: {', '.join(sorted(winners))}",
            verdict[0] if verdict[0] == verdict[1] else f"eager: {verdict[0]}; compile: {verdict[1]}", path.name,
        ])  # fmt: skip
    return lines


def floor_lines(csvs: list[Path]) -> list[list[str]]:
    """Issue 4's bandwidth target: the fused depthwise kernels' % of the floor on the big layers."""
    # the input is the larger activation (stride 2 shrinks the output); batch 32, bf16
    big = [s.name for s in depthwise_shapes("b5") if B5_BATCH * s.channels * s.size**2 * 2 > BIG_ACTIVATION]
    lines = []
    for mode in ("infer", "train"):
        label = f"{DWCONV} {mode}: >= {FLOOR_TARGET:.0f}% of the bandwidth floor on the {len(big)} layers over 16 MB"
        path = _newest(csvs, lambda r, m=mode: _kernel_row(r, DWCONV, m) and r["name"] in big
                        and r["provider"] in KERNEL_FUSED[DWCONV])  # fmt: skip
        if path is None:
            lines.append(["4", label, "", "not measured", ""])
            continue
        best: dict[str, float] = {}
        for r in read_rows(path):
            pct = report._float(r["pct_bw_floor"])
            fused = r["provider"].removesuffix(GPU_TIME) in KERNEL_FUSED[DWCONV]
            if _kernel_row(r, DWCONV, mode) and r["name"] in big and fused and pct is not None:
                best[r["name"]] = max(best.get(r["name"], 0.0), pct)
        worst = min(best, key=best.get)
        measured = f"lowest {best[worst]:.0f}% ({worst}); {len(best)} of {len(big)} layers"
        lines.append(["4", label, measured, _verdict(best[worst], FLOOR_TARGET, len(best) == len(big)), path.name])
    return lines


def _replayed(provider: str) -> bool:
    """A provider whose step replays CUDA graphs (its memory is a graph pool's: not eager's kind)."""
    return "+graph" in provider or "reduce-overhead" in provider


def model_lines(csvs: list[Path]) -> list[list[str]]:
    """Issue 8's B5 targets: img/s against eager and torch.compile, training peak memory; the
    fused model called eagerly is reported beside the fastest fused provider."""
    lines = []
    for mode, batch, vs_eager, vs_compile, memory in MODEL_TARGETS:
        label = f"B5 {mode} b{batch} @456: >= {vs_eager}x eager, >= {vs_compile}x compile"
        label += f", peak memory <= {memory}x eager's" if memory else ""

        def b5_row(r, m=mode, b=str(batch)):
            return (r["kind"] == "model" and r["name"] == "efficientnet_b5" and r["mode"] == m and r["batch"] == b
                    and r["dtype"] == "bf16" and r["layout"] == "channels_last")  # fmt: skip

        path = _newest(csvs, lambda r: b5_row(r) and r["provider"] == "eager" and report._float(r["img_per_s"]))
        if path is None:
            lines.append(["8", label, "", "not measured", ""])
            continue
        by_provider = {r["provider"]: r for r in read_rows(path) if b5_row(r)}
        eager = float(by_provider["eager"]["img_per_s"])
        fused_names = [p for p in by_provider if p.startswith(report.FUSED_PREFIX)]
        fused = report._fastest(by_provider, fused_names)
        called = report._fastest(by_provider, [p for p in fused_names if not _replayed(p)])
        compiled = report._fastest(by_provider, report.COMPILED)
        ge = float(fused["img_per_s"]) / eager if fused else None
        gc = float(fused["img_per_s"]) / float(compiled["img_per_s"]) if fused and compiled else None
        measured = [f"{ge:.2f}x eager ({fused['provider']})" if fused else "no fused rows",
                    f"{gc:.2f}x {compiled['provider']}" if gc else "no compile rows"]  # fmt: skip
        if called and called is not fused:
            measured.append(f"called eagerly {float(called['img_per_s']) / eager:.2f}x eager ({called['provider']})")
        verdicts = [f"eager: {_verdict(ge, vs_eager, True)}", f"compile: {_verdict(gc, vs_compile, True)}"]
        if memory:
            mem = report._float(called["peak_mem_mb"]) if called else None
            ratio = mem / float(by_provider["eager"]["peak_mem_mb"]) if mem else None
            measured.append(f"memory {ratio:.2f}x eager's ({called['provider']})" if ratio else "no memory rows")
            verdicts.append(f"memory: {_verdict(ratio, memory, True, at_most=True)}")
        lines.append(["8", label, "; ".join(measured), "; ".join(verdicts), path.name])
    return lines


def target_rows(csvs: list[Path]) -> list[list[str]]:
    """(issue, target, measured, verdict, run) of every target."""
    groups = [kernel_lines(t, csvs) for t in KERNEL_TARGETS] + [floor_lines(csvs), model_lines(csvs)]
    return [cells for group in groups for cells in group]


def targets_table(rows: list[list[str]]) -> str:
    header = "| issue | target (H100 in the issues) | measured | verdict | run |\n|---|---|---|---|---|"
    return "\n".join([header] + ["| " + " | ".join(cells) + " |" for cells in rows])


def _runs(csvs: list[Path]) -> str:
    """Each CSV used: its GPU, versions, commit and date."""
    out = []
    for path in csvs:
        r = read_rows(path)[-1]
        out.append(f"- [{path.name}](bench/results/{path.name}): {r['gpu']}, torch {r['torch']}, "
                   f"triton {r['triton']}, commit {r['commit']}, {r['date']}")  # fmt: skip
    return "\n".join(out)


def benchmarks_md(csvs: list[Path]) -> str:
    """BENCHMARKS.md: the targets, then the newest model sweep and kernel runs in full, then every
    run used."""
    targets = target_rows(csvs)
    used = [p for p in csvs if any(cells[4] == p.name for cells in targets)]
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench.targets` from the CSVs under bench/results (do not edit by hand; "
        "rerun it after committing a GPU run). Ratios are of times measured side by side in one run; "
        "bf16, channels_last, EfficientNet-B5 shapes, batch 32 (training step: 16). The issues set "
        "their targets on an H100; the GPU of each run is listed below.",
        "",
        "## Targets",
        "",
        targets_table(targets),
        "",
    ]
    path = _newest(csvs, lambda r: r["kind"] == "model" and r["name"] != "efficientnet_b5")  # a sweep
    if path:
        used.append(path)
        parts += [f"## EfficientNet B0-B7 ({path.name})", ""]
        for (mode, dtype, layout), by_model in sorted(report._groups(read_rows(path)).items()):
            parts += report._table(f"{mode}, {dtype}, {layout}: img/s", by_model, "img_per_s", ".1f", True)
            parts += report._table(f"{mode}, {dtype}, {layout}: peak memory (MB)", by_model, "peak_mem_mb",
                                   ".0f", False)  # fmt: skip
        notes = path.with_suffix(".md")
        if notes.exists():
            parts += [f"Plots and notes: [{notes.name}](bench/results/{notes.name}).", ""]
    for kind, title in ((DWCONV, "Depthwise conv + BN + SiLU"), (SE_PROJECT, "SE + 1x1 projection + BN")):
        path = _newest(csvs, lambda r, k=kind: r["kind"] == k)
        if path is None:
            continue
        used.append(path)
        rows = [r for r in read_rows(path) if r["kind"] == kind]
        for r in rows:
            r["median_ms"] = float(r["median_ms"]) if report._float(r["median_ms"]) else float("nan")
            r["pct_bw_floor"] = report._float(r["pct_bw_floor"]) if r["pct_bw_floor"] else ""
        providers = list(dict.fromkeys(r["provider"].split("+")[0] for r in rows))
        parts += [f"## {title} ({path.name})", "", "ms (% of the bandwidth floor)", "",
                  kernel_table(rows, providers), ""]  # fmt: skip
    parts += ["## Runs", "", _runs(sorted(set(used))), ""]
    return "\n".join(parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--print", action="store_true", help="print the targets table, write nothing")
    p.add_argument("--out", type=Path, default=BENCHMARKS_MD)
    args = p.parse_args(argv)
    csvs = gpu_csvs()
    if args.print:
        print(targets_table(target_rows(csvs)))
        return
    args.out.write_text(benchmarks_md(csvs))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
