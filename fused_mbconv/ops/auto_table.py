"""The "auto" backend's measured choices: for each op and shape class, the backend that was
fastest, among those that matched the reference, on the GPU of ``auto_table.json`` beside this
file. ``bench/bench_auto_table.py`` measures and rewrites it on a GPU. Calls whose op or class
has no entry fall back to the op's fixed order (``_registry.AUTO_ORDER_CUDA``).

A shape class is "<dtype>/<layout>/<size>" of the op's main tensor (layout "matrix" for the
(N, C) inputs of the excite): size "small" under 2^20
elements, "medium" under 2^24, "large" from there (EfficientNet activations span all three).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import torch

from fused_mbconv._checks import memory_format_of

TABLE_PATH = Path(__file__).with_name("auto_table.json")
SIZE_CLASSES = ((1 << 20, "small"), (1 << 24, "medium"))


def size_class(numel: int) -> str:
    return next((name for limit, name in SIZE_CLASSES if numel < limit), "large")


def shape_class(t: torch.Tensor) -> str:
    size = size_class(t.numel())
    layout = ("channels_last" if memory_format_of(t) == torch.channels_last else "nchw") if t.dim() == 4 else "matrix"
    return f"{str(t.dtype).replace('torch.', '')}/{layout}/{size}"


@functools.cache
def load(path: Path = TABLE_PATH) -> dict[str, dict[str, str]]:
    """{op name: {shape class: backend}}; empty when no table has been measured."""
    if not path.exists():
        return {}
    return json.loads(path.read_text())["choices"]


def choice(op_name: str, like: torch.Tensor) -> Optional[str]:
    """The measured backend for ``op_name`` on tensors like ``like``, or None."""
    return load().get(op_name, {}).get(shape_class(like))
