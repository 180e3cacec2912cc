"""Input validation shared by the ops: clear errors that name the argument, what was expected
and what came, raised before any kernel runs (also at torch.compile trace time, from the fakes)."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of an allowed dtype, rank and shape (None matches any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ranks:
            expected = " or ".join(f"{r}-D" for r in ranks)
            raise ValueError(f"{name}: expected a {expected} tensor, got {t.dim()}-D of shape {tuple(t.shape)}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors must live on one device (the first one's)."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected a tensor on {first.device} (the device of {first_name}), got {t.device}"
            )


def check_nonempty_batch(name: str, x: torch.Tensor) -> None:
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected a batch of at least 1 sample, got an empty batch {tuple(x.shape)}")


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out so (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def empty_like_layout(x: torch.Tensor, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised 4-D output laid out like ``x`` (channels_last stays channels_last).

    Real and fake implementations both allocate through this, so their strides agree.
    """
    return torch.empty(tuple(shape), dtype=dtype or x.dtype, device=x.device, memory_format=memory_format_of(x))
