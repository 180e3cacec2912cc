"""Triton's kernel cache for the GPU session, compiled on a machine without a GPU.

A device session has 15 minutes in all, and on a bare machine the first call of every fused
Triton kernel compiles it: B5's training step under autotuning compiles hundreds, more than a
session (bench/results/2026-11-26_h200_host_share.md, section 4). None of that needs a GPU.
Triton keys its on-disk cache on its own build (triton_key: its sources and libtriton), the
kernel's source and specialization, the target (cuda:90), the compile options and its
cache-relevant environment, and names the files by absolute path. So this runs the GPU
benchmark's fused-triton workloads through bench/standin_driver.py, with the device's Python,
torch and triton (a venv made with them: the image has Python 3.12, torch 2.11.0, triton 3.6.0),
the kernels sized for the H100/H200's 132 multiprocessors, into CACHE_DIR, the path the device
unpacks it to; and packs that directory with a stamp of the versions and triton_key.
bench/gpu_check.sh unpacks it there after its build step when the device's triton_key, ptxas
and cache-relevant environment match the stamp's.

    make test-oldest     # makes .venv-oldest (Python 3.12, torch 2.11, triton 3.6; ~4 GB) and tests on it
    make gpu-prep        # then all of it: B0-B7, the kernel benchmarks, the blocks, the sweeps, the models step
    bash bench/gpu_check.sh ... with `carry: [".triton-cache.tar.xz"]` in the device tool's call

The archive is xz-compressed: the device tool sends at most 64 MiB, tree and carried paths
together, and gzip had the 1902 kernels of 2026-11-27 at 58.1 MiB, xz has 29.8 MiB (the cubins
are 214 MiB unpacked), which leaves room for what later sessions merge in.

(Written 2026-11-26 with the triton 3.6.0 wheel from PyPI, whose triton_key the device's must
match; whether it does is first seen in the next GPU session's summary.txt.)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

CACHE_DIR = "/tmp/fused_mbconv_triton_cache"  # the same absolute path on both machines
STAMP = "fused_mbconv_stamp.json"
GPU_TUNED = "fused_mbconv_gpu_tuned.txt"  # the autotuner's choices made on a GPU (--merge), one path a line
GPU_MULTIPROCESSORS = 132  # H100 SXM and H200
ARCHIVE = ".triton-cache.tar.xz"  # git-ignored; carried to the device
NEW_ARCHIVE = "triton-cache-new.tar.xz"  # what a GPU session adds (gpu_check.sh writes it into $OUT)
# the device tool carries at most 64 MiB, the tree's ~1.5 MiB included; past this the pack warns
CARRY_WARN_MIB = 60


def stamp() -> dict:
    """This machine's inputs to triton's cache keys that are not the kernels' own (triton's build,
    ptxas, the cache-relevant environment), and the versions for the record."""
    import platform

    import torch
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.nvidia.compiler import get_ptxas_version
    from triton.runtime.cache import triton_key

    return {
        "triton_key": hashlib.sha256(triton_key().encode()).hexdigest(),
        "ptxas": get_ptxas_version(90).strip().splitlines()[-1],
        "environment": sorted(get_cache_invalidating_env_vars().items()),
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
    }  # fmt: skip


MUST_MATCH = ("triton_key", "ptxas", "environment")
# gpu_check.sh's models step (issue 7's parity at native resolution): `python -m fused_mbconv`
# per (variant, batch), most important first (the smallest, the largest, then the rest), batch
# sized to the resolution; each of MODELS_STEP_RUNS (dtype, --tf32), backend triton, untuned:
# bfloat16 (autocast), float32 with torch's TF32 flags, and float32 with TF32 off (on a GPU,
# H200 2026-11-28: B2's float32 step with TF32 had one SE gradient 1.004x its bound, where eager's
# cuDNN had run full fp32 and the fused GEMMs TF32). Here, without CUDA tensors, the fused GEMMs
# take full fp32 either way, so the float32 runs compile the same kernels.
MODELS_STEP = (("b0", 8), ("b7", 2), ("b4", 4), ("b1", 8), ("b2", 8), ("b3", 8), ("b5", 4), ("b6", 2))
MODELS_STEP_RUNS = (("float32", "torch"), ("float32", "off"), ("bfloat16", "torch"))
# The test files of gpu_check.sh's tests step whose Triton kernels --suite compiles: those that
# launch them here as on a GPU (not the subprocess-based main and ddp files, not Inductor's compile
# tests, not the GPU-only ones that skip without CUDA).
SUITE = ("eval_fold", "efficientnet", "convert", "opcheck", "eager_dispatch", "dwconv_bn_silu", "squeeze_excite",
         "project_bn", "running_stats")  # fmt: skip


def _kernels(cache_dir: str) -> int:
    return sum(1 for _ in Path(cache_dir).glob("*/*.cubin"))


def unpack(archive_path: str, cache_dir: str = CACHE_DIR) -> bool:
    """Unpack the archive to ``cache_dir`` (where it was built) if this machine would hit its
    entries (same MUST_MATCH); say what differs otherwise."""
    with tarfile.open(archive_path) as archive:
        built = json.load(archive.extractfile(f"{Path(cache_dir).name}/{STAMP}"))
        here = json.loads(json.dumps(stamp()))  # tuples as lists, as in the file
        differ = [key for key in MUST_MATCH if built[key] != here[key]]
        if differ:
            print(f"{archive_path}: not used, {', '.join(differ)} differ: built {built}, here {here}")
            return False
        archive.extractall(Path(cache_dir).parent, filter="data")
    print(f"{archive_path}: {_kernels(cache_dir)} kernels in {cache_dir} (built with {built})")
    return True


def _prune(cache_dir: str) -> None:
    """Leave in ``cache_dir`` only what a cache hit reads: each kernel's cubin, metadata and file
    group, the group rewritten to list just those (triton 3.8 takes a group with a missing file
    for a miss). Not the intermediate IRs (most of the bytes), and not the autotuner's remembered
    choices made here: every config "timed" alike (the stand-in), so the device must time them;
    those a GPU made (``--merge``, listed in GPU_TUNED) stay."""
    measured = _gpu_tuned(cache_dir)
    for path in Path(cache_dir).glob("*/*.autotune.json"):
        if str(path.relative_to(cache_dir)) not in measured:
            path.unlink()
    for group_path in Path(cache_dir).glob("*/__grp__*.json"):
        group = json.loads(group_path.read_text())
        kept = {}
        for name, path in group["child_paths"].items():
            if Path(path).suffix in (".source", ".ttir", ".ttgir", ".llir", ".ptx"):
                Path(path).unlink(missing_ok=True)
            else:
                kept[name] = path
        group_path.write_text(json.dumps({"child_paths": kept}))


def _gpu_tuned(cache_dir: str) -> set[str]:
    path = Path(cache_dir) / GPU_TUNED
    return set(path.read_text().split()) if path.exists() else set()


def merge(archive_path: str, cache_dir: str = CACHE_DIR) -> None:
    """Add what a GPU session compiled and tuned (gpu_check.sh's NEW_ARCHIVE, from ``pack_new``)
    to ``cache_dir``: kernels the stand-in runs did not reach, and the autotuner's timings, which
    then save the next session the tuning (B0-B6's training rows of the 2026-11-27 sweep: ~25 s
    each, mostly that)."""
    with tarfile.open(archive_path) as archive:
        names = [m.name for m in archive.getmembers() if m.isfile()]
        archive.extractall(Path(cache_dir).parent, filter="data")
    root = Path(cache_dir).name
    tuned = {str(Path(n).relative_to(root)) for n in names if n.endswith(".autotune.json")}
    (Path(cache_dir) / GPU_TUNED).write_text("\n".join(sorted(_gpu_tuned(cache_dir) | tuned)) + "\n")
    print(f"{archive_path}: {len(names)} files merged into {cache_dir}, {len(tuned)} of them the autotuner's timings")


def pack_new(cache_dir: str, since: str, out: str) -> int:
    """On the GPU machine: pack the kernels and autotuner timings (cubins and json files) written
    in ``cache_dir`` after the file ``since`` (the unpacking's marker) into ``out``; returns how
    many kernels that is."""
    after = Path(since).stat().st_mtime
    new = [p for p in Path(cache_dir).rglob("*") if p.suffix in (".cubin", ".json") and p.stat().st_mtime > after]
    # preset 1 for the device's time: 300 kernels in 2 s here (Python's gzip: 8 s), 30% smaller
    with tarfile.open(out, "w:xz", preset=1) as archive:
        for path in new:
            archive.add(path, arcname=str(path.relative_to(Path(cache_dir).parent)))
    return sum(p.suffix == ".cubin" for p in new)


def _pack(cache_dir: str, out: str, built: dict) -> None:
    _prune(cache_dir)
    (Path(cache_dir) / STAMP).write_text(json.dumps(built, indent=1))
    with tarfile.open(out, "w:xz") as archive:
        archive.add(cache_dir, arcname=Path(cache_dir).name)
    mib = Path(out).stat().st_size / 2**20
    print(f"{out}: {_kernels(cache_dir)} kernels, {mib:.1f} MiB; {built}")
    if mib > CARRY_WARN_MIB:
        print(f"warning: {out} is {mib:.1f} MiB: with the tree it may pass the device tool's 64 MiB; "
              "rebuild with --fresh (or --drop-unused) to leave out kernels no step uses")  # fmt: skip


def _drop_unused(cache_dir: str, used: set[Path]) -> None:
    """Delete the kernels of ``cache_dir`` outside ``used`` (an edited kernel's older builds,
    which would only fill the archive), keeping the stamp and loose files."""
    stale = [d for d in Path(cache_dir).iterdir() if d.is_dir() and any(d.glob("*.cubin")) and d not in used]
    for directory in stale:
        shutil.rmtree(directory)
    print(f"dropped {len(stale)} kernels this run did not use", flush=True)


def _gpu_sweeps() -> None:
    """The Triton calls of tests/test_gpu_{dwconv,se,pointwise}_shapes.py, made through the
    tests' own helpers so that the specializations are the ones the GPU launches (on the H200,
    2026-11-27, the sweeps compiled their kernels there and reached 734 of 885 depthwise and 146
    of 384 SE cases in 120 s). Untuned, as the sweeps run; the fused calls only, not the eager
    references they are compared with."""
    import torch

    os.environ["FUSED_MBCONV_TRITON_AUTOTUNE"] = "0"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import test_gpu_dwconv_shapes as dw
    import test_gpu_pointwise_shapes as pointwise
    import test_gpu_se_shapes as se
    import test_project_bn as project
    import test_squeeze_excite as squeeze_excite

    import fused_mbconv

    dtypes = (torch.bfloat16, torch.float32)
    for shape in dw.all_depthwise_shapes():
        for dtype in dtypes:
            for training in (False, True):
                block = fused_mbconv.nn.DWConvBNAct(shape.channels, shape.kernel, shape.stride).to(dtype)
                x = torch.randn(dw.BATCH, shape.channels, shape.size, shape.size, dtype=dtype)
                dw._forward_backward(block.train(training), x.contiguous(memory_format=torch.channels_last), "triton")
    with fused_mbconv.backend("triton"):
        for channels, reduced, size in se.SHAPES:  # as check_functional calls the fused op
            for dtype in dtypes:
                x = squeeze_excite.make_input((2, channels, size, size), dtype, "channels_last")
                weights = squeeze_excite.weights_as(squeeze_excite.make_weights(channels, reduced), dtype, "4d")
                squeeze_excite.forward_backward(fused_mbconv.nn.functional.squeeze_excite, x, *weights)
        for training in (True, False):  # as test_project_bn.check calls the fused module
            cases = [((pointwise.BATCH, c, o, size, size), True, False) for c, o, size in pointwise.projection_shapes()]
            cases += [((pointwise.BATCH, c, e, size, size), False, True) for c, e, size in pointwise.expansion_shapes()]
            for shape, with_extras, silu in cases:
                x, *case = project.make_case(torch.bfloat16, "channels_last", with_extras, shape=shape)
                project.run("fused", torch.bfloat16, x, *case, training, silu)
        _past_int32(dw, pointwise, se)


def _past_int32(dw, pointwise, se) -> None:
    """The fused calls of the GPU tests past 2^31 elements (``conftest.past_int32``; their shapes
    from the test modules ``dw``, ``pointwise``, ``se``), fp16, both layouts: their strides past
    2^31 are 64-bit arguments, kernels of their own. Empty tensors (4.3 GB each, one or two at a
    time): nothing is computed."""
    import torch

    import fused_mbconv

    half, f32 = {"dtype": torch.float16}, {"dtype": torch.float32}
    for layout in (torch.channels_last, torch.contiguous_format):
        x = torch.empty(dw.PAST_INT32, **half, memory_format=layout)
        c = x.shape[1]
        scale = torch.empty(c, **f32)
        fused_mbconv.ops.dwconv_bn_silu(x, torch.empty(c, 1, 3, 3, **half), scale, scale, 1, [1, 1, 1, 1], True)
        for channels, out in pointwise.PAST_INT32_GEMMS:
            x = torch.empty(1, channels, *pointwise.PAST_INT32_PLANE, **half, memory_format=layout)
            gate = torch.empty(1, channels, **half) if channels > out else None
            scale = torch.empty(out, **f32)
            fused_mbconv.ops.project_bn(x, gate, torch.empty(out, channels, 1, 1, **half), scale, scale, None, None,
                                        gate is None)  # fmt: skip
        x = torch.empty(se.PAST_INT32, **half, memory_format=layout)
        fused_mbconv.ops.se_squeeze(x)
        fused_mbconv.ops.se_scale(x, torch.empty(1, x.shape[1], **half))
        del x


def _suite() -> None:
    """The Triton calls of gpu_check.sh's tests step (``SUITE``'s files, untuned as it runs them):
    the test files run here, with the stand-in driver making the Triton backend take CPU tensors
    (compiled, not interpreted: the shapes the interpreter skips run too, as on the GPU). Nothing
    is computed, so their comparisons fail; each call compiles what the GPU's run launches. On the
    H200 (2026-11-27) the step's 150 s ended in test_efficientnet; here four of SUITE's files
    (depthwise, projection, running statistics, eval fold) compiled 591 kernels in 21 min, the
    others 226 more in 6 min."""
    import pytest

    import fused_mbconv

    os.environ["FUSED_MBCONV_TRITON_AUTOTUNE"] = "0"
    files = [str(Path(__file__).resolve().parents[1] / "tests" / f"test_{name}.py") for name in SUITE]
    # a test that leaves the backend to "auto" runs the Triton kernels on a GPU, the reference here
    with fused_mbconv.backend("triton"), contextlib.redirect_stdout(io.StringIO()) as out:
        pytest.main(["-q", "-p", "no:cacheprovider", "--tb=no", "-rN", *files])
    print(f"  the suite's files: {out.getvalue().strip().splitlines()[-1]} (failures expected: nothing computed)")


def _models_step() -> None:
    """The fused model's calls of the models step (``MODELS_STEP``): its eval logits and training
    step as ``python -m fused_mbconv`` makes them (fp32 parameters, autocast for bfloat16,
    channels_last, native resolution), untuned; not the eager and float64 references."""
    import torch

    from fused_mbconv.__main__ import DTYPES, Runner
    from fused_mbconv.models import VARIANTS, create_efficientnet

    os.environ["FUSED_MBCONV_TRITON_AUTOTUNE"] = "0"
    for variant, batch in MODELS_STEP:
        model = create_efficientnet(variant).to(memory_format=torch.channels_last)
        size = VARIANTS[variant].resolution
        x, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
        for name in dict.fromkeys(dtype for dtype, _ in MODELS_STEP_RUNS):
            runner = Runner(torch.device("cpu"), DTYPES[name], channels_last=True)
            runner.logits(model, x, runner.dtype)
            runner.train_step(model, x, labels, runner.dtype)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="b5")
    p.add_argument("--modes", default="infer,train")
    p.add_argument("--batch", type=int, help="default: the GPU benchmark's batch per variant and mode")
    p.add_argument("--resolution", type=int, help="default: each variant's native resolution")
    p.add_argument("--cache-dir", default=CACHE_DIR, help="an absolute path, the same on the GPU machine")
    p.add_argument("--out", default=ARCHIVE, help="the archive (git-ignored; carried to the device)")
    p.add_argument("--kernel-benchmarks", action="store_true",
                   help="also the triton rows of bench_dwconv.py and bench_se_project.py (--kernel-shapes)")
    p.add_argument("--kernel-shapes", choices=("all", "quick"), default="all",
                   help="the kernel benchmarks' shapes: every distinct B5 shape (gpu_check.sh with BENCH_SHAPES=all), "
                        "or their --quick three")
    p.add_argument("--blocks", action="store_true", help="also the blocks of gpu_smoke.py and host_cost.py")
    p.add_argument("--gpu-sweeps", action="store_true",
                   help="also the GPU shape sweeps' kernels (tests/test_gpu_*_shapes.py: untuned, batch 2)")
    p.add_argument("--models-step", action="store_true",
                   help="also gpu_check.sh's models step (python -m fused_mbconv, every variant, fp32 and bf16)")
    p.add_argument("--suite", action="store_true",
                   help="also gpu_check.sh's tests step (SUITE's test files, untuned), run here on stood-in launches")
    p.add_argument("--fresh", action="store_true", help="empty the cache directory first")
    p.add_argument("--drop-unused", action="store_true",
                   help="afterwards, delete the kernels this run neither compiled nor found (older sources)")
    p.add_argument("--unpack", metavar="ARCHIVE", help="on the GPU machine: unpack ARCHIVE if usable there")
    p.add_argument("--merge", metavar="ARCHIVE",
                   help=f"add a GPU session's {NEW_ARCHIVE} to the cache directory, then pack --out")
    p.add_argument("--pack-new", nargs=2, metavar=("SINCE", "ARCHIVE"),
                   help="on the GPU machine: pack the cache entries written after the file SINCE into ARCHIVE")
    args = p.parse_args(argv)
    if args.unpack:
        sys.exit(0 if unpack(args.unpack, args.cache_dir) else 1)
    if args.pack_new:
        print(f"{pack_new(args.cache_dir, *args.pack_new)} kernels compiled here, packed into {args.pack_new[1]}")
        return
    if args.merge:  # the stamp stays the one the cache was built with (this Python's triton may differ)
        merge(args.merge, args.cache_dir)
        _pack(args.cache_dir, args.out, json.loads((Path(args.cache_dir) / STAMP).read_text()))
        return
    if args.fresh:
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    os.environ["TRITON_CACHE_DIR"] = args.cache_dir
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable
    from bench import standin_driver

    standin_driver.install(multiprocessors=GPU_MULTIPROCESSORS)
    import torch
    from triton import knobs

    import fused_mbconv
    from bench.__main__ import GPU_BATCH, step_function
    from fused_mbconv.models import VARIANTS, create_efficientnet

    compiles = {True: 0, False: 0}  # by cache hit

    used = set()  # the cache directories of the kernels compiled or found

    def count(*, cache_hit, metadata_group, **_):
        compiles[cache_hit] += 1
        used.update(Path(path).parent for path in metadata_group.values())

    @contextlib.contextmanager
    def reported(label: str):
        """Prints the kernels the block compiled and found in the cache, and its time."""
        start, before = time.perf_counter(), dict(compiles)
        yield
        print(f"{label}: {compiles[False] - before[False]} kernels compiled, {compiles[True] - before[True]} found "
              f"in the cache, {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip

    knobs.compilation.listener = count
    torch.manual_seed(0)
    with fused_mbconv.backend("triton"):
        for variant in filter(None, args.variants.split(",")):  # --variants "": none
            resolution = args.resolution or VARIANTS[variant].resolution
            for mode in args.modes.split(","):
                batch = args.batch or GPU_BATCH[variant][0 if mode == "infer" else 1]
                model = create_efficientnet(variant).to(torch.bfloat16).to(memory_format=torch.channels_last)
                x = torch.randn(batch, 3, resolution, resolution, dtype=torch.bfloat16)
                x = x.contiguous(memory_format=torch.channels_last)
                labels = torch.randint(0, 1000, (batch,))
                with reported(f"{variant} {mode} batch {batch}"):
                    step_function(model, mode, x, labels)()
        if args.kernel_benchmarks:
            from bench import bench_dwconv, bench_se_project
            from bench.common import KernelSetting

            for bench in (bench_dwconv, bench_se_project):
                setting = KernelSetting(torch.device("cpu"), bench.BATCH, bench.DTYPE, rep=1, compile_mode="default")
                with reported(f"{bench.__name__} ({args.kernel_shapes} shapes), triton"):
                    with contextlib.redirect_stdout(io.StringIO()):  # its CPU "timings" of stood-in launches
                        bench.run(bench.selected_shapes(quick=args.kernel_shapes == "quick"), ["triton"], setting, None)
        if args.blocks:
            from bench import gpu_smoke, host_cost

            with reported("gpu_smoke.py and host_cost.py blocks"):
                block, x, dy, state = gpu_smoke.smoke_case("cpu")
                hc_block, hc_x = host_cost.block_and_input("cpu", torch.bfloat16)
                for training in (True, False):
                    gpu_smoke.run_block(block, state, x, dy, training)
                    gpu_smoke.run_block(hc_block, hc_block.state_dict(), hc_x, torch.randn_like(hc_x), training)
        if args.gpu_sweeps:
            with reported("GPU shape sweeps (tests/test_gpu_*_shapes.py), untuned"):
                _gpu_sweeps()
        if args.models_step:
            with reported("models step (python -m fused_mbconv), untuned"):
                _models_step()
    if args.suite:
        with reported("the tests step's files (tests/test_*.py), untuned"):
            _suite()
    if args.drop_unused:
        _drop_unused(args.cache_dir, used)
    _pack(args.cache_dir, args.out, stamp())


if __name__ == "__main__":
    main()
