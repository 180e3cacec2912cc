"""The host's cost of one fused MBConv block, on a machine without a GPU: the time to issue its
inference forward and its training step (forward + backward), and how many kernels it launches
(Triton's and torch's). Eager-mode speed of the fused model is bound by this (bench/results/
2026-11-26_h200_host_share.md); this measures it without a GPU, so each change to the host code
can be weighed before a GPU session.

Triton runs its real launch path through bench/standin_driver.py (kernels compiled for sm_90,
launches recorded instead of run); torch's ops run on CPU tensors. Counts are exact: the stand-in
launcher's record, and torch's profiler for the top-level aten ops that launch a kernel (not
views or allocations; a dtype or layout conversion only when it copies). Times are the best of
several rounds and vary with the machine (a 2-core VM here: compare within one run). ``--list``
names the line that issued each torch kernel, through a dispatch mode; under it the autograd
engine clones the parameters' gradients (a Python-visible gradient cannot be taken over), so
its list has those copies on top of the count.

On a GPU (``--device cuda``) the same block runs for real and the time is the host's time to
issue its calls (the block's kernels at this size take less); Triton's launches are counted by a
launch hook. There, ``FUSED_MBCONV_FAST_LAUNCH=0`` against the default is a side-by-side
measure of fused_mbconv/ops/_launch.py.

    python bench/host_cost.py                       # B0's block 2.2 (expand, k3, SE, residual), bf16
    python bench/host_cost.py --dtype fp32 --list   # fp32, and where each torch kernel comes from
    python bench/host_cost.py --device cuda         # on a GPU, with Triton's real driver
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable

from bench import standin_driver  # noqa: E402

# aten ops that launch no kernel: views, allocations, metadata (shared with bench/traffic_model.py)
NOT_KERNELS = ("view", "reshape", "alias", "detach", "slice", "permute", "unsqueeze", "expand", "flatten",
               "as_strided", "aten.t.", "squeeze", "select", "empty", "transpose", "lift_fresh", "unbind",
               "split")  # fmt: skip


@contextlib.contextmanager
def op_bodies():
    """The fused ops' Python bodies run (their eager fast path) under a dispatch mode too, which
    would otherwise see only the registered op: what they issue inside becomes visible."""
    from fused_mbconv.ops import _eager  # not at import: the stand-in driver goes in first

    plain = _eager._plain_eager
    _eager._plain_eager = lambda args: True
    try:
        yield
    finally:
        _eager._plain_eager = plain


class _CountKernels(TorchDispatchMode):
    """Counts the aten ops that launch a kernel, by the fused_mbconv line that issued them."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not any(part in name for part in NOT_KERNELS):
            frame = sys._getframe(1)
            while frame is not None and "fused_mbconv" not in frame.f_code.co_filename:
                frame = frame.f_back
            where = "autograd engine" if frame is None else (
                f"{'/'.join(Path(frame.f_code.co_filename).parts[-2:])}:{frame.f_lineno}")  # fmt: skip
            self.sites[(name, where)] += 1
        return func(*args, **(kwargs or {}))


def _torch_kernels(step) -> int:
    """Top-level aten ops of one ``step`` that launch a kernel (torch's profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()

    def launches(e) -> bool:
        if e.name in ("aten::to", "aten::contiguous", "aten::reshape"):  # a kernel only when they copy
            return any(child.name in ("aten::_to_copy", "aten::clone", "aten::copy_") for child in e.cpu_children)
        return not any(part in e.name.replace("::", ".") for part in NOT_KERNELS)

    top = [e for e in prof.events() if e.name.startswith("aten::") and not (
        e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]  # fmt: skip
    return sum(launches(e) for e in top)


def _triton_launches(step, on_gpu: bool) -> int:
    """Triton launches of one ``step``: the stand-in's record, or on a GPU a launch hook's count
    (with a hook installed the launches take Triton's own path: the same launches)."""
    if not on_gpu:
        with standin_driver.record() as launches:
            step()
        return len(launches)
    from triton import knobs

    count = [0]

    def hook(*_):
        count[0] += 1

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        step()
        torch.cuda.synchronize()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    return count[0]


def _best_us(fn, rounds: int, calls: int, on_gpu: bool) -> float:
    """The best over ``rounds`` of the host's time per call, ``calls`` calls a round (on a GPU
    from a synchronized start)."""
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(rounds):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def block_and_input(device, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor]:
    """B0's block 2.2 and a batch of 2 of its 16x16 inputs, channels_last."""
    import fused_mbconv

    torch.manual_seed(0)
    model = fused_mbconv.efficientnet_b0(num_classes=10).to(device, dtype, memory_format=torch.channels_last)
    x = torch.randn(2, 24, 16, 16, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return model.features[2][1], x


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--list", action="store_true", help="list the torch kernels by the line that issued them")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu: the stand-in driver")
    args = p.parse_args(argv)
    os.environ.setdefault("FUSED_MBCONV_TRITON_AUTOTUNE", "0")  # one config a kernel: fewer compiles
    on_gpu = args.device == "cuda"
    if not on_gpu:
        standin_driver.install()
    import fused_mbconv
    from fused_mbconv.ops import _launch

    fused_mbconv.set_backend("triton")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    block, x = block_and_input(args.device, dtype)
    x_grad = x.detach().requires_grad_(True)
    dy = torch.randn_like(x)

    def infer():
        with torch.no_grad():
            block(x)

    def train():
        for q in block.parameters():
            q.grad = None
        block(x_grad).backward(dy)

    where = torch.cuda.get_device_name() if on_gpu else "CPU, stand-in Triton driver"
    print(f"B0 features[2][1] (expand 24 -> 144, k3 s1, SE, residual), batch 2, 16x16, {args.dtype}, channels_last; "
          f"{where}; fast launch {'on' if _launch.ENABLED else 'off'}")  # fmt: skip
    for mode, step in (("infer", infer), ("train", train)):
        block.train(mode == "train")
        step()
        step()
        launches = _triton_launches(step, on_gpu)
        torch_kernels = _torch_kernels(step)
        us = _best_us(step, args.rounds, 50 if mode == "infer" else 20, on_gpu)
        print(f"{mode}: host {us:.0f} us, {launches} Triton launches, {torch_kernels} torch kernels")
        if args.list:
            with op_bodies(), _CountKernels() as sites:
                step()
            for (op, where), n in sorted(sites.sites.items(), key=lambda kv: kv[0][1]):
                print(f"    {n:3d} {op:32s} {where}")


if __name__ == "__main__":
    main()
