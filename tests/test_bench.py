"""The benchmark tooling: CSV columns, the report's speedup arithmetic, a tiny CPU run of
``python -m bench`` end to end, and the per-op benchmarks' shapes and CPU-checkable parts
(timings themselves are never asserted)."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import BACKENDS, INTERPRETED

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
    assert line.rstrip(" |").endswith("| 2.40x (fused) | 1.50x"), line  # 240/100, 240/max(150, 160)
    assert "oom" in line
    assert "Test GPU" in text


def test_report_compares_graph_replays_with_eager_replayed_too(tmp_path):
    csv_path = tmp_path / "runs.csv"
    write_rows(csv_path, [_row("eager", 100.0), _row("eager+graph", 160.0), _row("fused-triton+graph", 240.0)])
    line = next(ln for ln in report.write_report(csv_path).splitlines() if ln.startswith("| efficientnet_b0"))
    assert line.endswith("| 2.40x (fused-triton+graph) | 1.50x |  |"), line  # 240/100, 240/160, no compile


def test_rows_past_the_time_budget_keep_their_configuration(tmp_path, monkeypatch):
    """A skipped row is reported in its (mode, dtype, layout) table, beside the measured ones."""
    from bench import __main__ as cli

    csv_path = tmp_path / "models.csv"
    monkeypatch.chdir(ROOT)
    cli.main(["--variants", "b0", "--providers", "eager", "--modes", "infer", "--time-budget", "-1",
              "--out", str(csv_path)])  # fmt: skip
    (row,) = read_rows(csv_path)
    assert (row["status"], row["dtype"], row["layout"], row["batch"]) == ("skipped: time budget", "fp32", "channels_last", "2")
    assert "### infer, fp32, channels_last: img/s" in csv_path.with_suffix(".md").read_text()


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


def test_cli_batch_per_mode_and_latency(tmp_path, monkeypatch):
    """On a GPU each variant has an inference and a training batch (B5: 32 and 16, the targets');
    --latency adds batch-1 inference rows (not training: one sample's BN statistics)."""
    from bench import __main__ as cli

    args = cli.parse_args(["--variants", "b5"])
    cuda = torch.device("cuda")
    assert (cli.batch_size(args, "b5", "infer", cuda), cli.batch_size(args, "b5", "train", cuda)) == (32, 16)
    assert cli.batch_size(cli.parse_args(["--batch", "3"]), "b5", "train", cuda) == 3
    csv_path = tmp_path / "models.csv"
    monkeypatch.chdir(ROOT)
    cli.main(["--variants", "b0", "--providers", "eager", "--resolution", "32", "--repeats", "1", "--latency",
              "--out", str(csv_path)])  # fmt: skip
    rows = [(r["mode"], r["batch"], r["status"]) for r in read_rows(csv_path)]
    assert rows == [("infer", "2", "ok"), ("train", "2", "ok"), ("infer", "1", "ok")]


def test_cli_cuda_graph_providers(tmp_path, monkeypatch):
    """The "+graph" providers replay the step's forward and backward from CUDA graphs: measured on
    a GPU, recorded as skipped on the CPU."""
    from bench import __main__ as cli

    csv_path = tmp_path / "models.csv"
    monkeypatch.chdir(ROOT)
    providers = ["eager+graph"] + (["fused-triton+graph"] if "triton" in BACKENDS else [])
    cli.main(["--variants", "b0", "--providers", ",".join(providers), "--resolution", "32", "--batch", "2",
              "--repeats", "2", "--out", str(csv_path)])  # fmt: skip
    rows = read_rows(csv_path)
    assert [(r["provider"], r["mode"]) for r in rows] == [(p, m) for p in providers for m in ("infer", "train")]
    if torch.cuda.is_available():
        assert all(r["status"] == "ok" and float(r["img_per_s"]) > 0 for r in rows), rows
    else:
        assert all(r["status"] == "skipped: CUDA graphs need a GPU" for r in rows), rows


def test_cli_time_budget_records_what_it_skips(tmp_path):
    """With the budget spent before the first row, every row is written as skipped, not dropped."""
    csv_path = tmp_path / "models.csv"
    args = ["--variants", "b0", "--resolution", "32", "--batch", "1", "--time-budget", "0", "--out", str(csv_path)]
    done = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = read_rows(csv_path)
    assert len(rows) == 4 and all(r["status"] == "skipped: time budget" for r in rows)  # 2 providers x 2 modes


def test_cli_runs_torch_compile_after_every_variants_other_providers(tmp_path):
    """A time budget cuts compilations (minutes a variant) before it cuts variants: the sweep
    takes every variant's uncompiled providers first. With the budget spent, the rows come in
    that order, all recorded as skipped. --compile-variants limits the compiled rows to the
    variants it names (the others' say so); an unknown name is an error."""
    from bench.__main__ import _passes

    plan = [("b5", 456, False), ("b0", 224, False)]
    assert _passes(plan, ["eager", "compile", "fused", "fused+compile"]) == [
        (plan[0], ["eager", "fused"]), (plan[1], ["eager", "fused"]),
        (plan[0], ["compile", "fused+compile"]), (plan[1], ["compile", "fused+compile"])]  # fmt: skip
    assert _passes(plan, ["compile-max-autotune"]) == [(plan[0], ["compile-max-autotune"]),
                                                       (plan[1], ["compile-max-autotune"])]  # fmt: skip
    csv_path = tmp_path / "models.csv"
    args = ["--variants", "b0,b1", "--providers", "compile,eager", "--modes", "infer", "--resolution", "32",
            "--batch", "1", "--time-budget", "0", "--out", str(csv_path)]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    order = [(r["name"], r["provider"]) for r in read_rows(csv_path)]
    assert order == [("efficientnet_b0", "eager"), ("efficientnet_b1", "eager"),
                     ("efficientnet_b0", "compile"), ("efficientnet_b1", "compile")]  # fmt: skip
    # --compile-variants: the compile rows of the other variants say why they are empty
    csv_path.unlink()
    done = subprocess.run([sys.executable, "-m", "bench", *args, "--compile-variants", "b1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    status = {(r["name"], r["provider"]): r["status"] for r in read_rows(csv_path)}
    assert status == {("efficientnet_b0", "eager"): "skipped: time budget",
                      ("efficientnet_b1", "eager"): "skipped: time budget",
                      ("efficientnet_b0", "compile"): "skipped: not in --compile-variants",
                      ("efficientnet_b1", "compile"): "skipped: time budget"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "bench", *args, "--compile-variants", "b1,b9"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode != 0 and "--compile-variants: unknown ['b9']" in done.stderr


def test_dwconv_benchmark_lists_b5_shapes_without_a_gpu(capsys):
    from bench import bench_dwconv

    bench_dwconv.main(["--list-shapes"])
    out = capsys.readouterr().out
    assert "EfficientNet-B5" in out and "c48_k3_s1_h228" in out  # B5's first depthwise layer


def test_se_project_shapes_b0():
    from fused_mbconv.models.config import SEProjectShape, se_project_shapes

    shapes = se_project_shapes("b0")
    # B0's 16 blocks give 12 distinct shapes: each stage's first block, plus its repeats when it has any
    assert len(shapes) == 12
    # stage 1 (expand 1, 32 -> 16, stride 1) after the stem's stride 2: C = 32, R = 32 // 4 = 8,
    # H = 224 / 2 = 112, no residual (32 != 16)
    assert shapes[0] == SEProjectShape(channels=32, squeeze=8, out=16, size=112, residual=False)
    assert shapes[0].name == "c32_r8_o16_h112"
    # stage 2's repeat (expand 6, 24 -> 24, stride 1) at 56: C = 144, R = 6, with the residual
    assert shapes[2] == SEProjectShape(144, 6, 24, 56, True)
    assert shapes[-1] == SEProjectShape(1152, 48, 320, 7, False)


def test_se_project_benchmark_lists_b5_shapes_without_a_gpu():
    # as a user runs it, with no GPU visible
    script = ROOT / "bench" / "bench_se_project.py"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(script), "--list-shapes"], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [ln.split()[0] for ln in done.stdout.splitlines()[1:]]
    assert "EfficientNet-B5" in done.stdout
    assert len(lines) == 14
    assert lines[0] == "c48_r12_o24_h228" and lines[-1] == "c3072_r128_o512_h15_res"


def test_se_project_benchmark_paths_agree_on_cpu():
    # the fused path shares eager's Parameters and, with the squeeze given, computes the same output
    # and (train) the same gradients, the squeeze's broadcast gradient included
    import torch

    import fused_mbconv
    from bench import bench_se_project as bench
    from fused_mbconv.models.config import SEProjectShape

    for shape in (SEProjectShape(16, 4, 8, 5, False), SEProjectShape(16, 4, 16, 5, True)):
        modules = bench.make_modules(shape, "default", device="cpu", dtype=torch.float64)
        eager, fused = modules["eager"], modules["triton"]
        assert [id(p) for p in eager.parameters()] == [id(p) for p in fused.parameters()]
        h, pooled, x_in = bench.make_inputs(shape, "cpu", torch.float64, batch=3)
        with fused_mbconv.backend("reference"):
            for mode in bench.MODES:
                torch.manual_seed(1)  # the same random upstream gradient for both
                expected = bench.step_fn(eager, mode, shape, h, pooled, x_in)()
                torch.manual_seed(1)
                actual = bench.step_fn(fused, mode, shape, h, pooled, x_in)()
                torch.testing.assert_close(actual, expected)
                if mode == "train":
                    assert len(actual) == 1 + shape.residual + 7  # h, (x_in), fc1 and fc2 (w, b), conv, bn (w, b)


@pytest.mark.skipif(not INTERPRETED, reason="the smoke run's fused backend is Triton's interpreter")
def test_auto_table_smoke_run_chooses_for_every_op(tmp_path):
    """The GPU table script's whole path on one tiny shape: every op with a fused backend gets a
    choice per shape class, from samples whose outputs matched the reference; the candidates are
    the fused backends (Triton's interpreter here), for the training ops too."""
    from bench import bench_auto_table

    out = tmp_path / "table.json"
    bench_auto_table.main(["--smoke", "--out", str(out)])
    table = json.loads(out.read_text())
    ops = {s["op"] for s in table["samples"]}
    assert len(ops) == 11 and set(table["choices"]) == ops
    assert {"dwconv_bn_silu_train", "dwconv_bn_silu_backward", "project_bn_train", "project_bn_backward"} <= ops
    for s in table["samples"]:
        assert set(s["ms"]) == {"triton"}, s
    for op, classes in table["choices"].items():
        assert set(classes.values()) == {"triton"}, (op, classes)
    assert table["gpu"].startswith("cpu") and table["date"]


def test_a_failing_configuration_is_its_rows_status_not_the_sweeps_end():
    """python -m bench's run_one: a RuntimeError in one configuration (a graph capture, a compile)
    comes back as that row's status (its first line, "|" made "/" for the report's tables), as an
    out-of-memory does, instead of ending the sweep."""
    from bench.__main__ import run_one

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            raise RuntimeError("operation not permitted when stream is capturing | detail\nsecond line")

    model = Broken()
    row = run_one("b0", "eager", model, "infer", 1, 8, "fp32", torch.device("cpu"), False, repeats=1)
    assert row["status"] == "error: RuntimeError: operation not permitted when stream is capturing / detail"
    assert row["provider"] == "eager" and row["name"] == "efficientnet_b0"
    Broken.forward = lambda self, x: (_ for _ in ()).throw(RuntimeError())  # a message with no line at all
    row = run_one("b0", "eager", Broken(), "infer", 1, 8, "fp32", torch.device("cpu"), False, repeats=1)
    assert row["status"] == "error: RuntimeError: "


def test_auto_table_samples_take_the_size_classes_in_turns():
    """bench_auto_table's default samples (stage-first blocks of B0, B4, B7 at batch 8): every
    size class among the first three, so a budget that ends early still covers each (the H200's
    55 s of 2026-11-28 measured three B0 samples, all "medium"); none lost or repeated."""
    from bench import bench_auto_table
    from fused_mbconv.ops import auto_table

    samples = bench_auto_table.sample_shapes(["b0", "b4", "b7"], smoke=False)

    def size(sample):
        shape, batch = sample
        return auto_table.size_class(batch * shape.expanded * shape.in_size**2)

    assert [size(s) for s in samples[:3]] == ["large", "medium", "small"]
    stage_firsts = 7 * 3  # seven stages per variant
    assert len(samples) == stage_firsts and len({(id(s), b) for s, b in samples}) == stage_firsts


def test_auto_table_rejects_a_wrong_result():
    from bench.bench_auto_table import choose, matches, tolerance

    expected = (torch.ones(3, 4, dtype=torch.bfloat16), torch.zeros(0))
    assert matches((expected[0].clone(), torch.zeros(0)), expected, tolerance("se_scale", expected[0]))
    assert not matches((expected[0] * 1.1, torch.zeros(0)), expected, tolerance("se_scale", expected[0]))
    # a backend missing from one sample of a class loses the class; times compare by geometric mean
    samples = [{"op": "a", "class": "k", "ms": {"triton": 1.0, "cuda": 4.0}},
               {"op": "a", "class": "k", "ms": {"triton": 3.0, "cuda": 0.5}},
               {"op": "b", "class": "k", "ms": {"triton": 1.0, "cuda": 0.1}},
               {"op": "b", "class": "k", "ms": {"triton": 1.0}}]  # fmt: skip
    assert choose(samples) == {"a": {"k": "cuda"}, "b": {"k": "triton"}}


def test_auto_table_allows_tf32_only_where_the_projection_multiplies_in_it(monkeypatch):
    """The fp32 projection GEMM rounds its inputs to TF32 where its kernel does (on a GPU with
    TF32 convolutions allowed, torch's default; on the H200 every fp32 projection sample failed
    the fp32 tolerance and was left out of the table): those samples get TF32's tolerance. Other
    ops, other dtypes and an IEEE GEMM (a CPU tensor, whatever the flag) keep theirs."""
    from bench.bench_auto_table import TF32_TOLERANCE, TOLERANCE, tolerance
    from fused_mbconv.ops.project_bn import triton_impl

    x = torch.ones(2, 8, 3, 3)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert triton_impl.gemm_precision(x) == "ieee"
    assert tolerance("project_bn", x) == TOLERANCE[torch.float32]
    monkeypatch.setattr(triton_impl, "gemm_precision", lambda t: "tf32")  # as for a CUDA tensor
    assert tolerance("project_bn_backward", x) == TF32_TOLERANCE
    assert tolerance("dwconv_bn_silu", x) == TOLERANCE[torch.float32]
    assert tolerance("project_bn", x.bfloat16()) == TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("host_share", [False, True], ids=["plain", "host_share"])
def test_kernel_rows_keep_going_past_a_failing_provider(monkeypatch, capsys, host_share):
    """A provider that fails leaves the others' rows; with --host-share each provider also gets
    "+graph" and "+host" rows (here a fake timer: 3x and 6x faster), the host's without a % of the
    floor, in the table too."""
    from bench import common

    speedup = {"": 1, "+graph": 3, "+host": 6}
    monkeypatch.setattr(common, "time_kernel_call", lambda fn, setting, timing: [fn() / speedup[timing], 0.9, 1.1])

    def step(provider, mode):
        if provider == "compile":
            raise RuntimeError("inductor says no")
        return lambda: 6.0 if mode == "train" else 3.0

    setting = common.KernelSetting(torch.device("cuda"), 2, torch.float32, 1, "", host_share)
    rows = common.kernel_rows("c8", ["reference", "compile"], ("reference",), ("infer", "train"), step,
                              lambda mode: 3 * 10**9, 1000.0, setting=setting, kind="k")  # fmt: skip
    got = [(r["provider"], r["mode"], r["median_ms"], r["pct_bw_floor"]) for r in rows]
    expected = [("reference", "infer", 3.0, 100.0), ("reference", "train", 6.0, 50.0)]  # 3 GB at 1000 GB/s: 3 ms
    if host_share:
        expected = [expected[0], ("reference+graph", "infer", 1.0, 300.0), ("reference+host", "infer", 0.5, ""),
                    expected[1], ("reference+graph", "train", 2.0, 150.0), ("reference+host", "train", 1.0, "")]  # fmt: skip
    assert got == expected
    assert rows[0]["kind"] == "k"
    assert "c8 infer compile: FAILED RuntimeError: inductor says no" in capsys.readouterr().err
    table = common.kernel_table(rows, ["reference", "compile"])
    assert ("reference+graph ms" in table and "reference+host ms" in table) == host_share
    assert ("| c8 | train | 6.000 (50%) | 2.000 (150%) | 1.000 | - |" in table) == host_share


@pytest.mark.parametrize("script", ["bench_dwconv", "bench_se_project"])
def test_kernel_benchmark_smoke_run_on_cpu(script, tmp_path, capsys):
    """--smoke runs the GPU benchmark's whole path on the CPU (one small shape, fp32): a row per
    (mode, provider) that can run here, with a time and a % of the bandwidth floor, in the CSV and
    the markdown table. (The GPU run itself is bench/gpu_check.sh's.)"""
    import importlib

    bench = importlib.import_module(f"bench.{script}")
    out = tmp_path / "rows.csv"
    bench.main(["--smoke", "--out", str(out)])
    providers = [p for p in bench.PROVIDERS if p != "compile" and (p not in bench.FUSED or p in BACKENDS)]
    rows = read_rows(out)
    assert {(r["mode"], r["provider"]) for r in rows} == {(m, p) for m in bench.MODES for p in providers}
    # (% of the floor rounds to 0 here: a few KB moved against a bandwidth measured on 64 MiB)
    assert all(float(r["median_ms"]) > 0 and float(r["pct_bw_floor"]) >= 0 and r["gpu"].startswith("cpu") for r in rows)
    assert f"| {bench.SMOKE_SHAPES[0].name} | train |" in capsys.readouterr().out


def test_compile_conv_backends_reach_inductor(tmp_path):
    """--compile-conv-backends sets Inductor's conv autotuning backends for the compile providers
    of the kernel benches and of the model CLI; without it Inductor's default stays. (Inductor's
    own patch() restores the setting: pytest's monkeypatch deletes a config it did not find in
    the module's __dict__, which hides it from every later torch.compile.)"""
    import torch._inductor.config as inductor

    from bench import common
    from bench.__main__ import main as model_cli

    parser = common.kernel_bench_parser("doc", ("compile",), "out")
    with inductor.patch(max_autotune_conv_backends="ATEN,TRITON"):
        common.KernelSetting.from_args(parser.parse_args(["--smoke"]), 2, torch.float32)
        assert inductor.max_autotune_conv_backends == "ATEN,TRITON"
        args = parser.parse_args(["--smoke", "--compile-conv-backends", "ATEN"])
        common.KernelSetting.from_args(args, 2, torch.float32)
        assert inductor.max_autotune_conv_backends == "ATEN"
    with inductor.patch(max_autotune_conv_backends="ATEN,TRITON"):
        model_cli(["--providers", "compile-max-autotune", "--time-budget", "0", "--out", str(tmp_path / "m.csv"),
                   "--compile-conv-backends", "ATEN"])  # fmt: skip
        assert inductor.max_autotune_conv_backends == "ATEN"


def test_profile_names_where_each_provider_spends_its_step(capsys):
    """bench/profile_model.py on the CPU (operators, not kernels): a table per provider, with
    torch's convolution backward in eager's and the fused ops in the fused model's."""
    from bench import profile_model

    profile_model.main(["--variant", "b0", "--resolution", "32", "--batch", "2", "--steps", "1", "--top", "40",
                        "--providers", "eager,fused", "--mode", "train"])  # fmt: skip
    out = capsys.readouterr().out
    eager, fused = out.split("### fused")
    assert "### eager" in eager and "aten::convolution_backward" in eager and "fused_mbconv::" not in eager
    assert "fused_mbconv::project_bn_backward" in fused and "fused_mbconv::dwconv_bn_silu" in fused


def test_layer_profile_for_nsight_compute_needs_a_gpu(capsys):
    """--ncu brackets a step with cudaProfilerStart/Stop for Nsight Compute: without a CUDA
    device it says so instead of running."""
    from bench import profile_layer

    with pytest.raises(SystemExit):
        profile_layer.main(["--smoke", "--ncu"])
    assert "--ncu: needs a CUDA device" in capsys.readouterr().err


def test_layer_profile_names_each_pass_of_the_fused_op(capsys):
    """bench/profile_layer.py on the CPU, one small depthwise layer: per mode a table per
    provider, the fused op's passes in the fused provider's and cuDNN-style convolution in eager's."""
    from bench import profile_layer

    fused = [b for b in ("triton", "cuda") if b in BACKENDS][:1]  # the triton one runs interpreted here
    profile_layer.main(["--smoke", "--providers", ",".join([*fused, "eager"]), "--steps", "1"])
    out = capsys.readouterr().out
    infer, train = out.split("## c8_k3_s2_h9 train")
    assert "## c8_k3_s2_h9 infer" in infer
    if fused:
        assert f"### {fused[0]}" in infer and "fused_mbconv::dwconv_bn_silu" in infer
        assert "fused_mbconv::dwconv_bn_silu_backward" in train
    assert "### eager" in train and "aten::convolution_backward" in train


@pytest.mark.parametrize("op", ["dwconv", "se_project"])
def test_host_profile_lists_the_functions_that_take_the_host_time(op, capsys):
    """bench/profile_host.py on the CPU, one small layer: per mode and provider the median host
    time of a call and the profile's table, naming the layer's own forward."""
    from bench import profile_host

    profile_host.main(["--smoke", "--op", op, "--providers", "eager", "--calls", "2", "--top", "40"])
    sections = capsys.readouterr().out.split("## ")[1:]
    assert [s.split(",")[0].split()[-2:] for s in sections] == [["infer", "eager"], ["train", "eager"]]
    for section in sections:
        assert "host time per call: median" in section and "ncalls  tottime" in section
        assert ("batchnorm.py" in section) if op == "dwconv" else ("bench_se_project.py" in section)


def test_host_cost_counts_a_blocks_launches():
    """bench/host_cost.py without a GPU (a subprocess: it installs the stand-in Triton driver,
    kernels compile for sm_90): one block's host time and launches per mode, and with --list the
    fused_mbconv line of each torch kernel. Counts only bounded: the tool reports them."""
    from test_triton_compile import standin_subprocess_env

    env = standin_subprocess_env()
    done = subprocess.run([sys.executable, "bench/host_cost.py", "--rounds", "1", "--list"], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {line.split(":")[0]: line for line in done.stdout.splitlines() if line.startswith(("infer:", "train:"))}
    for mode, most_torch in (("infer", 4), ("train", 40)):
        words = lines[mode].replace(",", "").split()
        triton, torch_kernels = int(words[words.index("Triton") - 1]), int(words[words.index("torch") - 1])
        assert triton >= 4 and 0 <= torch_kernels <= most_torch, lines[mode]
    assert "dwconv_bn_silu/triton_impl.py" in done.stdout  # --list names the lines


def test_precompiled_triton_cache_is_hit_after_unpacking(tmp_path):
    """bench/precompile_triton.py (stand-in driver, kernels compiled for sm_90): a small B0
    inference step fills a cache directory and packs it without the intermediate IRs and the
    stand-in's autotuning choices; unpacked where it was built, the same step compiles nothing."""
    from test_triton_compile import standin_subprocess_env

    # one config a kernel (no autotuning): the property is the same, the compiling a third
    env = standin_subprocess_env(FUSED_MBCONV_TRITON_AUTOTUNE="0")
    cache, archive = tmp_path / "cache", tmp_path / "cache.tar.xz"
    args = [sys.executable, "bench/precompile_triton.py", "--variants", "b0", "--modes", "infer", "--batch", "2",
            "--resolution", "64", "--cache-dir", str(cache), "--out", str(archive)]  # fmt: skip

    def run(*extra) -> str:
        done = subprocess.run([*args, *extra], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        return done.stdout

    first = re.search(r"(\d+) kernels compiled, (\d+) found", run("--fresh"))
    assert int(first.group(1)) > 10, first.group(0)
    shutil.rmtree(cache)
    assert tarfile.is_tarfile(archive) and archive.read_bytes()[:6] == b"\xfd7zXZ\x00"  # xz: half gzip's size
    assert "kernels in" in run("--unpack", str(archive))
    kept = {p.suffix for p in cache.rglob("*.*")}
    assert ".cubin" in kept and not kept & {".ptx", ".ttgir", ".llir"}, kept
    assert not list(cache.rglob("*.autotune.json"))
    again = re.search(r"(\d+) kernels compiled, (\d+) found", run())
    assert again.groups() == ("0", first.group(1)), (first.group(0), again.group(0))


def test_merged_gpu_session_cache_keeps_its_autotuning(tmp_path):
    """precompile_triton.py on both sides of a GPU session: there, --pack-new packs the cache
    entries written after the unpacking's marker (not the unpacked ones); here, --merge adds them
    to the cache and the packed archive, the autotuner's timings made there included, while those
    the stand-in made are still dropped; the stamp stays."""
    from bench import precompile_triton as pre

    def files(root, *names):
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("{}")

    cache = tmp_path / "fused_mbconv_triton_cache"
    files(cache, "K1/k.cubin", "K1/k.json", "A1/f.autotune.json")
    (cache / pre.STAMP).write_text('{"triton": "x"}')
    gpu = tmp_path / "gpu" / cache.name  # the GPU machine's cache: unpacked, then its own entries
    files(gpu, "K1/k.cubin", "K1/k.json")
    marker = tmp_path / "gpu" / "unpacked"
    marker.touch()
    os.utime(marker, (marker.stat().st_mtime + 1,) * 2)  # later than the unpacked files
    files(gpu, "K2/k.cubin", "A2/g.autotune.json")
    for new_file in ("K2/k.cubin", "A2/g.autotune.json"):
        os.utime(gpu / new_file, (marker.stat().st_mtime + 1,) * 2)
    new = tmp_path / pre.NEW_ARCHIVE
    pre.main(["--cache-dir", str(gpu), "--pack-new", str(marker), str(new)])
    root = cache.name
    with tarfile.open(new) as archive:
        assert set(archive.getnames()) == {f"{root}/K2/k.cubin", f"{root}/A2/g.autotune.json"}
    out = tmp_path / "out.tar.xz"
    pre.main(["--merge", str(new), "--cache-dir", str(cache), "--out", str(out)])
    with tarfile.open(out) as archive:
        names = set(archive.getnames())
    assert {f"{root}/K1/k.cubin", f"{root}/K2/k.cubin", f"{root}/A2/g.autotune.json", f"{root}/{pre.STAMP}"} <= names
    assert f"{root}/A1/f.autotune.json" not in names
    assert json.loads((cache / pre.STAMP).read_text()) == {"triton": "x"}


def test_memory_model_fused_step_keeps_about_half_of_eagers_activations():
    """bench/memory_model.py (meta device): a B0 training step, fused vs torchvision with the same
    batch. Of each block's expanded-width tensors, eager keeps for the backward those of its
    convs, BNs, SiLUs and the SE's channel scale; the fused ops keep three (the expansion's
    pre-BN output, the depthwise conv's input and output) and recompute the rest. Parameters
    and optimizer state are the same tensors in both."""
    from bench.memory_model import training_peak

    eager = training_peak("eager", "b0", 2, 128)
    fused = training_peak("fused", "b0", 2, 128)
    for kind in ("Parameter", "Optstate"):
        assert fused[kind] == pytest.approx(eager[kind])
    assert 0.3 < fused["Activation"] / eager["Activation"] < 0.6, (fused, eager)


def test_traffic_model_counts_each_kernel_once():
    """bench/traffic_model.py's counter: a depthwise conv reads x and its weight and writes its
    output; a copy into a tensor reads the source and writes the destination; views launch
    nothing."""
    from bench.traffic_model import CountTraffic

    x = torch.empty(2, 8, 10, 10, device="meta", dtype=torch.bfloat16)
    w = torch.empty(8, 1, 3, 3, device="meta", dtype=torch.bfloat16)
    with CountTraffic() as counts:
        y = torch.nn.functional.conv2d(x, w, padding=1, groups=8)
        torch.empty(2, 8, 10, 10, device="meta").copy_(y.permute(0, 1, 3, 2))
    assert sum(counts.kernels.values()) == 2, counts.kernels
    conv = [n for name, n in counts.bytes.items() if "convolution" in name]
    assert conv == [2 * (1600 + 72 + 1600)], counts.bytes
    assert counts.bytes["aten.copy_.default"] == 2 * 1600 + 4 * 1600


def test_traffic_model_reference_steps_move_more_bytes_than_eager():
    """Why "auto" trains on the fused kernels on CUDA: the reference backend computes in fp32,
    a torch op per formula term. A bf16 B0 training step (meta device) on it moves several
    times the bytes of eager torchvision's and launches several times its kernels (B5's: 6.6x
    and 5.5x); its inference too."""
    from bench.traffic_model import step_traffic

    for mode, least in (("train", 3.0), ("infer", 2.0)):
        eager = step_traffic("eager", "b0", 2, 64, torch.bfloat16, mode)
        reference = step_traffic("reference", "b0", 2, 64, torch.bfloat16, mode)
        ratio = sum(reference.bytes.values()) / sum(eager.bytes.values())
        assert ratio > least, (mode, ratio)
        assert sum(reference.kernels.values()) > 2 * sum(eager.kernels.values()), mode


def test_tf32_emulation_rounds_as_the_kernels_and_truncation_biases_the_logits():
    """bench/tf32_emulation.py: its rounding to nearest is the one the kernels' round_to_tf32 is
    tested against (ties away), truncation drops the 13 low bits; each conv of torchvision's B0
    gets its implementation's role; with exact operands the emulated model is the float64 model;
    truncated GEMM operands put a small B0's logits further from exact than rounded ones (their
    bias adds up along each reduction); and the emulated conv's backward is autograd's with exact
    operands, within TF32's rounding with rounded ones."""
    import torchvision
    from test_triton_helpers import _tf32_nearest

    from bench import tf32_emulation as emu

    values = torch.randn(500, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 500)
    ties = torch.tensor([1 + 2.0**-11, -(1 + 3 * 2.0**-11), float("inf"), float("nan"), 3.4028234663852886e38])
    x = torch.cat([values, ties]).double()
    want = torch.tensor([_tf32_nearest(v) for v in x.tolist()], dtype=torch.float64).float().double()  # fp32's inf
    torch.testing.assert_close(emu.to_tf32(x, "nearest"), want, rtol=0, atol=0, equal_nan=True)
    truncated = emu.to_tf32(values.double(), "truncate")
    assert ((truncated.abs() <= values.abs().double()) & ((values.double() - truncated).abs() < values.abs() * 2.0**-10)).all()

    torch.manual_seed(0)
    tv = torchvision.models.efficientnet_b0().eval()
    roles = collections.Counter(emu.conv_role(n, m) for n, m in tv.named_modules() if isinstance(m, torch.nn.Conv2d))
    assert roles == {"depthwise": 16, "stem": 1, "se": 32, "gemm": 32}  # gemm: 15 expansions, 16 projections, head
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        exact = tv.double()(images)
        logits = {name: emu.emulated(tv, r)(images) for name, r in emu.IMPLEMENTATIONS.items()}
    assert torch.equal(logits["exact"], exact)
    error = {name: (y - exact).abs().max().item() for name, y in logits.items()}
    assert error["fused, truncated"] > 2 * error["fused, rounded"] > 0, error

    # the backward: exact operands give autograd's conv gradients; rounded ones are a TF32 unit off
    conv = torch.nn.Conv2d(6, 4, 3, stride=2, padding=1).double()
    inputs = torch.randn(2, 6, 9, 9, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    want = torch.autograd.grad(conv(inputs), (inputs, conv.weight, conv.bias), dy)
    for mode, most in (("exact", 1e-12), ("nearest", 2.0**-10)):
        got = torch.autograd.grad(emu._RoundedConv.apply(inputs, conv.weight, conv.bias, conv, mode),
                                  (inputs, conv.weight, conv.bias), dy)  # fmt: skip
        for name, g, w in zip(("input", "weight", "bias"), got, want):
            relative = ((g - w).abs().max() / w.abs().max()).item()
            rounded = mode == "nearest" and name != "bias"  # the bias gradient is a plain sum of dy
            assert relative < most and (not rounded or relative > 2.0**-16), (mode, name, relative)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kprofile step would run for real")
def test_gpu_check_runs_the_named_steps_in_order_within_the_budget(tmp_path):
    """bench/gpu_check.sh (the device session's script) on this machine with a 44 s budget: the
    build (150 s) and smoke (90 s) steps are skipped as over budget, kprofile (60 s, at least half
    left while the summary's start-up takes under 14 s) runs cut short (and fails here: no GPU), an
    unknown step is named, in the order given."""
    # CACHE_ARCHIVE empty: a precompiled Triton cache lying here is not tried (seconds of the budget).
    # 44 s, not 35: on a loaded 2-core machine the start-up (two torch imports) took 7 s, past 35's 5.
    env = {**os.environ, "OUT": str(tmp_path), "BUDGET_S": "44", "PYTHON": sys.executable, "CACHE_ARCHIVE": ""}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "smoke", "kprofile", "nosuch"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in (tmp_path / "summary.txt").read_text().splitlines() if ":" in line]
    steps = [line for line in lines if line.split(":")[0] in ("build", "smoke", "kprofile", "nosuch")]
    assert [line.split(":")[0] for line in steps] == ["build", "smoke", "kprofile", "nosuch"], lines
    assert "skipped" in steps[0] and "skipped" in steps[1]
    assert steps[2].startswith("kprofile: rc=1 in"), steps
    assert steps[3].startswith("nosuch: unknown step"), steps
    assert "bench/profile_layer.py" in (tmp_path / "steps.log").read_text()


def _gpu_check_with_fake_python(tmp_path, steps: list[str], body: str, out=None, **env: str):
    """Runs gpu_check.sh's ``steps`` with a stand-in python: ``python -c`` runs for real, every
    other call runs the bash ``body`` instead (no build, no carried caches unless ``env`` names
    them). Returns the run's $OUT (``out``, default tmp_path)."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [[ $1 == -c ]]; then exec {sys.executable} "$@"; fi
{body}
exit 0
""")
    fake.chmod(0o755)
    out = out or tmp_path
    env = {**os.environ, "OUT": str(out), "BUDGET_S": "2000", "PYTHON": str(fake), "CACHE_ARCHIVE": "",
           "INDUCTOR_ARCHIVE": "", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "SKIP_BUILD": "1", **env}
    env.pop("TESTS", None)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", *steps], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def _gpu_check_module_calls(tmp_path, step: str, module: str) -> list[str]:
    """gpu_check.sh's ``step``, recording each ``python -m module`` call (the autotuning switch,
    then the arguments) instead of running it, and printing it as the call's output."""
    body = f"""if [[ "$1 $2" == "-m {module}" ]]; then
  echo "autotune=$FUSED_MBCONV_TRITON_AUTOTUNE ${{*:3}}" | tee -a {tmp_path}/calls
fi"""
    _gpu_check_with_fake_python(tmp_path, [step], body)
    return (tmp_path / "calls").read_text().splitlines()


def test_gpu_check_models_step_runs_every_variant_on_the_triton_kernels(tmp_path):
    """The models step (issue 7's parity at native resolution) runs python -m fused_mbconv once per
    (variant, batch) of precompile_triton.MODELS_STEP and (dtype, TF32 setting) of MODELS_STEP_RUNS,
    backend triton, untuned: the calls whose kernels `make gpu-prep` compiles ahead, several at
    once (in any order), and each run's report in models.log under its own name. A stand-in python
    records the calls and prints a report naming its arguments."""
    from bench.precompile_triton import MODELS_STEP, MODELS_STEP_RUNS

    expected = [f"autotune=0 --variant {v} --batch {b} --dtype {d} --tf32 {t} --backend triton --steps 5"
                for v, b in MODELS_STEP for d, t in MODELS_STEP_RUNS]  # fmt: skip
    assert sorted(_gpu_check_module_calls(tmp_path, "models", "fused_mbconv")) == sorted(expected)
    assert len(expected) == 24 and {v for v, _ in MODELS_STEP} == {f"b{i}" for i in range(8)}
    assert {("float32", "torch"), ("float32", "off"), ("bfloat16", "torch")} == set(MODELS_STEP_RUNS)
    log = (tmp_path / "models.log").read_text()
    for v, b in MODELS_STEP:
        for name, args in ((f"{v}-float32", "--dtype float32 --tf32 torch"), (f"{v}-float32-tf32off",
                           "--dtype float32 --tf32 off"), (f"{v}-bfloat16", "--dtype bfloat16 --tf32 torch")):
            assert f"### models:{name} (batch {b}, 6 runs at once)\nautotune=0 --variant {v} --batch {b} {args}" in log


def test_precompiled_suite_files_are_the_tests_steps(tmp_path):
    """precompile_triton.py --suite compiles the Triton kernels of SUITE's test files, untuned:
    gpu_check.sh's tests step runs each of them, untuned (a stand-in python records the call)."""
    from bench.precompile_triton import SUITE

    (call,) = _gpu_check_module_calls(tmp_path, "tests", "pytest")
    assert call.startswith("autotune=0 "), call
    assert all((ROOT / "tests" / f"test_{name}.py").is_file() for name in SUITE)
    assert {f"tests/test_{name}.py" for name in SUITE} <= set(call.split()), call


def _kernel_csv(path, kind, mode, eager_over_fused, shapes, compile_over_fused=None, fused_pct=80.0):
    """A kernel CSV: per shape, triton at 1 ms and ``fused_pct`` of the floor, eager (and
    compile) at the given multiples."""
    rows = []
    for name in shapes:
        for provider, ms in (("triton", 1.0), ("eager", eager_over_fused), ("compile", compile_over_fused)):
            if ms is not None:
                rows.append({"kind": kind, "name": name, "provider": provider, "mode": mode, "dtype": "bfloat16",
                             "layout": "channels_last", "batch": 32, "resolution": 456, "median_ms": ms,
                             "pct_bw_floor": fused_pct / ms, "status": "ok", **ENV})  # fmt: skip
    write_rows(path, rows)
    return path


def test_targets_are_geometric_means_over_every_b5_shape(tmp_path):
    """Issue 4's kernel targets from a CSV: the geometric mean of eager's time / fused's over the
    shapes, met only when every distinct B5 shape was measured; the newest CSV wins."""
    from bench import targets

    dw = targets.KERNEL_TARGETS[0]  # dwconv infer: 2.0x eager, 1.3x compile
    shapes = targets.expected_shapes(dw.kind)
    assert len(shapes) == 14
    full = _kernel_csv(tmp_path / "2026-01-01_a.csv", dw.kind, "infer", 2.5, shapes, 1.5)
    (as_called, _) = targets.kernel_lines(dw, [full])
    assert "2.50x eager, 1.50x compile; 14 of 14 shapes" in as_called[2] and as_called[3] == "met"
    half = _kernel_csv(tmp_path / "2026-01-02_b.csv", dw.kind, "infer", 2.5, shapes[:7])
    (newest, _) = targets.kernel_lines(dw, [full, half])
    assert "7 of 14 shapes" in newest[2] and newest[4] == half.name
    assert newest[3] == "eager: met on the shapes measured; compile: not measured"
    slow = _kernel_csv(tmp_path / "2026-01-03_c.csv", dw.kind, "infer", 1.2, shapes, 1.5, fused_pct=70.0)
    assert targets.kernel_lines(dw, [full, slow])[0][3] == "eager: **not met**; compile: met"
    assert targets.floor_lines([full])[0][2:4] == ["lowest 80% (c48_k3_s1_h228); 14 of 14 layers", "met"]
    floor = targets.floor_lines([slow])
    assert "lowest 70%" in floor[0][2] and floor[0][3] == "**not met**"
    assert floor[1][3] == "not measured"  # no training rows


def test_model_targets_name_the_eager_call_beside_the_fastest_fused_provider(tmp_path):
    csv_path = tmp_path / "run.csv"
    rows = [_row("eager", 100.0, "train"), _row("fused", 50.0, "train"), _row("fused-triton+graph", 150.0, "train"),
            _row("compile-max-autotune", 120.0, "train")]  # fmt: skip
    for r in rows:
        r.update(name="efficientnet_b5", batch=16, resolution=456, peak_mem_mb=60.0 if r["provider"] == "fused" else 100.0)
    write_rows(csv_path, rows)
    from bench import targets

    (_, train) = targets.model_lines([csv_path])
    assert train[2] == ("1.50x eager (fused-triton+graph); 1.25x compile-max-autotune; "
                        "called eagerly 0.50x eager (fused); memory 0.60x eager's (fused)")  # fmt: skip
    assert train[3] == "eager: met; compile: met; memory: met"
    oom = _row("eager", 0.0, "train", status="oom")
    oom.update(name="efficientnet_b5", batch=16, img_per_s="")
    write_rows(csv_path, [oom], append=False)
    assert targets.model_lines([csv_path])[1][3] == "not measured"  # no eager figure: nothing to compare


def test_benchmarks_md_is_regenerated_from_the_committed_results():
    """BENCHMARKS.md is `python -m bench.targets`'s output over bench/results: rerun it after
    committing a GPU run's CSVs."""
    from bench import targets

    current = targets.benchmarks_md(targets.gpu_csvs())
    assert (ROOT / "BENCHMARKS.md").read_text() == current, "BENCHMARKS.md is stale: run python -m bench.targets"


def test_gpu_check_carries_inductors_cache_between_sessions(tmp_path):
    """What torch.compile cached in one GPU session (TORCHINDUCTOR_CACHE_DIR) comes back as
    $OUT/inductor-cache.tar.xz, and the next session, carrying it, starts with those files; a run
    that adds nothing returns no archive. A stand-in python writes (and lists) the cache."""
    body = """if [[ "$1 $2" == "-m bench" ]]; then
  ls -R "$TORCHINDUCTOR_CACHE_DIR" >"$OUT/seen.txt"
  [[ -n $WRITE ]] && mkdir -p "$TORCHINDUCTOR_CACHE_DIR/fxgraph" && echo graph >"$TORCHINDUCTOR_CACHE_DIR/fxgraph/$WRITE"
fi"""

    def session(name: str, archive: str, write: str) -> Path:
        return _gpu_check_with_fake_python(tmp_path, ["bench_model"], body, out=tmp_path / name,
                                           INDUCTOR_ARCHIVE=archive, WRITE=write,
                                           TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"{name}-inductor"))  # fmt: skip

    first = session("first", "", "graph-a")
    assert "graph-a" not in (first / "seen.txt").read_text()
    with tarfile.open(first / "inductor-cache.tar.xz") as archive:
        assert "./fxgraph/graph-a" in archive.getnames()
    second = session("second", str(first / "inductor-cache.tar.xz"), "")
    assert "graph-a" in (second / "seen.txt").read_text()
    assert "inductor cache: 1 files from" in (second / "summary.txt").read_text()
    assert not (second / "inductor-cache.tar.xz").exists()  # nothing new


@pytest.mark.parametrize("shapes", ["quick", "all"])
def test_gpu_check_kernel_benches_run_every_b5_shape_when_asked(tmp_path, shapes):
    """bench_dw and bench_se time B5's three --quick shapes, or with BENCH_SHAPES=all every
    distinct one (the shapes issues 4 and 5 set their targets over; precompile_triton.py
    --kernel-benchmarks compiles them all). A stand-in python records the calls."""
    body = f"""if [[ $1 == bench/bench_*.py ]]; then echo "$*" >>{tmp_path}/calls; fi"""
    _gpu_check_with_fake_python(tmp_path, ["bench_dw", "bench_se"], body, BENCH_SHAPES=shapes)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["bench/bench_dwconv.py", "bench/bench_se_project.py"]
    assert all(("--quick" in c.split()) == (shapes == "quick") for c in calls), calls
