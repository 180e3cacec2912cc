"""Measure the "auto" backend's table (fused_mbconv/ops/auto_table.json) on this GPU.

For every op with a fused backend and a sample of EfficientNet block shapes (each stage's first
block of the chosen variants, so that every shape class appears), run each candidate backend,
check its outputs against the reference implementation (a backend that disagrees is out for that
sample), time it with triton.testing.do_bench, and pick per (op, shape class) the backend with
the best geometric-mean time over the class's samples. The candidates are the fused backends
("auto" without an entry takes triton, then cuda). The JSON keeps the per-sample timings beside
the choices, so the table says what it was decided on.

    python bench/bench_auto_table.py                      # GPU: writes fused_mbconv/ops/auto_table.json
    python bench/bench_auto_table.py --out table.json --variants b0 --time-budget 120
    TRITON_INTERPRET=1 python bench/bench_auto_table.py --smoke --out /tmp/t.json   # CPU: code path only
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable

import fused_mbconv  # noqa: E402
from bench.common import environment  # noqa: E402
from fused_mbconv.models.config import VARIANTS, LayerShapes, layer_shapes  # noqa: E402
from fused_mbconv.ops import auto_table  # noqa: E402
from fused_mbconv.ops.dwconv_bn_silu import IMPLS as DW  # noqa: E402
from fused_mbconv.ops.project_bn import IMPLS as PROJECT  # noqa: E402
from fused_mbconv.ops.squeeze_excite import IMPLS as SE  # noqa: E402

EPS = 1e-3
SAMPLE_BATCH = 8
# relative to the reference output's max |value|: a few units in the last place of the dtype
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# The projection's fp32 GEMMs multiply in TF32 where its kernel does (on a GPU, when torch allows
# it for convolutions, as eager's 1x1 conv), the reference in full fp32: 10-bit mantissas, ~1e-3
# per product. The H200 run of 2026-11-27 left every fp32 projection out of the table at 1e-4.
TF32_TOLERANCE = 1e-2


def tolerance(op: str, like: torch.Tensor) -> float:
    """The comparison's tolerance for ``op`` on activations ``like``."""
    if op.startswith("project_bn") and like.dtype == torch.float32:
        from fused_mbconv.ops.project_bn import triton_impl  # only where a fused projection runs

        if triton_impl.gemm_precision(like) == "tf32":
            return TF32_TOLERANCE
    return TOLERANCE[like.dtype]


def _tensors(shape: LayerShapes, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Random inputs of every op around one MBConv block, channels_last activations."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def t(*size, scale=1.0, positive=False, act=False, dt=None):
        v = torch.rand(*size, generator=g) + 0.5 if positive else torch.randn(*size, generator=g) * scale
        v = v.to(device, dt or dtype)
        return v.contiguous(memory_format=torch.channels_last) if act else v

    c, k, s = shape.expanded, shape.block.kernel_size, shape.block.stride
    r, o, h, ho = shape.block.squeeze_channels, shape.block.out_channels, shape.in_size, shape.out_size
    f32 = torch.float32
    return {
        "x": t(batch, c, h, h, act=True), "w": t(c, 1, k, k, scale=0.3, dt=f32), "stride": s, "pad": [k // 2] * 4,
        "scale": t(c, positive=True, dt=f32), "shift": t(c, dt=f32), "mean": t(c, dt=f32),
        "invstd": t(c, positive=True, dt=f32), "dy": t(batch, c, ho, ho, act=True), "dsq": t(batch, c),
        "y": t(batch, c, ho, ho, act=True), "pooled": t(batch, c), "gate": t(batch, c, positive=True) * 0.5,
        "w1": t(r, c, 1, 1, scale=c**-0.5, dt=f32), "b1": t(r, dt=f32), "w2": t(c, r, 1, 1, scale=r**-0.5, dt=f32),
        "b2": t(c, dt=f32), "wp": t(o, c, 1, 1, scale=c**-0.5, dt=f32), "gp": t(o, positive=True, dt=f32),
        "bp": t(o, dt=f32), "res": t(batch, o, ho, ho, act=True), "dyp": t(batch, o, ho, ho, act=True),
        "z": t(batch, o, ho, ho, act=True), "mp": t(o, dt=f32), "ip": t(o, positive=True, dt=f32),
    }  # fmt: skip


def op_calls(v: dict) -> Iterator[tuple[str, object, tuple, torch.Tensor]]:
    """(op name, its Implementations, arguments, the tensor its shape class is read from)."""
    dw = (v["x"], v["w"])
    conv = (v["stride"], v["pad"])
    # inference as the modules call it: eval-mode BN's weight, bias and running statistics
    yield "dwconv_bn_silu", DW["forward_infer"], (*dw, v["scale"], v["shift"], *conv, True, v["mean"], v["invstd"],
                                                  EPS), v["x"]  # fmt: skip
    yield "dwconv_bn_silu_train", DW["forward_train"], (*dw, v["scale"], v["shift"], EPS, *conv, True), v["x"]
    yield "dwconv_bn_silu_backward", DW["backward"], (
        v["dy"], v["dsq"], *dw, v["scale"], v["shift"], v["mean"], v["invstd"], *conv, True), v["x"]  # fmt: skip
    excite = (v["pooled"], v["w1"], v["b1"], v["w2"], v["b2"])
    yield "se_squeeze", SE["squeeze"], (v["y"],), v["y"]
    yield "se_excite", SE["excite"], excite, v["pooled"]
    yield "se_excite_backward", SE["excite_backward"], (v["gate"], *excite), v["pooled"]
    yield "se_scale", SE["scale"], (v["y"], v["gate"]), v["y"]
    yield "se_scale_backward", SE["scale_backward"], (v["y"], v["y"], v["gate"]), v["y"]
    project = (v["y"], v["gate"], v["wp"])
    yield "project_bn", PROJECT["forward_infer"], (*project, v["gp"], v["bp"], v["res"], None, False, v["mp"], v["ip"],
                                                   EPS), v["y"]  # fmt: skip
    yield "project_bn_train", PROJECT["forward_train"], (*project, v["gp"], v["bp"], EPS, v["res"], None, False), v["y"]
    yield "project_bn_backward", PROJECT["backward"], (
        v["dyp"], *project, v["z"], v["gp"], v["bp"], v["mp"], v["ip"], None, False, True), v["y"]  # fmt: skip


def _outputs(result) -> list[torch.Tensor]:
    return [t for t in (result if isinstance(result, tuple) else (result,)) if t.numel() > 0]


def matches(result, expected, tol: float) -> bool:
    for a, e in zip(_outputs(result), _outputs(expected), strict=True):
        scale = max(1.0, e.abs().max().item())
        if not (a.double() - e.double()).abs().max().item() <= tol * scale:
            return False
    return True


def timer(smoke: bool) -> Callable[[Callable], float]:
    """Milliseconds per call: do_bench's median on the GPU, one wall-clock call in --smoke."""
    if smoke:

        def wall(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        return wall
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50)


def sample_shapes(variants: list[str], smoke: bool) -> list[tuple[LayerShapes, int]]:
    """(block shape, batch): each stage's first block (the stride and width changes) per variant,
    taken in turns from the size classes of the depthwise input (large, medium, small, large, ...)
    so that a time budget that ends early has measured every class (on the H200, 2026-11-28, 55 s
    covered three samples, all B0's and all "medium"); in --smoke one tiny block."""
    if smoke:
        first = layer_shapes(VARIANTS["b0"], resolution=16)[1]  # 16 channels, k3, 8 x 8 -> a few thousand elements
        return [(first, 1)]
    by_size = defaultdict(list)
    for name in variants:
        shapes = layer_shapes(VARIANTS[name])
        for i, s in enumerate(shapes):
            if i == 0 or s.block.stage != shapes[i - 1].block.stage:
                by_size[auto_table.size_class(SAMPLE_BATCH * s.expanded * s.in_size**2)].append((s, SAMPLE_BATCH))
    turns = [by_size[size] for size in ("large", "medium", "small")]
    return [turns[k][i] for i in range(max(map(len, turns))) for k in range(3) if i < len(turns[k])]


def measure(args) -> dict:
    device = torch.device("cpu" if args.smoke else "cuda")
    fused = [b for b in ("triton", "cuda") if b in fused_mbconv.available_backends()]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    bench, start, samples = timer(args.smoke), time.monotonic(), []
    # dtype outermost: a budget that ends early has covered the first dtype (bf16 by default) in every class
    for dtype in dtypes:
        for shape, batch in sample_shapes(args.variants.split(","), args.smoke):
            if time.monotonic() - start > args.time_budget:
                print("time budget spent: the table covers what was measured", flush=True)
                return {"samples": samples, "fused_backends": fused}
            values = _tensors(shape, batch, dtype, device)
            for op, impls, call_args, like in op_calls(values):
                expected = impls._by_backend["reference"](*call_args)
                times = {}
                for backend in [b for b in fused if b in impls.backends()]:
                    fn = impls._by_backend[backend]
                    try:
                        if not matches(fn(*call_args), expected, tolerance(op, like)):
                            print(f"{op} {backend} {auto_table.shape_class(like)}: MISMATCH, left out", flush=True)
                            continue
                        times[backend] = bench(lambda fn=fn, a=call_args: fn(*a))
                    except Exception as e:  # a failing backend is left out of this sample, not fatal
                        print(f"{op} {backend}: {type(e).__name__}: {e}", flush=True)
                samples.append({"op": op, "class": auto_table.shape_class(like), "shape": list(like.shape),
                                "dtype": str(dtype), "ms": times})  # fmt: skip
                print(f"{op:24s} {samples[-1]['class']:28s} {like.shape} {times}", flush=True)
            del values
    return {"samples": samples, "fused_backends": fused}


def choose(samples: list[dict]) -> dict[str, dict[str, str]]:
    """Per (op, class): the backend with the lowest geometric-mean time over the samples where
    every candidate ran and matched (a backend missing from any sample of the class loses)."""
    by_class = defaultdict(list)
    for s in samples:
        by_class[s["op"], s["class"]].append(s["ms"])
    choices: dict[str, dict[str, str]] = defaultdict(dict)
    for (op, cls), runs in sorted(by_class.items()):
        candidates = set.intersection(*(set(r) for r in runs))
        if candidates:
            best = min(sorted(candidates), key=lambda b: sum(math.log(r[b]) for r in runs))
            choices[op][cls] = best
    return dict(choices)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=auto_table.TABLE_PATH)
    p.add_argument("--variants", default="b0,b4,b7", help="variants whose stage-first blocks are sampled")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--time-budget", type=float, default=360, metavar="SECONDS")
    p.add_argument("--smoke", action="store_true", help="CPU, one tiny shape: exercises the code path only")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench_auto_table: needs a CUDA GPU (--smoke runs the code path on the CPU)")
    result = measure(args)
    env = environment(torch.device("cpu" if args.smoke else "cuda"))
    table = {**env, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "choices": choose(result["samples"]), **result}  # fmt: skip
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(json.dumps(table["choices"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
