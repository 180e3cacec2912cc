"""Loads the compiled extension ``fused_mbconv._C`` (CUDA kernels) when it was built.

The package works without it: the Triton and reference backends are pure Python.
"""

from __future__ import annotations

import importlib

_module = None
_error: str | None = None


def _load() -> None:
    global _module, _error
    try:
        _module = importlib.import_module("fused_mbconv._C")
    except ImportError as exc:  # not built (no toolkit, or FUSED_MBCONV_SKIP_CUDA_BUILD=1)
        _error = str(exc)


def loaded() -> bool:
    return _module is not None


def load_error() -> str:
    return _error or "loaded"


_load()
