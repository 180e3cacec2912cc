"""Replay a forward pass from a CUDA graph: the host issues its kernels once, at capture, instead
of on every call.

Issuing one fused layer from Python costs the host longer than many of its kernels run (H200,
2026-11-28: 0.14-0.33 ms a depthwise inference call, against 0.04-0.24 ms of GPU time), so a
model called eagerly waits on its host. A replayed graph has no host work per layer.

    import fused_mbconv
    model = fused_mbconv.efficientnet_b5(weights="efficientnet_b5.pth").cuda().eval()

    def forward(x):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x)

    run = fused_mbconv.cuda_graphed(forward, example)   # example: a batch of the shape to replay
    logits = run(batch)                                  # overwritten by the next run(): clone to keep

For training, ``torch.cuda.make_graphed_callables(model, (example,))`` captures the forward and
the backward (README, "Speed: CUDA graphs").
"""

from __future__ import annotations

from typing import Callable

import torch

from fused_mbconv._checks import check_tensor


def cuda_graphed(fn: Callable[[torch.Tensor], object], example: torch.Tensor, warmup: int = 3):
    """``fn(example)`` captured in a CUDA graph, after ``warmup`` calls on a side stream (they
    compile and autotune the Triton kernels, which a capture cannot). Returns ``run(x)``: copies
    ``x`` (same shape, dtype and device as ``example``; any layout) into the captured input,
    replays the graph and returns the captured output, which the next ``run`` overwrites.
    Whatever ``fn`` needs around its call (no_grad, autocast) goes inside ``fn``."""
    if warmup < 1:
        raise ValueError(f"warmup: expected at least 1 call (to compile and autotune before capture), got {warmup}")
    check_tensor("example", example)
    if example.device.type != "cuda":
        raise ValueError(f"example: expected a CUDA tensor (CUDA graphs replay GPU work), got one on {example.device}")
    static_input = example.clone()
    side = torch.cuda.Stream(example.device)
    side.wait_stream(torch.cuda.current_stream(example.device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(static_input)
    torch.cuda.current_stream(example.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = fn(static_input)

    def run(x: torch.Tensor):
        check_tensor("x", x)
        if x.shape != static_input.shape or x.dtype != static_input.dtype or x.device != static_input.device:
            raise ValueError(
                f"x: expected shape {tuple(static_input.shape)}, {static_input.dtype} on {static_input.device} "
                f"(the captured example's), got {tuple(x.shape)}, {x.dtype} on {x.device}"
            )
        static_input.copy_(x)
        graph.replay()
        return static_output

    return run
