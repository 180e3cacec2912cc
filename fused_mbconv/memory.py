"""How much memory a training forward keeps for its backward: the bytes of the distinct tensors
autograd saves, parameters excluded. It is the part of training memory that fusion changes (a
fused op keeps its input, not each unfused step's output), and it can be counted on any device:
on a CPU without a GPU it says what the fused model saves before a GPU run measures peak memory.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_activation_bytes(run: Callable[[], object], parameters: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages that autograd saves for backward while ``run()`` executes
    (a storage saved by several ops, or through several views, counts once), ``parameters``'
    storages left out. Keeps the saved tensors only until ``run``'s graph is freed."""
    excluded = {p.untyped_storage().data_ptr() for p in parameters}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values())
