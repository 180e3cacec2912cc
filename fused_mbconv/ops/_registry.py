"""Per-op table of backend implementations, and the call-time choice among them.

Each op registers its implementations here ("reference" always; "triton" and "cuda" where they
exist); the op's single torch.library implementation asks ``pick`` which one runs.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from fused_mbconv import backends as _backend
from fused_mbconv.ops import auto_table

# "auto" preference on CUDA devices where the measured table (ops/auto_table.py) has no entry, for
# inference and training alike. Training once stayed on the reference here (called eagerly, the
# fused training ops were host-bound on the H200: B5's step 135 ms against eager's 83), but the
# reference is no eager PyTorch: it computes in fp32, so a bf16 step upcasts every wide tensor.
# Counted on the meta device (bench/traffic_model.py), B5's bf16 training step on it moves 6.6x
# the bytes of eager torchvision's and launches 5.5x its kernels (443 vs 67 GiB, 9047 vs 1647):
# at least 117 ms of H200 time for its traffic, against the fused kernels' 43 ms from CUDA graphs
# and 135 ms called eagerly (bench/results/2026-11-27_cpu_auto_training.md).
AUTO_ORDER_CUDA = ("triton", "cuda", "reference")
# An op that the requested backend does not implement runs on the first of these that it has and
# that can run: the C++/CUDA extension has no GEMM (the expansion and projection ops), so a model
# under "cuda" runs those on Triton's GEMM, or on the reference's where Triton is missing.
FALLBACK = {"cuda": ("triton", "reference")}


def _below_autocast(fn: Callable) -> Callable:
    """``fn`` run with autocast off: an op is opaque to autocast (its callers cast its inputs as
    eager conv2d would), so the torch ops inside an implementation (the reference's convolutions
    and matmuls, the Triton backends' per-channel math) see their inputs' dtypes. torch.library
    leaves autocast on inside a custom op's kernel: under CPU autocast the reference backward's
    convolution_backward got mixed dtypes and failed."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch._C._is_any_autocast_enabled():
            with torch._C._DisableAutocast():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


class Implementations:
    """The implementations of one op, keyed by backend name."""

    def __init__(self, op_name: str) -> None:
        self.op_name = op_name
        self._by_backend: dict[str, Callable] = {}

    def register(self, backend_name: str) -> Callable[[Callable], Callable]:
        def decorator(fn: Callable) -> Callable:
            self._by_backend[backend_name] = _below_autocast(fn)
            return fn

        return decorator

    def backends(self) -> list[str]:
        return sorted(self._by_backend)

    def pick(self, device: torch.device, like: Optional[torch.Tensor] = None) -> Callable:
        """The implementation that runs on ``device`` under the backend in force; for "auto" on
        CUDA, the measured table's choice for tensors ``like`` the op's main input, if any, else
        the first of ``AUTO_ORDER_CUDA`` that is available; for a backend without this op, its
        ``FALLBACK``."""
        requested = _backend.get_backend()
        if requested == "auto":
            if device.type == "cuda":
                available = _backend.available_backends()
                measured = auto_table.choice(self.op_name, like) if like is not None else None
                for name in ([measured] if measured else []) + list(AUTO_ORDER_CUDA):
                    if name in self._by_backend and name in available:
                        return self._by_backend[name]
            return self._by_backend["reference"]
        _backend.check_usable(requested, device)
        if requested in self._by_backend:
            return self._by_backend[requested]
        available = _backend.available_backends()
        for name in FALLBACK.get(requested, ()):
            if name in self._by_backend and name in available:
                return self._by_backend[name]
        raise NotImplementedError(
            f"fused_mbconv::{self.op_name} has no {requested!r} implementation; it has {self.backends()}"
        )


def reference_fallback(reference_module, *, empty: bool = False):
    """A decorator for a backend's implementation of an op: calls with an fp64 tensor argument
    (and, with ``empty``, calls with an empty one: nothing to launch) run the function of the
    same name in ``reference_module`` instead. The kernels compute in fp32; fp64 math is the
    reference's job."""

    def use_reference(tensors) -> bool:
        return any(t.dtype == torch.float64 or (empty and t.numel() == 0) for t in tensors)

    def decorator(fn):
        fallback = getattr(reference_module, fn.__name__)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            return fallback(*args, **kwargs) if use_reference(tensors) else fn(*args, **kwargs)

        return wrapper

    return decorator
