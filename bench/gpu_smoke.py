"""GPU smoke test, first thing on a fresh device: one MBConv block of EfficientNet-B0 (24 -> 24
channels, residual, stochastic depth) in training and in eval, under each backend, timing the
first call (compilation, autotuning) apart from the second, and comparing against the reference
backend. A backend that hangs shows as the last line printed before the step's time limit.

    python bench/gpu_smoke.py
"""

from __future__ import annotations

import time

import torch

import fused_mbconv


def run_block(block, initial_state, x, dy, training: bool):
    block.load_state_dict(initial_state)  # the same running statistics under every backend
    block.train(training)
    torch.manual_seed(0)  # the same stochastic-depth draws under every backend
    x = x.detach().requires_grad_(training)
    y = block(x)
    grads = torch.autograd.grad(y, [x, *block.parameters()], dy) if training else ()
    if x.is_cuda:
        torch.cuda.synchronize()
    return y.detach(), grads


def smoke_case(device: str = "cuda"):
    """(block, x, dy, its initial state). fp32 in full: torch's default TF32 convolutions (and the
    fused GEMMs, which follow the same flag) would put TF32's ~1e-3 between the backends
    (2026-11-26: a max gradient difference of 1.98)."""
    torch.backends.cudnn.allow_tf32 = False
    block = fused_mbconv.efficientnet_b0(stochastic_depth_prob=0.2).features[2][1].to(device)
    x = torch.randn(8, 24, 56, 56, device=device).contiguous(memory_format=torch.channels_last)
    return block, x, torch.randn_like(x), {k: v.clone() for k, v in block.state_dict().items()}


def main() -> None:
    block, x, dy, initial_state = smoke_case()
    print(torch.cuda.get_device_name(), "backends", fused_mbconv.available_backends(), flush=True)
    results = {}
    for name in [b for b in ("reference", "triton", "cuda") if b in fused_mbconv.available_backends()]:
        for training in (True, False):
            mode = "train" if training else "eval"
            with fused_mbconv.backend(name):
                try:
                    times = []
                    for _ in range(2):
                        start = time.perf_counter()
                        out = run_block(block, initial_state, x, dy, training)
                        times.append(time.perf_counter() - start)
                except Exception as e:  # a backend without some op: say so, go on
                    print(f"{name:9s} {mode}: {type(e).__name__}: {e}", flush=True)
                    continue
            results[name, mode] = out
            ref = results.get(("reference", mode))
            # norm-wise relative difference of the output and of each gradient, the worst of them
            diff = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item()
                       for a, b in zip([out[0], *out[1]], [ref[0], *ref[1]]))  # fmt: skip
            print(f"{name:9s} {mode}: first call {times[0]:.2f} s, second {times[1] * 1e3:.1f} ms, "
                  f"relative difference from reference {diff:.2e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
