"""python -m fused_mbconv: the README's main job.

Builds an EfficientNet variant on the fused ops and torchvision's eager model with the same random
weights, checks that eval logits and one training step (its logits, every gradient, running
statistics) match, times both (inference and a training step; on a GPU also inference replayed
from a CUDA graph, ``fused_mbconv.cuda_graphed``), and prints a markdown report.
Exit code 1 when a check fails.

Matching means: against the same model computed in float64, the fused model's error is at most
twice eager PyTorch's error in the same dtype plus a small floor per dtype (fusing may reorder sums
but must not lose precision).

    python -m fused_mbconv --variant b0                 # native resolution on a GPU, 128 px on a CPU
    python -m fused_mbconv --variant b3 --dtype bfloat16 --batch 16
    python -m fused_mbconv --variant b2 --tf32 off      # float32 convs and GEMMs in full fp32 on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import fused_mbconv
from fused_mbconv import parity
from fused_mbconv._timing import time_calls
from fused_mbconv.backends import BACKENDS
from fused_mbconv.memory import saved_activation_bytes
from fused_mbconv.models import VARIANTS, create_efficientnet

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED = 0
FP16_LOSS_SCALE = 2.0**10  # keeps fp16 gradients clear of underflow in the parity check
_START = time.perf_counter()
GRAPHED = "inference, CUDA graph"  # the timings' row for inference replayed from a CUDA graph (GPU only)


def progress(what: str) -> None:
    """What the run is doing, on stderr: at native resolution on a GPU it takes a while."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {what}", file=sys.stderr, flush=True)


def randomize_batch_norm_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random BN affine parameters and running statistics (on top of torchvision's initialisation),
    so that no check passes on BN's trivial initial values."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, low, high in ((m.weight, 0.5, 1.5), (m.running_var, 0.5, 2.0)):
                    t.copy_(torch.empty(t.shape).uniform_(low, high, generator=generator))
                for t in (m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=generator) * 0.2)
    return model


class Runner:
    """Runs a model the way the checks and timings need: dtype by autocast, layout, train step."""

    def __init__(self, device: torch.device, dtype: torch.dtype, channels_last: bool) -> None:
        self.device, self.dtype, self.channels_last = device, dtype, channels_last

    def input(self, x: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """``x`` on the device, in the layout, in ``model``'s parameter dtype (autocast does the rest)."""
        x = x.to(self.device, next(model.parameters()).dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self, dtype: torch.dtype):
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))

    def logits(self, model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad(), self.autocast(dtype):
            return model.eval()(self.input(x, model))

    def train_step(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
        """One forward + backward in train mode; returns (logits, gradients, BN buffers by name)."""
        model.train().zero_grad(set_to_none=True)
        torch.manual_seed(SEED)  # the same dropout and stochastic-depth masks in every model
        with parity.same_masks_in_every_dtype(), self.autocast(dtype):
            logits = model(self.input(x, model)).float()
            loss = nn.functional.cross_entropy(logits, labels.to(self.device))
        loss_scale = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0  # as GradScaler would
        (loss * loss_scale).backward()
        # a missing gradient counts as zero, so it fails the comparison like a wrong one
        grads = {n: torch.zeros_like(p) if p.grad is None else p.grad / loss_scale
                 for n, p in model.named_parameters()}
        buffers = {n: b for n, b in model.named_buffers() if b.is_floating_point()}
        return logits.detach(), grads, buffers


def check_parity(
    tv: nn.Module, fused: nn.Module, runner: Runner, x: torch.Tensor, labels: torch.Tensor
) -> list[parity.Check]:
    dtype = runner.dtype
    exact = copy.deepcopy(tv).double()  # taken before any training step changes the statistics
    models = (("fused", fused, dtype), ("torchvision", tv, dtype), ("float64 torchvision", exact, torch.float64))
    logits = []
    for name, model, model_dtype in models:
        progress(f"eval logits: {name}")
        logits.append(runner.logits(model, x, model_dtype))
    checks = [parity.compare("eval logits", *logits, dtype)]
    steps = []
    for name, model, model_dtype in models:
        progress(f"training step: {name}")
        steps.append(runner.train_step(model, x, labels, model_dtype))
    return checks + training_checks(*steps, dtype)


def training_checks(fused: tuple, eager: tuple, exact: tuple, dtype: torch.dtype) -> list[parity.Check]:
    """The checks of one training step, each step ``Runner.train_step``'s (logits, gradients,
    BN buffers): the logits, and the worst of the gradients and of the statistics."""
    # the training forward's logits, not its loss: they bound the loss (parity.py) and, unlike one
    # scalar, are a stable measure of the forward's error
    checks = [parity.compare("train logits", fused[0], eager[0], exact[0], dtype)]
    for what, i in (("gradients", 1), ("running statistics", 2)):
        group = parity.compare_all(fused[i], eager[i], exact[i], dtype)
        w = parity.worst(group)
        checks.append(parity.Check(f"{what} (worst of {len(group)}: {w.name})", w.error, w.bound, w.eager_error))
    return checks


class Timer:
    """Median wall time of ``fn`` over ``repeats`` after ``warmup`` calls (one-time costs such as
    kernel autotuning and allocator growth stay out); CUDA events on a GPU."""

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn: Callable[[], object]) -> tuple[float, Optional[float]]:
        """(median milliseconds, peak allocated MiB on CUDA or None)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # this call's peak, not the run's so far
        times = time_calls(fn, self.device, self.repeats, self.warmup)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        return statistics.median(times), peak


def benchmark(model: nn.Module, runner: Runner, timer: Timer, x: torch.Tensor, labels: torch.Tensor):
    """{"inference": (ms, MiB), "training step": (ms, MiB), "saved": MiB} for ``model`` (SGD,
    GradScaler for fp16); "saved": the activations a training forward keeps for its backward."""
    x, labels = runner.input(x, model), labels.to(runner.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(runner.device.type, enabled=runner.dtype == torch.float16)

    def infer():
        with torch.inference_mode(), runner.autocast(runner.dtype):
            return model(x)

    def train():
        optimizer.zero_grad(set_to_none=True)
        with runner.autocast(runner.dtype):
            loss = nn.functional.cross_entropy(model(x).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def train_forward():
        with runner.autocast(runner.dtype):
            return model(x)

    model.eval()
    inference = timer(infer)
    progress("timing: training step")
    model.train()
    saved = saved_activation_bytes(train_forward, model.parameters()) / 2**20
    timings = {"inference": inference, "training step": timer(train), "saved": saved}
    if runner.device.type == "cuda":
        progress("timing: inference replayed from a CUDA graph")
        timings[GRAPHED] = graphed_inference(model, runner, timer, x)
    return timings


def graphed_inference(model: nn.Module, runner: Runner, timer: Timer, x: torch.Tensor):
    """(ms, None) of ``model``'s inference replayed from a CUDA graph (``cuda_graphed``: the host
    issues nothing per layer), or the reason the capture failed, which the report prints instead
    of losing the parity checks' report to it."""

    def forward(inp):
        with torch.no_grad(), runner.autocast(runner.dtype):
            return model(inp)

    model.eval()
    try:
        replay = fused_mbconv.cuda_graphed(forward, x)
    except RuntimeError as e:
        first_line = str(e).partition("\n")[0]  # an empty message has no line to index
        return f"capture failed: {type(e).__name__}: {first_line[:200]}"
    return timer(lambda: replay(x))[0], None


def _ms_or_reason(timing) -> str:
    return timing if isinstance(timing, str) else f"{timing[0]:.2f}"


def report(args, device: torch.device, checks: list[parity.Check], timings) -> str:
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"## fused_mbconv: EfficientNet-{args.variant.upper()}, {args.resolution}x{args.resolution}, "
        f"batch {args.batch}, {args.dtype}, {device} ({hardware}), backend {args.backend}, "
        f"{'channels_last' if args.channels_last else 'NCHW'}{', TF32 off' if args.tf32 == 'off' else ''}",
        "",
        "| check (vs float64 torchvision) | fused max error | eager max error | bound | result |",
        "|---|---|---|---|---|",
    ]
    for c in checks:
        verdict = "PASS" if c.ok else "FAIL"
        lines.append(f"| {c.name} | {c.error:.3g} | {c.eager_error:.3g} | {c.bound:.3g} | {verdict} |")
    eager, fused = timings["torchvision eager"], timings["fused"]
    lines += ["", f"| median of {args.steps} (ms) | torchvision eager | fused | speed-up |", "|---|---|---|---|"]
    for what in ("inference", "training step", GRAPHED):
        if what not in eager:  # no CUDA graphs off the GPU
            continue
        if isinstance(eager[what], str) or isinstance(fused[what], str):  # a capture failed: say which
            lines.append(f"| {what} | {_ms_or_reason(eager[what])} | {_ms_or_reason(fused[what])} | - |")
            continue
        (e_ms, _), (f_ms, _) = eager[what], fused[what]
        lines.append(f"| {what} | {e_ms:.2f} | {f_ms:.2f} | {e_ms / f_ms:.2f}x |")
    lines += ["", "| memory (MiB) | torchvision eager | fused | fused / eager |", "|---|---|---|---|",
              f"| activations kept for backward | {eager['saved']:.1f} | {fused['saved']:.1f} | "
              f"{fused['saved'] / eager['saved']:.2f} |"]  # fmt: skip
    if device.type == "cuda":
        for what in ("inference", "training step"):
            e_mib, f_mib = eager[what][1], fused[what][1]
            lines.append(f"| peak, {what} | {e_mib:.0f} | {f_mib:.0f} | {f_mib / e_mib:.2f} |")
    lines += ["", f"**{'PASS' if all(c.ok for c in checks) else 'FAIL'}**"]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fused_mbconv", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="b0", choices=list(VARIANTS))
    p.add_argument("--resolution", type=int, help="image size (default: the variant's native size on CUDA, 128 on CPU)")
    p.add_argument("--batch", type=int, help="batch size (default: 8 on CUDA, 2 on CPU)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="compute dtype (16-bit: torch.autocast)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--backend", default=fused_mbconv.get_backend(), choices=list(BACKENDS))
    p.add_argument("--steps", type=int, help="timed repeats, median reported (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                   help="input and model layout (auto: channels_last on CUDA)")  # fmt: skip
    # On a GPU torch lets cuDNN run float32 convs in TF32 (10-bit mantissas) where its heuristics
    # choose to, and the fused GEMMs follow the same flag everywhere: a float32 comparison then
    # weighs TF32 noise where eager happened to run in full fp32. "off" compares full fp32 with
    # full fp32 (both models), the strict check of float32 parity.
    p.add_argument("--tf32", default="torch", choices=["torch", "off"],
                   help="torch: torch's TF32 flags as they are; off: no TF32 in eager's or the fused convs and matmuls")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device: {args.device} asked for, but no CUDA device is visible")
    if args.backend not in fused_mbconv.available_backends():
        p.error(f"--backend: {args.backend!r} cannot run here; available: {fused_mbconv.available_backends()}")
    args.device = device
    cuda = device.type == "cuda"
    defaults = {"resolution": VARIANTS[args.variant].resolution if cuda else 128, "batch": 8 if cuda else 2,
                "steps": 10 if cuda else 3}  # fmt: skip
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.channels_last = args.memory_format == "channels_last" or (args.memory_format == "auto" and cuda)
    for name in ("resolution", "batch", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected a positive number, got {getattr(args, name)}")
    return args


@contextlib.contextmanager
def tf32_flags(setting: str):
    """--tf32: "torch" leaves torch's flags as they are; "off" turns TF32 off for cuDNN's
    convolutions and for matmuls (the fused GEMMs follow the cuDNN flag) until the block ends."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if setting == "off":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        import torchvision
    except ImportError:
        print("python -m fused_mbconv compares against torchvision: pip install torchvision", file=sys.stderr)
        return 2
    device, dtype = args.device, DTYPES[args.dtype]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    tv = randomize_batch_norm_(getattr(torchvision.models, f"efficientnet_{args.variant}")(), generator)
    fused = create_efficientnet(args.variant, weights=tv.state_dict())
    tv, fused = (m.to(device, memory_format=memory_format) for m in (tv, fused))
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=generator)
    labels = torch.randint(0, 1000, (args.batch,), generator=generator)
    runner = Runner(device, dtype, args.channels_last)
    fused_mbconv.set_backend(args.backend)
    with tf32_flags(args.tf32):
        checks = check_parity(tv, fused, runner, x, labels)
        timer = Timer(device, warmup=3 if device.type == "cuda" else 1, repeats=args.steps)
        timings = {}
        for name, model in (("torchvision eager", tv), ("fused", fused)):
            progress(f"timing {name}: inference")
            timings[name] = benchmark(model, runner, timer, x, labels)
    print(report(args, device, checks, timings))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
