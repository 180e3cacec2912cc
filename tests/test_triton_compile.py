"""Ahead-of-time GPU compilation of every launched Triton kernel, on a machine without a GPU.

The rest of the suite runs the Triton kernels through TRITON_INTERPRET=1, which never lowers them
to PTX: type errors in tl.dot operands, ops the GPU backend does not support, or register
blow-ups only show on a GPU. This test compiles each ``*_kernel`` of the ops' ``triton_impl`` modules
and of ``fused_mbconv.ops._triton`` with triton's own compiler for sm_90 (and, once each, sm_80)
through ptxas, in a subprocess without TRITON_INTERPRET, and fails on any compile error (kernel,
configuration and the compiler's message listed). Register use and spills (ptxas -v) are
reported, never asserted: ``python tests/test_triton_compile.py --markdown
bench/results/triton_sm90_registers.md`` rewrites the committed table ("compiled, not run"), as
does the test with FUSED_MBCONV_REGISTERS_MD=<path>.

What is compiled (signatures from the ``_plan`` table below, mirroring the host launch sites:
pointers typed by the tensor the host passes (fp32 for internal partials and statistics), sizes
and strides i32 without the ==1 / %16 specializations, scalars fp32):

- sm_90, bf16: every kernel x every constexpr flag combination the host code launches it with
  (dwconv: also every kernel size 3/5 x stride 1/2), first autotune config;
- sm_90, bf16: every other GPU autotune config once, on the kernel's first (richest) variant
  (or the one its plan row's ``config_variant`` names);
- sm_90, fp32 and fp16: every kernel once (first config, first variant); in fp32 the GEMMs with
  both dot precisions the host picks from (tf32, ieee);
- sm_80: every kernel once in bf16 (first config, first variant), and the GEMMs in fp32.

Identical signatures (kernels with only fp32 pointers) compile once. Two worker processes;
FUSED_MBCONV_COMPILE_JOBS overrides. Skipped when triton's NVIDIA backend or ptxas is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = ROOT / "bench" / "results" / "triton_sm90_registers.md"
MODULES = {
    "dwconv": "fused_mbconv.ops.dwconv_bn_silu.triton_impl",
    "se": "fused_mbconv.ops.squeeze_excite.triton_impl",
    "project": "fused_mbconv.ops.project_bn.triton_impl",
    "common": "fused_mbconv.ops._triton",
    "stats": "fused_mbconv.ops.running_stats.triton_impl",
}
D, F32 = "D", "fp32"  # a pointer in the op's dtype / an fp32 buffer whatever the op's dtype
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


# ---------------------------------------------------------------------------------------------
# the plan: one row per kernel (runs in the subprocess, where the modules import for the GPU)


def _grid(**axes) -> list[dict]:
    """Every combination of the given constexpr values, the first values first."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _times(variants: list[dict], others: list[dict]) -> list[dict]:
    return [{**v, **o} for v in variants for o in others]


def _plan() -> list[dict]:
    """Kernel rows: ``module``, ``kernel``; ``ptrs`` pointer params that are fp32 buffers (the rest
    follow the op's dtype); ``tuples`` params passed as a 4-D tensor's strides; ``floats`` fp32
    scalars; ``variants`` the constexpr values (and per-variant pointer dtypes) the host code
    launches with, the first being the richest; ``config_variant(cfg)`` the variant to compile an
    autotune config other than the first with (None: the first); ``dot`` kernels that use tl.dot
    (also compiled for sm_80); ``optional`` flags dropped from the variants while the kernel lacks
    them (a flag being added). Autotuned tile sizes come from the kernel's own config list."""
    import triton

    from fused_mbconv.ops import _triton as common

    # every depthwise kernel is specialized on the kernel size and the stride: each flag combination
    # with k3 s2, then every other (k, s) with the first flags (k5 compiles take 5-15 s each)
    shapes = [{"K": k, "STRIDE": s} for k, s in [(3, 2), (3, 1), (5, 1), (5, 2)]]

    def dw_shapes(flags: list[dict]) -> list[dict]:
        return [{**f, **shapes[0]} for f in flags] + [{**flags[0], **s} for s in shapes[1:]]

    # eval mode passes BN's weight, bias and running statistics (the model's dtype); training the
    # batch mean as the center and an fp32 scale; the raw inference op any (scale, shift)
    centered = [{"CENTERED": True, "NORMALIZE": True},
                {"CENTERED": True, "NORMALIZE": False, "center_ptr": F32, "scale_ptr": F32, "var_ptr": F32},
                {"CENTERED": False, "NORMALIZE": False}]  # fmt: skip
    # inference: any gate / residual / branch scale, SiLU for the expansion; training: the GEMM
    # with statistics (then _normalize_kernel)
    project = [
        *[{**v, "AFFINE": True, "NORMALIZE": True, "STATS": False}
          for v in _grid(HAS_GATE=(True, False), HAS_RES=(True, False), HAS_BS=(True, False), ACT=(True, False))],
        {"HAS_GATE": True, "AFFINE": True, "NORMALIZE": False, "ACT": False, "HAS_RES": True, "HAS_BS": True,
         "STATS": False},  # the raw op with a folded (scale, shift)
        *[{"HAS_GATE": g, "AFFINE": False, "NORMALIZE": False, "ACT": False, "HAS_RES": False, "HAS_BS": False,
           "STATS": True, "count_part_ptr": F32, "mean_part_ptr": F32, "m2_part_ptr": F32} for g in (True, False)],
    ]  # fmt: skip
    fp32_dz = {"dz_ptr": F32, "ALIGN": 4}
    bn_per_channel = dict.fromkeys(["mean_ptr", "invstd_ptr"], F32)  # gamma and beta: the parameters' dtype
    dw_per_channel = {"mean_ptr": F32, "invstd_ptr": F32, "w_ptr": F32}  # w: the taps, fp32
    excite_scratch = {"h_ptr": F32, "dl_ptr": F32, "dh_ptr": F32}
    # the stats merge's channel blocks, 16 to 128 wide, as combine_stats picks them
    stats_blocks = [{"BLOCK_G": common._STATS_BLOCK // bc, "BLOCK_C": bc} for bc in (128, 64, 32, 16)]
    return [
        # fused_mbconv.ops._triton: out is fp32 sums, or the dtype of dweight / squeeze / dgate
        dict(module="common", kernel="_sum_rows_kernel", ptrs={"part_ptr": F32},
             variants=[{"BLOCK_G": common._SUM_BLOCK_G, "BLOCK_L": common._SUM_BLOCK_L}]),
        dict(module="common", kernel="_combine_stats_kernel", floats=("eps",),
             ptrs=dict.fromkeys(["count_part_ptr", "mean_part_ptr", "m2_part_ptr", "mean_ptr", "var_ptr",
                                 "scale_ptr", "shift_ptr"], F32),
             variants=[{"AFFINE": True, "SHIFT": True, **blocks} for blocks in stats_blocks]
             + [{"AFFINE": a, "SHIFT": False, **stats_blocks[0]} for a in (True, False)]),
        dict(module="common", kernel="_merge_stats_kernel",
             ptrs=dict.fromkeys(["count_part_ptr", "mean_part_ptr", "m2_part_ptr", "count_out_ptr", "mean_out_ptr",
                                 "m2_out_ptr"], F32), variants=stats_blocks),
        # the running statistics: fp32 batch statistics into buffers of the model's dtype
        dict(module="stats", kernel="_update_kernel", ptrs={"mean_ptr": F32, "var_ptr": F32},
             floats=("momentum", "unbias"), variants=[{"BLOCK": 256}]),
        # the eval-mode fold: a bf16 model's parameters and buffers into fp32 scale and shift
        dict(module="stats", kernel="_fold_kernel", ptrs={"scale_ptr": F32, "shift_ptr": F32}, floats=("eps",),
             variants=[{"HAS_WEIGHT": a, "HAS_BIAS": a, "BLOCK": 256} for a in (True, False)]),
        # depthwise conv + BN + SiLU
        dict(module="dwconv", kernel="_conv_bn_silu_kernel", ptrs={"sq_ptr": F32, "w_ptr": F32}, tuples=("sx", "sw", "sy"),
             floats=("inv_p_out", "eps"), variants=dw_shapes(_times(centered, _grid(WITH_SQUEEZE=(True, False))))),
        dict(module="dwconv", kernel="_conv_stats_kernel",
             ptrs=dict.fromkeys(["w_ptr", "count_part_ptr", "mean_part_ptr", "m2_part_ptr"], F32),
             tuples=("sx", "sw"), variants=dw_shapes([{}])),
        dict(module="dwconv", kernel="_dz_sums_kernel", ptrs={**dw_per_channel, "part_ptr": F32},
             tuples=("sx", "sw", "sdy"), floats=("inv_p_out",), variants=dw_shapes(_grid(HAS_DSQ=(True, False)))),
        dict(module="dwconv", kernel="_dconv_kernel",
             ptrs={**dw_per_channel, "sums_ptr": F32, "sums_part_ptr": F32, "dw_part_ptr": F32},
             tuples=("sx", "sw", "sdy", "sdc"), floats=("inv_count", "inv_p_out"),
             variants=[{**v, "KK_PAD": triton.next_power_of_2(v["K"] ** 2)}
                       for v in dw_shapes(_grid(HAS_DSQ=(True, False), TRAINING=(True, False)))],
             # the taps-per-strip configs only run at K = 5 (at K = 3 every config keeps them so)
             config_variant=lambda cfg: {"HAS_DSQ": True, "TRAINING": True, "K": 5, "STRIDE": 1, "KK_PAD": 32}
             if cfg.kwargs["TAPS_PER_STRIP"] else None),
        dict(module="dwconv", kernel="_dx_kernel", tuples=("sdc", "sw", "sdx"), ptrs={"w_ptr": F32},
             variants=dw_shapes([{"PAD_ODD": 0}, {"PAD_ODD": 1}])),
        # squeeze-excite: a reduction over H*W writes fp32 partials when it is split
        dict(module="se", kernel="_squeeze_kernel", floats=("inv_hw",),
             variants=_grid(FLAT=(True, False), out_ptr=(D, F32))),
        dict(module="se", kernel="_scale_kernel", variants=_grid(FLAT=(True, False))),
        dict(module="se", kernel="_scale_backward_kernel", variants=_grid(FLAT=(True, False), dgate_ptr=(D, F32))),
        # the excite's phases: fp32 scratch between them; the gate kernel writes the gate (the
        # forward) or the fp32 dlogits (the backward, reading dgate)
        dict(module="se", kernel="_excite_hidden_kernel", ptrs={"h_ptr": F32}, dot=True),
        dict(module="se", kernel="_excite_gate_kernel", ptrs={"h_ptr": F32}, dot=True,
             variants=[{"BACKWARD": True, "out_ptr": F32}, {"BACKWARD": False}]),
        dict(module="se", kernel="_excite_dh_kernel", ptrs=excite_scratch, dot=True),
        dict(module="se", kernel="_excite_backward_columns_kernel", ptrs=excite_scratch, dot=True),
        # projection: a GEMM (tf32 / ieee for fp32 by torch's flag, added per dtype) and BN passes
        dict(module="project", kernel="_project_kernel", variants=project, floats=("eps",), dot=True,
             optional=("ACT",)),
        dict(module="project", kernel="_normalize_kernel", ptrs={"a_ptr": F32, "b_ptr": F32}, optional=("ACT",),
             variants=_grid(HAS_RES=(True, False), HAS_BS=(True, False), ACT=(True, False))),
        dict(module="project", kernel="_dy_sums_kernel", ptrs={**bn_per_channel, "part_ptr": F32}, optional=("ACT",),
             variants=_grid(HAS_BS=(True, False), ACT=(True, False))),
        # dz: fp32 for the projection (16-byte vectors then hold 4 channels), the activation's
        # dtype for the expansion (ACT)
        dict(module="project", kernel="_dz_kernel", ptrs={**bn_per_channel, "sums_ptr": F32}, floats=("inv_count",),
             optional=("ACT",), variants=[{**v, **({"dz_ptr": D} if v["ACT"] else fp32_dz)}
                                          for v in _grid(HAS_BS=(True, False), ACT=(True, False), TRAINING=(True, False))]),
        # without a gate the host passes dx as the (unused) dgate partials
        dict(module="project", kernel="_dx_kernel", dot=True,
             variants=[{"HAS_GATE": True, "dgate_part_ptr": F32, **fp32_dz}, {"HAS_GATE": False, **fp32_dz},
                       {"HAS_GATE": False, "dz_ptr": D}]),
        dict(module="project", kernel="_dweight_kernel", ptrs={"part_ptr": F32}, dot=True,
             variants=[{"HAS_GATE": True, **fp32_dz}, {"HAS_GATE": False, **fp32_dz}, {"HAS_GATE": False, "dz_ptr": D}]),
    ]  # fmt: skip


def _jit_function(obj):
    """The JITFunction under autotune / heuristics wrappers."""
    import triton

    while not isinstance(obj, triton.runtime.jit.JITFunction):
        obj = obj.fn
    return obj


def _configs(obj) -> list | None:
    """The autotune configs of a launched kernel object (the GPU list: not interpreted here)."""
    import triton

    while not isinstance(obj, triton.runtime.jit.JITFunction):
        if isinstance(obj, triton.runtime.autotuner.Autotuner):
            return list(obj.configs)
        obj = obj.fn
    return None


def _config_label(cfg) -> str:
    if cfg is None:
        return "-"
    sizes = "x".join(str(v) for v in cfg.kwargs.values())
    return f"{sizes} w{cfg.num_warps} s{cfg.num_stages}"


def _variant_label(variant: dict) -> str:
    parts = []
    for key, value in variant.items():
        if key.startswith("BLOCK_") or key == "KK_PAD":
            parts.append(f"{key}={value}")
        elif key.endswith("_ptr"):
            parts.append(f"{key[:-4]}:{value if value != D else 'D'}")
        elif isinstance(value, bool):
            parts.append(key if value else f"!{key}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _job(row: dict, fn, dtype: str, variant: dict, cfg, arch: int, tier: str) -> dict:
    """One compilation: the signature, constexprs and options of the kernel as the host launches it."""
    params = [p.name for p in fn.params]
    variant = {k: v for k, v in variant.items() if k in params or k not in row.get("optional", ())}
    unknown = set(variant) - set(params)
    if unknown:
        raise KeyError(f"{row['kernel']}: the plan names {sorted(unknown)}, not parameters of the kernel")
    # ALIGN (_triton.vector_alignment): the 16-byte channel vectors of channels_last EfficientNet widths
    values = {"ALIGN": 4 if dtype == "fp32" else 8, **variant, **(cfg.kwargs if cfg is not None else {})}
    signature, constexprs = {}, {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            if name not in values:
                raise KeyError(f"{row['kernel']}: no value for constexpr {name} in the plan")
            signature[name] = "constexpr"
            constexprs[name] = values[name]
        elif name.endswith("_ptr"):
            kind = values.get(name, row.get("ptrs", {}).get(name, D))
            signature[name] = "*" + (dtype if kind == D else kind)
        elif name in row.get("tuples", ()):
            signature[name] = ["i32"] * 4
        elif name in row.get("floats", ()):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    options = {"num_warps": 4, "num_stages": 3}
    if cfg is not None:
        options.update({k: v for k, v in cfg.all_kwargs().items() if k not in cfg.kwargs})
    follows_dtype = any(values.get(p, row.get("ptrs", {}).get(p, D)) == D for p in params if p.endswith("_ptr"))
    return {
        "module": row["module"], "kernel": row["kernel"], "label": f"{row['module']}.{row['kernel']}",
        "arch": arch, "dtype": dtype if follows_dtype else "fp32 only", "tier": tier,
        "variant": _variant_label(variant), "config": _config_label(cfg),
        "signature": signature, "constexprs": constexprs, "options": options,
    }  # fmt: skip


def _precisions(fn, dtype: str) -> list[dict]:
    """tl.dot precisions the host passes: fp32 follows torch's TF32 flag, fp16/bf16 always 'tf32'."""
    if "PRECISION" not in [p.name for p in fn.params]:
        return [{}]
    return [{"PRECISION": "tf32"}, {"PRECISION": "ieee"}] if dtype == "fp32" else [{"PRECISION": "tf32"}]


def build_jobs() -> tuple[list[dict], list[str]]:
    """The compilations of the plan, deduplicated, and the launched kernels the plan misses."""
    import importlib

    modules = {key: importlib.import_module(name) for key, name in MODULES.items()}
    plan = _plan()
    planned = {(row["module"], row["kernel"]) for row in plan}
    missing = [
        f"{key}.{name}"
        for key, module in modules.items()
        for name, obj in vars(module).items()
        if name.endswith("_kernel") and _jit_function(obj).module == module.__name__ and (key, name) not in planned
    ]
    jobs, seen = [], set()

    def add(row, fn, dtype, variant, cfg, arch, tier):
        for precision in _precisions(fn, dtype):
            job = _job(row, fn, dtype, {**variant, **precision}, cfg, arch, tier)
            key = json.dumps([job["label"], arch, job["signature"], job["constexprs"], job["options"]],
                             sort_keys=True, default=str)  # fmt: skip
            if key not in seen:
                seen.add(key)
                jobs.append(job)

    for row in plan:
        obj = getattr(modules[row["module"]], row["kernel"])
        fn = _jit_function(obj)
        configs = _configs(obj) or [None]
        variants = row.get("variants", [{}])
        for variant in variants:
            add(row, fn, "bf16", variant, configs[0], 90, "flags")
        for cfg in configs[1:]:
            add(row, fn, "bf16", row.get("config_variant", lambda cfg: None)(cfg) or variants[0], cfg, 90, "configs")
        for dtype in ("fp32", "fp16"):
            add(row, fn, dtype, variants[0], configs[0], 90, "dtypes")
        if row.get("dot"):  # sm_80 lowers tl.dot differently (mma, not wgmma)
            for dtype in ("bf16", "fp32"):
                add(row, fn, dtype, variants[0], configs[0], 80, "sm80")
    return jobs, missing


# ---------------------------------------------------------------------------------------------
# compilation (subprocess side)


def _ptxas_path() -> str | None:
    try:
        from triton.backends.nvidia import compiler as nv
    except Exception:
        return None
    for get in (lambda: nv.get_ptxas(90).path, lambda: nv.get_ptxas().path, lambda: nv._path_to_binary("ptxas")[0]):
        try:
            path = get()
        except Exception:
            continue
        if path and os.access(path, os.X_OK):
            return path
    return None


def standin_subprocess_env(**extra: str) -> dict:
    """The environment of a subprocess that compiles the kernels for sm_90 through
    bench/standin_driver.py (TRITON_INTERPRET removed, ``extra`` added); skips the calling test
    where triton's NVIDIA backend or ptxas is missing."""
    pytest.importorskip("triton.backends.nvidia.driver")
    if _ptxas_path() is None:
        pytest.skip("ptxas unavailable: nothing compiles")
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **extra}


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spills": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def _parse_ptxas(log: str) -> dict:
    regs = _PTXAS_RE["registers"].search(log)
    spills = _PTXAS_RE["spills"].search(log)
    stack = _PTXAS_RE["stack"].search(log)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
        "stack": int(stack.group(1)) if stack else None,
    }


def _compile(job: dict) -> dict:
    """Compile one job; the ptxas -v statistics from triton's log, else from a rerun of ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = __import__(MODULES[job["module"]], fromlist=["_"])
    fn = _jit_function(getattr(module, job["kernel"]))
    signature = {k: tuple(v) if isinstance(v, list) else v for k, v in job["signature"].items()}
    result = {k: v for k, v in job.items() if k not in ("signature", "constexprs")}
    start = time.perf_counter()
    log = io.StringIO()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=job["constexprs"])
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints the ptxas -v log
            compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    except Exception as e:  # noqa: BLE001 - every compiler failure is a finding to report
        message = f"{type(e).__name__}: {e}"
        result.update(ok=False, error=message[-4000:], seconds=round(time.perf_counter() - start, 2))
        return result
    stats = _parse_ptxas(log.getvalue())
    if stats["registers"] is None:  # a triton without the log knob: run ptxas -v on the PTX
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(compiled.asm["ptx"])
            arch = f"sm_{job['arch']}a" if job["arch"] == 90 else f"sm_{job['arch']}"
            run = subprocess.run([_ptxas_path(), "-v", f"--gpu-name={arch}", str(ptx), "-o", str(ptx) + ".o"],
                                 capture_output=True, text=True)  # fmt: skip
            stats = _parse_ptxas(run.stderr + run.stdout)
    result.update(ok=True, shared=compiled.metadata.shared, seconds=round(time.perf_counter() - start, 2), **stats)
    return result


def _source() -> str:
    """The commit the kernels come from, and whether their files differ from it."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        files = [str(Path(*name.split(".")).with_suffix(".py")) for name in MODULES.values()]
        dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", *files]).returncode != 0
    except OSError:
        return "an unknown commit"
    return f"commit {head or '?'}" + (" with uncommitted changes to them" if dirty else "")


def run_all(jobs_n: int) -> dict:
    """Compile the whole plan; a JSON-able report."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import triton

    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return {"skip": f"triton's NVIDIA backend does not import: {e}"}
    ptxas = _ptxas_path()
    if ptxas is None:
        return {"skip": "ptxas of triton's NVIDIA backend not found"}
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    start = time.perf_counter()
    jobs, missing = build_jobs()
    context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
    with ProcessPoolExecutor(max_workers=jobs_n, mp_context=context) as pool:
        results = list(pool.map(_compile, jobs))
    return {
        "source": _source(),
        "triton": triton.__version__,
        "ptxas": version[-1] if version else "?",
        "date": datetime.date.today().isoformat(),
        "seconds": round(time.perf_counter() - start, 1),
        "workers": jobs_n,
        "missing": missing,
        "results": results,
    }


# ---------------------------------------------------------------------------------------------
# report


def _row(r: dict) -> str:
    spills = "-" if r.get("spill_stores") is None else f"{r['spill_stores']} / {r['spill_loads']}"
    return (f"| {r['label']} | sm_{r['arch']} | {r['dtype']} | {r['variant'] or '-'} | {r['config']} | "
            f"{r.get('registers', '-')} | {spills} | {r.get('stack', '-')} | {r.get('shared', '-')} |")  # fmt: skip


_HEADER = (
    "| kernel | arch | dtype | constexprs | config (tile w s) | registers | spill st / ld (bytes) | stack | smem |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def _worst(results: list[dict]) -> list[dict]:
    """Per kernel, its compilation with the most spilled bytes (then registers)."""
    worst = {}
    for r in results:
        if r["ok"]:
            score = ((r["spill_stores"] or 0) + (r["spill_loads"] or 0), r["registers"] or 0)
            if r["label"] not in worst or score > worst[r["label"]][0]:
                worst[r["label"]] = (score, r)
    return [r for _, r in sorted(worst.values(), key=lambda item: item[0], reverse=True)]


def table(report: dict) -> str:
    ok = [r for r in report["results"] if r["ok"]]
    spilling = [r for r in ok if (r["spill_stores"] or 0) > 0]
    lines = [
        f"{len(report['results'])} compilations in {report['seconds']} s ({report['workers']} workers), "
        f"{len(report['results']) - len(ok)} failed, {len(spilling)} spill registers to local memory",
        "",
        "Worst compilation of each kernel (most spilled bytes):",
        "",
        _HEADER,
        *(_row(r) for r in _worst(report["results"])),
        "",
        "Every compilation:",
        "",
        _HEADER,
        *(_row(r) for r in sorted(ok, key=lambda r: (r["label"], -r["arch"]))),  # plan order within
    ]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    body = table(report).split("\n", 1)[1]  # without the timing line
    return f"""# Registers and spills of the Triton kernels (compiled, not run)

Made by `python tests/test_triton_compile.py --markdown {MARKDOWN.relative_to(ROOT)}` on a machine
without a GPU: each kernel compiled ahead of time by triton {report["triton"]} (ptxas: {report["ptxas"]})
for sm_90 (and sm_80), statistics from `ptxas -v`. Date: {report["date"]}; kernels of {report["source"]}.
Nothing here ran on a GPU: register counts are ptxas's, and the GPU machine's triton (and its ptxas)
may differ. Compiled without a launch's specialization (unit strides as constants, divisibility
by 16), so loads here are often scalar where a channels_last launch's are 16-byte vectors: for
the SASS of kernels compiled as launched, see `python bench/triton_sass.py`. Coverage: see the docstring of tests/test_triton_compile.py. dtype is the op's dtype
(internal partials and statistics are fp32; "fp32 only": no pointer follows it); config is the
autotune config (tile sizes, warps, stages), "-" for kernels launched with fixed tiles.
{body}
"""


def _compile_report(timeout: float = 900) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        env.update(TRITON_CACHE_DIR=str(Path(tmp) / "cache"), TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
        out = Path(tmp) / "report.json"
        proc = subprocess.run(
            [sys.executable, __file__, "--json", str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if proc.returncode != 0 or not out.exists():
            raise AssertionError(f"the compile subprocess failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
        return json.loads(out.read_text())


def test_every_triton_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    report = _compile_report()
    if "skip" in report:
        pytest.skip(report["skip"])
    print()
    print(table(report))
    if os.environ.get("FUSED_MBCONV_REGISTERS_MD"):  # CI: publish the table (e.g. MARKDOWN)
        Path(os.environ["FUSED_MBCONV_REGISTERS_MD"]).write_text(markdown(report))
    failures = [r for r in report["results"] if not r["ok"]]
    problems = [f"launched kernels missing from the plan of {Path(__file__).name}: {report['missing']}"] * bool(
        report["missing"]
    )
    problems += [
        f"{r['label']} sm_{r['arch']} {r['dtype']} [{r['variant']}] config {r['config']}:\n{r['error']}"
        for r in failures
    ]
    assert not problems, f"{len(failures)} of {len(report['results'])} compilations failed\n\n" + "\n\n".join(problems)


def _triton_sass(*args: str) -> subprocess.CompletedProcess:
    """bench/triton_sass.py at 40 channels on 9 x 9 planes with these extra arguments, compiled
    (not interpreted) into a fresh cache; skipped where triton's NVIDIA tools are missing."""
    triton = pytest.importorskip("triton")
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if _ptxas_path() is None or not all((tools / t).exists() for t in ("nvdisasm", "cuobjdump")):
        pytest.skip("triton's NVIDIA backend (ptxas, nvdisasm, cuobjdump) is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        env.update(TRITON_CACHE_DIR=str(Path(tmp) / "cache"))
        proc = subprocess.run([sys.executable, "bench/triton_sass.py", "--channels", "40", "--size", "9", *args],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_launch_specialized_kernels_move_whole_channel_vectors():
    """Compiled as a channels_last bf16 launch specializes them (bench/triton_sass.py), with 40
    channels (no multiple of 16, so triton alone would not know the rows' alignment): the
    depthwise kernels and the GEMMs load and store 16 bytes at a time (LDG.E.128 / STG.E.128,
    LDGSTS.128; 8 in configs of 4 channels a thread), never element by element, and the GEMMs run
    on Hopper's wgmma (HGMMA), the projection's gate applied in bf16 pairs. No depthwise kernel, inference or training, issues a global load
    of 4 bytes or less (the per-channel fp32 vectors, the taps and the squeeze gradient included);
    the training kernels' few per-program partial stores may."""
    proc = _triton_sass()
    print(proc.stdout)
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| dwconv", "| projection", "| expansion"))]
    assert len(rows) == 19, proc.stdout  # 8 inference, 8 training, 3 GEMMs
    for row in rows:
        # a thread's vector: 8 channels, 16 bytes; 4 channels, 8 bytes, in the configs that keep the
        # dweight taps per strip
        vector = "64" if "taps per strip" in row else "128"
        assert f"LDG.E.{vector}" in row or "LDGSTS.E.BYPASS.128" in row, row
        assert ".U16" not in row, row
        if not row.startswith(("| dwconv statistics", "| dwconv BN-backward sums")):  # these store partials only
            assert f"STG.E.{vector}" in row, row
    narrow_loads = re.compile(r"\d+ LDG\.E(\.[US](8|16))?(,| \|)")  # plain LDG.E: 32 bits
    assert not [row for row in rows if row.startswith("| dwconv") and narrow_loads.search(row)], proc.stdout
    assert all("HGMMA" in row for row in rows if not row.startswith("| dwconv")), proc.stdout
    # the projection's SE gate multiplies x's tile in bf16 pairs (one rounding, as through fp32)
    gemms = {row.split("|")[1].strip(): row.split("|")[6].strip() for row in rows if not row.startswith("| dwconv")}
    assert all(int(pairs) > 0 for name, pairs in gemms.items() if name.startswith("projection")), gemms
    assert all(int(pairs) == 0 for name, pairs in gemms.items() if name.startswith("expansion")), gemms


def test_depthwise_kernels_compile_for_nchw_launches():
    """An NCHW tensor's unit stride along W reaches the kernel as a constant, not an i32 (triton
    specializes integer arguments equal to 1): the depthwise kernels must compile so too (on the
    H200 of 2026-11-26 every NCHW Triton depthwise test failed to compile, `.to()` on that
    constant). Inference and the four training kernels at k3, one config each."""
    proc = _triton_sass("--layout", "nchw", "--quick")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| dwconv")]
    assert len(rows) == 5, proc.stdout


# ---------------------------------------------------------------------------------------------
# command line: the subprocess, and the markdown table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the JSON report here (default: stdout)")
    parser.add_argument("--markdown", help="compile (as the test does) and write the register table here")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("FUSED_MBCONV_COMPILE_JOBS", "2")))
    args = parser.parse_args()
    if args.markdown:
        report = _compile_report()
        if "skip" in report:
            sys.exit(report["skip"])
        print(table(report))
        Path(args.markdown).write_text(markdown(report))
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter does not compile")
    report = run_all(max(1, args.jobs))
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
