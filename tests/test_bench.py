"""The benchmark tooling: CSV columns, the report's speedup arithmetic, and a tiny CPU run of
``python -m bench`` end to end (timings themselves are never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.common import CSV_COLUMNS, read_rows, write_rows  # noqa: E402

ENV = {"gpu": "Test GPU", "torch": "2.x", "triton": "3.x", "commit": "abc", "date": "2026-01-01"}


def _row(provider, img_per_s, mode="infer", status="ok"):
    return {
        "kind": "model", "name": "efficientnet_b0", "provider": provider, "mode": mode, "dtype": "bf16",
        "layout": "channels_last", "batch": 8, "resolution": 224, "img_per_s": img_per_s,
        "median_ms": 8000 / img_per_s if img_per_s else "", "peak_mem_mb": 100.0, "status": status, **ENV,
    }  # fmt: skip


def test_report_speedups_are_ratios_of_measured_throughput(tmp_path):
    csv_path = tmp_path / "runs.csv"
    write_rows(csv_path, [_row("eager", 100.0), _row("compile", 150.0), _row("compile-max-autotune", 160.0),
                          _row("fused", 240.0), _row("fused-cuda", None, status="oom")])  # fmt: skip
    assert list(read_rows(csv_path)[0]) == CSV_COLUMNS
    text = report.write_report(csv_path)
    line = next(ln for ln in text.splitlines() if ln.startswith("| efficientnet_b0"))
    assert line.rstrip(" |").endswith("| 2.40x | 1.50x"), line  # 240/100, 240/max(150, 160)
    assert "oom" in line
    assert "Test GPU" in text


def test_cli_small_cpu_run(tmp_path):
    # as a user runs it: `python -m bench` from the repository root
    csv_path = tmp_path / "models.csv"
    args = ["--variants", "b0", "--modes", "infer", "--resolution", "32", "--batch", "1", "--repeats", "1",
            "--out", str(csv_path)]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = read_rows(csv_path)
    assert {r["provider"] for r in rows} == {"eager", "fused"}
    assert all(r["status"] == "ok" and float(r["img_per_s"]) > 0 for r in rows)
    assert csv_path.with_suffix(".md").exists()


def test_dwconv_benchmark_lists_b5_shapes_without_a_gpu(capsys):
    from bench import bench_dwconv

    bench_dwconv.main(["--list-shapes"])
    out = capsys.readouterr().out
    assert "EfficientNet-B5" in out and "c48_k3_s1_h228" in out  # B5's first depthwise layer
