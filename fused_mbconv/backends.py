"""Backend selection: which implementation ("triton", "cuda", "reference") runs each op.

The choice is process-wide (``set_backend``), scoped (``with backend(...)``) or from the
environment (``FUSED_MBCONV_BACKEND``). "auto" picks per device and shape at call time.

Process-wide, not per thread, on purpose: autograd runs the backward of CUDA tensors on its own
worker thread, which must see the backend that the forward ran with.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "cuda", "reference")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cuda_extension_loaded() -> bool:
    from fused_mbconv import _extension

    return _extension.loaded()


def _missing(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    if name in ("auto", "reference"):
        return None
    if name == "triton":
        if not triton_importable():
            return "the 'triton' package is not installed (pip install triton)"
        if not (torch.cuda.is_available() or triton_interpreted()):
            return "no CUDA device is visible and TRITON_INTERPRET=1 is not set"
        return None
    if name == "cuda":
        if not _cuda_extension_loaded():
            from fused_mbconv import _extension

            return f"the compiled extension fused_mbconv._C is not available ({_extension.load_error()})"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None
    raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")


def available_backends() -> list[str]:
    """The backend names that can run in this process, "auto" and "reference" always among them."""
    return [name for name in BACKENDS if _missing(name) is None]


def _validated(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    why = _missing(name)
    if why is not None:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    return name


def set_backend(name: str) -> None:
    """Choose the backend for the whole process."""
    global _current
    _current = _validated(name)


def get_backend() -> str:
    """The backend in force."""
    return _current


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the enclosed block with backend ``name``; the previous choice is restored after."""
    global _current
    previous = _current
    _current = _validated(name)
    try:
        yield
    finally:
        _current = previous


def _from_environment() -> str:
    name = os.environ.get("FUSED_MBCONV_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FUSED_MBCONV_BACKEND: expected one of {BACKENDS}, got {name!r}")
    # An unavailable backend named in the environment is reported on first use, not at import,
    # so that `import fused_mbconv` never fails because of a shell setting.
    return name


_current = _from_environment()


def check_usable(name: str, device: torch.device) -> None:
    """Raise a clear error when the explicitly chosen backend ``name`` cannot run on ``device``."""
    why = _missing(name)
    if why is not None:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError(f"backend 'cuda' runs CUDA tensors only; got a tensor on {device}")
    if name == "triton" and device.type != "cuda" and not triton_interpreted():
        raise RuntimeError(
            f"backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1; got a tensor on {device}"
        )
