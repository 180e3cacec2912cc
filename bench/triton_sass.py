"""Static SASS of the Triton kernels as a GPU launch compiles them, on a machine without a GPU.

A launch specializes a kernel on its arguments (unit strides become constants, pointers and
integers divisible by 16 are marked so), and that decides whether channel vectors are loaded 16
bytes at a time or one element at a time. This compiles the depthwise and projection kernels for
sm_90 with the specialization that real channels_last tensors give (triton's own argument binder,
no driver), disassembles them (nvdisasm from triton's package) and reports, per kernel: registers,
memory instructions by width, tensor-core instructions, and for the depthwise inference kernel the
instructions per output of an interior tile (no masks) and of a border tile (the loop over rows of
taps of that path counted K times); the depthwise training kernels with their static instruction
counts. Static counts, not timings.

    python bench/triton_sass.py                 # B5-like shapes: 57 x 57 planes, bf16
    python bench/triton_sass.py --channels 40   # a width that is no multiple of 16
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from fused_mbconv.ops._triton import vector_alignment  # noqa: E402
from fused_mbconv.ops.dwconv_bn_silu import triton_impl as dw  # noqa: E402
from fused_mbconv.ops.project_bn import triton_impl as pj  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def compile_as_launched(kernel, *args, **kwargs):
    """The kernel (under its autotuner) compiled for sm_90 as a launch with these arguments
    (tensors may live on the CPU: only their dtype, strides and addresses matter) would be."""
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton_compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_summary(compiled) -> dict:
    """Registers, stack, every opcode, and the instruction counts of a compiled kernel's loop
    bodies (backward branches; the bare self-branch after EXIT is none)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    lines = text.splitlines()
    ops = [m.group(1) if (m := _OPCODE.search(line)) else None for line in lines]
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = sum(1 for op in ops[labels[m.group(1)]:i + 1] if op)
            if body > 1:
                loops.append(body)
    counted = [op for op in ops if op]
    return {"registers": int(regs.group(1)) if regs else None, "stack": int(regs.group(2)) if regs else None,
            "instructions": len(counted), "loops": loops, "opcodes": collections.Counter(counted)}  # fmt: skip


def per_output_by_path(info: dict, k: int, outputs: int) -> list[float]:
    """Dynamic instructions per output of the depthwise forward kernel (one tile a program), one
    figure per path through the tile, interior (the smaller loop body) first: a tile runs the code
    outside the loops (both paths' few other instructions: an upper bound) and its path's loop
    over the K rows of taps K times."""
    outside = info["instructions"] - sum(info["loops"])
    return [(outside + body * k) / outputs for body in sorted(info["loops"])]


def _memory(opcodes: collections.Counter) -> str:
    kinds = {op: n for op, n in opcodes.items() if op.startswith(("LDG", "STG", "LDGSTS", "REDG"))}
    return ", ".join(f"{n} {op}" for op, n in sorted(kinds.items()))


LAYOUT = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def _activation(*shape, layout: str = "channels_last", dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype).contiguous(memory_format=LAYOUT[layout])


def _tile_label(cfg) -> str:
    sizes = "x".join(str(cfg.kwargs[key]) for key in ("BLOCK_P", "BLOCK_C", "TILE_W"))
    return f"{sizes} w{cfg.num_warps}" + (" taps per strip" if cfg.kwargs.get("TAPS_PER_STRIP") else "")


def depthwise_rows(channels: int, size: int, layout: str = "channels_last", quick: bool = False) -> list[str]:
    """The depthwise inference kernel, each kernel size and stride, the first two tile configs
    (quick: k3 s1, the first config)."""
    rows = []
    for k, s in [(3, 1)] if quick else [(3, 1), (3, 2), (5, 1), (5, 2)]:
        pad = k // 2
        out = (size + 2 * pad - k) // s + 1
        x, y = _activation(2, channels, size, size, layout=layout), _activation(2, channels, out, out, layout=layout)
        taps = dw._taps_by_channel(torch.empty(channels, 1, k, k, dtype=torch.bfloat16))
        # eval-mode BN as a bf16 model's module launches it: its weight, bias and running statistics
        vec, squeeze = torch.empty(channels, dtype=torch.bfloat16), torch.empty(2, channels)
        for cfg in dw._TILE_CONFIGS[: 1 if quick else 2]:
            compiled = compile_as_launched(
                dw._conv_bn_silu_kernel, x, taps, vec, vec, vec, vec, y, squeeze, channels, size, size, out, out,
                1.0 / out**2, 1e-3, pad, pad, x.stride(), taps.stride(), y.stride(), K=k, STRIDE=s, CENTERED=True,
                NORMALIZE=True, WITH_SQUEEZE=True, ALIGN=vector_alignment(x, y), num_warps=cfg.num_warps, **cfg.kwargs,
            )  # fmt: skip
            info = sass_summary(compiled)
            outputs = cfg.kwargs["BLOCK_P"] * cfg.kwargs["BLOCK_C"] // (32 * cfg.num_warps)  # per thread
            per_output = ", ".join(f"{v:.0f}" for v in per_output_by_path(info, k, outputs))
            rows.append(f"| dwconv inference k{k} s{s} | {_tile_label(cfg)} | {info['registers']} | "
                        f"{info['stack']} | {per_output} | {_memory(info['opcodes'])} |")  # fmt: skip
    return rows


def depthwise_training_rows(channels: int, size: int, layout: str = "channels_last", quick: bool = False) -> list[str]:
    """The training kernels (statistics, BN-backward sums, dc + dweight, dx) at k3 and k5 stride
    1 (quick: k3), first tile config (dc + dweight: the first its prune keeps, taps per strip at
    k5): registers, stack, static instruction count, memory instructions."""
    rows = []
    for k in (3,) if quick else (3, 5):
        pad = k // 2
        x, y = (_activation(2, channels, size, size, layout=layout) for _ in range(2))
        taps = dw._taps_by_channel(torch.empty(channels, 1, k, k, dtype=torch.bfloat16))
        vec, part = torch.empty(channels), torch.empty(64, 2 * channels * k * k)
        geo = {"C": channels, "H": size, "W": size, "H_OUT": size, "W_OUT": size, "pad_t": pad, "pad_l": pad,
               "K": k, "STRIDE": 1, "ALIGN": vector_alignment(x, y)}  # fmt: skip
        chunked = {"N": 2, "groups": 64, "sx": x.stride(), "sw": taps.stride()}
        launches = {
            "statistics": (dw._conv_stats_kernel, (x, taps, vec, part, part), chunked),
            "BN-backward sums": (dw._dz_sums_kernel, (y, vec, x, taps, vec, vec, vec, vec, part),
                                 {**chunked, "inv_p_out": 0.1, "sdy": y.stride(), "HAS_DSQ": True}),
            "dc + dweight": (dw._dconv_kernel, (y, vec, x, taps, vec, vec, vec, vec, vec, y, part, part),
                             {**chunked, "inv_count": 0.1, "inv_p_out": 0.1, "sdy": y.stride(), "sdc": y.stride(),
                              "HAS_DSQ": True, "TRAINING": True, "KK_PAD": triton.next_power_of_2(k * k)}),
            "dx": (dw._dx_kernel, (y, taps, x), {"sdc": y.stride(), "sw": taps.stride(), "sdx": x.stride(),
                                               "PAD_ODD": 0}),
        }  # fmt: skip
        for name, (kernel, args, kwargs) in launches.items():
            cfg = dw._prune_dconv(dw._DCONV_CONFIGS, geo)[0] if name == "dc + dweight" else dw._TILE_CONFIGS[0]
            compiled = compile_as_launched(kernel, *args, **kwargs, **geo, num_warps=cfg.num_warps, **cfg.kwargs)
            info = sass_summary(compiled)
            rows.append(f"| dwconv {name} k{k} s1 | {_tile_label(cfg)} | {info['registers']} | {info['stack']} | "
                        f"{info['instructions']} | {_memory(info['opcodes'])} |")  # fmt: skip
    return rows


def projection_rows(size: int) -> list[str]:
    """The projection GEMM (gate, residual) and the expansion GEMM (SiLU) on B5 widths, first config."""
    rows = []
    cfg = pj._GEMM_CONFIGS[0]
    shapes = [("projection", 240, 40, True), ("expansion", 40, 240, False), ("projection", 1152, 192, True)]
    for name, c, o, gated in shapes:
        x, y = _activation(2, c, size, size), _activation(2, o, size, size)
        res = y if gated else None
        gate, wm = torch.empty(2, c, dtype=torch.bfloat16), torch.empty(o, c, dtype=torch.bfloat16)
        vec = torch.empty(o, dtype=torch.bfloat16)  # eval-mode BN's weight, bias and running statistics
        compiled = compile_as_launched(
            pj._project_kernel, x, gate, wm, vec, vec, vec, vec, y, y, y, y, y, y, c, o, size * size, 1e-3,
            *pj._strides(x), *gate.stride(), *wm.stride(), *pj._strides(y), *pj._strides(y),
            HAS_GATE=gated, AFFINE=True, NORMALIZE=True, ACT=not gated, HAS_RES=gated, HAS_BS=False, STATS=False,
            PRECISION="tf32",
            ALIGN=vector_alignment(x, wm, res, y), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs,
        )  # fmt: skip
        info = sass_summary(compiled)
        mma = sum(n for op, n in info["opcodes"].items() if op.startswith(("HGMMA", "HMMA")))
        kind = "HGMMA (wgmma)" if any(op.startswith("HGMMA") for op in info["opcodes"]) else "HMMA"
        tile = "x".join(str(v) for v in cfg.kwargs.values())
        # the gate applied to x's tile in bf16 pairs (HMUL2.BF16_V2), not through fp32
        pairs = sum(n for op, n in info["opcodes"].items() if op.startswith("HMUL2"))
        rows.append(f"| {name} {c}->{o} | {tile} w{cfg.num_warps} | {info['registers']} | {info['stack']} | "
                    f"{mma} {kind} | {pairs} | {_memory(info['opcodes'])} |")  # fmt: skip
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=240, help="depthwise channels (default 240, B5 stage 3)")
    p.add_argument("--size", type=int, default=57, help="plane height = width")
    p.add_argument("--layout", default="channels_last", choices=sorted(LAYOUT),
                   help="of the depthwise activations (nchw: unit strides along W, specialized as constants)")
    p.add_argument("--quick", action="store_true", help="depthwise k3 only, one tile config, no GEMMs")
    args = p.parse_args(argv)
    print(f"triton {triton.__version__}, sm_90, bf16, {args.layout}, {args.size}x{args.size} planes\n")
    print("| kernel | tile | registers | stack | instructions / output (interior, border tile) | memory instructions |")
    print("|---|---|---|---|---|---|")
    print("\n".join(depthwise_rows(args.channels, args.size, args.layout, args.quick)))
    print("\n| training kernel | tile | registers | stack | static instructions | memory instructions |")
    print("|---|---|---|---|---|---|")
    print("\n".join(depthwise_training_rows(args.channels, args.size, args.layout, args.quick)))
    if args.quick:
        return
    print("\n| GEMM | tile | registers | stack | matrix instructions | 16-bit pair multiplies | memory instructions |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(projection_rows(args.size)))


if __name__ == "__main__":
    main()
