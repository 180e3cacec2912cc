"""Markdown report and PNG plots from a benchmark CSV (the columns of bench/common.py).

Speedups are ratios of img/s measured side by side in the same run: the best fused provider
(named in its cell) / eager, / eager replayed from CUDA graphs (where measured: the fair match
for a fused provider that is replayed too) and / the best torch.compile provider of that row group.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from bench.common import read_rows, slug

FUSED_PREFIX = "fused"
COMPILED = ("compile", "compile-max-autotune")
EAGER_GRAPHED = "eager+graph"


def _float(value: str) -> float | None:
    """The number in a CSV cell, or None for empty, non-numeric or NaN cells."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _groups(rows: list[dict]) -> dict[tuple, dict[str, dict[str, dict]]]:
    """(mode, dtype, layout) -> model name @ batch -> provider -> row (the last one measured wins)."""
    groups: dict[tuple, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["kind"] != "model":
            continue
        key = f"{row['name']} b{row['batch']} @{row['resolution']}"
        groups[(row["mode"], row["dtype"], row["layout"])][key][row["provider"]] = row
    return groups


def _cell(row: dict | None, column: str, fmt: str) -> str:
    if row is None:
        return ""
    value = _float(row.get(column))
    return format(value, fmt) if value is not None and row.get("status") == "ok" else row.get("status", "")


def _ratio(a: dict | None, b: dict | None) -> str:
    va = _float(a.get("img_per_s")) if a else None
    vb = _float(b.get("img_per_s")) if b else None
    return f"{va / vb:.2f}x" if va and vb else ""


def _fastest(by_provider: dict[str, dict], names) -> dict | None:
    candidates = [by_provider[p] for p in names if p in by_provider and _float(by_provider[p].get("img_per_s"))]
    return max(candidates, key=lambda r: float(r["img_per_s"]), default=None)


def _table(title: str, by_model: dict[str, dict[str, dict]], column: str, fmt: str, speedups: bool) -> list[str]:
    providers = sorted({p for by_provider in by_model.values() for p in by_provider})
    graphed = EAGER_GRAPHED in providers
    ratios = ["best fused / eager", f"best fused / {EAGER_GRAPHED}", "best fused / best compile"]
    ratios = [r for r in ratios if graphed or EAGER_GRAPHED not in r]
    header = ["model"] + providers + (ratios if speedups else [])
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, by_provider in by_model.items():
        cells = [model] + [_cell(by_provider.get(p), column, fmt) for p in providers]
        if speedups:
            fused = _fastest(by_provider, [p for p in by_provider if p.startswith(FUSED_PREFIX)])
            named = f" ({fused['provider']})" if fused else ""
            cells += [_ratio(fused, by_provider.get("eager")) + named]
            cells += [_ratio(fused, by_provider.get(EAGER_GRAPHED))] if graphed else []
            cells += [_ratio(fused, _fastest(by_provider, COMPILED))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _plot(by_model: dict[str, dict[str, dict]], column: str, ylabel: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    providers = sorted({p for by_provider in by_model.values() for p in by_provider})
    models = list(by_model)
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(models) + 2), 4))
    for i, provider in enumerate(providers):
        values = [_float(by_model[m].get(provider, {}).get(column)) or 0.0 for m in models]
        ax.bar([j + i * width for j in range(len(models))], values, width, label=provider)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(csv_path: str | Path, report_path: str | Path | None = None) -> str:
    """Write the markdown report (and PNG plots beside it); returns the report's text."""
    csv_path = Path(csv_path)
    report_path = Path(report_path) if report_path else csv_path.with_suffix(".md")
    rows = read_rows(csv_path)
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    first = rows[-1]
    lines = [
        f"# EfficientNet benchmark: {first['gpu']}",
        "",
        f"torch {first['torch']}, triton {first['triton']}, commit {first['commit']}, {first['date']}. "
        "img/s is the median over repeats after warm-up, on random data; speedups are ratios of img/s "
        "measured in the same run. Peak memory: over the timed steps, after an untimed first step "
        "(compilation, autotuning, graph capture); torch.cuda.max_memory_allocated, except for \"+graph\" "
        "rows: max_memory_reserved, which holds the CUDA graph's pool (see the run's notes in "
        "bench/results for runs that measured otherwise).",
        "",
    ]
    for (mode, dtype, layout), by_model in sorted(_groups(rows).items()):
        name = f"{mode}_{dtype}_{layout}"
        lines += _table(f"{mode}, {dtype}, {layout}: img/s", by_model, "img_per_s", ".1f", speedups=True)
        if any(_float(r.get("peak_mem_mb")) for bp in by_model.values() for r in bp.values()):
            lines += _table(f"{mode}, {dtype}, {layout}: peak memory (MB)", by_model, "peak_mem_mb", ".0f", False)
        for column, label in (("img_per_s", "img/s"), ("peak_mem_mb", "peak memory (MB)")):
            if not any(_float(r.get(column)) for bp in by_model.values() for r in bp.values()):
                continue
            png = report_path.with_name(f"{report_path.stem}_{name}_{slug(label)}.png")
            if _plot(by_model, column, label, png):
                lines += [f"![{name} {label}]({png.name})", ""]
    text = "\n".join(lines)
    report_path.write_text(text)
    return text
