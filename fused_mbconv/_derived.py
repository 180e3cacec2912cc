"""When a tensor derived from parameters may be kept between calls, and the key that says it is
still current: one rule for the eval-mode BatchNorm fold (nn/batch_norm.py) and the depthwise
weight's taps copy (ops/dwconv_bn_silu/triton_impl.py)."""

from __future__ import annotations

from typing import Optional

import torch


def _capturing(tensors: tuple[torch.Tensor, ...]) -> bool:
    # asked only for CUDA tensors: without a GPU the query itself raises
    return any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing()


def sources_key(*tensors: torch.Tensor) -> Optional[tuple]:
    """A key that changes whenever one of ``tensors`` may hold other values (an in-place write
    bumps its version counter; replacing it, by .to() or .data =, changes its address or dtype).
    The caller keeps the derived tensor with this key and detached aliases of ``tensors``, so that
    no new tensor can reuse a keyed address while the entry lives.

    None where the derived tensor must be made on every call instead:
    - inference tensors have no version counter;
    - during CUDA graph capture the graph must derive it from the live tensors on every replay.
      A tensor kept from before the capture would not follow in-place updates between replays,
      and once the cache replaced it, its freed memory would be reused while replays still read
      it.
    """
    if any(t.is_inference() for t in tensors) or _capturing(tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
