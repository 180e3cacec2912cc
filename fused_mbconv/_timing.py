"""Timing of a callable, shared by the main job (``python -m fused_mbconv``) and bench/.

On a GPU each call is bracketed by CUDA events after warm-up (autotuning, compilation and
allocator growth stay out of the numbers); on the CPU, wall clock.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls. On CUDA
    the peak-memory counter is reset after the warm-up, so max_memory_allocated covers the timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times
